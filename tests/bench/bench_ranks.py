"""Tensor-parallel training on the CPU: threads vs processes over TCP, on 2 ranks.

Measures, in one run, on this machine as it is loaded:
 1. comm: allreduce / allgather time of the thread and TCP backends for 1 KiB..64 MiB per rank
    (build/release/bench/bench_comm, built by tests/bench/run.sh from tests/bench/bench_comm.c);
 2. `loranull train` tokens/s: 1 rank × 1 thread, 2 ranks × 1 thread (`--ranks 2`, thread backend),
    1 rank × 2 threads (the fair comparison for 2 ranks on 2 cores), alternating for --rounds rounds;
 3. the same 2-rank job (resources.ranks = 2) through a real loranull-server, once split over two
    loranull-worker processes (one rank each, TCP backend) and once on one `--ranks 2` worker
    (threads), alternating; each rank runs 1 OpenMP/BLAS thread. Tokens/s come from the workers'
    per-step metrics on the server; the bytes_sent of rank 1's comm socket (`ss -tinp`, sampled
    during the job) count what it sent to rank 0.
Every configuration's throughput is its median timed step (the first step of each run, which
touches every buffer for the first time, is not timed); the best step is kept too. The comm share
of a step is estimated from the collectives a step makes (model.c: 4 all-reduces of tokens ×
hidden per layer; ln_tp_reduce_grads: one per replicated LoRA factor) and the times measured in 1.

Usage: .venv/bin/python tests/bench/bench_ranks.py [--steps S] [--rounds R] [--job-examples N] [--results FILE]
"""
import argparse
import json
import os
import pathlib
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from e2e_helpers import CLI_BIN, Server, Worker, events, metrics, run_cli  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "bench"))
from bench_engine import platform_cpu  # noqa: E402  (/proc/cpuinfo's model name)

BENCH_COMM = ROOT / "build" / "release" / "bench" / "bench_comm"
MODEL = "bench-llama"
# LLaMA-shaped, 4 layers at hidden 512: big enough that a step's matrix products dominate, small
# enough for a few minutes on 2 cores. The vocabulary stays small (as its share of a real model's
# FLOPs is): lm_head and embeddings are replicated on every rank.
CFG = {"vocab_size": 1024, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
       "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
       "rope_theta": 10000.0, "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"],
       "model_type": "llama"}
SEQ, BATCH, RANK, ALPHA = 256, 4, 16, 32
TOKEN_IDS = 684  # ids the default tokenizer of `loranull model new` knows
BEGIN, END = "<!-- bench_ranks: begin -->", "<!-- bench_ranks: end -->"


def thread_env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))


def load_now():
    return os.getloadavg()[0]


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------- 1. comm

def comm_sweep():
    if not BENCH_COMM.exists():
        sys.exit(f"bench_ranks: {BENCH_COMM} is not built (run `bash tests/bench/run.sh --build-only`)")
    rows = {}
    for backend in ("thread", "tcp"):
        r = subprocess.run([str(BENCH_COMM), backend], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            sys.exit(f"bench_ranks: bench_comm {backend} failed:\n{r.stderr}")
        for line in r.stdout.splitlines():
            x = json.loads(line)
            rows[(x["backend"], x["op"], x["bytes"])] = x
    return rows


def allreduce_s(comm, backend, nbytes):
    """Median allreduce time for nbytes, interpolated linearly between the two measured sizes around it."""
    sizes = sorted(b for (be, op, b) in comm if be == backend and op == "allreduce")
    lo = max([b for b in sizes if b <= nbytes], default=sizes[0])
    hi = min([b for b in sizes if b >= nbytes], default=sizes[-1])
    tlo, thi = comm[(backend, "allreduce", lo)]["median_s"], comm[(backend, "allreduce", hi)]["median_s"]
    return tlo if hi == lo else tlo + (thi - tlo) * (nbytes - lo) / (hi - lo)


def step_collectives():
    """(bytes per rank, count) of the all-reduces of one 2-rank step, and the step's FLOPs split into
    the sharded part and the part every rank repeats (replicated lm_head, LoRA factors A of q,k,v,gate,up
    and B of o,down)."""
    C, I, V, L = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"], CFG["num_hidden_layers"]
    hd = C // CFG["num_attention_heads"]
    kvd = CFG["num_key_value_heads"] * hd
    N = SEQ * BATCH
    # activations: o and down outputs (forward), the inputs' gradients of q,k,v and gate,up (backward)
    coll = [(N * C * 4, 4 * L)]
    col = [(C, C), (kvd, C), (kvd, C), (I, C), (I, C)]   # (d_out, d_in) of q, k, v, gate, up
    row = [(C, C), (C, I)]                               # o, down
    coll += [(RANK * d_in * 4, L) for _, d_in in col]    # replicated A's gradient
    coll += [(d_out * RANK * 4, L) for d_out, _ in row]  # replicated B's gradient
    base = sum(o * i for o, i in col + row)
    lora_rep = sum(RANK * i for _, i in col) + sum(RANK * o for o, _ in row)
    lora_shard = sum(RANK * o for o, _ in col) + sum(RANK * i for _, i in row)
    # forward 2·N·(weights), backward dX 2·N·(weights) + LoRA dA/dB 2·N·(factors); attention 12·B·h·T²·hd
    sharded = L * (4 * N * base + 6 * N * lora_shard + 12 * BATCH * CFG["num_attention_heads"] * SEQ * SEQ * hd)
    replicated = 4 * N * V * C + L * 6 * N * lora_rep
    return coll, sharded, replicated


# ---------------------------------------------------------------- 2. loranull train

def train_cli(td, ranks, threads, steps, rnd):
    out = td / f"cli_r{ranks}_t{threads}_{rnd}"
    r = subprocess.run([str(CLI_BIN), "train", "--model", str(td / "models" / MODEL), "--data", str(td / "data.jsonl"),
                        "--out", str(out), "--method", "lora", "--rank", str(RANK), "--alpha", str(ALPHA),
                        "--batch-size", str(BATCH), "--max-steps", str(steps), "--max-seq-len", str(SEQ),
                        "--no-shuffle", "--ranks", str(ranks)], capture_output=True, text=True,
                       env=thread_env(threads), timeout=1200)
    if r.returncode != 0:
        sys.exit(f"bench_ranks: loranull train --ranks {ranks} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["tokens"] / x["tokens_per_s"] for x in rows][1:], rows[-1]["loss"]


# ---------------------------------------------------------------- 3. a 2-rank job on workers

class SocketBytes:
    """Samples `ss -tinp` every 0.2 s on a thread: the most bytes_sent seen on each TCP socket of the given
    processes that does not touch the server's port (the comm sockets of a split job's ranks)."""

    def __init__(self, pids, server_port):
        self.pids, self.port, self.seen = set(pids), str(server_port), {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True).stdout
            sock = None
            for line in out.splitlines():
                if not line[:1].isspace():
                    f = line.split()
                    m = re.search(r"pid=(\d+)", line)
                    pid = int(m.group(1)) if m else None
                    ends = f[2:4] if len(f) >= 4 else []
                    sock = (pid, *ends) if pid in self.pids and not any(e.endswith(":" + self.port) for e in ends) \
                        else None
                elif sock:
                    m = re.search(r"bytes_sent:(\d+)", line)
                    if m:
                        self.seen[sock] = max(self.seen.get(sock, 0), int(m.group(1)))
            self.stop.wait(0.2)

    def sent_by(self, pid):
        self.stop.set()
        self.thread.join()
        return sum(b for (p, *_), b in self.seen.items() if p == pid)


def run_job(srv, key, token, td, train_id, split, rnd):
    """One resources.ranks=2 job: split over two workers (TCP) or on one --ranks 2 worker (threads).
    Returns (step seconds after the first, bytes rank 1 sent over its comm sockets or None, final loss)."""
    names = ["tcp0", "tcp1"] if split else ["thr"]
    extra = () if split else ("--ranks", "2")
    ws = [Worker(srv, token, td / "models", td / f"w_{n}_{rnd}", name=f"{n}-{rnd}", extra=extra).start()
          for n in names]
    sampler = None
    try:
        time.sleep(0.5)
        sampler = SocketBytes([w.proc.pid for w in ws], srv.port) if split else None
        job = srv.create_job(key, model=MODEL, training_file=train_id, seed=7,
                             hyperparameters={"n_epochs": 1, "batch_size": BATCH, "learning_rate": 2e-4,
                                              "max_seq_len": SEQ},
                             adapter={"type": "lora", "rank": RANK, "alpha": ALPHA},
                             resources={"ranks": 2, "device": "cpu"})
        done = srv.wait_status(key, job["id"], {"succeeded", "failed", "cancelled"}, timeout=1200)
        if done["status"] != "succeeded":
            sys.exit(f"bench_ranks: job {job['id']} {done['status']}: {done.get('error')}\n" +
                     "\n".join(w.log() for w in ws))
        sent = None
        msgs = [e["message"] for e in events(srv, key, job["id"])]
        if split:
            if not any("met over TCP" in m for m in msgs):
                sys.exit("bench_ranks: the split job's ranks did not meet over TCP:\n" + "\n".join(msgs))
            r1 = [w for w in ws if "rank 1 of 2 joined the gang" in w.log()]
            if r1:
                sent = sampler.sent_by(r1[0].proc.pid)
        m = metrics(srv, key, job["id"])
        steps = sorted(m["tokens_per_s"])
        secs = [m["tokens"][s] / m["tokens_per_s"][s] for s in steps][1:]
        return secs, sent, m["loss"][steps[-1]]
    finally:
        if sampler:
            sampler.stop.set()
        for w in ws:
            w.stop()


# ---------------------------------------------------------------- report

def ratio(a, b):
    """a's throughput over b's (best runs' medians)."""
    return f"{a['tps'] / b['tps']:.2f}×"


def summary(runs):
    """runs: each run's timed step seconds. Each run's median step; the configuration's figure is its best
    run (other jobs on the machine only ever slow a run down), with every run's median kept to show the noise."""
    tokens = SEQ * BATCH
    med = [statistics.median(r) for r in runs]
    return {"tps": round(tokens / min(med), 1), "median_step_s": round(min(med), 4),
            "runs_tps": [round(tokens / m) for m in med], "steps_timed": sum(len(r) for r in runs)}


def runs_cell(x):
    return " / ".join(f"{v:,}" for v in x["runs_tps"])


def write_results(path, r):
    c, t, j = r["comm"], r["train"], r["jobs"]
    sizes = sorted({b for (_, _, b) in c})

    def cell(be, op, b):
        x = c[(be, op, b)]
        return f"{x['median_s'] * 1e6:,.0f} µs, {x['algbw_GBps']:.2f} GB/s"

    def kib(b):
        return f"{b // 1024} KiB" if b < 1 << 20 else f"{b >> 20} MiB"

    comm_rows = "\n".join(f"| {kib(b)} | {cell('thread', 'allreduce', b)} | {cell('tcp', 'allreduce', b)} | "
                          f"{cell('thread', 'allgather', b)} | {cell('tcp', 'allgather', b)} |" for b in sizes)
    t11, t21, t12 = t["1x1"], t["2x1"], t["1x2"]
    jt, jp = j["threads"], j["tcp"]
    est = r["estimate"]
    extra_ms = (est['tcp_comm_s'] - est['thread_comm_s']) * 1e3
    predicted_ms = (t11['median_step_s'] / est['ideal_ratio'] + est['thread_comm_s']) * 1e3
    job_diff_ms = (jp['median_step_s'] - jt['median_step_s']) * 1e3
    tcp_vs_threads = (f"Over TCP the same collectives take ≈ {extra_ms:.1f} ms more per step than between threads "
                      "(part 1's medians; the kernel's copies through the loopback socket run on the same 2 cores "
                      f"as the ranks); the best TCP job's step was {job_diff_ms:.0f} ms longer than the best threaded "
                      "job's, and the runs of either vary by more than that under this load (each run is listed)."
                      if extra_ms > 0 else
                      f"In part 1 the TCP collectives of a step were not slower than the threads' ({-extra_ms:.1f} ms "
                      "less at the medians: the thread backend's ranks meet at a mutex/condition-variable barrier twice "
                      "per collective and sum in place, which a loaded machine delays as much as the loopback copies), "
                      "so the TCP/threads job ratio measures load noise more than the transport.")
    act_mib = est["activation_bytes"] / (1 << 20)
    sent = f"{j['rank1_sent_mib']:.1f} MiB" if j["rank1_sent_mib"] is not None else "n/a"
    # the worker also evaluates the task loss before and after training (forwards over the training
    # file, at most 256 examples): 2 all-reduces of tokens × hidden per layer each
    ev = 2 * min(j["examples"], 256) * SEQ * CFG["hidden_size"] * 4 * 2 * CFG["num_hidden_layers"]
    predicted = (j["steps"] * est["bytes_per_step"] + ev) / (1 << 20)
    body = f"""{BEGIN}
## Tensor-parallel training on the CPU: threads vs processes over TCP (`tests/bench/bench_ranks.py`)

Measured {r['when']} by `.venv/bin/python tests/bench/bench_ranks.py --steps {r['steps']} --rounds {r['rounds']} --job-examples {j['examples']}`
(after `bash tests/bench/run.sh --build-only`) on {os.cpu_count()} CPUs ({r['cpu']}), shared with other engineers'
builds and tests: `uptime` before: `{r['uptime_before']}`; after: `{r['uptime_after']}`; load average (1 min)
while each part ran: comm {r['load']['comm']:.2f}, train {r['load']['train']:.2f}, jobs {r['load']['jobs']:.2f}.
Every rank runs 1 OpenMP/BLAS thread (OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = 1) except the
1 rank × 2 threads row, so each 2-way figure uses both cores. The first step of every run is not
timed; configurations alternate over {r['rounds']} rounds; a run's throughput is its median step, and a
configuration's figure is its best run (other jobs only slow a run down; every run's figure is listed).

Model: LLaMA-shaped, 4 layers, hidden 512, 8 heads / 4 kv, intermediate 1408, vocab 1024 (`loranull model
new`, seed 1), seq {SEQ} × batch {BATCH} = {SEQ * BATCH} tokens per step (random ids), LoRA rank {RANK} (alpha {ALPHA})
on q,k,v,o,gate,up,down, AdamW, fp32.

**1. Collectives, 2 ranks** (`build/release/bench/bench_comm thread|tcp`: thread = 2 threads of one
process; tcp = 2 processes on 127.0.0.1, comm_tcp.c). Size = bytes each rank contributes; median of
3..2000 back-to-back calls timed on rank 0; bandwidth = size / time (allreduce), 2 × size / time
(allgather: the bytes each rank ends with).

| size | thread allreduce | TCP allreduce | thread allgather | TCP allgather |
|---|---|---|---|---|
{comm_rows}

**2. `loranull train`, one process** ({r['steps']} steps per run, {t11['steps_timed']} timed steps per configuration;
final losses {r['losses']} — the ranks reproduce one rank's loss):

| configuration | tok/s (best run) | each run, tok/s | ratio to 1 rank × 1 thread | ratio to 1 rank × 2 threads |
|---|---|---|---|---|
| 1 rank × 1 thread | {t11['tps']} | {runs_cell(t11)} | 1.00× | {ratio(t11, t12)} |
| 1 rank × 2 threads (OpenMP split of every product) | {t12['tps']} | {runs_cell(t12)} | {ratio(t12, t11)} | 1.00× |
| `--ranks 2` × 1 thread (thread backend) | **{t21['tps']}** | {runs_cell(t21)} | **{ratio(t21, t11)}** | **{ratio(t21, t12)}** |

**3. One job with `resources.ranks = 2` through the server** (loranull-server + loranull-worker, plain
LoRA, {j['steps']} steps per job, {jt['steps_timed']} timed steps per configuration):

| where the 2 ranks run | tok/s (best run) | each run, tok/s | ratio | rank 1's comm bytes sent over the job |
|---|---|---|---|---|
| one worker `--ranks 2` (threads) | {jt['tps']} | {runs_cell(jt)} | 1.00× | — |
| two workers, one rank each (TCP over loopback) | **{jp['tps']}** | {runs_cell(jp)} | **{ratio(jp, jt)}** | {sent} |

**What limits the ratios.** A 2-rank step makes {est['n_activation']} all-reduces of {act_mib:.0f} MiB
(tokens × hidden: the outputs of o and down, the input gradients of q,k,v and gate,up, per layer) and
{est['n_grad']} small ones (the replicated LoRA factors' gradients, {est['grad_bytes'] / 1024:.0f} KiB in all):
{est['bytes_per_step'] / (1 << 20):.1f} MiB per rank per step (rank 1's TCP worker sent {sent} over its comm
socket during a job — `ss -tinp` bytes_sent, sampled every 0.2 s — where this count predicts {predicted:.1f} MiB:
{j['steps']} steps plus the worker's task-loss evaluations before and after training, {ev / (1 << 20):.0f} MiB). At the medians of part 1 these take ≈ {est['thread_comm_s'] * 1e3:.1f} ms
(threads) and ≈ {est['tcp_comm_s'] * 1e3:.1f} ms (TCP) per step, i.e. **{est['thread_share'] * 100:.1f}%** and
**{est['tcp_share'] * 100:.1f}%** of the 2-rank step of the best run ({t21['median_step_s'] * 1e3:.0f} ms CLI,
{jp['median_step_s'] * 1e3:.0f} ms TCP job). Besides communication, every rank repeats the replicated work —
lm_head and its gradient, the LoRA factors A of q,k,v,gate,up and B of o,down — {est['replicated_share'] * 100:.1f}%
of the step's {est['gflop']:.1f} GFLOP, which caps 2 ranks at {est['ideal_ratio']:.2f}× one rank even with free
communication (embeddings, norms, the loss's softmax and the optimizer of the replicated factors are repeated too,
uncounted here); one rank with 2 OpenMP threads splits every product instead and repeats nothing.
From the best 1-rank × 1-thread step ({t11['median_step_s'] * 1e3:.0f} ms), the replicated work and the threads'
collectives predict a 2-rank step of {predicted_ms:.0f} ms ({t11['tps'] * t11['median_step_s'] / (predicted_ms / 1e3):.0f} tok/s, {t11['median_step_s'] * 1e3 / predicted_ms:.2f}×);
the best run took {t21['median_step_s'] * 1e3:.0f} ms: the other {t21['median_step_s'] * 1e3 - predicted_ms:.0f} ms are the uncounted repeated work and
each rank waiting at the {est['n_activation'] + est['n_grad']}+ collectives of a step for the other (whose core other jobs may hold).
{tcp_vs_threads}
{END}"""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    head, found, rest = old.partition(BEGIN)
    # this section in place of its previous text, or appended after the others
    path.write_text(head + body + rest.split(END, 1)[1] if found and END in rest
                    else old.rstrip("\n") + "\n\n" + body + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="steps per `loranull train` run")
    ap.add_argument("--job-examples", type=int, default=32, help="examples of the server job (one epoch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", default=str(ROOT / "tests" / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform_cpu(), "steps": args.steps,
           "rounds": args.rounds, "uptime_before": uptime(), "load": {}}
    print(f"bench_ranks: {res['uptime_before']}")

    loads = []
    comm = comm_sweep()
    loads.append(load_now())
    res["load"]["comm"] = loads[-1]
    res["comm"] = comm
    for (be, op, b), x in sorted(comm.items()):
        print(f"bench_ranks: comm {be} {op} {b} B: median {x['median_s'] * 1e6:.1f} us, {x['algbw_GBps']:.2f} GB/s")

    with tempfile.TemporaryDirectory(prefix="bench_ranks.") as td:
        td = pathlib.Path(td)
        (td / "cfg.json").write_text(json.dumps(CFG))
        run_cli("model", "new", "--config", td / "cfg.json", "--out", td / "models" / MODEL, "--seed", 1)
        g = random.Random(0)
        n_rows = max(BATCH * args.steps, args.job_examples)
        lines = [json.dumps({"input_ids": [g.randrange(TOKEN_IDS) for _ in range(SEQ)]}) + "\n"
                 for _ in range(n_rows)]
        (td / "data.jsonl").write_text("".join(lines))

        # 2. the CLI: the three configurations alternate
        confs = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}
        secs, losses, tl = {k: [] for k in confs}, {}, []
        for rnd in range(args.rounds):
            for k, (ranks, threads) in confs.items():
                s, loss = train_cli(td, ranks, threads, args.steps, rnd)
                secs[k].append(s)
                losses[k] = round(loss, 4)
                tl.append(load_now())
                print(f"bench_ranks: train {k} round {rnd}: {[round(SEQ * BATCH / x) for x in s]} tok/s, "
                      f"loss {loss:.4f}")
        res["train"] = {k: summary(v) for k, v in secs.items()}
        res["losses"] = ", ".join(f"{v}" for v in losses.values())
        res["load"]["train"] = statistics.mean(tl)

        # 3. the server job: split (TCP) and one worker (threads), alternating
        srv = Server.start(td / "srv", ("--lease-ttl-s", "10"))
        try:
            key, token = srv.create_key("bench"), srv.create_token("bench-workers")
            train_id = srv.upload(key, "".join(lines[:args.job_examples]).encode(), "bench.jsonl")["id"]
            jsecs, sent, jl = {"threads": [], "tcp": []}, [], []
            for rnd in range(args.rounds):
                for split in (True, False):
                    s, b, loss = run_job(srv, key, token, td, train_id, split, rnd)
                    jsecs["tcp" if split else "threads"].append(s)
                    if b is not None:
                        sent.append(b)
                    jl.append(load_now())
                    print(f"bench_ranks: job {'tcp' if split else 'threads'} round {rnd}: "
                          f"{[round(SEQ * BATCH / x) for x in s]} tok/s, loss {loss:.4f}"
                          + (f", rank 1 wrote {b / (1 << 20):.1f} MiB" if b is not None else ""))
        finally:
            srv.stop()
        res["jobs"] = {k: summary(v) for k, v in jsecs.items()}
        res["jobs"]["steps"] = args.job_examples // BATCH
        res["jobs"]["rank1_sent_mib"] = statistics.median(sent) / (1 << 20) if sent else None
        res["jobs"]["examples"] = args.job_examples
        res["load"]["jobs"] = statistics.mean(jl)

    coll, sharded, replicated = step_collectives()
    thread_s = sum(n * allreduce_s(comm, "thread", b) for b, n in coll)
    tcp_s = sum(n * allreduce_s(comm, "tcp", b) for b, n in coll)
    total = sharded + replicated
    res["estimate"] = {
        "activation_bytes": coll[0][0], "n_activation": coll[0][1], "n_grad": sum(n for _, n in coll[1:]),
        "grad_bytes": sum(b * n for b, n in coll[1:]), "bytes_per_step": sum(b * n for b, n in coll),
        "thread_comm_s": thread_s, "tcp_comm_s": tcp_s,
        "thread_share": thread_s / res["train"]["2x1"]["median_step_s"],
        "tcp_share": tcp_s / res["jobs"]["tcp"]["median_step_s"],
        "replicated_share": replicated / total, "gflop": total / 1e9,
        "ideal_ratio": total / (sharded / 2 + replicated),
    }
    res["uptime_after"] = uptime()
    print(f"bench_ranks: {res['uptime_after']}")
    print(json.dumps({k: v for k, v in res.items() if k != "comm"}, indent=2))
    if args.results:
        write_results(pathlib.Path(args.results), res)


if __name__ == "__main__":
    main()
