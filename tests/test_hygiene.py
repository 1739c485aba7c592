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


def test_python_modules_have_unique_names():
    """pytest imports test modules (and their helpers, from sys.path) by basename: two files with
    one name in different folders stop the whole run at collection."""
    seen = {}
    for p in sorted(TESTS.rglob("*.py")):
        if "artifacts" in p.parts or "__pycache__" in p.parts or p.name in ("conftest.py", "__init__.py"):
            continue
        seen.setdefault(p.name, []).append(str(p.relative_to(TESTS)))
    dup = {k: v for k, v in seen.items() if len(v) > 1}
    assert not dup, f"rename one of each: {dup}"
