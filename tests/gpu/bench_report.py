"""Issue 7's numbers from the benchmark steps of tests/gpu/run.sh, in one place:

  training   LLaMA-3-8B shapes, seq 2048, LoRA-Null-v2 r=128 on all seven targets: tokens/s and MFU
             against the measured bf16 GEMM peak (bench_train.json, bench_peak.json); the same step
             in transformers + PEFT on the same GPU (bench_peft.json) and the ratio loranull / PEFT
  calibration  whole model, 256 × 1024 tokens (bench_calib.json; says when it was extrapolated)
  init       one layer's LoRA-Null init ×32: loranull (syevdx + r-sized factors, bench_init.json)
             vs the torch recipe (full SVDs, bench_init_torch.json), and the ratio

A number whose step did not produce its JSON is reported as missing with the step's verdict from
summary.txt — never guessed. Writes OUT/bench_summary.txt and OUT/bench_summary.json.

usage: bench_report.py OUT_DIR"""
import json
import pathlib
import sys


def main():
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tests/gpu/out")
    verdicts = {}
    summary = out / "summary.txt"
    if summary.exists():
        for line in summary.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                verdicts[parts[1]] = parts[0]

    def load(step):
        p = out / f"{step}.json"
        try:
            j = json.loads(p.read_text())
        except (OSError, ValueError):  # not written, or cut off mid-write
            return None
        return j if isinstance(j, dict) else None

    def missing(step):
        return f"not measured ({step}: {verdicts.get(step, 'not run')})"

    peak, train, peft = load("bench_peak"), load("bench_train"), load("bench_peft")
    calib, init, tinit = load("bench_calib"), load("bench_init"), load("bench_init_torch")
    lines, rep = [], {}
    dev = next((j["device"] for j in (train, peak, calib, init) if j and "device" in j), "unknown device")
    lines.append(f"GPU benchmark on {dev}")

    def add(label, step, data, fields, text):
        """One line per number: from its step's JSON (fields copied into the report), or missing
        (also when the JSON lacks a field: the report is still written)."""
        if not data:
            lines.append(f"{label}: " + missing(step))
            return
        try:
            line = text(data)
            rep.update({k: data[src] for k, src in fields.items()})
            lines.append(line)
        except (KeyError, TypeError, ValueError) as e:
            lines.append(f"{label}: {step}.json is malformed ({type(e).__name__}: {e})")

    add("bf16 GEMM peak", "bench_peak", peak, {"peak_tflops": "peak_tflops"},
        lambda j: f"bf16 GEMM peak (measured, cuBLAS): {j['peak_tflops']:.1f} TFLOP/s")
    add("loranull training step", "bench_train", train,
        {"tokens_per_s": "tokens_per_s", "mfu": "mfu", "step_s": "step_s"},
        lambda j: f"loranull LoRA-Null-v2 r={j['rank']} seq {j['seq']}: {j['tokens_per_s']:.0f} tokens/s, "
                  f"{j['step_s']:.3f} s/step, MFU {100 * j['mfu']:.1f}% of {j['peak_tflops']:.1f} TFLOP/s")
    add("transformers + PEFT step", "bench_peft", peft, {"peft_tokens_per_s": "tokens_per_s"},
        lambda j: f"transformers {j.get('transformers', '?')} + peft {j.get('peft', '?')}, same step: "
                  f"{j['tokens_per_s']:.0f} tokens/s")
    if "tokens_per_s" in rep and "peft_tokens_per_s" in rep and not peft.get("tiny"):
        rep["ratio_vs_peft"] = rep["tokens_per_s"] / rep["peft_tokens_per_s"]
        lines.append(f"ratio loranull / PEFT (tokens/s): {rep['ratio_vs_peft']:.2f}x")
    add("whole-model calibration", "bench_calib", calib, {"calib_256x1024_s": "calib_256x1024_s"},
        lambda j: f"whole-model calibration 256 x 1024 tokens (device covariances): {j['calib_256x1024_s']:.1f} s "
                  f"({'extrapolated from %d samples' % j['samples'] if j.get('extrapolated') else 'measured'}; "
                  f"{j['tokens_per_s']:.0f} tokens/s)")
    add("loranull init", "bench_init", init, {"init_model_s_est": "model_init_s_est"},
        lambda j: f"loranull init, one layer x32: {j['model_init_s_est']:.1f} s (syevdx r={j['rank']} + factors)")
    if tinit and tinit.get("complete") and "model_init_s_est" in tinit:
        rep["torch_init_model_s_est"] = tinit["model_init_s_est"]
        lines.append(f"torch recipe init, one layer x32: {tinit['model_init_s_est']:.1f} s (full SVDs, fp32)")
        if "init_model_s_est" in rep:
            rep["init_speedup_vs_torch"] = tinit["model_init_s_est"] / rep["init_model_s_est"]
            lines.append(f"init speed-up over the torch recipe: {rep['init_speedup_vs_torch']:.1f}x")
    elif tinit:
        done = ", ".join(f"{k} {v:.2f} s" for k, v in {**tinit.get("svd_s", {}), **tinit.get("factor_s", {})}.items())
        lines.append(f"torch recipe init: incomplete ({verdicts.get('bench_init_torch', '?')}); parts done: {done}")
    else:
        lines.append("torch recipe init: " + missing("bench_init_torch"))
    text = "\n".join(lines) + "\n"
    (out / "bench_summary.txt").write_text(text)
    (out / "bench_summary.json").write_text(json.dumps({"device": dev, **rep}, indent=1) + "\n")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
