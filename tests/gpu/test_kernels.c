/* Every CUDA backend kernel against the CPU backend (the reference) on the same random inputs,
 * in fp32 math (tight tolerances), plus the bf16 tensor-core GEMM (loose tolerance), the
 * attention over several query chunks, and bitwise determinism of the reductions. */
#include <stdint.h>

#include "tests/gpu/gpu_check.h"
#include "worker/backend/backend.h"

static uint64_t rs = 12345;
static float frand(void)
{
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rs >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}
static float *hrand(int64_t n, float sc)
{
    float *p = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) p[i] = sc * frand();
    return p;
}
static float *hcopy(const float *x, int64_t n)
{
    float *p = malloc((size_t)n * sizeof(float));
    memcpy(p, x, (size_t)n * sizeof(float));
    return p;
}

static const lnb_backend *G, *H;

/* A device copy of host data. */
static float *dcopy(const float *h, int64_t n)
{
    float *d = G->alloc((size_t)n * sizeof(float));
    G->upload(d, h, (size_t)n * sizeof(float));
    return d;
}
/* err of device buffer d against host reference h */
static double derr(const float *d, const float *h, int64_t n)
{
    float *t = malloc((size_t)n * sizeof(float));
    G->download(t, d, (size_t)n * sizeof(float));
    double r = rel_err(t, h, n);
    free(t);
    return r;
}

static void t_matmul(void)
{
    int M = 67, N = 45, K = 129;
    for (int tA = 0; tA < 2; tA++)
        for (int tB = 0; tB < 2; tB++) {
            int lda = tA ? M : K, ldb = tB ? K : N;
            float *A = hrand((int64_t)M * K, 1), *B = hrand((int64_t)K * N, 1), *C = hrand((int64_t)M * N, 1);
            float *dA = dcopy(A, (int64_t)M * K), *dB = dcopy(B, (int64_t)K * N), *dC = dcopy(C, (int64_t)M * N);
            H->matmul(tA, tB, M, N, K, 0.7f, A, lda, B, ldb, 0.3f, C, N);
            G->matmul(tA, tB, M, N, K, 0.7f, dA, lda, dB, ldb, 0.3f, dC, N);
            char name[64];
            snprintf(name, sizeof name, "matmul tA=%d tB=%d (fp32)", tA, tB);
            check_close(name, derr(dC, C, (int64_t)M * N), 1e-5);
            /* the same product on bf16 tensor cores (8 mantissa bits in the inputs) */
            lnb_cuda_set_math(LNB_CUDA_MATH_BF16);
            float *C2 = hrand((int64_t)M * N, 0);
            float *dC2 = dcopy(C2, (int64_t)M * N);
            H->matmul(tA, tB, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, C2, N);
            G->matmul(tA, tB, M, N, K, 1.0f, dA, lda, dB, ldb, 0.0f, dC2, N);
            snprintf(name, sizeof name, "matmul tA=%d tB=%d (bf16 tensor cores)", tA, tB);
            check_close(name, derr(dC2, C2, (int64_t)M * N), 2e-2);
            lnb_cuda_set_math(LNB_CUDA_MATH_FP32);
            G->free(dA); G->free(dB); G->free(dC); G->free(dC2);
            free(A); free(B); free(C); free(C2);
        }
    /* K = 0 still applies beta */
    float C[6] = {1, 2, 3, 4, 5, 6}, *dC = dcopy(C, 6);
    G->matmul(0, 0, 2, 3, 0, 1.0f, dC, 3, dC, 3, 2.0f, dC, 3);
    float want[6] = {2, 4, 6, 8, 10, 12};
    check_close("matmul K=0 scales C by beta", derr(dC, want, 6), 0);
    G->free(dC);
}

/* A registered bf16 weight: both GEMM directions the engine uses (x Wᵀ and dy W) on bf16 tensor
 * cores against the fp32 CPU product; after unregistering, the fp32 path again. */
static void t_bf16_weights(void)
{
    int N = 70, dout = 96, din = 160;
    float *W = hrand((int64_t)dout * din, 0.05f), *x = hrand((int64_t)N * din, 1), *dy = hrand((int64_t)N * dout, 1);
    float *dW = dcopy(W, (int64_t)dout * din), *dx = dcopy(x, (int64_t)N * din), *ddy = dcopy(dy, (int64_t)N * dout);
    float *y = hrand((int64_t)N * dout, 0), *g = hrand((int64_t)N * din, 0);
    float *dyo = dcopy(y, (int64_t)N * dout), *dg = dcopy(g, (int64_t)N * din);
    ln_err e = {{0}};
    lnb_cuda_set_math(LNB_CUDA_MATH_BF16);
    check_true("register a weight for bf16 GEMMs", lnb_cuda_register_bf16(dW, (int64_t)dout * din, &e) == 0);
    H->matmul(0, 1, N, dout, din, 1.0f, x, din, W, din, 0.0f, y, dout);
    G->matmul(0, 1, N, dout, din, 1.0f, dx, din, dW, din, 0.0f, dyo, dout);
    check_close("bf16 weight: y = x W^T", derr(dyo, y, (int64_t)N * dout), 2e-2);
    H->matmul(0, 0, N, din, dout, 1.0f, dy, dout, W, din, 0.0f, g, din);
    G->matmul(0, 0, N, din, dout, 1.0f, ddy, dout, dW, din, 0.0f, dg, din);
    check_close("bf16 weight: dx = dy W", derr(dg, g, (int64_t)N * din), 2e-2);
    lnb_cuda_unregister(dW);
    lnb_cuda_set_math(LNB_CUDA_MATH_FP32);
    G->matmul(0, 0, N, din, dout, 1.0f, ddy, dout, dW, din, 0.0f, dg, din);
    check_close("after unregistering: fp32 again", derr(dg, g, (int64_t)N * din), 1e-5);
    G->free(dW); G->free(dx); G->free(ddy); G->free(dyo); G->free(dg);
    free(W); free(x); free(dy); free(y); free(g);
}

static void t_elementwise(void)
{
    int64_t n = 100003;
    float *x = hrand(n, 1), *y = hrand(n, 1), *dx = dcopy(x, n), *dy = dcopy(y, n);
    H->axpy(n, 0.25f, x, y);
    G->axpy(n, 0.25f, dx, dy);
    check_close("axpy (FMA on the GPU: 1 ulp)", derr(dy, y, n), 2e-7);
    H->scale(n, -1.5f, y);
    G->scale(n, -1.5f, dy);
    check_close("scale", derr(dy, y, n), 1e-7);
    double a = H->sumsq(y, n), b = G->sumsq(dy, n), b2 = G->sumsq(dy, n);
    check_close("sumsq (double accumulation)", fabs(a - b) / a, 1e-12);
    check_true("sumsq is bitwise deterministic", memcmp(&b, &b2, sizeof b) == 0);
    /* several tensors in one wait (the optimizer's gradient norm): the bits of one sumsq each,
     * an empty tensor 0, a non-finite value non-finite */
    float z[1000];
    memcpy(z, x, sizeof z);
    z[999] = NAN;
    float *dz = dcopy(z, 1000);
    const float *xs[4] = {dy, dx, dy, dz};
    int64_t ns[4] = {n, 7, 0, 1000};
    double sums[4] = {-1, -1, -1, -1};
    check_true("sumsq_many is in the CUDA table", G->sumsq_many != NULL);
    if (G->sumsq_many) {
        check_true("sumsq_many returns 0", G->sumsq_many(4, xs, ns, sums) == 0);
        double s1 = G->sumsq(dx, 7);
        check_true("sumsq_many = sumsq each, bitwise", memcmp(&sums[0], &b, sizeof b) == 0 &&
                                                          memcmp(&sums[1], &s1, sizeof s1) == 0);
        check_true("sumsq_many: an empty tensor sums to 0", sums[2] == 0.0);
        check_true("sumsq_many: a NaN makes its sum non-finite", !isfinite(sums[3]));
    }
    G->free(dz);
    G->free(dx); G->free(dy); free(x); free(y);
}

static void t_embedding(void)
{
    int V = 300, C = 96, N = 77;
    int32_t ids[77];
    for (int i = 0; i < N; i++) ids[i] = (int32_t)((i * 37) % 50); /* repeats: rows share ids */
    float *tab = hrand((int64_t)V * C, 1), *dtab = dcopy(tab, (int64_t)V * C);
    float *out = hrand((int64_t)N * C, 0), *dout_ = dcopy(out, (int64_t)N * C);
    H->embedding_forward(out, ids, tab, N, C);
    G->embedding_forward(dout_, ids, dtab, N, C); /* ids from host memory: staged by the backend */
    check_close("embedding_forward", derr(dout_, out, (int64_t)N * C), 0);
    float *g = hrand((int64_t)N * C, 1), *dg = dcopy(g, (int64_t)N * C);
    float *gt = hrand((int64_t)V * C, 1), *dgt = dcopy(gt, (int64_t)V * C);
    H->embedding_backward(gt, g, ids, N, C);
    G->embedding_backward(dgt, dg, ids, N, C);
    check_close("embedding_backward (accumulates, repeated ids)", derr(dgt, gt, (int64_t)V * C), 1e-6);
}

static void t_rmsnorm(void)
{
    int N = 33, C = 1000;
    float *x = hrand((int64_t)N * C, 2), *w = hrand(C, 1), *dx_ = dcopy(x, (int64_t)N * C), *dw_ = dcopy(w, C);
    float *o = hrand((int64_t)N * C, 0), *r = hrand(N, 0), *dO = dcopy(o, (int64_t)N * C), *dr = dcopy(r, N);
    H->rmsnorm_forward(o, r, x, w, N, C, 1e-5f);
    G->rmsnorm_forward(dO, dr, dx_, dw_, N, C, 1e-5f);
    check_close("rmsnorm_forward out", derr(dO, o, (int64_t)N * C), 1e-5);
    check_close("rmsnorm_forward rstd", derr(dr, r, N), 1e-5);
    float *dy = hrand((int64_t)N * C, 1), *ddy = dcopy(dy, (int64_t)N * C);
    float *gx = hrand((int64_t)N * C, 1), *dgx = dcopy(gx, (int64_t)N * C);
    float *gw = hrand(C, 1), *dgw = dcopy(gw, C);
    H->rmsnorm_backward(gx, gw, dy, x, w, r, N, C);
    G->rmsnorm_backward(dgx, dgw, ddy, dx_, dw_, dr, N, C);
    check_close("rmsnorm_backward dx (accumulates)", derr(dgx, gx, (int64_t)N * C), 1e-5);
    check_close("rmsnorm_backward dw (accumulates)", derr(dgw, gw, C), 1e-5);
}

static void t_rope(void)
{
    int B = 2, T = 19, nh = 4, hd = 64, N = B * T, h = hd / 2;
    float *cs = malloc((size_t)T * h * sizeof(float)), *sn = malloc((size_t)T * h * sizeof(float));
    for (int t = 0; t < T; t++)
        for (int i = 0; i < h; i++) {
            float a = t * powf(10000.0f, -2.0f * i / hd);
            cs[t * h + i] = cosf(a);
            sn[t * h + i] = sinf(a);
        }
    int64_t n = (int64_t)N * nh * hd;
    float *x = hrand(n, 1), *dx = dcopy(x, n);
    H->rope_forward(x, cs, sn, N, T, nh, hd);
    G->rope_forward(dx, cs, sn, N, T, nh, hd); /* host cos/sin tables, staged */
    check_close("rope_forward", derr(dx, x, n), 1e-6);
    H->rope_backward(x, cs, sn, N, T, nh, hd);
    G->rope_backward(dx, cs, sn, N, T, nh, hd);
    check_close("rope_backward", derr(dx, x, n), 1e-6);
}

static void t_attention(int B, int T, int nh, int nkv, int hd, const char *chunk)
{
    if (chunk) setenv("LORANULL_CUDA_ATTN_CHUNK", chunk, 1);
    else unsetenv("LORANULL_CUDA_ATTN_CHUNK");
    int64_t nq = (int64_t)B * T * nh * hd, nk = (int64_t)B * T * nkv * hd;
    float *q = hrand(nq, 1), *k = hrand(nk, 1), *v = hrand(nk, 1);
    float *dq_ = dcopy(q, nq), *dk_ = dcopy(k, nk), *dv_ = dcopy(v, nk);
    float *out = hrand(nq, 0), *dout_ = dcopy(out, nq);
    float *probs = malloc((size_t)B * nh * T * T * sizeof(float));
    float *lse = G->alloc((size_t)B * nh * T * sizeof(float)); /* rows only: what the CUDA backend keeps */
    H->attention_forward(out, probs, q, k, v, B, T, nh, nkv, hd);
    G->attention_forward(dout_, lse, dq_, dk_, dv_, B, T, nh, nkv, hd);
    char name[96];
    snprintf(name, sizeof name, "attention_forward B%d T%d nh%d nkv%d hd%d chunk %s", B, T, nh, nkv, hd, chunk ? chunk : "auto");
    check_close(name, derr(dout_, out, nq), 1e-5);
    float *go = hrand(nq, 1), *dgo = dcopy(go, nq);
    float *gq = hrand(nq, 0), *gk = hrand(nk, 0), *gv = hrand(nk, 0);
    float *dgq = dcopy(gq, nq), *dgk = dcopy(gk, nk), *dgv = dcopy(gv, nk);
    float *scratch = malloc((size_t)T * T * sizeof(float));
    H->attention_backward(gq, gk, gv, scratch, go, probs, q, k, v, B, T, nh, nkv, hd);
    G->attention_backward(dgq, dgk, dgv, NULL, dgo, lse, dq_, dk_, dv_, B, T, nh, nkv, hd);
    snprintf(name, sizeof name, "attention_backward dq (T%d, chunk %s)", T, chunk ? chunk : "auto");
    check_close(name, derr(dgq, gq, nq), 1e-5);
    snprintf(name, sizeof name, "attention_backward dk (GQA heads summed)");
    check_close(name, derr(dgk, gk, nk), 1e-5);
    snprintf(name, sizeof name, "attention_backward dv (GQA heads summed)");
    check_close(name, derr(dgv, gv, nk), 1e-5);
    free(q); free(k); free(v); free(out); free(probs); free(go); free(gq); free(gk); free(gv); free(scratch);
    G->free(dq_); G->free(dk_); G->free(dv_); G->free(dout_); G->free(lse); G->free(dgo);
    G->free(dgq); G->free(dgk); G->free(dgv);
    unsetenv("LORANULL_CUDA_ATTN_CHUNK");
}

static void t_swiglu(void)
{
    int64_t n = 54321;
    float *g = hrand(n, 4), *u = hrand(n, 2), *dg_ = dcopy(g, n), *du_ = dcopy(u, n);
    float *o = hrand(n, 0), *dO = dcopy(o, n);
    H->swiglu_forward(o, g, u, n);
    G->swiglu_forward(dO, dg_, du_, n);
    check_close("swiglu_forward", derr(dO, o, n), 1e-6);
    float *dy = hrand(n, 1), *ddy = dcopy(dy, n), *a = hrand(n, 0), *b = hrand(n, 0), *da = dcopy(a, n), *db = dcopy(b, n);
    H->swiglu_backward(a, b, dy, g, u, n);
    G->swiglu_backward(da, db, ddy, dg_, du_, n);
    check_close("swiglu_backward dgate", derr(da, a, n), 1e-6);
    check_close("swiglu_backward dup", derr(db, b, n), 1e-6);
}

static void t_cross_entropy(void)
{
    int N = 24, V = 128256; /* LLaMA 3's vocabulary */
    int64_t n = (int64_t)N * V;
    float *z = hrand(n, 6), *dz = dcopy(z, n);
    int32_t tg[24];
    for (int i = 0; i < N; i++) tg[i] = i % 5 == 2 ? -100 : (int32_t)((i * 7919) % V);
    double a = H->cross_entropy(z, NULL, tg, N, V, 0), b = G->cross_entropy(dz, NULL, tg, N, V, 0);
    check_close("cross_entropy loss, V=128256, masked rows", fabs(a - b) / a, 1e-6);
    float *zc = hcopy(z, n);
    double a2 = H->cross_entropy(zc, zc, tg, N, V, 0.125f), b2 = G->cross_entropy(dz, dz, tg, N, V, 0.125f);
    check_close("cross_entropy fused gradient, in place", derr(dz, zc, n), 1e-6);
    check_close("cross_entropy loss with gradient", fabs(a2 - b2) / a2, 1e-6);
    float *dz2 = dcopy(z, n);
    double b3 = G->cross_entropy(dz2, NULL, tg, N, V, 0);
    check_true("cross_entropy is bitwise deterministic", memcmp(&b, &b3, sizeof b) == 0);
    free(z); free(zc); G->free(dz); G->free(dz2);
}

static void t_adamw(void)
{
    int64_t n = 70001;
    float *p = hrand(n, 1), *g = hrand(n, 1), *m = hrand(n, 0.1f), *v = hrand(n, 0);
    for (int64_t i = 0; i < n; i++) v[i] = fabsf(v[i]) + 0.01f;
    float *dp = dcopy(p, n), *dg = dcopy(g, n), *dm = dcopy(m, n), *dv = dcopy(v, n);
    for (int s = 1; s <= 3; s++) {
        float bc1 = 1 - powf(0.9f, s), bc2 = 1 - powf(0.999f, s);
        H->adamw(p, g, m, v, n, 0.5f, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, bc1, bc2);
        G->adamw(dp, dg, dm, dv, n, 0.5f, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, bc1, bc2);
    }
    check_close("adamw params after 3 steps", derr(dp, p, n), 1e-6);
    check_close("adamw first moment", derr(dm, m, n), 1e-6);
    check_close("adamw second moment", derr(dv, v, n), 1e-6);
}

int main(void)
{
    gpu_require("test_kernels", LNB_CUDA_MATH_FP32);
    G = lnb_cuda();
    H = lnb_cpu();
    t_matmul();
    t_bf16_weights();
    check_cuda("matmul");
    t_elementwise();
    t_embedding();
    t_rmsnorm();
    t_rope();
    check_cuda("norm/rope");
    t_attention(2, 37, 4, 2, 64, NULL);
    t_attention(1, 150, 8, 2, 32, "16");   /* 10 query chunks, the last one short */
    t_attention(2, 64, 4, 4, 128, "24");   /* MHA, hd 128 */
    t_attention(1, 1, 2, 1, 8, NULL);      /* a single token */
    check_cuda("attention");
    t_swiglu();
    t_cross_entropy();
    t_adamw();
    check_cuda("all kernels");
    return gpu_done();
}
