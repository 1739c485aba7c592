"""Runs the GPU tests (build/cuda/tests/test_*) under pytest. Where no GPU is present they exit 77
and are reported as SKIPPED with their message — never as passed. Where the CUDA build was not
made (no nvcc), they are skipped saying so."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = ROOT / "build" / "cuda" / "tests"
TESTS = ["test_kernels", "test_attention", "test_solver", "test_calibrate", "test_model", "test_nccl", "test_tp_nccl",
         "test_memplan_gpu", "test_hooks"]


@pytest.mark.parametrize("name", TESTS)
def test_gpu(name):
    exe = BIN / name
    if not exe.exists():
        if shutil.which("nvcc") is None:
            pytest.skip(f"{name}: no CUDA toolkit (nvcc) here, so the CUDA build was not made")
        subprocess.run(["make", "-C", str(ROOT), "cuda"], check=True, capture_output=True, timeout=900)
    p = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    out = p.stdout + p.stderr
    if p.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1] if out.strip() else f"{name}: skipped")
    assert p.returncode == 0, out[-4000:]
    assert f"PASS {name}" in out


def _need_cuda_build(what):
    """The CUDA build (make all builds it where nvcc exists); skip saying so where there is none."""
    if shutil.which("nvcc") is None:
        pytest.skip(f"{what}: no CUDA toolkit (nvcc) here")
    subprocess.run(["make", "-C", str(ROOT), "cuda", "cuda-bin"], check=True, capture_output=True, timeout=1800)


@pytest.mark.parametrize("prog", ["loranull", "loranull-worker"])
def test_cuda_programs_define_every_device_hook(prog):
    """select.h reaches the CUDA backend through weak references; an archive member the link does
    not pull leaves them NULL and the program silently takes the host path (this was the case for
    the syevdx basis solver). Every one must be defined in the CUDA programs."""
    _need_cuda_build(prog)
    syms = subprocess.run(["nm", str(ROOT / "build" / "cuda" / "bin" / prog)], capture_output=True, text=True,
                          check=True).stdout
    defined = {line.split()[-1] for line in syms.splitlines() if len(line.split()) == 3 and line.split()[1] == "T"}
    hooks = ["lnb_cuda_open", "lnb_cuda", "lnb_cuda_plan_check", "lnb_cuda_nullspace_basis", "lnb_cuda_cov_init",
             "lnb_cuda_cov_add_sample", "lnb_cuda_cov_finish", "lnb_cuda_cov_free"]
    if prog == "loranull-worker":
        hooks += ["comm_nccl_unique_id", "comm_nccl_join"]  # wd_gang.c: a GPU gang split over workers
    assert not [h for h in hooks if h not in defined], f"{prog} leaves these undefined: " \
        f"{[h for h in hooks if h not in defined]}"


def test_run_sh_is_valid_shell():
    script = ROOT / "tests" / "gpu" / "run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    r = subprocess.run(["shellcheck", str(script), str(ROOT / "tests" / "gpu" / "cli_train.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_run_sh_dry_run(tmp_path):
    """The one script a GPU session runs, without a GPU: it builds for real, reports every GPU step
    as SKIP with what it would run, writes summary.txt and the benchmark report, and exits 0."""
    _need_cuda_build("run.sh --dry-run")
    r = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "run.sh"), "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1800, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    verdicts = {ln.split()[1]: ln for ln in lines}
    assert verdicts["build"].startswith("PASS") and verdicts["cuda_bin"].startswith("PASS")
    gpu_steps = ["test_attention", "test_kernels", "test_solver", "test_calibrate", "test_model", "test_nccl",
                 "test_nccl_procs", "test_tp_nccl", "test_memplan_gpu", "test_hooks", "gang_gpu",
                 "bench_peak", "bench_train", "bench_peft", "cli_train", "bench_calib", "bench_init",
                 "bench_init_torch"]
    for s in gpu_steps:
        assert s in verdicts, f"{s} missing from summary.txt"
        assert verdicts[s].startswith("SKIP") and "dry run: would run" in verdicts[s], verdicts[s]
    report = (tmp_path / "bench_summary.txt").read_text()
    assert "not measured (bench_train: SKIP)" in report and "not measured (bench_peft: SKIP)" in report


# ---- the Python side of run.sh, checked without a GPU ----

GPU_DIR = ROOT / "tests" / "gpu"
# bench_gpu.c's JSON, as its fprintf formats write it (peak, train, calib, init), and run.sh's
# summary.txt lines (record: '%-8s %-17s %4ds  %s')
BENCH_JSON = {
    "bench_peak": '{"device":"NVIDIA H200","bf16_gemm":{"4096":612.30,"8192":781.55},"peak_tflops":781.55}\n',
    "bench_train": '{"device":"NVIDIA H200","seq":2048,"batch":1,"rank":128,"steps":3,"step_s":0.5120,'
                   '"tokens_per_s":4000.0,"model_tflop_per_step":100.000,"gemm_tflop_per_step":90.000,'
                   '"achieved_tflops":195.31,"peak_tflops":781.55,"mfu":0.2499,"loss":11.93000,"plan_gib":40.10,'
                   '"bf16_weights":1,"recompute":0}\n',
    "bench_calib": '{"device":"NVIDIA H200","samples":64,"max_length":1024,"calib_s":10.000,"tokens_per_s":6553.6,'
                   '"calib_256x1024_s":40.000,"extrapolated":true,"wall_s":12.500}\n',
    "bench_init": '{"device":"NVIDIA H200","rank":128,"eig_s":[0.1000,0.1000,0.1000,0.3000],"factor_s":0.2000,'
                  '"layer_init_s":0.8000,"model_init_s_est":25.600,"cov_sample_layer_s":0.0100}\n',
}


def _summary_line(verdict, name, secs, detail):
    return "%-8s %-17s %4ds  %s\n" % (verdict, name, secs, detail)


def _report(out):
    r = subprocess.run([sys.executable, str(GPU_DIR / "bench_report.py"), str(out)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return (out / "bench_summary.txt").read_text(), json.loads((out / "bench_summary.json").read_text())


def test_bench_report_reads_every_benchmark_json(tmp_path):
    """bench_report.py on an OUT folder as a full run.sh leaves it: bench_gpu's four JSON files
    (its formats), bench_peft.py's and bench_init_torch.py's — every figure and both ratios."""
    for step, text in BENCH_JSON.items():
        (tmp_path / f"{step}.json").write_text(text)
    (tmp_path / "bench_peft.json").write_text(json.dumps(
        {"step_s": 1.024, "tokens_per_s": 2000.0, "seq": 2048, "rank": 128, "tiny": False, "torch": "2.11.0",
         "transformers": "5.17.0", "peft": "0.17.1", "device": "NVIDIA H200"}))
    (tmp_path / "bench_init_torch.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "rank": 128, "svd_s": {"qkv": 1.0}, "factor_s": {"q_proj": 0.5}, "complete": True,
         "layer_init_s": 8.0, "model_init_s_est": 256.0}))
    (tmp_path / "summary.txt").write_text("".join(_summary_line("PASS", s, 10, "rc=0") for s in
                                                  ["bench_peak", "bench_train", "bench_peft", "bench_calib",
                                                   "bench_init", "bench_init_torch"]))
    text, rep = _report(tmp_path)
    assert "GPU benchmark on NVIDIA H200" in text
    assert "bf16 GEMM peak (measured, cuBLAS): 781.5 TFLOP/s" in text
    assert "loranull LoRA-Null-v2 r=128 seq 2048: 4000 tokens/s, 0.512 s/step, MFU 25.0% of 781.5 TFLOP/s" in text
    assert "transformers 5.17.0 + peft 0.17.1, same step: 2000 tokens/s" in text
    assert "ratio loranull / PEFT (tokens/s): 2.00x" in text
    assert "40.0 s (extrapolated from 64 samples; 6554 tokens/s)" in text
    assert "loranull init, one layer x32: 25.6 s (syevdx r=128 + factors)" in text
    assert "init speed-up over the torch recipe: 10.0x" in text
    assert "not measured" not in text and "malformed" not in text
    assert rep == {"device": "NVIDIA H200", "peak_tflops": 781.55, "tokens_per_s": 4000.0, "mfu": 0.2499,
                   "step_s": 0.512, "peft_tokens_per_s": 2000.0, "ratio_vs_peft": 2.0, "calib_256x1024_s": 40.0,
                   "init_model_s_est": 25.6, "torch_init_model_s_est": 256.0, "init_speedup_vs_torch": 10.0}


def test_bench_report_says_what_is_missing(tmp_path):
    """A run cut short: no JSON for a step (its verdict from summary.txt is named), a JSON cut off
    mid-write, one lacking a field, the torch init incomplete — the report is still written, and
    guesses nothing."""
    (tmp_path / "bench_peak.json").write_text(BENCH_JSON["bench_peak"])
    (tmp_path / "bench_train.json").write_text(BENCH_JSON["bench_train"][:60])  # killed while writing
    (tmp_path / "bench_calib.json").write_text('{"device":"NVIDIA H200","samples":64}')
    (tmp_path / "bench_init_torch.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "rank": 128, "svd_s": {"qkv": 1.25}, "factor_s": {"q_proj": 0.5},
         "complete": False}))
    (tmp_path / "summary.txt").write_text(_summary_line("PASS", "bench_peak", 20, "rc=0") +
                                          _summary_line("TIMEOUT", "bench_train", 120, "rc=124 (limit 120s)") +
                                          _summary_line("SKIP", "bench_peft", 1, "rc=77 — SKIP: bench_peft: no peft") +
                                          _summary_line("TIMEOUT", "bench_init_torch", 90, "rc=124 (limit 90s)"))
    text, rep = _report(tmp_path)
    assert "bf16 GEMM peak (measured, cuBLAS): 781.5 TFLOP/s" in text
    assert "loranull training step: not measured (bench_train: TIMEOUT)" in text
    assert "transformers + PEFT step: not measured (bench_peft: SKIP)" in text
    assert "ratio loranull" not in text
    assert "whole-model calibration: bench_calib.json is malformed (KeyError: 'calib_256x1024_s')" in text
    assert "loranull init: not measured (bench_init: not run)" in text
    assert "torch recipe init: incomplete (TIMEOUT); parts done: qkv 1.25 s, q_proj 0.50 s" in text
    assert rep == {"device": "NVIDIA H200", "peak_tflops": 781.55}


def _bench_py(script, tmp_path, *args):
    """Runs a torch benchmark on the CPU, at its toy shape (the GPU path's code, checked here)."""
    missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script}: {', '.join(missing)} not installed in {sys.executable}")
    out = tmp_path / f"{script}.json"
    r = subprocess.run([sys.executable, str(GPU_DIR / script), str(out), *args, "--device", "cpu", "--tiny"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_bench_peft_runs_on_cpu_at_a_toy_shape(tmp_path):
    """bench_peft.py's transformers/PEFT calls (LlamaConfig with LLaMA-3 RoPE, _from_config in bf16
    with SDPA, LoRA on all seven targets, lora_A frozen, AdamW) on the CPU: it trains B only and
    writes the JSON bench_report.py reads."""
    res, stdout = _bench_py("bench_peft.py", tmp_path, "2")
    # B (d_out x 8) on 7 targets x 2 layers: d_out of q 64, k 32, v 32, o 64, gate 128, up 128, down 64
    assert res["tiny"] and res["device"] == "cpu" and res["seq"] == 64 and res["rank"] == 8
    assert res["trained_params"] == 2 * 8 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert res["tokens_per_s"] > 0 and res["step_s"] > 0
    assert stdout.count("step ") == 3 and "(warm-up)" in stdout


def test_bench_init_torch_runs_on_cpu_at_a_toy_shape(tmp_path):
    """bench_init_torch.py's recipe on the CPU: 4 covariance SVDs, 7 factorisations, each B A equal
    to W0's projection on the null space, the JSON complete."""
    res, _ = _bench_py("bench_init_torch.py", tmp_path)
    assert res["complete"] and res["rank"] == 8 and res["device"] == "cpu"
    assert sorted(res["svd_s"]) == ["down", "gate_up", "o", "qkv"]
    assert sorted(res["factor_s"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
    assert max(res["residual_rel"].values()) < 1e-4
    assert res["model_init_s_est"] == pytest.approx(32 * res["layer_init_s"])
