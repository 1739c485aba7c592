/* drift_tracker.c — per-layer knowledge drift of a model during training (see drift.h). */
#include "worker/engine/drift.h"

#include <stdio.h>
#include <stdlib.h>

#include "common/util.h"
#include "worker/engine/nullspace.h"

typedef struct drift_layer {
    int layer;
    ln_target t;
    const double *C;
    double den;      /* tr(W0 C W0ᵀ) */
    float *W0;       /* full fine-tuning only: the original weight (owned) */
} drift_layer;

struct ln_drift_tracker {
    drift_layer *l;
    int n;
};

void ln_drift_tracker_free(ln_drift_tracker *t) {
    if (!t) return;
    for (int i = 0; i < t->n; i++) free(t->l[i].W0);
    free(t->l);
    free(t);
}

int ln_drift_tracker_denominator(const ln_drift_tracker *t, int layer, ln_target target, double *den) {
    for (int i = 0; i < t->n; i++)
        if (t->l[i].layer == layer && t->l[i].t == target) {
            *den = t->l[i].den;
            return 0;
        }
    return -1;
}

/* A host copy of a weight (the backend may hold it elsewhere). */
static float *download_w(const ln_model *m, const ln_param *p, const char *what, int layer, ln_target t, ln_err *e) {
    float *h = ln_try_allocf((size_t)p->n, sizeof(float), e, "knowledge drift", "%s of layer %d %s", what, layer,
                             ln_target_module(t));
    if (h) m->be->download(h, p->w, (size_t)p->n * sizeof(float));
    return h;
}

/* Host copies of a layer's factors: *A, *B, and when initial is set *A0, *B0 (one buffer at *A). */
static int download_factors(const ln_model *m, const ln_lora *lo, int initial, float **A, float **B, float **A0,
                            float **B0, int layer, ln_target t, ln_err *e) {
    const size_t na = (size_t)lo->A.n, nb = (size_t)lo->B.n;
    float *h = ln_try_allocf((na + nb) * (initial ? 2 : 1), sizeof(float), e, "knowledge drift",
                             "host copies of the rank-%d factors of layer %d %s", lo->A.rows, layer,
                             ln_target_module(t));
    if (!h) return -1;
    *A = h;
    *B = h + na;
    m->be->download(*A, lo->A.w, na * sizeof(float));
    m->be->download(*B, lo->B.w, nb * sizeof(float));
    if (initial) {
        *A0 = *B + nb;
        *B0 = *A0 + na;
        m->be->download(*A0, lo->A0, na * sizeof(float));
        m->be->download(*B0, lo->B0, nb * sizeof(float));
    }
    return 0;
}

int ln_drift_tracker_new(ln_model *m, const ln_adapter *ad, ln_covariance_fn cov, void *cov_ctx,
                         ln_drift_tracker **out, ln_err *e) {
    ln_drift_tracker *t = ln_xcalloc(1, sizeof *t);
    const int L = m->cfg.num_layers;
    t->l = ln_xcalloc((size_t)L * LN_NTARGET, sizeof *t->l);
    for (int l = 0; l < L; l++)
        for (int k = 0; k < LN_NTARGET; k++) {
            const ln_lora *lo = ad->full ? NULL : &ad->lora[l * LN_NTARGET + k];
            if (!ad->full && !lo->A.w) continue;
            const double *C = cov(cov_ctx, l, ln_target_input((ln_target)k));
            if (!C) {
                ln_drift_tracker_free(t);
                return ln_errf(e, "knowledge drift: no covariance for layer %d %s (calibrate with its input)", l,
                               ln_target_module((ln_target)k));
            }
            const ln_param *W = &m->layers[l].lin[k];
            drift_layer *d = &t->l[t->n++];
            d->layer = l;
            d->t = (ln_target)k;
            d->C = C;
            float *w0 = download_w(m, W, "a copy of the original weight", l, (ln_target)k, e);
            int rc = w0 ? 0 : -1;
            if (rc == 0 && !ad->full && ad->residual) {
                /* W0 = W0' + s·B0 A0, rebuilt in fp64 and rounded once by the routine that made W0'
                 * (with −s), so this is W0 up to fp32 rounding. */
                float *A, *B, *A0, *B0;
                rc = download_factors(m, lo, 1, &A, &B, &A0, &B0, l, (ln_target)k, e);
                if (rc == 0) {
                    rc = ln_residual_apply(w0, W->rows, W->cols, B0, A0, lo->A.rows, -(double)ad->scale, e);
                    if (rc != 0) ln_err_prefix(e, "knowledge drift, layer %d %s", l, ln_target_module((ln_target)k));
                    free(A);
                }
            }
            if (rc == 0 && ln_drift_quad_dense(w0, W->rows, W->cols, C, &d->den, e) != 0)
                rc = ln_err_prefix(e, "knowledge drift, layer %d %s", l, ln_target_module((ln_target)k));
            if (rc != 0) {
                free(w0);
                ln_drift_tracker_free(t);
                return -1;
            }
            if (ad->full) d->W0 = w0;
            else free(w0);
        }
    *out = t;
    return 0;
}

int ln_drift_tracker_measure(ln_drift_tracker *t, ln_model *m, const ln_adapter *ad, json_t *row, ln_err *e) {
    json_t *per = json_object();
    double sum = 0, mx = 0;
    char name[160];
    for (int i = 0; i < t->n; i++) {
        drift_layer *d = &t->l[i];
        const ln_param *W = &m->layers[d->layer].lin[d->t];
        double num = 0;
        int rc;
        if (ad->full) {
            float *w = download_w(m, W, "a copy of the trained weight", d->layer, d->t, e);
            rc = w ? 0 : -1;
            if (rc == 0) {
                for (int64_t k = 0; k < W->n; k++) w[k] -= d->W0[k];
                if (ln_drift_quad_dense(w, W->rows, W->cols, d->C, &num, e) != 0)
                    rc = ln_err_prefix(e, "knowledge drift, layer %d %s", d->layer, ln_target_module(d->t));
            }
            free(w);
        } else {
            const ln_lora *lo = &ad->lora[d->layer * LN_NTARGET + d->t];
            float *A, *B, *A0 = NULL, *B0 = NULL;
            rc = download_factors(m, lo, ad->residual, &A, &B, &A0, &B0, d->layer, d->t, e);
            if (rc == 0) {
                if (ln_drift_quad_lowrank(B, A, lo->A.rows, B0, A0, A0 ? lo->A.rows : 0, lo->B.rows, lo->A.cols,
                                          (double)ad->scale, d->C, &num, e) != 0)
                    rc = ln_err_prefix(e, "knowledge drift, layer %d %s", d->layer, ln_target_module(d->t));
                free(A);
            }
        }
        if (rc != 0) {
            json_decref(per);
            return -1;
        }
        double v = ln_drift_ratio(num, d->den);
        snprintf(name, sizeof name, "model.layers.%d.%s", d->layer, ln_target_module(d->t));
        json_object_set_new(per, name, json_real(v));
        sum += v;
        if (v > mx) mx = v;
    }
    json_object_set_new(row, "knowledge_drift", per);
    json_object_set_new(row, "knowledge_drift_mean", json_real(t->n ? sum / t->n : 0.0));
    json_object_set_new(row, "knowledge_drift_max", json_real(mx));
    return 0;
}
