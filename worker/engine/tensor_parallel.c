/* tensor_parallel.c — sharding a model and its adapter over ranks, and the per-step gradient
 * reductions (see tensor_parallel.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
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
static void copy_block(const lnb_backend *be, float *dst, const float *src, int src_rows, int src_cols, int r0,
                       int rows, int c0, int cols)
{
    float *h = ln_xmalloc((size_t)src_rows * src_cols * sizeof(float));
    float *o = ln_xmalloc((size_t)rows * cols * sizeof(float));
    be->download(h, src, (size_t)src_rows * src_cols * sizeof(float));
    for (int i = 0; i < rows; i++)
        memcpy(o + (size_t)i * cols, h + (size_t)(r0 + i) * src_cols + c0, (size_t)cols * sizeof(float));
    be->upload(dst, o, (size_t)rows * cols * sizeof(float));
    free(h);
    free(o);
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
            copy_block(be, S->lin[t].w, F->lin[t].w, F->lin[t].rows, F->lin[t].cols, r0, S->lin[t].rows, c0,
                       S->lin[t].cols);
        }
    }
    m->comm = c;
    *out = m;
    return 0;
}

/* Copies one factor's block: the block of full factor src (rows × cols) that matches dst's shape
 * at (r0, c0). */
static void factor_block(const lnb_backend *be, float *dst, const ln_param *dp, const float *src, const ln_param *sp,
                         int r0, int c0)
{
    copy_block(be, dst, src, sp->rows, sp->cols, r0, dp->rows, c0, dp->cols);
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
            factor_block(be, S->A.w, &S->A, F->A.w, &F->A, 0, a_c0);
            factor_block(be, S->B.w, &S->B, F->B.w, &F->B, b_r0, 0);
            if (ln_param_set_trainable(be, &S->A, F->A.trainable, e)) return -1;
            if (ln_param_set_trainable(be, &S->B, F->B.trainable, e)) return -1;
            if (F->A0) {
                S->A0 = be->alloc((size_t)S->A.n * sizeof(float));
                S->B0 = be->alloc((size_t)S->B.n * sizeof(float));
                if (!S->A0 || !S->B0) return ln_errf(e, "tensor parallel: out of memory copying the initial factors of %s", S->A.name);
                copy_block(be, S->A0, F->A0, F->A.rows, F->A.cols, 0, S->A.rows, a_c0, S->A.cols);
                copy_block(be, S->B0, F->B0, F->B.rows, F->B.cols, b_r0, S->B.rows, 0, S->B.cols);
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

/* Gathers one sharded tensor (the rank's block is rows × cols of a full_rows × full_cols tensor,
 * split by rows when by_rows, else by columns) into dst (full layout, may be NULL). A tensor
 * every rank holds whole is copied from the rank's own buffer. */
static int gather_block(ln_comm *c, const lnb_backend *be, const ln_param *sp, int by_rows, int replicated,
                        float *dst, ln_err *e)
{
    int R = c->size;
    size_t n = (size_t)sp->n;
    float *mine = ln_xmalloc(n * sizeof(float));
    be->download(mine, sp->w, n * sizeof(float));
    if (replicated) {
        if (dst) be->upload(dst, mine, n * sizeof(float));
        free(mine);
        return 0;
    }
    float *all = ln_xmalloc(n * R * sizeof(float));
    int rc = comm_allgather(c, mine, all, (int64_t)n, e);
    if (rc == 0 && dst) {
        int rows = sp->rows, cols = sp->cols;
        float *full = ln_xmalloc(n * R * sizeof(float));
        for (int k = 0; k < R; k++) {
            const float *blk = all + (size_t)k * n;
            if (by_rows) {
                memcpy(full + (size_t)k * n, blk, n * sizeof(float));
            } else {
                for (int i = 0; i < rows; i++)
                    memcpy(full + (size_t)i * cols * R + (size_t)k * cols, blk + (size_t)i * cols, (size_t)cols * sizeof(float));
            }
        }
        be->upload(dst, full, n * R * sizeof(float));
        free(full);
    }
    free(all);
    free(mine);
    return rc;
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
            int col = ln_tp_column_parallel((ln_target)(i % LN_NTARGET));
            ln_lora *fl = full_ad ? &full_ad->lora[i] : NULL;
            /* column-parallel: A whole, B by rows; row-parallel: A by columns, B whole */
            rc = gather_block(c, be, &lo->A, 0, col, fl ? fl->A.w : NULL, e);
            if (rc == 0) rc = gather_block(c, be, &lo->B, 1, !col, fl ? fl->B.w : NULL, e);
        }
        return rc ? ln_err_prefix(e, "tensor parallel gather") : 0;
    }
    /* full fine-tuning: every weight */
    ln_param *rep[3] = {&m->embed, &m->norm, m->tied ? NULL : &m->lm_head};
    ln_param *frep[3] = {full ? &full->embed : NULL, full ? &full->norm : NULL, full && !m->tied ? &full->lm_head : NULL};
    for (int i = 0; i < 3 && rc == 0; i++)
        if (rep[i]) rc = gather_block(c, be, rep[i], 1, 1, frep[i] ? frep[i]->w : NULL, e);
    for (int l = 0; l < m->cfg.num_layers && rc == 0; l++) {
        ln_layer *L = &m->layers[l], *F = full ? &full->layers[l] : NULL;
        rc = gather_block(c, be, &L->attn_norm, 1, 1, F ? F->attn_norm.w : NULL, e);
        if (rc == 0) rc = gather_block(c, be, &L->mlp_norm, 1, 1, F ? F->mlp_norm.w : NULL, e);
        for (int t = 0; t < LN_NTARGET && rc == 0; t++)
            rc = gather_block(c, be, &L->lin[t], ln_tp_column_parallel((ln_target)t), 0, F ? F->lin[t].w : NULL, e);
    }
    return rc ? ln_err_prefix(e, "tensor parallel gather") : 0;
}

/* ---------------------------------------------------------------- training on threads */

typedef struct tp_train_ctx {
    ln_model *full;
    ln_adapter *full_ad;
    const ln_dataset *ds;
    ln_train_opts opts;
    ln_train_result res;
} tp_train_ctx;

static int tp_train_rank(ln_comm *c, void *p, ln_err *e)
{
    tp_train_ctx *x = p;
    ln_model *shard = NULL;
    ln_adapter sad;
    memset(&sad, 0, sizeof sad);
    int rc = ln_tp_shard_model(x->full, c, &shard, e);
    if (rc == 0) rc = ln_tp_shard_adapter(x->full, x->full_ad, shard, &sad, e);
    ln_train_opts o = x->opts;
    if (c->rank != 0) o.on_row = NULL, o.progress = 0;
    if (rc == 0) rc = ln_train(shard, &sad, x->ds, &o, &x->res, e);
    if (rc == 0) rc = ln_tp_gather(shard, &sad, c->rank == 0 ? x->full : NULL, c->rank == 0 ? x->full_ad : NULL, e);
    if (!sad.full) ln_adapter_free(&sad);
    ln_model_free(shard);
    if (rc) ln_err_prefix(e, "rank %d of %d", c->rank, c->size);
    return rc;
}

int ln_tp_train(ln_model *full, ln_adapter *full_ad, const ln_dataset *ds, const ln_train_opts *opts, int ranks,
                ln_train_result *res, ln_err *e)
{
    if (opts->out_dir || opts->resume || opts->eval || opts->should_stop)
        return ln_errf(e, "tensor-parallel training on threads: out_dir, resume, eval and should_stop are not "
                          "supported yet (save the gathered adapter after it returns)");
    if (ranks < 1) return ln_errf(e, "tensor-parallel training: %d ranks (at least 1 expected)", ranks);
    ln_config sh;
    if (ln_tp_shard_config(&full->cfg, ranks, &sh, e)) return -1;
    tp_train_ctx *ctx = ln_xcalloc((size_t)ranks, sizeof *ctx);
    void **ptrs = ln_xcalloc((size_t)ranks, sizeof *ptrs);
    for (int r = 0; r < ranks; r++) {
        ctx[r] = (tp_train_ctx){.full = full, .full_ad = full_ad, .ds = ds, .opts = *opts};
        ptrs[r] = &ctx[r];
    }
    int rc = comm_thread_run(ranks, tp_train_rank, ptrs, e);
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
        h->mine = ln_xmalloc(n * sizeof(float));
        h->all = ln_xmalloc(h->cap * sizeof(float));
        h->whole = ln_xmalloc(h->cap * sizeof(float));
    }
    /* X is host-readable: CPU memory, or the CUDA backend's managed memory. */
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
