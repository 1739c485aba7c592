/* export.c — PEFT adapter export relative to the original base weights, and merged checkpoints
 * (see export.h). */
#include "worker/engine/export.h"

#include <cblas.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/engine/lora_init.h"

/* ---------------------------------------------------------------- shapes */

typedef enum { EXPORT_PLAIN, EXPORT_DOUBLE_RANK, EXPORT_FROZEN_A } export_kind;

static export_kind kind_of(const ln_adapter *ad) {
    if (!ad->residual) return EXPORT_PLAIN;
    ln_method me;
    if (ln_method_parse(ad->method, &me, NULL) == 0 && !ln_method_trains_a(me)) return EXPORT_FROZEN_A;
    return EXPORT_DOUBLE_RANK;
}

void ln_export_peft_shape(const ln_adapter *ad, int *r_out, float *alpha_out) {
    int two = kind_of(ad) == EXPORT_DOUBLE_RANK;
    *r_out = two ? 2 * ad->rank : ad->rank;
    *alpha_out = two ? 2.0f * ad->alpha : ad->alpha;
}

int ln_export_base_dtype(const ln_config *cfg) {
    if (strcmp(cfg->torch_dtype, "bfloat16") == 0) return ST_BF16;
    if (strcmp(cfg->torch_dtype, "float16") == 0) return ST_F16;
    return ST_F32;
}

/* Host copies of one layer's factors (the backend may hold them elsewhere). */
typedef struct {
    float *A, *B, *A0, *B0;
    int r, d_out, d_in;
} host_factors;

static int fetch(const ln_model *m, const ln_lora *lo, int residual, host_factors *h, const char *area, ln_err *e) {
    memset(h, 0, sizeof *h);
    h->r = lo->A.rows;
    h->d_in = lo->A.cols;
    h->d_out = lo->B.rows;
    size_t na = (size_t)lo->A.n * sizeof(float), nb = (size_t)lo->B.n * sizeof(float);
    h->A = ln_try_allocf(na, 1, e, area, "a host copy of %s", lo->A.name);
    h->B = h->A ? ln_try_allocf(nb, 1, e, area, "a host copy of %s", lo->B.name) : NULL;
    if (!h->A || !h->B) return -1;
    m->be->download(h->A, lo->A.w, na);
    m->be->download(h->B, lo->B.w, nb);
    if (residual) {
        if (!lo->A0 || !lo->B0) return ln_errf(e, "%s: %s has a residual but no initial factors", area, lo->A.name);
        h->A0 = ln_try_allocf(na, 1, e, area, "a host copy of the initial factor of %s", lo->A.name);
        h->B0 = h->A0 ? ln_try_allocf(nb, 1, e, area, "a host copy of the initial factor of %s", lo->B.name) : NULL;
        if (!h->A0 || !h->B0) return -1;
        m->be->download(h->A0, lo->A0, na);
        m->be->download(h->B0, lo->B0, nb);
    }
    return 0;
}

static void release(host_factors *h) {
    free(h->A);
    free(h->B);
    free(h->A0);
    free(h->B0);
    memset(h, 0, sizeof *h);
}

/* ---------------------------------------------------------------- PEFT adapter */

int ln_export_peft(const ln_model *m, const ln_adapter *ad, const char *base_model, const char *dir, ln_err *e) {
    if (ad->full) return ln_errf(e, "export: a full fine-tune has no adapter; use --merge to write the model");
    if (ln_mkdir_p(dir, e) != 0) return -1;
    export_kind kind = kind_of(ad);
    int r2;
    float alpha2;
    ln_export_peft_shape(ad, &r2, &alpha2);
    const int n = ad->num_layers * LN_NTARGET;
    /* The writer keeps references: the exported tensors live until the file is written. */
    float **keep = ln_xcalloc((size_t)n * 2, sizeof *keep);
    char (*names)[2][160] = ln_xcalloc((size_t)n, sizeof *names);
    st_writer *w = st_writer_new();
    st_writer_meta(w, "format", "pt");
    st_writer_meta(w, "loranull_method", ad->method);
    int rc = -1;
    for (int l = 0; l < ad->num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            int i = l * LN_NTARGET + t;
            const ln_lora *lo = &ad->lora[i];
            if (!lo->A.w) continue;
            host_factors h;
            if (fetch(m, lo, ad->residual, &h, "export", e) != 0) {
                release(&h);
                goto out;
            }
            const int r = h.r, d_in = h.d_in, d_out = h.d_out;
            float *A2 = NULL, *B2 = NULL;
            if (kind != EXPORT_PLAIN) {
                size_t ra = kind == EXPORT_DOUBLE_RANK ? 2 * (size_t)r : (size_t)r;
                A2 = ln_try_allocf(ra * d_in, sizeof(float), e, "export", "the PEFT factor lora_A of layer %d %s", l,
                                   ln_target_module((ln_target)t));
                B2 = A2 ? ln_try_allocf((size_t)d_out * ra, sizeof(float), e, "export",
                                        "the PEFT factor lora_B of layer %d %s", l, ln_target_module((ln_target)t))
                        : NULL;
                if (!B2) {
                    free(A2);
                    release(&h);
                    goto out;
                }
            }
            if (kind == EXPORT_DOUBLE_RANK) {
                /* A' = [A*; A0] stacks rows; B' = [B*, −B0] places columns side by side. */
                memcpy(A2, h.A, (size_t)r * d_in * sizeof(float));
                memcpy(A2 + (size_t)r * d_in, h.A0, (size_t)r * d_in * sizeof(float));
                for (int o = 0; o < d_out; o++)
                    for (int j = 0; j < r; j++) {
                        B2[(size_t)o * 2 * r + j] = h.B[(size_t)o * r + j];
                        B2[(size_t)o * 2 * r + r + j] = -h.B0[(size_t)o * r + j];
                    }
            } else if (kind == EXPORT_FROZEN_A) {
                /* A* = A0 (frozen), so B* A0 − B0 A0 = (B* − B0) A0. */
                memcpy(A2, h.A0, (size_t)r * d_in * sizeof(float));
                for (size_t k = 0; k < (size_t)d_out * r; k++) B2[k] = h.B[k] - h.B0[k];
            } else {
                A2 = h.A;
                B2 = h.B;
                h.A = h.B = NULL;
            }
            release(&h);
            keep[2 * i] = A2;
            keep[2 * i + 1] = B2;
            const char *mod = ln_target_module((ln_target)t);
            snprintf(names[i][0], sizeof names[i][0], "base_model.model.model.layers.%d.%s.lora_A.weight", l, mod);
            snprintf(names[i][1], sizeof names[i][1], "base_model.model.model.layers.%d.%s.lora_B.weight", l, mod);
            int64_t sa[2] = {r2, d_in}, sb[2] = {d_out, r2};
            st_writer_add(w, names[i][0], ST_F32, 2, sa, A2);
            st_writer_add(w, names[i][1], ST_F32, 2, sb, B2);
        }
    char *path = ln_path_join(dir, "adapter_model.safetensors");
    rc = st_writer_write(w, path, e);
    if (rc != 0) ln_err_prefix(e, "export");
    free(path);
    if (rc == 0) rc = ln_peft_write_config(ad, r2, alpha2, base_model, dir, e);
out:
    st_writer_free(w);
    for (int i = 0; i < 2 * n; i++) free(keep[i]);
    free(keep);
    free(names);
    return rc;
}

/* ---------------------------------------------------------------- merged */

/* W += s·(B A − B0 A0) in fp64 from fp32 factors, rounded once. */
static int add_update(float *W, const host_factors *h, double s, const char *name, ln_err *e) {
    const int r = h->r, d_in = h->d_in, d_out = h->d_out, k = h->A0 ? 2 * r : r;
    /* one buffer: B̃ (d_out × k), Ã (k × d_in), one row of the update (d_in) */
    double *Bt = ln_try_allocf((size_t)d_out * k + (size_t)k * d_in + (size_t)d_in, sizeof(double), e, "merge",
                               "the fp64 update of %s (%d x %d, rank %d)", name, d_out, d_in, k);
    if (!Bt) return -1;
    double *At = Bt + (size_t)d_out * k, *row = At + (size_t)k * d_in;
    for (int o = 0; o < d_out; o++)
        for (int j = 0; j < r; j++) {
            Bt[(size_t)o * k + j] = h->B[(size_t)o * r + j];
            if (h->A0) Bt[(size_t)o * k + r + j] = -(double)h->B0[(size_t)o * r + j];
        }
    for (size_t x = 0; x < (size_t)r * d_in; x++) {
        At[x] = h->A[x];
        if (h->A0) At[(size_t)r * d_in + x] = h->A0[x];
    }
    for (int o = 0; o < d_out; o++) {
        cblas_dgemv(CblasRowMajor, CblasTrans, k, d_in, s, At, d_in, Bt + (size_t)o * k, 1, 0.0, row, 1);
        float *w = W + (size_t)o * d_in;
        for (int c = 0; c < d_in; c++) w[c] = (float)((double)w[c] + row[c]);
    }
    free(Bt);
    return 0;
}

int ln_export_merged(ln_model *orig, const ln_model *trained, const ln_adapter *ad, const char *dir, int dtype,
                     ln_err *e) {
    if (dtype < 0) dtype = ln_export_base_dtype(&orig->cfg);
    if (ln_mkdir_p(dir, e) != 0) return -1;
    if (ad->full) return ln_model_save(orig, dir, dtype, e);
    if (orig->cfg.num_layers != ad->num_layers)
        return ln_errf(e, "merge: the base model has %d layers, the adapter %d", orig->cfg.num_layers, ad->num_layers);
    for (int l = 0; l < ad->num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            const ln_lora *lo = &ad->lora[l * LN_NTARGET + t];
            if (!lo->A.w) continue;
            ln_param *W = &orig->layers[l].lin[t];
            if (W->rows != lo->B.rows || W->cols != lo->A.cols)
                return ln_errf(e, "merge: layer %d %s is %d x %d in the base but the adapter is %d x %d", l,
                               ln_target_module((ln_target)t), W->rows, W->cols, lo->B.rows, lo->A.cols);
            host_factors h;
            if (fetch(trained, lo, ad->residual, &h, "merge", e) != 0) {
                release(&h);
                return -1;
            }
            size_t nw = (size_t)W->n * sizeof(float);
            float *hw = ln_try_allocf(nw, 1, e, "merge", "a host copy of %s", W->name);
            if (hw) orig->be->download(hw, W->w, nw);
            int rc = hw ? add_update(hw, &h, (double)ad->scale, W->name, e) : -1;
            if (rc == 0) orig->be->upload(W->w, hw, nw);
            free(hw);
            release(&h);
            if (rc != 0) return -1;
        }
    return ln_model_save(orig, dir, dtype, e);
}
