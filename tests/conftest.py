"""Shared pytest fixtures: where the binaries are, a scratch dir per test."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin"))
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="session")
def bindir():
    return BIN
