/* train.h — the training loop: batches, AdamW steps, metrics, checkpoints, resume.
 *
 * Contracts:
 *  - One optimizer step consumes batch_size × grad_accum examples from the seeded loader
 *    (data.h), in grad_accum micro-batches of batch_size, each right-padded to its longest example.
 *    The loss is averaged over every trained token of the whole step (not per micro-batch), so
 *    grad_accum only changes memory, not the math.
 *  - Deterministic: the same seed, data, options and thread count give bit-identical runs.
 *  - Checkpoint (OUT/checkpoints/step-NNNNNN/state.safetensors) = the adapter in its native layout
 *    (adapter.h; loadable by ln_adapter_load) or, for full, every model weight; the AdamW moments
 *    ("optim.m.<name>", "optim.v.<name>"); metadata: step, data position (epoch, index), RNG
 *    state, and the options that must not change on resume. Resuming from it continues
 *    bit-identically to a run that was never interrupted.
 *  - metrics.jsonl in out_dir: one JSON object per step {"step","epoch","loss","lr","grad_norm",
 *    "tokens_per_s","tokens","trained_tokens","elapsed_s"} plus whatever the eval callback adds.
 *  - Eval callback (every eval_every steps and after the last): gets the model, adapter and the
 *    metrics row of that step (a jansson object) to add fields to, e.g. "val_loss" or per-layer
 *    knowledge drift. Returning −1 (with e filled) stops training with that error.
 *    The row written to metrics.jsonl and handed to on_row is the one eval filled.
 *  - on_row (optional) sees every metrics row after it is written (the worker forwards them).
 *  - should_stop (optional) is polled between steps; when it returns 1 the loop saves a
 *    checkpoint and returns with result.stopped = 1.
 *  - On a tensor-parallel shard (m->comm, see tensor_parallel.h's ln_tp_train_rank) the same loop
 *    runs on every rank: checkpoints and eval points are collective (the shards are gathered and
 *    rank 0 writes / evaluates the whole adapter, or with eval_collective every rank evaluates its
 *    shard together), the checkpoint file is the one-rank format (resumable on any rank count),
 *    and only rank 0 writes metrics and checkpoints. */
#ifndef LN_TRAIN_H
#define LN_TRAIN_H

#include <jansson.h>
#include <stdint.h>

#include "common/err.h"
#include "worker/engine/adapter.h"
#include "worker/engine/data.h"
#include "worker/engine/model.h"
#include "worker/engine/optim.h"

typedef int (*ln_eval_fn)(ln_model *m, ln_adapter *ad, int64_t step, json_t *row, void *ctx, ln_err *e);

typedef struct ln_train_opts {
    int epochs;               /* used when max_steps is 0 */
    int64_t max_steps;        /* 0 = from epochs */
    int batch_size;
    int grad_accum;
    ln_optim_cfg optim;       /* total_steps/warmup_steps are filled by ln_train */
    double warmup_ratio;      /* warmup_steps = ceil(ratio · total_steps), as transformers (in double:
                               * ceil(0.1f · 20) would be 3) */
    uint64_t seed;
    int shuffle;
    int pack;                 /* > 0: each row packs whole examples into this many tokens (data.h's
                               * ln_loader_next_packed; the model keeps them apart); batch_size counts
                               * rows; with epochs, steps = epochs · tokens / (pack · rows per step) */
    int64_t save_every;       /* 0 = only at the end */
    int64_t stop_at_step;     /* > 0: stop (with a checkpoint) after this step — an interruption */
    const char *out_dir;      /* metrics.jsonl, checkpoints, final adapter; NULL = write nothing */
    const char *resume;       /* a checkpoint dir or state.safetensors to continue from, or NULL */
    int progress;             /* print a progress line on stderr */
    int64_t eval_every;
    ln_eval_fn eval;
    void *eval_ctx;
    /* On a tensor-parallel shard: 0 = eval takes the whole model and adapter, gathered into rank
     * 0's tp_full/tp_full_ad, and runs on rank 0 alone; 1 = eval is collective: it runs on every
     * rank with this rank's shard (m, ad) and the same step, so it may run collective forwards
     * (ln_eval_loss on the shard) or gathers, the same ones on every rank; rank 0's row is the one
     * written. A rank whose eval fails aborts the group; every rank then fails at that step's eval
     * point and rank 0 writes no row for it. Ignored on one rank. */
    int eval_collective;
    void (*on_row)(json_t *row, void *ctx);
    int (*should_stop)(void *ctx);
    void *cb_ctx;
    /* Tensor parallel (m->comm of more than one rank; set by ln_tp_train_rank, tensor_parallel.h):
     * the whole model and adapter the shard was cut from, on rank 0 (NULL on the others).
     * Checkpoints and eval gather the shards into them; only rank 0 writes into out_dir. */
    ln_model *tp_full;
    ln_adapter *tp_full_ad;
} ln_train_opts;

ln_train_opts ln_train_defaults(void);

typedef struct ln_train_result {
    int64_t steps;            /* optimizer steps done (counting those before a resume) */
    double last_loss;
    int stopped;
    char last_checkpoint[1024];
} ln_train_result;

/* Trains ad on m (ad->full for full fine-tuning) over ds. With opts->resume, the adapter or
 * model weights, optimizer, data position and RNG come from the checkpoint: pass an adapter
 * loaded by ln_train_load_checkpoint. */
int ln_train(ln_model *m, ln_adapter *ad, const ln_dataset *ds, const ln_train_opts *opts, ln_train_result *res,
             ln_err *e);

/* What ln_train writes into out_dir at the end: adapter.safetensors (+ the PEFT layout when the
 * method has no residual), or the model for full fine-tuning. */
int ln_train_save_final(ln_model *m, ln_adapter *ad, const char *dir, ln_err *e);

/* Rebuilds the adapter (or the full model's weights) a checkpoint holds, on a freshly loaded
 * base model: the first half of a resume. On a tensor-parallel shard (m->comm of more than one
 * rank) a full fine-tune's weights are read block by block: only this rank's blocks of the file
 * are touched. */
int ln_train_load_checkpoint(ln_model *m, const char *ckpt, ln_adapter *ad, ln_err *e);

/* Is ckpt (a checkpoint dir or its state.safetensors) a full fine-tune's? *full 0/1. */
int ln_train_checkpoint_is_full(const char *ckpt, int *full, ln_err *e);

/* ---- helpers the other engine parts use ---- */

/* Right-pads n examples into a batch (pad id 0, targets shifted, −100 on padding). Owns ids/targets.
 * Fails (out of memory, naming the batch's size) with nothing allocated. */
int ln_batch_build(ln_batch *b, const ln_example *const *ex, int n, ln_err *e);
/* The same for n packed rows; *segment (B·T, for ln_fwd_opts.segment) is the caller's to free. */
int ln_batch_build_packed(ln_batch *b, int32_t **segment, const ln_packed_row *rows, int n, ln_err *e);
void ln_batch_free(ln_batch *b);
/* Every trainable parameter of m and ad in a fixed order (caller frees the array). */
int ln_trainable_params(ln_model *m, ln_adapter *ad, ln_param ***out);
/* Mean loss over every trained token of ds (in order, batch_size at a time). */
int ln_eval_loss(ln_model *m, const ln_adapter *ad, const ln_dataset *ds, int batch_size, double *mean_loss,
                 ln_err *e);

#endif
