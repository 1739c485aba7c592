"""The CUDA table's engine hooks (backend.h: freeze, thaw, check) run without a GPU: tests/gpu/test_hooks.c,
unchanged, on the whole CUDA backend built for the host emulation (test_cuda_emu.py's build, cuda_emu.h):
freeze keeps bf16 copies in the bf16 math mode only, a thawed weight is never multiplied stale, check
reports a refused GEMM once in the engine's sentence, and ln_train (lora; pissa, frozen after its init
rewrote W0) on the CUDA table logs its frozen weights and matches the CPU table's losses. A thaw that
keeps the copy (planted) is caught."""
import pytest

from test_cuda_emu import build_backend, check_passed, engine_libs, link, run
import emu_build as eb

TEST = "test_hooks"
THAW = "static void cu_thaw(const float *w) { lnb_cuda_unregister(w); }"


@pytest.fixture(scope="module")
def libs():
    return engine_libs("release")


def test_hooks_under_emulation(tmp_path, libs):
    rc, out = run(link(tmp_path, TEST, build_backend(tmp_path), libs))
    print(out)
    check_passed(TEST, rc, out)
    # ln_train froze the 14 linears and lm_head into bf16 copies: for lora and for pissa
    assert out.count('"engine","msg":"bf16 weights: 15 frozen') == 2, out[-3000:]
    assert "cuda device error" not in out


def test_a_thaw_that_keeps_the_copy_is_caught(tmp_path, libs):
    src = (eb.CUDA_DIR / "kernels.cu").read_text()
    assert src.count(THAW) == 1, "cu_thaw changed: update the planted bug"
    objs = build_backend(tmp_path, sources={"kernels": src.replace(THAW, "static void cu_thaw(const float *w) { (void)w; }")})
    rc, out = run(link(tmp_path, TEST, objs, libs))
    assert rc != 0 and "FAIL after thaw and a change" in out, out[-3000:]
