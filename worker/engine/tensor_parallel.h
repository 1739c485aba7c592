/* tensor_parallel.h — Megatron-style tensor parallelism of a LLaMA model over the ranks of a comm
 * group (DESIGN.md §3).
 *
 * The split, for R ranks and rank k:
 *   column-parallel (split by output rows):  q, k, v (whole heads: rank k has query heads
 *     [k·nh/R, (k+1)·nh/R) and kv heads [k·nkv/R, …) — so GQA groups stay on one rank), gate, up;
 *   row-parallel (split by input columns):   o (the same heads), down (the same intermediate rows);
 *   replicated: embeddings, norms, lm_head.
 * A rank's shard is itself an ln_model whose config has nh/R, nkv/R heads and I/R intermediate
 * units, with m->comm set: the model's passes then all-reduce the row-parallel outputs (forward)
 * and the column-parallel input gradients (backward) — Megatron's f/g operators, one all-reduce
 * after each row-parallel layer (model.c).
 * LoRA factors follow their base weight: for a column-parallel W (d_out × d_in), B is split by
 * rows like W and A (r × d_in) is replicated; for a row-parallel W, A is split by columns like W and
 * B (d_out × r) is replicated. Each rank's gradient of a replicated factor is a partial sum, so
 * after the last micro-batch of a step ln_tp_reduce_grads sums them over the ranks (once per
 * step, not per micro-batch, since gradients accumulate).
 *
 * Ownership: shards are new objects owned by the caller (ln_model_free / ln_adapter_free); the
 * comm is borrowed and must outlive the shard's passes. */
#ifndef LN_TENSOR_PARALLEL_H
#define LN_TENSOR_PARALLEL_H

#include "common/err.h"
#include "worker/backend/comm/comm.h"
#include "worker/engine/adapter.h"
#include "worker/engine/model.h"
#include "worker/engine/optim.h"
#include "worker/engine/train.h"

/* The config of one of `size` shards; fails, naming the field, when heads, kv heads or the
 * intermediate size do not divide by size. */
int ln_tp_shard_config(const ln_config *full, int size, ln_config *shard, ln_err *e);

/* Does target t split by output (column-parallel)? Otherwise by input (row-parallel: o, down). */
int ln_tp_column_parallel(ln_target t);

/* Rank comm_rank(c)'s shard of the whole model `full` (same backend), with out->comm = c. */
int ln_tp_shard_model(const ln_model *full, ln_comm *c, ln_model **out, ln_err *e);

/* The same rank's shard of adapter `ad` of `full`, on `shard`: factors split as above, the
 * trainable flags, A0/B0 and residual flag carried over. */
int ln_tp_shard_adapter(const ln_model *full, const ln_adapter *ad, ln_model *shard, ln_adapter *out, ln_err *e);

/* Sums the partial gradients of the replicated LoRA factors over the ranks (see above). Call once
 * per optimizer step, after the last backward and before clipping. */
int ln_tp_reduce_grads(ln_model *shard, ln_adapter *ad, ln_err *e);

/* The global gradient norm √(Σ g²) of the whole (unsharded) model: sharded gradients summed over
 * the ranks, replicated ones counted once. Equal on every rank. */
int ln_tp_grad_norm(ln_model *shard, ln_adapter *ad, double *norm, ln_err *e);

/* Calibration on a shard. The forward hook (model.h) sees q,k,v's and gate,up's input whole on
 * every rank, but o's and down's input split by columns (each rank its heads / intermediate
 * units). ln_tp_calibration_hook, installed as the shard's hook with an ln_tp_hook as its ctx,
 * all-gathers the row-parallel inputs and re-interleaves them per token row, then calls `inner`
 * on rank 0 only with the whole X (tokens × d_in) — so rank 0's covariances equal an unsharded
 * calibration's. Every rank must run the same forwards (it is a collective for o and down).
 * A failed gather is kept in failed/err (a hook cannot fail); check it after the forward. */
typedef struct ln_tp_hook {
    ln_comm *comm;
    ln_input_hook inner;
    void *inner_ctx;
    float *mine, *all, *whole;   /* scratch, owned; freed by ln_tp_hook_free */
    size_t cap;
    int failed;
    ln_err err;
} ln_tp_hook;

void ln_tp_calibration_hook(int layer, ln_input which, const float *X, int tokens, int d_in, void *ctx);
void ln_tp_hook_free(ln_tp_hook *h);

/* LoRA-Null init of a shard's adapter (lora_null_v1 / lora_null_v2, already allocated on the
 * shard by ln_adapter_alloc), collective. The eigensolves are spread over the ranks: the basis of
 * layer l's input i (4 per layer, shared by the targets that read it) is computed by rank
 * (4l + i) mod R and broadcast. Then per target each rank forms its part of the r-column matrix
 * M = W0 U — its rows (column-parallel W) or a partial product over its input columns
 * (row-parallel W) — the parts are gathered (and added in rank order), every rank takes the same
 * thin SVD of M and keeps its block of A and B, and subtracts its block of scale·B A from its W0
 * shard. The result equals ln_adapter_init's on the whole model, block by block.
 * cov(ctx, l, input) must return the whole d_in × d_in covariance on the rank that owns it (it is
 * not called on the others). *eigensolves (may be NULL) gets how many this rank ran. */
int ln_tp_init_lora_null(ln_model *shard, ln_adapter *ad, ln_covariance_fn cov, void *ctx, int *eigensolves,
                         ln_err *e);

/* Collective (every rank calls it): rebuilds the whole adapter's factors (full fine-tuning: every
 * weight) from all ranks' shards, by all-gathers. Ranks that pass full/full_ad (non-NULL) get them
 * written there — both of the same shape as the model and adapter that were sharded. */
int ln_tp_gather(ln_model *shard, ln_adapter *shard_ad, ln_model *full, ln_adapter *full_ad, ln_err *e);

/* Rank 0's decision, on every rank (a broadcast): ln_train uses it so that a pause or cancel seen
 * by rank 0's should_stop stops every rank after the same step. */
int ln_tp_agree(ln_model *shard, int *flag, ln_err *e);

/* Trains full_ad on `full` as `ranks` tensor-parallel ranks on threads (the thread backend):
 * each rank shards the model and adapter, runs ln_train on the same data (the same seeded order),
 * and at the end the trained shards are gathered back into full_ad (or full's weights for full
 * fine-tuning). on_row and should_stop are rank 0's (every rank stops after the step rank 0 saw a
 * stop at). With opts->out_dir, metrics.jsonl is written from rank 0's rows and the gathered
 * adapter (or model) is saved there at the end, as ln_train does. resume and eval must be NULL;
 * save_every is ignored: checkpoints of a sharded run are not written yet. res gets rank 0's
 * result. */
int ln_tp_train(ln_model *full, ln_adapter *full_ad, const ln_dataset *ds, const ln_train_opts *opts, int ranks,
                ln_train_result *res, ln_err *e);

#endif
