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
    r = subprocess.run(["gcc", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-g",
                        *eb.opt_flags(asan), "-fopenmp", f"-I{ROOT}", f"-I{eb.EMU / 'include'}", "-o", str(exe),
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


def linked(release, test):
    """tests/gpu/<test> linked with the release backend, once per module (an earlier test's program)."""
    dest, objs, libs = release
    exe = dest / test
    return exe if exe.exists() else link(dest, test, objs, libs)


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
    exe = linked(release, test)
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
    exe = linked(release, test)
    rc, out = run(exe, env={"LORANULL_CUDA_SYNC": "0"})
    check_passed(test, rc, out)


# ---- async mode: the engine's whole-job paths with no wait after each backend call ----
#
# The CUDA backend queues its calls (LORANULL_CUDA_SYNC unset: its default) and the engine waits
# through the table's sync hook right before its host code touches tensors (backend.h). With
# CUDA_EMU_ASYNC=1 the emulator closes every device and managed allocation (PROT_NONE) while work is
# queued, so a host read or write that comes before its wait faults, naming the allocation and the
# host backtrace (cuda_emu.cpp). The GPU programs and real `loranull train --device cuda` jobs
# (calibration, LoRA-Null, PiSSA, LoRA with its PEFT files, full fine-tuning, evaluation, knowledge
# drift, checkpoints, resume) must run through without one; a wait taken out of the engine must show.

import json  # noqa: E402 (this section's)

HOST_TOUCH = "host code touched device memory with work queued"
ASYNC_PROGRAMS = ["test_model", "test_calibrate", "test_hooks"]
CLI_PULL = [f"-Wl,-u,{s}" for s in ("lnb_cuda_open", "lnb_cuda", "lnb_cuda_plan_check", "lnb_cuda_nullspace_basis",
                                    "lnb_cuda_cov_init")]
CLI_LIBS = ["cli", "daemon", "server", "engine", "proto", "common"]
ENGINE_CFLAGS = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-g", "-O2",
                 "-fopenmp"]


def run_async(cmd, cwd, timeout=900):
    """cmd with the emulator in async mode and the backend's default (no per-call wait)."""
    env = eb.env_for_run({"CUDA_EMU_ASYNC": "1"})
    env.pop("LORANULL_CUDA_SYNC", None)
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    return r.returncode, r.stdout + r.stderr


def engine_object(dest, rel, old, new):
    """worker/engine/<rel> compiled with `old` replaced by `new` (linked ahead of libengine.a, it wins)."""
    src = (ROOT / rel).read_text()
    assert src.count(old) == 1, f"the text to take out is no longer in {rel}"
    c = dest / pathlib.Path(rel).name
    c.write_text(src.replace(old, new))
    obj = c.with_suffix(".o")
    r = subprocess.run(["gcc", *ENGINE_CFLAGS, f"-I{ROOT}", "-c", str(c), "-o", str(obj)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return obj


def link_cli(dest, objs, extra=()):
    """`loranull` (worker/cli) with the emulated backend in place of libloranull_cuda.a, as `make
    cuda-bin` links it: --device cuda selects it."""
    libs = [ROOT / "build" / "release" / f"lib{n}.a" for n in CLI_LIBS]
    main = ROOT / "build" / "release" / "obj" / "worker" / "cli" / "main.o"
    r = subprocess.run(["make", "-C", str(ROOT), "V=release", *(str(p.relative_to(ROOT)) for p in [*libs, main])],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    exe = dest / "loranull"
    r = subprocess.run(["gcc", "-fopenmp", "-rdynamic", "-o", str(exe), str(main), *CLI_PULL, *map(str, objs),
                        *map(str, extra), *map(str, libs), "-lopenblas", "-llapacke", "-llapack", "-lmicrohttpd",
                        "-ljansson", "-lsqlite3", "-luv", "-lcurl", "-lm", "-lpthread", "-lstdc++"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


def tiny_job(d, exe):
    """A 2-layer model and 16 examples of 40 tokens (tests/gpu/cli_train.sh's) in d."""
    (d / "cfg.json").write_text(json.dumps({
        "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}))
    r = subprocess.run([str(exe), "model", "new", "--config", "cfg.json", "--out", "tiny", "--seed", "3",
                        "--no-tokenizer"], capture_output=True, text=True, cwd=d, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [{"input_ids": [(i * 31 + t * 7 + i * t) % 300 for t in range(1, 41)]} for i in range(1, 17)]
    (d / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (d / "val.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[:4]))


LORA_NULL = ["--method", "lora_null_v1", "--rank", "4", "--calibration", "data.jsonl", "--calibration-samples", "8",
             "--no-calibration-cache"]


def train(exe, d, out, *opts):
    return run_async([exe, "train", "--device", "cuda", "--model", "tiny", "--data", "data.jsonl", "--out", out,
                      "--batch-size", "4", "--lr", "2e-3", *opts], d)


def host_frames(out):
    """The function names of the host backtrace a fault printed (frames without a symbol, static
    functions, resolved by addr2line from the program's debug information)."""
    names, where = [], {}
    for exe, sym, off in re.findall(r"^(/[^\s(]+)\(([\w.]*)\+(0x[0-9a-f]+)\)\[", out, re.M):
        if sym:
            names.append(sym)
        else:
            where.setdefault(exe, []).append(off)
    for exe, offs in where.items():
        r = subprocess.run(["addr2line", "-f", "-e", exe, *offs], capture_output=True, text=True, timeout=60)
        names += r.stdout.splitlines()[::2]
    return names


def losses(path):
    return [json.loads(x)["loss"] for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_emu(release, tmp_path_factory):
    dest, objs, _ = release
    d = tmp_path_factory.mktemp("cli_async")
    exe = link_cli(dest, objs)
    tiny_job(d, exe)
    return exe, d


@pytest.mark.parametrize("test", ASYNC_PROGRAMS)
def test_async_mode_gpu_program(release, test):
    exe = linked(release, test)
    rc, out = run_async([exe], exe.parent)
    print(out)
    assert "async mode" in out, out[:500]
    assert HOST_TOUCH not in out, out[-4000:]
    check_passed(test, rc, out)


def test_async_mode_cli_lora_null_job(cli_emu):
    """Calibration (device sums), the LoRA-Null init, evaluations, knowledge drift, checkpoints and
    the final adapter; then a resume from the step-2 checkpoint gives steps 3 and 4 bit for bit."""
    exe, d = cli_emu
    opts = ["--max-steps", "4", "--val-data", "val.jsonl", "--eval-every", "2", "--save-every", "2", *LORA_NULL]
    rc, out = train(exe, d, "null", *opts)
    assert rc == 0 and HOST_TOUCH not in out, out[-4000:]
    assert "sums=cuda" in out and "knowledge drift at step 4" in out, out[-3000:]
    rows = [json.loads(x) for x in (d / "null" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("val_loss" in r for r in rows[1::2]), rows
    assert (d / "null" / "adapter.safetensors").stat().st_size > 0
    assert (d / "null" / "checkpoints" / "step-000002" / "state.safetensors").exists()
    rc, out = train(exe, d, "null_resumed", *opts, "--resume", "null/checkpoints/step-000002")
    assert rc == 0 and HOST_TOUCH not in out, out[-4000:]
    assert losses(d / "null_resumed" / "metrics.jsonl") == losses(d / "null" / "metrics.jsonl")[2:]


@pytest.mark.parametrize("method", ["full", "lora", "pissa"])
def test_async_mode_cli_other_methods(cli_emu, method):
    """Full fine-tuning (weights and moments checkpointed and restored), LoRA (its PEFT files too)
    and PiSSA (an SVD of each W0 on the host): two steps, a checkpoint each, a resume from step 1."""
    exe, d = cli_emu
    opts = ["--max-steps", "2", "--save-every", "1", "--method", method, "--rank", "4"]
    rc, out = train(exe, d, method, *opts)
    assert rc == 0 and HOST_TOUCH not in out, out[-4000:]
    final = {"full": "model.safetensors", "lora": "adapter_model.safetensors", "pissa": "adapter.safetensors"}[method]
    assert (d / method / final).stat().st_size > 0
    rc, out = train(exe, d, method + "_resumed", *opts, "--resume", f"{method}/checkpoints/step-000001")
    assert rc == 0 and HOST_TOUCH not in out, out[-4000:]
    assert losses(d / (method + "_resumed") / "metrics.jsonl") == losses(d / method / "metrics.jsonl")[1:]


REMOVED_WAITS = [  # (what, engine file, the text with the wait, without it, the run, a frame of the backtrace)
    ("the adapter init's wait", "worker/engine/adapter.c",
     '            if (ln_backend_sync(m->be, e, "before the %s init of layer %d %s", ad->method, l,\n'
     '                                ln_target_module((ln_target)t)) ||\n                ln_init_layer',
     "            if (ln_init_layer", "cli", "init_by_layer"),
    ("the calibration hook's wait", "worker/engine/calibrate.c",
     '                 : ln_backend_sync(h->be, &h->err, "before its sum on the host") ? -1\n', "",
     "test_calibrate", "calib_hook"),
]


@pytest.mark.parametrize("what,rel,wait,without,program,frame", REMOVED_WAITS, ids=[p[0] for p in REMOVED_WAITS])
def test_async_mode_catches_a_removed_wait(release, cli_emu, tmp_path, what, rel, wait, without, program, frame):
    """An engine file rebuilt without one of its waits: the run stops at the host access it left
    unguarded, naming a managed allocation and the host frames that touched it."""
    dest, objs, libs = release
    planted = engine_object(tmp_path, rel, wait, without)
    if program == "cli":
        exe, d = cli_emu
        rc, out = train(link_cli(tmp_path, objs, [planted]), d, "planted", "--max-steps", "1", *LORA_NULL)
    else:
        rc, out = run_async([link(tmp_path, program, [*objs, planted], libs)], tmp_path)
    assert rc != 0 and HOST_TOUCH in out, f"{what} taken out: not caught\n{out[-3000:]}"
    assert re.search(r"byte \d+ of a \d+-byte managed allocation", out), out[-3000:]
    assert frame in host_frames(out), f"{frame} not in the backtrace {host_frames(out)}\n{out[-3000:]}"
