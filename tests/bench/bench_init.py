"""Benchmark: LoRA-Null initialisation of a whole model, loranull vs the reference recipe in torch.

What is measured, on the same random LLaMA-shaped checkpoint, the same calibration samples and the
same thread count (OMP/OpenBLAS threads for loranull, torch.set_num_threads for torch):

  init, calibration excluded   loranull: `loranull init --covariance` (its own init_s: subset
                               eigensolver dsyevr on the 4 distinct covariances of a layer, r×r-sized SVDs)
                               torch, paper recipe as written: per target module, torch.linalg.svd(C),
                               U_null = last r columns, SVD of W0 U_null U_nullᵀ (d_out × d_in), B, A, residual
                               torch, shared: the same but one SVD of C per distinct input (4 per layer)
  init, calibration included   the above plus the calibration forward passes (loranull: `loranull init
                               --calibration`, no cache; torch: forward hooks accumulating XᵀX per target module
                               as PEFT's CorDA preprocessing does, or per distinct input for "shared")
  calibration throughput       `loranull covariance --bench`: tokens/s of calibration vs plain forward
                               (same windows, no logits in either)

Prints a table and replaces its own section of tests/bench/RESULTS.md (between its markers;
--results '' to leave the file alone).
Usage: .venv/bin/python tests/bench/bench_init.py [--threads 2] [--hidden 512] [--inter 1408]
       [--layers 4] [--rank 16] [--samples 16] [--length 256] [--results tests/bench/RESULTS.md]
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
BIN = pathlib.Path(os.environ.get("LORANULL_BIN", ROOT / "bin"))
BEGIN, END = "<!-- bench_init: begin -->", "<!-- bench_init: end -->"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED = {"q_proj": "q", "k_proj": "q", "v_proj": "q", "o_proj": "o", "gate_proj": "g", "up_proj": "g", "down_proj": "d"}


def ln(env, *args):
    t = time.perf_counter()
    r = subprocess.run([str(BIN / "loranull"), *map(str, args)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"loranull {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stdout, time.perf_counter() - t


def torch_calibrate(model, samples, shared):
    """Covariances from forward hooks, fp32 like PEFT's CorDA hook (x / |max x|, xᵀx, / n)."""
    covs, hooks, seen = {}, [], set()
    for name, mod in model.named_modules():
        short = name.split(".")[-1]
        if not (isinstance(mod, torch.nn.Linear) and short in TARGETS):
            continue
        key = name.rsplit(".", 2)[0] + "." + SHARED[short] if shared else name
        if key in seen:
            continue
        seen.add(key)
        covs[key] = 0

        def hook(m, inp, out, key=key):
            x = inp[0].detach().squeeze(0).float()
            x = x / torch.max(x).abs()
            covs[key] = covs[key] + x.t() @ x
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for ids in samples:
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {k: v / len(samples) for k, v in covs.items()}


def torch_init(model, covs, r, shared):
    """The paper's recipe; with shared, one SVD of C per distinct input."""
    bases = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            short = name.split(".")[-1]
            if not (isinstance(mod, torch.nn.Linear) and short in TARGETS):
                continue
            key = name.rsplit(".", 2)[0] + "." + SHARED[short] if shared else name
            if key not in bases or not shared:
                U, S, Vh = torch.linalg.svd(covs[key])
                bases[key] = U[:, -r:]
            Un = bases[key]
            W = mod.weight.data
            P = W @ Un @ Un.T
            Up, Sp, Vhp = torch.linalg.svd(P, full_matrices=False)
            B = Up[:, :r] * Sp[:r].sqrt()
            A = Sp[:r].sqrt()[:, None] * Vhp[:r]
            mod.weight.data = W - B @ A


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2, help="best of N for every timing (the machine is shared)")
    ap.add_argument("--results", default=str(ROOT / "tests" / "bench" / "RESULTS.md"))
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads))
    torch.set_num_threads(a.threads)
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as td:
        td = pathlib.Path(td)
        cfg = {"vocab_size": 1000, "hidden_size": a.hidden, "intermediate_size": a.inter, "num_hidden_layers": a.layers,
               "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
               "max_position_embeddings": max(1024, a.length), "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "tie_word_embeddings": False}
        (td / "cfg.json").write_text(json.dumps(cfg))
        ln(env, "model", "new", "--config", td / "cfg.json", "--out", td / "m", "--no-tokenizer", "--seed", 1)
        rng = np.random.default_rng(0)
        samples = [rng.integers(0, 1000, a.length).tolist() for _ in range(a.samples)]
        with open(td / "calib.jsonl", "w") as f:
            for ids in samples:
                f.write(json.dumps({"input_ids": ids}) + "\n")
        cal = ["--calibration", td / "calib.jsonl", "--calibration-samples", a.samples,
               "--calibration-max-length", a.length, "--no-calibration-cache"]

        # loranull (best of --repeat: other jobs share the machine)
        ln(env, "covariance", "--model", td / "m", "--out", td / "cov.safetensors", *cal)
        ours_init, ours_total = float("inf"), float("inf")
        for _ in range(a.repeat):
            out, _ = ln(env, "init", "--model", td / "m", "--method", "lora_null_v2", "--rank", a.rank,
                        "--covariance", td / "cov.safetensors", "--out", td / "i1")
            ours_init = min(ours_init, json.loads(out)["init_s"])
            out, _ = ln(env, "init", "--model", td / "m", "--method", "lora_null_v2", "--rank", a.rank, "--out",
                        td / "i2", *cal)
            j = json.loads(out)
            ours_total = min(ours_total, j["calibration_s"] + j["init_s"])
        tps = {"calibration_tokens_per_s": 0.0, "forward_tokens_per_s": 0.0}
        for _ in range(a.repeat):  # the best of each, measured separately
            out, _ = ln(env, "covariance", "--model", td / "m", "--bench", *cal)
            t = json.loads(out)
            for k in tps:
                tps[k] = max(tps[k], t[k])
        tps["ratio"] = tps["calibration_tokens_per_s"] / tps["forward_tokens_per_s"]

        # torch reference (a fresh model per run: the init rewrites the weights)
        ref = {}
        for shared in (False, True):
            best = (float("inf"), float("inf"))
            for _ in range(a.repeat):
                model = LlamaForCausalLM.from_pretrained(str(td / "m"), torch_dtype=torch.float32).eval()
                t0 = time.perf_counter()
                covs = torch_calibrate(model, samples, shared)
                t1 = time.perf_counter()
                torch_init(model, covs, a.rank, shared)
                t2 = time.perf_counter()
                best = (min(best[0], t2 - t1), min(best[1], t2 - t0))
            ref[shared] = best

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    # Arithmetic bound on calibration throughput: per token and layer the forward does
    # h·(q + k + v + o outputs) + 3·h·i multiply-adds (+ attention, ~2·T·h), the covariances
    # (3·h² + i²)/2 (one symmetric rank-T update of each distinct input: q,k,v / o / gate,up / down).
    def calib_bound(h, i, kv_heads, hd, T):
        fwd = h * (2 * h + 2 * kv_heads * hd) + 3 * h * i + 2 * T * h
        cov = (3 * h * h + i * i) / 2
        return fwd / (fwd + cov)
    bound = calib_bound(a.hidden, a.inter, a.kv_heads, a.hidden // a.heads, a.length)
    bound_8b = calib_bound(4096, 14336, 8, 128, 1024)
    rows = [
        ("init, calibration excluded", ours_init, ref[False][0], ref[True][0]),
        ("init, calibration included", ours_total, ref[False][1], ref[True][1]),
    ]
    lines = [
        BEGIN,
        "## LoRA-Null init and calibration: loranull vs the torch reference recipe (`tests/bench/bench_init.py`)",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `tests/bench/bench_init.py` on {cpu}, {a.threads} threads (load average {load:.1f} when it "
        f"finished; the machine is shared, so every figure is the best of {a.repeat} runs). Model: random LLaMA, {a.layers} layers, hidden "
        f"{a.hidden}, intermediate {a.inter}, {a.heads} heads / {a.kv_heads} kv heads, fp32; rank {a.rank}; "
        f"calibration {a.samples} samples × {a.length} tokens. torch {torch.__version__}.",
        "",
        "| what | loranull (s) | torch, paper recipe (s) | ratio | torch, shared covariances (s) | ratio | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ours, paper, shared in rows:
        lines.append(f"| {name} | {ours:.3f} | {paper:.3f} | {ours / paper:.3f}× | {shared:.3f} | "
                     f"{ours / shared:.3f}× | ≤ 0.3× |")
    lines += [
        "",
        f"Calibration throughput: {tps['calibration_tokens_per_s']:.0f} tokens/s vs plain forward "
        f"{tps['forward_tokens_per_s']:.0f} tokens/s = **{100 * tps['ratio']:.0f}%** (goal ≥ 90%). "
        f"Arithmetic bound for these shapes if the covariance products ran as fast per multiply-add as the "
        f"forward's GEMMs: {100 * bound:.0f}% (the down_proj input alone costs i²/2 per token); for LLaMA-3-8B "
        f"shapes (T = 1024) the same bound is {100 * bound_8b:.0f}%, so the ≥ 90% goal cannot be met by accumulating all four covariances "
        f"exactly; loranull accumulates each sample's XᵀX in fp32 (ssyrk) and the sum over samples in fp64.",
        END,
    ]
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
