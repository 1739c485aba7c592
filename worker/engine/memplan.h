/* memplan.h — the memory plan of a CPU job: what it will hold at its peak, phase by phase, from
 * the model's config and the job's options alone, compared with the memory the process may still
 * take — so that a job too big for the worker fails at once, with the numbers, instead of hours
 * later (or as an abort of the worker). The GPU twin is lnb_cuda_plan_check (cuda.h).
 *
 * Phases and what each holds (bytes; fp32 = 4, fp64 = 8; as model.c, calibrate.c, lora_init.c,
 * adapter.c, optim.c and drift_tracker.c allocate today):
 *   calibration  weights + the covariances (Σ d_in² fp64 per layer, one per distinct layer input that
 *                a target reads: q,k,v | o | gate,up | down; each sum becomes its covariance in place,
 *                so one set) + the fp32 product scratch (d_max²) + one calibration window's
 *                forward-only activations (model.c: one layer's intermediates, two residual buffers,
 *                no logits)
 *   init         weights + covariances + adapter (A, B, their gradients, A0/B0 for residual methods)
 *                + the method's scratch: lora_null_* solves one basis at a time at least (a d² fp64
 *                copy of C; more at once only as memory allows, lora_init.c) and keeps every basis
 *                (d × r fp64);
 *                pissa/milora/corda an fp64 SVD of the largest target; full fine-tuning allocates
 *                every weight's gradient
 *   training     weights + covariances (kept for the drift tracker) + bases + adapter + AdamW (two
 *                moments per trained value) + activations for batch × seq (model.c's acts_ensure:
 *                per layer, or one layer's with recompute; attention probabilities B·heads·T² unless
 *                the backend keeps rows only) + an evaluation's forward-only activations (one layer's
 *                intermediates, one chunk of logits) when one runs mid-training
 *                + the drift tracker's copy of every original weight (full fine-tuning) + the data.
 *   every phase from the first forward on: the model's rotary tables (model.c's rope_ensure: cos and
 *                sin, T × head_dim/2 fp32, backend memory) — a calibration window's in calibration and
 *                init, the longest of that and the training sequence's in training (they only grow).
 * The peak is the largest phase.
 *
 * Tensor-parallel ranks (ranks R > 1, tensor_parallel.h): the plan is per process, for the
 * ranks_here ranks it holds (R threads of one worker, or one rank per process). Each rank holds its
 * shard — 1/R of q,k,v,o,gate,up,down (heads/R, kv heads/R, intermediate/R), the embeddings, norms
 * and lm_head whole — its shard of the adapter, gradients and AdamW, and the activations of its
 * shard (the residual stream whole); calibration's forward runs on the shard and every rank gathers
 * one window's row-parallel inputs (o's, down's: its block, every rank's, the whole rows). Rank 0
 * alone holds the whole covariances (and their scratch), the bases and the gathered whole adapter.
 * Full fine-tuning on ranks: each rank its shard, its gradients and AdamW moments, and for the
 * drift tracker a copy of its own blocks of W0 (rank 0 writes checkpoints and the export one
 * gathered tensor at a time, not counted). */
#ifndef LN_MEMPLAN_H
#define LN_MEMPLAN_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "worker/backend/cuda/cuda.h"
#include "worker/engine/config.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ln_memplan_req {
    const ln_config *cfg;
    int batch, seq;            /* micro-batch: rows and tokens per row (max_seq_len, or the pack length) */
    int rank;                  /* adapter rank; 0 = full fine-tuning */
    unsigned targets;          /* LN_TARGET bit mask (model.h); 0 = all seven */
    int train_a;               /* A trains (AdamW moments for it) */
    int residual;              /* residual method (pissa, milora, corda, lora_null_*): A0, B0 kept */
    const char *method;        /* for the init scratch: "lora", "lora_null_v1", "pissa", ... (NULL = lora) */
    int calibrate;             /* covariances computed and kept (calibration methods, drift tracking) */
    int calib_max_length;      /* tokens per calibration window (0 = 1024) */
    int calib_fp64;            /* products in fp64 (no fp32 scratch) */
    int recompute;             /* activation recomputation (one layer's intermediates) */
    int rows_only_attention;   /* the backend keeps attention rows only (not B·heads·T²) */
    int eval_during_training;  /* an evaluation forward (its own activations) runs between steps */
    int drift;                 /* knowledge-drift tracker (full fine-tuning: a copy of every W0) */
    int64_t data_tokens;       /* tokens of the loaded datasets (ids + labels, int32), 0 = not counted */
    int ranks;                 /* tensor-parallel ranks of the job (0 or 1: one) */
    int ranks_here;            /* how many of them this process holds (0 = all: a thread gang) */
    int first_rank;            /* the lowest rank this process holds (0: rank 0's extras are here) */
} ln_memplan_req;

typedef enum { LN_PHASE_CALIBRATION, LN_PHASE_INIT, LN_PHASE_TRAINING, LN_NPHASE } ln_memplan_phase;

typedef struct ln_memplan {
    /* parts, bytes: the sum over the ranks this process holds (rank 0's extras where it is here) */
    double weights, data, covariances, calib_scratch, init_scratch, bases, adapter, optimizer, activations, drift;
    double calib_activations;  /* one calibration window's forward-only activations (per rank here) */
    double calib_gather;       /* ranks: one window's row-parallel inputs gathered (per rank here) */
    double gathered_adapter;   /* rank 0 of several: the whole adapter gathered from the shards */
    int ranks, ranks_here, root_here; /* R, the ranks this process holds, whether rank 0 is one */
    double eval_activations;   /* an evaluation's forward-only activations (eval_during_training) */
    double rope, calib_rope;   /* the rotary tables (per rank here): in training; in calibration and init */
    double phase[LN_NPHASE];   /* each phase's total */
    ln_memplan_phase peak_phase;
    double peak;
    double available;          /* ln_memplan_check: what the process may still take */
    char available_from[96];   /* which limit that is: "MemAvailable", "cgroup memory.max", "RLIMIT_AS" */
} ln_memplan;

const char *ln_memplan_phase_name(ln_memplan_phase p);

/* Fills p's parts, phases and peak from q (available stays 0). */
void ln_memplan_estimate(const ln_memplan_req *q, ln_memplan *p);

/* Estimates, reads what is available (common/util.h: ln_mem_available, with root) and fails
 * when the peak does not fit:
 *   "CPU memory plan: the job needs 43.30 GiB at its peak (calibration: weights 15.00 GiB,
 *    covariances 28.10 GiB, calibration scratch 210.0 MiB, calibration activations 220.3 MiB) but
 *    only 24.00 GiB are available (cgroup memory.max), so it would run out of memory"
 * ("out of memory" in it: the worker's fail() classifies and hints on that). With R > 1 ranks the
 * phase names them: "(training, ranks 0-1 of 2 here: weights …)".
 * out (may be NULL) receives the plan either way. */
int ln_memplan_check(const ln_memplan_req *q, const char *root, ln_memplan *out, ln_err *e);

/* The GPU plan's arithmetic (cuda.h's lnb_cuda_plan_req: what the device holds in each phase),
 * host code so that it is tested without a GPU: fills p for a device with free_bytes free of
 * device_bytes, and returns −1 with the sentence when the peak does not fit:
 *   "GPU memory plan: the job needs 81.20 GiB at its peak (training: weights 29.92 GiB, …) but only
 *    79.10 GiB of 79.19 GiB are free on <device>; use a smaller batch or sequence, or more ranks"
 * lnb_cuda_plan_check (solver.cu) calls it with cudaMemGetInfo's numbers. */
int ln_memplan_gpu(const lnb_cuda_plan_req *q, double free_bytes, double device_bytes, const char *device,
                   lnb_cuda_plan *p, ln_err *e);

#ifdef __cplusplus
}
#endif

#endif
