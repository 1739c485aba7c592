/* model.c — LLaMA in fp32: loading, random init, saving, and the forward and backward passes.
 *
 * The passes follow llm.c: one function per layer pass, the backward next to its forward, with
 * shapes in comments. N = B·T token rows, C = hidden, I = intermediate, V = vocab,
 * nh/nkv heads, hd head_dim, r LoRA rank. Everything is row-major fp32 in backend memory. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/safetensors.h"
#include "common/util.h"
#include "worker/engine/adapter.h"
#include "worker/engine/model.h"
#include "worker/engine/rng.h"

/* ================================================================ targets */

static const char *const TARGET_NAMES[LN_NTARGET] = {"q", "k", "v", "o", "gate", "up", "down"};
static const char *const TARGET_MODULES[LN_NTARGET] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

const char *ln_target_name(ln_target t) { return TARGET_NAMES[t]; }
const char *ln_target_module(ln_target t) { return TARGET_MODULES[t]; }

ln_input ln_target_input(ln_target t)
{
    switch (t) {
    case LN_Q: case LN_K: case LN_V: return LN_IN_QKV;
    case LN_O: return LN_IN_O;
    case LN_GATE: case LN_UP: return LN_IN_GATEUP;
    default: return LN_IN_DOWN;
    }
}

int ln_targets_parse(const char *list, unsigned *mask, ln_err *e)
{
    *mask = 0;
    if (!list || !*list) return ln_errf(e, "the list of target modules is empty");
    const char *p = list;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        char tok[32];
        if (len == 0 || len >= sizeof tok) return ln_errf(e, "target list \"%s\": empty or overlong entry", list);
        memcpy(tok, p, len);
        tok[len] = 0;
        size_t tl = strlen(tok);
        if (tl > 5 && strcmp(tok + tl - 5, "_proj") == 0) tok[tl - 5] = 0;
        int found = 0;
        if (strcmp(tok, "all") == 0) { *mask |= LN_TARGETS_ALL; found = 1; }
        for (int t = 0; t < LN_NTARGET && !found; t++)
            if (strcmp(tok, TARGET_NAMES[t]) == 0) { *mask |= 1u << t; found = 1; }
        if (!found)
            return ln_errf(e, "target list \"%s\": unknown module \"%.*s\" (expected q,k,v,o,gate,up,down)", list,
                           (int)len, p);
        p = end ? end + 1 : p + len;
    }
    return 0;
}

void ln_model_target_dims(const ln_config *c, ln_target t, int *d_out, int *d_in)
{
    int C = c->hidden_size, qd = c->num_heads * c->head_dim, kvd = c->num_kv_heads * c->head_dim;
    int I = c->intermediate_size;
    switch (t) {
    case LN_Q: *d_out = qd; *d_in = C; break;
    case LN_K: case LN_V: *d_out = kvd; *d_in = C; break;
    case LN_O: *d_out = C; *d_in = qd; break;
    case LN_GATE: case LN_UP: *d_out = I; *d_in = C; break;
    default: *d_out = C; *d_in = I; break;
    }
}

/* ================================================================ params */

static int param_alloc(const lnb_backend *be, ln_param *p, const char *name, int rows, int cols, int ndim,
                       int decay, ln_err *e)
{
    snprintf(p->name, sizeof p->name, "%s", name);
    p->rows = rows;
    p->cols = cols;
    p->ndim = ndim;
    p->n = (int64_t)rows * cols;
    p->decay = decay;
    p->owned = 1;
    p->w = be->alloc((size_t)p->n * sizeof(float));
    if (!p->w) return ln_errf(e, "out of memory allocating %s (%lld floats)", name, (long long)p->n);
    return 0;
}

static void param_free(const lnb_backend *be, ln_param *p)
{
    if (p->owned && p->w) be->free(p->w);
    if (p->owned && p->g) be->free(p->g);
    p->w = p->g = NULL;
}

/* Drops the backend's faster form of p (it is about to change, or to be freed). */
static void param_thaw(const lnb_backend *be, ln_param *p)
{
    if (p->frozen && be->thaw) be->thaw(p->w);
    p->frozen = 0;
}

/* Allocates p's gradient (zeroed) and marks it trainable. */
static int param_train(const lnb_backend *be, ln_param *p, ln_err *e)
{
    param_thaw(be, p); /* a trained weight changes */
    p->trainable = 1;
    if (!p->g) p->g = be->alloc((size_t)p->n * sizeof(float));
    char size[32];
    if (!p->g)
        return ln_errf(e, "out of memory allocating %s for the gradient of %s",
                       ln_fmt_bytes((double)p->n * sizeof(float), size, sizeof size), p->name);
    return 0;
}

int ln_param_set_trainable(const lnb_backend *be, ln_param *p, int trainable, ln_err *e)
{
    if (trainable) return param_train(be, p, e);
    if (p->owned && p->g) be->free(p->g);
    p->g = NULL;
    p->trainable = 0;
    return 0;
}

static int model_alloc(ln_model *m, ln_err *e)
{
    const ln_config *c = &m->cfg;
    const lnb_backend *be = m->be;
    char name[128];
    if (param_alloc(be, &m->embed, "model.embed_tokens.weight", c->vocab_size, c->hidden_size, 2, 1, e)) return -1;
    if (param_alloc(be, &m->norm, "model.norm.weight", c->hidden_size, 1, 1, 0, e)) return -1;
    if (m->tied) {
        m->lm_head = m->embed;
        snprintf(m->lm_head.name, sizeof m->lm_head.name, "lm_head.weight");
        m->lm_head.owned = 0;
    } else if (param_alloc(be, &m->lm_head, "lm_head.weight", c->vocab_size, c->hidden_size, 2, 1, e)) {
        return -1;
    }
    m->layers = ln_xcalloc((size_t)c->num_layers, sizeof(ln_layer));
    for (int l = 0; l < c->num_layers; l++) {
        ln_layer *L = &m->layers[l];
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        if (param_alloc(be, &L->attn_norm, name, c->hidden_size, 1, 1, 0, e)) return -1;
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        if (param_alloc(be, &L->mlp_norm, name, c->hidden_size, 1, 1, 0, e)) return -1;
        for (int t = 0; t < LN_NTARGET; t++) {
            int dout, din;
            ln_model_target_dims(c, (ln_target)t, &dout, &din);
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, TARGET_MODULES[t]);
            if (param_alloc(be, &L->lin[t], name, dout, din, 2, 1, e)) return -1;
        }
    }
    return 0;
}

void ln_model_for_each_param(ln_model *m, void (*fn)(ln_param *p, void *ctx), void *ctx)
{
    fn(&m->embed, ctx);
    for (int l = 0; l < m->cfg.num_layers; l++) {
        fn(&m->layers[l].attn_norm, ctx);
        for (int t = 0; t < LN_NTARGET; t++) fn(&m->layers[l].lin[t], ctx);
        fn(&m->layers[l].mlp_norm, ctx);
    }
    fn(&m->norm, ctx);
    if (!m->tied) fn(&m->lm_head, ctx);
}

int ln_model_set_full_training(ln_model *m, ln_err *e)
{
    ln_model_thaw(m); /* every weight is about to train */
    if (param_train(m->be, &m->embed, e) || param_train(m->be, &m->norm, e)) return -1;
    if (m->tied) {
        m->lm_head.g = m->embed.g;
        m->lm_head.trainable = 1;
    } else if (param_train(m->be, &m->lm_head, e)) {
        return -1;
    }
    for (int l = 0; l < m->cfg.num_layers; l++) {
        ln_layer *L = &m->layers[l];
        if (param_train(m->be, &L->attn_norm, e) || param_train(m->be, &L->mlp_norm, e)) return -1;
        for (int t = 0; t < LN_NTARGET; t++)
            if (param_train(m->be, &L->lin[t], e)) return -1;
    }
    return 0;
}

/* ================================================================ device hooks */

/* The weights a matmul reads: each layer's linears, then lm_head (the embedding's storage when tied). */
static void for_each_gemm_weight(ln_model *m, void (*fn)(ln_param *p, void *ctx), void *ctx)
{
    for (int l = 0; l < m->cfg.num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) fn(&m->layers[l].lin[t], ctx);
    fn(&m->lm_head, ctx);
}

typedef struct {
    const lnb_backend *be;
    int count, failed;
    int64_t bytes;
    ln_err *e;
} freeze_ctx;

static void freeze_one(ln_param *p, void *ctx)
{
    freeze_ctx *f = ctx;
    if (f->failed || p->frozen || p->trainable || !p->w) return;
    int64_t b = f->be->freeze(p->w, p->n, f->e);
    if (b < 0) {
        ln_err_prefix(f->e, "keeping the frozen weight %s in a faster form", p->name);
        f->failed = 1;
        return;
    }
    p->frozen = 1;
    f->count += b > 0;
    f->bytes += b;
}

static void thaw_one(ln_param *p, void *ctx) { param_thaw(ctx, p); }

int ln_model_freeze_frozen(ln_model *m, const struct ln_adapter *ad, ln_err *e)
{
    if (m->frozen || !m->be->freeze || (ad && ad->full)) return 0;
    freeze_ctx f = {m->be, 0, 0, 0, e};
    m->frozen = 1;
    for_each_gemm_weight(m, freeze_one, &f);
    if (f.failed) {
        ln_model_thaw(m);
        return -1;
    }
    if (f.count > 0) {
        char where[48] = "";
        if (m->comm && m->comm->size > 1)
            snprintf(where, sizeof where, " on rank %d of %d", m->comm->rank, m->comm->size);
        ln_log(LN_LOG_INFO, "engine", "%s weights: %d frozen (%.1f MiB)%s",
               m->be->frozen_form ? m->be->frozen_form : m->be->name, f.count, (double)f.bytes / (1 << 20), where);
    }
    return 0;
}

void ln_model_thaw(ln_model *m)
{
    if (!m || !m->frozen) return;
    if (m->layers) for_each_gemm_weight(m, thaw_one, (void *)m->be);
    m->frozen = 0;
}

/* A device hook's failure as "<backend> device error <where>: <its error>". */
static int device_hook(const lnb_backend *be, int (*hook)(ln_err *), ln_err *e, const char *where_fmt, va_list ap)
{
    if (!hook) return 0;
    ln_err de = {{0}};
    if (hook(&de) == 0) return 0;
    char where[160];
    vsnprintf(where, sizeof where, where_fmt, ap);
    return ln_errf(e, "%s device error %s: %s", be->name, where, de.msg);
}

int ln_model_check_device(const ln_model *m, ln_err *e, const char *where_fmt, ...)
{
    va_list ap;
    va_start(ap, where_fmt);
    int rc = device_hook(m->be, m->be->check, e, where_fmt, ap);
    va_end(ap);
    return rc;
}

int ln_backend_sync(const lnb_backend *be, ln_err *e, const char *where_fmt, ...)
{
    va_list ap;
    va_start(ap, where_fmt);
    int rc = be ? device_hook(be, be->sync, e, where_fmt, ap) : 0;
    va_end(ap);
    return rc;
}

void ln_model_free(ln_model *m)
{
    if (!m) return;
    ln_model_thaw(m); /* before any weight's memory goes */
    const lnb_backend *be = m->be;
    if (m->layers) {
        for (int l = 0; l < m->cfg.num_layers; l++) {
            param_free(be, &m->layers[l].attn_norm);
            param_free(be, &m->layers[l].mlp_norm);
            for (int t = 0; t < LN_NTARGET; t++) param_free(be, &m->layers[l].lin[t]);
        }
        free(m->layers);
    }
    param_free(be, &m->lm_head);
    param_free(be, &m->embed);
    param_free(be, &m->norm);
    if (be) { /* the rotary tables (rope_ensure) */
        be->free(m->rope_cos);
        be->free(m->rope_sin);
    }
    free(m);
}

/* ================================================================ load / new / save */

/* Which part of each tensor a load reads: all of it, or one tensor-parallel rank's block
 * (model.h's ln_model_load_part). */
typedef struct load_part {
    int rank, ranks;
} load_part;

/* The block of a whole (rows × cols) tensor that p holds: its first row and column. A q, k, v,
 * gate or up weight splits by rows, an o or down weight by columns; the rest is whole. */
static void part_origin(const ln_param *p, int whole_rows, int whole_cols, const load_part *pt, int64_t *r0,
                        int64_t *c0)
{
    *r0 = p->rows < whole_rows ? (int64_t)pt->rank * p->rows : 0;
    *c0 = p->cols < whole_cols ? (int64_t)pt->rank * p->cols : 0;
}

/* Copies tensor `name` of set s into p->w (converting to fp32), checking its shape: the whole
 * tensor is whole_rows × whole_cols and p gets its block (pt; the whole one when pt->ranks is 1).
 * Only the block's bytes of the mapping are read. */
static int load_tensor_part(st_set *s, const lnb_backend *be, ln_param *p, int whole_rows, int whole_cols,
                            const load_part *pt, const char *dir, ln_err *e)
{
    const st_tensor *t = st_find(s, p->name);
    if (!t) return ln_errf(e, "model %s: tensor %s is missing", dir, p->name);
    int ok = p->ndim == 1 ? (t->ndim == 1 && t->shape[0] == whole_rows)
                          : (t->ndim == 2 && t->shape[0] == whole_rows && t->shape[1] == whole_cols);
    if (!ok) {
        char got[96] = "";
        size_t off = 0;
        for (int i = 0; i < t->ndim && off < sizeof got - 24; i++)
            off += (size_t)snprintf(got + off, sizeof got - off, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        if (p->ndim == 1)
            return ln_errf(e, "model %s: tensor %s in %s has shape [%s] but config.json implies [%d]", dir, p->name,
                           t->file, got, whole_rows);
        return ln_errf(e, "model %s: tensor %s in %s has shape [%s] but config.json implies [%d, %d]", dir, p->name,
                       t->file, got, whole_rows, whole_cols);
    }
    if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
        return ln_errf(e, "model %s: tensor %s has dtype %s (F32, F16 or BF16 expected)", dir, p->name,
                       st_dtype_name(t->dtype));
    float *host = ln_try_alloc((size_t)p->n * sizeof(float), p->name, e);
    if (!host) return -1;
    int64_t r0, c0;
    part_origin(p, whole_rows, whole_cols, pt, &r0, &c0);
    size_t es = st_dtype_size(t->dtype);
    int rc = 0;
    if (p->cols == whole_cols) { /* whole rows: one contiguous run */
        st_tensor v = *t;
        v.data = (const unsigned char *)t->data + (size_t)(r0 * whole_cols) * es;
        v.numel = p->n;
        v.nbytes = (size_t)p->n * es;
        rc = st_to_f32(&v, host, p->n, e);
    } else { /* a column block: one run per row */
        for (int i = 0; i < p->rows && rc == 0; i++) {
            st_tensor v = *t;
            v.data = (const unsigned char *)t->data + (size_t)((r0 + i) * whole_cols + c0) * es;
            v.numel = p->cols;
            v.nbytes = (size_t)p->cols * es;
            rc = st_to_f32(&v, host + (size_t)i * p->cols, p->cols, e);
        }
    }
    /* A NaN or inf weight would only show up steps later as a loss of NaN (or, through RMSNorm,
     * as a flat ln(V) with no gradient): refuse the model now, naming the tensor. */
    for (int64_t i = 0; rc == 0 && i < p->n; i++)
        if (!isfinite(host[i])) {
            int64_t row = r0 + i / p->cols, col = c0 + i % p->cols;
            rc = ln_errf(e, "model %s: tensor %s in %s is not finite (%g at index %lld)", dir, p->name, t->file,
                         (double)host[i], (long long)(row * whole_cols + col));
        }
    if (rc == 0) be->upload(p->w, host, (size_t)p->n * sizeof(float));
    free(host);
    return rc;
}

/* Loads every tensor of the model in dir, or one rank's blocks of them (pt). */
static int model_load(const char *dir, const lnb_backend *be, const load_part *pt, ln_model **out, ln_err *e)
{
    *out = NULL;
    ln_model *m = ln_xcalloc(1, sizeof *m);
    m->be = be;
    st_set *s = NULL;
    ln_config whole;
    if (ln_config_load(dir, &whole, e)) goto fail;
    m->cfg = whole;
    if (pt->ranks > 1) {
        const char *bad = whole.num_heads % pt->ranks           ? "num_attention_heads"
                          : whole.num_kv_heads % pt->ranks      ? "num_key_value_heads"
                          : whole.intermediate_size % pt->ranks ? "intermediate_size"
                                                                : NULL;
        if (bad) {
            ln_errf(e, "model %s: %s does not divide by %d tensor-parallel ranks", dir, bad, pt->ranks);
            goto fail;
        }
        m->cfg.num_heads /= pt->ranks;
        m->cfg.num_kv_heads /= pt->ranks;
        m->cfg.intermediate_size /= pt->ranks;
    }
    if (st_open(dir, &s, e)) goto fail;
    /* Tied when the config says so, or when the checkpoint simply has no lm_head. */
    m->tied = m->cfg.tie_word_embeddings || !st_find(s, "lm_head.weight");
    if (pt->ranks > 1) m->cfg.tie_word_embeddings = m->tied; /* a shard's config says what it holds */
    if (model_alloc(m, e)) goto fail;
    const ln_config *c = &whole;
    if (load_tensor_part(s, be, &m->embed, c->vocab_size, c->hidden_size, pt, dir, e) ||
        load_tensor_part(s, be, &m->norm, c->hidden_size, 1, pt, dir, e))
        goto fail;
    if (!m->tied && load_tensor_part(s, be, &m->lm_head, c->vocab_size, c->hidden_size, pt, dir, e)) goto fail;
    for (int l = 0; l < m->cfg.num_layers; l++) {
        ln_layer *L = &m->layers[l];
        if (load_tensor_part(s, be, &L->attn_norm, c->hidden_size, 1, pt, dir, e) ||
            load_tensor_part(s, be, &L->mlp_norm, c->hidden_size, 1, pt, dir, e))
            goto fail;
        for (int t = 0; t < LN_NTARGET; t++) {
            int d_out, d_in;
            ln_model_target_dims(c, (ln_target)t, &d_out, &d_in);
            if (load_tensor_part(s, be, &L->lin[t], d_out, d_in, pt, dir, e)) goto fail;
        }
    }
    /* A layer beyond num_hidden_layers means config and weights disagree. */
    char extra[96];
    snprintf(extra, sizeof extra, "model.layers.%d.input_layernorm.weight", m->cfg.num_layers);
    if (st_find(s, extra)) {
        ln_errf(e, "model %s: has tensor %s but config.json says num_hidden_layers = %d", dir, extra,
                m->cfg.num_layers);
        goto fail;
    }
    st_close(s);
    *out = m;
    return 0;
fail:
    if (s) st_close(s);
    ln_model_free(m);
    return -1;
}

int ln_model_load(const char *dir, const lnb_backend *be, ln_model **out, ln_err *e)
{
    load_part whole = {0, 1};
    return model_load(dir, be, &whole, out, e);
}

int ln_model_load_part(const char *dir, const lnb_backend *be, int rank, int ranks, ln_model **out, ln_err *e)
{
    *out = NULL;
    if (ranks < 1 || rank < 0 || rank >= ranks)
        return ln_errf(e, "model %s: rank %d of %d tensor-parallel ranks does not exist", dir, rank, ranks);
    load_part pt = {rank, ranks};
    return model_load(dir, be, &pt, out, e);
}

/* p ← std·N(0,1) draws (std > 0), or all ones (std = 0), through a host buffer. */
static int fill_param(const lnb_backend *be, ln_param *p, ln_rng *r, float std, ln_err *e)
{
    float *h = ln_try_allocf((size_t)p->n, sizeof(float), e, "random model", "the initial values of %s", p->name);
    if (!h) return -1;
    for (int64_t i = 0; i < p->n; i++) h[i] = std > 0.0f ? std * ln_rng_normal(r) : 1.0f;
    be->upload(p->w, h, (size_t)p->n * sizeof(float));
    free(h);
    return 0;
}

int ln_model_new_random(const ln_config *c, const lnb_backend *be, uint64_t seed, ln_model **out, ln_err *e)
{
    *out = NULL;
    ln_model *m = ln_xcalloc(1, sizeof *m);
    m->be = be;
    m->cfg = *c;
    m->tied = c->tie_word_embeddings;
    if (model_alloc(m, e)) {
        ln_model_free(m);
        return -1;
    }
    ln_rng r;
    ln_rng_seed(&r, seed);
    /* transformers' LlamaPreTrainedModel._init_weights: N(0, initializer_range=0.02), norms 1. */
    int rc = fill_param(be, &m->embed, &r, 0.02f, e);
    for (int l = 0; l < c->num_layers && rc == 0; l++) {
        rc |= fill_param(be, &m->layers[l].attn_norm, &r, 0.0f, e);
        rc |= fill_param(be, &m->layers[l].mlp_norm, &r, 0.0f, e);
        for (int t = 0; t < LN_NTARGET && rc == 0; t++) rc = fill_param(be, &m->layers[l].lin[t], &r, 0.02f, e);
    }
    if (rc == 0) rc = fill_param(be, &m->norm, &r, 0.0f, e);
    if (rc == 0 && !m->tied) rc = fill_param(be, &m->lm_head, &r, 0.02f, e);
    if (rc != 0) {
        ln_model_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

/* What the writer references until the file is written: each tensor as stored (fp32 read where it
 * lives on the CPU backend, else a host copy; BF16/F16 converted), the copies owned here. */
typedef struct {
    st_writer *w;
    st_dtype dt;
    const lnb_backend *be;
    void **owned;
    int n_owned, failed;
    ln_err *e;
} save_ctx;

static void save_param(ln_param *p, void *ctx)
{
    save_ctx *s = ctx;
    if (s->failed) return;
    int64_t shape[2] = {p->rows, p->cols};
    const size_t n = (size_t)p->n;
    const int host = strcmp(s->be->name, "cpu") == 0;
    if (host && s->dt == ST_F32) {
        st_writer_add(s->w, p->name, ST_F32, p->ndim, shape, p->w);
        return;
    }
    /* a host fp32 image (downloaded), converted in place to 16 bits when asked: the halves fit */
    float *h = ln_try_allocf(n, sizeof(float), s->e, "model save", "a host copy of %s", p->name);
    if (!h) {
        s->failed = 1;
        return;
    }
    s->owned[s->n_owned++] = h;
    const float *src = p->w;
    if (!host) {
        s->be->download(h, p->w, n * sizeof(float));
        src = h;
    }
    if (s->dt != ST_F32) {
        uint16_t *o = (uint16_t *)h;
        for (size_t i = 0; i < n; i++) o[i] = s->dt == ST_BF16 ? st_f32_to_bf16(src[i]) : st_f32_to_f16(src[i]);
    }
    st_writer_add(s->w, p->name, s->dt, p->ndim, shape, h);
}

int ln_model_save(const ln_model *m, const char *dir, int st_dtype_code, ln_err *e)
{
    st_dtype dt = (st_dtype)st_dtype_code;
    if (dt != ST_F32 && dt != ST_BF16 && dt != ST_F16) return ln_errf(e, "model save: dtype must be F32, BF16 or F16");
    if (ln_mkdir_p(dir, e)) return -1;
    ln_config c = m->cfg;
    c.tie_word_embeddings = m->tied;
    snprintf(c.torch_dtype, sizeof c.torch_dtype, "%s",
             dt == ST_F32 ? "float32" : dt == ST_BF16 ? "bfloat16" : "float16");
    char *json = ln_config_to_json(&c);
    char *cpath = ln_path_join(dir, "config.json");
    int rc = ln_write_file_atomic(cpath, json, strlen(json), e);
    free(cpath);
    free(json);
    if (rc) return -1;
    save_ctx s = {st_writer_new(), dt, m->be, ln_xcalloc((size_t)m->cfg.num_layers * (LN_NTARGET + 2) + 4, sizeof(void *)),
                  0, 0, e};
    st_writer_meta(s.w, "format", "pt");
    ln_model_for_each_param((ln_model *)m, save_param, &s);
    rc = -1;
    if (!s.failed) {
        char *mpath = ln_path_join(dir, "model.safetensors");
        rc = st_writer_write(s.w, mpath, e);
        free(mpath);
    }
    st_writer_free(s.w);
    for (int i = 0; i < s.n_owned; i++) free(s.owned[i]);
    free(s.owned);
    return rc;
}

/* ================================================================ activations */

struct ln_acts {
    int64_t capN, capP;   /* token rows and B·T·T allocated for */
    int cap_r, L;         /* LoRA rank and layers allocated for */
    unsigned cap_targets; /* LoRA targets allocated for */
    int recompute;        /* one set of intermediates shared by every layer (model.h) */
    int fwd_only;         /* ACTS_FWD_HEAD / ACTS_FWD_BARE: a forward no backward follows (below) */
    /* saved by the forward pass, per layer l (res has L+1 entries: res[l] is layer l's input) */
    float **res, **h1, **rstd1, **q, **k, **v, **probs, **att, **xmid, **h2, **rstd2, **gate, **up, **act;
    float **lh;           /* L × LN_NTARGET LoRA intermediates x Aᵀ (N × r), NULL when untargeted */
    float *xf, *rstdf, *logits;
    /* trained_rows_only: the M rows with a target, their xf rows and targets, compacted; the
     * lm_head runs over them in chunks of LN_HEAD_CHUNK rows, fused with its backward */
    int64_t M;            /* −1 when the logits cover every row */
    int head_done;        /* the forward already left ∂loss/∂xf in dh (fused head) */
    int64_t cap_logit_rows; /* rows of logits allocated */
    /* packed rows (ln_batch.segment): nseg segments, each rows [row0, row0+len) of one sequence,
     * its attention probabilities at probs + poff; nseg = 0 for plain batches */
    int nseg;
    int32_t *seg_row0, *seg_len;
    int64_t *seg_poff;
    float head_scale;     /* the loss scale it used */
    int32_t *rows, *tc;   /* host; M each */
    float *xfc;           /* (M, C) */
    /* backward scratch */
    float *dres, *dh, *dq, *dk, *dv, *datt, *dgate, *dup, *dact, *dlh, *dS;
};

/* The layouts of acts_ensure. A forward that no backward can follow — no_logits (calibration),
 * or trained_rows_only without head_grad_scale (an evaluation's loss) — keeps nothing for one:
 * one set of intermediates serves every layer (as with recompute), the residual stream is two
 * buffers used in turn (res[l] = res[l mod 2]), no backward scratch, and without logits no final
 * norm, lm_head or compacted rows either. Same arithmetic on the same values: same results. */
enum { ACTS_TRAIN, ACTS_FWD_HEAD, ACTS_FWD_BARE };

ln_acts *ln_acts_new(void) { return ln_xcalloc(1, sizeof(ln_acts)); }
const float *ln_acts_logits(const ln_acts *a) { return a->logits; }

#define ACT_PER_LAYER 14
static float ***per_layer_lists(ln_acts *a, float ***lists)
{
    lists[0] = a->h1; lists[1] = a->rstd1; lists[2] = a->q; lists[3] = a->k; lists[4] = a->v;
    lists[5] = a->probs; lists[6] = a->att; lists[7] = a->xmid; lists[8] = a->h2; lists[9] = a->rstd2;
    lists[10] = a->gate; lists[11] = a->up; lists[12] = a->act; lists[13] = a->res;
    return lists;
}

static void acts_release(const lnb_backend *be, ln_acts *a)
{
    if (a->res) {
        float **lists[ACT_PER_LAYER];
        per_layer_lists(a, lists);
        int shared = a->recompute || a->fwd_only;
        for (int i = 0; i < ACT_PER_LAYER; i++) { /* shared buffers are freed once */
            int n = i == 13 ? (a->fwd_only ? 2 : a->L + 1) : shared ? 1 : a->L;
            for (int l = 0; l < n; l++) be->free(lists[i][l]);
            free(lists[i]);
        }
        for (int i = 0; i < (shared ? 1 : a->L) * LN_NTARGET; i++) be->free(a->lh[i]);
        free(a->lh);
    }
    float *single[] = {a->xf, a->rstdf, a->logits, a->dres, a->dh, a->dq, a->dk, a->dv,
                       a->datt, a->dgate, a->dup, a->dact, a->dlh, a->dS, a->xfc};
    for (size_t i = 0; i < sizeof single / sizeof *single; i++) be->free(single[i]);
    free(a->rows);
    free(a->tc);
    free(a->seg_row0);
    free(a->seg_len);
    free(a->seg_poff);
    memset(a, 0, sizeof *a);
}

void ln_acts_free(const ln_model *m, ln_acts *a)
{
    if (!a) return;
    acts_release(m->be, a);
    free(a);
}

/* Makes sure a holds buffers for batch (B, T) with adapter ad, and logit_rows rows of logits, in
 * layout mode (ACTS_*). */
static int acts_ensure(const ln_model *m, const struct ln_adapter *ad, ln_acts *a, int B, int T, int64_t logit_rows,
                       int mode, ln_err *e)
{
    const ln_config *c = &m->cfg;
    int64_t N = (int64_t)B * T, P = (int64_t)B * c->num_heads * T * (m->be->attention_rows_only ? 1 : T);
    int r = ad && !ad->full ? ad->rank : 0;
    unsigned tg = r > 0 ? ad->targets : 0;
    if (a->res && N <= a->capN && P <= a->capP && r == a->cap_r && tg == a->cap_targets && a->L == c->num_layers &&
        a->recompute == m->recompute && logit_rows <= a->cap_logit_rows && a->fwd_only == mode)
        return 0;
    const lnb_backend *be = m->be;
    acts_release(be, a);
    int L = c->num_layers, C = c->hidden_size, I = c->intermediate_size;
    int64_t qd = (int64_t)c->num_heads * c->head_dim, kvd = (int64_t)c->num_kv_heads * c->head_dim;
    a->capN = N; a->capP = P; a->cap_r = r; a->L = L; a->cap_targets = tg; a->recompute = m->recompute;
    a->fwd_only = mode;
    const int shared = a->recompute || mode != ACTS_TRAIN, head = mode != ACTS_FWD_BARE, bwd = mode == ACTS_TRAIN;
    a->h1 = ln_xcalloc((size_t)L, sizeof(float *)); a->rstd1 = ln_xcalloc((size_t)L, sizeof(float *));
    a->q = ln_xcalloc((size_t)L, sizeof(float *)); a->k = ln_xcalloc((size_t)L, sizeof(float *));
    a->v = ln_xcalloc((size_t)L, sizeof(float *)); a->probs = ln_xcalloc((size_t)L, sizeof(float *));
    a->att = ln_xcalloc((size_t)L, sizeof(float *)); a->xmid = ln_xcalloc((size_t)L, sizeof(float *));
    a->h2 = ln_xcalloc((size_t)L, sizeof(float *)); a->rstd2 = ln_xcalloc((size_t)L, sizeof(float *));
    a->gate = ln_xcalloc((size_t)L, sizeof(float *)); a->up = ln_xcalloc((size_t)L, sizeof(float *));
    a->act = ln_xcalloc((size_t)L, sizeof(float *)); a->res = ln_xcalloc((size_t)L + 1, sizeof(float *));
    a->lh = ln_xcalloc((size_t)L * LN_NTARGET, sizeof(float *));
    int64_t sizes[ACT_PER_LAYER] = {N * C, N, N * qd, N * kvd, N * kvd, P, N * qd, N * C, N * C, N,
                                    N * I, N * I, N * I, N * C};
    float **lists[ACT_PER_LAYER];
    per_layer_lists(a, lists);
    int fail = 0;
    for (int i = 0; i < ACT_PER_LAYER; i++) {
        int n = i == 13 ? L + 1 : L;
        for (int l = 0; l < n; l++) {
            if (i != 13 && shared && l > 0) lists[i][l] = lists[i][0];
            else if (i == 13 && mode != ACTS_TRAIN && l > 1) lists[i][l] = lists[i][l % 2]; /* two in turn */
            else fail |= !(lists[i][l] = be->alloc((size_t)sizes[i] * sizeof(float)));
        }
    }
    if (r > 0)
        for (int l = 0; l < L; l++)
            for (int t = 0; t < LN_NTARGET; t++)
                if (ad->lora[l * LN_NTARGET + t].A.w) {
                    if (shared && l > 0) a->lh[l * LN_NTARGET + t] = a->lh[t];
                    else fail |= !(a->lh[l * LN_NTARGET + t] = be->alloc((size_t)(N * r) * sizeof(float)));
                }
    int64_t wide = qd > C ? qd : C;
    if (head) {
        fail |= !(a->xf = be->alloc((size_t)(N * C) * sizeof(float)));
        fail |= !(a->rstdf = be->alloc((size_t)N * sizeof(float)));
        /* all N rows of logits for a plain forward; training (trained_rows_only) needs one chunk */
        a->cap_logit_rows = logit_rows;
        fail |= !(a->logits = be->alloc((size_t)(logit_rows * c->vocab_size) * sizeof(float)));
        fail |= !(a->xfc = be->alloc((size_t)(N * C) * sizeof(float)));
    }
    /* per-token index arrays grow with the batch: a failure is the batch's out of memory, not an abort */
    fail |= !(a->rows = malloc((size_t)N * sizeof(int32_t)));
    fail |= !(a->seg_row0 = malloc((size_t)N * sizeof(int32_t)));
    fail |= !(a->seg_len = malloc((size_t)N * sizeof(int32_t)));
    fail |= !(a->seg_poff = malloc((size_t)N * sizeof(int64_t)));
    fail |= !(a->tc = malloc((size_t)N * sizeof(int32_t)));
    a->M = -1;
    if (bwd) {
        fail |= !(a->dres = be->alloc((size_t)(N * C) * sizeof(float)));
        fail |= !(a->dh = be->alloc((size_t)(N * wide) * sizeof(float)));
        fail |= !(a->dq = be->alloc((size_t)(N * qd) * sizeof(float)));
        fail |= !(a->dk = be->alloc((size_t)(N * kvd) * sizeof(float)));
        fail |= !(a->dv = be->alloc((size_t)(N * kvd) * sizeof(float)));
        fail |= !(a->datt = be->alloc((size_t)(N * qd) * sizeof(float)));
        fail |= !(a->dgate = be->alloc((size_t)(N * I) * sizeof(float)));
        fail |= !(a->dup = be->alloc((size_t)(N * I) * sizeof(float)));
        fail |= !(a->dact = be->alloc((size_t)(N * I) * sizeof(float)));
        fail |= !(a->dlh = be->alloc((size_t)(N * (r > 0 ? r : 1)) * sizeof(float)));
        fail |= !(a->dS = be->alloc((size_t)T * T * sizeof(float)));
    }
    if (fail) {
        acts_release(be, a);
        return ln_errf(e, "out of memory allocating activations for a batch of %d × %d tokens", B, T);
    }
    return 0;
}

/* cos/sin tables (T, hd/2): angle = t · inv_freq_i (fp32 product, as transformers), computed on the
 * host and uploaded into the backend's memory (bit-identical values; a device backend reads them in
 * place, no staging copy per rope call). They only grow: the old tables are freed first (be->free
 * waits for queued work that may still read them, as for activations), so the model holds the
 * tables of the longest forward so far (memplan.h counts them at the job's longest T). */
static int rope_ensure(ln_model *m, int T, ln_err *e)
{
    if (T <= m->rope_T) return 0;
    const lnb_backend *be = m->be;
    const int half = m->cfg.head_dim / 2;
    const size_t n = (size_t)T * half;
    be->free(m->rope_cos);
    be->free(m->rope_sin);
    m->rope_cos = m->rope_sin = NULL;
    m->rope_T = 0;
    float *inv = ln_try_allocf((size_t)half, sizeof(float), e, "forward", "the rotary frequencies");
    float *h = inv ? ln_try_allocf(2 * n, sizeof(float), e, "forward", "the host rotary table of %d positions", T)
                   : NULL;
    if (!h) {
        free(inv);
        return -1;
    }
    m->rope_cos = be->alloc(n * sizeof(float));
    m->rope_sin = m->rope_cos ? be->alloc(n * sizeof(float)) : NULL;
    if (!m->rope_sin) {
        be->free(m->rope_cos);
        m->rope_cos = NULL;
        free(inv);
        free(h);
        char size[32];
        return ln_errf(e, "forward: out of memory allocating %s for the rotary tables of %d positions (%s memory)",
                       ln_fmt_bytes(2.0 * (double)(n * sizeof(float)), size, sizeof size), T, be->name);
    }
    ln_config_rope_inv_freq(&m->cfg, inv);
    float *hc = h, *hs = h + n;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            float ang = (float)t * inv[i];
            hc[(int64_t)t * half + i] = cosf(ang);
            hs[(int64_t)t * half + i] = sinf(ang);
        }
    be->upload(m->rope_cos, hc, n * sizeof(float));
    be->upload(m->rope_sin, hs, n * sizeof(float));
    m->rope_T = T;
    free(inv);
    free(h);
    return 0;
}

/* ================================================================ linear (+ LoRA) */

/* x (N, d_in), W (d_out, d_in), A (r, d_in), B (d_out, r):
 *   y = beta·y + x Wᵀ + s (x Aᵀ) Bᵀ ;  h = x Aᵀ (N, r) is saved for the backward. */
static void linear_forward(const lnb_backend *be, float *y, float beta, const float *x, int N, const ln_param *W,
                           const ln_lora *lo, float s, float *h)
{
    int dout = W->rows, din = W->cols;
    be->matmul(0, 1, N, dout, din, 1.0f, x, din, W->w, din, beta, y, dout);
    if (lo && lo->A.w) {
        int r = lo->A.rows;
        be->matmul(0, 1, N, r, din, 1.0f, x, din, lo->A.w, din, 0.0f, h, r);
        be->matmul(0, 1, N, dout, r, s, h, r, lo->B.w, r, 1.0f, y, dout);
    }
}

/* dW += dyᵀ x ; dB += s dyᵀ h ; dh = s dy B (N, r) ; dA += dhᵀ x ; dx = beta·dx + dy W + dh A.
 * dx may be NULL (nothing below needs it). */
static void linear_backward(const lnb_backend *be, float *dx, float beta, const float *dy, const float *x, int N,
                            ln_param *W, ln_lora *lo, float s, const float *h, float *dh)
{
    int dout = W->rows, din = W->cols;
    if (W->g) be->matmul(1, 0, dout, din, N, 1.0f, dy, dout, x, din, 1.0f, W->g, din);
    int has_lora = lo && lo->A.w;
    if (has_lora) {
        int r = lo->A.rows;
        if (lo->B.g) be->matmul(1, 0, dout, r, N, s, dy, dout, h, r, 1.0f, lo->B.g, r);
        if (lo->A.g || dx) {
            be->matmul(0, 0, N, r, dout, s, dy, dout, lo->B.w, r, 0.0f, dh, r);
            if (lo->A.g) be->matmul(1, 0, r, din, N, 1.0f, dh, r, x, din, 1.0f, lo->A.g, din);
        }
    }
    if (dx) {
        be->matmul(0, 0, N, din, dout, 1.0f, dy, dout, W->w, din, beta, dx, din);
        if (has_lora) be->matmul(0, 0, N, din, lo->A.rows, 1.0f, dh, lo->A.rows, lo->A.w, din, 1.0f, dx, din);
    }
}

static ln_lora *lora_of(const struct ln_adapter *ad, int l, int t)
{
    if (!ad || ad->full || !ad->lora) return NULL;
    ln_lora *lo = &ad->lora[l * LN_NTARGET + t];
    return lo->A.w ? lo : NULL;
}

/* ================================================================ tensor parallelism */

/* Megatron's all-reduce (tensor_parallel.h): sums x over the ranks of a sharded model; a no-op
 * for a whole model. A failure is remembered and reported by the pass that called it. */
static void tp_allreduce(ln_model *m, float *x, int64_t n)
{
    if (!m->comm || m->comm->size == 1 || m->comm_failed) return;
    if (comm_allreduce_sum(m->comm, x, n, &m->comm_err)) m->comm_failed = 1;
}

/* The residual a row-parallel layer adds to: rank 0 adds it, the others start from zero, so that
 * the all-reduce of the partial outputs adds it exactly once. */
static void tp_residual(ln_model *m, float *dst, const float *res, int64_t n)
{
    if (m->comm && m->comm->rank != 0) m->be->zero(dst, n);
    else m->be->copy(dst, res, n);
}

/* ================================================================ one layer */

/* res[l] (N,C) -> res[l+1] (N,C):
 *   h1 = rmsnorm(x) ; q,k,v = h1 W{q,k,v}ᵀ (+LoRA) ; rope(q,k) ; att = attention(q,k,v)
 *   xmid = x + att Woᵀ ; h2 = rmsnorm(xmid) ; act = silu(h2 Wgᵀ) ⊙ (h2 Wuᵀ) ; out = xmid + act Wdᵀ */
static void layer_forward(ln_model *m, const struct ln_adapter *ad, ln_acts *a, int l, int B, int T,
                          const ln_fwd_opts *o)
{
    const lnb_backend *be = m->be;
    const ln_config *c = &m->cfg;
    ln_layer *L = &m->layers[l];
    int N = B * T, C = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, hd = c->head_dim;
    int I = c->intermediate_size;
    float s = ad && !ad->full ? ad->scale : 0.0f;
    float **lh = a->lh + (size_t)l * LN_NTARGET;
    ln_input_hook hook = o ? o->hook : NULL;
    void *hctx = o ? o->hook_ctx : NULL;

    be->rmsnorm_forward(a->h1[l], a->rstd1[l], a->res[l], L->attn_norm.w, N, C, c->rms_norm_eps);
    if (hook) hook(l, LN_IN_QKV, a->h1[l], N, C, hctx);
    linear_forward(be, a->q[l], 0.0f, a->h1[l], N, &L->lin[LN_Q], lora_of(ad, l, LN_Q), s, lh[LN_Q]);
    linear_forward(be, a->k[l], 0.0f, a->h1[l], N, &L->lin[LN_K], lora_of(ad, l, LN_K), s, lh[LN_K]);
    linear_forward(be, a->v[l], 0.0f, a->h1[l], N, &L->lin[LN_V], lora_of(ad, l, LN_V), s, lh[LN_V]);
    if (!a->nseg) {
        be->rope_forward(a->q[l], m->rope_cos, m->rope_sin, N, T, nh, hd);
        be->rope_forward(a->k[l], m->rope_cos, m->rope_sin, N, T, nkv, hd);
        be->attention_forward(a->att[l], a->probs[l], a->q[l], a->k[l], a->v[l], B, T, nh, nkv, hd);
    } else {
        /* packed rows: each segment is its own sequence (positions from 0, attention inside it) */
        for (int sg = 0; sg < a->nseg; sg++) {
            int64_t r0 = a->seg_row0[sg];
            int len = a->seg_len[sg];
            float *q = a->q[l] + r0 * nh * hd, *k = a->k[l] + r0 * nkv * hd, *v = a->v[l] + r0 * nkv * hd;
            be->rope_forward(q, m->rope_cos, m->rope_sin, len, len, nh, hd);
            be->rope_forward(k, m->rope_cos, m->rope_sin, len, len, nkv, hd);
            be->attention_forward(a->att[l] + r0 * nh * hd, a->probs[l] + a->seg_poff[sg], q, k, v, 1, len, nh, nkv,
                                  hd);
        }
    }
    if (hook) hook(l, LN_IN_O, a->att[l], N, nh * hd, hctx);
    tp_residual(m, a->xmid[l], a->res[l], (int64_t)N * C);
    linear_forward(be, a->xmid[l], 1.0f, a->att[l], N, &L->lin[LN_O], lora_of(ad, l, LN_O), s, lh[LN_O]);
    tp_allreduce(m, a->xmid[l], (int64_t)N * C);

    be->rmsnorm_forward(a->h2[l], a->rstd2[l], a->xmid[l], L->mlp_norm.w, N, C, c->rms_norm_eps);
    if (hook) hook(l, LN_IN_GATEUP, a->h2[l], N, C, hctx);
    linear_forward(be, a->gate[l], 0.0f, a->h2[l], N, &L->lin[LN_GATE], lora_of(ad, l, LN_GATE), s, lh[LN_GATE]);
    linear_forward(be, a->up[l], 0.0f, a->h2[l], N, &L->lin[LN_UP], lora_of(ad, l, LN_UP), s, lh[LN_UP]);
    be->swiglu_forward(a->act[l], a->gate[l], a->up[l], (int64_t)N * I);
    if (hook) hook(l, LN_IN_DOWN, a->act[l], N, I, hctx);
    tp_residual(m, a->res[l + 1], a->xmid[l], (int64_t)N * C);
    linear_forward(be, a->res[l + 1], 1.0f, a->act[l], N, &L->lin[LN_DOWN], lora_of(ad, l, LN_DOWN), s, lh[LN_DOWN]);
    tp_allreduce(m, a->res[l + 1], (int64_t)N * C);
}

/* On entry a->dres = ∂loss/∂res[l+1]; on exit ∂loss/∂res[l]. Weight/factor gradients accumulate. */
static void layer_backward(ln_model *m, struct ln_adapter *ad, ln_acts *a, int l, int B, int T, int need_dx)
{
    const lnb_backend *be = m->be;
    const ln_config *c = &m->cfg;
    ln_layer *L = &m->layers[l];
    int N = B * T, C = c->hidden_size, nh = c->num_heads, nkv = c->num_kv_heads, hd = c->head_dim;
    int I = c->intermediate_size;
    float s = ad && !ad->full ? ad->scale : 0.0f;
    float **lh = a->lh + (size_t)l * LN_NTARGET;

    /* MLP: out = xmid + act Wdᵀ, so ∂/∂xmid gets dres directly (the residual) plus the norm path. */
    linear_backward(be, a->dact, 0.0f, a->dres, a->act[l], N, &L->lin[LN_DOWN], lora_of(ad, l, LN_DOWN), s,
                    lh[LN_DOWN], a->dlh);
    be->swiglu_backward(a->dgate, a->dup, a->dact, a->gate[l], a->up[l], (int64_t)N * I);
    linear_backward(be, a->dh, 0.0f, a->dgate, a->h2[l], N, &L->lin[LN_GATE], lora_of(ad, l, LN_GATE), s,
                    lh[LN_GATE], a->dlh);
    linear_backward(be, a->dh, 1.0f, a->dup, a->h2[l], N, &L->lin[LN_UP], lora_of(ad, l, LN_UP), s, lh[LN_UP],
                    a->dlh);
    tp_allreduce(m, a->dh, (int64_t)N * C); /* column-parallel: each rank holds part of ∂/∂h2 */
    be->rmsnorm_backward(a->dres, L->mlp_norm.g, a->dh, a->xmid[l], L->mlp_norm.w, a->rstd2[l], N, C);

    /* Attention: xmid = x + att Woᵀ. */
    linear_backward(be, a->datt, 0.0f, a->dres, a->att[l], N, &L->lin[LN_O], lora_of(ad, l, LN_O), s, lh[LN_O],
                    a->dlh);
    if (!a->nseg) {
        be->attention_backward(a->dq, a->dk, a->dv, a->dS, a->datt, a->probs[l], a->q[l], a->k[l], a->v[l], B, T, nh,
                               nkv, hd);
        be->rope_backward(a->dq, m->rope_cos, m->rope_sin, N, T, nh, hd);
        be->rope_backward(a->dk, m->rope_cos, m->rope_sin, N, T, nkv, hd);
    } else {
        for (int sg = 0; sg < a->nseg; sg++) { /* packed rows, segment by segment as the forward */
            int64_t r0 = a->seg_row0[sg], qo = r0 * nh * hd, ko = r0 * nkv * hd;
            int len = a->seg_len[sg];
            be->attention_backward(a->dq + qo, a->dk + ko, a->dv + ko, a->dS, a->datt + qo, a->probs[l] + a->seg_poff[sg],
                                   a->q[l] + qo, a->k[l] + ko, a->v[l] + ko, 1, len, nh, nkv, hd);
            be->rope_backward(a->dq + qo, m->rope_cos, m->rope_sin, len, len, nh, hd);
            be->rope_backward(a->dk + ko, m->rope_cos, m->rope_sin, len, len, nkv, hd);
        }
    }
    /* ∂/∂h1 is only needed when something below (or this layer's input norm) trains */
    float *dh1 = need_dx || L->attn_norm.g ? a->dh : NULL;
    linear_backward(be, dh1, 0.0f, a->dq, a->h1[l], N, &L->lin[LN_Q], lora_of(ad, l, LN_Q), s, lh[LN_Q], a->dlh);
    linear_backward(be, dh1, 1.0f, a->dk, a->h1[l], N, &L->lin[LN_K], lora_of(ad, l, LN_K), s, lh[LN_K], a->dlh);
    linear_backward(be, dh1, 1.0f, a->dv, a->h1[l], N, &L->lin[LN_V], lora_of(ad, l, LN_V), s, lh[LN_V], a->dlh);
    if (dh1) {
        tp_allreduce(m, a->dh, (int64_t)N * C);
        be->rmsnorm_backward(a->dres, L->attn_norm.g, a->dh, a->res[l], L->attn_norm.w, a->rstd1[l], N, C);
    }
}

/* ================================================================ whole model */

int ln_model_forward(ln_model *m, const struct ln_adapter *ad, ln_acts *a, const ln_batch *b,
                     const ln_fwd_opts *o, double *loss_sum, ln_err *e)
{
    const ln_config *c = &m->cfg;
    const lnb_backend *be = m->be;
    int B = b->B, T = b->T, N = B * T, V = c->vocab_size, C = c->hidden_size;
    if (B <= 0 || T <= 0) return ln_errf(e, "forward: empty batch (%d × %d)", B, T);
    for (int i = 0; i < N; i++) {
        if (b->ids[i] < 0 || b->ids[i] >= V)
            return ln_errf(e, "forward: token id %d at row %d, position %d is outside the vocabulary [0, %d)",
                           b->ids[i], i / T, i % T, V);
        if (b->targets && b->targets[i] >= V)
            return ln_errf(e, "forward: label %d at row %d, position %d is outside the vocabulary [0, %d)",
                           b->targets[i], i / T, i % T, V);
    }
    int chunked = o && o->trained_rows_only && b->targets;
    int64_t logit_rows = chunked ? (N < LN_HEAD_CHUNK ? N : LN_HEAD_CHUNK) : N;
    /* a forward that no backward can follow keeps one layer's activations (ACTS_FWD_*) */
    int mode = o && o->no_logits ? ACTS_FWD_BARE : chunked && o->head_grad_scale == 0.0f ? ACTS_FWD_HEAD : ACTS_TRAIN;
    if (mode == ACTS_FWD_BARE) logit_rows = 0;
    if (acts_ensure(m, ad, a, B, T, logit_rows, mode, e)) return -1;
    /* packed rows: a segment starts wherever segment[] changes along a sequence (the padding tail,
     * segment −1, is one more); segment s's probabilities take nh·len·len floats (nh·len when the
     * backend keeps rows only) at seg_poff[s] — at most what the whole batch would */
    a->nseg = 0;
    const int32_t *segment = o ? o->segment : NULL;
    if (segment) {
        int64_t off = 0;
        for (int bi = 0; bi < B; bi++)
            for (int t = 0; t < T; t++) {
                int64_t n = (int64_t)bi * T + t;
                if (t == 0 || segment[n] != segment[n - 1]) {
                    if (a->nseg > 0) {
                        int p = a->nseg - 1;
                        off += (int64_t)c->num_heads * a->seg_len[p] * (be->attention_rows_only ? 1 : a->seg_len[p]);
                    }
                    a->seg_row0[a->nseg] = (int32_t)n;
                    a->seg_len[a->nseg] = 0;
                    a->seg_poff[a->nseg] = off;
                    a->nseg++;
                }
                a->seg_len[a->nseg - 1]++;
            }
    }
    if (rope_ensure(m, T, e) != 0) return -1;
    be->embedding_forward(a->res[0], b->ids, m->embed.w, N, C);
    for (int l = 0; l < c->num_layers; l++) layer_forward(m, ad, a, l, B, T, o);
    if (m->comm_failed) return ln_errf(e, "forward: %s", m->comm_err.msg);
    if (o && o->no_logits) return 0;
    /* xf = rmsnorm(res[L]) ; logits = xf Wlmᵀ (N, V) */
    be->rmsnorm_forward(a->xf, a->rstdf, a->res[c->num_layers], m->norm.w, N, C, c->rms_norm_eps);
    {
        /* r = (Σx²/C + eps)^-½ is finite and > 0 for any finite hidden row whose Σx² fits a float.
         * A row that overflowed (weights grown too large) gives r = 0: xf = 0, uniform logits, a
         * flat loss of ln(V) and no gradient — training would go on silently. A NaN row gives NaN. */
        float *r = ln_try_allocf((size_t)N, sizeof(float), e, "forward", "the final norm's %d row scales", N);
        if (!r) return -1;
        be->download(r, a->rstdf, (size_t)N * sizeof(float));
        int bad = -1;
        for (int i = 0; i < N && bad < 0; i++)
            if (!(r[i] > 0.0f) || !isfinite(r[i])) bad = i;
        free(r);
        if (bad >= 0)
            return ln_errf(e, "forward: the hidden state of token %d is not finite (its sum of squares overflows at "
                           "the final norm): the weights have grown too large", bad);
    }
    a->M = -1;
    a->head_done = 0;
    if (o && o->trained_rows_only && b->targets) {
        /* Only rows that carry a target reach the lm_head: masked prompt tokens and padding cost
         * no V × C products (in SFT data often half the rows). They go in chunks of LN_HEAD_CHUNK
         * rows; with head_grad_scale each chunk's backward runs right away (dlogits in place,
         * dWlm += dlogitsᵀ xf, dxf = dlogits Wlm), so a (chunk × V) logits block is all that lives. */
        int64_t M = 0;
        for (int i = 0; i < N; i++)
            if (b->targets[i] >= 0) {
                a->rows[M] = i;
                a->tc[M] = b->targets[i];
                be->copy(a->xfc + M * C, a->xf + (int64_t)i * C, C);
                M++;
            }
        a->M = M;
        float gs = o->head_grad_scale;
        double loss = 0.0;
        for (int64_t r0 = 0; r0 < M; r0 += LN_HEAD_CHUNK) {
            int nr = (int)(M - r0 < LN_HEAD_CHUNK ? M - r0 : LN_HEAD_CHUNK);
            float *xc = a->xfc + r0 * C;
            be->matmul(0, 1, nr, V, C, 1.0f, xc, C, m->lm_head.w, C, 0.0f, a->logits, V);
            loss += be->cross_entropy(a->logits, gs != 0.0f ? a->logits : NULL, a->tc + r0, nr, V, gs);
            if (gs != 0.0f) {
                if (m->lm_head.g) be->matmul(1, 0, V, C, nr, 1.0f, a->logits, V, xc, C, 1.0f, m->lm_head.g, C);
                be->matmul(0, 0, nr, C, V, 1.0f, a->logits, V, m->lm_head.w, C, 0.0f, xc, C); /* xc ← dxf */
            }
        }
        if (gs != 0.0f) {
            be->zero(a->dh, (int64_t)N * C);
            for (int64_t i = 0; i < M; i++) be->copy(a->dh + (int64_t)a->rows[i] * C, a->xfc + i * C, C);
            a->head_done = 1;
            a->head_scale = gs;
        }
        if (loss_sum) *loss_sum = loss;
        return 0;
    }
    be->matmul(0, 1, N, V, C, 1.0f, a->xf, C, m->lm_head.w, C, 0.0f, a->logits, V);
    if (loss_sum) *loss_sum = b->targets ? be->cross_entropy(a->logits, NULL, b->targets, N, V, 0.0f) : 0.0;
    return 0;
}

/* Does layer l hold anything trainable (a norm, a weight, a LoRA factor)? */
static int layer_trains(const ln_model *m, const struct ln_adapter *ad, int l)
{
    const ln_layer *L = &m->layers[l];
    if (L->attn_norm.g || L->mlp_norm.g) return 1;
    for (int t = 0; t < LN_NTARGET; t++) {
        ln_lora *lo = lora_of(ad, l, t);
        if (L->lin[t].g || (lo && (lo->A.g || lo->B.g))) return 1;
    }
    return 0;
}

int ln_model_backward(ln_model *m, struct ln_adapter *ad, ln_acts *a, const ln_batch *b, float loss_scale,
                      ln_err *e)
{
    const ln_config *c = &m->cfg;
    const lnb_backend *be = m->be;
    int B = b->B, T = b->T, N = B * T, V = c->vocab_size, C = c->hidden_size, L = c->num_layers;
    if (!b->targets) return ln_errf(e, "backward: the batch has no labels");
    if (!a->res || N > a->capN) return ln_errf(e, "backward: called without a matching forward pass");
    if (a->fwd_only)
        return ln_errf(e, "backward: the last forward kept nothing for a backward (no_logits, or trained_rows_only "
                          "without head_grad_scale)");
    if (a->head_done) {
        /* fused head (trained_rows_only + head_grad_scale): dh already holds ∂loss/∂xf */
        if (loss_scale != a->head_scale)
            return ln_errf(e, "backward: loss scale %g differs from the forward's head_grad_scale %g", (double)loss_scale,
                           (double)a->head_scale);
    } else if (a->M >= 0) {
        return ln_errf(e, "backward: the forward ran trained_rows_only without head_grad_scale (loss only)");
    } else {
        /* dlogits = scale · (softmax − onehot), in place */
        be->cross_entropy(a->logits, a->logits, b->targets, N, V, loss_scale);
        /* logits = xf Wlmᵀ: dWlm += dlogitsᵀ xf ; dxf = dlogits Wlm */
        if (m->lm_head.g) be->matmul(1, 0, V, C, N, 1.0f, a->logits, V, a->xf, C, 1.0f, m->lm_head.g, C);
        be->matmul(0, 0, N, C, V, 1.0f, a->logits, V, m->lm_head.w, C, 0.0f, a->dh, C);
    }
    be->zero(a->dres, (int64_t)N * C);
    be->rmsnorm_backward(a->dres, m->norm.g, a->dh, a->res[L], m->norm.w, a->rstdf, N, C);
    /* The gradient only has to travel down to the lowest layer that trains (or to the embedding). */
    int lowest = 0;
    if (!m->embed.g) {
        lowest = L;
        for (int l = 0; l < L; l++)
            if (layer_trains(m, ad, l)) { lowest = l; break; }
    }
    for (int l = L - 1; l >= lowest; l--) {
        /* recomputation: the shared buffers hold the last layer's intermediates after the forward;
         * every other layer's are rebuilt from its saved input res[l] (no hook: not a calibration) */
        if (a->recompute && l < L - 1) layer_forward(m, ad, a, l, B, T, NULL);
        layer_backward(m, ad, a, l, B, T, l > lowest || m->embed.g != NULL);
    }
    if (m->comm_failed) return ln_errf(e, "backward: %s", m->comm_err.msg);
    if (m->embed.g) be->embedding_backward(m->embed.g, a->dres, b->ids, N, C);
    return 0;
}
