"""Runs every C unit test binary (cmocka), in the release and the ASan/UBSan build.

`make test` builds both variants first; each binary is one pytest case so the summary counts them."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "tests" / "unit").glob("test_*.c"))


@pytest.mark.parametrize("variant", ["release", "asan"])
@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_unit_binary(src, variant):
    exe = ROOT / "build" / variant / "tests" / src.stem
    assert exe.exists(), f"{exe} was not built: run `make unit` and `make V=asan unit`"
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    env["LORANULL_ROOT"] = str(ROOT)
    r = subprocess.run([str(exe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{src.stem} ({variant}) failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
