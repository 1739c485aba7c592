"""Fixtures for the end-to-end tests: the real server (tests/server fixtures), real worker processes,
a tiny model shared by the session, and a ready project (key, worker token, uploaded data)."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "server"))

from e2e_helpers import WORKER_BIN, Worker, facts_jsonl, make_tiny_model, task_jsonl, upload  # noqa: E402
from lnserver_fixtures import server, server_factory  # noqa: E402,F401  (re-exported fixtures)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    if not WORKER_BIN.exists():
        pytest.skip(f"{WORKER_BIN} is not built (run make)")
    return make_tiny_model(tmp_path_factory.mktemp("e2e-model"))


class Env:
    """A server with a project key, a worker token and the task/facts files uploaded."""

    def __init__(self, srv, models, tmp_path):
        self.srv, self.models, self.tmp = srv, models, tmp_path
        self.key = srv.create_key("e2e")
        self.token = srv.create_token("e2e-workers")
        self.train_id = upload(srv, self.key, task_jsonl(), "task.jsonl")
        self.facts_id = upload(srv, self.key, facts_jsonl(), "facts.jsonl")
        self.workers = []

    def worker(self, name="w1", extra=()):
        w = Worker(self.srv, self.token, self.models, self.tmp / name, name=name, extra=extra).start()
        self.workers.append(w)
        return w


@pytest.fixture
def env(server_factory, models, tmp_path):
    # Lease TTL 2 s (the workers heartbeat every 0.3 s), fast retries, room for a few interruptions.
    srv = server_factory("--lease-ttl-s", "2", "--retry-backoff-s", "0.2", "--max-attempts", "6",
                         "--lease-wait-max-s", "5")
    e = Env(srv, models, tmp_path)
    yield e
    for w in e.workers:
        w.stop()


# The job every interruption test runs: long enough (720 steps of 4 examples, a second or two on one
# core) to be interrupted mid-way, with a checkpoint every 40 steps.
LONG_JOB = dict(method="lora_null_v2", epochs=60, save_interval=40)
LONG_STEPS = 720


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
