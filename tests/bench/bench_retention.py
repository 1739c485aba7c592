"""Benchmark: a small-scale replay of the paper's Table 1 — how many pre-trained facts each method
keeps after tuning on a new task (DESIGN.md §5, last row).

1. A tiny random LLaMA learns a set of facts by full training (`loranull train --method full`):
   "subject relation is → value", loss on the value token only.
2. From that checkpoint, each method (lora, pissa, full, lora_null_v1, lora_null_v2, ...) is tuned
   on a new task of the same shape (other subjects, another relation, other values) with the same
   rank, lr, steps and data order; the calibration data of the null-space methods (and corda) is the
   fact file itself, as the paper calibrates on its knowledge data.
3. Task accuracy and facts still recalled (greedy next token at the value position, over every
   fact) are read from `loranull forward`; the mean knowledge drift from the run's metrics.

Prints a table and replaces its own section of tests/bench/RESULTS.md (between its markers).
Usage: .venv/bin/python tests/bench/bench_retention.py [--steps 500] [--lr 1e-2] [--rank 16]
       [--methods lora,pissa,milora,corda,full,lora_null_v1,lora_null_v2] [--results tests/bench/RESULTS.md]
"""
import argparse
import json
import os
import pathlib
import subprocess
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
BIN = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin"))
BEGIN, END = "<!-- bench_retention: begin -->", "<!-- bench_retention: end -->"
IS = 12  # the "is" token every prompt ends with


def ln(*args):
    r = subprocess.run([str(BIN / "loranull"), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"loranull {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def make_facts(rng, subjects, relations, values):
    """[subject, relation, IS] → value, a random value per (subject, relation)."""
    return [([s, r, IS], int(rng.choice(values))) for s in subjects for r in relations]


def write_jsonl(path, facts, copies=1):
    with open(path, "w") as f:
        for _ in range(copies):
            for prompt, v in facts:
                f.write(json.dumps({"input_ids": prompt + [v], "labels": [-100] * len(prompt) + [v]}) + "\n")


def accuracy(model_dir, adapter, facts, work):
    ids = [p + [v] for p, v in facts]
    (work / "ids.json").write_text(json.dumps(ids))
    args = ["forward", "--model", model_dir, "--input-ids", work / "ids.json", "--out", work / "logits.safetensors"]
    if adapter:
        args += ["--adapter", adapter]
    ln(*args)
    logits = load_file(str(work / "logits.safetensors"))["logits"]
    pos = len(facts[0][0]) - 1  # the last prompt token predicts the value
    pred = logits[:, pos, :].argmax(-1)
    return float(np.mean(pred == np.array([v for _, v in facts])))


def measure(methods, steps=500, lr=1e-2, rank=16, pretrain_steps=300, subjects=16):
    """Runs the experiment; returns (facts recalled before, task before, [(method, task acc, facts kept,
    mean drift)])."""
    rng = np.random.default_rng(0)
    n = subjects
    # Knowledge on few distinct tokens, so its activations span a subspace (as an LLM's are strongly
    # anisotropic) and a null space exists; the task on tokens of its own.
    facts = make_facts(rng, range(20, 20 + n), [10, 11], range(100, 100 + n))
    task = make_facts(rng, range(200, 200 + n), [13, 14], range(150, 150 + n))
    rows = []
    with tempfile.TemporaryDirectory() as td:
        td = pathlib.Path(td)
        cfg = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
        (td / "cfg.json").write_text(json.dumps(cfg))
        ln("model", "new", "--config", td / "cfg.json", "--out", td / "random", "--no-tokenizer", "--seed", 1)
        write_jsonl(td / "facts.jsonl", facts)
        write_jsonl(td / "task.jsonl", task)
        ln("train", "--model", td / "random", "--data", td / "facts.jsonl", "--out", td / "pre", "--method", "full",
           "--lr", "3e-3", "--max-steps", pretrain_steps, "--batch-size", 16, "--seed", 1)
        base = td / "pre"
        facts0, task0 = accuracy(base, None, facts, td), accuracy(base, None, task, td)
        for method in methods:
            out = td / f"run_{method}"
            ln("train", "--model", base, "--data", td / "task.jsonl", "--out", out, "--method", method,
               "--rank", rank, "--lr", lr, "--max-steps", steps, "--batch-size", 16, "--seed", 2,
               "--calibration", td / "facts.jsonl", "--calibration-max-length", 64, "--calibration-samples", 64,
               "--no-calibration-cache")
            model, adapter = (out, None) if method == "full" else (base, out)
            drift = json.loads((out / "knowledge_drift.json").read_text())
            rows.append((method, accuracy(model, adapter, task, td), accuracy(model, adapter, facts, td),
                         drift["knowledge_drift_mean"]))
    return facts, task, facts0, task0, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", default="lora,pissa,milora,corda,full,lora_null_v1,lora_null_v2")
    ap.add_argument("--subjects", type=int, default=16, help="subjects per fact set (2 relations each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(ROOT / "tests" / "bench" / "RESULTS.md"))
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    t_start = time.perf_counter()
    facts, task, facts0, task0, rows = measure(a.methods.split(","), a.steps, a.lr, a.rank, a.pretrain_steps,
                                               a.subjects)
    elapsed = time.perf_counter() - t_start
    lines = [
        BEGIN,
        "## Knowledge retention, a small-scale replay of the paper's Table 1 (`tests/bench/bench_retention.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {a.threads} threads, {elapsed:.0f} s in all "
        f"(load average {os.getloadavg()[0]:.1f}). A random LLaMA (2 layers, hidden 64) first learns {len(facts)} facts "
        f"\"subject relation is → value\" by full training ({a.pretrain_steps} steps): it then recalls "
        f"{100 * facts0:.0f}% of them (task before tuning: {100 * task0:.0f}%). Each method then tunes on {len(task)} new "
        f"facts (other subjects, relations and values) for {a.steps} steps, rank {a.rank}, lr {a.lr}, batch 16, the "
        "same data order; calibration (corda, lora_null_*) on the fact file. Accuracy is the greedy next token at "
        "the value position; drift is the mean over layers of tr(ΔW C ΔWᵀ)/tr(W0 C W0ᵀ) on the facts' activations.",
        "",
        "| method | new task accuracy | facts kept | mean knowledge drift |",
        "|---|---|---|---|",
    ]
    for method, ta, fa, dr in rows:
        lines.append(f"| {method} | {100 * ta:.0f}% | {100 * fa:.0f}% | {dr:.2e} |")
    lines.append(END)
    text = "\n".join(lines)
    print(text)
    if a.results:
        p = pathlib.Path(a.results)
        old = p.read_text() if p.exists() else "# Benchmark results\n"
        if BEGIN in old and END in old:
            new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
        else:
            new = old.rstrip("\n") + "\n\n" + text + "\n"
        p.write_text(new)


if __name__ == "__main__":
    main()
