"""Checks on the test tree itself that keep one `pytest tests` run working.

Several folders have a conftest.py; Python caches the first one imported under the name
`conftest`, so `from conftest import X` in a test picks up whichever folder came first."""
import pathlib
import re

TESTS = pathlib.Path(__file__).resolve().parent


def test_no_test_imports_from_conftest():
    bad = []
    for p in TESTS.rglob("*.py"):
        if "artifacts" in p.parts:
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if re.match(r"\s*(from\s+conftest\s+import|import\s+conftest\b)", line):
                bad.append(f"{p.relative_to(TESTS)}:{i}: {line.strip()}")
    assert not bad, "import shared helpers from a uniquely named module instead:\n" + "\n".join(bad)
