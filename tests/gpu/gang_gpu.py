#!/usr/bin/env python3
"""A GPU gang end to end: two loranull-worker processes of the CUDA build (build/cuda/bin), one GPU
each (--device cuda:0, cuda:1), next to a real loranull-server; a resources.ranks=2 job on cuda is
leased to both, rank 0 posts the NCCL unique id through the rendezvous (key nccl_unique_id), the
ranks join one NCCL group and train tensor-parallel; the job succeeds, rank 0's event says the
gang met over NCCL and both workers' logs say they joined over NCCL.

    tests/gpu/gang_gpu.py            (tests/gpu/run.sh runs it as the step gang_gpu)

Needs 2 GPUs: with fewer it prints "SKIP: …" and exits 77 before building anything. Then builds
what it needs (make bin/loranull bin/loranull-server cuda-bin: the server's libraries) and uses
the e2e helpers (python requests). Exit 0 = pass, 1 = fail."""
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def gpu_count():
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def main():
    n = gpu_count()
    if n < 2:
        print(f"SKIP: gang_gpu: {n} GPU(s) here; a GPU gang of two workers needs 2 (one per worker)")
        return 77
    try:
        import requests  # noqa: F401  (the e2e helpers' HTTP client)
    except ImportError:
        print("SKIP: gang_gpu: python requests is not installed (the e2e helpers need it)")
        return 77
    subprocess.run(["make", "-C", str(ROOT), "-j8", "bin/loranull", "bin/loranull-server", "cuda-bin"], check=True)
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import e2e_helpers as h
    h.WORKER_BIN = ROOT / "build" / "cuda" / "bin" / "loranull-worker"  # Worker.start reads it
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="gang_gpu_"))
    models = h.make_tiny_model(tmp)
    srv = h.Server.start(tmp / "srv", ["--lease-ttl-s", "5", "--retry-backoff-s", "0.2", "--max-attempts", "2"])
    env = h.Env(srv, models, tmp)
    failures = []
    try:
        w0 = env.worker("g0", extra=("--device", "cuda:0", "--rendezvous-timeout-s", "60"))
        w1 = env.worker("g1", extra=("--device", "cuda:1", "--rendezvous-timeout-s", "60"))
        job = srv.create_job(env.key, model=h.MODEL_NAME, training_file=env.train_id, seed=7,
                             hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": 0.01},
                             adapter={"type": "lora", "rank": 4}, resources={"ranks": 2, "device": "cuda"})
        done = srv.wait_status(env.key, job["id"], {"succeeded", "failed", "cancelled"}, timeout=180)
        ok = done["status"] == "succeeded"
        print(f"{'ok  ' if ok else 'FAIL'} 2-rank cuda job over two GPU workers: {done['status']} "
              f"{done.get('error') or ''}")
        if not ok:
            failures.append("status")
        evs = h.events(srv, env.key, job["id"])
        met = any("All 2 ranks of the gang met over NCCL" in e["message"] for e in evs)
        print(f"{'ok  ' if met else 'FAIL'} rank 0's event: the gang met over NCCL")
        if not met:
            failures.append("event")
        for w in (w0, w1):
            joined = "joined the gang over NCCL on CUDA device" in w.log()
            print(f"{'ok  ' if joined else 'FAIL'} worker {w.name}: joined the gang over NCCL")
            if not joined:
                failures.append(w.name)
        if failures:
            for w in (w0, w1):
                print(f"---- {w.name} log (last 30 lines)\n" + "\n".join(w.log().splitlines()[-30:]))
    finally:
        for w in env.workers:
            w.stop()
        srv.stop()
    print(("FAIL gang_gpu: " + ", ".join(failures)) if failures else "PASS gang_gpu")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
