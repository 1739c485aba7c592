/* drift_tracker.c — per-layer knowledge drift of a model during training (see drift.h). */
#include "worker/engine/drift.h"

#include <stdio.h>
#include <stdlib.h>

#include "common/util.h"

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

static float *download_w(const ln_model *m, const ln_param *p, ln_err *e) {
    float *h = ln_try_alloc((size_t)p->n * sizeof(float), "drift: weight copy", e);
    if (h) m->be->download(h, p->w, (size_t)p->n * sizeof(float));
    return h;
}

/* W0 = W' + s·B0 A0 rebuilt from the residual in fp64 and rounded once (the residual was
 * computed the other way round, so this is W0 up to fp32 rounding). */
static void add_back_initial(float *W, const ln_lora *lo, const ln_model *m, double s) {
    const int r = lo->A.rows, d_in = lo->A.cols, d_out = lo->B.rows;
    float *A0 = ln_xmalloc((size_t)r * d_in * sizeof(float)), *B0 = ln_xmalloc((size_t)d_out * r * sizeof(float));
    m->be->download(A0, lo->A0, (size_t)r * d_in * sizeof(float));
    m->be->download(B0, lo->B0, (size_t)d_out * r * sizeof(float));
    double *row = ln_xmalloc((size_t)d_in * sizeof(double));
    for (int o = 0; o < d_out; o++) {
        for (int c = 0; c < d_in; c++) row[c] = 0.0;
        for (int k = 0; k < r; k++) {
            double b = s * B0[(size_t)o * r + k];
            const float *a = A0 + (size_t)k * d_in;
            for (int c = 0; c < d_in; c++) row[c] += b * a[c];
        }
        float *w = W + (size_t)o * d_in;
        for (int c = 0; c < d_in; c++) w[c] = (float)((double)w[c] + row[c]);
    }
    free(row);
    free(A0);
    free(B0);
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
            float *w0 = download_w(m, W, e);
            if (!w0) {
                ln_drift_tracker_free(t);
                return -1;
            }
            if (!ad->full && ad->residual) add_back_initial(w0, lo, m, (double)ad->scale);
            drift_layer *d = &t->l[t->n++];
            d->layer = l;
            d->t = (ln_target)k;
            d->C = C;
            d->den = ln_drift_quad_dense(w0, W->rows, W->cols, C);
            if (d->den < 0) {
                free(w0);
                ln_drift_tracker_free(t);
                return ln_errf(e, "knowledge drift: out of memory for layer %d", l);
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
        double num;
        if (ad->full) {
            float *w = download_w(m, W, e);
            if (!w) {
                json_decref(per);
                return -1;
            }
            for (int64_t k = 0; k < W->n; k++) w[k] -= d->W0[k];
            num = ln_drift_quad_dense(w, W->rows, W->cols, d->C);
            free(w);
        } else {
            const ln_lora *lo = &ad->lora[d->layer * LN_NTARGET + d->t];
            const int r = lo->A.rows, d_in = lo->A.cols, d_out = lo->B.rows;
            size_t na = (size_t)r * d_in * sizeof(float), nb = (size_t)d_out * r * sizeof(float);
            float *A = ln_xmalloc(na), *B = ln_xmalloc(nb), *A0 = NULL, *B0 = NULL;
            m->be->download(A, lo->A.w, na);
            m->be->download(B, lo->B.w, nb);
            if (ad->residual) {
                A0 = ln_xmalloc(na);
                B0 = ln_xmalloc(nb);
                m->be->download(A0, lo->A0, na);
                m->be->download(B0, lo->B0, nb);
            }
            num = ln_drift_quad_lowrank(B, A, r, B0, A0, A0 ? r : 0, d_out, d_in, (double)ad->scale, d->C);
            free(A);
            free(B);
            free(A0);
            free(B0);
        }
        if (num < 0) {
            json_decref(per);
            return ln_errf(e, "knowledge drift: out of memory for layer %d", d->layer);
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
