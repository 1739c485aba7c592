/* The CUDA backend's entry points no GPU test program reaches (the benchmark's, at shapes too large
 * to emulate there), at small shapes, with gpu_check.h's harness: run by
 * tests/reference/test_cuda_emu.py under the host emulation (it would run on a GPU as well).
 *   - lnb_cuda_fill_normal: N(0, std²) by (seed, index), deterministic, seeds independent;
 *   - lnb_cuda_fill_const;
 *   - lnb_cuda_bf16_gemm_peak: bf16 × bf16 → bf16 cuBLAS GEMMs timed by events. */
#include <stdint.h>

#include "tests/gpu/gpu_check.h"

int main(void)
{
    gpu_require("test_emu_extras", LNB_CUDA_MATH_BF16);
    const lnb_backend *G = lnb_cuda();
    const int64_t n = 100003;
    float *a = G->alloc((size_t)n * sizeof(float)), *b = G->alloc((size_t)n * sizeof(float));
    float *c = G->alloc((size_t)n * sizeof(float));
    lnb_cuda_fill_normal(a, n, 42, 1.5f);
    lnb_cuda_fill_normal(b, n, 42, 1.5f);
    lnb_cuda_fill_normal(c, n, 43, 1.5f);
    check_cuda("fill_normal");
    double s = 0, s2 = 0, cross = 0;
    int finite = 1;
    for (int64_t i = 0; i < n; i++) {
        finite &= isfinite(a[i]) != 0;
        s += a[i];
        s2 += (double)a[i] * a[i];
        cross += (double)a[i] * c[i];
    }
    double mean = s / n, sd = sqrt(s2 / n - mean * mean);
    check_true("fill_normal: every value finite", finite);
    check_close("fill_normal: mean 0 (abs, 4.5 sigma of the sample mean)", fabs(mean), 4.5 * 1.5 / sqrt((double)n));
    check_close("fill_normal: standard deviation 1.5 (rel)", fabs(sd - 1.5) / 1.5, 0.01);
    check_true("fill_normal: the same seed gives the same bits", memcmp(a, b, (size_t)n * sizeof(float)) == 0);
    check_close("fill_normal: two seeds uncorrelated (|corr|)", fabs(cross / n) / (1.5 * 1.5), 4.5 / sqrt((double)n));

    lnb_cuda_fill_const(b, n, -0.25f);
    check_cuda("fill_const");
    int same = 1;
    for (int64_t i = 0; i < n; i++) same &= b[i] == -0.25f;
    check_true("fill_const: every value set", same);

    ln_err e = {{0}};
    double tf = 0;
    int rc = lnb_cuda_bf16_gemm_peak(64, 2, &tf, &e);
    if (rc) printf("#   %s\n", e.msg);
    check_true("bf16 GEMM peak: measured (events around bf16 x bf16 -> bf16 GEMMs)", rc == 0 && tf > 0 && isfinite(tf));
    G->free(a);
    G->free(b);
    G->free(c);
    return gpu_done();
}
