/* optim.c — AdamW, the warmup+cosine schedule, gradient norms (see optim.h). */
#include <math.h>
#include <stdlib.h>

#include "common/util.h"
#include "worker/engine/optim.h"

ln_optim_cfg ln_optim_defaults(void)
{
    ln_optim_cfg c = {.lr = 2e-4f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.0f,
                      .max_grad_norm = 1.0f, .total_steps = 1, .warmup_steps = 0};
    return c;
}

float ln_lr_at(const ln_optim_cfg *c, int64_t s)
{
    int64_t W = c->warmup_steps, S = c->total_steps;
    if (s < W) return c->lr * (float)((double)s / (double)(W > 1 ? W : 1));
    double progress = (double)(s - W) / (double)(S - W > 1 ? S - W : 1);
    double f = 0.5 * (1.0 + cos(M_PI * progress));
    return c->lr * (float)(f > 0 ? f : 0);
}

int ln_optim_init(ln_optim *o, const lnb_backend *be, ln_param **params, int n, const ln_optim_cfg *cfg, ln_err *e)
{
    o->cfg = *cfg;
    o->be = be;
    o->n = n;
    o->params = params;
    o->step = 0;
    o->m = ln_xcalloc((size_t)(n ? n : 1), sizeof(float *));
    o->v = ln_xcalloc((size_t)(n ? n : 1), sizeof(float *));
    for (int i = 0; i < n; i++) {
        o->m[i] = be->alloc((size_t)params[i]->n * sizeof(float));
        o->v[i] = be->alloc((size_t)params[i]->n * sizeof(float));
        if (!o->m[i] || !o->v[i]) {
            ln_optim_free(o);
            return ln_errf(e, "out of memory allocating AdamW moments for %s", params[i]->name);
        }
    }
    return 0;
}

void ln_optim_free(ln_optim *o)
{
    for (int i = 0; i < o->n; i++) {
        if (o->m) o->be->free(o->m[i]);
        if (o->v) o->be->free(o->v[i]);
    }
    free(o->m);
    free(o->v);
    o->m = o->v = NULL;
    o->n = 0;
}

void ln_optim_zero_grad(ln_optim *o)
{
    for (int i = 0; i < o->n; i++) o->be->zero(o->params[i]->g, o->params[i]->n);
}

/* sums[i] = Σ x² of every parameter's gradient (grads) or weight: through the backend's
 * sumsq_many where it has one (one wait on a device for all of them, the same bits), else one sumsq
 * each. Returns sums (malloc'd, the caller frees) or NULL when the batch could not be made. */
static double *param_sumsq(const ln_optim *o, int grads)
{
    if (!o->be->sumsq_many || o->n <= 0) return NULL;
    const float **x = malloc((size_t)o->n * sizeof *x);
    int64_t *n = malloc((size_t)o->n * sizeof *n);
    double *sums = malloc((size_t)o->n * sizeof *sums);
    if (x && n && sums) {
        for (int i = 0; i < o->n; i++) {
            x[i] = grads ? o->params[i]->g : o->params[i]->w;
            n[i] = o->params[i]->n;
        }
        if (o->be->sumsq_many(o->n, x, n, sums) != 0) {
            free(sums);
            sums = NULL;
        }
    } else {
        free(sums);
        sums = NULL;
    }
    free(x);
    free(n);
    return sums;
}

double ln_optim_grad_norm(const ln_optim *o)
{
    double ss = 0.0, *sums = param_sumsq(o, 1);
    for (int i = 0; i < o->n; i++) ss += sums ? sums[i] : o->be->sumsq(o->params[i]->g, o->params[i]->n);
    free(sums);
    return sqrt(ss);
}

int ln_optim_first_nonfinite(const ln_optim *o)
{
    /* Σ w² in double is finite for any finite float weights (|w| < 2^128, n < 2^60), so a
     * non-finite sum means a NaN or inf among them. */
    double *sums = param_sumsq(o, 0);
    int bad = -1;
    for (int i = 0; i < o->n && bad < 0; i++)
        if (!isfinite(sums ? sums[i] : o->be->sumsq(o->params[i]->w, o->params[i]->n))) bad = i;
    free(sums);
    return bad;
}

void ln_optim_step(ln_optim *o, float lr, float gscale)
{
    o->step++;
    /* bias corrections 1 − βᵗ, in double then rounded, as torch computes them in Python floats */
    float bc1 = (float)(1.0 - pow((double)o->cfg.beta1, (double)o->step));
    float bc2 = (float)(1.0 - pow((double)o->cfg.beta2, (double)o->step));
    for (int i = 0; i < o->n; i++) {
        ln_param *p = o->params[i];
        float wd = p->decay ? o->cfg.weight_decay : 0.0f;
        o->be->adamw(p->w, p->g, o->m[i], o->v[i], p->n, gscale, lr, o->cfg.beta1, o->cfg.beta2, o->cfg.eps, wd, bc1,
                     bc2);
    }
}
