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
#include "common/safetensors.h"
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

/* Rank comm_rank(c)'s shard of the model in dir, read from its safetensors block by block
 * (ln_model_load_part): the whole model is never in memory. Bitwise ln_tp_shard_model of
 * ln_model_load's model; out->comm = c. Not collective. */
int ln_tp_load_shard(const char *dir, const lnb_backend *be, ln_comm *c, ln_model **out, ln_err *e);

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
    const lnb_backend *be;       /* the shard's, synced before X is read on the host (NULL: none) */
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

/* How one parameter of a shard (of its model, or of its adapter ad, may be NULL) is split: by
 * rows, by columns, or held whole by every rank (see the split above). Optimizer moments split
 * like their parameter. */
typedef enum { LN_TP_WHOLE = 0, LN_TP_ROWS, LN_TP_COLS } ln_tp_split;
ln_tp_split ln_tp_param_split(const ln_model *shard, const ln_adapter *ad, const ln_param *p);
/* Elements of the whole tensor whose block (p's shape) one of `ranks` ranks holds. */
int64_t ln_tp_whole_numel(const ln_param *p, ln_tp_split split, int ranks);
/* Collective: the whole tensor of which src (backend memory, p's shape) is this rank's block, into
 * dst (host memory, ln_tp_whole_numel floats; NULL on ranks that do not need it). A rank that
 * cannot allocate aborts the group (comm_abort) so that no rank waits for it. */
int ln_tp_gather_tensor(ln_comm *c, const lnb_backend *be, const ln_param *p, ln_tp_split split, const float *src,
                        float *dst, ln_err *e);
/* The inverse, with no communication: rank `rank`'s block (p's shape, host) of a whole tensor (host). */
void ln_tp_take_block(const ln_param *p, ln_tp_split split, int rank, int ranks, const float *whole, float *dst);

/* ---- whole tensors written from shards, one at a time (full fine-tuning: no rank holds the model) */

/* One tensor of a file written from the shards: its name in the file, this rank's block p (shape)
 * split as `split`, whose data src is in backend memory. */
typedef struct ln_tp_item {
    const char *name;
    const ln_param *p;
    ln_tp_split split;
    const float *src;
} ln_tp_item;
/* Collective: writes `path` on rank 0 from w (rank 0's writer, its metadata set; NULL elsewhere)
 * plus the n items, each the whole tensor gathered (ln_tp_gather_tensor) while the file is
 * written and stored as dt (F32, BF16 or F16): rank 0's transient memory is one whole tensor, never
 * the model. The same bytes as a writer given the whole tensors. On a failure the group is aborted. */
int ln_tp_write_gathered(ln_comm *c, const lnb_backend *be, st_writer *w, const ln_tp_item *items, int n, st_dtype dt,
                         const char *path, ln_err *e);
/* The items of every weight of the shard (ln_model_for_each_param's order, named as in the model
 * file) in a new array (free it) with room for `extra` more after them; *n of them filled. */
ln_tp_item *ln_tp_weight_items(ln_model *shard, int extra, int *n);
/* Collective: ln_model_save of the whole model the shards make up (config.json and model.safetensors
 * into dir, dtype F32/BF16/F16), written by rank 0 one gathered tensor at a time: the same bytes as
 * ln_model_save of the gathered model. */
int ln_tp_save_model(ln_model *shard, const char *dir, st_dtype dt, ln_err *e);

/* A stop seen by any rank's should_stop (a flag, 0/1), on every rank (an all-reduce): ln_train
 * uses it so that a pause or cancel seen by one rank stops every rank after the same step. */
int ln_tp_agree(ln_model *shard, int *flag, ln_err *e);

/* Collective: fails on every rank, naming the first rank that differs, unless every rank holds the
 * same training data (every example's tokens and labels), the same options that decide the
 * per-step collectives (steps, batch, pack, save_every, eval, out_dir, resume, optimizer…) and the
 * same initialised (or restored) adapter — every weight for full fine-tuning. Ranks in separate
 * processes validate, calibrate and initialise on their own: this is where a difference shows,
 * instead of as a hang or silently different shards. ad NULL (full then unused, may be NULL):
 * the data and options only — shards initialised collectively have nothing else to compare. */
int ln_tp_check_same(ln_comm *c, ln_model *full, ln_adapter *ad, const ln_dataset *ds, const ln_train_opts *o,
                     ln_err *e);

/* Trains one rank, comm_rank(c) of comm_size(c), of a tensor-parallel run; every rank of the group
 * calls it with its own copy of the whole model `full` and the whole adapter `full_ad` (built the
 * same way on every rank: ln_tp_check_same verifies it first), the same data and the same options.
 * The rank shards both, runs ln_train on its shard (the same seeded data order on every rank),
 * and at the end the trained shards are gathered back into rank 0's full_ad (full's weights for
 * full fine-tuning, after rank 0 wrote out_dir's model from the shards); the other ranks'
 * full/full_ad are left as they were.
 *  - Rank 0 reports: on_row, progress, and with out_dir metrics.jsonl, the checkpoints and the
 *    final adapter (or model). The other ranks write nothing (their out_dir only says that
 *    checkpoints are taken: pass the same options everywhere) and res->last_checkpoint stays "".
 *  - should_stop is polled on every rank; a stop seen by any rank stops every rank after the same
 *    step (with a checkpoint, as ln_train does).
 *  - Checkpoints (save_every, the last step, a stop) are collective: the adapter and the AdamW
 *    moments are gathered and rank 0 writes the same file ln_train writes on one rank. resume
 *    loads that file whatever rank count wrote it: pass a full_ad restored from it
 *    (ln_train_load_checkpoint on the whole model) on every rank; the moments are sharded here.
 *  - eval: at eval points the adapter is gathered into rank 0's full_ad and opts->eval is called
 *    on rank 0 with (full, full_ad); the other ranks wait for it, and fail if it failed.
 * On any failure the group is aborted (comm_abort) so the other ranks fail instead of waiting. */
int ln_tp_train_rank(ln_comm *c, ln_model *full, ln_adapter *full_ad, const ln_dataset *ds, const ln_train_opts *opts,
                     ln_train_result *res, ln_err *e);

/* ---- a rank that holds only its shard (the worker's multi-rank path; no rank holds the whole
 * model: ln_tp_load_shard, ln_calibrate on the shard, then these) ---- */

/* The whole model's shape without its weights (new, owned by the caller; ln_model_free): config,
 * tied flag, backend and every q…down param's name and dims, with w = NULL. Enough for what rank 0
 * does with "the whole model" of an adapter: allocate and gather the whole adapter, write
 * checkpoints, the final adapter and the PEFT export (none of which read a base weight). */
ln_model *ln_tp_whole_shape(const ln_model *shard);

/* Collective: initialises this rank's adapter shard sad for o->method, and on rank 0 the whole
 * adapter whole_ad (on `shape`, ln_tp_whole_shape; NULL on the other ranks) — the same factors
 * ln_adapter_init gives on the whole model, cut as ln_tp_shard_adapter cuts them:
 *  - lora, lora_fa: every rank draws the same seeded whole factors (small) and keeps its block;
 *    bitwise ln_adapter_init + ln_tp_shard_adapter.
 *  - lora_null_v1, lora_null_v2: ln_tp_init_lora_null on the shards (residual subtracted from
 *    each rank's own W0 block), gathered into rank 0's whole_ad with A0 = A, B0 = B, residual set.
 *    cov_everywhere: every rank can read o->covariance (thread ranks sharing rank 0's calibration:
 *    the eigensolves are spread over the ranks); else only rank 0 holds them (one process per
 *    rank) and rank 0 runs every solve. Equal to the whole-model init block by block (≤ 2.1e-8).
 *  - pissa, milora, corda (an SVD of each whole weight): one weight at a time, rank 0 gathers W0,
 *    runs ln_init_layer on it (the call ln_adapter_init makes) and broadcasts A, B and
 *    W0 − scale·B A; every rank keeps its blocks — bitwise the whole-model init. Transient memory
 *    on every rank: one whole weight and its factors. corda's covariances: rank 0's.
 *  - full: ln_adapter_init on the shard (every block of every weight trains); rank 0's whole_ad
 *    is the flag alone (full = 1, no factors).
 * *eigensolves (may be NULL): this rank's count. On failure the group is aborted. */
int ln_tp_adapter_init(ln_model *shard, ln_model *shape, const ln_adapter_opts *o, int cov_everywhere,
                       ln_adapter *sad, ln_adapter *whole_ad, int *eigensolves, ln_err *e);

/* Restores an adapter checkpoint (ln_train's state.safetensors, or its directory) onto shards:
 * every rank reads the (small) whole adapter, keeps its block in sad and, for a residual method,
 * subtracts scale·B0 A0's block from its own W0 block; rank 0 keeps the whole adapter in whole_ad
 * (NULL on the others). Transient memory: one weight of the whole model's largest shape (the
 * residual ln_train_load_checkpoint applies to `shape` lands there, unread). A full fine-tune's
 * checkpoint: each rank reads only its blocks of every weight from the mapped file (no whole
 * weight in memory); whole_ad is the flag alone. Not collective. */
int ln_tp_load_checkpoint(ln_model *shard, ln_model *shape, const char *path, ln_adapter *sad, ln_adapter *whole_ad,
                          ln_err *e);

/* ln_tp_train_rank for a rank that already holds its shard and adapter shard (from
 * ln_tp_load_shard and ln_tp_adapter_init / ln_tp_load_checkpoint), collective. full/full_ad:
 * on rank 0, what checkpoints, eval points and the end gather into (an adapter: ln_tp_whole_shape
 * and the whole adapter suffice); NULL on the other ranks. Full fine-tuning gathers nothing whole:
 * each checkpoint (weights, then AdamW moments) and out_dir's final model are written by rank 0
 * one gathered tensor at a time (ln_tp_write_gathered: the one-rank files, byte for byte), so
 * full/full_ad may be NULL there too (opts->eval, which needs the whole model, then may not be set).
 * on_row is called on every rank that passes one (ln_tp_train_rank passes rank 0's only), after
 * opts->eval (rank 0) and before the step's checkpoint — an on_row on every rank may run
 * collectives (an eval on the shards), the same ones on every rank. Rank 0 writes out_dir's final
 * adapter (or model). On any failure the group is aborted. */
int ln_tp_train_shard(ln_model *shard, ln_adapter *sad, ln_model *full, ln_adapter *full_ad, const ln_dataset *ds,
                      const ln_train_opts *opts, ln_train_result *res, ln_err *e);

/* Knowledge drift of a sharded adapter (drift.h's tracker, on rank 0): ln_tp_drift_new is
 * collective — every targeted weight's W0 block (for a residual adapter W0' = W0 − s·B0 A0, which
 * the tracker turns back into W0 with the whole adapter's A0/B0) is gathered onto rank 0 one layer
 * at a time, so rank 0's transient memory is one layer's weights, and the layer's denominators
 * tr(W0 C W0ᵀ) are taken from rank 0's covariances cov(cov_ctx, layer, input). sad: this rank's
 * adapter shard (which targets are tracked); whole_ad and shape: rank 0's (NULL elsewhere).
 * *out on every rank (the others' is empty). ln_tp_drift_measure, on rank 0 only, adds to row what
 * ln_drift_tracker_measure adds ("knowledge_drift" per module, its mean and max) for whole_ad —
 * gather the trained shards into it first (ln_tp_gather).
 * Full fine-tuning (sad->full; shape and whole_ad unused): every weight is tracked; each rank keeps
 * a host copy of its own blocks of the original W0 (1/R of the model), rank 0 the denominators,
 * from each W0 gathered whole one weight at a time. ln_tp_drift_measure_full is collective: each
 * rank's block of ΔW = W − W0 is gathered whole onto rank 0 one weight at a time, and rank 0 adds to
 * row what ln_drift_tracker_measure adds for a full fine-tune — the same numbers, bit for bit. */
typedef struct ln_tp_drift ln_tp_drift;
int ln_tp_drift_new(ln_model *shard, const ln_adapter *sad, ln_model *shape, const ln_adapter *whole_ad,
                    ln_covariance_fn cov, void *cov_ctx, ln_tp_drift **out, ln_err *e);
int ln_tp_drift_measure(ln_tp_drift *d, ln_model *shape, const ln_adapter *whole_ad, json_t *row, ln_err *e);
int ln_tp_drift_measure_full(ln_tp_drift *d, ln_model *shard, json_t *row, ln_err *e);
void ln_tp_drift_free(ln_tp_drift *d);

/* ln_tp_train_rank on `ranks` threads (the thread backend), each rank a thread of this process
 * sharing full/full_ad. on_row and should_stop are rank 0's; res gets rank 0's result. */
int ln_tp_train(ln_model *full, ln_adapter *full_ad, const ln_dataset *ds, const ln_train_opts *opts, int ranks,
                ln_train_result *res, ln_err *e);

#endif
