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
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def missing(step):
        return f"not measured ({step}: {verdicts.get(step, 'not run')})"

    peak, train, peft = load("bench_peak"), load("bench_train"), load("bench_peft")
    calib, init, tinit = load("bench_calib"), load("bench_init"), load("bench_init_torch")
    lines, rep = [], {}
    dev = next((j["device"] for j in (train, peak, calib, init) if j and "device" in j), "unknown device")
    lines.append(f"GPU benchmark on {dev}")
    if peak:
        rep["peak_tflops"] = peak["peak_tflops"]
        lines.append(f"bf16 GEMM peak (measured, cuBLAS): {peak['peak_tflops']:.1f} TFLOP/s")
    else:
        lines.append("bf16 GEMM peak: " + missing("bench_peak"))
    if train:
        rep.update(tokens_per_s=train["tokens_per_s"], mfu=train["mfu"], step_s=train["step_s"])
        lines.append(f"loranull LoRA-Null-v2 r={train['rank']} seq {train['seq']}: {train['tokens_per_s']:.0f} tokens/s, "
                     f"{train['step_s']:.3f} s/step, MFU {100 * train['mfu']:.1f}% of {train['peak_tflops']:.1f} TFLOP/s")
    else:
        lines.append("loranull training step: " + missing("bench_train"))
    if peft:
        rep["peft_tokens_per_s"] = peft["tokens_per_s"]
        lines.append(f"transformers {peft.get('transformers', '?')} + peft {peft.get('peft', '?')}, same step: "
                     f"{peft['tokens_per_s']:.0f} tokens/s")
    else:
        lines.append("transformers + PEFT step: " + missing("bench_peft"))
    if train and peft:
        rep["ratio_vs_peft"] = train["tokens_per_s"] / peft["tokens_per_s"]
        lines.append(f"ratio loranull / PEFT (tokens/s): {rep['ratio_vs_peft']:.2f}x")
    if calib:
        rep["calib_256x1024_s"] = calib["calib_256x1024_s"]
        how = (f"extrapolated from {calib['samples']} samples" if calib.get("extrapolated")
               else "measured")
        lines.append(f"whole-model calibration 256 x 1024 tokens (device covariances): {calib['calib_256x1024_s']:.1f} s "
                     f"({how}; {calib['tokens_per_s']:.0f} tokens/s)")
    else:
        lines.append("whole-model calibration: " + missing("bench_calib"))
    if init:
        rep["init_model_s_est"] = init["model_init_s_est"]
        lines.append(f"loranull init, one layer x32: {init['model_init_s_est']:.1f} s (syevdx r={init['rank']} + factors)")
    else:
        lines.append("loranull init: " + missing("bench_init"))
    if tinit and tinit.get("complete"):
        rep["torch_init_model_s_est"] = tinit["model_init_s_est"]
        lines.append(f"torch recipe init, one layer x32: {tinit['model_init_s_est']:.1f} s (full SVDs, fp32)")
        if init:
            rep["init_speedup_vs_torch"] = tinit["model_init_s_est"] / init["model_init_s_est"]
            lines.append(f"init speed-up over the torch recipe: {rep['init_speedup_vs_torch']:.1f}x")
    elif tinit:
        done = ", ".join(f"{k} {v:.2f} s" for k, v in {**tinit["svd_s"], **tinit["factor_s"]}.items())
        lines.append(f"torch recipe init: incomplete ({verdicts.get('bench_init_torch', '?')}); parts done: {done}")
    else:
        lines.append("torch recipe init: " + missing("bench_init_torch"))
    text = "\n".join(lines) + "\n"
    (out / "bench_summary.txt").write_text(text)
    (out / "bench_summary.json").write_text(json.dumps({"device": dev, **rep}, indent=1) + "\n")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
