"""schemathesis against proto/openapi.yaml and the real server: no 5xx, every status code, content
type and body as documented. Two bounded runs: random ids (the 404 paths) and real ids (the 200s)."""
import os
import subprocess
import sys
import tempfile

import pytest

from lnserver import ROOT, TRAIN_JSONL

SCHEMA = ROOT / "proto" / "openapi.yaml"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,negative_data_rejection")
MAX_EXAMPLES = os.environ.get("LORANULL_SCHEMATHESIS_EXAMPLES", "15")


# Refusals that count as rejecting invalid data: schemathesis' defaults, 413 (body over the limit) and
# 414 (request line over the server's per-request memory, which a long enough invalid query reaches).
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422", "428", "429"]


def run_schemathesis(srv, key, params=None, extra=(), max_examples=MAX_EXAMPLES):
    exe = pathlib_exe()
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
        cfg.write("[checks.negative_data_rejection]\nexpected-statuses = [" + ", ".join(f'"{s}"' for s in REJECTED)
                  + "]\n")
        if params:
            cfg.write("[parameters]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in params.items()))
    cmd = [exe, "--config-file", cfg.name, "run", str(SCHEMA), "--url", srv.base, "-H", f"Authorization: Bearer {key}",
           *extra, "--checks", CHECKS, "--max-examples", max_examples, "--phases", "examples,coverage,fuzzing",
           "--workers", "1", "--request-timeout", "10", "--no-color", "--seed", "20261128"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    finally:
        os.unlink(cfg.name)
    assert r.returncode == 0, f"schemathesis found problems:\n{r.stdout[-12000:]}\n{r.stderr[-3000:]}\n{srv.log()}"
    return r.stdout


def pathlib_exe():
    exe = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    if not os.path.exists(exe):
        pytest.skip("schemathesis is not installed in the venv")
    return exe


def test_schemathesis_random_ids(server_factory):
    srv = server_factory("--no-access-log")
    key = srv.create_key("fuzz")
    run_schemathesis(srv, key)


def test_schemathesis_real_ids(server_factory):
    srv = server_factory("--no-access-log")
    key = srv.create_key("fuzz")
    f = srv.upload(key, TRAIN_JSONL)
    job = srv.create_job(key, model="m", training_file=f["id"])
    # A finished job: its event stream ends with [DONE] at once instead of waiting for events.
    srv.client(key).post(srv.url(f"/v1/fine_tuning/jobs/{job['id']}/cancel"))
    out = run_schemathesis(srv, key, {"path.job_id": job["id"], "path.file_id": f["id"]})
    assert "passed" in out


def test_schemathesis_worker_protocol(server_factory):
    """The /internal/v1 operations with a worker token (long-polls capped short for the run)."""
    srv = server_factory("--no-access-log", "--lease-wait-max-s", "0.2")
    tok = srv.create_token("fuzz")
    run_schemathesis(srv, tok, extra=("--include-tag", "internal"), max_examples="10")
