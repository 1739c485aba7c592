"""Fixtures for the end-to-end tests: the real server (tests/server fixtures), real worker processes,
a tiny model shared by the session, and a ready project (key, worker token, uploaded data)."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "server"))

from e2e_helpers import LONG_JOB, LONG_STEPS, WORKER_BIN, Env, make_tiny_model  # noqa: E402,F401
from lnserver_fixtures import server, server_factory  # noqa: E402,F401  (re-exported fixtures)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    if not WORKER_BIN.exists():
        pytest.skip(f"{WORKER_BIN} is not built (run make)")
    return make_tiny_model(tmp_path_factory.mktemp("e2e-model"))


@pytest.fixture
def env(server_factory, models, tmp_path):
    # Lease TTL 2 s (the workers heartbeat every 0.3 s), fast retries, room for a few interruptions.
    srv = server_factory("--lease-ttl-s", "2", "--retry-backoff-s", "0.2", "--max-attempts", "6",
                         "--lease-wait-max-s", "5")
    e = Env(srv, models, tmp_path)
    yield e
    for w in e.workers:
        w.stop()




@pytest.fixture(scope="session")
def reference_adapter(models, tmp_path_factory):
    """adapter_model.safetensors of LONG_JOB run without interruption (its own server and worker)."""
    from e2e_helpers import Server, result_files, submit

    tmp = tmp_path_factory.mktemp("e2e-reference")
    srv = Server.start(tmp / "srv")
    w = None
    try:
        e = Env(srv, models, tmp)
        w = e.worker("ref")
        job = submit(srv, e.key, e.train_id, calibration=e.facts_id, **LONG_JOB)
        done = srv.wait_status(e.key, job["id"], {"succeeded", "failed"}, timeout=300)
        assert done["status"] == "succeeded", (done["error"], w.log())
        return result_files(srv, e.key, done)["adapter_model.safetensors"]
    finally:
        if w:
            w.stop()
        srv.stop()
