"""The whole CUDA backend (worker/backend/cuda/kernels.cu, attention.cu, solver.cu, as they are on
disk) built for the host emulation of tests/reference/cuda_emu/ (cuda_emu.h and cuda_emu.cpp say
what it keeps of CUDA: a fiber per CUDA thread, streams that run when waited for, NaN-filled device
memory at its exact size, host code kept out of device-only memory, every device pointer checked,
cuBLAS and cuSOLVER over LAPACKE) and linked, in place of libloranull_cuda.a, with the GPU test
programs tests/gpu/*.c unchanged: each must print its checks and PASS, as it would on a GPU. No GPU
is needed, so CI runs what otherwise only a GPU session runs. Also: the results do not depend on
the order blocks and warps run in, two programs pass under AddressSanitizer, the engine waits for
the stream before its host code reads tensors (LORANULL_CUDA_SYNC=0), and bugs planted in the
backend's source are caught. About 2m15s on a busy 2-core machine (test_model twice, 25-55 s each)."""
import pathlib
import re
import subprocess

import pytest

import emu_build as eb

ROOT = eb.ROOT
# test_emu_extras (cuda_emu/): the backend's benchmark helpers, which no GPU test reaches at emulable shapes
GPU_TESTS = ["test_kernels", "test_solver", "test_calibrate", "test_memplan_gpu", "test_model", "test_attention",
             "test_emu_extras"]
CU = ["kernels", "attention", "solver"]


def engine_libs(variant):
    """The engine and common libraries the GPU tests link (what `make` builds)."""
    libs = [ROOT / "build" / variant / "libengine.a", ROOT / "build" / variant / "libcommon.a"]
    r = subprocess.run(["make", "-C", str(ROOT), f"V={variant}", *map(str, (p.relative_to(ROOT) for p in libs))],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return libs


def build_backend(dest, asan=False, sources=None):
    """The runtime and the three .cu files (texts from `sources` where given) → objects."""
    dest.mkdir(parents=True, exist_ok=True)
    cmds, objs = [], []
    cmd, obj = eb.runtime_cmd(dest, asan)
    cmds.append(cmd)
    objs.append(obj)
    for name in CU:
        path = eb.CUDA_DIR / f"{name}.cu"
        cmd, obj, _ = eb.compile_cu(dest, path, (sources or {}).get(name), asan)
        cmds.append(cmd)
        objs.append(obj)
    eb.run_jobs(cmds)
    return objs


def link(dest, test, objs, libs, asan=False):
    """tests/gpu/<test>.c (or this emulation's own cuda_emu/<test>.c) linked with the backend objects."""
    exe = dest / test
    src = ROOT / "tests" / "gpu" / f"{test}.c"
    if not src.exists():
        src = eb.EMU / f"{test}.c"
    flags = ["-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if asan else ["-O2"]
    r = subprocess.run(["gcc", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-g",
                        *flags, "-fopenmp", f"-I{ROOT}", f"-I{eb.EMU / 'include'}", "-o", str(exe),
                        str(src), *map(str, objs), *map(str, libs), "-lopenblas",
                        "-llapacke", "-llapack", "-ljansson", "-lm", "-lpthread", "-lstdc++"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


def run(exe, order=0, timeout=600, env=None):
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout, cwd=exe.parent,
                       env=eb.env_for_run({"CUDA_EMU_ORDER": str(order), **(env or {})}))
    return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    dest = tmp_path_factory.mktemp("cuda_emu")
    libs = engine_libs("release")
    return dest, build_backend(dest), libs


def check_passed(test, rc, out):
    assert "host emulation" in out.splitlines()[0], out[:300]  # it ran on the emulated device
    assert rc == 0 and f"PASS {test}" in out, out[-4000:]
    assert not re.search(r"^FAIL", out, re.M), out[-4000:]
    assert int(re.search(rf"PASS {test} \((\d+) checks\)", out).group(1)) > 0


@pytest.mark.parametrize("test", GPU_TESTS)
def test_gpu_program_under_emulation(release, test):
    dest, objs, libs = release
    rc, out = run(link(dest, test, objs, libs))
    print(out)
    check_passed(test, rc, out)


def measured(out):
    """The lines with a measured error or a verdict (the numbers a race or an order dependence moves)."""
    return [ln for ln in out.splitlines() if ln.startswith(("ok", "FAIL", "PASS", "#   "))]


@pytest.mark.parametrize("test", ["test_kernels", "test_solver"])
def test_same_results_in_other_orders(release, test):
    """Blocks, warps and lanes run in reverse and in shuffled orders: every measured error the same
    to the printed digits (a kernel whose result depends on the order of blocks or warps — a race —
    moves them)."""
    dest, objs, libs = release
    exe = dest / test
    if not exe.exists():
        exe = link(dest, test, objs, libs)
    base = measured(run(exe, order=0)[1])
    for order in (1, 7):
        rc, out = run(exe, order=order)
        check_passed(test, rc, out)
        assert measured(out) == base, f"order {order}:\n" + "\n".join(
            f"{a}\n{b}" for a, b in zip(base, measured(out)) if a != b)


def test_gpu_programs_under_asan(tmp_path):
    """Device memory, shared memory and workspaces at their exact sizes under AddressSanitizer and
    UBSan: an overrun in a kernel, a copy or a library call is an error."""
    libs = engine_libs("asan")
    objs = build_backend(tmp_path, asan=True)
    for test in ("test_kernels", "test_solver"):
        rc, out = run(link(tmp_path, test, objs, libs, asan=True))
        assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-4000:]
        check_passed(test, rc, out)


PLANTED = [  # (what, file, text, broken text, test program, what the run must then say)
    ("a host table passed to a kernel without staging", "kernels",
     "const int32_t *d = (const int32_t *)lnb_cuda_device_view(ids, (size_t)N * sizeof(int32_t), WS_IDS);\n"
     "    if (!d) return;\n    k_embedding_forward",
     "const int32_t *d = ids;\n    if (!d) return;\n    k_embedding_forward",
     "test_kernels", "k_embedding_forward: pointer argument 1"),
    ("the host dereferencing a device pointer", "kernels",
     "    CUDA_NOTE(cudaMemcpyAsync(&r, part + SUMSQ_BLOCKS, sizeof r, cudaMemcpyDeviceToHost, lnb_cuda_g.stream));",
     "    r = part[SUMSQ_BLOCKS];", "test_kernels", "host code touched device-only memory"),
    ("a reduction without its barrier", "kernels",
     "    if (l == 0) sh[w] = v;\n    __syncthreads();\n    T r = 0;", "    if (l == 0) sh[w] = v;\n    T r = 0;",
     "test_kernels", "FAIL"),
    ("the covariance read from the triangle DSYRK does not write", "solver",
     "j = x % d, lo = i < j ? i : j, hi = i < j ? j : i;\n        C[x] = sum[lo + hi * d] * inv;",
     "j = x % d;\n        C[x] = sum[i + j * d] * inv;", "test_solver", "FAIL covariance d=64"),
    ("no stream wait before the host reads tensors (LORANULL_CUDA_SYNC=0)", "kernels", "t.sync = cu_check;",
     "t.sync = NULL;", "test_calibrate", "FAIL calibration (host sums)"),
]
PLANT_ENV = {"test_calibrate": {"LORANULL_CUDA_SYNC": "0"}}


@pytest.mark.parametrize("what,name,old,new,test,symptom", PLANTED, ids=[p[0] for p in PLANTED])
def test_emulation_catches_a_planted_bug(release, tmp_path, what, name, old, new, test, symptom):
    _, objs, libs = release
    src = (eb.CUDA_DIR / f"{name}.cu").read_text()
    assert src.count(old) == 1, f"the text to break ({what}) is no longer in {name}.cu"
    cmd, obj, _ = eb.compile_cu(tmp_path, eb.CUDA_DIR / f"{name}.cu", src.replace(old, new))
    eb.run_jobs([cmd])
    objs = [obj if o.name == obj.name else o for o in objs]
    rc, out = run(link(tmp_path, test, objs, libs), env=PLANT_ENV.get(test))
    assert rc != 0 and symptom in out, f"{what}: not caught\n{out[-3000:]}"


@pytest.mark.parametrize("test", ["test_calibrate", "test_model"])
def test_host_reads_wait_for_the_stream(release, test):
    """Work on a stream runs when something waits for it, as on a GPU: with LORANULL_CUDA_SYNC=0 (no
    wait after each backend call) the engine's host code still reads tensors only after the kernels
    wrote them (its ln_backend_sync before a host calibration sum, an adapter init, a checkpoint
    write...): calibration, LoRA-Null init and training give the same results. The planted bug
    below takes the backend's wait away and test_calibrate fails."""
    dest, objs, libs = release
    exe = dest / test
    if not exe.exists():
        exe = link(dest, test, objs, libs)
    rc, out = run(exe, env={"LORANULL_CUDA_SYNC": "0"})
    check_passed(test, rc, out)
