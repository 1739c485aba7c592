"""Tensor-parallel jobs (resources.ranks 2) on a worker that holds both ranks on threads (--ranks 2)
behave as one-rank jobs do: checkpoints every save_interval, pause and resume, kill -9 and resume on
another worker, cancel, knowledge drift at eval points, packed data. A 2-rank job interrupted and
resumed ends with the same adapter bytes as the uninterrupted 2-rank run (the thread comm adds
partial sums in rank order, so 2-rank runs are deterministic; wd_run.h, tensor_parallel.h)."""
import json
import math

import numpy as np
import pytest

from e2e_helpers import LONG_JOB, LONG_STEPS, Env, Server
from e2e_helpers import checkpoints, events, metrics, result_files, submit, task_jsonl, upload, wait_for

RANKS = ("--ranks", "2")


class _Ranks:
    """A stand-in for the server in submit(): every job it creates asks for `ranks` CPU ranks."""

    def __init__(self, srv, ranks):
        self.srv, self.ranks = srv, ranks

    def create_job(self, key, **spec):
        return self.srv.create_job(key, resources={"ranks": self.ranks, "device": "cpu"}, **spec)


def submit_ranks(env, ranks=2, **kw):
    return submit(_Ranks(env.srv, ranks), env.key, kw.pop("training_file", env.train_id), **kw)


def long_job(env):
    return submit_ranks(env, calibration=env.facts_id, **LONG_JOB)


def running_past(env, job, worker, min_step=40):
    """Waits for an uploaded checkpoint at min_step or later; the job must still be running."""
    wait_for(lambda: any(c["step_number"] >= min_step for c in checkpoints(env.srv, env.key, job["id"])), 120,
             f"a checkpoint at step >= {min_step} ({worker.log()})")
    st = env.srv.get_job(env.key, job["id"])["status"]
    assert st == "running", f"the job is {st} before the interruption: make it longer"


def finished(env, job, timeout=300):
    done = env.srv.wait_status(env.key, job["id"], {"succeeded", "failed", "cancelled"}, timeout=timeout)
    assert done["status"] == "succeeded", (done["error"], [w.log() for w in env.workers])
    return done


def messages(env, job):
    return [e["message"] for e in events(env.srv, env.key, job["id"])]


@pytest.fixture(scope="module")
def reference_2rank(models, tmp_path_factory):
    """LONG_JOB on 2 ranks, uninterrupted (its own server and worker): adapter bytes and metrics."""
    tmp = tmp_path_factory.mktemp("e2e-reference-2rank")
    srv = Server.start(tmp / "srv")
    e = Env(srv, models, tmp)
    try:
        e.worker("ref2", extra=RANKS)
        job = long_job(e)
        done = finished(e, job)
        return {"adapter": result_files(srv, e.key, done)["adapter_model.safetensors"],
                "metrics": metrics(srv, e.key, job["id"])}
    finally:
        for w in e.workers:
            w.stop()
        srv.stop()


def test_uninterrupted_two_rank_job_reports_as_one_rank(reference_2rank):
    """Every step's loss, knowledge drift (mean and per layer) at every eval point, not only at the
    end, and the before/after evaluation: what a one-rank job reports."""
    m = reference_2rank["metrics"]
    assert sorted(m["loss"]) == list(range(1, LONG_STEPS + 1))
    every = (LONG_STEPS + 19) // 20
    drift_steps = sorted(m["knowledge_drift_mean"])
    assert drift_steps == list(range(every, LONG_STEPS + 1, every)), drift_steps
    assert len([k for k in m if k.startswith("knowledge_drift/")]) == 14
    assert sorted(m["eval/task_loss"]) == [0, LONG_STEPS]


@pytest.mark.parametrize("where", ["same worker", "another worker"])
def test_two_rank_job_paused_and_resumed_ends_as_the_uninterrupted_run(env, reference_2rank, where):
    w = env.worker("w1", extra=RANKS)
    job = long_job(env)
    running_past(env, job, w)
    api = env.srv.client(env.key)
    r = api.post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/pause"))
    assert r.status_code == 200 and r.json()["status"] == "paused"
    wait_for(lambda: f"job {job['id']}: stopped" in w.log(), 10, "the worker to stop the paused job")
    wait_for(lambda: "paused, its last checkpoint uploaded" in w.log(), 10, "the pause checkpoint's upload")
    # The pause's own checkpoint, written by rank 0 from the gathered shards, at the last step reported.
    cks = checkpoints(env.srv, env.key, job["id"])
    last = max(c["step_number"] for c in cks)
    losses = metrics(env.srv, env.key, job["id"], "loss")["loss"]
    assert last == max(losses), (last, max(losses), w.log())
    assert 0 < last < LONG_STEPS
    if where == "another worker":
        w.term()
        env.worker("w2", extra=RANKS)
    assert api.post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/resume")).status_code == 200
    done = finished(env, job)
    msgs = messages(env, job)
    assert any("tensor-parallel" in m for m in msgs)
    if where == "another worker":
        assert any(f"Resuming from the checkpoint at step {last}" in m for m in msgs), msgs
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference_2rank["adapter"]


def test_two_rank_worker_killed_another_resumes_from_the_uploaded_checkpoint(env, reference_2rank):
    w1 = env.worker("w1", extra=RANKS)
    job = long_job(env)
    running_past(env, job, w1)
    w1.kill9()
    last = max(c["step_number"] for c in checkpoints(env.srv, env.key, job["id"]))
    assert last % LONG_JOB["save_interval"] == 0
    env.worker("w2", extra=RANKS)
    done = finished(env, job)
    assert done["attempts"] == 2
    msgs = messages(env, job)
    assert any(f"Resuming from the checkpoint at step {last}" in m for m in msgs), msgs
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference_2rank["adapter"]


def test_two_rank_job_cancelled_stops_and_the_worker_takes_the_next(env):
    w = env.worker("w1", extra=RANKS)
    job = long_job(env)
    running_past(env, job, w)
    r = env.srv.client(env.key).post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/cancel"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    wait_for(lambda: f"job {job['id']}: stopped" in w.log(), 10, "the worker to stop the cancelled 2-rank job")
    assert max(metrics(env.srv, env.key, job["id"], "loss")["loss"]) < LONG_STEPS
    nxt = submit_ranks(env, method="lora", epochs=1)
    done = finished(env, nxt, timeout=120)
    assert done["status"] == "succeeded"
    assert env.srv.get_job(env.key, job["id"])["status"] == "cancelled"


def test_two_rank_job_with_packed_data_matches_one_rank(env):
    """data.pack on 2 ranks: the packed step count and every step's loss of the 1-rank job (up to
    the rounding of partial sums added in another order)."""
    w = env.worker("w1", extra=RANKS)
    out = []
    for ranks in (1, 2):
        job = submit_ranks(env, ranks, method="lora", epochs=2, batch_size=2, data={"pack": 64})
        done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=120)
        assert done["status"] == "succeeded", (done["error"], w.log())
        out.append(metrics(env.srv, env.key, job["id"], "loss")["loss"])
    msgs = messages(env, job)
    validated = [m for m in msgs if m.startswith("Training data validated:")][0]
    n_tokens = int(validated.split(":")[1].replace(",", "").split()[2])
    steps = math.ceil(2 * n_tokens / (2 * 64))
    assert any(f"Training: {steps} steps of 2 packed rows of 64 tokens" in m and "tensor-parallel" in m
               for m in msgs), msgs
    assert sorted(out[1]) == sorted(out[0]) == list(range(1, steps + 1))
    one, two = (np.array([o[s] for s in range(1, steps + 1)]) for o in out)
    np.testing.assert_allclose(two, one, rtol=1e-4)


def test_bad_line_error_names_the_file_once(env):
    """The worker's message for a line the engine refuses says the file id once: "training file
    file-X line 3: …", not "training file file-X: file-X line 3: …"."""
    w = env.worker("w1", extra=RANKS)
    data = b'{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 5, 6]}\n{"input_ids": [7, 99999, 9]}\n'
    fid = upload(env.srv, env.key, data, "ids.jsonl")
    for ranks in (1, 2):
        job = submit_ranks(env, ranks, training_file=fid, method="lora")
        done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=60)
        assert done["status"] == "failed", w.log()
        msg = done["error"]["message"]
        assert done["error"]["code"] == "invalid_training_file", done["error"]
        assert msg.count(fid) == 1, msg
        assert msg.startswith(f"training file {fid} line 3:"), msg


@pytest.mark.parametrize("method", ["pissa", "corda"])
def test_svd_initialised_methods_on_two_ranks_match_one_rank(env, method):
    """pissa and corda initialise from an SVD of each whole weight: on 2 ranks (neither holding the
    whole model) rank 0 gathers one weight at a time, runs the 1-rank init on it and the ranks keep
    their blocks — so every step's loss is the 1-rank job's up to the rounding of partial sums."""
    w = env.worker("w1", extra=RANKS)
    out = []
    for ranks in (1, 2):
        job = submit_ranks(env, ranks, method=method, epochs=1, calibration=env.facts_id)
        done = env.srv.wait_status(env.key, job["id"], {"failed", "succeeded"}, timeout=120)
        assert done["status"] == "succeeded", (done["error"], w.log())
        out.append(metrics(env.srv, env.key, job["id"], "loss")["loss"])
    assert sorted(out[0]) == sorted(out[1])
    one, two = (np.array([o[s] for s in sorted(o)]) for o in out)
    np.testing.assert_allclose(two, one, rtol=1e-4)


def test_two_rank_full_fine_tuning_paused_and_resumed_ends_as_the_uninterrupted_run(env):
    """method full on 2 ranks: neither rank holds the whole model (weights, gradients and AdamW
    moments are split); rank 0 writes each checkpoint and the merged model one gathered tensor at a
    time, in the 1-rank formats. Paused (the pause's checkpoint written from the shards), resumed
    (each rank reading its blocks of it): the exported model's bytes are the uninterrupted run's."""
    w = env.worker("w1", extra=RANKS)
    spec = dict(method="full", lr=0.001, epochs=60, save_interval=40)
    ref = submit_ranks(env, **spec)
    ref_files = result_files(env.srv, env.key, finished(env, ref))
    assert {"config.json", "model.safetensors"} <= set(ref_files)
    assert any("Full fine-tuning: every weight trains" in m for m in messages(env, ref))
    job = submit_ranks(env, **spec)
    running_past(env, job, w)
    api = env.srv.client(env.key)
    r = api.post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/pause"))
    assert r.status_code == 200 and r.json()["status"] == "paused"
    wait_for(lambda: "paused, its last checkpoint uploaded" in w.log(), 20, "the pause checkpoint's upload")
    last = max(c["step_number"] for c in checkpoints(env.srv, env.key, job["id"]))
    total = max(metrics(env.srv, env.key, ref["id"], "loss")["loss"])
    assert 0 < last < total
    assert api.post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/resume")).status_code == 200
    files = result_files(env.srv, env.key, finished(env, job))
    assert any("tensor-parallel" in m for m in messages(env, job))
    assert files["model.safetensors"] == ref_files["model.safetensors"]
    assert files["config.json"] == ref_files["config.json"]


EVAL_FIELDS = ("val_loss", "knowledge_drift_mean", "knowledge_drift_max")


@pytest.mark.parametrize("method", ["lora_null_v2", "full"])
def test_two_rank_job_metrics_file_has_the_eval_fields_the_server_got(env, method):
    """The job's own out/metrics.jsonl (rank 0 writes it; kept on the worker while the job is
    paused) carries, at every eval point, the validation loss and the knowledge drift (mean, max,
    per module) the server got for that step, as a one-rank job's does: the evaluation runs on
    every rank's shard before rank 0 writes the row."""
    w = env.worker("w1", extra=RANKS)
    val_id = upload(env.srv, env.key, task_jsonl(8), "val.jsonl")
    spec = dict(LONG_JOB, method=method, lr=0.001 if method == "full" else 0.01)
    job = submit_ranks(env, calibration=env.facts_id, validation_file=val_id, eval_interval=20, **spec)
    running_past(env, job, w)
    api = env.srv.client(env.key)
    r = api.post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/pause"))
    assert r.status_code == 200 and r.json()["status"] == "paused"
    wait_for(lambda: "paused, its last checkpoint uploaded" in w.log(), 20, "the pause checkpoint's upload")
    path = w.work_dir / "jobs" / job["id"] / "out" / "metrics.jsonl"
    rows = {row["step"]: row for row in map(json.loads, path.read_text().splitlines())}
    srv = metrics(env.srv, env.key, job["id"])
    last = max(srv["loss"])
    assert sorted(rows) == list(range(1, last + 1)), (sorted(rows)[-3:], last)
    evals = list(range(20, last + 1, 20))
    assert len(evals) >= 2
    assert sorted(s for s in rows if "val_loss" in rows[s]) == sorted(s for s in srv["val_loss"] if s <= last) == evals
    modules = sorted(k for k in srv if k.startswith("knowledge_drift/"))
    assert len(modules) == 14, modules
    for s in evals:
        row = rows[s]
        for k in EVAL_FIELDS:
            assert row[k] == srv[k][s], (s, k, row.get(k), srv[k][s])
        for k in modules:
            assert row["knowledge_drift"][k.split("/", 1)[1]] == srv[k][s], (s, k)
    assert not any(k in rows[s] for s in rows if s not in evals for k in EVAL_FIELDS)
