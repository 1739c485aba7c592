/* tensor_parallel.c — sharding a model and its adapter over ranks, and the per-step gradient
 * reductions (see tensor_parallel.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lapacke.h>

#include "common/safetensors.h"
#include "common/util.h"
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

int ln_tp_agree(ln_model *m, int *flag, ln_err *e)
{
    if (!m->comm || m->comm->size == 1) return 0;
    float f = (float)*flag;
    if (comm_broadcast(m->comm, &f, 1, 0, e)) return ln_err_prefix(e, "tensor parallel: agreeing on a stop");
    *flag = f != 0.0f;
    return 0;
}

typedef struct tp_train_ctx {
    ln_model *full;
    ln_adapter *full_ad;
    const ln_dataset *ds;
    ln_train_opts opts;
    ln_train_result res;
    FILE *metrics;          /* rank 0 writes the rows here (out_dir) */
    const ln_train_opts *user;
} tp_train_ctx;

/* Rank 0's rows: into metrics.jsonl, then to the caller's on_row. */
static void tp_on_row(json_t *row, void *p)
{
    tp_train_ctx *x = p;
    if (x->metrics) {
        char *line = json_dumps(row, JSON_COMPACT);
        fprintf(x->metrics, "%s\n", line);
        fflush(x->metrics);
        free(line);
    }
    if (x->user->on_row) x->user->on_row(row, x->user->cb_ctx);
}

static int tp_should_stop(void *p)
{
    tp_train_ctx *x = p;
    return x->user->should_stop ? x->user->should_stop(x->user->cb_ctx) : 0;
}

static int tp_train_rank(ln_comm *c, void *p, ln_err *e)
{
    tp_train_ctx *x = p;
    ln_model *shard = NULL;
    ln_adapter sad;
    memset(&sad, 0, sizeof sad);
    int rc = ln_tp_shard_model(x->full, c, &shard, e);
    if (rc == 0) rc = ln_tp_shard_adapter(x->full, x->full_ad, shard, &sad, e);
    ln_train_opts o = x->opts;
    o.out_dir = NULL;
    if (c->rank == 0) {
        o.on_row = tp_on_row;
        o.should_stop = tp_should_stop;
        o.cb_ctx = x;
    } else {
        o.on_row = NULL;
        o.should_stop = NULL;
        o.progress = 0;
    }
    if (rc == 0) rc = ln_train(shard, &sad, x->ds, &o, &x->res, e);
    if (rc == 0) rc = ln_tp_gather(shard, &sad, c->rank == 0 ? x->full : NULL, c->rank == 0 ? x->full_ad : NULL, e);
    if (!sad.full) ln_adapter_free(&sad);
    ln_model_free(shard);
    if (rc) ln_err_prefix(e, "rank %d of %d", c->rank, c->size);
    return rc;
}

/* What ln_train's end writes into out_dir, for the gathered adapter (or model). */
static int tp_save_final(ln_model *m, ln_adapter *ad, const char *dir, ln_err *e)
{
    if (ad->full) return ln_model_save(m, dir, ST_F32, e);
    char *p = ln_path_join(dir, "adapter.safetensors");
    int rc = ln_adapter_save(ad, p, e);
    free(p);
    if (rc == 0 && !ad->residual) rc = ln_adapter_save_peft(ad, m, dir, e);
    return rc;
}

int ln_tp_train(ln_model *full, ln_adapter *full_ad, const ln_dataset *ds, const ln_train_opts *opts, int ranks,
                ln_train_result *res, ln_err *e)
{
    if (opts->resume || opts->eval)
        return ln_errf(e, "tensor-parallel training on threads: resume and eval are not supported yet "
                          "(checkpoints of a sharded run are not written)");
    if (ranks < 1) return ln_errf(e, "tensor-parallel training: %d ranks (at least 1 expected)", ranks);
    ln_config sh;
    if (ln_tp_shard_config(&full->cfg, ranks, &sh, e)) return -1;
    FILE *metrics = NULL;
    if (opts->out_dir) {
        if (ln_mkdir_p(opts->out_dir, e)) return -1;
        char *mp = ln_path_join(opts->out_dir, "metrics.jsonl");
        metrics = fopen(mp, "w");
        free(mp);
        if (!metrics) return ln_errf(e, "tensor-parallel training: cannot open metrics.jsonl in %s", opts->out_dir);
    }
    tp_train_ctx *ctx = ln_xcalloc((size_t)ranks, sizeof *ctx);
    void **ptrs = ln_xcalloc((size_t)ranks, sizeof *ptrs);
    for (int r = 0; r < ranks; r++) {
        ctx[r] = (tp_train_ctx){.full = full, .full_ad = full_ad, .ds = ds, .opts = *opts, .user = opts,
                                .metrics = r == 0 ? metrics : NULL};
        ptrs[r] = &ctx[r];
    }
    int rc = comm_thread_run(ranks, tp_train_rank, ptrs, e);
    if (metrics) fclose(metrics);
    if (rc == 0 && res) *res = ctx[0].res;
    if (rc == 0 && opts->out_dir && !ctx[0].res.stopped) rc = tp_save_final(full, full_ad, opts->out_dir, e);
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
    double *Mk = ln_xcalloc(part, sizeof(double)), *all = ln_xmalloc(part * R * sizeof(double));
    double *M = ln_xcalloc((size_t)d_out * r, sizeof(double));
    double *s = ln_xmalloc((size_t)r * sizeof(double)), *P = ln_xmalloc((size_t)d_out * r * sizeof(double));
    double *Qt = ln_xmalloc((size_t)r * r * sizeof(double));
    float *h = ln_xmalloc((size_t)rows * cols * sizeof(float));
    int rc = -1;
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
        float *A = ln_xmalloc((size_t)lo->A.n * sizeof(float)), *B = ln_xmalloc((size_t)lo->B.n * sizeof(float));
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
        free(A);
        free(B);
    }
out:
    (void)d_full;
    free(Mk); free(all); free(M); free(s); free(P); free(Qt); free(h);
    return rc;
}

int ln_tp_init_lora_null(ln_model *m, ln_adapter *ad, ln_covariance_fn cov, void *ctx, int *eigensolves, ln_err *e)
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
            int d = d_full[in], owner = (4 * l + in) % R;
            if (r > d) return ln_errf(e, "tensor-parallel init: rank %d exceeds d_in %d", r, d);
            double *U = ln_xmalloc((size_t)d * r * sizeof(double));
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
