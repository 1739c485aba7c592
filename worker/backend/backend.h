/* backend.h — the small interface the engine computes through.
 *
 * Contract (the CPU backend is the readable reference; a CUDA backend implements the same table):
 *  - Every tensor is fp32, row-major, contiguous unless a leading dimension says otherwise, and lives
 *    in the backend's memory (alloc/upload/download move it there and back; on the CPU they are
 *    plain malloc/memcpy).
 *  - Kernels know no model: they take pointers and shapes. N is a number of token rows (B*T),
 *    C a row width, V a vocabulary size, nh/nkv query/key-value heads, hd a head dimension.
 *  - Backward kernels ACCUMULATE (+=) into weight gradients (so gradient accumulation over
 *    micro-batches is free) and into dx where the comment says so; everything else overwrites.
 *  - No kernel can fail; shapes are validated by the engine before calling. (CPU kernels may take
 *    small per-thread temporaries of their own.) A device backend whose kernels can fail keeps the
 *    first failure and reports it through the optional check hook below.
 *  - Deterministic: the same inputs and thread count give the same bits (the resume test needs it).
 */
#ifndef LN_BACKEND_H
#define LN_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

typedef struct lnb_backend {
    const char *name;

    /* ---- memory ---- */
    void *(*alloc)(size_t bytes);                  /* zeroed, 64-byte aligned; NULL on OOM */
    void (*free)(void *p);
    void (*upload)(void *dst, const void *host, size_t bytes);
    void (*download)(void *host, const void *src, size_t bytes);
    void (*zero)(float *x, int64_t n);
    void (*copy)(float *dst, const float *src, int64_t n);

    /* ---- BLAS-like ---- */
    /* C[M×N] = alpha · op(A) · op(B) + beta · C, op(X) = Xᵀ when tX; row-major with leading dims. */
    void (*matmul)(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc);
    /* y += a·x */
    void (*axpy)(int64_t n, float a, const float *x, float *y);
    /* x *= a */
    void (*scale)(int64_t n, float a, float *x);
    /* Σ x², accumulated in double. */
    double (*sumsq)(const float *x, int64_t n);

    /* ---- layers (forward / backward side by side) ---- */
    /* out (N,C) = table[ids[n]] ; dtable[ids[n]] += dout[n] */
    void (*embedding_forward)(float *out, const int32_t *ids, const float *table, int N, int C);
    void (*embedding_backward)(float *dtable, const float *dout, const int32_t *ids, int N, int C);

    /* out = w ⊙ x / sqrt(mean(x²) + eps), per row of x (N,C); rstd (N) saved for backward.
     * backward: dx += ..., dw += ... (dw may be NULL when the norm weight is frozen). */
    void (*rmsnorm_forward)(float *out, float *rstd, const float *x, const float *w, int N, int C, float eps);
    void (*rmsnorm_backward)(float *dx, float *dw, const float *dout, const float *x, const float *w,
                             const float *rstd, int N, int C);

    /* RoPE in HF's half-split (rotate_half) layout, in place on x (N, nh, hd) where row n has
     * position n % T. cos/sin are (T, hd/2) tables. Backward rotates by −θ (also in place). */
    void (*rope_forward)(float *x, const float *cos, const float *sin, int N, int T, int nh, int hd);
    void (*rope_backward)(float *dx, const float *cos, const float *sin, int N, int T, int nh, int hd);

    /* Causal grouped-query attention. q,out (B,T,nh,hd); k,v (B,T,nkv,hd); query head h reads
     * kv head h / (nh/nkv). probs (B,nh,T,T) saved for backward (softmax of q·kᵀ/√hd, masked).
     * backward: dq overwritten; dk, dv overwritten (heads of a group summed); scratch is a (T,T)
     * workspace a backend may use (the CPU backend keeps one per thread of its own). */
    void (*attention_forward)(float *out, float *probs, const float *q, const float *k, const float *v,
                              int B, int T, int nh, int nkv, int hd);
    void (*attention_backward)(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                               const float *probs, const float *q, const float *k, const float *v,
                               int B, int T, int nh, int nkv, int hd);

    /* out = silu(gate) ⊙ up (n elements); backward overwrites dgate, dup. */
    void (*swiglu_forward)(float *out, const float *gate, const float *up, int64_t n);
    void (*swiglu_backward)(float *dgate, float *dup, const float *dout, const float *gate,
                            const float *up, int64_t n);

    /* Softmax cross-entropy over logits (N,V), fused with its backward: returns Σ −log p[target]
     * over rows whose target ≥ 0 (others are masked). When dlogits is not NULL it receives
     * dscale · (softmax − onehot) (zero rows where masked); dlogits may equal logits (in place). */
    double (*cross_entropy)(const float *logits, float *dlogits, const int32_t *targets, int N, int V,
                            float dscale);

    /* AdamW, PyTorch's formulation (decoupled decay): p -= lr·wd·p; m,v moments of g·gscale;
     * p -= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps), with bc = 1 − beta^step. */
    void (*adamw)(float *p, const float *g, float *m, float *v, int64_t n, float gscale, float lr,
                  float beta1, float beta2, float eps, float wd, float bc1, float bc2);

    /* 1 when attention_forward keeps only B·nh·T floats in probs (a flash-style backend that
     * saves each row's log-sum-exp and recomputes the probabilities in the backward); the engine
     * then allocates that much instead of B·nh·T·T. 0 (the CPU backend): the full matrix. */
    int attention_rows_only;

    /* ---- optional hooks (NULL on the CPU backend: nothing to report, nothing to keep) ---- */
    /* Returns −1 with the first device error an earlier call met since the last check (a kernel
     * call cannot fail by this interface, so an asynchronous failure is kept until asked), else 0;
     * either way the kept error is cleared. It waits for queued work first, so a failure of any call
     * made before it is seen. The engine calls it after each optimizer step, at eval points, after
     * calibration and the adapter's init, and before writing a checkpoint or the final adapter: a
     * step whose kernels failed is never saved (worker/engine/model.h: ln_model_check_device). */
    int (*check)(ln_err *e);
    /* Waits for every call made so far to complete, so host code may read or write backend tensors
     * directly (a pointer dereference, memcpy, a safetensors writer holding w): a device backend
     * whose calls only queue work (the CUDA backend by default) returns before its kernels ran.
     * upload, download and the value-returning calls (sumsq, cross_entropy) wait by themselves. Like
     * check, −1 with the first kept device error (the tensors may hold garbage then), else 0. The
     * engine calls it through ln_backend_sync (model.h) at each place its host code touches tensors:
     * calibration hooks on the host path, the adapter's init and residual, checkpoint and adapter
     * writes and restores. NULL: every call has completed when it returns (the CPU). */
    int (*sync)(ln_err *e);
    /* A frozen weight w (n floats, from this table's alloc) may be kept in a faster form for the
     * matmuls that read it (the CUDA backend: a bf16 copy, in its bf16 math mode only). Returns the
     * bytes of backend memory that form takes (0: w stays as it is), or −1 with e filled. w itself
     * stays what host code reads (save, export, drift). Until thaw(w) the engine must not change w
     * nor free it: thaw first (the kept form would go stale, or outlive w's memory). Freezing a
     * frozen weight again is a no-op. The engine freezes only model weights (ln_model_freeze_frozen,
     * model.h), never an adapter's factors. */
    int64_t (*freeze)(const float *w, int64_t n, ln_err *e);
    /* Drops whatever freeze kept for w (nothing if it kept nothing or w was never frozen). */
    void (*thaw)(const float *w);
    /* What freeze keeps, for logs ("bf16"); NULL with freeze. */
    const char *frozen_form;
    /* out[i] = sumsq(x[i], n[i]) for i < k, bitwise what k sumsq calls return, in one wait instead
     * of k (a device backend: the gradient norm and the finiteness check of every trainable tensor
     * each step). −1 when it could not (out of memory: the caller falls back to sumsq). NULL: call
     * sumsq k times. */
    int (*sumsq_many)(int k, const float *const *x, const int64_t *n, double *out);
} lnb_backend;

/* The CPU backend (OpenBLAS + OpenMP). Static; never freed. */
const lnb_backend *lnb_cpu(void);

#endif
