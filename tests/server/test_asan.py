"""The lifecycle, tenancy and ops tests again, against the ASan/UBSan build of the server
(build/asan/bin/loranull-server, built by `make V=asan unit`); the fixtures fail a test whose server
log shows a sanitizer report or whose server did not exit 0 on SIGTERM."""
import os
import subprocess
import sys

import pytest

from lnserver import ROOT

ASAN_BIN = ROOT / "build" / "asan" / "bin"


@pytest.mark.skipif(os.environ.get("LORANULL_BIN") is not None, reason="already running on a chosen binary")
def test_server_suites_under_asan():
    if not (ASAN_BIN / "loranull-server").exists():
        pytest.skip("build/asan/bin/loranull-server is not built (make V=asan unit)")
    env = dict(os.environ, LORANULL_BIN=str(ASAN_BIN), ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    suites = [str(ROOT / "tests" / "server" / name) for name in
              ("test_lifecycle.py", "test_tenancy_and_errors.py", "test_ops.py", "test_openai_sdk.py",
                           "test_concurrency.py", "test_gangs.py", "test_gang_reservation.py", "test_list_metadata.py",
                           "test_placement.py")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *suites],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
