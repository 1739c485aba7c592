/* model.h — a LLaMA model in fp32: weights, forward and backward.
 *
 * Contracts (for the trainer, calibration, init methods and export):
 *  (a) Weights by layer and target: m->layers[l].lin[t] for t in ln_target (q,k,v,o,gate,up,down),
 *      each an ln_param holding W (d_out × d_in, row-major, as HF stores it: y = x Wᵀ).
 *      ln_model_target_dims() gives d_out/d_in; ln_target_module() the HF module name
 *      ("self_attn.q_proj"), so the HF tensor name is model.layers.{l}.{module}.weight.
 *      Embeddings, norms and lm_head are m->embed, layers[l].attn_norm/mlp_norm, m->norm, m->lm_head
 *      (lm_head.w == embed.w when the checkpoint ties them; then lm_head.g is embed.g too).
 *  (b) Adapters are in adapter.h; forward/backward take one (or NULL for the bare model).
 *  (c) Calibration hook: ln_fwd_opts.hook is called during the forward pass with each distinct
 *      linear-layer input: LN_IN_QKV (input of q,k,v), LN_IN_O, LN_IN_GATEUP (gate,up), LN_IN_DOWN;
 *      X is (B·T × d_in) row-major, rows of padding included (call with B=1 and no padding to get
 *      exactly one sample's X_s). X lives only for the call. Set no_logits to stop after the
 *      last layer (calibration needs no lm_head).
 * Memory: activations for one batch live in an ln_acts the caller owns (sized on demand). A forward
 *      that no backward can follow — no_logits (calibration) or trained_rows_only without
 *      head_grad_scale (an evaluation's loss) — keeps one layer's intermediates (reused by every
 *      layer), two residual-stream buffers and no backward scratch (and, with no_logits, no final
 *      norm or logits): bitwise the same results; ln_model_backward after it fails.
 * Ownership: the model owns every weight and gradient buffer; ln_model_free releases them. */
#ifndef LN_MODEL_H
#define LN_MODEL_H

#include <stdint.h>

#include "common/err.h"
#include "worker/backend/backend.h"
#include "worker/backend/comm/comm.h"
#include "worker/engine/config.h"

typedef enum { LN_Q, LN_K, LN_V, LN_O, LN_GATE, LN_UP, LN_DOWN, LN_NTARGET } ln_target;
typedef enum { LN_IN_QKV, LN_IN_O, LN_IN_GATEUP, LN_IN_DOWN, LN_NINPUT } ln_input;

#define LN_TARGETS_ALL 0x7Fu

/* "q","k","v","o","gate","up","down" */
const char *ln_target_name(ln_target t);
/* "self_attn.q_proj", ..., "mlp.down_proj" */
const char *ln_target_module(ln_target t);
/* The input a target reads (q,k,v share LN_IN_QKV; gate,up share LN_IN_GATEUP). */
ln_input ln_target_input(ln_target t);
/* Parses "q,k,v,o,gate,up,down" (also q_proj, ... and "all") into a bit mask (1u << t). */
int ln_targets_parse(const char *list, unsigned *mask, ln_err *e);

/* One trainable-or-frozen tensor. g is NULL unless trainable. */
typedef struct ln_param {
    char name[128];      /* HF (or PEFT) tensor name */
    float *w;
    float *g;
    int64_t n;
    int rows, cols;      /* 2-D shape; a vector is rows = n, cols = 1 */
    int ndim;
    int trainable;
    int decay;           /* weight decay applies (matrices yes, norms no) */
    int owned;           /* w belongs to this param (false for a tied lm_head) */
    int frozen;          /* handed to the backend's freeze (ln_model_freeze_frozen) until thawed */
} ln_param;

typedef struct ln_layer {
    ln_param attn_norm, mlp_norm;   /* input_layernorm, post_attention_layernorm */
    ln_param lin[LN_NTARGET];
} ln_layer;

typedef struct ln_model {
    ln_config cfg;
    const lnb_backend *be;
    ln_param embed, norm, lm_head;
    ln_layer *layers;
    int tied;
    float *rope_cos, *rope_sin;  /* (rope_T, head_dim/2), in the backend's memory (grown by a forward) */
    int rope_T;
    /* Tensor parallelism (tensor_parallel.h): this model is one rank's shard and the passes sum
     * row-parallel outputs (and column-parallel input gradients) over comm. NULL = whole model.
     * A failed collective is kept in comm_err and returned by the pass. Borrowed, not owned. */
    ln_comm *comm;
    int comm_failed;
    ln_err comm_err;
    /* Activation recomputation: when set, the forward keeps only each layer's input (one shared
     * set of buffers serves every layer's intermediates) and the backward re-runs each layer's
     * forward before its backward — about one more forward of compute for (L−1)/L of the
     * activation memory. The results are bit-identical to keeping everything. */
    int recompute;
    /* ln_model_freeze_frozen ran and ln_model_thaw has not: the frozen weights may be kept by the
     * backend in a faster form and must not change. */
    int frozen;
} ln_model;

void ln_model_target_dims(const ln_config *c, ln_target t, int *d_out, int *d_in);

/* Loads config.json + safetensors (single or sharded; F32/F16/BF16) from dir into fp32.
 * Every tensor is checked against the config; a mismatch names the tensor, its shape and
 * the config fields. */
int ln_model_load(const char *dir, const lnb_backend *be, ln_model **out, ln_err *e);
/* Rank `rank` of `ranks` tensor-parallel ranks' shard of the model in dir (tensor_parallel.h's
 * split: q, k, v, gate, up by output rows; o, down by input columns; embeddings, norms and lm_head
 * whole), read block by block from the mapped safetensors: the whole model is never in memory.
 * The shard's config has num_heads, num_kv_heads and intermediate_size divided by ranks (an error
 * names the one that does not divide) and tie_word_embeddings as loaded. Bitwise the block
 * ln_tp_shard_model cuts from ln_model_load's model; m->comm is left NULL (ln_tp_load_shard sets it).
 * ranks 1 is ln_model_load. */
int ln_model_load_part(const char *dir, const lnb_backend *be, int rank, int ranks, ln_model **out, ln_err *e);
/* A model with random weights (normal(0, 0.02) matrices, unit norms), seeded. */
int ln_model_new_random(const ln_config *c, const lnb_backend *be, uint64_t seed, ln_model **out, ln_err *e);
/* Writes config.json + model.safetensors (dtype F32/BF16/F16) into dir. */
int ln_model_save(const ln_model *m, const char *dir, int st_dtype_code, ln_err *e);
void ln_model_free(ln_model *m);

/* ---------------------------------------------------------------- device hooks (backend.h) */

struct ln_adapter;

/* Hands the backend's freeze every model weight a matmul reads that stays frozen for what follows:
 * each layer's seven linear weights and lm_head (the embedding's storage when tied) — those not
 * trainable; none when ad is a full fine-tune (ad NULL: the bare model). The embedding of an untied
 * model (a row lookup) and the norms are never frozen, nor is any adapter factor. Call it once the
 * weights are final for a GEMM-heavy phase: after a residual method's init rewrote W0 (or a resume
 * re-applied it), never before. ln_train calls it itself (and thaws what it froze when it returns);
 * a caller may freeze earlier to cover its own forwards (evaluations), and ln_train leaves that to
 * it. Logs "bf16 weights: N frozen (X MiB)" when the backend kept a faster form. A no-op on a
 * backend without freeze (the CPU) and on a model already frozen. On failure nothing stays frozen. */
int ln_model_freeze_frozen(ln_model *m, const struct ln_adapter *ad, ln_err *e);
/* Thaws every weight ln_model_freeze_frozen froze. Call it before anything changes or frees a weight
 * (a merge, full fine-tuning: ln_model_set_full_training and ln_param_set_trainable thaw what they
 * touch; ln_model_free thaws first). */
void ln_model_thaw(ln_model *m);
/* 0 when the backend has no check hook or it reports nothing; else −1 with "<backend> device error
 * <where>: <its first error>" (where is printf-style, e.g. "at train step %lld"). */
int ln_model_check_device(const ln_model *m, ln_err *e, const char *where_fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Before host code reads or writes be's tensors directly (not through upload/download): waits for
 * the backend's queued calls (backend.h: sync). 0 when be (or its sync hook: the CPU) is NULL or all is well;
 * else −1 with "<backend> device error <where>: <its first error>", as ln_model_check_device. */
int ln_backend_sync(const lnb_backend *be, ln_err *e, const char *where_fmt, ...) __attribute__((format(printf, 3, 4)));

/* Makes p trainable (allocating a zeroed gradient) or frozen (freeing it). */
int ln_param_set_trainable(const lnb_backend *be, ln_param *p, int trainable, ln_err *e);

/* Marks every weight trainable (full fine-tuning) and allocates gradients. */
int ln_model_set_full_training(ln_model *m, ln_err *e);

/* Calls fn on every parameter of the model in a fixed order. */
void ln_model_for_each_param(ln_model *m, void (*fn)(ln_param *p, void *ctx), void *ctx);

/* ---------------------------------------------------------------- batches */

/* B sequences of T tokens, right-padded. targets[b·T+t] is the id position t must predict
 * (labels shifted by one, transformers' convention) or −100 where no loss is taken. */
typedef struct ln_batch {
    int B, T;
    int32_t *ids;
    int32_t *targets;
    int64_t n_targets;  /* count of targets ≥ 0 */
} ln_batch;

/* ---------------------------------------------------------------- passes */

/* Rows of logits alive at once in trained_rows_only mode (memory: LN_HEAD_CHUNK × V floats). */
#define LN_HEAD_CHUNK 1024

typedef void (*ln_input_hook)(int layer, ln_input which, const float *X, int tokens, int d_in, void *ctx);

typedef struct ln_fwd_opts {
    ln_input_hook hook;
    void *hook_ctx;
    int no_logits;       /* stop after the last layer: no final norm, no lm_head, no loss */
    int trained_rows_only; /* lm_head and loss only on rows whose target is ≥ 0, LN_HEAD_CHUNK
                            * rows at a time (training, evaluation): ln_acts_logits is then not the
                            * batch's logits */
    const int32_t *segment; /* NULL, or packed rows (data.h's ln_packed_row.segment, B·T): tokens
                             * attend only within their segment and RoPE positions restart at 0 in
                             * each — every packed example computes exactly what it would alone.
                             * The following ln_model_backward keeps the same segments. */
    float head_grad_scale;   /* with trained_rows_only, ≠ 0: the lm_head's backward runs inside the
                            * forward with this loss scale (no N × V logits are ever kept); the
                            * following ln_model_backward must pass the same scale */
} ln_fwd_opts;

typedef struct ln_acts ln_acts;
struct ln_adapter;

ln_acts *ln_acts_new(void);
void ln_acts_free(const ln_model *m, ln_acts *a);
/* Logits (B·T × V) of the last forward pass (before ln_model_backward overwrites them). */
const float *ln_acts_logits(const ln_acts *a);

/* Forward over a batch. Returns 0 and sets *loss_sum (Σ −log p over targets ≥ 0) unless
 * opts->no_logits. Fails only on out-of-memory or a token id outside the vocabulary. */
int ln_model_forward(ln_model *m, const struct ln_adapter *ad, ln_acts *acts, const ln_batch *b,
                     const ln_fwd_opts *opts, double *loss_sum, ln_err *e);
/* Backward of the last forward: the loss is Σ loss · loss_scale (use 1/trained tokens of the
 * whole optimizer step). Gradients ACCUMULATE into every trainable param's g. */
int ln_model_backward(ln_model *m, struct ln_adapter *ad, ln_acts *acts, const ln_batch *b, float loss_scale,
                      ln_err *e);

#endif
