/* adapter.c — LoRA factors, the method-init dispatch, residual bases, adapter files. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/engine/adapter.h"
#include "worker/engine/lora_init.h"
#include "worker/engine/nullspace.h"
#include "worker/engine/rng.h"

/* ================================================================ allocation */

static void lora_names(char *a, char *b, size_t n, int l, int t)
{
    snprintf(a, n, "base_model.model.model.layers.%d.%s.lora_A.weight", l, ln_target_module((ln_target)t));
    snprintf(b, n, "base_model.model.model.layers.%d.%s.lora_B.weight", l, ln_target_module((ln_target)t));
}

static int factor_alloc(const lnb_backend *be, ln_param *p, const char *name, int rows, int cols, ln_err *e)
{
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->rows = rows;
    p->cols = cols;
    p->ndim = 2;
    p->n = (int64_t)rows * cols;
    p->decay = 1;
    p->owned = 1;
    p->w = be->alloc((size_t)p->n * sizeof(float));
    char size[32];
    if (!p->w)
        return ln_errf(e, "out of memory allocating %s for %s", ln_fmt_bytes((double)p->n * sizeof(float), size, sizeof size),
                       name);
    return ln_param_set_trainable(be, p, 1, e);
}

int ln_adapter_alloc(const ln_model *m, ln_adapter *ad, const char *method, int rank, float alpha,
                     unsigned targets, ln_err *e)
{
    memset(ad, 0, sizeof *ad);
    snprintf(ad->method, sizeof ad->method, "%s", method);
    ad->be = m->be;
    if (rank <= 0) return ln_errf(e, "adapter: rank must be positive (got %d)", rank);
    if (!(alpha > 0)) return ln_errf(e, "adapter: alpha must be positive (got %g)", (double)alpha);
    if (targets == 0 || (targets & ~LN_TARGETS_ALL)) return ln_errf(e, "adapter: no valid target modules");
    ad->rank = rank;
    ad->alpha = alpha;
    ad->scale = alpha / (float)rank;
    ad->targets = targets;
    ad->num_layers = m->cfg.num_layers;
    ad->lora = ln_xcalloc((size_t)ad->num_layers * LN_NTARGET, sizeof(ln_lora));
    char an[128], bn[128];
    for (int l = 0; l < ad->num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            if (!(targets & (1u << t))) continue;
            int dout, din;
            ln_model_target_dims(&m->cfg, (ln_target)t, &dout, &din);
            if (rank > din || rank > dout)
                return ln_errf(e, "adapter: rank %d exceeds the dimensions of %s (%d × %d)", rank,
                               ln_target_module((ln_target)t), dout, din);
            ln_lora *lo = &ad->lora[l * LN_NTARGET + t];
            lora_names(an, bn, sizeof an, l, t);
            if (factor_alloc(m->be, &lo->A, an, rank, din, e) || factor_alloc(m->be, &lo->B, bn, dout, rank, e))
                return -1;
        }
    return 0;
}

void ln_adapter_free(ln_adapter *ad)
{
    if (!ad || !ad->lora) return;
    /* Factors live in the backend's memory (device memory for a GPU backend). */
    void (*release)(void *) = ad->be ? ad->be->free : free;
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++) {
        ln_lora *lo = &ad->lora[i];
        release(lo->A.w); release(lo->A.g); release(lo->B.w); release(lo->B.g);
        release(lo->A0); release(lo->B0);
    }
    free(ad->lora);
    ad->lora = NULL;
}

void ln_adapter_for_each_param(ln_adapter *ad, void (*fn)(ln_param *p, void *ctx), void *ctx)
{
    if (!ad->lora) return;
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++)
        if (ad->lora[i].A.w) {
            fn(&ad->lora[i].A, ctx);
            fn(&ad->lora[i].B, ctx);
        }
}

/* ================================================================ methods */

/* PEFT's default (reset_lora_parameters with init_lora_weights=True):
 * A ~ kaiming_uniform(a=√5): bound = gain·√(3/fan_in), gain = √(2/(1+a²)) = √(1/3) ⇒ bound = 1/√d_in;
 * B = 0, so the adapted model starts exactly at the base model. */
static int init_lora(ln_model *m, ln_adapter *ad, const ln_adapter_opts *o, ln_err *e)
{
    ln_rng r;
    ln_rng_seed(&r, o->seed ^ 0x4C6F5241ull); /* "LoRA": a stream apart from data shuffling */
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++) {
        ln_lora *lo = &ad->lora[i];
        if (!lo->A.w) continue;
        float bound = 1.0f / sqrtf((float)lo->A.cols);
        float *h = ln_try_allocf((size_t)lo->A.n, sizeof(float), e, "lora init", "the initial values of %s",
                                 lo->A.name);
        if (!h) return -1;
        for (int64_t j = 0; j < lo->A.n; j++) h[j] = (2.0f * ln_rng_uniform(&r) - 1.0f) * bound;
        m->be->upload(lo->A.w, h, (size_t)lo->A.n * sizeof(float));
        free(h);
        m->be->zero(lo->B.w, lo->B.n);
    }
    return 0;
}

static int init_lora_fa(ln_model *m, ln_adapter *ad, const ln_adapter_opts *o, ln_err *e)
{
    if (init_lora(m, ad, o, e)) return -1;
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++)
        if (ad->lora[i].A.w && ln_param_set_trainable(m->be, &ad->lora[i].A, 0, e)) return -1;
    return 0;
}

int ln_lora_keep_initial(const lnb_backend *be, ln_lora *lo, ln_err *e)
{
    lo->A0 = be->alloc((size_t)lo->A.n * sizeof(float));
    lo->B0 = be->alloc((size_t)lo->B.n * sizeof(float));
    if (!lo->A0 || !lo->B0) return ln_errf(e, "out of memory copying the initial factors of %s", lo->A.name);
    be->copy(lo->A0, lo->A.w, lo->A.n);
    be->copy(lo->B0, lo->B.w, lo->B.n);
    return 0;
}

/* The other methods go through lora_init.h's per-layer init (engineer D): for each targeted layer,
 * ln_init_layer fills A and B and, for residual methods, turns W0 into W0 − scale·B A in place.
 * Methods that need calibration read each layer input's covariance through o->covariance. */
static int init_by_layer(ln_model *m, ln_adapter *ad, const ln_adapter_opts *o, ln_err *e)
{
    ln_method me;
    if (ln_method_parse(ad->method, &me, e)) return -1;
    int calib = ln_method_needs_calibration(me), residual = ln_method_has_residual(me);
    if (calib && !o->covariance)
        return ln_errf(e, "adapter method \"%s\" needs calibration covariances and none were given", ad->method);
    for (int l = 0; l < ad->num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            ln_lora *lo = &ad->lora[l * LN_NTARGET + t];
            if (!lo->A.w) continue;
            ln_param *W = &m->layers[l].lin[t];
            ln_layer_init li = {.d_out = W->rows, .d_in = W->cols, .r = ad->rank, .scale = ad->scale,
                                .seed = o->seed + (uint64_t)(l * LN_NTARGET + t)};
            if (calib && !(li.C = o->covariance(o->method_ctx, l, ln_target_input((ln_target)t))))
                return ln_errf(e, "adapter method \"%s\": no covariance for layer %d input of %s", ad->method, l,
                               ln_target_module((ln_target)t));
            /* the init reads W0 and writes A, B (and W0) on the host: after the queued copies */
            if (ln_backend_sync(m->be, e, "before the %s init of layer %d %s", ad->method, l,
                                ln_target_module((ln_target)t)) ||
                ln_init_layer(me, &li, W->w, lo->A.w, lo->B.w, e))
                return ln_err_prefix(e, "layer %d %s", l, ln_target_module((ln_target)t));
            if (residual && ln_lora_keep_initial(m->be, lo, e)) return -1;
            if (!ln_method_trains_a(me) && ln_param_set_trainable(m->be, &lo->A, 0, e)) return -1;
        }
    ad->residual = residual;
    return 0;
}

/* ---- the dispatch point: every method by name ----
 * lora and lora_fa are implemented here; the others by init_by_layer above (lora_init.c).
 * A row whose function is NULL would be a known method not implemented yet (a clear error). */
static const struct {
    const char *name;
    ln_adapter_init_fn fn;
    int residual_default_alpha; /* alpha defaults to rank (scale 1) rather than 2·rank */
} METHODS[] = {
    {"lora", init_lora, 0},
    {"lora_fa", init_lora_fa, 0},
    {"pissa", init_by_layer, 1},
    {"milora", init_by_layer, 1},
    {"corda", init_by_layer, 1},
    {"lora_null_v1", init_by_layer, 1},
    {"lora_null_v2", init_by_layer, 1},
};

int ln_adapter_init(ln_model *m, ln_adapter *ad, const ln_adapter_opts *o, ln_err *e)
{
    memset(ad, 0, sizeof *ad);
    const char *method = o->method ? o->method : "lora";
    if (strcmp(method, "full") == 0) {
        snprintf(ad->method, sizeof ad->method, "full");
        ad->full = 1;
        ad->num_layers = m->cfg.num_layers;
        return ln_model_set_full_training(m, e);
    }
    for (size_t i = 0; i < sizeof METHODS / sizeof *METHODS; i++) {
        if (strcmp(METHODS[i].name, method) != 0) continue;
        if (!METHODS[i].fn) return ln_errf(e, "adapter method \"%s\" is not implemented yet", method);
        int rank = o->rank > 0 ? o->rank : 8;
        float alpha = o->alpha > 0 ? o->alpha : (METHODS[i].residual_default_alpha ? (float)rank : 2.0f * rank);
        if (ln_adapter_alloc(m, ad, method, rank, alpha, o->targets ? o->targets : LN_TARGETS_ALL, e)) goto fail;
        if (METHODS[i].fn(m, ad, o, e)) goto fail;
        return 0;
    }
    return ln_errf(e, "unknown adapter method \"%s\" (expected lora, lora_fa, full, pissa, milora, corda, "
                      "lora_null_v1 or lora_null_v2)", method);
fail:
    ln_adapter_free(ad);
    return -1;
}

int ln_adapter_apply_residual(ln_model *m, ln_adapter *ad, ln_err *e)
{
    /* on the host, from A0/B0 just copied or uploaded */
    if (ln_backend_sync(m->be, e, "before the residual W0 - s B0 A0 of the %s adapter", ad->method)) return -1;
    for (int l = 0; l < ad->num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            ln_lora *lo = &ad->lora[l * LN_NTARGET + t];
            if (!lo->A.w) continue;
            ln_param *W = &m->layers[l].lin[t];
            if (!lo->A0 || !lo->B0)
                return ln_errf(e, "adapter: residual adapter %s has no initial factors", lo->A.name);
            /* The same fp64 routine the residual methods' init used, so a resumed run rebuilds
             * exactly the W0' the original run trained on (bit-identical resume). */
            if (ln_residual_apply(W->w, W->rows, W->cols, lo->B0, lo->A0, lo->A.rows, (double)ad->scale, e) != 0)
                return ln_err_prefix(e, "adapter: layer %d %s", l, ln_target_module((ln_target)t));
        }
    ad->residual = 1;
    return 0;
}

int ln_adapter_make_residual(ln_model *m, ln_adapter *ad, ln_err *e)
{
    if (ad->residual) return ln_errf(e, "adapter: the residual was already applied");
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++)
        if (ad->lora[i].A.w && ln_lora_keep_initial(m->be, &ad->lora[i], e)) return -1;
    return ln_adapter_apply_residual(m, ad, e);
}

/* ================================================================ files */

static void targets_str(unsigned mask, char *buf, size_t n)
{
    buf[0] = 0;
    for (int t = 0; t < LN_NTARGET; t++)
        if (mask & (1u << t)) {
            size_t len = strlen(buf);
            snprintf(buf + len, n - len, "%s%s", len ? "," : "", ln_target_name((ln_target)t));
        }
}

void ln_adapter_write(const ln_adapter *ad, st_writer *w)
{
    char buf[64], tg[64], name[160];
    st_writer_meta(w, "method", ad->method);
    snprintf(buf, sizeof buf, "%d", ad->rank);
    st_writer_meta(w, "rank", buf);
    snprintf(buf, sizeof buf, "%.9g", (double)ad->alpha);
    st_writer_meta(w, "alpha", buf);
    targets_str(ad->targets, tg, sizeof tg);
    st_writer_meta(w, "targets", tg);
    st_writer_meta(w, "residual", ad->residual ? "1" : "0");
    int train_a = 1, train_b = 1;
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++) {
        const ln_lora *lo = &ad->lora[i];
        if (!lo->A.w) continue;
        train_a = lo->A.trainable;
        train_b = lo->B.trainable;
        int64_t sa[2] = {lo->A.rows, lo->A.cols}, sb[2] = {lo->B.rows, lo->B.cols};
        st_writer_add(w, lo->A.name, ST_F32, 2, sa, lo->A.w);
        st_writer_add(w, lo->B.name, ST_F32, 2, sb, lo->B.w);
        if (ad->residual) {
            snprintf(name, sizeof name, "%.*slora_A0.weight", (int)(strstr(lo->A.name, "lora_A") - lo->A.name),
                     lo->A.name);
            st_writer_add(w, name, ST_F32, 2, sa, lo->A0);
            snprintf(name, sizeof name, "%.*slora_B0.weight", (int)(strstr(lo->B.name, "lora_B") - lo->B.name),
                     lo->B.name);
            st_writer_add(w, name, ST_F32, 2, sb, lo->B0);
        }
    }
    st_writer_meta(w, "train_A", train_a ? "1" : "0");
    st_writer_meta(w, "train_B", train_b ? "1" : "0");
}

int ln_adapter_save(const ln_adapter *ad, const char *path, ln_err *e)
{
    if (ad->full) return ln_errf(e, "adapter save: a full fine-tune has no adapter (save the model)");
    /* the writer reads the factors where they live */
    if (ln_backend_sync(ad->be, e, "before writing the adapter %s", path)) return -1;
    st_writer *w = st_writer_new();
    st_writer_meta(w, "format", "loranull-adapter");
    ln_adapter_write(ad, w);
    int rc = st_writer_write(w, path, e);
    st_writer_free(w);
    return rc;
}

/* Reads a PEFT adapter_config.json: r, lora_alpha, target_modules. */
static int read_peft_config(const char *dir, int *rank, float *alpha, unsigned *targets, ln_err *e)
{
    char *p = ln_path_join(dir, "adapter_config.json"), *text = NULL;
    size_t len;
    int rc = -1;
    json_t *o = NULL;
    if (ln_read_file(p, &text, &len, e)) goto out;
    json_error_t je;
    o = json_loads(text, 0, &je);
    if (!o || !json_is_object(o)) { ln_errf(e, "%s: invalid JSON at line %d", p, je.line); goto out; }
    json_t *r = json_object_get(o, "r"), *a = json_object_get(o, "lora_alpha"), *tm = json_object_get(o, "target_modules");
    if (!json_is_integer(r) || !json_is_number(a)) { ln_errf(e, "%s: \"r\" and \"lora_alpha\" must be numbers", p); goto out; }
    json_t *rs = json_object_get(o, "use_rslora");
    if (rs && json_is_true(rs)) { ln_errf(e, "%s: use_rslora is not supported", p); goto out; }
    *rank = (int)json_integer_value(r);
    *alpha = (float)json_number_value(a);
    *targets = 0;
    if (!json_is_array(tm)) { ln_errf(e, "%s: \"target_modules\" must be a list", p); goto out; }
    size_t i;
    json_t *v;
    json_array_foreach(tm, i, v) {
        unsigned one;
        if (!json_is_string(v) || ln_targets_parse(json_string_value(v), &one, e)) {
            ln_err_prefix(e, "%s", p);
            goto out;
        }
        *targets |= one;
    }
    rc = 0;
out:
    json_decref(o);
    free(text);
    free(p);
    return rc;
}

static int copy_factor(st_set *s, const lnb_backend *be, ln_param *p, const char *name, const char *file, ln_err *e)
{
    const st_tensor *t = st_find(s, name);
    if (!t) return ln_errf(e, "adapter %s: tensor %s is missing", file, name);
    if (t->ndim != 2 || t->shape[0] != p->rows || t->shape[1] != p->cols)
        return ln_errf(e, "adapter %s: tensor %s should have shape [%d, %d]", file, name, p->rows, p->cols);
    float *h = ln_try_alloc((size_t)p->n * sizeof(float), name, e);
    if (!h) return -1;
    int rc = st_to_f32(t, h, p->n, e);
    for (int64_t i = 0; rc == 0 && i < p->n; i++)
        if (!isfinite(h[i]))
            rc = ln_errf(e, "adapter %s: tensor %s is not finite (%g at index %lld)", file, name, (double)h[i],
                         (long long)i);
    if (rc == 0) be->upload(p->w, h, (size_t)p->n * sizeof(float));
    free(h);
    return rc;
}

int ln_adapter_load(ln_model *m, const char *path, ln_adapter *ad, ln_err *e)
{
    struct stat st;
    int is_dir = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
    char *file = NULL;
    st_set *s = NULL;
    int rank = 0, residual = 0;
    float alpha = 0;
    unsigned targets = 0;
    char method[32] = "lora";
    memset(ad, 0, sizeof *ad);
    if (is_dir) {
        char *native = ln_path_join(path, "adapter.safetensors");
        if (ln_file_exists(native)) {
            file = native;
        } else {
            free(native);
            file = ln_path_join(path, "adapter_model.safetensors");
            if (read_peft_config(path, &rank, &alpha, &targets, e)) goto fail;
        }
    } else {
        file = ln_xstrdup(path);
    }
    if (st_open(file, &s, e)) goto fail;
    if (rank == 0) { /* native: everything is in the metadata */
        const char *r = st_metadata(s, "rank"), *a = st_metadata(s, "alpha"), *t = st_metadata(s, "targets");
        const char *me = st_metadata(s, "method"), *re = st_metadata(s, "residual");
        if (!r || !a || !t || !me) {
            ln_errf(e, "adapter %s: not a loranull adapter (metadata rank/alpha/targets/method missing)", file);
            goto fail;
        }
        rank = atoi(r);
        alpha = strtof(a, NULL);
        if (ln_targets_parse(t, &targets, e)) goto fail;
        snprintf(method, sizeof method, "%s", me);
        residual = re && strcmp(re, "1") == 0;
    }
    if (ln_adapter_alloc(m, ad, method, rank, alpha, targets, e)) goto fail;
    char name[160];
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++) {
        ln_lora *lo = &ad->lora[i];
        if (!lo->A.w) continue;
        if (copy_factor(s, m->be, &lo->A, lo->A.name, file, e) || copy_factor(s, m->be, &lo->B, lo->B.name, file, e))
            goto fail;
        if (residual) {
            ln_param a0 = lo->A, b0 = lo->B;
            a0.w = lo->A0 = m->be->alloc((size_t)lo->A.n * sizeof(float));
            b0.w = lo->B0 = m->be->alloc((size_t)lo->B.n * sizeof(float));
            if (!lo->A0 || !lo->B0) { ln_errf(e, "out of memory loading %s", file); goto fail; }
            snprintf(name, sizeof name, "%.*slora_A0.weight", (int)(strstr(lo->A.name, "lora_A") - lo->A.name), lo->A.name);
            if (copy_factor(s, m->be, &a0, name, file, e)) goto fail;
            snprintf(name, sizeof name, "%.*slora_B0.weight", (int)(strstr(lo->B.name, "lora_B") - lo->B.name), lo->B.name);
            if (copy_factor(s, m->be, &b0, name, file, e)) goto fail;
        }
    }
    if (residual && ln_adapter_apply_residual(m, ad, e) != 0) goto fail;
    /* Frozen factors stay frozen (lora_fa, lora_null_v2); PEFT adapters load fully trainable. */
    const char *ta = st_metadata(s, "train_A"), *tb = st_metadata(s, "train_B");
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++) {
        ln_lora *lo = &ad->lora[i];
        if (!lo->A.w) continue;
        if (ta && strcmp(ta, "0") == 0) ln_param_set_trainable(m->be, &lo->A, 0, NULL);
        if (tb && strcmp(tb, "0") == 0) ln_param_set_trainable(m->be, &lo->B, 0, NULL);
    }
    st_close(s);
    free(file);
    return 0;
fail:
    if (s) st_close(s);
    free(file);
    ln_adapter_free(ad);
    return -1;
}

/* adapter_config.json as PEFT writes it for a LoRA of rank r on the adapter's targets. */
int ln_peft_write_config(const ln_adapter *ad, int r, float alpha, const char *base_model, const char *dir, ln_err *e) {
    json_t *o = json_object(), *tm = json_array();
    for (int t = 0; t < LN_NTARGET; t++)
        if (ad->targets & (1u << t)) json_array_append_new(tm, json_string(strchr(ln_target_module((ln_target)t), '.') + 1));
    json_object_set_new(o, "peft_type", json_string("LORA"));
    json_object_set_new(o, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(o, "r", json_integer(r));
    json_object_set_new(o, "lora_alpha", json_real(alpha));
    json_object_set_new(o, "lora_dropout", json_real(0.0));
    json_object_set_new(o, "target_modules", tm);
    json_object_set_new(o, "bias", json_string("none"));
    json_object_set_new(o, "fan_in_fan_out", json_false());
    json_object_set_new(o, "init_lora_weights", json_true());
    json_object_set_new(o, "use_rslora", json_false());
    json_object_set_new(o, "use_dora", json_false());
    json_object_set_new(o, "inference_mode", json_true());
    json_object_set_new(o, "modules_to_save", json_null());
    json_object_set_new(o, "rank_pattern", json_object());
    json_object_set_new(o, "alpha_pattern", json_object());
    json_object_set_new(o, "base_model_name_or_path", base_model ? json_string(base_model) : json_null());
    char *txt = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(o);
    char *path = ln_path_join(dir, "adapter_config.json");
    int rc = ln_write_file_atomic(path, txt, strlen(txt), e);
    free(path);
    free(txt);
    return rc;
}

int ln_adapter_save_peft(const ln_adapter *ad, const ln_model *m, const char *dir, ln_err *e)
{
    if (ad->full) return ln_errf(e, "PEFT export: a full fine-tune has no adapter");
    if (ad->residual)
        return ln_errf(e, "PEFT export: method %s trained on a residual base; its export relative to the original "
                          "weights is lora_init's job", ad->method);
    if (ln_mkdir_p(dir, e)) return -1;
    if (ln_backend_sync(ad->be, e, "before writing the PEFT adapter in %s", dir)) return -1; /* read in place */
    int rc = ln_peft_write_config(ad, ad->rank, ad->alpha, NULL, dir, e);
    if (rc) return -1;
    (void)m;
    st_writer *w = st_writer_new();
    st_writer_meta(w, "format", "pt");
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++) {
        const ln_lora *lo = &ad->lora[i];
        if (!lo->A.w) continue;
        int64_t sa[2] = {lo->A.rows, lo->A.cols}, sb[2] = {lo->B.rows, lo->B.cols};
        st_writer_add(w, lo->A.name, ST_F32, 2, sa, lo->A.w);
        st_writer_add(w, lo->B.name, ST_F32, 2, sb, lo->B.w);
    }
    char *mp = ln_path_join(dir, "adapter_model.safetensors");
    rc = st_writer_write(w, mp, e);
    free(mp);
    st_writer_free(w);
    return rc;
}
