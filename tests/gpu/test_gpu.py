"""Runs the GPU tests (build/cuda/tests/test_*) under pytest. Where no GPU is present they exit 77
and are reported as SKIPPED with their message — never as passed. Where the CUDA build was not
made (no nvcc), they are skipped saying so."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = ROOT / "build" / "cuda" / "tests"
TESTS = ["test_kernels", "test_attention", "test_solver", "test_calibrate", "test_model", "test_nccl", "test_tp_nccl",
         "test_memplan_gpu"]


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
                 "test_nccl_procs", "test_tp_nccl", "test_memplan_gpu", "gang_gpu",
                 "bench_peak", "bench_train", "bench_peft", "cli_train", "bench_calib", "bench_init",
                 "bench_init_torch"]
    for s in gpu_steps:
        assert s in verdicts, f"{s} missing from summary.txt"
        assert verdicts[s].startswith("SKIP") and "dry run: would run" in verdicts[s], verdicts[s]
    report = (tmp_path / "bench_summary.txt").read_text()
    assert "not measured (bench_train: SKIP)" in report and "not measured (bench_peft: SKIP)" in report
