/* cuda.h — the CUDA backend: the lnb_backend table on an NVIDIA GPU, device selection, memory
 * planning, and cuSOLVER/cuBLAS routines for calibration and the LoRA-Null init.
 * Built only by `make cuda` (build/cuda/libloranull_cuda.a); the CPU build knows nothing of it.
 *
 * The table (lnb_cuda) keeps backend.h's contract — fp32 tensors, row-major — with these choices:
 *  - Memory is CUDA managed memory, so host code of the engine (adapter init, calibration hooks,
 *    checkpoint writers) can read and write tensors directly; the kernels run on the device.
 *    Calls queue their work on the backend's one stream and return (no device round trip per call);
 *    the engine waits through the table's sync hook (backend.h) right before its host code touches
 *    tensors, and upload, download, sumsq and cross_entropy wait by themselves.
 *    LORANULL_CUDA_SYNC=1 (debugging: an asynchronous failure then names the call that met it) also
 *    waits after every call; unset or 0, none does.
 *  - GEMMs are cuBLAS cublasGemmEx with fp32 storage and fp32 accumulation; the math mode says
 *    what the tensor cores may down-convert inputs to: LNB_CUDA_MATH_BF16 (default: bf16 tensor
 *    cores, fp32 accumulation), _TF32, or _FP32 (no down-conversion: what the tests compare
 *    against the CPU backend with tight tolerances).
 *  - Attention is flash-style: the forward keeps only the log-sum-exp of each query row (B·nh·T
 *    floats at the start of the probs buffer), never a T×T matrix; the backward recomputes the
 *    probabilities tile by tile. (lnb_backend.attention_rows_only tells the engine so.)
 *  - Reductions (sumsq, cross-entropy, norm and embedding weight gradients) use a fixed launch
 *    shape and a fixed summation order: the same inputs give the same bits.
 *  - Host pointers the engine passes for small tables (token ids, targets, RoPE cos/sin) are
 *    staged into device memory by the backend itself.
 * A kernel cannot fail by the interface; a CUDA error inside one is kept (the first one) and
 * reported by lnb_cuda_check(), which the caller should call after each step.
 *
 * Ownership: lnb_cuda_open creates one process-wide context (handles, stream, workspace);
 * lnb_cuda_close frees it. Buffers from the table's alloc are freed with the table's free. */
#ifndef LN_CUDA_H
#define LN_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "worker/backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { LNB_CUDA_MATH_BF16 = 0, LNB_CUDA_MATH_TF32, LNB_CUDA_MATH_FP32 } lnb_cuda_math;

typedef struct lnb_cuda_opts {
    int device;            /* CUDA device index; −1 = the device with the most free memory */
    lnb_cuda_math math;
} lnb_cuda_opts;

/* Number of usable CUDA devices; 0 when there is no driver or no GPU (never an error). */
int lnb_cuda_device_count(void);
/* One line describing the device in use ("NVIDIA H200, 139.8 GiB, sm_90"). */
const char *lnb_cuda_device_name(void);
/* The index of the device in use (what the NCCL comm of a GPU worker joins on); −1 before open. */
int lnb_cuda_device(void);

/* Selects the device, creates the cuBLAS/cuSOLVER handles. Errors name the device and the call. */
int lnb_cuda_open(const lnb_cuda_opts *o, ln_err *e);
void lnb_cuda_close(void);
/* The backend table, or NULL before lnb_cuda_open. */
const lnb_backend *lnb_cuda(void);
void lnb_cuda_set_math(lnb_cuda_math m);
/* Returns −1 with the first CUDA error a kernel call met since the last check, else 0; then clears. */
int lnb_cuda_check(ln_err *e);
/* Waits for all queued work. */
int lnb_cuda_sync(ln_err *e);
/* Fills a device buffer with N(0, std²) values from a counter-based generator (seed, index):
 * random weights for benchmarks without a host round trip. */
void lnb_cuda_fill_normal(float *x, int64_t n, uint64_t seed, float std);
void lnb_cuda_fill_const(float *x, int64_t n, float v);

/* The attention implementation a call with head dim hd takes now (attention.cu): "fused" (flash
 * kernels on bf16 tensor cores: head dims 64 and 128, sm_80+ with the shared memory they need, the
 * bf16 math mode) or "chunked"
 * (cuBLAS on query chunks: every other case). LORANULL_CUDA_ATTN=chunked forces the fallback;
 * LORANULL_CUDA_ATTN=fused takes the fused kernels in any math mode where they apply (tests). */
const char *lnb_cuda_attention_path(int hd);

/* ---- bf16 weights ----
 * A frozen weight (a LoRA base matrix, lm_head) registered here is multiplied from a bf16 copy
 * made at registration: in LNB_CUDA_MATH_BF16 every GEMM that reads it runs bf16 × bf16 with fp32
 * accumulation into an fp32 result, the other operand (activations, gradients) converted to bf16
 * on the fly. The fp32 tensor stays what host code reads (save, export, drift); the trainable
 * factors stay fp32 masters (AdamW updates them in fp32). Unregister before the weight changes
 * or is freed (the copy would go stale). */
int lnb_cuda_register_bf16(const float *w, int64_t n, ln_err *e);
void lnb_cuda_unregister(const float *w);
void lnb_cuda_unregister_all(void);

/* ---- memory plan ---- */

/* What a job holds on the device, phase by phase, as this backend (managed fp32 tensors, the
 * engine's layout) and the engine allocate it:
 *   calibration  weights (fp32 masters + bf16 copies where registered) + one window's forward-only
 *                activations (no logits) + the covariance sums the device accumulator opens
 *                (device_covariances: fp64 d² per layer input kind, cudaMalloc; those that do not
 *                fit beside the rest sum on the host, calibrate.c) + workspaces
 *   init         weights + adapter (A, B, gradients, A0/B0 of a residual method) + the init's
 *                device scratch (lora_null_*: a cuSOLVER eigensolve of the widest input and a
 *                factor's fp64 W0) + workspaces
 *   training     weights + adapter + AdamW + a training step's activations (attention rows only)
 *                + one chunk of logits + an evaluation's forward-only activations + workspaces.
 * Ranks (ranks > 1): per process, ranks_here of them from first_rank; each holds its shard (heads,
 * kv heads, intermediate / R; embeddings, norms, lm_head whole); rank 0 also the gathered whole
 * adapter and the covariance sums (whole widths). The arithmetic is host code
 * (ln_memplan_gpu, worker/engine/memplan.h), tested without a GPU. */
typedef struct lnb_cuda_plan_req {
    int vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, tied; /* the whole model */
    int batch, seq;        /* micro-batch */
    int rank;              /* LoRA rank (0 = full fine-tuning) */
    int targets;           /* how many of the seven targets carry factors (the first ones; 0 = all seven) */
    unsigned target_mask;  /* LN_TARGET bits (model.h) of the targets; 0 = from targets */
    int train_a;           /* A trains (gradient + AdamW state) */
    int residual;          /* A0, B0 kept (residual methods) */
    int bf16_copies;       /* frozen weights also kept as bf16 copies (lnb_cuda_register_bf16) */
    const char *method;    /* for the init's scratch ("lora_null_v1", ...; NULL = lora) */
    int calibrate;         /* a calibration phase runs (its forward-only window) */
    int calib_max_length;  /* tokens per calibration window (0 = 1024) */
    int device_covariances; /* the device accumulator sums the covariances (lnb_select_cov_accumulator) */
    int recompute;         /* activation recomputation */
    int eval_during_training; /* an evaluation forward's activations beside the training step's */
    int ranks, ranks_here, first_rank; /* tensor-parallel ranks, those in this process (0 = all), the lowest */
} lnb_cuda_plan_req;

typedef struct lnb_cuda_plan {
    /* bytes on the device, summed over the ranks this process holds */
    double weights, adapter, optimizer, activations, logits, workspace;
    double calib_activations, eval_activations, init_scratch, gathered_adapter;
    double covariances;      /* the covariance sums on the device (rank 0, device_covariances) */
    double covariances_host; /* the ones that do not fit there: summed on the host */
    double rope, calib_rope; /* the model's rotary tables (memplan.h): in training; in calibration and init */
    double phase[3];         /* calibration, init, training (ln_memplan_phase) */
    int peak_phase;
    double total;            /* the peak phase's bytes */
    double free_bytes, device_bytes;
} lnb_cuda_plan;

/* Computes the plan and compares it with the device's free memory: returns −1 with a sentence
 * giving needed vs free, the peak phase and its parts when it does not fit, before anything is
 * allocated. */
int lnb_cuda_plan_check(const lnb_cuda_plan_req *rq, lnb_cuda_plan *out, ln_err *e);

/* ---- calibration and LoRA-Null init on the device (cuBLAS + cuSOLVER, fp64 like the CPU) ---- */

/* A covariance sum of one layer input on the device: sum += X̂ᵀ X̂, X̂ = X / |max X| (nullspace.h). */
typedef struct lnb_cuda_cov {
    int d;
    int64_t samples, tokens;
    double *sum;           /* device, d × d (the column-major upper triangle is kept) */
    int *flags;            /* device: the first failing sample, reported by finish */
} lnb_cuda_cov;

int lnb_cuda_cov_init(lnb_cuda_cov *c, int d, ln_err *e);
void lnb_cuda_cov_free(lnb_cuda_cov *c);
/* X (tokens × d, fp32, device/managed or host memory): scale 1/|max X| and DSYRK in fp64, queued
 * on the backend's stream without waiting (the calibration forward is not stalled). A sample with
 * a non-finite entry or maximum 0 adds nothing and makes finish fail naming it (the host's
 * ln_cov_add_sample fails at once; the device learns it without a round trip). */
int lnb_cuda_cov_add_sample(lnb_cuda_cov *c, const float *X, int tokens, ln_err *e);
/* C = sum / samples as a full symmetric d × d fp64 matrix in host memory (symmetrised on the
 * device), or the first failing sample's error. */
int lnb_cuda_cov_finish(const lnb_cuda_cov *c, double *C, ln_err *e);

/* The r smallest eigenpairs of the symmetric d × d host matrix C by cusolverDnDsyevdx (range by
 * index 1..r): U (d × r, row-major, host) ascending, evals (r, may be NULL). */
int lnb_cuda_nullspace_basis(const double *C, int d, int r, double *U, double *evals, ln_err *e);

/* The LoRA-Null factors (nullspace.h's ln_nullspace_factor, on the device): M = W0 U by DGEMM,
 * thin SVD of the d_out × r matrix M by cusolverDnDgesvd, B = P √S / √scale, A = √S (U Q)ᵀ / √scale.
 * W0 (d_out × d_in fp32), U (d_in × r fp64) and the outputs are host or managed memory. */
int lnb_cuda_nullspace_factor(const float *W0, int d_out, int d_in, const double *U, int r, double scale, float *A,
                              float *B, ln_err *e);

/* ---- benchmark helpers ---- */

/* Measured dense bf16 GEMM throughput (TFLOP/s) with fp32 accumulation: M = N = K = n,
 * `iters` timed runs after a warm-up. */
int lnb_cuda_bf16_gemm_peak(int n, int iters, double *tflops, ln_err *e);

#ifdef __cplusplus
}
#endif

#endif
