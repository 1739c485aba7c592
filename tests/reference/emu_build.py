"""Builds CUDA source for the host emulation in tests/reference/cuda_emu/ (cuda_emu.h says what it
emulates). A .cu file compiles as C++ against the stub CUDA headers in cuda_emu/include/ after three
rewrites that keep every line where it was (so __FILE__:__LINE__ in the backend's error sentences
name the real source line):
  - `kernel<<<grid, block, smem, stream>>>(args)` → `emu_launch<B>("kernel", kernel, emu_cfg(grid,
    block, smem, stream), args)`, B = 1 when a barrier, shuffle or WMMA call is reachable from the
    kernel (its threads then run as fibers), 0 when none is (plain calls, much faster; one that
    reaches a barrier anyway fails loudly at run time);
  - `extern __shared__ T name[];` → the launch's dynamic shared memory;
  - `__shared__ T name[N];` → the block's static shared buffer for that declaration.
Used by test_flash_tiling.py (attention.cu alone) and test_cuda_emu.py (the whole backend)."""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EMU = HERE / "cuda_emu"
CUDA_DIR = ROOT / "worker" / "backend" / "cuda"

BARRIER_PRIMITIVES = re.compile(r"__syncthreads|__syncwarp|__shfl\w*|wmma::")


def _functions(src):
    """{name: body} of every __global__ / __device__ function defined in src."""
    text = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", src)
    out = {}
    for m in re.finditer(r"(?:__global__|__device__)[^;{}]*?\b(\w+)\s*\([^;{}]*?\)\s*\{", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.setdefault(m.group(1), "")
        out[m.group(1)] += text[m.end():i]
    return out


def barrier_kernels(src):
    """Names of the functions from which a barrier, shuffle or WMMA call is reachable."""
    funcs = _functions(src)
    hit = {n for n, body in funcs.items() if BARRIER_PRIMITIVES.search(body)}
    while True:
        more = {n for n, body in funcs.items() if n not in hit and any(re.search(rf"\b{h}\s*[<(]", body) for h in hit)}
        if not more:
            return hit, set(funcs)
        hit |= more


def transform(src, path):
    """The .cu text → C++ for the emulation; returns (text, launches, dynamic smem, static smem)."""
    hit, defined = barrier_kernels(src)
    src, n_dyn = re.subn(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];",
                         r"\1 *\2 = (\1 *)emu_dynamic_smem();", src)
    src, n_static = re.subn(r"__shared__\s+([\w:]+)\s+(\w+)\[([^\]]+)\];",
                            r"\1 *\2 = (\1 *)emu_static_smem(sizeof(\1) * (\3), __FILE__, __LINE__);", src)

    def launch(m):
        name = m.group(1)
        base = name.split("<")[0]
        assert base in defined, f"{path}: launch of {name}, whose definition emu_build.py did not find"
        return f'emu_launch<{int(base in hit)}>("{name}", {name}, emu_cfg({m.group(2)}), '

    src, n_launch = re.subn(r"(\w+(?:<\w+>)?)\s*<<<(.*?)>>>\s*\(", launch, src)
    src = re.sub(r"(emu_launch<\d>\([^;]*?emu_cfg\([^;]*?\)), \)", r"\1)", src)  # a kernel without arguments
    assert "<<<" not in src, f"{path}: a launch emu_build.py could not rewrite"
    rel = pathlib.Path(path).resolve().relative_to(ROOT)
    return f'#line 1 "{rel}"\n' + src, n_launch, n_dyn, n_static


def fma_flags():
    """nvcc fuses a*b + c into FMAs by default: the emulation does the same where the CPU can."""
    try:
        has = " fma " in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        has = False
    return ["-mfma", "-ffp-contract=fast"] if has else []


def cxx():
    c = shutil.which("g++")
    if not c:
        pytest.skip("no g++ to build the CUDA emulation")
    return c


def opt_flags(asan=False):
    """Optimisation and sanitizers, the same for the emulation's C++ and the C programs linked with it."""
    return ["-O1", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if asan else ["-O2"]


def cxx_flags(asan=False, werror=True):
    """werror=False for the backend's .cu files: g++ also sees their device code, which nvcc's
    -Werror never does, so a warning there is not this emulation's to fail on."""
    return ["-std=gnu++17", "-g", *opt_flags(asan), *fma_flags(), "-Wall", "-Wextra", *(["-Werror"] if werror else []),
            "-Wno-unknown-pragmas", f"-I{EMU / 'include'}", f"-I{ROOT}"]


def compile_cu(dest, cu_path, text=None, asan=False):
    """One .cu (its text as given, or as on disk) → an object in dest; returns (object, counts)."""
    cu_path = pathlib.Path(cu_path)
    out, *counts = transform(text if text is not None else cu_path.read_text(), cu_path)
    cpp = dest / (cu_path.stem + "_emu.cpp")
    cpp.write_text(out)
    obj = dest / (cu_path.stem + "_emu.o")
    return [cxx(), *cxx_flags(asan, werror=False), "-c", str(cpp), "-o", str(obj)], obj, counts


def run_jobs(cmds):
    """Compiles in parallel (2 at a time: the machine is shared), failing with the compiler's words."""
    procs = []
    for i in range(0, len(cmds), 2):
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds[i:i + 2]]
        for c, p in zip(cmds[i:i + 2], procs):
            out, _ = p.communicate(timeout=600)
            assert p.returncode == 0, f"{' '.join(c[-3:])}:\n{out[-4000:]}"


def runtime_cmd(dest, asan=False):
    obj = dest / "cuda_emu.o"
    return [cxx(), *cxx_flags(asan), "-c", str(EMU / "cuda_emu.cpp"), "-o", str(obj)], obj


def env_for_run(extra=None):
    # LORANULL_EMU: the GPU tests' switch for shapes too large to emulate (test_attention's T = 2048)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", OMP_NUM_THREADS="2", LORANULL_EMU="1")
    env.update(extra or {})
    return env
