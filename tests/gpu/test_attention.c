/* The fused flash-attention kernels (worker/backend/cuda/attention.cu) against the chunked cuBLAS
 * path and the CPU backend, on the same inputs: forward output, log-sum-exp, dQ, dK, dV, at
 * several T (1, below, at and across the 64-row tile, and 2048), head dims 64 and 128, MHA and GQA
 * ratios 2, 4, 8. The GPU runs in fp32 math so that the chunked path is the exact reference
 * (LORANULL_CUDA_ATTN picks the path per call); the fused kernels use bf16 tensor cores, so they
 * are held to the tolerances the NumPy emulation of their loops measures for bf16 rounding
 * (tests/reference/test_flash_tiling.py: ≤ 5e-3 there; 2e-2 / 3e-2 here). Also: a forward by one
 * path and a backward by the other agree (the same LSE contract), the fused backward is bitwise
 * deterministic, and the path choice follows the head dim and the math mode. Every result buffer
 * starts as NaN and a NaN or infinity anywhere fails its comparison (gpu_check.h's rel_err alone
 * would skip NaNs), so an element a kernel leaves unwritten cannot pass unseen. The same kernels'
 * CUDA source also runs on the host under tests/reference/flash_emu.cpp (pytest
 * tests/reference/test_flash_tiling.py), at these shapes. */
#include <stdint.h>
#include <time.h>

#include "tests/gpu/gpu_check.h"
#include "worker/backend/backend.h"

static const lnb_backend *G, *H;

typedef struct {
    int B, T, nh, nkv, hd;
    int64_t nq, nk, nl;
    float *q, *k, *v, *go;                 /* managed (read by both backends) */
} att_case;

static float *filled(int64_t n, uint64_t seed, float scale)
{
    float *p = G->alloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = scale * ((float)((seed >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f);
    }
    return p;
}

/* One path's results (managed memory). */
typedef struct {
    float *out, *lse, *dq, *dk, *dv;
} att_result;

/* n NaNs: an element a path leaves unwritten stays NaN and fails the comparisons below. */
static float *nans(int64_t n)
{
    float *p = G->alloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) p[i] = NAN;
    return p;
}

static void result_alloc(const att_case *c, att_result *r)
{
    r->out = nans(c->nq);
    r->lse = nans(c->nl);
    r->dq = nans(c->nq);
    r->dk = nans(c->nk);
    r->dv = nans(c->nk);
}

static void result_free(att_result *r)
{
    G->free(r->out);
    G->free(r->lse);
    G->free(r->dq);
    G->free(r->dk);
    G->free(r->dv);
}

/* Forward with path fwd, backward with path bwd ("fused" / "chunked"); seconds of both. */
static double run_gpu(const att_case *c, const char *fwd, const char *bwd, att_result *r)
{
    struct timespec t0, t1;
    ln_err e = {{0}};
    lnb_cuda_sync(&e);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    setenv("LORANULL_CUDA_ATTN", fwd, 1);
    G->attention_forward(r->out, r->lse, c->q, c->k, c->v, c->B, c->T, c->nh, c->nkv, c->hd);
    setenv("LORANULL_CUDA_ATTN", bwd, 1);
    G->attention_backward(r->dq, r->dk, r->dv, NULL, c->go, r->lse, c->q, c->k, c->v, c->B, c->T, c->nh, c->nkv, c->hd);
    unsetenv("LORANULL_CUDA_ATTN");
    check_cuda(fwd);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
}

/* The CPU backend (full probabilities) into r's out, dq, dk, dv. */
static void run_cpu(const att_case *c, att_result *r)
{
    float *probs = malloc((size_t)c->B * c->nh * c->T * c->T * sizeof(float));
    float *scratch = malloc((size_t)c->T * c->T * sizeof(float));
    if (!probs || !scratch) {
        check_true("host memory for the CPU backend's attention", 0);
        free(probs);
        free(scratch);
        return;
    }
    H->attention_forward(r->out, probs, c->q, c->k, c->v, c->B, c->T, c->nh, c->nkv, c->hd);
    H->attention_backward(r->dq, r->dk, r->dv, scratch, c->go, probs, c->q, c->k, c->v, c->B, c->T, c->nh, c->nkv, c->hd);
    free(probs);
    free(scratch);
}

/* Any NaN or infinity among x's n values: the error is then +inf (rel_err and fmax skip NaNs). */
static int all_finite(const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static double lse_err(const float *a, const float *b, int64_t n)
{
    if (!all_finite(a, n) || !all_finite(b, n)) return INFINITY;
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

static double max_abs(const float *x, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)x[i]));
    return m;
}

/* max |a − b| over max(max |b|, floor): a gradient's error against the scale of all three input
 * gradients, so one that is exactly 0 in the reference (dQ, dK at T = 1: one key, P = 1, dS = 0)
 * tolerates the rounding-sized values a path pair with bf16 scores gives (P = e^±ε). */
static double err_floor(const float *a, const float *b, int64_t n, double floor)
{
    if (!all_finite(a, n) || !all_finite(b, n)) return INFINITY;
    double num = 0;
    for (int64_t i = 0; i < n; i++) num = fmax(num, fabs((double)a[i] - b[i]));
    double den = fmax(max_abs(b, n), floor);
    return num / (den > 1e-30 ? den : 1e-30);
}

static void compare(const char *what, const att_case *c, const att_result *x, const att_result *ref, double tol,
                    int with_lse)
{
    char name[160];
    double gscale = fmax(max_abs(ref->dq, c->nq), fmax(max_abs(ref->dk, c->nk), max_abs(ref->dv, c->nk)));
#define CMP(field, n, t, floor)                                                                                  \
    do {                                                                                                         \
        snprintf(name, sizeof name, "%s " #field " B%d T%d nh%d nkv%d hd%d", what, c->B, c->T, c->nh, c->nkv, c->hd); \
        check_close(name, err_floor(x->field, ref->field, n, floor), t);                                           \
    } while (0)
    CMP(out, c->nq, tol, 0.0);
    CMP(dq, c->nq, 1.5 * tol, gscale);
    CMP(dk, c->nk, 1.5 * tol, gscale);
    CMP(dv, c->nk, 1.5 * tol, gscale);
#undef CMP
    if (with_lse) {
        snprintf(name, sizeof name, "%s lse (abs) T%d hd%d", what, c->T, c->hd);
        check_close(name, lse_err(x->lse, ref->lse, c->nl), 1.5 * tol);
    }
}

static void t_case(int B, int T, int nh, int nkv, int hd, int with_cpu)
{
    att_case c = {B, T, nh, nkv, hd, (int64_t)B * T * nh * hd, (int64_t)B * T * nkv * hd, (int64_t)B * nh * T, NULL,
                  NULL, NULL, NULL};
    uint64_t s = (uint64_t)T * 131 + hd * 7 + nkv;
    c.q = filled(c.nq, s + 1, 1.5f);
    c.k = filled(c.nk, s + 2, 1.0f);
    c.v = filled(c.nk, s + 3, 1.0f);
    c.go = filled(c.nq, s + 4, 1.0f);
    att_result fused, chunked, mixed1, mixed2;
    result_alloc(&c, &fused);
    result_alloc(&c, &chunked);
    result_alloc(&c, &mixed1);
    result_alloc(&c, &mixed2);
    double tf = run_gpu(&c, "fused", "fused", &fused);
    double tc = run_gpu(&c, "chunked", "chunked", &chunked);
    compare("fused vs chunked:", &c, &fused, &chunked, 2e-2, 1);
    /* the LSE contract: a forward by one path, the backward by the other */
    run_gpu(&c, "fused", "chunked", &mixed1);
    run_gpu(&c, "chunked", "fused", &mixed2);
    compare("fused fwd + chunked bwd vs chunked:", &c, &mixed1, &chunked, 2e-2, 0);
    compare("chunked fwd + fused bwd vs chunked:", &c, &mixed2, &chunked, 2e-2, 0);
    if (with_cpu) {
        att_result cpu;
        result_alloc(&c, &cpu);
        run_cpu(&c, &cpu);
        compare("chunked (fp32) vs CPU:", &c, &chunked, &cpu, 1e-5, 0);
        compare("fused vs CPU:", &c, &fused, &cpu, 2e-2, 0);
        result_free(&cpu);
    }
    /* deterministic: the fused backward again gives the same bits */
    run_gpu(&c, "fused", "fused", &mixed1);
    int same = memcmp(mixed1.dq, fused.dq, (size_t)c.nq * 4) == 0 && memcmp(mixed1.dk, fused.dk, (size_t)c.nk * 4) == 0 &&
               memcmp(mixed1.dv, fused.dv, (size_t)c.nk * 4) == 0 && memcmp(mixed1.out, fused.out, (size_t)c.nq * 4) == 0;
    char name[96];
    snprintf(name, sizeof name, "fused attention is bitwise deterministic (T%d hd%d)", T, hd);
    check_true(name, same);
    printf("#   T%d nh%d nkv%d hd%d B%d: fused %.2f ms, chunked %.2f ms (fwd+bwd, first calls, informational)\n", T,
           nh, nkv, hd, B, 1e3 * tf, 1e3 * tc);
    result_free(&fused);
    result_free(&chunked);
    result_free(&mixed1);
    result_free(&mixed2);
    G->free(c.q);
    G->free(c.k);
    G->free(c.v);
    G->free(c.go);
}

int main(void)
{
    gpu_require("test_attention", LNB_CUDA_MATH_FP32);
    G = lnb_cuda();
    H = lnb_cpu();
    /* which path runs */
    check_true("fp32 math: chunked by default", strcmp(lnb_cuda_attention_path(128), "chunked") == 0);
    lnb_cuda_set_math(LNB_CUDA_MATH_BF16);
    check_true("bf16 math, hd 128: fused", strcmp(lnb_cuda_attention_path(128), "fused") == 0);
    check_true("bf16 math, hd 64: fused", strcmp(lnb_cuda_attention_path(64), "fused") == 0);
    check_true("bf16 math, hd 96: chunked (no fused kernel for it)", strcmp(lnb_cuda_attention_path(96), "chunked") == 0);
    setenv("LORANULL_CUDA_ATTN", "chunked", 1);
    check_true("LORANULL_CUDA_ATTN=chunked forces the fallback", strcmp(lnb_cuda_attention_path(128), "chunked") == 0);
    unsetenv("LORANULL_CUDA_ATTN");
    lnb_cuda_set_math(LNB_CUDA_MATH_FP32);

    t_case(2, 1, 4, 4, 64, 1);
    t_case(2, 37, 8, 2, 64, 1);
    t_case(1, 64, 4, 1, 128, 1);
    t_case(2, 100, 8, 1, 64, 1);
    t_case(2, 130, 8, 2, 128, 1);
    t_case(1, 257, 8, 4, 128, 1);
    /* LLaMA-3-8B's attention: fused vs chunked only (not under the host emulation of
     * tests/reference/test_cuda_emu.py, LORANULL_EMU=1: hours of fibers there) */
    if (getenv("LORANULL_EMU")) printf("#   T2048 case skipped under the host emulation (LORANULL_EMU)\n");
    else t_case(1, 2048, 32, 8, 128, 0);
    return gpu_done();
}
