"""The whole CUDA backend (worker/backend/cuda/kernels.cu, attention.cu, solver.cu, as they are on
disk) built for the host emulation of tests/reference/cuda_emu/ (cuda_emu.h and cuda_emu.cpp say
what it keeps of CUDA: a fiber per CUDA thread, streams that run when waited for, NaN-filled device
memory at its exact size, host code kept out of device-only memory, every device pointer checked,
cuBLAS and cuSOLVER over LAPACKE) and linked, in place of libloranull_cuda.a, with the GPU test
programs tests/gpu/*.c unchanged: each must print its checks and PASS, as it would on a GPU. No GPU
is needed, so CI runs what otherwise only a GPU session runs. Also: the results do not depend on
the order blocks and warps run in, two programs pass under AddressSanitizer, the engine waits for
the stream before its host code reads tensors, and bugs planted in the backend's source are caught.
About 1m45s on a busy 2-core machine (test_model 25-55 s of it)."""
import pathlib
import re
import subprocess

import pytest

import emu_build as eb

ROOT = eb.ROOT
# test_emu_extras (cuda_emu/): the backend's benchmark helpers, which no GPU test reaches at emulable shapes
GPU_TESTS = ["test_kernels", "test_solver", "test_calibrate", "test_memplan_gpu", "test_model", "test_attention",
             "test_emu_extras"]
# Checks a GPU test program gets wrong on a GPU too, found under the emulation and reported to its
# owner; tolerated (the run is then an xfail) but nothing else may fail. test_attention compares the
# mixed-path (fused forward + chunked backward and the reverse) dQ and dK at T = 1 with the chunked
# path's, which are exactly 0 there (one key: P = 1, dS = 0), while a path pair with bf16 scores
# gives P = e^(±ε) ≠ 1 and dS of the order of bf16 rounding: rel_err's 1e-30 floor turns that into
# ~5e26.
KNOWN_GPU_TEST_BUGS = {
    "test_attention": re.compile(r"^FAIL (fused fwd \+ chunked bwd|chunked fwd \+ fused bwd) vs chunked: d[qk] B\d+ T1 "),
}
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
    """PASS with every check ok; or, where the only failing checks are known bugs of the GPU test
    itself (KNOWN_GPU_TEST_BUGS), an xfail naming them."""
    assert "host emulation" in out.splitlines()[0], out[:300]  # it ran on the emulated device
    known = KNOWN_GPU_TEST_BUGS.get(test)
    fails = [ln for ln in out.splitlines() if ln.startswith("FAIL") and not ln.startswith(f"FAIL {test} (")]
    unknown = [ln for ln in fails if not (known and known.search(ln))]
    assert not unknown, "\n".join(unknown) + "\n" + out[-3000:]
    if fails:
        m = re.search(rf"^FAIL {test} \((\d+) of (\d+) checks failed\)", out, re.M)
        assert rc == 1 and m and int(m.group(1)) == len(fails), out[-3000:]
        pytest.xfail(f"{test}: only its known bug fails ({len(fails)} of {m.group(2)} checks):\n" + "\n".join(fails))
    assert rc == 0 and f"PASS {test}" in out, out[-4000:]
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


def test_host_reads_wait_for_the_stream(release):
    """Work on a stream runs when something waits for it, as on a GPU: with LORANULL_CUDA_SYNC=0 (no
    wait after each backend call) the host calibration still reads the model's activations only
    after the kernels computed them (the engine's ln_backend_sync before a host sum); the planted
    bug below takes that wait away and the same run fails."""
    dest, objs, libs = release
    exe = dest / "test_calibrate"
    if not exe.exists():
        exe = link(dest, "test_calibrate", objs, libs)
    rc, out = run(exe, env={"LORANULL_CUDA_SYNC": "0"})
    check_passed("test_calibrate", rc, out)
