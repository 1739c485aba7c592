"""A worker daemon killed mid-job (kill -9: a crash, an OOM kill) and started again with the same work
dir — a StatefulSet pod restarting — registers under its kept worker id with a new process instance:
the server ends the dead process's lease at once, and the restarted worker resumes the job from its
last checkpoint, long before the lease TTL would have let anyone have it."""
import re

from e2e_helpers import LONG_JOB, Env, checkpoints, events, result_files, submit, wait_for

TTL_S = 180  # no lease of this test may expire: the job must come back by the restart alone


def test_a_worker_killed_and_restarted_gets_its_job_back_before_the_lease_ttl(server_factory, models, tmp_path,
                                                                              reference_adapter):
    srv = server_factory("--lease-ttl-s", str(TTL_S), "--retry-backoff-s", "0.2", "--max-attempts", "3",
                         "--lease-wait-max-s", "5")
    env = Env(srv, models, tmp_path)
    w = env.worker("w1")
    try:
        job = submit(srv, env.key, env.train_id, calibration=env.facts_id, **LONG_JOB)["id"]
        wait_for(lambda: any(c["step_number"] >= 40 for c in checkpoints(srv, env.key, job)), 120,
                 f"a checkpoint at step >= 40 ({w.log()})")
        assert srv.get_job(env.key, job)["status"] == "running", "the job ended before the kill: make it longer"
        wid = (w.work_dir / "worker_id").read_text()
        w.kill9()
        last = max(c["step_number"] for c in checkpoints(srv, env.key, job))
        # The dead process's lease stands until someone says otherwise (its TTL is minutes away).
        assert srv.get_job(env.key, job)["status"] == "running"
        w.start()  # same work dir, so the same worker id; a new process instance
        # Back on the restarted worker and finished, within the TTL the old lease had left.
        done = srv.wait_status(env.key, job, {"succeeded", "failed"}, timeout=TTL_S - 20)
        assert done["status"] == "succeeded", (done["error"], w.log())
        assert done["attempts"] == 2
        msgs = [e["message"] for e in events(srv, env.key, job)]
        restarted = [m for m in msgs if m.startswith(f"Worker {wid} restarted (new process)")]
        assert len(restarted) == 1, msgs
        assert restarted[0].startswith(f"Worker {wid} restarted (new process): its lease of rank 0 ended; requeued "
                                       "(attempt 1 of 3 used"), restarted
        assert not any("Lease expired" in m for m in msgs), msgs
        # From the newest checkpoint: the one it kept in its work dir (at or past the last one it
        # uploaded), or the server's.
        found = [re.match(r"Resuming from (?:step (\d+) with this worker's own checkpoint|the checkpoint at step "
                          r"(\d+) )", m) for m in msgs]
        resumed = [int(x.group(1) or x.group(2)) for x in found if x]
        assert len(resumed) == 1 and resumed[0] >= last, "\n".join(msgs)
        assert wid in [m for m in msgs if "started attempt 2" in m][0]
        assert w.log().count(f"registered as {wid} ") == 2
        server_log = srv.log_path.read_text(errors="replace")
        assert f"lease of {job} ended (Worker {wid} restarted (new process)" in server_log
        # Resumed from the checkpoint in the same work dir, it ends where an uninterrupted run does.
        assert result_files(srv, env.key, done)["adapter_model.safetensors"] == reference_adapter, w.log()
    finally:
        w.stop()
