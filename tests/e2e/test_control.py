"""Interruptions of a running job: kill -9, SIGTERM, pause/resume, cancel, the server going away.
Each ends as wd_daemon.h promises, and a resumed job ends with the same adapter bytes as an
uninterrupted run of the same spec (the session's reference_adapter)."""
import time

import signal

from e2e_helpers import LONG_JOB, LONG_STEPS, Env
from e2e_helpers import checkpoints, events, metrics, result_files, submit, wait_for


def start_long_job(env, worker, min_step=40):
    job = submit(env.srv, env.key, env.train_id, calibration=env.facts_id, **LONG_JOB)
    wait_for(lambda: any(c["step_number"] >= min_step for c in checkpoints(env.srv, env.key, job["id"])), 120,
             f"a checkpoint at step >= {min_step} ({worker.log()})")
    st = env.srv.get_job(env.key, job["id"])["status"]
    assert st == "running", f"the job is {st} before the interruption: make it longer"
    return job


def finished(env, job, timeout=240):
    done = env.srv.wait_status(env.key, job["id"], {"succeeded", "failed", "cancelled"}, timeout=timeout)
    assert done["status"] == "succeeded", (done["error"], [w.log() for w in env.workers])
    return done


def messages(env, job):
    return [e["message"] for e in events(env.srv, env.key, job["id"])]


def test_kill9_then_another_worker_resumes_to_the_same_adapter(env, reference_adapter):
    w1 = env.worker("w1")
    job = start_long_job(env, w1)
    w1.kill9()
    cks = checkpoints(env.srv, env.key, job["id"])
    last = max(c["step_number"] for c in cks)
    losses = metrics(env.srv, env.key, job["id"], "loss")["loss"]
    for c in cks:  # each checkpoint carries its step's training loss, as OpenAI's do
        assert abs(c["metrics"]["train_loss"] - losses[c["step_number"]]) < 1e-9, c
    w2 = env.worker("w2")
    done = finished(env, job)
    assert done["attempts"] == 2
    msgs = messages(env, job)
    assert any("Lease expired" in m for m in msgs), msgs
    assert any(f"Resuming from the checkpoint at step {last}" in m for m in msgs), msgs
    assert "w2" in [m for m in msgs if "started attempt 2" in m][0]
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference_adapter, w2.log()


def test_sigterm_checkpoints_releases_and_exits_zero(env, reference_adapter):
    w1 = env.worker("w1")
    job = start_long_job(env, w1)
    rc, took = w1.term(timeout=30)
    assert rc == 0, w1.log()
    assert took < 25
    # Released at once (not by lease expiry), with a checkpoint at the step it stopped at.
    j = env.srv.get_job(env.key, job["id"])
    assert j["status"] == "queued", j
    msgs = messages(env, job)
    assert any("released the job (shutting down); requeued without using an attempt" in m for m in msgs), msgs
    assert j["attempts"] == 0, "the released lease's attempt is given back"
    assert not any("Lease expired" in m for m in msgs)
    stop_step = max(c["step_number"] for c in checkpoints(env.srv, env.key, job["id"]))
    loss_steps = sorted(metrics(env.srv, env.key, job["id"], "loss")["loss"])
    assert stop_step == loss_steps[-1], "the checkpoint is not at the last step reported"
    env.worker("w2")
    done = finished(env, job)
    assert any(f"Resuming from the checkpoint at step {stop_step}" in m for m in messages(env, job))
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference_adapter


def test_three_sigterms_in_a_row_use_no_attempts(server_factory, models, tmp_path):
    """With max_attempts 2, the job is evicted (SIGTERM) mid-training three times, each time picked
    up by a new worker: releases give their attempt back, so it still succeeds, on attempt 1.
    (Four times LONG_JOB's epochs, so that three evictions land well before its end.)"""
    srv = server_factory("--lease-ttl-s", "2", "--retry-backoff-s", "0.2", "--max-attempts", "2",
                         "--lease-wait-max-s", "5")
    env = Env(srv, models, tmp_path)
    try:
        job = submit(env.srv, env.key, env.train_id, calibration=env.facts_id,
                     **dict(LONG_JOB, epochs=4 * LONG_JOB["epochs"]))
        stop_step = 0
        for i in range(3):
            w = env.worker(f"w{i + 1}")
            # Mid-training under this worker: a checkpoint past the last stop, the job still running.
            wait_for(lambda: any(c["step_number"] >= stop_step + 40 for c in checkpoints(env.srv, env.key, job["id"])),
                     120, f"a checkpoint past step {stop_step} on {w.name} ({w.log()})")
            assert env.srv.get_job(env.key, job["id"])["status"] == "running", "the job ended before eviction"
            rc, _ = w.term(timeout=30)
            assert rc == 0, w.log()
            j = env.srv.get_job(env.key, job["id"])
            assert j["status"] == "queued" and j["attempts"] == 0, (j, w.log())
            stop_step = max(c["step_number"] for c in checkpoints(env.srv, env.key, job["id"]))
        env.worker("w4")
        done = finished(env, job)
        assert done["attempts"] == 1
        msgs = messages(env, job)
        assert sum("requeued without using an attempt" in m for m in msgs) == 3, msgs
        assert not any("Lease expired" in m or "gave up" in m for m in msgs), msgs
        assert any(f"Resuming from the checkpoint at step {stop_step}" in m for m in msgs), msgs
        assert sorted(metrics(env.srv, env.key, job["id"], "loss")["loss"])[-1] == 4 * LONG_STEPS
    finally:
        for w in env.workers:
            w.stop()


def test_pause_stops_training_and_resume_continues_to_the_same_adapter(env, reference_adapter):
    w = env.worker("w1")
    job = start_long_job(env, w)
    r = env.srv.client(env.key).post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/pause"))
    assert r.status_code == 200 and r.json()["status"] == "paused"
    # The training loop stops within a step or so of the worker hearing about it (heartbeat 0.3 s).
    t0 = time.time()
    wait_for(lambda: f"job {job['id']}: stopped" in w.log(), 10, "the worker to stop the paused job")
    assert time.time() - t0 < 5
    assert env.srv.get_job(env.key, job["id"])["status"] == "paused"
    r = env.srv.client(env.key).post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/resume"))
    assert r.status_code == 200
    done = finished(env, job)
    msgs = messages(env, job)
    assert any("with this worker's own checkpoint" in m for m in msgs), msgs
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference_adapter


def test_paused_job_resumes_on_another_worker_from_its_last_uploaded_checkpoint(env, reference_adapter):
    w1 = env.worker("w1")
    job = start_long_job(env, w1)
    api = env.srv.client(env.key)
    assert api.post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/pause")).json()["status"] == "paused"
    wait_for(lambda: f"job {job['id']}: stopped" in w1.log(), 10, "the worker to stop the paused job")
    assert "paused, its last checkpoint uploaded" in w1.log(), w1.log()
    w1.term()
    # The pause's own checkpoint went up (the server's pause grace): it is at the last step the
    # worker reported, not at the periodic checkpoint before it.
    cks = checkpoints(env.srv, env.key, job["id"])
    last = max(c["step_number"] for c in cks)
    loss_steps = sorted(metrics(env.srv, env.key, job["id"], "loss")["loss"])
    assert last == loss_steps[-1], (last, loss_steps[-5:], w1.log())
    assert [c for c in cks if c["step_number"] == last][0]["metrics"]["train_loss"] == \
        metrics(env.srv, env.key, job["id"], "loss")["loss"][last]
    env.worker("w2")
    assert api.post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/resume")).status_code == 200
    done = finished(env, job)
    assert any(f"Resuming from the checkpoint at step {last}" in m for m in messages(env, job))
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference_adapter


def test_sigterm_when_idle_exits_at_once_and_a_restart_keeps_the_worker_id(env):
    w = env.worker("idle")
    wait_for(lambda: (w.work_dir / "worker_id").exists(), 10, "registration")
    wid = (w.work_dir / "worker_id").read_text()
    time.sleep(0.3)  # long-polling for a lease now
    rc, took = w.term(timeout=10)
    assert rc == 0 and took < 2, w.log()
    w.start()
    wait_for(lambda: w.log().count("registered as") == 2, 10, "registration again")
    assert w.log().count(f"registered as {wid} ") == 2


def test_cancel_stops_the_job_and_the_worker_takes_the_next(env):
    w = env.worker("w1")
    job = start_long_job(env, w)
    r = env.srv.client(env.key).post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/cancel"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    wait_for(lambda: f"job {job['id']}: stopped" in w.log(), 10, "the worker to stop the cancelled job")
    assert "cancelled" in w.log()
    # Its work dir is cleaned up, and the worker is free for the next job.
    wait_for(lambda: not (w.work_dir / "jobs" / job["id"]).exists(), 5, "the job's work dir to go")
    nxt = submit(env.srv, env.key, env.train_id, method="lora", epochs=1)
    done = env.srv.wait_status(env.key, nxt["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded", w.log()
    assert env.srv.get_job(env.key, job["id"])["status"] == "cancelled"


def test_server_away_30s_within_the_lease_loses_no_reports(server_factory, models, tmp_path):
    """The server stopped for 30 s and started again (a restart or an outage): the worker goes on
    training, keeps its reports, and delivers every one of them once the server is back."""
    from e2e_helpers import Env

    srv = server_factory("--lease-ttl-s", "60", "--lease-wait-max-s", "5")
    env = Env(srv, models, tmp_path)
    w = env.worker("w1")
    try:
        job = start_long_job(env, w)
        srv.stop()
        time.sleep(30)
        srv.launch()
        t0 = time.time()
        done = finished(env, job)
        assert time.time() - t0 < 10, "the backlog was not sent soon after the server came back"
        assert done["attempts"] == 1
        assert "heartbeat failed" in w.log()
        # No metric point and no progress event was lost while the server was away.
        steps = sorted(metrics(srv, env.key, job["id"], "loss")["loss"])
        assert steps == list(range(1, LONG_STEPS + 1))
        msgs = messages(env, job)
        every = (LONG_STEPS + 19) // 20
        for k in range(every, LONG_STEPS + 1, every):
            assert any(m.startswith(f"Step {k}/{LONG_STEPS}:") for m in msgs), (k, msgs)
    finally:
        w.stop()


def test_server_killed_and_restarted_mid_job(server_factory, models, tmp_path):
    """kill -9 of the server while the worker trains: the restarted server still has the job and its
    lease (SQLite, WAL), the worker's reports that were refused in flight are sent again."""
    from e2e_helpers import Env

    srv = server_factory("--lease-ttl-s", "30", "--lease-wait-max-s", "5")
    env = Env(srv, models, tmp_path)
    w = env.worker("w1")
    try:
        job = start_long_job(env, w)
        srv.kill9()
        time.sleep(2)
        srv.launch()
        done = finished(env, job)
        assert done["attempts"] == 1
        assert sorted(metrics(srv, env.key, job["id"], "loss")["loss"]) == list(range(1, LONG_STEPS + 1))
    finally:
        w.stop()


def test_server_frozen_mid_job(server_factory, models, tmp_path):
    """A hung server (SIGSTOP: connections open, no answers) for 5 s: requests time out instead of
    failing at once; training goes on and every report arrives once the server answers again."""
    from e2e_helpers import Env

    srv = server_factory("--lease-ttl-s", "30", "--lease-wait-max-s", "5")
    env = Env(srv, models, tmp_path)
    w = env.worker("w1")
    try:
        job = start_long_job(env, w)
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(5)
        finally:
            srv.proc.send_signal(signal.SIGCONT)
        done = finished(env, job)
        assert done["attempts"] == 1
        assert "timed out" in w.log() or "Timeout" in w.log(), w.log()
        assert sorted(metrics(srv, env.key, job["id"], "loss")["loss"]) == list(range(1, LONG_STEPS + 1))
    finally:
        w.stop()


def test_worker_cut_off_longer_than_the_lease_stops_then_resumes(env, reference_adapter):
    """A partition: the worker is frozen (SIGSTOP) past the lease TTL, the server requeues the job; when
    the worker comes back its next report is refused, it stops that run, leases the job again and
    continues from its own checkpoint — ending with the reference adapter."""
    w = env.worker("w1")
    job = start_long_job(env, w)
    w.proc.send_signal(signal.SIGSTOP)
    try:
        env.srv.wait_status(env.key, job["id"], "queued", timeout=15)
    finally:
        w.proc.send_signal(signal.SIGCONT)
    done = finished(env, job)
    assert done["attempts"] == 2
    assert "lost its lease" in w.log()
    assert any("with this worker's own checkpoint" in m for m in messages(env, job))
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference_adapter
