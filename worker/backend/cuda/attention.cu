/* attention.cu — causal grouped-query attention without a saved T×T matrix (flash-style
 * memory, cuBLAS tensor-core math).
 *
 * Queries are processed in chunks of Bq rows. For a chunk [c0, c1) and each head, with the
 * keys 0..c1−1 that a causal row of the chunk can see:
 *   forward:  S = sc·Q_c Kᵀ (strided-batched GEMM over kv heads) → causal softmax in place, keeping
 *             lse_t = max + log Σ exp per row (the only thing saved: B·nh·T floats) → O_c = P V.
 *   backward: S recomputed, P = exp(S − lse) ; dP = dO_c Vᵀ ; D_t = Σ_j P_tj dP_tj ;
 *             dS = P ⊙ (dP − D) ; dQ_c = sc·dS K ; dK += sc·dSᵀ Q_c ; dV += Pᵀ dO_c.
 * The chunk's S and dP live in a workspace of nh·Bq·T floats reused for every chunk and layer.
 * GQA: query head h = g·grp + i reads kv head g; each GEMM is batched over g for one i (the
 * strides are then constant), and the grp calls for i = 0..grp−1 add into dK, dV in that order, so
 * the result is deterministic. Layouts: q, out (B,T,nh,hd); k, v (B,T,nkv,hd); lse (B,nh,T). */
#include <math.h>
#include <stdlib.h>

#include "worker/backend/cuda/cuda_check.h"

/* Rows of queries per chunk so that one nh × Bq × T fp32 buffer stays near 128 MiB. */
static int chunk_rows(int T, int nh)
{
    /* LORANULL_CUDA_ATTN_CHUNK forces a chunk size (the tests use it to cover several chunks). */
    const char *force = getenv("LORANULL_CUDA_ATTN_CHUNK");
    if (force && atoi(force) > 0) return atoi(force) < T ? atoi(force) : T;
    int64_t budget = (int64_t)32 << 20; /* floats */
    int64_t bq = budget / ((int64_t)nh * T);
    if (bq > T) bq = T;
    if (bq < 16) bq = 16 < T ? 16 : T;
    return (int)bq;
}

/* Row-major C = α op(A) op(B) + β C for `batch` matrices at constant strides (column-major
 * cuBLAS with the operands swapped, as cu_matmul). */
static void gemm_batched(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda, int64_t sA,
                         const float *B, int ldb, int64_t sB, float beta, float *C, int ldc, int64_t sC, int batch)
{
    CUBLAS_NOTE(cublasGemmStridedBatchedEx(lnb_cuda_g.blas, tB ? CUBLAS_OP_T : CUBLAS_OP_N, tA ? CUBLAS_OP_T : CUBLAS_OP_N,
                                           N, M, K, &alpha, B, CUDA_R_32F, ldb, sB, A, CUDA_R_32F, lda, sA, &beta, C,
                                           CUDA_R_32F, ldc, sC, batch, lnb_cuda_compute_type(), CUBLAS_GEMM_DEFAULT));
}

/* S (nh, rows, Tk) row (h, r) is query t = c0 + r: softmax over keys j ≤ t in place, zero beyond;
 * lse[h·T + t] = max + log Σ exp. One block per row. */
__global__ void k_causal_softmax(float *S, float *lse, int rows, int Tk, int c0, int T)
{
    __shared__ float sh[32];
    int row = blockIdx.x, h = row / rows, r = row % rows, t = c0 + r;
    float *s = S + (int64_t)row * Tk;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) mx = fmaxf(mx, s[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = mx;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? sh[threadIdx.x] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (threadIdx.x == 0) sh[0] = v;
    }
    __syncthreads();
    mx = sh[0];
    __syncthreads();
    float sum = 0;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) sum += expf(s[j] - mx);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? sh[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0) sh[0] = v;
    }
    __syncthreads();
    float inv = 1.0f / sh[0];
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) s[j] = j <= t ? expf(s[j] - mx) * inv : 0.0f;
    if (threadIdx.x == 0) lse[(int64_t)h * T + t] = mx + logf(sh[0]);
}

/* Backward, per row (h, r), t = c0 + r: P = exp(S − lse) (0 beyond t) written over S;
 * D = Σ_j P_j dP_j; dP ← P ⊙ (dP − D). One block per row. */
__global__ void k_softmax_grad(float *S, float *dP, const float *lse, int rows, int Tk, int c0, int T)
{
    __shared__ float sh[32];
    int row = blockIdx.x, h = row / rows, r = row % rows, t = c0 + r;
    float *s = S + (int64_t)row * Tk, *d = dP + (int64_t)row * Tk;
    float L = lse[(int64_t)h * T + t], dot = 0;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) {
        float p = j <= t ? expf(s[j] - L) : 0.0f;
        s[j] = p;
        dot += p * d[j];
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = dot;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? sh[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0) sh[0] = v;
    }
    __syncthreads();
    float D = sh[0];
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) d[j] = s[j] * (d[j] - D);
}

/* S_h = sc · Q_c,h K_gᵀ for every head of the chunk (rows × Tk each). */
static void chunk_scores(float *S, const float *qb, const float *kb, int rows, int Tk, int c0, int nh, int nkv, int hd,
                         float sc)
{
    int grp = nh / nkv, qs = nh * hd, ks = nkv * hd;
    for (int i = 0; i < grp; i++)
        gemm_batched(0, 1, rows, Tk, hd, sc, qb + (int64_t)c0 * qs + i * hd, qs, (int64_t)grp * hd, kb, ks, hd, 0.0f,
                     S + (int64_t)i * rows * Tk, Tk, (int64_t)grp * rows * Tk, nkv);
}

void lnb_cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
                                int nh, int nkv, int hd)
{
    int grp = nh / nkv, qs = nh * hd, ks = nkv * hd, bq = chunk_rows(T, nh);
    float sc = 1.0f / sqrtf((float)hd);
    float *S = (float *)lnb_cuda_workspace(WS_ATT_S, (size_t)nh * bq * T * sizeof(float));
    if (!S) return;
    for (int b = 0; b < B; b++) {
        const float *qb = q + (int64_t)b * T * qs, *kb = k + (int64_t)b * T * ks, *vb = v + (int64_t)b * T * ks;
        float *ob = out + (int64_t)b * T * qs, *lb = lse + (int64_t)b * nh * T;
        for (int c0 = 0; c0 < T; c0 += bq) {
            int rows = T - c0 < bq ? T - c0 : bq, Tk = c0 + rows;
            chunk_scores(S, qb, kb, rows, Tk, c0, nh, nkv, hd, sc);
            k_causal_softmax<<<nh * rows, 256, 0, lnb_cuda_g.stream>>>(S, lb, rows, Tk, c0, T);
            LAUNCH_NOTE("causal_softmax");
            /* O_c,h = P_h V_g */
            for (int i = 0; i < grp; i++)
                gemm_batched(0, 0, rows, hd, Tk, 1.0f, S + (int64_t)i * rows * Tk, Tk, (int64_t)grp * rows * Tk, vb, ks,
                             hd, 0.0f, ob + (int64_t)c0 * qs + i * hd, qs, (int64_t)grp * hd, nkv);
        }
    }
}

void lnb_cuda_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout, const float *lse,
                                 const float *q, const float *k, const float *v, int B, int T, int nh, int nkv, int hd)
{
    (void)scratch;
    int grp = nh / nkv, qs = nh * hd, ks = nkv * hd, bq = chunk_rows(T, nh);
    float sc = 1.0f / sqrtf((float)hd);
    float *S = (float *)lnb_cuda_workspace(WS_ATT_S, (size_t)nh * bq * T * sizeof(float));
    float *dP = (float *)lnb_cuda_workspace(WS_ATT_DP, (size_t)nh * bq * T * sizeof(float));
    if (!S || !dP) return;
    CUDA_NOTE(cudaMemsetAsync(dk, 0, (size_t)B * T * ks * sizeof(float), lnb_cuda_g.stream));
    CUDA_NOTE(cudaMemsetAsync(dv, 0, (size_t)B * T * ks * sizeof(float), lnb_cuda_g.stream));
    for (int b = 0; b < B; b++) {
        int64_t qo = (int64_t)b * T * qs, ko = (int64_t)b * T * ks;
        const float *lb = lse + (int64_t)b * nh * T;
        for (int c0 = 0; c0 < T; c0 += bq) {
            int rows = T - c0 < bq ? T - c0 : bq, Tk = c0 + rows;
            int64_t hs = (int64_t)rows * Tk, gs = (int64_t)grp * hs;
            chunk_scores(S, q + qo, k + ko, rows, Tk, c0, nh, nkv, hd, sc);
            /* dP_h = dO_c,h V_gᵀ */
            for (int i = 0; i < grp; i++)
                gemm_batched(0, 1, rows, Tk, hd, 1.0f, dout + qo + (int64_t)c0 * qs + i * hd, qs, (int64_t)grp * hd,
                             v + ko, ks, hd, 0.0f, dP + i * hs, Tk, gs, nkv);
            k_softmax_grad<<<nh * rows, 256, 0, lnb_cuda_g.stream>>>(S, dP, lb, rows, Tk, c0, T);
            LAUNCH_NOTE("softmax_grad");
            for (int i = 0; i < grp; i++) {
                /* dQ_c,h = sc · dS_h K_g */
                gemm_batched(0, 0, rows, hd, Tk, sc, dP + i * hs, Tk, gs, k + ko, ks, hd, 0.0f,
                             dq + qo + (int64_t)c0 * qs + i * hd, qs, (int64_t)grp * hd, nkv);
                /* dK_g[0..Tk) += sc · dS_hᵀ Q_c,h ; dV_g[0..Tk) += P_hᵀ dO_c,h */
                gemm_batched(1, 0, Tk, hd, rows, sc, dP + i * hs, Tk, gs, q + qo + (int64_t)c0 * qs + i * hd, qs,
                             (int64_t)grp * hd, 1.0f, dk + ko, ks, hd, nkv);
                gemm_batched(1, 0, Tk, hd, rows, 1.0f, S + i * hs, Tk, gs, dout + qo + (int64_t)c0 * qs + i * hd, qs,
                             (int64_t)grp * hd, 1.0f, dv + ko, ks, hd, nkv);
            }
        }
    }
}
