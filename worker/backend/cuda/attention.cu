/* attention.cu — causal grouped-query attention without a saved T×T matrix: only the log-sum-exp
 * of each query row is kept for the backward (B·nh·T floats in the engine's probs buffer), which
 * recomputes the probabilities. Two implementations of the same contract, chosen per call
 * (lnb_cuda_attention_path):
 *
 * 1. FUSED (default for head dims 64 and 128 in bf16 math on sm_80+ with the shared memory: 64-112
 *    KiB per block, so A100/H100/H200 at head dim 128, not sm_86/89's 99 KiB): flash-attention kernels on
 *    bf16 tensor cores (WMMA 16×16×16, fp32 accumulation), nothing but tiles in shared memory.
 *    Tiles: BR = 64 query rows per block (4 warps × 16 rows), BC = 64 keys per tile.
 *    forward  (block = query tile × head × batch): Q tile once; for each key tile j0 < min(q0+BR, T)
 *             (tiles above the diagonal skipped): S = Q Kᵀ, s = sc·S masked (j > t or t ≥ T → −∞),
 *             online softmax per row: m' = max(m, max_j s), α = e^(m−m'), p = e^(s−m'),
 *             l' = α l + Σ p, O' = α O + P V (P rounded to bf16 for the tensor cores);
 *             then out = O / l, lse = m + log l.
 *    backward, deterministic (every output written by one block in a fixed order, no atomics):
 *      dq kernel   (block = query tile × head × batch), two sweeps over the same key tiles:
 *                  1. D_t = Σ_j P_tj dP_tj (P = e^(sc·S − lse), dP = dO Vᵀ) → a B·nh·T workspace;
 *                  2. dS = P ⊙ (dP − D), dQ += dS K, out: dQ·sc.
 *      dkdv kernel (block = key tile × kv head × batch): for each query head of the group in
 *                  order, for each query tile i0 ≥ j0 (tiles below the diagonal skipped):
 *                  recompute P and dS as above, dV += Pᵀ dO, dK += dSᵀ Q; out: dK·sc, dV.
 *    D is computed in its own sweep because the backend interface does not pass the forward
 *    output O to the backward (FlashAttention-2 takes D = rowsum(dO ⊙ O)): 9 tile products per
 *    tile pair instead of 5 — attention is ~4% of an 8B step's FLOPs at T = 2048.
 *    tests/reference/test_flash_tiling.py is a NumPy emulation of exactly these loops (tiles,
 *    masks, rescale, skips, bf16 rounding points) checked against dense attention in CI; it also
 *    runs this file's CUDA source on the host (tests/reference/flash_emu.cpp: a fiber per thread,
 *    WMMA on whole tiles, ASan) against dense fp64 attention at the GPU test's shapes.
 * 2. CHUNKED (the fallback: other head dims, tf32/fp32 math — the tight comparisons with the CPU
 *    backend —, LORANULL_CUDA_ATTN=chunked): cuBLAS GEMMs on query chunks of Bq rows. For a chunk
 *    [c0, c1) and each head, with the keys 0..c1−1 that a causal row of the chunk can see:
 *   forward:  S = sc·Q_c Kᵀ (strided-batched GEMM over kv heads) → causal softmax in place, keeping
 *             lse_t = max + log Σ exp per row → O_c = P V.
 *   backward: S recomputed, P = exp(S − lse) ; dP = dO_c Vᵀ ; D_t = Σ_j P_tj dP_tj ;
 *             dS = P ⊙ (dP − D) ; dQ_c = sc·dS K ; dK += sc·dSᵀ Q_c ; dV += Pᵀ dO_c.
 *   The chunk's S and dP live in a workspace of nh·Bq·T floats reused for every chunk and layer.
 *   GQA: query head h = g·grp + i reads kv head g; each GEMM is batched over g for one i (the
 *   strides are then constant), and the grp calls for i = 0..grp−1 add into dK, dV in that order,
 *   so the result is deterministic.
 * Both write the same lse (natural log), so a forward by one and a backward by the other agree.
 * Layouts: q, out (B,T,nh,hd); k, v (B,T,nkv,hd); lse (B,nh,T). */
#include <cuda_bf16.h>
#include <math.h>
#include <mma.h>
#include <stdlib.h>
#include <string.h>
#include <type_traits>

#include "worker/backend/cuda/cuda_check.h"

extern "C" {
#include "worker/backend/cuda/cuda.h"
}

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

static void chunked_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T, int nh,
                            int nkv, int hd)
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

static void chunked_backward(float *dq, float *dk, float *dv, const float *dout, const float *lse, const float *q,
                             const float *k, const float *v, int B, int T, int nh, int nkv, int hd)
{
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

/* ================================================================ fused flash attention */

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

#define FA_BR 64      /* query rows per block: FA_WARPS warps × 16 rows */
#define FA_BC 64      /* keys per tile */
#define FA_WARPS 4
#define FA_THREADS (FA_WARPS * 32)
#define FULL_MASK 0xffffffffu

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a_row;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> frag_a_col;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_c;

/* rows × HD bf16 tile (ld HD) ← rows r0.. of a (T, ·) fp32 matrix with row stride `stride` (the
 * columns of one head); rows ≥ T are zero. The whole block cooperates. */
template <int HD>
__device__ void fa_load_tile(bf16 *dst, const float *src, int64_t stride, int r0, int rows, int T)
{
    for (int i = threadIdx.x; i < rows * HD; i += blockDim.x) {
        int r = i / HD, c = i % HD, t = r0 + r;
        dst[i] = __float2bfloat16(t < T ? src[(int64_t)t * stride + c] : 0.0f);
    }
}

/* One warp: S (16 × FA_BC fp32, ld FA_BC) = A Bᵀ with A 16 × HD and B FA_BC × HD (bf16, ld HD). */
template <int HD>
__device__ void fa_warp_abt(float *S, const bf16 *A, const bf16 *B)
{
#pragma unroll
    for (int n = 0; n < FA_BC / 16; n++) {
        frag_c acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int k = 0; k < HD / 16; k++) {
            frag_a_row a;
            frag_b_col b;
            wmma::load_matrix_sync(a, A + k * 16, HD);
            wmma::load_matrix_sync(b, B + n * 16 * HD + k * 16, HD); /* (k, n) = B[n][k] */
            wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(S + n * 16, acc, FA_BC, wmma::mem_row_major);
    }
}

/* One warp: acc[n] (columns 16n..16n+15 of a 16 × HD result) += A · B, A 16 × 16·KT bf16 (A_T:
 * stored transposed, element (i, k) at A[k·lda + i] — a column slab of a row-major matrix read as
 * its transpose), B 16·KT × HD bf16 row-major (ld HD). */
template <int HD, int KT, bool A_T>
__device__ void fa_warp_mma(frag_c *acc, const bf16 *A, int lda, const bf16 *B)
{
#pragma unroll
    for (int k = 0; k < KT; k++) {
        typename std::conditional<A_T, frag_a_col, frag_a_row>::type a;
        wmma::load_matrix_sync(a, A_T ? A + k * 16 * lda : A + k * 16, lda);
#pragma unroll
        for (int n = 0; n < HD / 16; n++) {
            frag_b_row b;
            wmma::load_matrix_sync(b, B + k * 16 * HD + n * 16, HD);
            wmma::mma_sync(acc[n], a, b, acc[n]);
        }
    }
}

/* One warp writes its 16 × HD accumulator (× scale) to rows r0.. (< T) of a (T, ·) fp32 matrix with
 * row stride `stride`, through `stage` (16 × HD floats of shared memory). */
template <int HD>
__device__ void fa_warp_store(float *dst, int64_t stride, int r0, int T, frag_c *acc, float *stage, float scale)
{
#pragma unroll
    for (int n = 0; n < HD / 16; n++) wmma::store_matrix_sync(stage + n * 16, acc[n], HD, wmma::mem_row_major);
    __syncwarp();
    int lane = threadIdx.x & 31;
    for (int i = lane; i < 16 * HD; i += 32) {
        int r = i / HD, c = i % HD;
        if (r0 + r < T) dst[(int64_t)(r0 + r) * stride + c] = stage[i] * scale;
    }
    __syncwarp();
}

/* Shared memory of each kernel, carved in this order (every piece a multiple of 128 bytes). */
template <int HD> struct fa_smem {
    static constexpr size_t tile = (size_t)FA_BR * HD * sizeof(bf16);     /* Q, dO (BR rows) or K, V (BC rows) */
    static constexpr size_t s32 = (size_t)FA_BR * FA_BC * sizeof(float);  /* S, dP */
    static constexpr size_t s16 = (size_t)FA_BR * FA_BC * sizeof(bf16);   /* P, dS */
    static constexpr size_t fwd = 3 * tile + s32 + s16 + (size_t)FA_BR * HD * sizeof(float);
    static constexpr size_t dq = 4 * tile + 2 * s32 + s16;
    static constexpr size_t dkdv = 4 * tile + 2 * s32 + 2 * s16 + 2 * FA_BR * sizeof(float);
};

static_assert(FA_BR == 16 * FA_WARPS, "each warp owns 16 query rows");
static_assert(FA_BR == FA_BC, "the dkdv kernel's causal start (j0 / FA_BR) * FA_BR assumes square tiles");
static_assert(fa_smem<128>::fwd <= 163 * 1024 && fa_smem<128>::dq <= 163 * 1024 && fa_smem<128>::dkdv <= 163 * 1024,
              "the fused kernels must fit sm_80's 163 KiB of shared memory per block");

/* Forward: block (query tile, head h, batch b). Each warp owns 16 query rows; lane l handles row
 * l/2, columns 32·(l%2)..+31 of the warp's S tile (the two lanes of a row agree by shuffles). */
template <int HD>
__global__ void __launch_bounds__(FA_THREADS) k_flash_forward(float *out, float *lse, const float *q, const float *k,
                                                              const float *v, int T, int nh, int nkv, float sc)
{
    extern __shared__ __align__(128) unsigned char smem[];
    typedef fa_smem<HD> L;
    bf16 *Qs = (bf16 *)smem, *Ks = (bf16 *)(smem + L::tile), *Vs = (bf16 *)(smem + 2 * L::tile);
    float *S = (float *)(smem + 3 * L::tile);
    bf16 *P = (bf16 *)(smem + 3 * L::tile + L::s32);
    float *O = (float *)(smem + 3 * L::tile + L::s32 + L::s16);
    const int q0 = blockIdx.x * FA_BR, h = blockIdx.y, b = blockIdx.z, g = h / (nh / nkv);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 32;
    const int t = q0 + w * 16 + r;  /* this lane's query row */
    const int64_t qs = (int64_t)nh * HD, ks = (int64_t)nkv * HD;
    const float *qb = q + (int64_t)b * T * qs + h * HD, *kb = k + (int64_t)b * T * ks + g * HD,
                *vb = v + (int64_t)b * T * ks + g * HD;
    float *Sw = S + w * 16 * FA_BC, *Ow = O + w * 16 * HD;
    bf16 *Pw = P + w * 16 * FA_BC;

    fa_load_tile<HD>(Qs, qb, qs, q0, FA_BR, T);
    for (int i = threadIdx.x; i < FA_BR * HD; i += blockDim.x) O[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const int kend = min(q0 + FA_BR, T);  /* causal: keys ≥ q0 + BR are above every row of the block */
    for (int j0 = 0; j0 < kend; j0 += FA_BC) {
        __syncthreads(); /* every warp is done with the previous K, V */
        fa_load_tile<HD>(Ks, kb, ks, j0, FA_BC, T);
        fa_load_tile<HD>(Vs, vb, ks, j0, FA_BC, T);
        __syncthreads();
        fa_warp_abt<HD>(Sw, Qs + w * 16 * HD, Ks);
        __syncwarp();
        /* online softmax of the row's 64 scores */
        float mx = -INFINITY;
        for (int c = c0; c < c0 + 32; c++) {
            int j = j0 + c;
            float sv = (j <= t && t < T) ? Sw[r * FA_BC + c] * sc : -INFINITY;
            Sw[r * FA_BC + c] = sv;
            mx = fmaxf(mx, sv);
        }
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
        float mn = fmaxf(m, mx);
        /* a row with nothing visible yet (only rows ≥ T here) keeps m = −∞: α = 1, p = 0 */
        float alpha = mn == -INFINITY ? 1.0f : expf(m - mn), sum = 0.0f;
        for (int c = c0; c < c0 + 32; c++) {
            float pv = mn == -INFINITY ? 0.0f : expf(Sw[r * FA_BC + c] - mn);
            Pw[r * FA_BC + c] = __float2bfloat16(pv);
            sum += pv;
        }
        sum += __shfl_xor_sync(FULL_MASK, sum, 1);
        l = l * alpha + sum;
        m = mn;
        for (int c = (lane & 1) * (HD / 2); c < (lane & 1) * (HD / 2) + HD / 2; c++) Ow[r * HD + c] *= alpha;
        __syncwarp();
        /* O_w += P_w V */
        frag_c acc[HD / 16];
#pragma unroll
        for (int n = 0; n < HD / 16; n++) wmma::load_matrix_sync(acc[n], Ow + n * 16, HD, wmma::mem_row_major);
        fa_warp_mma<HD, FA_BC / 16, false>(acc, Pw, FA_BC, Vs);
#pragma unroll
        for (int n = 0; n < HD / 16; n++) wmma::store_matrix_sync(Ow + n * 16, acc[n], HD, wmma::mem_row_major);
        __syncwarp();
    }
    __syncwarp();
    if (t < T) {
        float inv = 1.0f / l;
        float *ob = out + (int64_t)b * T * qs + (int64_t)t * qs + h * HD;
        for (int c = (lane & 1) * (HD / 2); c < (lane & 1) * (HD / 2) + HD / 2; c++) ob[c] = Ow[r * HD + c] * inv;
        if ((lane & 1) == 0) lse[((int64_t)b * nh + h) * T + t] = m + logf(l);
    }
}

/* The backward's recomputation for one warp's 16 query rows against one key tile: S = Q Kᵀ and
 * dP = dO Vᵀ into Sw, dPw (fp32), then per row (lane as in the forward) P = e^(sc·S − lse) (0 where
 * masked) kept in Sw. Returns the lane's partial Σ P ⊙ dP (its 32 columns). */
template <int HD>
__device__ float fa_warp_p_dp(float *Sw, float *dPw, const bf16 *Qw, const bf16 *dOw, const bf16 *Ks, const bf16 *Vs,
                              int t, int T, int j0, float L, float sc)
{
    fa_warp_abt<HD>(Sw, Qw, Ks);
    fa_warp_abt<HD>(dPw, dOw, Vs);
    __syncwarp();
    int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 32;
    float dot = 0.0f;
    for (int c = c0; c < c0 + 32; c++) {
        int j = j0 + c;
        float pv = (j <= t && t < T) ? expf(Sw[r * FA_BC + c] * sc - L) : 0.0f;
        Sw[r * FA_BC + c] = pv;
        dot += pv * dPw[r * FA_BC + c];
    }
    return dot;
}

/* Backward, dQ (and D): block (query tile, head h, batch b); warps and lanes as in the forward. */
template <int HD>
__global__ void __launch_bounds__(FA_THREADS) k_flash_backward_dq(float *dq, float *Dws, const float *dout,
                                                                  const float *lse, const float *q, const float *k,
                                                                  const float *v, int T, int nh, int nkv, float sc)
{
    extern __shared__ __align__(128) unsigned char smem[];
    typedef fa_smem<HD> L;
    bf16 *Qs = (bf16 *)smem, *dOs = (bf16 *)(smem + L::tile), *Ks = (bf16 *)(smem + 2 * L::tile),
         *Vs = (bf16 *)(smem + 3 * L::tile);
    float *S = (float *)(smem + 4 * L::tile), *dP = (float *)(smem + 4 * L::tile + L::s32);
    bf16 *dS = (bf16 *)(smem + 4 * L::tile + 2 * L::s32);
    const int q0 = blockIdx.x * FA_BR, h = blockIdx.y, b = blockIdx.z, g = h / (nh / nkv);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 32;
    const int t = q0 + w * 16 + r;
    const int64_t qs = (int64_t)nh * HD, ks = (int64_t)nkv * HD, lrow = ((int64_t)b * nh + h) * T;
    const float *kb = k + (int64_t)b * T * ks + g * HD, *vb = v + (int64_t)b * T * ks + g * HD;
    float *Sw = S + w * 16 * FA_BC, *dPw = dP + w * 16 * FA_BC;
    bf16 *dSw = dS + w * 16 * FA_BC;
    const bf16 *Qw = Qs + w * 16 * HD, *dOw = dOs + w * 16 * HD;

    fa_load_tile<HD>(Qs, q + (int64_t)b * T * qs + h * HD, qs, q0, FA_BR, T);
    fa_load_tile<HD>(dOs, dout + (int64_t)b * T * qs + h * HD, qs, q0, FA_BR, T);
    const float Lt = t < T ? lse[lrow + t] : 0.0f;
    const int kend = min(q0 + FA_BR, T);
    /* sweep 1: D_t = Σ_j P_tj dP_tj */
    float D = 0.0f;
    for (int j0 = 0; j0 < kend; j0 += FA_BC) {
        __syncthreads();
        fa_load_tile<HD>(Ks, kb, ks, j0, FA_BC, T);
        fa_load_tile<HD>(Vs, vb, ks, j0, FA_BC, T);
        __syncthreads();
        D += fa_warp_p_dp<HD>(Sw, dPw, Qw, dOw, Ks, Vs, t, T, j0, Lt, sc);
        __syncwarp();
    }
    D += __shfl_xor_sync(FULL_MASK, D, 1);
    if (t < T && (lane & 1) == 0) Dws[lrow + t] = D;
    /* sweep 2: dS = P ⊙ (dP − D), dQ += dS K */
    frag_c acc[HD / 16];
#pragma unroll
    for (int n = 0; n < HD / 16; n++) wmma::fill_fragment(acc[n], 0.0f);
    for (int j0 = 0; j0 < kend; j0 += FA_BC) {
        __syncthreads();
        fa_load_tile<HD>(Ks, kb, ks, j0, FA_BC, T);
        fa_load_tile<HD>(Vs, vb, ks, j0, FA_BC, T);
        __syncthreads();
        fa_warp_p_dp<HD>(Sw, dPw, Qw, dOw, Ks, Vs, t, T, j0, Lt, sc);
        for (int c = c0; c < c0 + 32; c++) dSw[r * FA_BC + c] = __float2bfloat16(Sw[r * FA_BC + c] * (dPw[r * FA_BC + c] - D));
        __syncwarp();
        fa_warp_mma<HD, FA_BC / 16, false>(acc, dSw, FA_BC, Ks);
        __syncwarp();
    }
    __syncthreads(); /* S and dP become the staging area of the result */
    fa_warp_store<HD>(dq + (int64_t)b * T * qs + h * HD, qs, q0 + w * 16, T, acc, S + w * 16 * HD, sc);
}

/* Backward, dK and dV: block (key tile, kv head g, batch b). For each query tile the warps
 * recompute P, dS for their 16 query rows (as in the dq kernel); then warp w adds the products for
 * its 16 keys: dV_w += P[:, w]ᵀ dO, dK_w += dS[:, w]ᵀ Q. */
template <int HD>
__global__ void __launch_bounds__(FA_THREADS) k_flash_backward_dkdv(float *dk, float *dv, const float *Dws,
                                                                    const float *dout, const float *lse,
                                                                    const float *q, const float *k, const float *v,
                                                                    int T, int nh, int nkv, float sc)
{
    extern __shared__ __align__(128) unsigned char smem[];
    typedef fa_smem<HD> L;
    bf16 *Ks = (bf16 *)smem, *Vs = (bf16 *)(smem + L::tile), *Qs = (bf16 *)(smem + 2 * L::tile),
         *dOs = (bf16 *)(smem + 3 * L::tile);
    float *S = (float *)(smem + 4 * L::tile), *dP = (float *)(smem + 4 * L::tile + L::s32);
    bf16 *P16 = (bf16 *)(smem + 4 * L::tile + 2 * L::s32), *dS = (bf16 *)(smem + 4 * L::tile + 2 * L::s32 + L::s16);
    float *rowL = (float *)(smem + 4 * L::tile + 2 * L::s32 + 2 * L::s16), *rowD = rowL + FA_BR;
    const int j0 = blockIdx.x * FA_BC, g = blockIdx.y, b = blockIdx.z, grp = nh / nkv;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 32;
    const int64_t qs = (int64_t)nh * HD, ks = (int64_t)nkv * HD;
    float *Sw = S + w * 16 * FA_BC, *dPw = dP + w * 16 * FA_BC;

    fa_load_tile<HD>(Ks, k + (int64_t)b * T * ks + g * HD, ks, j0, FA_BC, T);
    fa_load_tile<HD>(Vs, v + (int64_t)b * T * ks + g * HD, ks, j0, FA_BC, T);
    frag_c dk_acc[HD / 16], dv_acc[HD / 16];
#pragma unroll
    for (int n = 0; n < HD / 16; n++) {
        wmma::fill_fragment(dk_acc[n], 0.0f);
        wmma::fill_fragment(dv_acc[n], 0.0f);
    }
    for (int i = 0; i < grp; i++) {
        const int h = g * grp + i;
        const int64_t lrow = ((int64_t)b * nh + h) * T;
        /* causal: query tiles that end before j0 see none of these keys (FA_BR = FA_BC: start at j0) */
        for (int i0 = (j0 / FA_BR) * FA_BR; i0 < T; i0 += FA_BR) {
            __syncthreads(); /* every warp is done with the previous Q, dO, P, dS */
            fa_load_tile<HD>(Qs, q + (int64_t)b * T * qs + h * HD, qs, i0, FA_BR, T);
            fa_load_tile<HD>(dOs, dout + (int64_t)b * T * qs + h * HD, qs, i0, FA_BR, T);
            for (int x = threadIdx.x; x < FA_BR; x += blockDim.x) {
                rowL[x] = i0 + x < T ? lse[lrow + i0 + x] : 0.0f;
                rowD[x] = i0 + x < T ? Dws[lrow + i0 + x] : 0.0f;
            }
            __syncthreads();
            const int t = i0 + w * 16 + r;
            fa_warp_p_dp<HD>(Sw, dPw, Qs + w * 16 * HD, dOs + w * 16 * HD, Ks, Vs, t, T, j0, rowL[w * 16 + r], sc);
            const float D = rowD[w * 16 + r];
            for (int c = c0; c < c0 + 32; c++) {
                int x = (w * 16 + r) * FA_BC + c;
                P16[x] = __float2bfloat16(S[x]);
                dS[x] = __float2bfloat16(S[x] * (dP[x] - D));
            }
            __syncthreads(); /* all 64 rows of P, dS are in */
            fa_warp_mma<HD, FA_BR / 16, true>(dv_acc, P16 + w * 16, FA_BC, dOs);
            fa_warp_mma<HD, FA_BR / 16, true>(dk_acc, dS + w * 16, FA_BC, Qs);
        }
    }
    __syncthreads(); /* S and dP become the staging area of the results */
    fa_warp_store<HD>(dk + (int64_t)b * T * ks + g * HD, ks, j0 + w * 16, T, dk_acc, S + w * 16 * HD, sc);
    fa_warp_store<HD>(dv + (int64_t)b * T * ks + g * HD, ks, j0 + w * 16, T, dv_acc, S + w * 16 * HD, 1.0f);
}

template <int HD>
static void fused_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T, int nh,
                          int nkv)
{
    if (B <= 0 || T <= 0) return;
    size_t sm = fa_smem<HD>::fwd;
    CUDA_NOTE(cudaFuncSetAttribute(k_flash_forward<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm));
    dim3 grid((T + FA_BR - 1) / FA_BR, nh, B);
    k_flash_forward<HD><<<grid, FA_THREADS, sm, lnb_cuda_g.stream>>>(out, lse, q, k, v, T, nh, nkv,
                                                                      1.0f / sqrtf((float)HD));
    LAUNCH_NOTE("flash_forward");
}

template <int HD>
static void fused_backward(float *dq, float *dk, float *dv, const float *dout, const float *lse, const float *q,
                           const float *k, const float *v, int B, int T, int nh, int nkv)
{
    if (B <= 0 || T <= 0) return;
    float *D = (float *)lnb_cuda_workspace(WS_ATT_D, (size_t)B * nh * T * sizeof(float));
    if (!D) return;
    float sc = 1.0f / sqrtf((float)HD);
    size_t s1 = fa_smem<HD>::dq, s2 = fa_smem<HD>::dkdv;
    CUDA_NOTE(cudaFuncSetAttribute(k_flash_backward_dq<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s1));
    CUDA_NOTE(cudaFuncSetAttribute(k_flash_backward_dkdv<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s2));
    dim3 gq((T + FA_BR - 1) / FA_BR, nh, B), gk((T + FA_BC - 1) / FA_BC, nkv, B);
    k_flash_backward_dq<HD><<<gq, FA_THREADS, s1, lnb_cuda_g.stream>>>(dq, D, dout, lse, q, k, v, T, nh, nkv, sc);
    LAUNCH_NOTE("flash_backward_dq");
    k_flash_backward_dkdv<HD><<<gk, FA_THREADS, s2, lnb_cuda_g.stream>>>(dk, dv, D, dout, lse, q, k, v, T, nh, nkv, sc);
    LAUNCH_NOTE("flash_backward_dkdv");
}

/* ================================================================ entry points */

/* The most shared memory a fused kernel for head dim hd needs per block. */
static size_t fused_smem(int hd)
{
    size_t a = hd == 64 ? fa_smem<64>::fwd : fa_smem<128>::fwd, b = hd == 64 ? fa_smem<64>::dq : fa_smem<128>::dq,
           c = hd == 64 ? fa_smem<64>::dkdv : fa_smem<128>::dkdv;
    return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

extern "C" const char *lnb_cuda_attention_path(int hd)
{
    const char *want = getenv("LORANULL_CUDA_ATTN");
    /* sm_80+ for bf16 WMMA; and the opt-in shared memory (sm_86/89 parts allow 99 KiB, not 163) */
    if ((hd != 64 && hd != 128) || lnb_cuda_g.sm < 80 || fused_smem(hd) > lnb_cuda_g.smem_optin) return "chunked";
    if (want && strcmp(want, "chunked") == 0) return "chunked";
    if (want && strcmp(want, "fused") == 0) return "fused";
    return lnb_cuda_g.math == LNB_CUDA_MATH_BF16 ? "fused" : "chunked";
}

void lnb_cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
                                int nh, int nkv, int hd)
{
    if (strcmp(lnb_cuda_attention_path(hd), "fused") != 0) chunked_forward(out, lse, q, k, v, B, T, nh, nkv, hd);
    else if (hd == 64) fused_forward<64>(out, lse, q, k, v, B, T, nh, nkv);
    else fused_forward<128>(out, lse, q, k, v, B, T, nh, nkv);
}

void lnb_cuda_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout, const float *lse,
                                 const float *q, const float *k, const float *v, int B, int T, int nh, int nkv, int hd)
{
    (void)scratch;
    if (strcmp(lnb_cuda_attention_path(hd), "fused") != 0) chunked_backward(dq, dk, dv, dout, lse, q, k, v, B, T, nh, nkv, hd);
    else if (hd == 64) fused_backward<64>(dq, dk, dv, dout, lse, q, k, v, B, T, nh, nkv);
    else fused_backward<128>(dq, dk, dv, dout, lse, q, k, v, B, T, nh, nkv);
}
