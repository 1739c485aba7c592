/* cpu.c — the CPU backend: OpenBLAS sgemm for every matrix product, OpenMP loops for the rest.
 *
 * This is the readable reference that other backends are tested against. Shapes follow the
 * contract in worker/backend/backend.h.
 *
 * Threads: one pool, OpenMP's. OpenBLAS (Debian's pthread build) is switched to one thread and
 * every large product is split into row (or column) blocks, one sgemm per OpenMP thread. Two
 * pools — OpenBLAS's threads spinning after each sgemm and OpenMP's after each loop — fight over
 * the cores; measured on 2 cores that cost 3-4× in training throughput. The split is fixed by
 * the thread count, so results stay bit-identical run to run. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/backend/backend.h"

/* ---------------------------------------------------------------- exp */

/* Floating-point exceptions are never inspected here; without this GCC will not if-convert the
 * clamps below and the exp loops stay scalar. */
#pragma GCC optimize("no-trapping-math")

/* e^x in a form the compiler vectorises (glibc's expf is a call per element): x = n·ln2 + r with
 * |r| ≤ ln2/2, e^r from Cephes' expf polynomial (≈ 1 ulp), 2^n put straight into the exponent bits.
 * n is rounded with the 1.5·2²³ trick (no libm call). Inputs are clamped to [−87, 88], where e^x
 * is a normal float. */
static inline __attribute__((always_inline)) float cpu_expf(float x)
{
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f; /* ln2 split in two for exactness */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* ---------------------------------------------------------------- memory */

static void *cpu_alloc(size_t bytes)
{
    size_t n = (bytes + 63) & ~(size_t)63;
    if (n == 0) n = 64;
    void *p = aligned_alloc(64, n);
    if (p) memset(p, 0, n);
    return p;
}
static void cpu_free(void *p) { free(p); }
static void cpu_move(void *dst, const void *src, size_t bytes) { if (bytes) memmove(dst, src, bytes); }
static void cpu_zero(float *x, int64_t n) { memset(x, 0, (size_t)n * sizeof(float)); }
static void cpu_copy(float *dst, const float *src, int64_t n) { if (n) memmove(dst, src, (size_t)n * sizeof(float)); }

/* ---------------------------------------------------------------- BLAS-like */

/* One sgemm on the calling thread. */
static void sgemm1(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                   int ldb, float beta, float *C, int ldc)
{
    if (M <= 0 || N <= 0) return;
    if (K == 0) { /* sgemm with K = 0 must still apply beta */
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++)
                C[(int64_t)i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[(int64_t)i * ldc + j];
        return;
    }
    cblas_sgemm(CblasRowMajor, tA ? CblasTrans : CblasNoTrans, tB ? CblasTrans : CblasNoTrans, M, N, K, alpha, A,
                lda, B, ldb, beta, C, ldc);
}

/* Products below this many FLOPs run on one thread: a fork/join costs more than it saves. */
#ifndef LNB_SPLIT_MIN_FLOPS
#define LNB_SPLIT_MIN_FLOPS 4e6
#endif

static void blas_single_threaded(void)
{
    static int done;
    if (!done) {
        openblas_set_num_threads(1);
        done = 1;
    }
}

/* C = alpha op(A) op(B) + beta C, split over OpenMP threads: by rows of C when M ≥ N (rows of
 * op(A) start at A + i0 (transposed) or A + i0·lda), else by columns (op(B) columns start at
 * B + j0·ldb (transposed) or B + j0). Blocks are multiples of 16 so kernels stay aligned. */
static void cpu_matmul(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float beta, float *C, int ldc)
{
    blas_single_threaded();
    int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
    if (nt <= 1 || 2.0 * M * N * K < LNB_SPLIT_MIN_FLOPS || (M < 32 && N < 32)) {
        sgemm1(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    int by_rows = M >= N;
    int len = by_rows ? M : N;
    int chunk = ((len + nt - 1) / nt + 15) / 16 * 16;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), s0 = t * chunk, n = len - s0 < chunk ? len - s0 : chunk;
        if (n > 0) {
            if (by_rows)
                sgemm1(tA, tB, n, N, K, alpha, tA ? A + s0 : A + (int64_t)s0 * lda, lda, B, ldb, beta,
                       C + (int64_t)s0 * ldc, ldc);
            else
                sgemm1(tA, tB, M, n, K, alpha, A, lda, tB ? B + (int64_t)s0 * ldb : B + s0, ldb, beta, C + s0, ldc);
        }
    }
}

static void cpu_axpy(int64_t n, float a, const float *x, float *y)
{
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void cpu_scale(int64_t n, float a, float *x)
{
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; i++) x[i] *= a;
}

/* Partial sums on the stack, this many at a time (no allocation: a kernel cannot fail). */
#define CPU_PARTS 1024

/* Summed in fixed-size blocks so the result does not depend on the thread count: the blocks' sums
 * go into the total in block order, CPU_PARTS blocks at a time. */
static double cpu_sumsq(const float *x, int64_t n)
{
    const int64_t blk = 4096;
    int64_t nb = (n + blk - 1) / blk;
    double total = 0.0, part[CPU_PARTS];
    for (int64_t b0 = 0; b0 < nb; b0 += CPU_PARTS) {
        int64_t np = nb - b0 < CPU_PARTS ? nb - b0 : CPU_PARTS;
#pragma omp parallel for schedule(static) if (np > 16)
        for (int64_t j = 0; j < np; j++) {
            double s = 0.0;
            int64_t b = b0 + j, e = (b + 1) * blk < n ? (b + 1) * blk : n;
            for (int64_t i = b * blk; i < e; i++) s += (double)x[i] * x[i];
            part[j] = s;
        }
        for (int64_t j = 0; j < np; j++) total += part[j];
    }
    return total;
}

/* ---------------------------------------------------------------- embedding */

/* ids (N), table (V,C) -> out (N,C) */
static void cpu_embedding_forward(float *out, const int32_t *ids, const float *table, int N, int C)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        memcpy(out + (int64_t)n * C, table + (int64_t)ids[n] * C, (size_t)C * sizeof(float));
}

/* Serial over rows: two rows may share an id, and a fixed order keeps the sum deterministic. */
static void cpu_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int N, int C)
{
    for (int n = 0; n < N; n++) {
        float *d = dtable + (int64_t)ids[n] * C;
        const float *g = dout + (int64_t)n * C;
        for (int c = 0; c < C; c++) d[c] += g[c];
    }
}

/* ---------------------------------------------------------------- RMSNorm */

/* x (N,C), w (C) -> out (N,C), rstd (N): out = w ⊙ x·r, r = 1/sqrt(mean(x²) + eps) */
static void cpu_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C, float eps)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (int64_t)n * C;
        float *o = out + (int64_t)n * C;
        float ss = 0.0f;
        for (int c = 0; c < C; c++) ss += xr[c] * xr[c];
        float r = 1.0f / sqrtf(ss / (float)C + eps);
        rstd[n] = r;
        for (int c = 0; c < C; c++) o[c] = w[c] * (xr[c] * r);
    }
}

/* y_c = w_c x_c r, r = (Σx²/C + eps)^-½, ∂r/∂x_j = −r³ x_j / C
 * dx_j += r w_j dy_j − (r³/C) x_j Σ_c w_c dy_c x_c
 * dw_c += Σ_n dy_c x_c r */
static void cpu_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                                 const float *rstd, int N, int C)
{
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (int64_t)n * C, *dy = dout + (int64_t)n * C;
        float *d = dx + (int64_t)n * C;
        float r = rstd[n], dot = 0.0f;
        for (int c = 0; c < C; c++) dot += w[c] * dy[c] * xr[c];
        float k = r * r * r * dot / (float)C;
        for (int c = 0; c < C; c++) d[c] += r * w[c] * dy[c] - k * xr[c];
    }
    if (dw) {
        /* Column sums in row order: deterministic regardless of threads (split by columns). */
#pragma omp parallel for schedule(static)
        for (int c = 0; c < C; c++) {
            float s = 0.0f;
            for (int n = 0; n < N; n++) s += dout[(int64_t)n * C + c] * x[(int64_t)n * C + c] * rstd[n];
            dw[c] += s;
        }
    }
}

/* ---------------------------------------------------------------- RoPE */

/* HF rotate_half: for i < h = hd/2,
 *   out_i   = x_i c_i − x_{i+h} s_i
 *   out_i+h = x_{i+h} c_i + x_i s_i
 * sgn = −1 applies the inverse rotation (the backward, since a rotation's transpose is its inverse). */
static void rope_apply(float *x, const float *cos, const float *sin, int N, int T, int nh, int hd, float sgn)
{
    int h = hd / 2;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *c = cos + (int64_t)(n % T) * h, *s = sin + (int64_t)(n % T) * h;
        for (int head = 0; head < nh; head++) {
            float *v = x + ((int64_t)n * nh + head) * hd;
            for (int i = 0; i < h; i++) {
                float a = v[i], b = v[i + h], si = sgn * s[i];
                v[i] = a * c[i] - b * si;
                v[i + h] = b * c[i] + a * si;
            }
        }
    }
}
static void cpu_rope_forward(float *x, const float *cos, const float *sin, int N, int T, int nh, int hd)
{
    rope_apply(x, cos, sin, N, T, nh, hd, 1.0f);
}
static void cpu_rope_backward(float *dx, const float *cos, const float *sin, int N, int T, int nh, int hd)
{
    rope_apply(dx, cos, sin, N, T, nh, hd, -1.0f);
}

/* ---------------------------------------------------------------- attention */

/* Row t of a (T,T) score matrix: causal softmax over keys 0..t, zeros after. */
static void softmax_causal_row(float *row, int t, int T)
{
    float mx = row[0];
    for (int j = 1; j <= t; j++) mx = row[j] > mx ? row[j] : mx;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j <= t; j++) { row[j] = cpu_expf(row[j] - mx); sum += row[j]; }
    float inv = 1.0f / sum;
    for (int j = 0; j <= t; j++) row[j] *= inv;
    for (int j = t + 1; j < T; j++) row[j] = 0.0f;
}

/* Queries go in blocks of ATT_QB rows: block [q0, q0+nq) only needs keys [0, q0+nq), so the
 * masked upper triangle is (mostly) never computed — ~40% fewer attention FLOPs at T = 256. */
#define ATT_QB 64

/* Per (batch b, head h), with g = h / (nh/nkv), Q (T,hd) rows strided by nh·hd, K,V by nkv·hd:
 *   S = Q Kᵀ / √hd ; P = softmax(S + causal mask) ; O = P V
 * One (b, h) per OpenMP iteration, each with single-threaded sgemms. */
static void cpu_attention_forward(float *out, float *probs, const float *q, const float *k, const float *v,
                                  int B, int T, int nh, int nkv, int hd)
{
    blas_single_threaded();
    int grp = nh / nkv, qs = nh * hd, ks = nkv * hd;
    float sc = 1.0f / sqrtf((float)hd);
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < B * nh; bh++) {
        int b = bh / nh, h = bh % nh;
        const float *Q = q + (int64_t)b * T * qs + h * hd;
        const float *K = k + (int64_t)b * T * ks + (h / grp) * hd;
        const float *Vv = v + (int64_t)b * T * ks + (h / grp) * hd;
        float *P = probs + (int64_t)bh * T * T, *O = out + (int64_t)b * T * qs + h * hd;
        for (int q0 = 0; q0 < T; q0 += ATT_QB) {
            int nq = T - q0 < ATT_QB ? T - q0 : ATT_QB, kend = q0 + nq;
            sgemm1(0, 1, nq, kend, hd, sc, Q + (int64_t)q0 * qs, qs, K, ks, 0.0f, P + (int64_t)q0 * T, T);
            for (int t = q0; t < kend; t++) softmax_causal_row(P + (int64_t)t * T, t, T);
            sgemm1(0, 0, nq, hd, kend, 1.0f, P + (int64_t)q0 * T, T, Vv, ks, 0.0f, O + (int64_t)q0 * qs, qs);
        }
    }
}

/* dV += Pᵀ dO ; dP = dO Vᵀ ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) ; dQ = dS K /√hd ; dK += dSᵀ Q /√hd
 * (by query blocks as the forward). One (batch, kv head) per OpenMP iteration: the query heads of
 * a group add into the same dK, dV, so they run in order inside one iteration (no races, a fixed
 * summation order). */
/* One (batch b, kv head g) of the backward: its query heads in order, dS a (qb, T) block. */
static void att_bwd_group(float *dq, float *dk, float *dv, float *dS, const float *dout, const float *probs,
                          const float *q, const float *k, const float *v, int b, int g, int T, int nh, int nkv, int hd)
{
    int grp = nh / nkv, qs = nh * hd, ks = nkv * hd;
    float sc = 1.0f / sqrtf((float)hd);
    int64_t ko = (int64_t)b * T * ks + g * hd;
    for (int i = 0; i < T; i++) {
        memset(dk + ko + (int64_t)i * ks, 0, (size_t)hd * sizeof(float));
        memset(dv + ko + (int64_t)i * ks, 0, (size_t)hd * sizeof(float));
    }
    for (int h = g * grp; h < (g + 1) * grp; h++) {
        int64_t qo = (int64_t)b * T * qs + h * hd;
        const float *P = probs + ((int64_t)b * nh + h) * T * T;
        for (int q0 = 0; q0 < T; q0 += ATT_QB) {
            int nq = T - q0 < ATT_QB ? T - q0 : ATT_QB, kend = q0 + nq;
            const float *Pb = P + (int64_t)q0 * T, *dOb = dout + qo + (int64_t)q0 * qs;
            sgemm1(1, 0, kend, hd, nq, 1.0f, Pb, T, dOb, qs, 1.0f, dv + ko, ks);
            sgemm1(0, 1, nq, kend, hd, 1.0f, dOb, qs, v + ko, ks, 0.0f, dS, T);
            for (int t = q0; t < kend; t++) {
                const float *p = P + (int64_t)t * T;
                float *d = dS + (int64_t)(t - q0) * T;
                float dot = 0.0f;
                for (int j = 0; j <= t; j++) dot += d[j] * p[j];
                for (int j = 0; j <= t; j++) d[j] = p[j] * (d[j] - dot);
                for (int j = t + 1; j < kend; j++) d[j] = 0.0f;
            }
            sgemm1(0, 0, nq, hd, kend, sc, dS, T, k + ko, ks, 0.0f, dq + qo + (int64_t)q0 * qs, qs);
            sgemm1(1, 0, kend, hd, nq, sc, dS, T, q + qo + (int64_t)q0 * qs, qs, 1.0f, dk + ko, ks);
        }
    }
}

static void cpu_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                                   const float *probs, const float *q, const float *k, const float *v, int B, int T,
                                   int nh, int nkv, int hd)
{
    blas_single_threaded();
    int qb = T < ATT_QB ? T : ATT_QB;
#pragma omp parallel
    {
        /* each thread's (nq, kend) block, row stride T; a thread that cannot get one (out of
         * memory) works in the caller's (T, T) scratch instead, one such thread at a time — the
         * same arithmetic, so the same bits, and the kernel cannot fail */
        float *dS = malloc((size_t)qb * T * sizeof(float));
#pragma omp for schedule(static)
        for (int bg = 0; bg < B * nkv; bg++) {
            if (dS) {
                att_bwd_group(dq, dk, dv, dS, dout, probs, q, k, v, bg / nkv, bg % nkv, T, nh, nkv, hd);
            } else {
#pragma omp critical(cpu_attention_scratch)
                att_bwd_group(dq, dk, dv, scratch, dout, probs, q, k, v, bg / nkv, bg % nkv, T, nh, nkv, hd);
            }
        }
        free(dS);
    }
}

/* ---------------------------------------------------------------- SwiGLU */

static void cpu_swiglu_forward(float *out, const float *gate, const float *up, int64_t n)
{
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + cpu_expf(-g)) * up[i];
    }
}

/* m = g σ(g) u ; ∂m/∂g = u σ(g) (1 + g (1 − σ(g))) ; ∂m/∂u = g σ(g) */
static void cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                                const float *up, int64_t n)
{
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i], s = 1.0f / (1.0f + cpu_expf(-g));
        dgate[i] = dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] = dout[i] * g * s;
    }
}

/* ---------------------------------------------------------------- loss */

/* loss_n = logsumexp(z_n) − z_n[y_n] ; dz_n = dscale · (softmax(z_n) − onehot(y_n)) */
/* One row's loss (0 where masked); d (may alias z, or NULL) receives its gradient. */
static double ce_row(const float *z, float *d, int y, int V, float dscale)
{
    if (y < 0) {
        if (d) memset(d, 0, (size_t)V * sizeof(float));
        return 0.0;
    }
    float mx = z[0];
#pragma omp simd reduction(max : mx)
    for (int j = 1; j < V; j++) mx = z[j] > mx ? z[j] : mx;
    double zy = (double)z[y] - mx;
    double sum = 0.0; /* double: vocabularies of 128k terms keep full fp32 accuracy */
    if (d) { /* one exp pass: keep e^(z−max) in d, then scale it (d may alias z; zy is saved) */
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < V; j++) { d[j] = cpu_expf(z[j] - mx); sum += d[j]; }
        float k = (float)(dscale / sum);
#pragma omp simd
        for (int j = 0; j < V; j++) d[j] *= k;
        d[y] -= dscale;
    } else {
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < V; j++) sum += cpu_expf(z[j] - mx);
    }
    return log(sum) - zy;
}

static double cpu_cross_entropy(const float *logits, float *dlogits, const int32_t *targets, int N, int V,
                                float dscale)
{
    double total = 0.0, rowloss[CPU_PARTS]; /* CPU_PARTS rows at a time, on the stack */
    for (int n0 = 0; n0 < N; n0 += CPU_PARTS) {
        int nr = N - n0 < CPU_PARTS ? N - n0 : CPU_PARTS;
#pragma omp parallel for schedule(static)
        for (int n = n0; n < n0 + nr; n++)
            rowloss[n - n0] = ce_row(logits + (int64_t)n * V, dlogits ? dlogits + (int64_t)n * V : NULL, targets[n], V,
                                     dscale);
        for (int j = 0; j < nr; j++) total += rowloss[j]; /* in row order: deterministic */
    }
    return total;
}

/* ---------------------------------------------------------------- AdamW */

static void cpu_adamw(float *p, const float *g, float *m, float *v, int64_t n, float gscale, float lr,
                      float beta1, float beta2, float eps, float wd, float bc1, float bc2)
{
    float step = lr / bc1, sbc2 = sqrtf(bc2);
#pragma omp parallel for schedule(static) if (n > 16384)
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] * gscale;
        p[i] *= 1.0f - lr * wd;
        m[i] = beta1 * m[i] + (1.0f - beta1) * gi;
        v[i] = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        p[i] -= step * m[i] / (sqrtf(v[i]) / sbc2 + eps);
    }
}

/* ---------------------------------------------------------------- table */

static const lnb_backend cpu_backend = {
    .name = "cpu",
    .alloc = cpu_alloc, .free = cpu_free, .upload = cpu_move, .download = cpu_move,
    .zero = cpu_zero, .copy = cpu_copy,
    .matmul = cpu_matmul, .axpy = cpu_axpy, .scale = cpu_scale, .sumsq = cpu_sumsq,
    .embedding_forward = cpu_embedding_forward, .embedding_backward = cpu_embedding_backward,
    .rmsnorm_forward = cpu_rmsnorm_forward, .rmsnorm_backward = cpu_rmsnorm_backward,
    .rope_forward = cpu_rope_forward, .rope_backward = cpu_rope_backward,
    .attention_forward = cpu_attention_forward, .attention_backward = cpu_attention_backward,
    .swiglu_forward = cpu_swiglu_forward, .swiglu_backward = cpu_swiglu_backward,
    .cross_entropy = cpu_cross_entropy, .adamw = cpu_adamw,
};

const lnb_backend *lnb_cpu(void) { return &cpu_backend; }
