"""A resources.ranks=2 job spread over two worker processes (one device each): the ranks meet through the
server's rendezvous, train tensor-parallel over TCP (comm_tcp) and end with the adapter a single worker
with --ranks 2 (threads) makes; a killed rank fails the other's collective and the job is requeued, then
succeeds on two workers again; cancel stops both ranks."""
import re

import numpy as np
import pytest
from e2e_helpers import Env, checkpoints, metrics, result_files, save_files, wait_for
from test_control import finished as run_to_end, messages
from test_multirank import long_job, reference_2rank  # noqa: F401  (the uninterrupted 2-rank run, threads)

SPEC = dict(model="tiny-llama", seed=7, hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": 0.01},
            resources={"ranks": 2, "device": "cpu"})


def gang_spec(env, epochs=2):
    return dict(SPEC, training_file=env.train_id,
                hyperparameters=dict(SPEC["hyperparameters"], n_epochs=epochs),
                adapter={"type": "lora_null_v2", "rank": 4,
                         "calibration": {"file": env.facts_id, "samples": 32, "max_length": 64}})


def rank_of(worker, job_id):
    """The rank a worker holds of a job, from its log ("rank K of N joined the gang")."""
    m = re.search(rf"job {job_id}: rank (\d+) of \d+ joined the gang", worker.log())
    return int(m.group(1)) if m else None


def test_two_workers_train_one_job_to_the_threads_adapter(env, tmp_path):
    from safetensors.numpy import load

    g1, g2 = env.worker("g1"), env.worker("g2")
    job = env.srv.create_job(env.key, **gang_spec(env))
    done = run_to_end(env, job)
    # Each worker held one rank and met the other over TCP; only rank 0 reported the results.
    ranks = sorted(r for r in (rank_of(g1, job["id"]), rank_of(g2, job["id"])))
    assert ranks == [0, 1], (g1.log(), g2.log())
    msgs = messages(env, job)
    assert any("All 2 ranks of the gang met over TCP" in m for m in msgs), msgs
    assert any("tensor-parallel" in m for m in msgs), msgs
    split = result_files(env.srv, env.key, done)
    rank1 = g1 if rank_of(g1, job["id"]) == 1 else g2
    # rank 1 heart-beats until rank 0's complete ends the lease, then ends without a report of its own
    wait_for(lambda: f"job {job['id']}: rank 1's part ended (rank 0 reports for the job)" in rank1.log(), 10,
             f"rank 1 to end ({rank1.log()})")
    assert f"job {job['id']}: succeeded" not in rank1.log() and "checkpoint at step" not in rank1.log(), rank1.log()
    assert "rank 0's report ended the lease" in rank1.log()
    assert sorted(metrics(env.srv, env.key, job["id"], "loss")["loss"]) == list(range(1, 25))
    g1.stop()
    g2.stop()

    # The same spec on one worker holding both ranks (threads).
    env.worker("both", extra=("--ranks", "2"))
    job2 = env.srv.create_job(env.key, **gang_spec(env))
    threads = result_files(env.srv, env.key, run_to_end(env, job2))
    a, b = load(split["adapter_model.safetensors"]), load(threads["adapter_model.safetensors"])
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # comm_tcp sums in the thread backend's order: the same bits

    # It loads in PEFT and gives the logits our engine gives.
    from test_jobs import our_logits, peft_logits
    adir = save_files({k: v for k, v in split.items() if k.startswith("adapter_")}, tmp_path / "adapter")
    ids = [1, 5, 9, 42, 17, 3]
    model_dir = env.models / "tiny-llama"
    np.testing.assert_allclose(peft_logits(model_dir, adir, ids), our_logits(tmp_path, model_dir, adir, ids),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_fails_the_others_collective_and_the_job_is_requeued(server_factory, models, tmp_path,
                                                                       reference_2rank, victim):
    # A lease TTL longer than the workers' failure grace: the surviving rank's own report requeues the job
    # (with the e2e default of 2 s, the dead worker's silent heartbeat would requeue it first).
    env = Env(server_factory("--lease-ttl-s", "10", "--retry-backoff-s", "0.2", "--lease-wait-max-s", "5"), models,
              tmp_path)
    try:
        killed_rank_case(env, reference_2rank["adapter"], victim)
    finally:
        for w in env.workers:
            w.stop()


def killed_rank_case(env, reference, victim_rank):
    g1, g2 = env.worker("g1"), env.worker("g2")
    job = long_job(env)
    wait_for(lambda: len(metrics(env.srv, env.key, job["id"], "loss").get("loss", {})) >= 20, 180,
             f"20 training steps ({g1.log()} {g2.log()})")
    victim, survivor = (g1, g2) if rank_of(g1, job["id"]) == victim_rank else (g2, g1)
    victim.kill9()
    # The other rank's collective fails at once naming the dead one; it reports a retryable failure.
    lost = wait_for(lambda: [m for m in messages(env, job) if "retryable failure (rank_lost)" in m], 60,
                    f"the retryable failure ({survivor.log()})")
    dead = f"connection to rank {victim_rank} was closed"
    assert f"Rank {victim_rank} of the gang was lost" in lost[0] and dead in lost[0], lost
    assert dead in survivor.log()
    wait_for(lambda: env.srv.get_job(env.key, job["id"])["status"] == "queued", 30, "the job to be queued")
    assert survivor.running(), survivor.log()
    # Two workers again: the job resumes from its last checkpoint on attempt 2 and ends with the
    # uninterrupted run's adapter bytes.
    env.worker("g3")
    done = run_to_end(env, job, timeout=300)
    assert done["attempts"] == 2, done
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference
    msgs = messages(env, job)
    for rank in (0, 1):
        assert any(f"started rank {rank} of 2, attempt 2" in m for m in msgs), "\n".join(msgs)
    assert sum("All 2 ranks of the gang met over TCP" in m for m in msgs) == 2, "\n".join(msgs)


def test_a_frozen_rank_loses_the_gang_its_lease_and_rank_0_lets_go(env, reference_2rank):
    """SIGSTOP on rank 1's worker: its sockets stay open, so rank 0 would wait in its collective for ever;
    the server requeues the gang when rank 1's heartbeats stop, rank 0's next report is refused and it
    aborts its comm, ending the blocked collective. The job finishes on two other workers; rank 1, woken
    up, finds its lease gone and lets go too."""
    import os
    import signal

    g1, g2 = env.worker("g1"), env.worker("g2")
    job = long_job(env)
    wait_for(lambda: len(metrics(env.srv, env.key, job["id"], "loss").get("loss", {})) >= 20, 180,
             f"20 training steps ({g1.log()} {g2.log()})")
    frozen, rank0 = (g1, g2) if rank_of(g1, job["id"]) == 1 else (g2, g1)
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: f"job {job['id']}: stopped: its lease is gone" in rank0.log(), 60,
                 f"rank 0 to let go of the requeued gang ({rank0.log()})")
        assert rank0.running(), rank0.log()
        env.worker("g3")
        done = run_to_end(env, job, timeout=300)
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference_2rank["adapter"]
    wait_for(lambda: f"job {job['id']}: stopped" in frozen.log(), 30, f"rank 1 to let go ({frozen.log()})")
    assert frozen.running(), frozen.log()


def test_paused_split_job_resumes_to_the_uninterrupted_adapter(env, reference_2rank):
    g1, g2 = env.worker("g1"), env.worker("g2")
    job = long_job(env)
    wait_for(lambda: any(c["step_number"] >= 40 for c in checkpoints(env.srv, env.key, job["id"])), 120,
             f"a checkpoint at step >= 40 ({g1.log()} {g2.log()})")
    r = env.srv.client(env.key).post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/pause"))
    assert r.status_code == 200 and r.json()["status"] == "paused"
    # Whichever rank sees the pause first, every rank stops after the same step and rank 0 uploads
    # that step's checkpoint (its own report may then be refused: the job is paused).
    ends = (f"job {job['id']}: stopped", f"job {job['id']}: ended without its lease")
    for w in (g1, g2):
        wait_for(lambda: any(e in w.log() for e in ends), 30, f"{w.name} to stop ({w.log()})")
    last = max(c["step_number"] for c in checkpoints(env.srv, env.key, job["id"]))
    assert last == max(metrics(env.srv, env.key, job["id"], "loss")["loss"]), \
        f"the stop's checkpoint is missing ({g1.log()} {g2.log()})"
    rank1 = g1 if rank_of(g1, job["id"]) == 1 else g2
    assert "checkpoint at step" not in rank1.log(), "only rank 0 uploads checkpoints"
    r = env.srv.client(env.key).post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/resume"))
    assert r.status_code == 200, r.text
    done = run_to_end(env, job)
    assert result_files(env.srv, env.key, done)["adapter_model.safetensors"] == reference_2rank["adapter"]
    msgs = messages(env, job)
    assert any(m.startswith("Resuming from") and f"step {last}" in m for m in msgs), "\n".join(msgs)


def test_cancel_stops_both_ranks(env):
    g1, g2 = env.worker("g1"), env.worker("g2")
    job = env.srv.create_job(env.key, **gang_spec(env, epochs=60))
    wait_for(lambda: len(metrics(env.srv, env.key, job["id"], "loss").get("loss", {})) >= 10, 180,
             f"10 training steps ({g1.log()} {g2.log()})")
    r = env.srv.client(env.key).post(env.srv.url(f"/v1/fine_tuning/jobs/{job['id']}/cancel"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    for w in (g1, g2):
        wait_for(lambda: f"job {job['id']}: stopped" in w.log(), 30, f"{w.name} to stop the cancelled job ({w.log()})")
        assert w.running(), w.log()
    # Both are free again: the next gang job runs on them.
    nxt = env.srv.create_job(env.key, **gang_spec(env, epochs=1))
    run_to_end(env, nxt)
    assert env.srv.get_job(env.key, job["id"])["status"] == "cancelled"


def test_sigterm_on_rank_1_stops_the_gang_with_a_checkpoint_and_releases(env):
    g1, g2 = env.worker("g1"), env.worker("g2")
    job = env.srv.create_job(env.key, **gang_spec(env, epochs=60))
    wait_for(lambda: len(metrics(env.srv, env.key, job["id"], "loss").get("loss", {})) >= 10, 180,
             f"10 training steps ({g1.log()} {g2.log()})")
    rank1, rank0 = (g1, g2) if rank_of(g1, job["id"]) == 1 else (g2, g1)
    rc, _ = rank1.term(timeout=30)
    assert rc == 0, rank1.log()
    # Every rank stopped after the same step; rank 0 uploaded that step's checkpoint and released the job.
    msgs = wait_for(lambda: [m for m in messages(env, job) if "released the job" in m], 30, f"the release ({rank0.log()})")
    assert "another rank's worker is shutting down" in msgs[0] and "without using an attempt" in msgs[0], msgs
    last = max(c["step_number"] for c in checkpoints(env.srv, env.key, job["id"]))
    assert rank0.running(), rank0.log()
    env.worker("g3")
    done = run_to_end(env, job, timeout=300)
    assert done["attempts"] == 1, done
    msgs = messages(env, job)
    assert any(m.startswith("Resuming from") and f"step {last}" in m for m in msgs), "\n".join(msgs)


def test_an_advertise_address_rank_0_cannot_listen_on_fails_retryable_naming_it(env):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: rank 0 cannot listen there.
    bad = ("--advertise-host", "192.0.2.1")
    g1, g2 = env.worker("g1", extra=bad), env.worker("g2", extra=bad)
    job = env.srv.create_job(env.key, **gang_spec(env, epochs=1))
    msgs = wait_for(lambda: [m for m in messages(env, job) if "retryable failure (rendezvous_failed)" in m], 60,
                    f"the rendezvous failure ({g1.log()} {g2.log()})")
    assert "rank 0 cannot open the gang's listener (--advertise-host, --comm-ports)" in msgs[0], msgs
    assert "192.0.2.1" in msgs[0], msgs
    assert g1.running() and g2.running()


def test_two_of_three_ranks_on_one_worker_is_refused_clearly(env):
    """A split that puts more than one rank (but not all) on a CPU worker is not supported: the job
    fails naming the split, and the worker with the single rank stops waiting for the gang."""
    env.worker("two", extra=("--ranks", "2"))
    one = env.worker("one")
    job = env.srv.create_job(env.key, **dict(gang_spec(env, epochs=1), resources={"ranks": 3, "device": "cpu"}))
    done = env.srv.wait_status(env.key, job["id"], {"succeeded", "failed"}, timeout=60)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "unsupported_resources", done["error"]
    assert "resources.ranks=3 was split over several workers with 2 ranks on this one" in done["error"]["message"]
    wait_for(lambda: f"job {job['id']}: stopped" in one.log() or f"job {job['id']}: ended" in one.log(), 30,
             f"the single rank's worker to let go ({one.log()})")


@pytest.mark.parametrize("args, env_ports, needle", [
    (["--comm-ports", "5-2"], None, "--comm-ports '5-2': expected LO-HI within 1-65535"),
    (["--comm-ports", "x"], None, "--comm-ports 'x'"),
    (["--rendezvous-timeout-s", "0"], None, "--rendezvous-timeout-s '0'"),
    ([], "70000", "LORANULL_COMM_PORTS '70000'"),
    (["--device", "cuda:0", "--ranks", "2"], None, "run one worker per GPU (--device cuda:0, --device cuda:1"),
])
def test_gang_flag_errors_are_sentences(models, tmp_path, args, env_ports, needle):
    import os
    import subprocess

    from e2e_helpers import WORKER_BIN
    tok = tmp_path / "tok"
    tok.write_text("wt-ln-x\n")
    env = dict(os.environ)
    if env_ports:
        env["LORANULL_COMM_PORTS"] = env_ports
    r = subprocess.run([str(WORKER_BIN), "--server", "http://127.0.0.1:9", "--token-file", str(tok), "--models",
                        str(models), "--device", "cpu", "--work-dir", str(tmp_path / "w"), *args],
                       capture_output=True, text=True, timeout=20, env=env)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr
