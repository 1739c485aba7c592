"""NumPy emulation of the fused flash-attention kernels in worker/backend/cuda/attention.cu, checked
against dense causal GQA attention. No GPU runs the kernels here, so this is what CI verifies of
them: the tiling and loop structure, written the way the kernels are, one function per kernel
and one loop per kernel loop —

  forward   (block = query tile × head × batch): key tiles j0 < min(q0 + BR, T) (causal skip),
            S = Q Kᵀ, mask (j > t or t ≥ T → −∞), online softmax (m, α, l, O rescale), P in bf16,
            out = O / l, lse = m + log l;
  dq        (block = query tile × head × batch): sweep 1 D = Σ P ⊙ dP; sweep 2 dS = P ⊙ (dP − D),
            dQ += dS K; out dQ·sc;
  dkdv      (block = key tile × kv head × batch): heads of the group in order, query tiles from
            the key tile's own (causal skip), dV += Pᵀ dO, dK += dSᵀ Q; out dK·sc, dV;

with the tensor-core operands rounded to bf16 where the kernels round them (tiles loaded from
fp32, P and dS before their products) and fp32 accumulation. Each test runs the emulation twice:
without rounding in fp64 (the loop structure must then reproduce dense attention to 1e-10: a
wrong skip, mask, rescale or accumulation shows as an O(1) error) and with the kernels' bf16
rounding (the tolerances the GPU tests use are derived from these errors). The tile sizes are read
from attention.cu, so the emulation cannot drift from the kernel's constants unnoticed."""
import pathlib
import re
import subprocess

import numpy as np
import pytest

import emu_build as eb

SRC = pathlib.Path(__file__).resolve().parents[2] / "worker" / "backend" / "cuda" / "attention.cu"


def kernel_constant(name):
    m = re.search(rf"#define {name} (\d+)", SRC.read_text())
    assert m, f"{name} not found in {SRC}"
    return int(m.group(1))


BR, BC, WARPS = kernel_constant("FA_BR"), kernel_constant("FA_BC"), kernel_constant("FA_WARPS")


def bf16(x):
    """Round to bfloat16 (nearest, ties to even) and back to float32, as __float2bfloat16."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


class Mode:
    """exact: fp64 throughout, nothing rounded; else: bf16 operands, fp32 accumulation."""

    def __init__(self, exact):
        self.exact = exact
        self.f = np.float64 if exact else np.float32

    def op(self, x):  # a tensor-core operand
        return np.asarray(x, np.float64) if self.exact else bf16(x)

    def mma(self, a, b):  # bf16 × bf16 products accumulated in fp32
        return (np.asarray(a, np.float64) @ np.asarray(b, np.float64)).astype(self.f)


def load_tile(x, r0, rows, T, mode):
    """fa_load_tile: rows r0.. of a (T, hd) matrix, zero beyond T, as tensor-core operands."""
    tile = np.zeros((rows, x.shape[1]))
    n = max(0, min(rows, T - r0))
    tile[:n] = x[r0:r0 + n]
    return mode.op(tile)


def visible(t0, j0, T):
    """The kernels' mask for a tile: row t = t0 + r sees key j = j0 + c iff j ≤ t and t < T."""
    t = t0 + np.arange(BR)[:, None]
    j = j0 + np.arange(BC)[None, :]
    return (j <= t) & (t < T)


def rescale(m, mn):
    """α = e^(m − m') of the online softmax (1 where m' is still −∞)."""
    safe = np.isfinite(mn)
    with np.errstate(invalid="ignore"):
        return np.where(safe, np.exp(m - np.where(safe, mn, 0)), 1)


def flash_forward(q, k, v, mode, visits=None):
    """k_flash_forward. q (B,T,nh,hd), k/v (B,T,nkv,hd) → out (B,T,nh,hd), lse (B,nh,T)."""
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    sc = mode.f(1.0 / np.sqrt(hd))
    out = np.zeros((B, T, nh, hd))
    lse = np.zeros((B, nh, T))
    for b in range(B):
        for h in range(nh):
            g = h // (nh // nkv)
            for q0 in range(0, T, BR):                      # blockIdx.x
                Qs = load_tile(q[b, :, h], q0, BR, T, mode)
                O = np.zeros((BR, hd), mode.f)
                m = np.full(BR, -np.inf, mode.f)
                l = np.zeros(BR, mode.f)
                for j0 in range(0, min(q0 + BR, T), BC):    # causal: tiles above the diagonal skipped
                    if visits is not None:
                        visits.append((b, h, q0, j0))
                    Ks = load_tile(k[b, :, g], j0, BC, T, mode)
                    Vs = load_tile(v[b, :, g], j0, BC, T, mode)
                    S = mode.mma(Qs, Ks.T)                  # fa_warp_abt, per warp's 16 rows
                    S = np.where(visible(q0, j0, T), S * sc, -np.inf).astype(mode.f)
                    mn = np.maximum(m, S.max(axis=1))
                    safe = np.isfinite(mn)                  # rows ≥ T keep m = −∞: α = 1, p = 0
                    alpha = rescale(m, mn).astype(mode.f)
                    with np.errstate(invalid="ignore"):
                        p = np.where(safe[:, None], np.exp(S - np.where(safe, mn, 0)[:, None]), 0).astype(mode.f)
                    l = (l * alpha + p.sum(axis=1)).astype(mode.f)
                    m = mn
                    O = (O * alpha[:, None]).astype(mode.f)
                    O = (O + mode.mma(mode.op(p), Vs)).astype(mode.f)  # fa_warp_mma, acc loaded from O
                n = min(BR, T - q0)
                out[b, q0:q0 + n, h] = O[:n] / l[:n, None]
                lse[b, h, q0:q0 + n] = m[:n] + np.log(l[:n])
    return out, lse


def p_dp(Qs, dOs, Ks, Vs, t0, j0, T, L, sc, mode):
    """fa_warp_p_dp: P = e^(sc·S − lse) where visible, else 0; dP = dO Vᵀ (fp32)."""
    S = mode.mma(Qs, Ks.T)
    dP = mode.mma(dOs, Vs.T)
    P = np.where(visible(t0, j0, T), np.exp(S * sc - L[:, None]), 0).astype(mode.f)
    return P, dP


def rows(x, r0, n, T):
    """Per-row values (lse, D) of rows r0..r0+n−1, 0 beyond T."""
    out = np.zeros(n)
    m = max(0, min(n, T - r0))
    out[:m] = x[r0:r0 + m]
    return out


def flash_backward(dout, lse, q, k, v, mode, visits=None):
    """k_flash_backward_dq then k_flash_backward_dkdv → dq, dk, dv (dk, dv summed over the group)."""
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    grp = nh // nkv
    sc = mode.f(1.0 / np.sqrt(hd))
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    Dws = np.zeros((B, nh, T))
    # ---- dq kernel
    for b in range(B):
        for h in range(nh):
            g = h // grp
            for q0 in range(0, T, BR):
                Qs = load_tile(q[b, :, h], q0, BR, T, mode)
                dOs = load_tile(dout[b, :, h], q0, BR, T, mode)
                L = rows(lse[b, h], q0, BR, T).astype(mode.f)
                kend = min(q0 + BR, T)
                D = np.zeros(BR, mode.f)
                for j0 in range(0, kend, BC):               # sweep 1
                    P, dP = p_dp(Qs, dOs, load_tile(k[b, :, g], j0, BC, T, mode),
                                 load_tile(v[b, :, g], j0, BC, T, mode), q0, j0, T, L, sc, mode)
                    D = (D + (P * dP).sum(axis=1)).astype(mode.f)
                n = min(BR, T - q0)
                Dws[b, h, q0:q0 + n] = D[:n]
                acc = np.zeros((BR, hd), mode.f)
                for j0 in range(0, kend, BC):               # sweep 2
                    Ks = load_tile(k[b, :, g], j0, BC, T, mode)
                    P, dP = p_dp(Qs, dOs, Ks, load_tile(v[b, :, g], j0, BC, T, mode), q0, j0, T, L, sc, mode)
                    dS = mode.op(P * (dP - D[:, None]))
                    acc = (acc + mode.mma(dS, Ks)).astype(mode.f)
                dq[b, q0:q0 + n, h] = acc[:n] * sc
    # ---- dkdv kernel
    for b in range(B):
        for g in range(nkv):
            for j0 in range(0, T, BC):                      # blockIdx.x
                Ks = load_tile(k[b, :, g], j0, BC, T, mode)
                Vs = load_tile(v[b, :, g], j0, BC, T, mode)
                dk_acc = np.zeros((BC, hd), mode.f)
                dv_acc = np.zeros((BC, hd), mode.f)
                for i in range(grp):
                    h = g * grp + i
                    for i0 in range((j0 // BR) * BR, T, BR):  # causal: earlier query tiles skipped
                        if visits is not None:
                            visits.append((b, h, i0, j0))
                        Qs = load_tile(q[b, :, h], i0, BR, T, mode)
                        dOs = load_tile(dout[b, :, h], i0, BR, T, mode)
                        L = rows(lse[b, h], i0, BR, T).astype(mode.f)
                        D = rows(Dws[b, h], i0, BR, T).astype(mode.f)
                        P, dP = p_dp(Qs, dOs, Ks, Vs, i0, j0, T, L, sc, mode)
                        P16 = mode.op(P)
                        dS = mode.op(P * (dP - D[:, None]))
                        # warp w: keys j0+16w..: its column slab of P, dS read transposed
                        for w in range(WARPS):
                            ks = slice(16 * w, 16 * w + 16)
                            dv_acc[ks] = (dv_acc[ks] + mode.mma(P16[:, ks].T, dOs)).astype(mode.f)
                            dk_acc[ks] = (dk_acc[ks] + mode.mma(dS[:, ks].T, Qs)).astype(mode.f)
                n = min(BC, T - j0)
                dk[b, j0:j0 + n, g] = dk_acc[:n] * sc
                dv[b, j0:j0 + n, g] = dv_acc[:n]
    return dq, dk, dv


def dense(q, k, v, dout):
    """Causal GQA attention and its gradients in fp64, the plain way."""
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    grp = nh // nkv
    sc = 1.0 / np.sqrt(hd)
    out = np.zeros_like(q)
    lse = np.zeros((B, nh, T))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    mask = np.tril(np.ones((T, T), bool))
    for b in range(B):
        for h in range(nh):
            g = h // grp
            S = np.where(mask, q[b, :, h] @ k[b, :, g].T * sc, -np.inf)
            mx = S.max(axis=1, keepdims=True)
            E = np.exp(S - mx)
            P = E / E.sum(axis=1, keepdims=True)
            lse[b, h] = mx[:, 0] + np.log(E.sum(axis=1))
            out[b, :, h] = P @ v[b, :, g]
            dP = dout[b, :, h] @ v[b, :, g].T
            dS = P * (dP - (P * dP).sum(axis=1, keepdims=True))
            dq[b, :, h] = dS @ k[b, :, g] * sc
            dk[b, :, g] += dS.T @ q[b, :, h] * sc
            dv[b, :, g] += P.T @ dout[b, :, h]
    return out, lse, dq, dk, dv


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def inputs(B, T, nh, nkv, hd, seed):
    r = np.random.default_rng(seed)
    # q scaled so that the softmax is neither flat nor one-hot (scores of a few units)
    return (r.standard_normal((B, T, nh, hd)) * 1.5, r.standard_normal((B, T, nkv, hd)),
            r.standard_normal((B, T, nkv, hd)), r.standard_normal((B, T, nh, hd)))


CASES = [  # (T, nh, nkv, hd): T below, at and across tile edges; MHA and GQA ratios 2, 4, 6
    (1, 4, 4, 64), (37, 8, 2, 64), (64, 4, 1, 128), (100, 6, 1, 64), (130, 8, 2, 128), (200, 4, 2, 64),
]


def test_emulation_reads_the_kernel_constants():
    assert (BR, BC, WARPS) == (64, 64, 4)
    assert BR == BC, "dkdv's causal start (j0 // BR)·BR assumes square tiles"
    assert BR == 16 * WARPS, "each warp owns 16 query rows"


@pytest.mark.parametrize("T,nh,nkv,hd", CASES)
def test_loop_structure_is_exact(T, nh, nkv, hd):
    q, k, v, do = inputs(2, T, nh, nkv, hd, seed=T * 7 + hd)
    out, lse, dq, dk, dv = dense(q, k, v, do)
    mode = Mode(exact=True)
    fo, fl = flash_forward(q, k, v, mode)
    fdq, fdk, fdv = flash_backward(do, fl, q, k, v, mode)
    for name, a, b in (("out", fo, out), ("lse", fl, lse), ("dq", fdq, dq), ("dk", fdk, dk), ("dv", fdv, dv)):
        assert rel(a, b) < 1e-10, f"{name}: {rel(a, b):.3e}"


@pytest.mark.parametrize("T,nh,nkv,hd", CASES)
def test_bf16_kernel_is_close_to_dense(T, nh, nkv, hd):
    q, k, v, do = inputs(2, T, nh, nkv, hd, seed=T * 7 + hd + 1)
    out, lse, dq, dk, dv = dense(q, k, v, do)
    mode = Mode(exact=False)
    fo, fl = flash_forward(q, k, v, mode)
    fdq, fdk, fdv = flash_backward(do, fl, q, k, v, mode)
    errs = {"out": rel(fo, out), "lse": float(np.abs(fl - lse).max()), "dq": rel(fdq, dq), "dk": rel(fdk, dk),
            "dv": rel(fdv, dv)}
    print(f"T={T} nh={nh} nkv={nkv} hd={hd} bf16 errors: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    # bf16 operands (8 bits of mantissa) with fp32 accumulation: ~1e-2 of the largest entry; an fp64
    # run of the same loops is exact (above), so these bound only the rounding
    assert errs["out"] < 2e-2 and errs["lse"] < 2e-2
    assert errs["dq"] < 3e-2 and errs["dk"] < 3e-2 and errs["dv"] < 3e-2
    # and rounding does happen (the emulation is not silently fp64)
    assert errs["out"] > 1e-5


def test_causal_tile_skipping():
    """The forward visits exactly the tiles on and below the diagonal; the dkdv kernel the query
    tiles on and after each key tile; every skipped tile is fully masked."""
    T, nh, nkv, hd = 200, 2, 1, 64
    q, k, v, do = inputs(1, T, nh, nkv, hd, seed=3)
    nt = -(-T // BR)
    fv, bv = [], []
    mode = Mode(exact=True)
    _, lse = flash_forward(q, k, v, mode, visits=fv)
    flash_backward(do, lse, q, k, v, mode, visits=bv)
    want = {(0, h, i * BR, j * BC) for h in range(nh) for i in range(nt) for j in range(i + 1)}
    assert set(fv) == want and len(fv) == len(want) == nh * nt * (nt + 1) // 2
    assert set(bv) == want and len(bv) == len(want)
    for i in range(nt):
        for j in range(i + 1, nt):
            assert not visible(i * BR, j * BC, T).any()


def test_a_wrong_loop_is_caught(monkeypatch):
    """The exact comparison has teeth: a mask off by one on the diagonal, or a dropped online
    rescale, changes the result by far more than 1e-10."""
    T, nh, nkv, hd = 130, 2, 1, 64
    q, k, v, do = inputs(1, T, nh, nkv, hd, seed=5)
    out = dense(q, k, v, do)[0]
    ok, _ = flash_forward(q, k, v, Mode(exact=True))
    assert rel(ok, out) < 1e-10

    def strict(t0, j0, T_):  # j < t instead of j ≤ t (row 0 keeps its only key so nothing divides by 0)
        t = t0 + np.arange(BR)[:, None]
        j = j0 + np.arange(BC)[None, :]
        return ((j < t) | (j == 0)) & (t < T_)

    monkeypatch.setattr(__import__(__name__), "visible", strict)
    bad, _ = flash_forward(q, k, v, Mode(exact=True))
    monkeypatch.undo()
    assert rel(bad, out) > 1e-2

    monkeypatch.setattr(__import__(__name__), "rescale", lambda m, mn: np.ones_like(mn))  # O, l never rescaled
    bad, _ = flash_forward(q, k, v, Mode(exact=True))
    monkeypatch.undo()
    assert rel(bad, out) > 1e-2


# ---------------------------------------------------------------------------------------------------
# The kernels' CUDA source itself, run on the host (tests/reference/flash_emu.cpp): the loops above
# check the algorithm; this checks attention.cu as written — WMMA fragment layouts and leading
# dimensions, shared-memory carving, lane ↔ row mapping, barriers, launch configuration and the
# shared-memory opt-in — against dense fp64 attention, with every thread a fiber (no GPU needed).

EMU = pathlib.Path(__file__).resolve().parent / "flash_emu.cpp"
ROOT = eb.ROOT


def build_emu(dest, src_text, asan=False):
    """attention.cu (as given) built for the host emulation (emu_build.py, cuda_emu/) and linked with
    the driver flash_emu.cpp. The counts are asserted so a new launch or kernel cannot go unemulated
    silently."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd, obj, (n_launch, n_dyn, n_static) = eb.compile_cu(dest, SRC, src_text, asan)
    assert n_dyn == 3, f"{n_dyn} kernels with dynamic shared memory (the three flash kernels expected)"
    assert n_launch == 5, f"{n_launch} launches (2 chunked + 3 fused expected)"
    assert n_static == 2, f"{n_static} static shared arrays (the two chunked softmax kernels expected)"
    rt_cmd, rt_obj = eb.runtime_cmd(dest, asan)
    drv = dest / "flash_emu.o"
    eb.run_jobs([cmd, rt_cmd, [eb.cxx(), *eb.cxx_flags(asan), "-c", str(EMU), "-o", str(drv)]])
    exe = dest / ("flash_emu_asan" if asan else "flash_emu")
    san = ["-fsanitize=address,undefined"] if asan else []
    r = subprocess.run([eb.cxx(), *san, "-o", str(exe), str(drv), str(obj), str(rt_obj), str(ROOT / "common" / "err.c"),
                        f"-I{ROOT}", "-llapacke", "-llapack", "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


def run_emu(exe, shape, path, orders=4):
    # chunks of 16 query rows: the chunked path crosses several chunks at these small T
    env = eb.env_for_run({"FLASH_EMU_PATH": path, "FLASH_EMU_ORDERS": str(orders), "LORANULL_CUDA_ATTN_CHUNK": "16"})
    r = subprocess.run([str(exe), *map(str, shape)], capture_output=True, text=True, env=env, timeout=600)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emu(tmp_path_factory.mktemp("flash_emu"), SRC.read_text())


# (B, T, nh, nkv, hd), path: the shapes of tests/gpu/test_attention.c (fewer heads where the host
# would take long); the chunked path (cuBLAS emulated naively) and the mixed ones at small shapes only
EMU_CASES = [((2, 1, 4, 4, 64), "fused"), ((2, 37, 8, 2, 64), "fused"), ((1, 64, 4, 1, 128), "fused"),
             ((1, 100, 4, 1, 64), "fused"), ((1, 130, 4, 2, 128), "fused"), ((1, 257, 2, 1, 128), "fused"),
             ((2, 37, 4, 2, 64), "chunked"), ((1, 70, 2, 1, 128), "chunked"),
             # the LSE contract: a forward by one path, the backward by the other
             ((1, 70, 2, 1, 64), "fused>chunked"), ((1, 70, 2, 1, 128), "chunked>fused")]


@pytest.mark.parametrize("shape,path", EMU_CASES, ids=[f"{p}-B{s[0]}-T{s[1]}-nh{s[2]}-nkv{s[3]}-hd{s[4]}" for s, p in EMU_CASES])
def test_cuda_source_on_host(emu, shape, path):
    rc, out = run_emu(emu, shape, path)
    print(out)
    assert rc == 0 and "PASS flash_emu" in out, out[-3000:]
    # the errors are measured, not skipped: one line per output and four orders of thread turns
    assert out.count("ok   err ") == 5 and out.count("ok   " + path + ": same bits") == 3, out


def test_cuda_source_under_asan(tmp_path):
    """Shared memory and every workspace at their exact sizes: an overrun is an ASan error."""
    exe = build_emu(tmp_path, SRC.read_text(), asan=True)
    for shape, path in (((1, 70, 2, 1, 128), "fused"), ((1, 37, 2, 1, 64), "chunked")):
        rc, out = run_emu(exe, shape, path, orders=1)  # one thread order: ASan is slow enough
        assert rc == 0 and "PASS flash_emu" in out and "ERROR: AddressSanitizer" not in out, out[-3000:]


PLANTED = [  # (what, text of attention.cu, broken text, what the emulator must then say)
    ("no __syncwarp between S = QKᵀ and the row softmax",
     "fa_warp_abt<HD>(Sw, Qs + w * 16 * HD, Ks);\n        __syncwarp();", "fa_warp_abt<HD>(Sw, Qs + w * 16 * HD, Ks);",
     "FAIL err fused out"),
    ("K, V reloaded while other warps still read them",
     "    for (int j0 = 0; j0 < kend; j0 += FA_BC) {\n        __syncthreads();\n        fa_load_tile<HD>(Ks, kb, ks, j0, FA_BC, T);\n"
     "        fa_load_tile<HD>(Vs, vb, ks, j0, FA_BC, T);\n        __syncthreads();\n        fa_warp_p_dp<HD>(Sw, dPw, Qw, dOw, Ks, Vs, t, T, j0, Lt, sc);\n        for",
     "    for (int j0 = 0; j0 < kend; j0 += FA_BC) {\n        fa_load_tile<HD>(Ks, kb, ks, j0, FA_BC, T);\n"
     "        fa_load_tile<HD>(Vs, vb, ks, j0, FA_BC, T);\n        __syncthreads();\n        fa_warp_p_dp<HD>(Sw, dPw, Qw, dOw, Ks, Vs, t, T, j0, Lt, sc);\n        for",
     "same bits with the warps at random"),
    ("no shared-memory opt-in before the launch", "    CUDA_NOTE(cudaFuncSetAttribute(k_flash_forward<HD>",
     "    if (0) CUDA_NOTE(cudaFuncSetAttribute(k_flash_forward<HD>", "launch of kernel flash_forward: invalid argument"),
    ("a barrier only one warp reaches", "            __syncthreads(); /* all 64 rows of P, dS are in */",
     "            if (w == 0) __syncthreads();", "deadlock"),
]


@pytest.mark.parametrize("name,old,new,symptom", PLANTED, ids=[p[0] for p in PLANTED])
def test_emulator_catches_a_planted_bug(tmp_path, name, old, new, symptom):
    src = SRC.read_text()
    assert src.count(old) == 1, f"the text to break ({name}) is no longer in attention.cu"
    exe = build_emu(tmp_path, src.replace(old, new))
    rc, out = run_emu(exe, (1, 70, 2, 1, 128), "fused")
    assert rc != 0 and symptom in out, f"{name}: not caught\n{out[-2000:]}"
