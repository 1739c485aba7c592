/* adapter.h — LoRA adapters (and full fine-tuning) on top of an ln_model.
 *
 * Contracts:
 *  - For target t of layer l, the adapted layer computes y = x W0ᵀ + scale · (x Aᵀ) Bᵀ with
 *    A (r × d_in) and B (d_out × r), row-major: exactly PEFT's lora_A.weight / lora_B.weight, and
 *    scale = alpha / r as PEFT. ad->lora[l * LN_NTARGET + t]; .A.w == NULL where t is not targeted.
 *  - Each factor is trainable or frozen on its own (A.trainable, B.trainable; lora_fa and
 *    lora_null_v2 freeze A). Base weights stay frozen unless ad->full.
 *  - Residual: a method may replace W0 by W0' = W0 − scale · B0 A0 (PiSSA, MiLoRA, CorDA, LoRA-Null):
 *    set A, B, then call ln_adapter_make_residual(); A0/B0 keep copies of the initial factors
 *    (export needs them; resume re-applies the residual from them, bit-identically).
 *  - ln_adapter_init(model, adapter, opts) is the one entry point for every method. This file
 *    implements "lora" (PEFT's default: A ~ kaiming_uniform(a=√5) = U(−1/√d_in, 1/√d_in), B = 0),
 *    "lora_fa" (same, A frozen) and "full" (no factors; every model weight trains). The other
 *    methods (pissa, milora, corda, lora_null_v1, lora_null_v2) are dispatched from the METHODS
 *    table in adapter.c to ln_init_layer() (lora_init.c) layer by layer; the calibrated ones read
 *    covariances through opts.covariance. An unknown method is a clear error.
 *  - Native save (ln_adapter_save) writes adapter.safetensors (PEFT key names for A/B; A0/B0 as
 *    ".lora_A0.weight"/".lora_B0.weight") with metadata {method, rank, alpha, targets}. For methods
 *    without a residual the same tensors form a PEFT adapter (ln_adapter_save_peft). */
#ifndef LN_ADAPTER_H
#define LN_ADAPTER_H

#include <stdint.h>

#include "common/err.h"
#include "worker/engine/model.h"

typedef struct ln_lora {
    ln_param A;        /* r × d_in */
    ln_param B;        /* d_out × r */
    float *A0, *B0;    /* initial factors of a residual; NULL otherwise (owned) */
} ln_lora;

typedef struct ln_adapter {
    char method[32];
    int rank;
    float alpha;
    float scale;         /* alpha / rank */
    unsigned targets;    /* bit mask (1u << ln_target) */
    int full;            /* every model weight trains, no factors */
    int residual;        /* W0 of every targeted layer was replaced by W0 − scale·B0A0 */
    int num_layers;
    ln_lora *lora;       /* num_layers × LN_NTARGET */
    const lnb_backend *be; /* whose memory the factors are in (set by ln_adapter_alloc; freed with its free) */
} ln_adapter;

/* Covariance of layer `layer`'s input `which` (d_in × d_in, row-major fp64), or NULL if none. */
typedef const double *(*ln_covariance_fn)(void *ctx, int layer, ln_input which);

/* What ln_adapter_init needs. Methods that need calibration (corda, lora_null_*) get each
 * layer input's covariance from covariance(method_ctx, layer, input). */
typedef struct ln_adapter_opts {
    const char *method;  /* lora | lora_fa | full | pissa | milora | corda | lora_null_v1 | lora_null_v2 */
    int rank;
    float alpha;         /* 0 = 2·rank for lora/lora_fa, rank (scale 1) for residual methods */
    unsigned targets;    /* 0 = all seven */
    uint64_t seed;
    ln_covariance_fn covariance;
    void *method_ctx;
} ln_adapter_opts;

/* An init function: fills ad (already allocated with zero factors) for model m. */
typedef int (*ln_adapter_init_fn)(ln_model *m, ln_adapter *ad, const ln_adapter_opts *o, ln_err *e);

/* Allocates zeroed factors for every targeted layer (both trainable, gradients allocated). */
int ln_adapter_alloc(const ln_model *m, ln_adapter *ad, const char *method, int rank, float alpha,
                     unsigned targets, ln_err *e);
/* Builds the adapter a method asks for (see the contract above). To freeze a factor after
 * init use ln_param_set_trainable(m->be, &lo->A, 0, e) (model.h). */
int ln_adapter_init(ln_model *m, ln_adapter *ad, const ln_adapter_opts *o, ln_err *e);
/* W0 ← W0 − scale·B A for every targeted layer; keeps A0 = A, B0 = B. */
int ln_adapter_make_residual(ln_model *m, ln_adapter *ad, ln_err *e);
/* A0 = A, B0 = B (a residual method's initial factors, in be's memory). */
int ln_lora_keep_initial(const lnb_backend *be, ln_lora *lo, ln_err *e);
/* W0 ← W0 − scale·B0 A0 for every targeted layer, from the kept A0/B0 (on a tensor-parallel
 * shard: its own blocks); sets ad->residual. */
int ln_adapter_apply_residual(ln_model *m, ln_adapter *ad, ln_err *e);
void ln_adapter_free(ln_adapter *ad);

/* Calls fn on every parameter of the adapter (A then B, layer by layer, target by target). */
void ln_adapter_for_each_param(ln_adapter *ad, void (*fn)(ln_param *p, void *ctx), void *ctx);

/* The native layout's tensors and metadata into an open writer (checkpoints add more to it). */
struct st_writer;
void ln_adapter_write(const ln_adapter *ad, struct st_writer *w);

/* Native adapter file (see contract). */
int ln_adapter_save(const ln_adapter *ad, const char *path, ln_err *e);
/* Loads a native or PEFT adapter (dir with adapter_model.safetensors + adapter_config.json, or a
 * native adapter.safetensors) onto m: allocates ad, and re-applies the residual if it has one. */
int ln_adapter_load(ln_model *m, const char *path, ln_adapter *ad, ln_err *e);
/* PEFT layout in dir: adapter_config.json + adapter_model.safetensors (A, B only). Refused for
 * residual methods, whose export (relative to the original W0) is lora_init's job. */
int ln_adapter_save_peft(const ln_adapter *ad, const ln_model *m, const char *dir, ln_err *e);
/* Writes DIR/adapter_config.json (PEFT LoRA, rank r, lora_alpha alpha, base_model or null). */
int ln_peft_write_config(const ln_adapter *ad, int r, float alpha, const char *base_model, const char *dir, ln_err *e);

#endif
