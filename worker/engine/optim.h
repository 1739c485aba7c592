/* optim.h — AdamW with fp32 moments, linear warmup then cosine decay, global-norm clipping.
 *
 * Matches torch.optim.AdamW (decoupled weight decay: p ← p − lr·wd·p before the Adam step) and
 * transformers' get_cosine_schedule_with_warmup: the update with 0-based index s uses
 *   lr(s) = lr · s / max(1, W)                                 for s < W
 *   lr(s) = lr · max(0, ½(1 + cos(π · (s − W) / max(1, S − W))))   otherwise
 * (so with W > 0 the first update has lr 0, as there). Clipping as torch's clip_grad_norm_:
 * coefficient min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ over every trainable gradient.
 * Weight decay skips params with decay = 0 (norm weights), as transformers' Trainer does. */
#ifndef LN_OPTIM_H
#define LN_OPTIM_H

#include <stdint.h>

#include "common/err.h"
#include "worker/engine/model.h"

typedef struct ln_optim_cfg {
    float lr, beta1, beta2, eps, weight_decay;
    float max_grad_norm;       /* ≤ 0: no clipping */
    int64_t total_steps, warmup_steps;
} ln_optim_cfg;

/* Defaults: lr 2e-4, betas (0.9, 0.999), eps 1e-8, wd 0, max_grad_norm 1. */
ln_optim_cfg ln_optim_defaults(void);

typedef struct ln_optim {
    ln_optim_cfg cfg;
    const lnb_backend *be;
    int n;
    ln_param **params;     /* borrowed; the trainable ones, in a fixed order */
    float **m, **v;        /* owned; one pair per param */
    int64_t step;          /* updates done so far */
} ln_optim;

float ln_lr_at(const ln_optim_cfg *c, int64_t s);

int ln_optim_init(ln_optim *o, const lnb_backend *be, ln_param **params, int n, const ln_optim_cfg *cfg, ln_err *e);
void ln_optim_free(ln_optim *o);
void ln_optim_zero_grad(ln_optim *o);
/* √(Σ g²) over every param (deterministic). */
double ln_optim_grad_norm(const ln_optim *o);
/* The first param whose weights hold a NaN or inf (an update that overflowed), or -1. */
int ln_optim_first_nonfinite(const ln_optim *o);
/* One update with learning rate lr, gradients multiplied by gscale (the clipping coefficient). */
void ln_optim_step(ln_optim *o, float lr, float gscale);

#endif
