/* tensor_parallel.c — sharding a model and its adapter over ranks, and the per-step gradient
 * reductions (see tensor_parallel.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lapacke.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/backend/backend.h"
#include "worker/engine/drift.h"
#include "worker/engine/lora_init.h"
#include "worker/engine/nullspace.h"
#include "worker/engine/tensor_parallel.h"

int ln_tp_column_parallel(ln_target t) { return t != LN_O && t != LN_DOWN; }

int ln_tp_shard_config(const ln_config *full, int size, ln_config *shard, ln_err *e)
{
    if (size < 1) return ln_errf(e, "tensor parallel: %d ranks (at least 1 expected)", size);
    if (full->num_heads % size)
        return ln_errf(e, "tensor parallel: num_attention_heads %d does not divide by %d ranks", full->num_heads, size);
    if (full->num_kv_heads % size)
        return ln_errf(e, "tensor parallel: num_key_value_heads %d does not divide by %d ranks", full->num_kv_heads,
                       size);
    if (full->intermediate_size % size)
        return ln_errf(e, "tensor parallel: intermediate_size %d does not divide by %d ranks",
                       full->intermediate_size, size);
    *shard = *full;
    shard->num_heads /= size;
    shard->num_kv_heads /= size;
    shard->intermediate_size /= size;
    return 0;
}

/* Copies rows [r0, r0+rows) × columns [c0, c0+cols) of src (ld src_cols) into dst (rows × cols),
 * through host memory so that it works for any backend. */
static int copy_block(const lnb_backend *be, float *dst, const float *src, int src_rows, int src_cols, int r0,
                      int rows, int c0, int cols, ln_err *e)
{
    float *h = ln_try_alloc((size_t)src_rows * src_cols * sizeof(float), "tensor parallel: a whole tensor to shard", e);
    float *o = h ? ln_try_alloc((size_t)rows * cols * sizeof(float), "tensor parallel: a shard's block", e) : NULL;
    if (!o) {
        free(h);
        return -1;
    }
    be->download(h, src, (size_t)src_rows * src_cols * sizeof(float));
    for (int i = 0; i < rows; i++)
        memcpy(o + (size_t)i * cols, h + (size_t)(r0 + i) * src_cols + c0, (size_t)cols * sizeof(float));
    be->upload(dst, o, (size_t)rows * cols * sizeof(float));
    free(h);
    free(o);
    return 0;
}

/* The block of a full d_out × d_in weight that rank k of R holds (see the header). */
static void weight_block(ln_target t, const ln_param *full, const ln_param *shard, int k, int *r0, int *c0)
{
    *r0 = ln_tp_column_parallel(t) ? k * shard->rows : 0;
    *c0 = ln_tp_column_parallel(t) ? 0 : k * shard->cols;
    (void)full;
}

int ln_tp_shard_model(const ln_model *full, ln_comm *c, ln_model **out, ln_err *e)
{
    *out = NULL;
    ln_config cfg;
    if (ln_tp_shard_config(&full->cfg, c->size, &cfg, e)) return -1;
    cfg.tie_word_embeddings = full->tied;
    ln_model *m;
    /* A fresh model of the shard's shape (its random values are all overwritten below). */
    if (ln_model_new_random(&cfg, full->be, 0, &m, e)) return -1;
    const lnb_backend *be = full->be;
    be->copy(m->embed.w, full->embed.w, full->embed.n);
    be->copy(m->norm.w, full->norm.w, full->norm.n);
    if (!m->tied) be->copy(m->lm_head.w, full->lm_head.w, full->lm_head.n);
    for (int l = 0; l < cfg.num_layers; l++) {
        const ln_layer *F = &full->layers[l];
        ln_layer *S = &m->layers[l];
        be->copy(S->attn_norm.w, F->attn_norm.w, F->attn_norm.n);
        be->copy(S->mlp_norm.w, F->mlp_norm.w, F->mlp_norm.n);
        for (int t = 0; t < LN_NTARGET; t++) {
            int r0, c0;
            weight_block((ln_target)t, &F->lin[t], &S->lin[t], c->rank, &r0, &c0);
            if (copy_block(be, S->lin[t].w, F->lin[t].w, F->lin[t].rows, F->lin[t].cols, r0, S->lin[t].rows, c0,
                           S->lin[t].cols, e)) {
                ln_model_free(m);
                return ln_err_prefix(e, "sharding %s", F->lin[t].name);
            }
        }
    }
    m->comm = c;
    m->recompute = full->recompute; /* activation recomputation is per layer: the same on a shard */
    *out = m;
    return 0;
}

int ln_tp_load_shard(const char *dir, const lnb_backend *be, ln_comm *c, ln_model **out, ln_err *e)
{
    *out = NULL;
    if (ln_model_load_part(dir, be, c->rank, c->size, out, e)) return -1;
    (*out)->comm = c;
    return 0;
}

/* Copies one factor's block: the block of full factor src (rows × cols) that matches dst's shape
 * at (r0, c0). */
static int factor_block(const lnb_backend *be, float *dst, const ln_param *dp, const float *src, const ln_param *sp,
                        int r0, int c0, ln_err *e)
{
    return copy_block(be, dst, src, sp->rows, sp->cols, r0, dp->rows, c0, dp->cols, e);
}

int ln_tp_shard_adapter(const ln_model *full, const ln_adapter *ad, ln_model *shard, ln_adapter *out, ln_err *e)
{
    memset(out, 0, sizeof *out);
    if (ad->full) {
        /* Full fine-tuning has no factors: every shard weight trains. */
        snprintf(out->method, sizeof out->method, "%s", ad->method);
        out->full = 1;
        out->num_layers = ad->num_layers;
        return ln_model_set_full_training(shard, e);
    }
    if (ln_adapter_alloc(shard, out, ad->method, ad->rank, ad->alpha, ad->targets, e)) return -1;
    out->residual = ad->residual;
    const lnb_backend *be = full->be;
    int k = shard->comm ? shard->comm->rank : 0;
    for (int l = 0; l < ad->num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            const ln_lora *F = &ad->lora[l * LN_NTARGET + t];
            ln_lora *S = &out->lora[l * LN_NTARGET + t];
            if (!F->A.w) continue;
            int col = ln_tp_column_parallel((ln_target)t);
            /* column-parallel: B rows split, A whole; row-parallel: A columns split, B whole */
            int b_r0 = col ? k * S->B.rows : 0, a_c0 = col ? 0 : k * S->A.cols;
            if (factor_block(be, S->A.w, &S->A, F->A.w, &F->A, 0, a_c0, e) ||
                factor_block(be, S->B.w, &S->B, F->B.w, &F->B, b_r0, 0, e))
                return ln_err_prefix(e, "sharding %s", F->A.name);
            if (ln_param_set_trainable(be, &S->A, F->A.trainable, e)) return -1;
            if (ln_param_set_trainable(be, &S->B, F->B.trainable, e)) return -1;
            if (F->A0) {
                S->A0 = be->alloc((size_t)S->A.n * sizeof(float));
                S->B0 = be->alloc((size_t)S->B.n * sizeof(float));
                if (!S->A0 || !S->B0) return ln_errf(e, "tensor parallel: out of memory copying the initial factors of %s", S->A.name);
                if (copy_block(be, S->A0, F->A0, F->A.rows, F->A.cols, 0, S->A.rows, a_c0, S->A.cols, e) ||
                    copy_block(be, S->B0, F->B0, F->B.rows, F->B.cols, b_r0, S->B.rows, 0, S->B.cols, e))
                    return ln_err_prefix(e, "sharding the initial factors of %s", F->A.name);
            }
        }
    return 0;
}

/* The factor of target t whose gradient is a partial sum on each rank (the replicated one). */
static ln_param *replicated_factor(ln_lora *lo, ln_target t)
{
    return ln_tp_column_parallel(t) ? &lo->A : &lo->B;
}

int ln_tp_reduce_grads(ln_model *m, ln_adapter *ad, ln_err *e)
{
    if (!m->comm || m->comm->size == 1 || !ad || ad->full) return 0;
    for (int l = 0; l < ad->num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            ln_lora *lo = &ad->lora[l * LN_NTARGET + t];
            if (!lo->A.w) continue;
            ln_param *p = replicated_factor(lo, (ln_target)t);
            if (p->g && comm_allreduce_sum(m->comm, p->g, p->n, e))
                return ln_err_prefix(e, "tensor parallel: gradient of %s", p->name);
        }
    return 0;
}

typedef struct { const lnb_backend *be; double ss; } sumsq_ctx;

static void add_sumsq(ln_param *p, void *ctx)
{
    sumsq_ctx *s = ctx;
    if (p->g) s->ss += s->be->sumsq(p->g, p->n);
}

int ln_tp_grad_norm(ln_model *m, ln_adapter *ad, double *norm, ln_err *e)
{
    /* Split the squares into what each rank holds a distinct part of (summed over ranks) and what
     * every rank holds whole (counted once). */
    double sharded = 0.0, replicated = 0.0;
    const lnb_backend *be = m->be;
    for (int l = 0; l < m->cfg.num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            ln_param *W = &m->layers[l].lin[t];
            if (W->g) sharded += be->sumsq(W->g, W->n);
            if (!ad || ad->full) continue;
            ln_lora *lo = &ad->lora[l * LN_NTARGET + t];
            if (!lo->A.w) continue;
            ln_param *rep = replicated_factor(lo, (ln_target)t);
            ln_param *sh = rep == &lo->A ? &lo->B : &lo->A;
            if (rep->g) replicated += be->sumsq(rep->g, rep->n);
            if (sh->g) sharded += be->sumsq(sh->g, sh->n);
        }
    sumsq_ctx rest = {be, 0.0};
    rest.ss = 0.0;
    add_sumsq(&m->embed, &rest);
    add_sumsq(&m->norm, &rest);
    if (!m->tied) add_sumsq(&m->lm_head, &rest);
    for (int l = 0; l < m->cfg.num_layers; l++) {
        add_sumsq(&m->layers[l].attn_norm, &rest);
        add_sumsq(&m->layers[l].mlp_norm, &rest);
    }
    replicated += rest.ss;
    if (m->comm && m->comm->size > 1) {
        /* Every rank's share, gathered and added in rank order: the same bits on every rank.
         * Each double travels as a (hi, lo) pair of floats so nothing is lost to fp32. */
        int R = m->comm->size;
        float mine[2] = {(float)sharded, (float)(sharded - (double)(float)sharded)};
        float *all = ln_xmalloc((size_t)R * 2 * sizeof(float));
        if (comm_allgather(m->comm, mine, all, 2, e)) {
            free(all);
            return ln_err_prefix(e, "tensor parallel: gradient norm");
        }
        sharded = 0.0;
        for (int r = 0; r < R; r++) sharded += (double)all[2 * r] + (double)all[2 * r + 1];
        free(all);
    }
    *norm = sqrt(sharded + replicated);
    return 0;
}

/* ---------------------------------------------------------------- gather */

int64_t ln_tp_whole_numel(const ln_param *p, ln_tp_split split, int ranks)
{
    return split == LN_TP_WHOLE ? p->n : p->n * ranks;
}

void ln_tp_take_block(const ln_param *p, ln_tp_split split, int rank, int ranks, const float *whole, float *dst)
{
    size_t n = (size_t)p->n;
    if (split == LN_TP_WHOLE) memcpy(dst, whole, n * sizeof(float));
    else if (split == LN_TP_ROWS) memcpy(dst, whole + (size_t)rank * n, n * sizeof(float));
    else
        for (int i = 0; i < p->rows; i++)
            memcpy(dst + (size_t)i * p->cols, whole + ((size_t)i * ranks + rank) * p->cols, (size_t)p->cols * sizeof(float));
}

int ln_tp_gather_tensor(ln_comm *c, const lnb_backend *be, const ln_param *p, ln_tp_split split, const float *src,
                        float *dst, ln_err *e)
{
    int R = c->size;
    size_t n = (size_t)p->n;
    float *mine = ln_try_alloc(n * sizeof(float), "tensor parallel gather: this rank's block", e);
    if (!mine) goto fail;
    be->download(mine, src, n * sizeof(float));
    if (split == LN_TP_WHOLE) {
        if (dst) memcpy(dst, mine, n * sizeof(float));
        free(mine);
        return 0;
    }
    float *all = ln_try_alloc(n * R * sizeof(float), "tensor parallel gather: every rank's block", e);
    if (!all) {
        free(mine);
        goto fail;
    }
    int rc = comm_allgather(c, mine, all, (int64_t)n, e);
    if (rc == 0 && dst) {
        /* all = [rank 0's block | rank 1's | …]: row blocks follow each other; column blocks interleave per row */
        if (split == LN_TP_ROWS) {
            memcpy(dst, all, n * R * sizeof(float));
        } else {
            int rows = p->rows, cols = p->cols;
            for (int k = 0; k < R; k++)
                for (int i = 0; i < rows; i++)
                    memcpy(dst + ((size_t)i * R + k) * cols, all + (size_t)k * n + (size_t)i * cols,
                           (size_t)cols * sizeof(float));
        }
    }
    free(all);
    free(mine);
    return rc ? ln_err_prefix(e, "%s", p->name) : 0;
fail:
    comm_abort(c); /* the others are about to wait for this rank's block */
    return ln_err_prefix(e, "%s", p->name);
}

/* Gathers the shard parameter sp's weights into dst (backend memory of the whole tensor, may be NULL). */
static int gather_block(ln_comm *c, const lnb_backend *be, const ln_param *sp, ln_tp_split split, float *dst,
                        ln_err *e)
{
    int64_t whole = ln_tp_whole_numel(sp, split, c->size);
    float *h = NULL;
    if (dst && !(h = ln_try_alloc((size_t)whole * sizeof(float), "tensor parallel gather: a whole tensor", e))) {
        comm_abort(c);
        return ln_err_prefix(e, "%s", sp->name);
    }
    int rc = ln_tp_gather_tensor(c, be, sp, split, sp->w, h, e);
    if (rc == 0 && dst) be->upload(dst, h, (size_t)whole * sizeof(float));
    free(h);
    return rc;
}

ln_tp_split ln_tp_param_split(const ln_model *m, const ln_adapter *ad, const ln_param *p)
{
    for (int l = 0; l < m->cfg.num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            int col = ln_tp_column_parallel((ln_target)t);
            if (p == &m->layers[l].lin[t]) return col ? LN_TP_ROWS : LN_TP_COLS;
            if (!ad || ad->full || l >= ad->num_layers) continue;
            const ln_lora *lo = &ad->lora[l * LN_NTARGET + t];
            /* column-parallel: A whole, B by rows; row-parallel: A by columns, B whole */
            if (p == &lo->A) return col ? LN_TP_WHOLE : LN_TP_COLS;
            if (p == &lo->B) return col ? LN_TP_ROWS : LN_TP_WHOLE;
        }
    return LN_TP_WHOLE; /* embeddings, norms, lm_head */
}

int ln_tp_gather(ln_model *m, ln_adapter *ad, ln_model *full, ln_adapter *full_ad, ln_err *e)
{
    ln_comm *c = m->comm;
    if (!c) return ln_errf(e, "tensor parallel gather: the model is not a shard (no comm)");
    const lnb_backend *be = m->be;
    int rc = 0;
    if (ad && !ad->full) {
        for (int i = 0; i < ad->num_layers * LN_NTARGET && rc == 0; i++) {
            ln_lora *lo = &ad->lora[i];
            if (!lo->A.w) continue;
            ln_lora *fl = full_ad ? &full_ad->lora[i] : NULL;
            rc = gather_block(c, be, &lo->A, ln_tp_param_split(m, ad, &lo->A), fl ? fl->A.w : NULL, e);
            if (rc == 0) rc = gather_block(c, be, &lo->B, ln_tp_param_split(m, ad, &lo->B), fl ? fl->B.w : NULL, e);
        }
        return rc ? ln_err_prefix(e, "tensor parallel gather") : 0;
    }
    /* full fine-tuning: every weight */
    ln_param *rep[3] = {&m->embed, &m->norm, m->tied ? NULL : &m->lm_head};
    ln_param *frep[3] = {full ? &full->embed : NULL, full ? &full->norm : NULL, full && !m->tied ? &full->lm_head : NULL};
    for (int i = 0; i < 3 && rc == 0; i++)
        if (rep[i]) rc = gather_block(c, be, rep[i], LN_TP_WHOLE, frep[i] ? frep[i]->w : NULL, e);
    for (int l = 0; l < m->cfg.num_layers && rc == 0; l++) {
        ln_layer *L = &m->layers[l], *F = full ? &full->layers[l] : NULL;
        rc = gather_block(c, be, &L->attn_norm, LN_TP_WHOLE, F ? F->attn_norm.w : NULL, e);
        if (rc == 0) rc = gather_block(c, be, &L->mlp_norm, LN_TP_WHOLE, F ? F->mlp_norm.w : NULL, e);
        for (int t = 0; t < LN_NTARGET && rc == 0; t++)
            rc = gather_block(c, be, &L->lin[t], ln_tp_param_split(m, NULL, &L->lin[t]), F ? F->lin[t].w : NULL, e);
    }
    return rc ? ln_err_prefix(e, "tensor parallel gather") : 0;
}

/* ---------------------------------------------------------------- whole tensors written from shards */

typedef struct {
    ln_comm *c;
    const lnb_backend *be;
    const ln_tp_item *items;
    st_dtype dt;
    float *buf; /* the one whole tensor in memory */
} gather_fill;

/* The writer's fill on rank 0: item i gathered whole (and converted to dt in place). */
static const void *fill_gathered(void *ctx, size_t i, ln_err *e)
{
    gather_fill *g = ctx;
    const ln_tp_item *it = &g->items[i];
    free(g->buf);
    int64_t n = ln_tp_whole_numel(it->p, it->split, g->c->size);
    g->buf = ln_try_allocf((size_t)n + 1, sizeof(float), e, "tensor parallel save", "the whole tensor %s", it->name);
    if (!g->buf) {
        comm_abort(g->c);
        return NULL;
    }
    if (ln_tp_gather_tensor(g->c, g->be, it->p, it->split, it->src, g->buf, e)) return NULL;
    if (g->dt != ST_F32) { /* the 16-bit halves fit where the floats were */
        uint16_t *o = (uint16_t *)g->buf;
        for (int64_t k = 0; k < n; k++) o[k] = g->dt == ST_BF16 ? st_f32_to_bf16(g->buf[k]) : st_f32_to_f16(g->buf[k]);
    }
    return g->buf;
}

int ln_tp_write_gathered(ln_comm *c, const lnb_backend *be, st_writer *w, const ln_tp_item *items, int n, st_dtype dt,
                         const char *path, ln_err *e)
{
    if (c->rank != 0) { /* the same gathers, in the file's order, the blocks going to rank 0 */
        for (int i = 0; i < n; i++)
            if (ln_tp_gather_tensor(c, be, items[i].p, items[i].split, items[i].src, NULL, e)) return -1;
        return 0;
    }
    gather_fill g = {c, be, items, dt, NULL};
    for (int i = 0; i < n; i++) {
        const ln_param *p = items[i].p;
        int64_t shape[2] = {p->rows, p->cols};
        if (items[i].split == LN_TP_ROWS) shape[0] *= c->size;
        if (items[i].split == LN_TP_COLS) shape[1] *= c->size;
        st_writer_add_fill(w, items[i].name, dt, p->ndim, shape, fill_gathered, &g);
    }
    int rc = st_writer_write(w, path, e);
    free(g.buf);
    if (rc) comm_abort(c); /* a write that stopped early leaves the others waiting for gathers */
    return rc;
}

typedef struct { ln_tp_item *v; int n; const ln_model *m; } item_list;

static void push_item(ln_param *p, void *ctx)
{
    item_list *l = ctx;
    l->v[l->n++] = (ln_tp_item){p->name, p, ln_tp_param_split(l->m, NULL, p), p->w};
}

ln_tp_item *ln_tp_weight_items(ln_model *shard, int extra, int *n)
{
    item_list l = {ln_xcalloc((size_t)shard->cfg.num_layers * (LN_NTARGET + 2) + 4 + (size_t)extra, sizeof(ln_tp_item)),
                   0, shard};
    ln_model_for_each_param(shard, push_item, &l);
    *n = l.n;
    return l.v;
}

int ln_tp_save_model(ln_model *shard, const char *dir, st_dtype dt, ln_err *e)
{
    ln_comm *c = shard->comm;
    int root = c->rank == 0, rc = 0;
    if (dt != ST_F32 && dt != ST_BF16 && dt != ST_F16) rc = ln_errf(e, "model save: dtype must be F32, BF16 or F16");
    st_writer *w = NULL;
    char *mpath = NULL;
    if (root && rc == 0) { /* config.json of the whole model, as ln_model_save writes it */
        ln_model *shape = ln_tp_whole_shape(shard);
        ln_config cfg = shape->cfg;
        ln_model_free(shape);
        cfg.tie_word_embeddings = shard->tied;
        snprintf(cfg.torch_dtype, sizeof cfg.torch_dtype, "%s",
                 dt == ST_F32 ? "float32" : dt == ST_BF16 ? "bfloat16" : "float16");
        char *json = ln_config_to_json(&cfg), *cpath = ln_path_join(dir, "config.json");
        rc = ln_mkdir_p(dir, e);
        if (rc == 0) rc = ln_write_file_atomic(cpath, json, strlen(json), e);
        free(cpath);
        free(json);
        w = st_writer_new();
        st_writer_meta(w, "format", "pt");
        mpath = ln_path_join(dir, "model.safetensors");
    }
    if (rc) comm_abort(c);
    int n;
    ln_tp_item *items = ln_tp_weight_items(shard, 0, &n);
    if (rc == 0) rc = ln_tp_write_gathered(c, shard->be, w, items, n, dt, mpath, e);
    free(items);
    free(mpath);
    st_writer_free(w);
    return rc ? ln_err_prefix(e, "rank %d of %d: saving the model", c->rank, c->size) : 0;
}

/* ---------------------------------------------------------------- training on threads */

int ln_tp_agree(ln_model *m, int *flag, ln_err *e)
{
    if (!m->comm || m->comm->size == 1) return 0;
    float f = *flag ? 1.0f : 0.0f;
    if (comm_allreduce_sum(m->comm, &f, 1, e)) return ln_err_prefix(e, "tensor parallel: agreeing on a stop");
    *flag = f != 0.0f;
    return 0;
}

/* ---- do the ranks hold the same job? (FNV-1a, 64-bit, over the bytes) */

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t hash_i64(uint64_t h, int64_t v) { return fnv(h, &v, sizeof v); }

typedef struct { const lnb_backend *be; uint64_t h; float *tmp; size_t cap; int failed; ln_err *e; } hash_ctx;

/* A parameter's weights (or an A0/B0 copy), through host memory. */
static void hash_floats(hash_ctx *x, const float *w, int64_t n)
{
    if (!w || x->failed) return;
    if ((size_t)n > x->cap) {
        free(x->tmp);
        x->cap = (size_t)n;
        if (!(x->tmp = ln_try_alloc(x->cap * sizeof(float), "tensor parallel: checking the ranks agree", x->e))) {
            x->cap = 0;
            x->failed = 1;
            return;
        }
    }
    x->be->download(x->tmp, w, (size_t)n * sizeof(float));
    x->h = fnv(x->h, x->tmp, (size_t)n * sizeof(float));
}

static void hash_param(ln_param *p, void *ctx)
{
    hash_ctx *x = ctx;
    x->h = hash_i64(x->h, p->trainable);
    hash_floats(x, p->w, p->n);
}

int ln_tp_check_same(ln_comm *c, ln_model *full, ln_adapter *ad, const ln_dataset *ds, const ln_train_opts *o,
                     ln_err *e)
{
    if (c->size == 1) return 0;
    const uint64_t basis = 0xcbf29ce484222325ull;
    /* the data: every example's tokens and labels, in order */
    uint64_t hd = hash_i64(basis, ds->n);
    for (int64_t i = 0; i < ds->n; i++) {
        const ln_example *x = &ds->ex[i];
        hd = hash_i64(hd, x->len);
        hd = fnv(hd, x->input_ids, (size_t)x->len * sizeof(int32_t));
        hd = fnv(hd, x->labels, (size_t)x->len * sizeof(int32_t));
    }
    /* the options that decide what every rank does at each step (collectives must line up) */
    int64_t ov[] = {o->epochs, o->max_steps, o->batch_size, o->grad_accum, (int64_t)o->seed, o->shuffle, o->pack,
                    o->save_every, o->stop_at_step, o->out_dir != NULL, o->resume != NULL, o->eval_every,
                    o->eval != NULL};
    uint64_t ho = basis;
    for (size_t i = 0; i < sizeof ov / sizeof ov[0]; i++) ho = hash_i64(ho, ov[i]);
    ho = fnv(ho, &o->optim, sizeof o->optim);
    ho = fnv(ho, &o->warmup_ratio, sizeof o->warmup_ratio);
    /* the initialised (or restored) adapter, or every weight for full fine-tuning */
    hash_ctx hx = {full ? full->be : NULL, basis, NULL, 0, 0, e};
    if (!ad) {
        /* shards initialised collectively (ln_tp_adapter_init): nothing to compare */
    } else if (ad->full) {
        ln_model_for_each_param(full, hash_param, &hx);
    } else {
        hx.h = fnv(hx.h, ad->method, strlen(ad->method));
        hx.h = hash_i64(hash_i64(hx.h, ad->rank), ad->residual);
        ln_adapter_for_each_param(ad, hash_param, &hx);
        for (int i = 0; i < ad->num_layers * LN_NTARGET; i++) {
            hash_floats(&hx, ad->lora[i].A0, ad->lora[i].A.n);
            hash_floats(&hx, ad->lora[i].B0, ad->lora[i].B.n);
        }
    }
    free(hx.tmp);
    if (hx.failed) {
        comm_abort(c);
        return -1;
    }
    uint64_t mine[3] = {hd, ho, hx.h};
    enum { W = sizeof(mine) / (sizeof(float)) };
    float send[W], *all = ln_xmalloc((size_t)c->size * sizeof mine);
    memcpy(send, mine, sizeof mine); /* the bits travel as they are: allgather does no arithmetic */
    int rc = comm_allgather(c, send, all, W, e);
    static const char *what[3] = {"training data",
                                  "training options (steps, batch, pack, optimizer, checkpoints, eval or resume)",
                                  "initialised adapter (or weights)"};
    for (int k = 1; k < c->size && rc == 0; k++) {
        uint64_t theirs[3], first[3];
        memcpy(first, all, sizeof first);
        memcpy(theirs, all + (size_t)k * W, sizeof theirs);
        for (int i = 0; i < 3 && rc == 0; i++)
            if (theirs[i] != first[i])
                rc = ln_errf(e, "tensor parallel: rank %d's %s differ from rank 0's; every rank must validate, "
                                "calibrate and initialise the same job the same way", k, what[i]);
    }
    free(all);
    return rc ? ln_err_prefix(e, "checking the %d ranks agree", c->size) : 0;
}

/* ---- training */

int ln_tp_train_shard(ln_model *shard, ln_adapter *sad, ln_model *full, ln_adapter *full_ad, const ln_dataset *ds,
                      const ln_train_opts *opts, ln_train_result *res, ln_err *e)
{
    memset(res, 0, sizeof *res);
    ln_comm *c = shard->comm;
    int root = c->rank == 0, rc = 0;
    if (root && !sad->full && (!full || !full_ad)) {
        comm_abort(c);
        rc = ln_errf(e, "tensor-parallel training: rank 0 has no whole model (or shape) and adapter to gather into");
    }
    ln_train_opts o = *opts;
    o.tp_full = root ? full : NULL;
    o.tp_full_ad = root ? full_ad : NULL;
    if (!root) o.progress = 0; /* on_row: called on every rank that passes one */
    if (rc == 0) rc = ln_train(shard, sad, ds, &o, res, e);
    /* the trained adapter shards, back into rank 0's whole adapter (full fine-tuning: nothing is
     * gathered whole; the final model is written one gathered tensor at a time) */
    if (rc == 0 && !sad->full) rc = ln_tp_gather(shard, sad, o.tp_full, o.tp_full_ad, e);
    /* (one rank: ln_train saved it already — its shard is the whole model) */
    if (rc == 0 && c->size > 1 && opts->out_dir && !res->stopped) {
        if (sad->full) rc = ln_tp_save_model(shard, opts->out_dir, ST_F32, e);
        else if (root) rc = ln_train_save_final(full, full_ad, opts->out_dir, e);
    }
    if (rc) {
        comm_abort(c); /* no rank waits for this one any more */
        ln_err_prefix(e, "rank %d of %d", c->rank, c->size);
    }
    return rc;
}

int ln_tp_train_rank(ln_comm *c, ln_model *full, ln_adapter *full_ad, const ln_dataset *ds, const ln_train_opts *opts,
                     ln_train_result *res, ln_err *e)
{
    memset(res, 0, sizeof *res);
    int root = c->rank == 0;
    ln_model *shard = NULL;
    ln_adapter sad;
    memset(&sad, 0, sizeof sad);
    int rc = ln_tp_check_same(c, full, full_ad, ds, opts, e);
    if (rc == 0) rc = ln_tp_shard_model(full, c, &shard, e);
    if (rc == 0) rc = ln_tp_shard_adapter(full, full_ad, shard, &sad, e);
    ln_train_opts o = *opts;
    if (!root) o.on_row = NULL; /* rank 0 reports; a stop seen by any rank stops every rank (ln_tp_agree) */
    if (rc == 0) {
        rc = ln_tp_train_shard(shard, &sad, root ? full : NULL, root ? full_ad : NULL, ds, &o, res, e);
        /* full fine-tuning: the trained weights back into rank 0's whole model, as promised */
        if (rc == 0 && sad.full) rc = ln_tp_gather(shard, &sad, root ? full : NULL, root ? full_ad : NULL, e);
        if (rc) comm_abort(c);
    } else {
        comm_abort(c);
        ln_err_prefix(e, "rank %d of %d", c->rank, c->size);
    }
    if (!sad.full) ln_adapter_free(&sad);
    ln_model_free(shard);
    return rc;
}

typedef struct tp_thread_ctx {
    ln_model *full;
    ln_adapter *full_ad;
    const ln_dataset *ds;
    ln_train_opts opts;
    ln_train_result res;
} tp_thread_ctx;

static int tp_thread_rank(ln_comm *c, void *p, ln_err *e)
{
    tp_thread_ctx *x = p;
    return ln_tp_train_rank(c, x->full, x->full_ad, x->ds, &x->opts, &x->res, e);
}

int ln_tp_train(ln_model *full, ln_adapter *full_ad, const ln_dataset *ds, const ln_train_opts *opts, int ranks,
                ln_train_result *res, ln_err *e)
{
    if (ranks < 1) return ln_errf(e, "tensor-parallel training: %d ranks (at least 1 expected)", ranks);
    ln_config sh;
    if (ln_tp_shard_config(&full->cfg, ranks, &sh, e)) return -1;
    tp_thread_ctx *ctx = ln_xcalloc((size_t)ranks, sizeof *ctx);
    void **ptrs = ln_xcalloc((size_t)ranks, sizeof *ptrs);
    for (int r = 0; r < ranks; r++) {
        ctx[r] = (tp_thread_ctx){.full = full, .full_ad = full_ad, .ds = ds, .opts = *opts};
        if (r > 0) ctx[r].opts.should_stop = NULL; /* the caller's callbacks are rank 0's */
        ptrs[r] = &ctx[r];
    }
    int rc = comm_thread_run(ranks, tp_thread_rank, ptrs, e);
    if (rc == 0 && res) *res = ctx[0].res;
    free(ctx);
    free(ptrs);
    return rc;
}

/* ---------------------------------------------------------------- calibration */

void ln_tp_calibration_hook(int layer, ln_input which, const float *X, int tokens, int d_in, void *ctx)
{
    ln_tp_hook *h = ctx;
    int R = h->comm->size, rank = h->comm->rank;
    if (h->failed) return;
    if (which == LN_IN_QKV || which == LN_IN_GATEUP || R == 1) {
        /* column-parallel layers read the replicated norm output: already whole */
        if (rank == 0) h->inner(layer, which, X, tokens, d_in, h->inner_ctx);
        return;
    }
    size_t n = (size_t)tokens * d_in;
    if (n * R > h->cap) {
        free(h->mine);
        free(h->all);
        free(h->whole);
        h->cap = n * R;
        const char *what = "tensor-parallel calibration: a layer input gathered from every rank";
        h->mine = ln_try_alloc(n * sizeof(float), what, &h->err);
        h->all = h->mine ? ln_try_alloc(h->cap * sizeof(float), what, &h->err) : NULL;
        h->whole = h->all ? ln_try_alloc(h->cap * sizeof(float), what, &h->err) : NULL;
        if (!h->whole) {
            ln_tp_hook_free(h);
            h->failed = 1;
            comm_abort(h->comm); /* the others are about to wait for this rank's part */
            return;
        }
    }
    /* X is host-readable: CPU memory, or the CUDA backend's managed memory once its writer ran */
    if (ln_backend_sync(h->be, &h->err, "before layer %d's input is gathered", layer)) {
        h->failed = 1;
        comm_abort(h->comm);
        return;
    }
    memcpy(h->mine, X, n * sizeof(float));
    if (comm_allgather(h->comm, h->mine, h->all, (int64_t)n, &h->err)) {
        h->failed = 1;
        return;
    }
    if (rank != 0) return;
    /* all = [rank 0's tokens × d_in | rank 1's | …] → whole row t = [rank 0's row t | rank 1's | …] */
    int D = d_in * R;
    for (int k = 0; k < R; k++)
        for (int t = 0; t < tokens; t++)
            memcpy(h->whole + (size_t)t * D + (size_t)k * d_in, h->all + (size_t)k * n + (size_t)t * d_in,
                   (size_t)d_in * sizeof(float));
    h->inner(layer, which, h->whole, tokens, D, h->inner_ctx);
}

void ln_tp_hook_free(ln_tp_hook *h)
{
    free(h->mine);
    free(h->all);
    free(h->whole);
    h->mine = h->all = h->whole = NULL;
    h->cap = 0;
}

/* ---------------------------------------------------------------- LoRA-Null init, spread */

/* Byte-exact collectives of doubles over the float interface: a double is two floats' bits. */
static int bcast_f64(ln_comm *c, double *x, int64_t n, int root, ln_err *e)
{
    return comm_broadcast(c, (float *)x, 2 * n, root, e);
}
static int allgather_f64(ln_comm *c, const double *x, double *all, int64_t n, ln_err *e)
{
    return comm_allgather(c, (const float *)x, (float *)all, 2 * n, e);
}

/* One target: M = W0 U assembled over the ranks, its thin SVD, this rank's factor blocks and
 * residual. U is the whole d_in × r basis. */
static int factor_target(ln_model *m, ln_adapter *ad, int l, ln_target t, const double *U, int d_full, ln_err *e)
{
    ln_comm *c = m->comm;
    int R = c->size, k = c->rank, r = ad->rank;
    ln_lora *lo = &ad->lora[l * LN_NTARGET + t];
    ln_param *W = &m->layers[l].lin[t];
    int col = ln_tp_column_parallel(t);
    int rows = W->rows, cols = W->cols;             /* this rank's block of W0 */
    int d_out = col ? rows * R : rows;
    int c0 = col ? 0 : k * cols;                    /* first input column this rank holds */
    double scale = ad->scale;
    size_t part = (size_t)rows * r;
    const char *what = "tensor-parallel init: factoring W0 U";
    double *Mk = ln_try_alloc(part * sizeof(double), what, e);
    double *all = Mk ? ln_try_alloc(part * R * sizeof(double), what, e) : NULL;
    double *M = all ? ln_try_alloc((size_t)d_out * r * sizeof(double), what, e) : NULL;
    double *s = M ? ln_try_alloc((size_t)r * sizeof(double), what, e) : NULL;
    double *P = s ? ln_try_alloc((size_t)d_out * r * sizeof(double), what, e) : NULL;
    double *Qt = P ? ln_try_alloc((size_t)r * r * sizeof(double), what, e) : NULL;
    float *h = Qt ? ln_try_alloc((size_t)rows * cols * sizeof(float), what, e) : NULL;
    float *A = h ? ln_try_alloc((size_t)lo->A.n * sizeof(float), what, e) : NULL;
    float *B = A ? ln_try_alloc((size_t)lo->B.n * sizeof(float), what, e) : NULL;
    int rc = -1;
    if (!B) {
        comm_abort(c); /* the others are about to wait for this rank's part of M */
        goto out;
    }
    memset(Mk, 0, part * sizeof(double));
    memset(M, 0, (size_t)d_out * r * sizeof(double));
    m->be->download(h, W->w, (size_t)rows * cols * sizeof(float));
    /* Mk = W_k U_k: the rows of U for this rank's input columns (all of U when column-parallel) */
    for (int i = 0; i < rows; i++)
        for (int q = 0; q < cols; q++) {
            double w = h[(size_t)i * cols + q];
            const double *u = U + (size_t)(c0 + q) * r;
            for (int j = 0; j < r; j++) Mk[(size_t)i * r + j] += w * u[j];
        }
    if (allgather_f64(c, Mk, all, (int64_t)part, e)) goto out;
    if (col) {
        memcpy(M, all, part * R * sizeof(double));            /* row blocks in rank order */
    } else {
        for (int q = 0; q < R; q++)                              /* partial products, rank order */
            for (size_t i = 0; i < part; i++) M[i] += all[(size_t)q * part + i];
    }
    /* the same SVD on every rank: same input, same bits */
    lapack_int info = LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', d_out, r, M, r, s, P, r, Qt, r);
    if (info != 0) {
        ln_errf(e, "layer %d %s: SVD of W0 U (%d x %d) failed (info %d)", l, ln_target_module(t), d_out, r, (int)info);
        goto out;
    }
    {
        int a_cols = lo->A.cols, b_rows = lo->B.rows, b_r0 = col ? k * b_rows : 0;
        for (int j = 0; j < r; j++) {
            double g = sqrt(s[j] / scale);
            /* A row j = g (U Q)ᵀ restricted to this rank's input columns */
            for (int q = 0; q < a_cols; q++) {
                const double *u = U + (size_t)(c0 + q) * r;
                double v = 0;
                for (int i = 0; i < r; i++) v += u[i] * Qt[(size_t)j * r + i];
                A[(size_t)j * a_cols + q] = (float)(g * v);
            }
            for (int i = 0; i < b_rows; i++) B[(size_t)i * r + j] = (float)(P[(size_t)(b_r0 + i) * r + j] * g);
        }
        ln_residual_subtract(h, rows, cols, B, A, r, scale);
        m->be->upload(W->w, h, (size_t)rows * cols * sizeof(float));
        m->be->upload(lo->A.w, A, (size_t)lo->A.n * sizeof(float));
        m->be->upload(lo->B.w, B, (size_t)lo->B.n * sizeof(float));
        lo->A0 = m->be->alloc((size_t)lo->A.n * sizeof(float));
        lo->B0 = m->be->alloc((size_t)lo->B.n * sizeof(float));
        if (lo->A0 && lo->B0) {
            m->be->upload(lo->A0, A, (size_t)lo->A.n * sizeof(float));
            m->be->upload(lo->B0, B, (size_t)lo->B.n * sizeof(float));
            rc = 0;
        } else {
            ln_errf(e, "out of memory copying the initial factors of %s", lo->A.name);
        }
    }
out:
    (void)d_full;
    free(Mk); free(all); free(M); free(s); free(P); free(Qt); free(h); free(A); free(B);
    return rc;
}

/* spread: the solve of layer l's input i on rank (4l + i) mod R (every rank can read the
 * covariances); else every solve on rank 0 (only rank 0 holds them). */
static int init_lora_null(ln_model *m, ln_adapter *ad, ln_covariance_fn cov, void *ctx, int spread, int *eigensolves,
                          ln_err *e)
{
    ln_comm *c = m->comm;
    if (!c) return ln_errf(e, "tensor-parallel init: the model is not a shard (no comm)");
    ln_method me;
    if (ln_method_parse(ad->method, &me, e)) return -1;
    if (me != LN_METHOD_LORA_NULL_V1 && me != LN_METHOD_LORA_NULL_V2)
        return ln_errf(e, "tensor-parallel init: method %s is not lora_null_v1 or lora_null_v2", ad->method);
    int R = c->size, r = ad->rank, solved = 0;
    const ln_config *cf = &m->cfg;
    /* whole input widths: q,k,v and gate,up read C; o reads nh·hd; down reads I (times R: sharded) */
    int d_full[LN_NINPUT] = {cf->hidden_size, cf->num_heads * cf->head_dim * R, cf->hidden_size,
                             cf->intermediate_size * R};
    for (int l = 0; l < ad->num_layers; l++)
        for (int in = 0; in < LN_NINPUT; in++) {
            int used = 0;
            for (int t = 0; t < LN_NTARGET; t++)
                used |= ad->lora[l * LN_NTARGET + t].A.w && ln_target_input((ln_target)t) == (ln_input)in;
            if (!used) continue;
            int d = d_full[in], owner = spread ? (4 * l + in) % R : 0;
            if (r > d) return ln_errf(e, "tensor-parallel init: rank %d exceeds d_in %d", r, d);
            double *U = ln_try_alloc((size_t)d * r * sizeof(double), "tensor-parallel init: a null-space basis", e);
            if (!U) {
                comm_abort(c); /* the others may wait for this rank's basis or its part of M */
                return ln_err_prefix(e, "tensor-parallel init, layer %d (rank %d of %d)", l, c->rank, R);
            }
            int rc = 0;
            if (c->rank == owner) {
                const double *C = cov(ctx, l, (ln_input)in);
                if (!C) rc = ln_errf(e, "tensor-parallel init: no covariance for layer %d input %d", l, in);
                else rc = ln_nullspace_basis(C, d, r, U, NULL, e);
                solved += rc == 0;
                if (rc) comm_abort(c); /* the others are about to wait for this basis */
            }
            if (rc == 0) rc = bcast_f64(c, U, (int64_t)d * r, owner, e);
            for (int t = 0; t < LN_NTARGET && rc == 0; t++) {
                if (!ad->lora[l * LN_NTARGET + t].A.w || ln_target_input((ln_target)t) != (ln_input)in) continue;
                rc = factor_target(m, ad, l, (ln_target)t, U, d, e);
            }
            free(U);
            if (rc) return ln_err_prefix(e, "tensor-parallel init, layer %d (rank %d of %d)", l, c->rank, R);
        }
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++) {
        ln_lora *lo = &ad->lora[i];
        if (lo->A.w && me == LN_METHOD_LORA_NULL_V2 && ln_param_set_trainable(m->be, &lo->A, 0, e)) return -1;
    }
    ad->residual = 1;
    if (eigensolves) *eigensolves = solved;
    return 0;
}

int ln_tp_init_lora_null(ln_model *m, ln_adapter *ad, ln_covariance_fn cov, void *ctx, int *eigensolves, ln_err *e)
{
    return init_lora_null(m, ad, cov, ctx, 1, eigensolves, e);
}

/* ---------------------------------------------------------------- a rank that holds only its shard */

ln_model *ln_tp_whole_shape(const ln_model *shard)
{
    int R = shard->comm ? shard->comm->size : 1;
    ln_model *m = ln_xcalloc(1, sizeof *m);
    m->be = shard->be;
    m->cfg = shard->cfg;
    m->cfg.num_heads *= R;
    m->cfg.num_kv_heads *= R;
    m->cfg.intermediate_size *= R;
    m->tied = shard->tied;
    m->layers = ln_xcalloc((size_t)m->cfg.num_layers, sizeof(ln_layer));
    for (int l = 0; l < m->cfg.num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            ln_param *p = &m->layers[l].lin[t];
            ln_model_target_dims(&m->cfg, (ln_target)t, &p->rows, &p->cols);
            p->n = (int64_t)p->rows * p->cols;
            p->ndim = 2;
            snprintf(p->name, sizeof p->name, "model.layers.%d.%s.weight", l, ln_target_module((ln_target)t));
        }
    return m;
}

/* The whole adapter ad (on `shape`) cut into this rank's sad; ad kept on rank 0 (into whole_ad)
 * and freed on the others. */
static int keep_or_shard(ln_model *shard, ln_model *shape, ln_adapter *ad, ln_adapter *sad, ln_adapter *whole_ad,
                         ln_err *e)
{
    int rc = ln_tp_shard_adapter(shape, ad, shard, sad, e);
    if (rc == 0 && whole_ad) *whole_ad = *ad;
    else ln_adapter_free(ad);
    return rc;
}

/* After a failure: neither adapter is kept. */
static void drop_adapters(ln_adapter *sad, ln_adapter *whole_ad)
{
    ln_adapter_free(sad);
    memset(sad, 0, sizeof *sad);
    if (whole_ad) {
        ln_adapter_free(whole_ad);
        memset(whole_ad, 0, sizeof *whole_ad);
    }
}

/* pissa, milora, corda: an SVD of each whole weight. One weight at a time, rank 0 gathers W0,
 * runs ln_init_layer on it (the very call ln_adapter_init makes: the same bits), and broadcasts
 * A, B and W0 − scale·B A whole; each rank keeps its blocks. Transient memory on every rank: one
 * whole weight and its factors. */
static int init_gathered(ln_model *shard, ln_model *shape, const ln_adapter_opts *o, ln_method me, ln_adapter *sad,
                         ln_adapter *w, ln_err *e)
{
    ln_comm *c = shard->comm;
    int root = c->rank == 0, R = c->size;
    int rank = o->rank > 0 ? o->rank : 8; /* ln_adapter_init's defaults for a residual method */
    float alpha = o->alpha > 0 ? o->alpha : (float)rank;
    unsigned targets = o->targets ? o->targets : LN_TARGETS_ALL;
    const lnb_backend *be = shard->be;
    int calib = ln_method_needs_calibration(me), rc = 0;
    if (calib && !o->covariance)
        return ln_errf(e, "adapter method \"%s\" needs calibration covariances and none were given", o->method);
    rc = ln_adapter_alloc(shard, sad, o->method, rank, alpha, targets, e);
    if (rc == 0 && root) rc = ln_adapter_alloc(shape, w, o->method, rank, alpha, targets, e);
    if (rc) {
        comm_abort(c);
        return -1;
    }
    for (int l = 0; l < sad->num_layers && rc == 0; l++)
        for (int t = 0; t < LN_NTARGET && rc == 0; t++) {
            ln_lora *lo = &sad->lora[l * LN_NTARGET + t];
            if (!lo->A.w) continue;
            ln_param *Ws = &shard->layers[l].lin[t];
            ln_tp_split sw = ln_tp_param_split(shard, NULL, Ws), sa = ln_tp_param_split(shard, sad, &lo->A),
                        sb = ln_tp_param_split(shard, sad, &lo->B);
            int64_t nw = ln_tp_whole_numel(Ws, sw, R), na = ln_tp_whole_numel(&lo->A, sa, R),
                    nb = ln_tp_whole_numel(&lo->B, sb, R);
            float *W = ln_try_allocf((size_t)(nw + na + nb), sizeof(float), e, "tensor-parallel init",
                                     "the whole weight %s and its factors", Ws->name);
            float *blk = W ? ln_try_allocf((size_t)Ws->n, sizeof(float), e, "tensor-parallel init",
                                           "a block of %s", Ws->name)
                           : NULL;
            if (!blk) {
                free(W);
                comm_abort(c); /* the others are about to gather */
                return ln_err_prefix(e, "layer %d %s", l, ln_target_module((ln_target)t));
            }
            float *A = W + nw, *B = A + na;
            rc = ln_tp_gather_tensor(c, be, Ws, sw, Ws->w, root ? W : NULL, e);
            float failed = 0.0f;
            if (rc == 0 && root) {
                const ln_param *Wf = &shape->layers[l].lin[t];
                ln_layer_init li = {.d_out = Wf->rows, .d_in = Wf->cols, .r = rank, .scale = sad->scale,
                                    .seed = o->seed + (uint64_t)(l * LN_NTARGET + t)};
                if (calib && !(li.C = o->covariance(o->method_ctx, l, ln_target_input((ln_target)t))))
                    ln_errf(e, "adapter method \"%s\": no covariance for layer %d input of %s", o->method, l,
                            ln_target_module((ln_target)t));
                if ((calib && !li.C) || ln_init_layer(me, &li, W, A, B, e) != 0) failed = 1.0f;
            }
            /* rank 0's outcome first, then what it made */
            ln_err be2 = {{0}};
            if (rc == 0 && comm_broadcast(c, &failed, 1, 0, &be2) != 0) {
                *e = be2;
                rc = -1;
            }
            if (rc == 0 && failed != 0.0f) rc = root ? -1 : ln_errf(e, "rank 0's init of this weight failed");
            if (rc == 0) rc = comm_broadcast(c, W, nw + na + nb, 0, e);
            if (rc == 0) {
                ln_tp_take_block(Ws, sw, c->rank, R, W, blk);
                be->upload(Ws->w, blk, (size_t)Ws->n * sizeof(float));
                ln_tp_take_block(&lo->A, sa, c->rank, R, A, blk);
                be->upload(lo->A.w, blk, (size_t)lo->A.n * sizeof(float));
                ln_tp_take_block(&lo->B, sb, c->rank, R, B, blk);
                be->upload(lo->B.w, blk, (size_t)lo->B.n * sizeof(float));
                rc = ln_lora_keep_initial(be, lo, e);
            }
            if (rc == 0 && !ln_method_trains_a(me)) rc = ln_param_set_trainable(be, &lo->A, 0, e);
            if (rc == 0 && root) {
                ln_lora *wl = &w->lora[l * LN_NTARGET + t];
                be->upload(wl->A.w, A, (size_t)wl->A.n * sizeof(float));
                be->upload(wl->B.w, B, (size_t)wl->B.n * sizeof(float));
                rc = ln_lora_keep_initial(be, wl, e);
                if (rc == 0 && !ln_method_trains_a(me)) rc = ln_param_set_trainable(be, &wl->A, 0, e);
            }
            free(W);
            free(blk);
            if (rc) {
                comm_abort(c);
                ln_err_prefix(e, "layer %d %s", l, ln_target_module((ln_target)t));
            }
        }
    sad->residual = 1;
    if (root) w->residual = 1;
    return rc;
}

int ln_tp_adapter_init(ln_model *shard, ln_model *shape, const ln_adapter_opts *o, int cov_everywhere,
                       ln_adapter *sad, ln_adapter *whole_ad, int *eigensolves, ln_err *e)
{
    ln_comm *c = shard->comm;
    memset(sad, 0, sizeof *sad);
    if (whole_ad) memset(whole_ad, 0, sizeof *whole_ad);
    if (eigensolves) *eigensolves = 0;
    const char *method = o->method ? o->method : "lora";
    ln_method me;
    if (ln_method_parse(method, &me, e)) return -1;
    int rc;
    if (me == LN_METHOD_LORA || me == LN_METHOD_LORA_FA) {
        /* seeded from the options alone: every rank draws the same whole factors and keeps its block */
        ln_adapter ad;
        rc = ln_adapter_init(shape, &ad, o, e);
        if (rc == 0) rc = keep_or_shard(shard, shape, &ad, sad, c->rank == 0 ? whole_ad : NULL, e);
    } else if (me == LN_METHOD_LORA_NULL_V1 || me == LN_METHOD_LORA_NULL_V2) {
        if (!o->covariance)
            return ln_errf(e, "adapter method \"%s\" needs calibration covariances and none were given", method);
        int rank = o->rank > 0 ? o->rank : 8; /* ln_adapter_init's defaults for a residual method */
        float alpha = o->alpha > 0 ? o->alpha : (float)rank;
        unsigned targets = o->targets ? o->targets : LN_TARGETS_ALL;
        rc = ln_adapter_alloc(shard, sad, method, rank, alpha, targets, e);
        if (rc == 0) rc = init_lora_null(shard, sad, o->covariance, o->method_ctx, cov_everywhere, eigensolves, e);
        ln_adapter *w = c->rank == 0 ? whole_ad : NULL;
        if (rc == 0 && w) rc = ln_adapter_alloc(shape, w, method, rank, alpha, targets, e);
        if (rc) comm_abort(c); /* the others are about to gather */
        if (rc == 0) rc = ln_tp_gather(shard, sad, NULL, w, e);
        /* as ln_adapter_init leaves it: A frozen where the method does not train it, A0/B0 kept */
        for (int i = 0; rc == 0 && w && i < w->num_layers * LN_NTARGET; i++) {
            ln_lora *lo = &w->lora[i];
            if (!lo->A.w) continue;
            if (!ln_method_trains_a(me)) rc = ln_param_set_trainable(shape->be, &lo->A, 0, e);
            if (rc == 0) rc = ln_lora_keep_initial(shape->be, lo, e);
        }
        if (rc == 0 && w) w->residual = 1;
    } else if (me == LN_METHOD_PISSA || me == LN_METHOD_MILORA || me == LN_METHOD_CORDA) {
        ln_adapter_opts oo = *o;
        oo.method = method;
        rc = init_gathered(shard, shape, &oo, me, sad, c->rank == 0 ? whole_ad : NULL, e);
    } else if (me == LN_METHOD_FULL) { /* every weight of the shard trains; rank 0's whole "adapter" is the flag */
        rc = ln_adapter_init(shard, sad, o, e);
        if (rc == 0 && c->rank == 0 && whole_ad) *whole_ad = *sad;
    } else {
        return ln_errf(e, "adapter method \"%s\" does not initialise on shards", method);
    }
    if (rc) drop_adapters(sad, whole_ad);
    return rc;
}

int ln_tp_load_checkpoint(ln_model *shard, ln_model *shape, const char *path, ln_adapter *sad, ln_adapter *whole_ad,
                          ln_err *e)
{
    memset(sad, 0, sizeof *sad);
    if (whole_ad) memset(whole_ad, 0, sizeof *whole_ad);
    int full = 0;
    if (ln_train_checkpoint_is_full(path, &full, e)) return -1;
    if (full) { /* every weight: this rank's blocks, read from the file (ln_train_load_checkpoint on a shard) */
        int rc = ln_train_load_checkpoint(shard, path, sad, e);
        if (rc == 0 && shard->comm->rank == 0 && whole_ad) *whole_ad = *sad;
        return rc;
    }
    /* ln_train_load_checkpoint re-applies a residual adapter to the model it is given: here the
     * weight-less shape, every one of whose weights points at one scratch of the largest weight's
     * size (written, never read) — the shard gets its residual from its own blocks below. */
    int64_t most = 0;
    for (int l = 0; l < shape->cfg.num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++)
            if (shape->layers[l].lin[t].n > most) most = shape->layers[l].lin[t].n;
    float *scratch = ln_try_alloc((size_t)most * sizeof(float), "tensor parallel resume: one weight's scratch", e);
    if (!scratch) return ln_err_prefix(e, "checkpoint %s", path);
    memset(scratch, 0, (size_t)most * sizeof(float));
    for (int l = 0; l < shape->cfg.num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) shape->layers[l].lin[t].w = scratch;
    ln_adapter ad;
    memset(&ad, 0, sizeof ad);
    int rc = ln_train_load_checkpoint(shape, path, &ad, e);
    for (int l = 0; l < shape->cfg.num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) shape->layers[l].lin[t].w = NULL;
    free(scratch);
    if (rc) return -1;
    rc = keep_or_shard(shard, shape, &ad, sad, shard->comm->rank == 0 ? whole_ad : NULL, e);
    if (rc == 0 && sad->residual) rc = ln_adapter_apply_residual(shard, sad, e);
    if (rc) drop_adapters(sad, whole_ad);
    return rc;
}

/* ---------------------------------------------------------------- knowledge drift on shards */

struct ln_tp_drift {
    int layers;
    ln_drift_tracker **per; /* rank 0: one tracker per layer (NULL where nothing is tracked) */
    /* full fine-tuning (per NULL): every rank's own block of each original W0 (host, L·LN_NTARGET),
     * rank 0's denominators tr(W0 C W0ᵀ) and covariances */
    float **w0;
    double *den;
    const double **C;
};

/* ---- full fine-tuning: ΔW = W − W0 of every weight, each rank keeping only its W0 blocks */

static int full_drift_new(ln_model *shard, ln_covariance_fn cov, void *cov_ctx, ln_tp_drift *d, ln_err *e)
{
    ln_comm *c = shard->comm;
    int root = c->rank == 0, L = shard->cfg.num_layers, rc = 0;
    d->w0 = ln_xcalloc((size_t)L * LN_NTARGET, sizeof *d->w0);
    d->den = ln_xcalloc((size_t)L * LN_NTARGET, sizeof *d->den);
    d->C = ln_xcalloc((size_t)L * LN_NTARGET, sizeof *d->C);
    for (int i = 0; i < L * LN_NTARGET && rc == 0; i++) {
        int l = i / LN_NTARGET;
        ln_target t = (ln_target)(i % LN_NTARGET);
        ln_param *W = &shard->layers[l].lin[t];
        ln_tp_split sp = ln_tp_param_split(shard, NULL, W);
        float *whole = NULL;
        if (!(d->w0[i] = ln_try_allocf((size_t)W->n, sizeof(float), e, "knowledge drift",
                                       "this rank's block of the original weight %s", W->name)))
            rc = -1;
        if (rc == 0 && root && !(d->C[i] = cov(cov_ctx, l, ln_target_input(t))))
            rc = ln_errf(e, "knowledge drift: no covariance for layer %d %s (calibrate with its input)", l,
                         ln_target_module(t));
        if (rc == 0 && root && !(whole = ln_try_allocf((size_t)ln_tp_whole_numel(W, sp, c->size), sizeof(float), e,
                                                       "knowledge drift", "the whole original weight %s", W->name)))
            rc = -1;
        if (rc) {
            comm_abort(c); /* the others are about to gather */
            break;
        }
        shard->be->download(d->w0[i], W->w, (size_t)W->n * sizeof(float));
        rc = ln_tp_gather_tensor(c, shard->be, W, sp, W->w, whole, e);
        int rows = W->rows * (sp == LN_TP_ROWS ? c->size : 1), cols = W->cols * (sp == LN_TP_COLS ? c->size : 1);
        if (rc == 0 && root && ln_drift_quad_dense(whole, rows, cols, d->C[i], &d->den[i], e)) {
            comm_abort(c);
            rc = ln_err_prefix(e, "knowledge drift, layer %d %s", l, ln_target_module(t));
        }
        free(whole);
    }
    return rc;
}

int ln_tp_drift_measure_full(ln_tp_drift *d, ln_model *shard, json_t *row, ln_err *e)
{
    ln_comm *c = shard->comm;
    int root = c->rank == 0, rc = 0;
    if (!d->w0) {
        comm_abort(c);
        return ln_errf(e, "tensor-parallel drift: the tracker is not a full fine-tune's");
    }
    json_t *per = root ? json_object() : NULL;
    double sum = 0, mx = 0;
    int n = 0;
    for (int i = 0; i < d->layers * LN_NTARGET && rc == 0; i++) {
        int l = i / LN_NTARGET;
        ln_target t = (ln_target)(i % LN_NTARGET);
        ln_param *W = &shard->layers[l].lin[t];
        ln_tp_split sp = ln_tp_param_split(shard, NULL, W);
        int rows = W->rows * (sp == LN_TP_ROWS ? c->size : 1), cols = W->cols * (sp == LN_TP_COLS ? c->size : 1);
        /* this rank's block of ΔW (host), gathered whole onto rank 0: one weight at a time */
        float *dw = ln_try_allocf((size_t)W->n, sizeof(float), e, "knowledge drift", "this rank's block of ΔW of %s",
                                  W->name);
        float *whole = dw && root ? ln_try_allocf((size_t)rows * cols, sizeof(float), e, "knowledge drift",
                                                  "the whole ΔW of %s", W->name)
                                  : NULL;
        if (!dw || (root && !whole)) {
            comm_abort(c);
            rc = -1;
        }
        if (rc == 0) {
            shard->be->download(dw, W->w, (size_t)W->n * sizeof(float));
            for (int64_t k = 0; k < W->n; k++) dw[k] -= d->w0[i][k];
            rc = ln_tp_gather_tensor(c, lnb_cpu(), W, sp, dw, whole, e);
        }
        double num = 0;
        if (rc == 0 && root && ln_drift_quad_dense(whole, rows, cols, d->C[i], &num, e)) {
            comm_abort(c);
            rc = ln_err_prefix(e, "knowledge drift, layer %d %s", l, ln_target_module(t));
        }
        if (rc == 0 && root) {
            double v = ln_drift_ratio(num, d->den[i]);
            char name[160];
            snprintf(name, sizeof name, "model.layers.%d.%s", l, ln_target_module(t));
            json_object_set_new(per, name, json_real(v));
            sum += v;
            mx = v > mx ? v : mx;
            n++;
        }
        free(dw);
        free(whole);
    }
    if (rc || !root) {
        json_decref(per);
        return rc;
    }
    json_object_set_new(row, "knowledge_drift", per);
    json_object_set_new(row, "knowledge_drift_mean", json_real(n ? sum / n : 0.0));
    json_object_set_new(row, "knowledge_drift_max", json_real(mx));
    return 0;
}

/* Layer `l` alone, as a one-layer model and adapter, so that a tracker of it holds that layer's
 * denominators while only that layer's whole W0 is in memory. */
typedef struct { ln_covariance_fn cov; void *ctx; int layer; } layer_cov;

static const double *cov_of_layer(void *ctx, int layer, ln_input which)
{
    layer_cov *x = ctx;
    return x->cov(x->ctx, x->layer + layer, which);
}

static void layer_view(ln_model *shape, const ln_adapter *ad, int l, ln_model *vm, ln_adapter *va)
{
    *vm = *shape;
    vm->cfg.num_layers = 1;
    vm->layers = &shape->layers[l];
    *va = *ad;
    va->num_layers = 1;
    va->lora = &ad->lora[l * LN_NTARGET];
}

int ln_tp_drift_new(ln_model *shard, const ln_adapter *sad, ln_model *shape, const ln_adapter *whole_ad,
                    ln_covariance_fn cov, void *cov_ctx, ln_tp_drift **out, ln_err *e)
{
    ln_comm *c = shard->comm;
    int root = c->rank == 0, L = shard->cfg.num_layers, rc = 0;
    *out = NULL;
    if (root && !whole_ad && !sad->full) {
        comm_abort(c);
        return ln_errf(e, "tensor-parallel drift: rank 0 has no whole adapter");
    }
    ln_tp_drift *d = ln_xcalloc(1, sizeof *d);
    d->layers = L;
    if (sad->full) {
        if (full_drift_new(shard, cov, cov_ctx, d, e)) {
            ln_tp_drift_free(d);
            return -1;
        }
        *out = d;
        return 0;
    }
    d->per = ln_xcalloc((size_t)L, sizeof *d->per);
    float *w[LN_NTARGET] = {0};
    for (int l = 0; l < L && rc == 0; l++) {
        /* this layer's W0 (for a residual adapter W0'), whole on rank 0, one target at a time */
        int any = 0;
        for (int t = 0; t < LN_NTARGET && rc == 0; t++) {
            ln_param *W = &shard->layers[l].lin[t];
            if (!sad->lora[l * LN_NTARGET + t].A.w) continue;
            any = 1;
            ln_tp_split sp = ln_tp_param_split(shard, NULL, W);
            if (root && !(w[t] = ln_try_allocf((size_t)ln_tp_whole_numel(W, sp, c->size), sizeof(float), e,
                                               "knowledge drift", "the whole original weight %s", W->name))) {
                comm_abort(c);
                rc = -1;
                break;
            }
            rc = ln_tp_gather_tensor(c, shard->be, W, sp, W->w, w[t], e);
        }
        if (rc == 0 && root && any) {
            ln_model vm;
            ln_adapter va;
            ln_layer lay = shape->layers[l];
            for (int t = 0; t < LN_NTARGET; t++) lay.lin[t].w = w[t];
            layer_view(shape, whole_ad, l, &vm, &va);
            vm.layers = &lay;
            layer_cov lc = {cov, cov_ctx, l};
            rc = ln_drift_tracker_new(&vm, &va, cov_of_layer, &lc, &d->per[l], e);
            if (rc) {
                comm_abort(c); /* the others are about to gather the next layer */
                ln_err_prefix(e, "layer %d", l);
            }
        }
        for (int t = 0; t < LN_NTARGET; t++) {
            free(w[t]);
            w[t] = NULL;
        }
    }
    if (rc) {
        ln_tp_drift_free(d);
        return -1;
    }
    *out = d;
    return 0;
}

int ln_tp_drift_measure(ln_tp_drift *d, ln_model *shape, const ln_adapter *whole_ad, json_t *row, ln_err *e)
{
    if (!d->per) return ln_errf(e, "tensor-parallel drift: a full fine-tune's drift is measured on every rank "
                                   "(ln_tp_drift_measure_full)");
    json_t *per = json_object();
    double sum = 0, mx = 0;
    int64_t n = 0;
    for (int l = 0; l < d->layers; l++) {
        if (!d->per[l]) continue;
        ln_model vm;
        ln_adapter va;
        layer_view(shape, whole_ad, l, &vm, &va);
        json_t *one = json_object();
        if (ln_drift_tracker_measure(d->per[l], &vm, &va, one, e)) {
            json_decref(one);
            json_decref(per);
            return ln_err_prefix(e, "layer %d", l);
        }
        /* the view's "model.layers.0.<module>" is layer l's */
        const char *k;
        json_t *v;
        json_object_foreach(json_object_get(one, "knowledge_drift"), k, v) {
            const char *module = strchr(k + strlen("model.layers."), '.');
            char name[160];
            snprintf(name, sizeof name, "model.layers.%d%s", l, module ? module : "");
            double x = json_number_value(v);
            json_object_set_new(per, name, json_real(x));
            sum += x;
            if (x > mx) mx = x;
            n++;
        }
        json_decref(one);
    }
    json_object_set_new(row, "knowledge_drift", per);
    json_object_set_new(row, "knowledge_drift_mean", json_real(n ? sum / (double)n : 0.0));
    json_object_set_new(row, "knowledge_drift_max", json_real(mx));
    return 0;
}

void ln_tp_drift_free(ln_tp_drift *d)
{
    if (!d) return;
    for (int l = 0; d->per && l < d->layers; l++) ln_drift_tracker_free(d->per[l]);
    for (int i = 0; d->w0 && i < d->layers * LN_NTARGET; i++) free(d->w0[i]);
    free(d->per);
    free(d->w0);
    free(d->den);
    free(d->C);
    free(d);
}
