/* train.c — the training loop, checkpoints and resume (see train.h). */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/engine/rng.h"
#include "worker/engine/tensor_parallel.h"
#include "worker/engine/train.h"

ln_train_opts ln_train_defaults(void)
{
    ln_train_opts o;
    memset(&o, 0, sizeof o);
    o.epochs = 1;
    o.batch_size = 8;
    o.grad_accum = 1;
    o.optim = ln_optim_defaults();
    o.seed = 42;
    o.shuffle = 1;
    return o;
}

/* ================================================================ batches and params */

/* b's ids and targets (and *seg when seg is not NULL) for n rows of T tokens; on failure nothing
 * is left allocated. */
static int batch_alloc(ln_batch *b, int n, int T, int32_t **seg, ln_err *e)
{
    memset(b, 0, sizeof *b);
    b->B = n;
    b->T = T;
    const char *what = seg ? "packed batch" : "batch";
    b->ids = ln_try_allocf((size_t)n * T, sizeof(int32_t), e, what, "the token ids of %d rows of %d tokens", n, T);
    b->targets = b->ids ? ln_try_allocf((size_t)n * T, sizeof(int32_t), e, what, "the targets of %d rows of %d tokens",
                                        n, T)
                        : NULL;
    if (seg) *seg = b->targets ? ln_try_allocf((size_t)n * T, sizeof(int32_t), e, what,
                                               "the segments of %d rows of %d tokens", n, T)
                               : NULL;
    if (b->targets && (!seg || *seg)) return 0;
    ln_batch_free(b);
    return -1;
}

int ln_batch_build(ln_batch *b, const ln_example *const *ex, int n, ln_err *e)
{
    int T = 1;
    for (int i = 0; i < n; i++) T = ex[i]->len > T ? ex[i]->len : T;
    if (batch_alloc(b, n, T, NULL, e)) return -1;
    for (int i = 0; i < n; i++) {
        const ln_example *x = ex[i];
        for (int t = 0; t < T; t++) {
            int64_t k = (int64_t)i * T + t;
            b->ids[k] = t < x->len ? x->input_ids[t] : 0;
            /* position t predicts token t+1: transformers shifts labels the same way */
            int32_t y = t + 1 < x->len ? x->labels[t + 1] : LN_IGNORE_INDEX;
            b->targets[k] = y >= 0 ? y : LN_IGNORE_INDEX;
            b->n_targets += y >= 0;
        }
    }
    return 0;
}

int ln_batch_build_packed(ln_batch *b, int32_t **segment, const ln_packed_row *rows, int n, ln_err *e)
{
    int T = 1;
    for (int i = 0; i < n; i++) T = rows[i].len > T ? rows[i].len : T;
    int32_t *seg = NULL;
    *segment = NULL;
    if (batch_alloc(b, n, T, &seg, e)) return -1;
    for (int i = 0; i < n; i++) {
        const ln_packed_row *r = &rows[i];
        for (int t = 0; t < T; t++) {
            int64_t k = (int64_t)i * T + t;
            b->ids[k] = t < r->len ? r->input_ids[t] : 0;
            seg[k] = t < r->len ? r->segment[t] : -1;
            /* the first label of every segment is −100 (data.h), so no target crosses examples */
            int32_t y = t + 1 < r->len ? r->labels[t + 1] : LN_IGNORE_INDEX;
            b->targets[k] = y >= 0 ? y : LN_IGNORE_INDEX;
            b->n_targets += y >= 0;
        }
    }
    *segment = seg;
    return 0;
}

void ln_batch_free(ln_batch *b)
{
    free(b->ids);
    free(b->targets);
    b->ids = b->targets = NULL;
}

typedef struct { ln_param **v; int n, cap; } param_list;

static void push_trainable(ln_param *p, void *ctx)
{
    param_list *l = ctx;
    if (!p->trainable) return;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->v = ln_xrealloc(l->v, (size_t)l->cap * sizeof *l->v);
    }
    l->v[l->n++] = p;
}

int ln_trainable_params(ln_model *m, ln_adapter *ad, ln_param ***out)
{
    param_list l = {0};
    ln_model_for_each_param(m, push_trainable, &l);
    if (ad && !ad->full) ln_adapter_for_each_param(ad, push_trainable, &l);
    *out = l.v;
    return l.n;
}

int ln_eval_loss(ln_model *m, const ln_adapter *ad, const ln_dataset *ds, int batch_size, double *mean_loss,
                 ln_err *e)
{
    ln_acts *acts = ln_acts_new();
    double sum = 0.0;
    int64_t count = 0;
    int rc = 0;
    const ln_example **ex = ln_try_allocf((size_t)batch_size, sizeof *ex, e, "evaluation",
                                          "a batch of %d examples", batch_size);
    if (!ex) {
        ln_acts_free(m, acts);
        return -1;
    }
    for (int64_t i = 0; i < ds->n && rc == 0; i += batch_size) {
        int n = 0;
        for (int64_t j = i; j < ds->n && n < batch_size; j++) ex[n++] = &ds->ex[j];
        ln_batch b;
        if ((rc = ln_batch_build(&b, ex, n, e)) != 0) break;
        double ls = 0.0;
        ln_fwd_opts fwd = {.trained_rows_only = 1};
        rc = ln_model_forward(m, ad, acts, &b, &fwd, &ls, e);
        sum += ls;
        count += b.n_targets;
        ln_batch_free(&b);
    }
    free(ex);
    ln_acts_free(m, acts);
    *mean_loss = count ? sum / (double)count : 0.0;
    if (rc == 0) rc = ln_model_check_device(m, e, "in an evaluation over %lld examples", (long long)ds->n);
    return rc;
}

/* ================================================================ checkpoints */

static void meta_i64(st_writer *w, const char *k, int64_t v)
{
    char b[32];
    snprintf(b, sizeof b, "%" PRId64, v);
    st_writer_meta(w, k, b);
}

typedef struct { st_writer *w; } add_ctx;

static void add_weight(ln_param *p, void *ctx)
{
    add_ctx *c = ctx;
    int64_t shape[2] = {p->rows, p->cols};
    st_writer_add(c->w, p->name, ST_F32, p->ndim, shape, p->w);
}

typedef struct ckpt_state {
    int64_t step, total_steps;
    ln_data_pos pos;
    ln_rng rng;
} ckpt_state;

/* A checkpoint's metadata (everything but the tensors). */
static st_writer *checkpoint_writer(const ckpt_state *cs, const ln_train_opts *o, int full)
{
    st_writer *w = st_writer_new();
    st_writer_meta(w, "format", "loranull-checkpoint");
    meta_i64(w, "step", cs->step);
    meta_i64(w, "total_steps", cs->total_steps);
    meta_i64(w, "epoch", cs->pos.epoch);
    meta_i64(w, "index", cs->pos.index);
    for (int i = 0; i < 4; i++) {
        char k[16], v[24];
        snprintf(k, sizeof k, "rng%d", i);
        snprintf(v, sizeof v, "%016" PRIx64, cs->rng.s[i]);
        st_writer_meta(w, k, v);
    }
    meta_i64(w, "seed", (int64_t)o->seed);
    meta_i64(w, "batch_size", o->batch_size);
    meta_i64(w, "grad_accum", o->grad_accum);
    st_writer_meta(w, "full", full ? "1" : "0");
    if (full) st_writer_meta(w, "method", "full");
    return w;
}

static int checkpoint_save(const char *path, ln_model *m, ln_adapter *ad, const ln_optim *opt, const ckpt_state *cs,
                           const ln_train_opts *o, ln_err *e)
{
    /* the writer reads the tensors and moments where they live */
    if (ln_backend_sync(m->be, e, "before writing checkpoint %s", path)) return -1;
    st_writer *w = checkpoint_writer(cs, o, ad->full);
    char name[200];
    add_ctx c = {w};
    if (ad->full) {
        ln_model_for_each_param(m, add_weight, &c);
    } else {
        ln_adapter_write(ad, w);
    }
    /* moment names: optim.m.<param> (param names are unique) */
    char **names = ln_xcalloc((size_t)(2 * opt->n + 1), sizeof(char *));
    for (int i = 0; i < opt->n; i++) {
        const ln_param *p = opt->params[i];
        int64_t shape[2] = {p->rows, p->cols};
        snprintf(name, sizeof name, "optim.m.%s", p->name);
        names[2 * i] = ln_xstrdup(name);
        st_writer_add(w, names[2 * i], ST_F32, p->ndim, shape, opt->m[i]);
        snprintf(name, sizeof name, "optim.v.%s", p->name);
        names[2 * i + 1] = ln_xstrdup(name);
        st_writer_add(w, names[2 * i + 1], ST_F32, p->ndim, shape, opt->v[i]);
    }
    int rc = st_writer_write(w, path, e);
    st_writer_free(w);
    for (int i = 0; i < 2 * opt->n; i++) free(names[i]);
    free(names);
    return rc;
}

static char *checkpoint_file(const char *ckpt)
{
    struct stat st;
    if (stat(ckpt, &st) == 0 && S_ISDIR(st.st_mode)) return ln_path_join(ckpt, "state.safetensors");
    return ln_xstrdup(ckpt);
}

static int copy_tensor(st_set *s, const char *name, float *dst, int64_t n, const char *file, ln_err *e)
{
    const st_tensor *t = st_find(s, name);
    if (!t) return ln_errf(e, "checkpoint %s: tensor %s is missing", file, name);
    if (t->numel != n) return ln_errf(e, "checkpoint %s: tensor %s has %lld elements, expected %lld", file, name,
                                      (long long)t->numel, (long long)n);
    if (st_to_f32(t, dst, n, e)) return -1;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(dst[i]))
            return ln_errf(e, "checkpoint %s: tensor %s is not finite (%g at index %lld)", file, name, (double)dst[i],
                           (long long)i);
    return 0;
}

/* This tensor-parallel rank's block of the checkpoint's whole tensor `name` (split like p, m's
 * param, ad's for a factor), into dst (backend memory): only the block's bytes of the mapped file
 * are read. */
static int read_block(st_set *s, const char *name, const ln_model *m, const ln_adapter *ad, const ln_param *p,
                      float *dst, const char *file, ln_err *e)
{
    ln_tp_split sp = ln_tp_param_split(m, ad, p);
    int64_t whole = ln_tp_whole_numel(p, sp, m->comm->size);
    const st_tensor *t = st_find(s, name);
    if (!t) return ln_errf(e, "checkpoint %s: tensor %s is missing", file, name);
    if (t->numel != whole) return ln_errf(e, "checkpoint %s: tensor %s has %lld elements, expected %lld", file, name,
                                          (long long)t->numel, (long long)whole);
    if (t->dtype != ST_F32) return ln_errf(e, "checkpoint %s: tensor %s is %s, expected F32", file, name,
                                           st_dtype_name(t->dtype));
    float *blk = ln_try_allocf((size_t)p->n + 1, sizeof(float), e, "resume", "this rank's block of %s", name);
    if (!blk) return -1;
    ln_tp_take_block(p, sp, m->comm->rank, m->comm->size, (const float *)t->data, blk);
    int rc = 0;
    for (int64_t i = 0; i < p->n && rc == 0; i++)
        if (!isfinite(blk[i]))
            rc = ln_errf(e, "checkpoint %s: tensor %s is not finite (in rank %d's block, at index %lld)", file, name,
                         m->comm->rank, (long long)i);
    if (rc == 0) m->be->upload(dst, blk, (size_t)p->n * sizeof(float));
    free(blk);
    return rc;
}

typedef struct { st_set *s; const char *file; ln_err *e; int rc; const ln_model *m; } load_ctx;

static void load_weight(ln_param *p, void *ctx)
{
    load_ctx *c = ctx;
    if (c->rc) return;
    c->rc = c->m->comm && c->m->comm->size > 1 ? read_block(c->s, p->name, c->m, NULL, p, p->w, c->file, c->e)
                                               : copy_tensor(c->s, p->name, p->w, p->n, c->file, c->e);
}

int ln_train_checkpoint_is_full(const char *ckpt, int *full, ln_err *e)
{
    char *file = checkpoint_file(ckpt);
    st_set *s = NULL;
    int rc = st_open(file, &s, e);
    if (rc == 0) {
        const char *f = st_metadata(s, "full");
        *full = f && strcmp(f, "1") == 0;
        st_close(s);
    }
    free(file);
    return rc;
}

int ln_train_load_checkpoint(ln_model *m, const char *ckpt, ln_adapter *ad, ln_err *e)
{
    char *file = checkpoint_file(ckpt);
    st_set *s = NULL;
    int rc = -1;
    if (st_open(file, &s, e)) goto out;
    const char *fmt = st_metadata(s, "format"), *full = st_metadata(s, "full");
    if (!fmt || strcmp(fmt, "loranull-checkpoint") != 0) {
        ln_errf(e, "%s is not a loranull checkpoint (metadata format is missing or different)", file);
        goto out;
    }
    if (full && strcmp(full, "1") == 0) {
        ln_adapter_opts ao = {.method = "full"};
        if (ln_adapter_init(m, ad, &ao, e)) goto out;
        /* copy_tensor writes the weights in place */
        if (ln_backend_sync(m->be, e, "before restoring the weights of %s", file)) goto out;
        load_ctx c = {s, file, e, 0, m};
        ln_model_for_each_param(m, load_weight, &c);
        rc = c.rc;
    } else {
        rc = ln_adapter_load(m, file, ad, e);
    }
out:
    if (s) st_close(s);
    free(file);
    return rc;
}

static int meta_get_i64(st_set *s, const char *k, int64_t *v, const char *file, ln_err *e)
{
    const char *x = st_metadata(s, k);
    if (!x) return ln_errf(e, "checkpoint %s: metadata \"%s\" is missing", file, k);
    char *end;
    *v = strtoll(x, &end, 10);
    if (*end) return ln_errf(e, "checkpoint %s: metadata \"%s\" is not an integer", file, k);
    return 0;
}

/* The second half of a resume: position, RNG and moments; refuses changed options. On a
 * tensor-parallel shard (m->comm) the checkpoint holds whole moments: each rank reads its block. */
static int checkpoint_restore(const char *ckpt, ln_model *m, ln_adapter *ad, ln_optim *opt, ckpt_state *cs,
                              const ln_train_opts *o, ln_err *e)
{
    int tp = m->comm && m->comm->size > 1;
    char *file = checkpoint_file(ckpt);
    st_set *s = NULL;
    int rc = -1;
    char name[200];
    if (st_open(file, &s, e)) goto out;
    int64_t total, seed, bs, ga;
    if (meta_get_i64(s, "step", &cs->step, file, e) || meta_get_i64(s, "total_steps", &total, file, e) ||
        meta_get_i64(s, "epoch", &cs->pos.epoch, file, e) || meta_get_i64(s, "index", &cs->pos.index, file, e) ||
        meta_get_i64(s, "seed", &seed, file, e) || meta_get_i64(s, "batch_size", &bs, file, e) ||
        meta_get_i64(s, "grad_accum", &ga, file, e))
        goto out;
    if (total != cs->total_steps || (uint64_t)seed != o->seed || bs != o->batch_size || ga != o->grad_accum) {
        ln_errf(e, "resume: checkpoint %s was made with total_steps %lld, seed %lld, batch_size %lld, grad_accum %lld "
                   "but this run has %lld, %llu, %d, %d; resume with the same options",
                file, (long long)total, (long long)seed, (long long)bs, (long long)ga, (long long)cs->total_steps,
                (unsigned long long)o->seed, o->batch_size, o->grad_accum);
        goto out;
    }
    for (int i = 0; i < 4; i++) {
        char k[16];
        snprintf(k, sizeof k, "rng%d", i);
        const char *v = st_metadata(s, k);
        if (!v) { ln_errf(e, "checkpoint %s: metadata \"%s\" is missing", file, k); goto out; }
        cs->rng.s[i] = strtoull(v, NULL, 16);
    }
    /* copy_tensor writes the moments in place */
    if (ln_backend_sync(m->be, e, "before restoring the optimizer state of %s", file)) goto out;
    for (int i = 0; i < opt->n; i++) {
        const ln_param *p = opt->params[i];
        for (int k = 0; k < 2; k++) {
            float *dst = k ? opt->v[i] : opt->m[i];
            snprintf(name, sizeof name, "optim.%c.%s", k ? 'v' : 'm', p->name);
            if (tp ? read_block(s, name, m, ad, p, dst, file, e) : copy_tensor(s, name, dst, p->n, file, e))
                goto out;
        }
    }
    opt->step = cs->step;
    rc = 0;
out:
    if (s) st_close(s);
    free(file);
    return rc;
}

/* ================================================================ the loop */

static void progress_line(int64_t step, int64_t total, double loss, float lr, double tps, double eta)
{
    int em = (int)(eta / 60), es = (int)eta % 60;
    fprintf(stderr, "\rstep %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  ETA %dm%02ds   ", (long long)step,
            (long long)total, loss, (double)lr, tps, em, es);
    if (step == total) fputc('\n', stderr);
    fflush(stderr);
}

/* Collective: a tensor-parallel shard's adapter (or weights) gathered into rank 0's whole model
 * and adapter (o->tp_full*), for `what` (a checkpoint, an eval). */
static int tp_gather_whole(ln_model *m, ln_adapter *ad, const ln_train_opts *o, const char *what, ln_err *e)
{
    int root = m->comm->rank == 0;
    if (root && (!o->tp_full || !o->tp_full_ad)) {
        comm_abort(m->comm);
        return ln_errf(e, "tensor-parallel %s: rank 0 has no whole model to gather into (train through "
                          "ln_tp_train_rank)", what);
    }
    return ln_tp_gather(m, ad, root ? o->tp_full : NULL, root ? o->tp_full_ad : NULL, e);
}

/* A full fine-tune's checkpoint on shards (collective): the one-rank file, every weight and then
 * every moment gathered whole one tensor at a time while rank 0 writes it (ln_tp_write_gathered):
 * no rank holds the whole model, rank 0 one tensor of it. */
static int tp_full_checkpoint_save(const char *path, ln_model *m, ln_adapter *ad, const ln_optim *opt,
                                   const ckpt_state *cs, const ln_train_opts *o, ln_err *e)
{
    int n;
    ln_tp_item *items = ln_tp_weight_items(m, 2 * opt->n, &n);
    char **names = ln_xcalloc((size_t)(2 * opt->n + 1), sizeof(char *));
    for (int i = 0; i < opt->n; i++)
        for (int k = 0; k < 2; k++) {
            const ln_param *p = opt->params[i];
            char name[200];
            snprintf(name, sizeof name, "optim.%c.%s", k ? 'v' : 'm', p->name);
            names[2 * i + k] = ln_xstrdup(name);
            items[n++] = (ln_tp_item){names[2 * i + k], p, ln_tp_param_split(m, ad, p), k ? opt->v[i] : opt->m[i]};
        }
    st_writer *w = m->comm->rank == 0 ? checkpoint_writer(cs, o, 1) : NULL;
    int rc = ln_tp_write_gathered(m->comm, m->be, w, items, n, ST_F32, path, e);
    st_writer_free(w);
    for (int i = 0; i < 2 * opt->n; i++) free(names[i]);
    free(names);
    free(items);
    return rc;
}

/* A tensor-parallel shard's checkpoint (collective): the adapter (or weights) gathered into rank
 * 0's whole model and adapter (o->tp_full*), the moments gathered like their params, and rank 0
 * writes the one-rank format from them. */
static int tp_checkpoint_save(const char *path, ln_model *m, ln_adapter *ad, const ln_optim *opt, const ckpt_state *cs,
                              const ln_train_opts *o, ln_err *e)
{
    ln_comm *c = m->comm;
    int root = c->rank == 0;
    if (ad->full) return tp_full_checkpoint_save(path, m, ad, opt, cs, o, e);
    if (tp_gather_whole(m, ad, o, "checkpoint", e)) return -1;
    ln_optim whole;
    memset(&whole, 0, sizeof whole);
    ln_param **wp = NULL;
    int rc = 0;
    if (root) {
        whole.n = ln_trainable_params(o->tp_full, o->tp_full_ad, &wp);
        whole.params = wp;
        whole.m = ln_xcalloc((size_t)opt->n + 1, sizeof(float *));
        whole.v = ln_xcalloc((size_t)opt->n + 1, sizeof(float *));
        if (whole.n != opt->n) {
            comm_abort(c);
            rc = ln_errf(e, "tensor-parallel checkpoint: the whole model has %d trainable tensors, the shard %d",
                         whole.n, opt->n);
        }
    }
    for (int i = 0; i < opt->n && rc == 0; i++) {
        const ln_param *p = opt->params[i];
        ln_tp_split sp = ln_tp_param_split(m, ad, p);
        if (root) {
            size_t bytes = (size_t)ln_tp_whole_numel(p, sp, c->size) * sizeof(float);
            if (!(whole.m[i] = ln_try_alloc(bytes, "checkpoint: a whole optimizer moment", e)) ||
                !(whole.v[i] = ln_try_alloc(bytes, "checkpoint: a whole optimizer moment", e))) {
                comm_abort(c);
                rc = -1;
                break;
            }
        }
        rc = ln_tp_gather_tensor(c, m->be, p, sp, opt->m[i], root ? whole.m[i] : NULL, e);
        if (rc == 0) rc = ln_tp_gather_tensor(c, m->be, p, sp, opt->v[i], root ? whole.v[i] : NULL, e);
    }
    if (rc == 0 && root) {
        rc = checkpoint_save(path, o->tp_full, o->tp_full_ad, &whole, cs, o, e);
        if (rc) comm_abort(c);
    }
    for (int i = 0; root && i < opt->n; i++) {
        free(whole.m[i]);
        free(whole.v[i]);
    }
    free(whole.m);
    free(whole.v);
    free(wp);
    return rc;
}

/* The backend's check (backend.h: the first device error since the last check) at a point of the
 * loop, `where` said in the error ("at train step 12"). On a tensor-parallel shard a failure aborts
 * the group: the other ranks fail too instead of waiting for this one (or saving its step). */
static int device_ok(ln_model *m, const char *where, ln_err *e)
{
    if (ln_model_check_device(m, e, "%s", where) == 0) return 0;
    if (m->comm && m->comm->size > 1) comm_abort(m->comm);
    return -1;
}

/* The same at train step `step` (1-based), `what` added when not NULL ("at train step 12 (evaluation)"). */
static int device_ok_at(ln_model *m, int64_t step, const char *what, ln_err *e)
{
    char where[96];
    snprintf(where, sizeof where, "at train step %lld%s%s%s", (long long)step, what ? " (" : "", what ? what : "",
             what ? ")" : "");
    return device_ok(m, where, e);
}

/* OUT/checkpoints/step-NNNNNN/state.safetensors; remembered in res->last_checkpoint. Every rank
 * of a tensor-parallel shard calls it; rank 0 writes. Never a step whose kernels failed: the
 * device is checked first. */
static int save_checkpoint_dir(const char *ckdir, ln_model *m, ln_adapter *ad, const ln_optim *opt,
                               const ckpt_state *cs, const ln_train_opts *o, ln_train_result *res, ln_err *e)
{
    if (device_ok_at(m, cs->step, "before its checkpoint", e)) return -1;
    int tp = m->comm && m->comm->size > 1, root = !tp || m->comm->rank == 0;
    char sub[64];
    snprintf(sub, sizeof sub, "step-%06lld", (long long)cs->step);
    char *d = ln_path_join(ckdir, sub);
    char *f = ln_path_join(d, "state.safetensors");
    int rc = root ? ln_mkdir_p(d, e) : 0;
    if (rc && tp) comm_abort(m->comm);
    if (rc == 0) rc = tp ? tp_checkpoint_save(f, m, ad, opt, cs, o, e) : checkpoint_save(f, m, ad, opt, cs, o, e);
    if (rc == 0 && root) snprintf(res->last_checkpoint, sizeof res->last_checkpoint, "%s", d);
    free(f);
    free(d);
    return rc;
}

int ln_train_save_final(ln_model *m, ln_adapter *ad, const char *dir, ln_err *e)
{
    if (ln_model_check_device(m, e, "before writing the final %s", ad->full ? "model" : "adapter")) return -1;
    if (ad->full) return ln_model_save(m, dir, ST_F32, e);
    char *p = ln_path_join(dir, "adapter.safetensors");
    int rc = ln_adapter_save(ad, p, e);
    free(p);
    if (rc == 0 && !ad->residual) rc = ln_adapter_save_peft(ad, m, dir, e);
    return rc;
}

/* An eval point of a tensor-parallel shard (collective): the adapter gathered into rank 0's whole
 * one, o->eval on rank 0; the others wait for its outcome and fail with it. */
static int tp_eval(ln_model *m, ln_adapter *ad, const ln_train_opts *o, int64_t step, json_t *row, ln_err *e)
{
    ln_comm *c = m->comm;
    int root = c->rank == 0;
    if (tp_gather_whole(m, ad, o, "eval", e)) return -1;
    int rc = root ? o->eval(o->tp_full, o->tp_full_ad, step, row, o->eval_ctx, e) : 0;
    float failed = rc ? 1.0f : 0.0f;
    ln_err be = {{0}};
    if (comm_broadcast(c, &failed, 1, 0, &be)) {
        if (rc == 0) *e = be;
        return -1;
    }
    if (!root && failed != 0.0f) return ln_errf(e, "rank 0's evaluation failed");
    return rc;
}

/* An eval point: o->eval on one rank; on a shard, tp_eval, or with o->eval_collective o->eval on
 * every rank's shard, then a barrier. A rank whose eval failed (perhaps inside one of its
 * collectives, which the others are waiting in) aborts the group, so every rank fails here, at
 * this step, and rank 0 writes no row for it. */
static int eval_point(ln_model *m, ln_adapter *ad, const ln_train_opts *o, int64_t step, json_t *row, ln_err *e)
{
    if (!m->comm || m->comm->size == 1) return o->eval(m, ad, step, row, o->eval_ctx, e);
    if (!o->eval_collective) return tp_eval(m, ad, o, step, row, e);
    if (o->eval(m, ad, step, row, o->eval_ctx, e)) {
        comm_abort(m->comm);
        return -1;
    }
    return comm_barrier(m->comm, e) ? ln_err_prefix(e, "waiting for every rank's evaluation") : 0;
}

int ln_train(ln_model *m, ln_adapter *ad, const ln_dataset *ds, const ln_train_opts *o, ln_train_result *res,
             ln_err *e)
{
    memset(res, 0, sizeof *res);
    if (o->batch_size <= 0 || o->grad_accum <= 0) return ln_errf(e, "train: batch_size and grad_accum must be positive");
    if (ds->n <= 0) return ln_errf(e, "train: dataset %s has no examples", ds->path ? ds->path : "");
    if (o->max_steps <= 0 && o->epochs <= 0) return ln_errf(e, "train: give epochs or max_steps");
    int per_step = o->batch_size * o->grad_accum;
    /* a tensor-parallel shard: collectives at checkpoints and eval points; rank 0 writes */
    int tp = m->comm && m->comm->size > 1, root = !tp || m->comm->rank == 0;
    ckpt_state cs;
    memset(&cs, 0, sizeof cs);
    cs.total_steps = o->max_steps > 0 ? o->max_steps : ((int64_t)o->epochs * ds->n + per_step - 1) / per_step;
    if (o->pack > 0 && o->max_steps <= 0) { /* packed: steps from the token count (rows are not always full) */
        int64_t per_step_tokens = (int64_t)per_step * o->pack;
        cs.total_steps = ((int64_t)o->epochs * ds->stats.tokens + per_step_tokens - 1) / per_step_tokens;
    }
    ln_optim_cfg oc = o->optim;
    oc.total_steps = cs.total_steps;
    oc.warmup_steps = (int64_t)ceil(o->warmup_ratio * (double)cs.total_steps);
    ln_rng_seed(&cs.rng, o->seed ^ 0x747261696eull); /* reserved for dropout-like noise; saved */

    /* the frozen weights in the backend's faster form for the whole run (after the init and any
     * resume rewrote W0); thawed on the way out unless the caller had frozen them */
    int froze = !m->frozen;
    if (ln_model_freeze_frozen(m, ad, e)) return -1;
    ln_param **params = NULL;
    int np = ln_trainable_params(m, ad, &params);
    if (np == 0) {
        free(params);
        if (froze) ln_model_thaw(m);
        return ln_errf(e, "train: nothing is trainable (method %s)", ad->method);
    }
    ln_optim opt;
    if (ln_optim_init(&opt, m->be, params, np, &oc, e)) {
        free(params);
        if (froze) ln_model_thaw(m);
        return -1;
    }
    ln_loader ld;
    ln_loader_init(&ld, ds, o->seed, o->shuffle);
    ln_acts *acts = ln_acts_new();
    FILE *metrics = NULL;
    int rc = -1;
    ln_batch *mb = ln_xcalloc((size_t)o->grad_accum, sizeof *mb);
    int32_t **mseg = ln_xcalloc((size_t)o->grad_accum, sizeof *mseg); /* packed micro-batches' segments */
    const ln_example **ex = ln_xmalloc((size_t)per_step * sizeof *ex);
    ln_packed_row *packed = NULL;
    if (o->pack > 0) {
        packed = ln_xcalloc((size_t)per_step, sizeof *packed);
        for (int i = 0; i < per_step; i++) ln_packed_row_init(&packed[i], o->pack);
    }
    char *ckdir = NULL;

    if (o->resume) {
        if (checkpoint_restore(o->resume, m, ad, &opt, &cs, o, e)) goto out;
        ln_loader_seek(&ld, cs.pos);
    }
    if (o->out_dir && root) {
        if (ln_mkdir_p(o->out_dir, e)) goto out;
        char *mp = ln_path_join(o->out_dir, "metrics.jsonl");
        metrics = fopen(mp, o->resume ? "a" : "w");
        free(mp);
        if (!metrics) { ln_errf(e, "train: cannot open metrics.jsonl in %s", o->out_dir); goto out; }
    }
    if (o->out_dir) ckdir = ln_path_join(o->out_dir, "checkpoints"); /* every rank: saving is collective */
    /* what calibration, the init or the restore left on the device, before the first step builds on it */
    if (device_ok(m, cs.step ? "before training (restoring the checkpoint)"
                             : "before training (calibration or the adapter's init)", e))
        goto out;
    double t_start = ln_now_s();
    int64_t steps_here = 0;
    for (int64_t step = cs.step; step < cs.total_steps; step++) {
        int stop = o->should_stop && o->should_stop(o->cb_ctx);
        if (m->comm && ln_tp_agree(m, &stop, e)) goto out; /* every rank stops at the same step */
        if (stop) {
            /* a pause or cancel: keep what was done, unless the last checkpoint already has it */
            res->stopped = 1;
            if (ckdir && steps_here > 0 && !(o->save_every > 0 && cs.step % o->save_every == 0) &&
                save_checkpoint_dir(ckdir, m, ad, &opt, &cs, o, res, e))
                goto out;
            break;
        }
        double t0 = ln_now_s();
        /* the step's examples, then its micro-batches; the loss is averaged over all their targets */
        int64_t trained = 0, tokens = 0;
        int brc = 0; /* a micro-batch that could not be built (out of memory) */
        if (o->pack > 0) {
            for (int i = 0; i < per_step; i++) ln_loader_next_packed(&ld, &packed[i]);
            for (int a = 0; a < o->grad_accum && brc == 0; a++) {
                brc = ln_batch_build_packed(&mb[a], &mseg[a], packed + (size_t)a * o->batch_size, o->batch_size, e);
                trained += mb[a].n_targets;
                for (int i = 0; i < o->batch_size; i++) tokens += packed[a * o->batch_size + i].len;
            }
        } else {
            for (int i = 0; i < per_step; i++) ex[i] = ln_loader_next(&ld);
            for (int a = 0; a < o->grad_accum && brc == 0; a++) {
                brc = ln_batch_build(&mb[a], ex + (size_t)a * o->batch_size, o->batch_size, e);
                trained += mb[a].n_targets;
                for (int i = 0; i < o->batch_size; i++) tokens += ex[a * o->batch_size + i]->len;
            }
        }
        ln_optim_zero_grad(&opt);
        /* the lm_head's backward runs fused inside the forward (see model.h) */
        ln_fwd_opts fwd = {.trained_rows_only = 1, .head_grad_scale = trained > 0 ? 1.0f / (float)trained : 0.0f};
        double loss_sum = 0.0;
        float scale = fwd.head_grad_scale;
        int frc = brc;
        if (m->comm) { /* a shard's failed build stops every rank before the collectives of the pass */
            int bad = brc != 0;
            ln_err ae;
            if (ln_tp_agree(m, &bad, brc ? &ae : e)) frc = -1;
            else if (bad && !brc) frc = ln_errf(e, "another rank could not build its micro-batch");
        }
        for (int a = 0; a < o->grad_accum && frc == 0; a++) {
            double ls = 0.0;
            fwd.segment = mseg[a]; /* NULL unless packed */
            frc = ln_model_forward(m, ad, acts, &mb[a], &fwd, &ls, e);
            if (frc == 0 && trained > 0) frc = ln_model_backward(m, ad, acts, &mb[a], scale, e);
            loss_sum += ls;
        }
        for (int a = 0; a < o->grad_accum; a++) {
            ln_batch_free(&mb[a]);
            free(mseg[a]);
            mseg[a] = NULL;
        }
        if (frc) { ln_err_prefix(e, "train step %lld", (long long)step + 1); goto out; }
        /* a failed kernel first: its garbage would otherwise read as a diverging loss */
        if (device_ok_at(m, step + 1, NULL, e)) goto out;
        double loss = trained > 0 ? loss_sum / (double)trained : 0.0;
        if (!isfinite(loss)) { ln_errf(e, "train step %lld: the loss is not finite (%g); lower the learning rate", (long long)step + 1, loss); goto out; }
        double gnorm = 0.0;
        if (m->comm) { /* a tensor-parallel shard: finish replicated gradients, global norm */
            if (ln_tp_reduce_grads(m, ad, e) || ln_tp_grad_norm(m, ad, &gnorm, e)) goto out;
        } else {
            gnorm = ln_optim_grad_norm(&opt);
        }
        if (!isfinite(gnorm)) {
            ln_errf(e, "train step %lld: the gradient norm is not finite (%g); lower the learning rate",
                    (long long)step + 1, gnorm);
            goto out;
        }
        float coef = 1.0f;
        if (oc.max_grad_norm > 0) {
            float c = oc.max_grad_norm / (float)(gnorm + 1e-6);
            coef = c < 1.0f ? c : 1.0f;
        }
        float lr = ln_lr_at(&oc, step);
        ln_optim_step(&opt, lr, coef);
        if (device_ok_at(m, step + 1, NULL, e)) goto out;
        /* An update that overflows leaves inf weights, which need not make the next loss NaN
         * (RMSNorm maps an inf row to 0: a flat ln(V), zero gradient): catch it at this step.
         * A tensor-parallel shard skips it: its ranks would disagree on stopping (the global
         * gradient norm above and the next loss still catch a diverging run there). */
        int bad = m->comm ? -1 : ln_optim_first_nonfinite(&opt);
        if (bad >= 0) {
            ln_errf(e, "train step %lld: the weights of %s are not finite after the update (learning rate %g); lower "
                    "the learning rate", (long long)step + 1, opt.params[bad]->name, (double)lr);
            goto out;
        }
        cs.step = step + 1;
        cs.pos = ld.pos;
        steps_here++;
        double dt = ln_now_s() - t0, tps = dt > 0 ? (double)tokens / dt : 0.0;
        res->last_loss = loss;

        json_t *row = json_object();
        json_object_set_new(row, "step", json_integer(cs.step));
        json_object_set_new(row, "epoch", json_real((double)ld.pos.epoch + (double)ld.pos.index / (double)ds->n));
        json_object_set_new(row, "loss", json_real(loss));
        json_object_set_new(row, "lr", json_real(lr));
        json_object_set_new(row, "grad_norm", json_real(gnorm));
        json_object_set_new(row, "tokens_per_s", json_real(tps));
        json_object_set_new(row, "tokens", json_integer(tokens));
        json_object_set_new(row, "trained_tokens", json_integer(trained));
        json_object_set_new(row, "elapsed_s", json_real(ln_now_s() - t_start));
        int last = cs.step == cs.total_steps || (o->stop_at_step > 0 && cs.step == o->stop_at_step);
        int eval_due = o->eval && ((o->eval_every > 0 && cs.step % o->eval_every == 0) || last);
        if (eval_due && eval_point(m, ad, o, cs.step, row, e)) {
            json_decref(row);
            ln_err_prefix(e, "train step %lld: evaluation", (long long)cs.step);
            goto out;
        }
        if (eval_due && device_ok_at(m, cs.step, "evaluation", e)) {
            json_decref(row);
            goto out;
        }
        if (metrics) {
            char *line = json_dumps(row, JSON_COMPACT);
            fprintf(metrics, "%s\n", line);
            fflush(metrics);
            free(line);
        }
        if (o->on_row) o->on_row(row, o->cb_ctx);
        json_decref(row);
        if (o->progress) {
            double per = (ln_now_s() - t_start) / (double)steps_here;
            progress_line(cs.step, cs.total_steps, loss, lr, tps, per * (double)(cs.total_steps - cs.step));
        }
        if (ckdir && ((o->save_every > 0 && cs.step % o->save_every == 0) || last) &&
            save_checkpoint_dir(ckdir, m, ad, &opt, &cs, o, res, e))
            goto out;
        if (o->stop_at_step > 0 && cs.step == o->stop_at_step) { res->stopped = 1; break; }
    }
    res->steps = cs.step;
    /* a shard's final adapter is gathered and saved by ln_tp_train_rank */
    if (o->out_dir && !res->stopped && !tp && ln_train_save_final(m, ad, o->out_dir, e)) goto out;
    rc = 0;
out:
    if (metrics) fclose(metrics);
    free(ckdir);
    free(ex);
    if (packed) {
        for (int i = 0; i < per_step; i++) ln_packed_row_free(&packed[i]);
        free(packed);
    }
    free(mb);
    free(mseg);
    ln_acts_free(m, acts);
    ln_loader_free(&ld);
    ln_optim_free(&opt);
    free(params);
    if (froze) ln_model_thaw(m);
    return rc;
}
