/* Tensor parallelism on the CPU thread backend: a tiny GQA LLaMA sharded over 2 and 4 ranks must
 * give the same logits, loss, every gradient (each rank's shard against the matching block of the
 * 1-rank gradient) and 20 AdamW-step losses (with global-norm clipping) as 1 rank, within 1e-5
 * (relative to the largest entry). Three cases: LoRA on all seven targets with A and B training,
 * LoRA-Null-v2-style (A frozen, residual W0 − BA), and full fine-tuning. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "worker/backend/comm/comm.h"
#include "worker/engine/adapter.h"
#include "worker/engine/drift.h"
#include "worker/engine/model.h"
#include "worker/engine/nullspace.h"
#include "worker/engine/optim.h"
#include "worker/engine/rng.h"
#include "worker/engine/tensor_parallel.h"
#include "common/safetensors.h"
#include "common/util.h"
#include "worker/engine/train.h"
#include "tests/unit/sanitizer.h"

#define TOL 1e-5
#define STEPS 20
#define BATCH 2
#define SEQ 10

static const char *CONFIG =
    "{\"vocab_size\":48,\"hidden_size\":32,\"intermediate_size\":48,\"num_hidden_layers\":2,"
    "\"num_attention_heads\":8,\"num_key_value_heads\":4,\"head_dim\":8,\"max_position_embeddings\":64,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"tie_word_embeddings\":false}";

typedef enum { CASE_LORA, CASE_NULL_V2, CASE_FULL } tp_case;

/* The whole model and adapter of a case, the same bits every time it is built. */
static void build_full(tp_case k, ln_model **m, ln_adapter *ad)
{
    ln_config cfg;
    ln_err e = {{0}};
    assert_int_equal(ln_config_parse(CONFIG, "tp-config", &cfg, &e), 0);
    assert_int_equal(ln_model_new_random(&cfg, lnb_cpu(), 11, m, &e), 0);
    if (k == CASE_FULL) {
        memset(ad, 0, sizeof *ad);
        snprintf(ad->method, sizeof ad->method, "full");
        ad->full = 1;
        ad->num_layers = cfg.num_layers;
        assert_int_equal(ln_model_set_full_training(*m, &e), 0);
        return;
    }
    assert_int_equal(ln_adapter_alloc(*m, ad, k == CASE_LORA ? "lora" : "lora_null_v2", 4, k == CASE_LORA ? 8.0f : 4.0f,
                                      LN_TARGETS_ALL, &e), 0);
    ln_rng r;
    ln_rng_seed(&r, 5);
    for (int i = 0; i < cfg.num_layers * LN_NTARGET; i++) {
        ln_lora *lo = &ad->lora[i];
        for (int64_t j = 0; j < lo->A.n; j++) lo->A.w[j] = 0.2f * ln_rng_normal(&r);
        for (int64_t j = 0; j < lo->B.n; j++) lo->B.w[j] = 0.2f * ln_rng_normal(&r);
    }
    if (k == CASE_NULL_V2) {
        assert_int_equal(ln_adapter_make_residual(*m, ad, &e), 0);
        for (int i = 0; i < cfg.num_layers * LN_NTARGET; i++)
            assert_int_equal(ln_param_set_trainable(lnb_cpu(), &ad->lora[i].A, 0, &e), 0);
    }
}

static void make_batch(ln_batch *b)
{
    ln_rng r;
    ln_rng_seed(&r, 99);
    b->B = BATCH;
    b->T = SEQ;
    b->ids = malloc(BATCH * SEQ * sizeof(int32_t));
    b->targets = malloc(BATCH * SEQ * sizeof(int32_t));
    b->n_targets = 0;
    for (int i = 0; i < BATCH * SEQ; i++) {
        b->ids[i] = (int32_t)(ln_rng_u64(&r) % 48);
        b->targets[i] = i % 7 == 3 ? -100 : (int32_t)(ln_rng_u64(&r) % 48);
        b->n_targets += b->targets[i] >= 0;
    }
}

/* What one run (1 rank, or one rank of N) produces. */
typedef struct run_out {
    float *logits;          /* N × V after the first forward */
    double loss0;
    float **grads;          /* copies of every trainable gradient after the first backward */
    int ngrads;
    double losses[STEPS];
} run_out;

typedef struct rank_ctx {
    tp_case k;
    ln_model *full;
    ln_adapter *full_ad;
    run_out out;
    ln_model *shard;        /* kept for the comparison after the threads end */
    ln_adapter shard_ad;
} rank_ctx;

/* The first forward/backward, then STEPS AdamW steps with clipping by the global norm. */
static int run(ln_model *m, ln_adapter *ad, run_out *o, ln_err *e)
{
    ln_batch b;
    make_batch(&b);
    ln_param **params;
    int n = ln_trainable_params(m, ad, &params);
    ln_optim_cfg oc = ln_optim_defaults();
    oc.lr = 1e-2f;
    oc.weight_decay = 0.01f;
    oc.max_grad_norm = 0.5f;
    oc.total_steps = STEPS;
    oc.warmup_steps = 2;
    ln_optim opt;
    ln_acts *acts = ln_acts_new();
    int rc = ln_optim_init(&opt, m->be, params, n, &oc, e);
    for (int s = 0; s < STEPS && rc == 0; s++) {
        ln_optim_zero_grad(&opt);
        double loss;
        rc = ln_model_forward(m, ad, acts, &b, NULL, &loss, e);
        if (rc == 0) rc = ln_model_backward(m, ad, acts, &b, 1.0f / (float)b.n_targets, e);
        if (rc == 0) rc = ln_tp_reduce_grads(m, ad, e);
        double norm = 0;
        if (rc == 0) rc = ln_tp_grad_norm(m, ad, &norm, e);
        if (rc) break;
        o->losses[s] = loss / (double)b.n_targets;
        if (s == 0) {
            /* logits were overwritten by the backward: run the forward once more for them */
            int64_t NV = (int64_t)b.B * b.T * m->cfg.vocab_size;
            o->loss0 = loss;
            o->ngrads = n;
            o->grads = calloc((size_t)n, sizeof(float *));
            for (int i = 0; i < n; i++) {
                o->grads[i] = malloc((size_t)params[i]->n * sizeof(float));
                memcpy(o->grads[i], params[i]->g, (size_t)params[i]->n * sizeof(float));
            }
            o->logits = malloc((size_t)NV * sizeof(float));
            double l2;
            ln_acts *a2 = ln_acts_new();
            rc = ln_model_forward(m, ad, a2, &b, NULL, &l2, e);
            memcpy(o->logits, ln_acts_logits(a2), (size_t)NV * sizeof(float));
            ln_acts_free(m, a2);
            if (rc) break;
        }
        float clip = norm > oc.max_grad_norm ? (float)(oc.max_grad_norm / (norm + 1e-6)) : 1.0f;
        ln_optim_step(&opt, ln_lr_at(&oc, s), clip);
    }
    ln_acts_free(m, acts);
    ln_optim_free(&opt);
    free(params);
    ln_batch_free(&b);
    return rc;
}

static int rank_main(ln_comm *c, void *p, ln_err *e)
{
    rank_ctx *x = p;
    if (ln_tp_shard_model(x->full, c, &x->shard, e)) return -1;
    if (ln_tp_shard_adapter(x->full, x->full_ad, x->shard, &x->shard_ad, e)) return -1;
    return run(x->shard, &x->shard_ad, &x->out, e);
}

static double maxabs(const float *a, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

/* max |shard − block of ref| / max |ref| over the block a shard param holds. */
static double block_err(const float *shard, int rows, int cols, const float *ref, int ref_cols, int r0, int c0,
                        double scale)
{
    double worst = 0;
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            double d = fabs((double)shard[(int64_t)i * cols + j] - ref[(int64_t)(r0 + i) * ref_cols + c0 + j]);
            worst = d > worst ? d : worst;
        }
    return worst / (scale > 0 ? scale : 1);
}

/* Finds the full param matching a shard param by name (names are the same on every rank). */
static int find_param(ln_param **ps, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(ps[i]->name, name) == 0) return i;
    return -1;
}

/* Which rows/columns of the full tensor rank k's param holds (see tensor_parallel.h). */
static void block_of(const char *name, const ln_param *full, const ln_param *sh, int k, int *r0, int *c0)
{
    *r0 = *c0 = 0;
    int row_par = strstr(name, "o_proj") || strstr(name, "down_proj");
    if (sh->rows == full->rows && sh->cols == full->cols) return; /* replicated */
    if (strstr(name, "lora_A") || (!strstr(name, "lora_") && row_par)) *c0 = k * sh->cols;
    else *r0 = k * sh->rows;
}

static void check_case(tp_case k, int R)
{
    /* 1 rank */
    ln_model *ref_m;
    ln_adapter ref_ad;
    build_full(k, &ref_m, &ref_ad);
    run_out ref = {0};
    ln_err e = {{0}};
    assert_int_equal(run(ref_m, &ref_ad, &ref, &e), 0);
    ln_param **ref_ps;
    int nref = ln_trainable_params(ref_m, &ref_ad, &ref_ps);
    assert_int_equal(nref, ref.ngrads);

    /* R ranks, sharded from a pristine copy */
    ln_model *full;
    ln_adapter full_ad;
    build_full(k, &full, &full_ad);
    rank_ctx *ctx = calloc((size_t)R, sizeof *ctx);
    void *ptrs[8];
    for (int r = 0; r < R; r++) {
        ctx[r] = (rank_ctx){.k = k, .full = full, .full_ad = &full_ad};
        ptrs[r] = &ctx[r];
    }
    int rc = comm_thread_run(R, rank_main, ptrs, &e);
    if (rc) fail_msg("%d ranks: %s", R, e.msg);

    int64_t NV = (int64_t)BATCH * SEQ * 48;
    double lscale = maxabs(ref.logits, NV), worst_logit = 0, worst_grad = 0, worst_loss = 0;
    for (int r = 0; r < R; r++) {
        run_out *o = &ctx[r].out;
        for (int64_t i = 0; i < NV; i++) {
            double d = fabs((double)o->logits[i] - ref.logits[i]) / lscale;
            worst_logit = d > worst_logit ? d : worst_logit;
        }
        double dl = fabs(o->loss0 - ref.loss0) / fabs(ref.loss0);
        worst_loss = dl > worst_loss ? dl : worst_loss;
        ln_param **ps;
        int n = ln_trainable_params(ctx[r].shard, &ctx[r].shard_ad, &ps);
        assert_int_equal(n, o->ngrads);
        assert_int_equal(n, nref); /* the same parameters exist on every rank, sharded or not */
        for (int i = 0; i < n; i++) {
            int j = find_param(ref_ps, nref, ps[i]->name);
            if (j < 0) fail_msg("rank %d has %s, the 1-rank run does not", r, ps[i]->name);
            int r0, c0;
            block_of(ps[i]->name, ref_ps[j], ps[i], r, &r0, &c0);
            double err = block_err(o->grads[i], ps[i]->rows, ps[i]->cols, ref.grads[j], ref_ps[j]->cols, r0, c0,
                                   maxabs(ref.grads[j], ref_ps[j]->n));
            if (err > TOL) fail_msg("case %d, %d ranks, rank %d: gradient of %s differs by %.3g (relative)", k, R, r,
                                    ps[i]->name, err);
            worst_grad = err > worst_grad ? err : worst_grad;
        }
        for (int s = 0; s < STEPS; s++) {
            double d = fabs(o->losses[s] - ref.losses[s]) / fabs(ref.losses[s]);
            if (d > TOL) fail_msg("case %d, %d ranks, rank %d: step %d loss %.9g vs %.9g", k, R, r, s, o->losses[s],
                                  ref.losses[s]);
            worst_loss = d > worst_loss ? d : worst_loss;
        }
        free(ps);
    }
    printf("  case %d, %d ranks: logits %.2e, gradients %.2e, losses %.2e (relative); loss %.6f -> %.6f in %d steps\n", k,
           R, worst_logit, worst_grad, worst_loss, ref.losses[0], ref.losses[STEPS - 1], STEPS);
    assert_true(worst_logit <= TOL);
    /* training really moved: the 20-step loss is lower than the first */
    assert_true(ref.losses[STEPS - 1] < ref.losses[0] - 0.05);

    for (int r = 0; r < R; r++) {
        run_out *o = &ctx[r].out;
        for (int i = 0; i < o->ngrads; i++) free(o->grads[i]);
        free(o->grads);
        free(o->logits);
        if (!ctx[r].shard_ad.full) ln_adapter_free(&ctx[r].shard_ad);
        ln_model_free(ctx[r].shard);
    }
    free(ctx);
    for (int i = 0; i < ref.ngrads; i++) free(ref.grads[i]);
    free(ref.grads);
    free(ref.logits);
    free(ref_ps);
    if (!ref_ad.full) ln_adapter_free(&ref_ad);
    if (!full_ad.full) ln_adapter_free(&full_ad);
    ln_model_free(ref_m);
    ln_model_free(full);
}

static void test_lora_2_ranks(void **s) { (void)s; check_case(CASE_LORA, 2); }
static void test_lora_4_ranks(void **s) { (void)s; check_case(CASE_LORA, 4); }
static void test_null_v2_2_ranks(void **s) { (void)s; check_case(CASE_NULL_V2, 2); }
static void test_null_v2_4_ranks(void **s) { (void)s; check_case(CASE_NULL_V2, 4); }
static void test_full_2_ranks(void **s) { (void)s; check_case(CASE_FULL, 2); }
static void test_full_4_ranks(void **s) { (void)s; check_case(CASE_FULL, 4); }

/* ---- the trainer: ln_train on 1 rank vs ln_tp_train on 2 and 4 thread ranks ---- */

static ln_dataset *make_dataset(void)
{
    ln_dataset *d = calloc(1, sizeof *d);
    d->n = 12;
    d->ex = calloc((size_t)d->n, sizeof(ln_example));
    ln_rng r;
    ln_rng_seed(&r, 3);
    for (int i = 0; i < d->n; i++) {
        ln_example *x = &d->ex[i];
        x->len = 5 + i % 8;
        x->input_ids = malloc((size_t)x->len * sizeof(int32_t));
        x->labels = malloc((size_t)x->len * sizeof(int32_t));
        for (int t = 0; t < x->len; t++) {
            x->input_ids[t] = (int32_t)(ln_rng_u64(&r) % 48);
            x->labels[t] = t < 2 ? LN_IGNORE_INDEX : x->input_ids[t];
        }
        x->line = i + 1;
    }
    return d;
}

static void free_dataset(ln_dataset *d)
{
    for (int i = 0; i < d->n; i++) { free(d->ex[i].input_ids); free(d->ex[i].labels); }
    free(d->ex);
    free(d);
}

/* 6 steps of 2 × 2 examples, warmup, weight decay and clipping. */
static ln_train_opts ckpt_opts(void)
{
    ln_train_opts o = ln_train_defaults();
    o.max_steps = 6;
    o.batch_size = 2;
    o.grad_accum = 2;
    o.optim.lr = 1e-2f;
    o.optim.weight_decay = 0.01f;
    o.optim.max_grad_norm = 0.5f;
    o.warmup_ratio = 0.2;
    return o;
}

static void check_trainer(tp_case k, int R)
{
    ln_dataset *ds = make_dataset();
    ln_train_opts o = ckpt_opts();
    ln_model *m1, *mR;
    ln_adapter a1, aR;
    build_full(k, &m1, &a1);
    build_full(k, &mR, &aR);
    ln_train_result r1, rR;
    ln_err e = {{0}};
    if (ln_train(m1, &a1, ds, &o, &r1, &e)) fail_msg("1 rank: %s", e.msg);
    if (ln_tp_train(mR, &aR, ds, &o, R, &rR, &e)) fail_msg("%d ranks: %s", R, e.msg);
    assert_int_equal(r1.steps, rR.steps);
    double dl = fabs(r1.last_loss - rR.last_loss) / fabs(r1.last_loss);
    /* the trained parameters, gathered back into the whole layout */
    ln_param **p1, **pR;
    int n1 = ln_trainable_params(m1, &a1, &p1), nR = ln_trainable_params(mR, &aR, &pR);
    assert_int_equal(n1, nR);
    double worst = 0;
    for (int i = 0; i < n1; i++) {
        double err = block_err(pR[i]->w, p1[i]->rows, p1[i]->cols, p1[i]->w, p1[i]->cols, 0, 0,
                               maxabs(p1[i]->w, p1[i]->n));
        worst = err > worst ? err : worst;
    }
    printf("  trainer, case %d, %d ranks: last loss %.6f vs %.6f (%.1e), trained weights %.2e (relative)\n", k, R,
           rR.last_loss, r1.last_loss, dl, worst);
    assert_true(dl <= TOL);
    assert_true(worst <= TOL);
    free(p1);
    free(pR);
    if (!a1.full) { ln_adapter_free(&a1); ln_adapter_free(&aR); }
    ln_model_free(m1);
    ln_model_free(mR);
    free_dataset(ds);
}

/* A stop seen by rank 0's should_stop after step 3 stops every rank there (no hang); with
 * out_dir, metrics.jsonl has rank 0's rows and the gathered adapter is saved. */
typedef struct { int calls; int rows; } stop_ctx;
static int stop_after_3(void *p) { stop_ctx *c = p; return c->calls++ >= 3; }
static void count_row(json_t *row, void *p) { (void)row; ((stop_ctx *)p)->rows++; }

static void test_trainer_stop_and_out_dir(void **s)
{
    (void)s;
    ln_dataset *ds = make_dataset();
    ln_train_opts o = ln_train_defaults();
    o.max_steps = 6;
    o.batch_size = 2;
    stop_ctx sc = {0, 0};
    o.should_stop = stop_after_3;
    o.on_row = count_row;
    o.cb_ctx = &sc;
    ln_model *m;
    ln_adapter ad;
    build_full(CASE_LORA, &m, &ad);
    ln_train_result r;
    ln_err e = {{0}};
    assert_int_equal(ln_tp_train(m, &ad, ds, &o, 2, &r, &e), 0);
    assert_int_equal(r.steps, 3);
    assert_true(r.stopped);
    assert_int_equal(sc.rows, 3); /* rank 0's rows only */
    /* the whole run, into a directory */
    char dir[] = "/tmp/loranull-tp-XXXXXX";
    assert_non_null(mkdtemp(dir));
    o.should_stop = NULL;
    o.out_dir = dir;
    sc.rows = 0;
    assert_int_equal(ln_tp_train(m, &ad, ds, &o, 2, &r, &e), 0);
    assert_int_equal(r.steps, 6);
    assert_int_equal(sc.rows, 6);
    char path[256];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    int lines = 0, ch;
    while ((ch = fgetc(f)) != EOF) lines += ch == '\n';
    fclose(f);
    assert_int_equal(lines, 6);
    /* the saved adapter is the gathered one: loading it onto the base model gives ad's factors */
    ln_model *m2;
    ln_adapter back, unused;
    build_full(CASE_LORA, &m2, &unused);
    ln_adapter_free(&unused);
    snprintf(path, sizeof path, "%s/adapter.safetensors", dir);
    assert_int_equal(ln_adapter_load(m2, path, &back, &e), 0);
    for (int i = 0; i < ad.num_layers * LN_NTARGET; i++) {
        assert_memory_equal(back.lora[i].A.w, ad.lora[i].A.w, (size_t)ad.lora[i].A.n * sizeof(float));
        assert_memory_equal(back.lora[i].B.w, ad.lora[i].B.w, (size_t)ad.lora[i].B.n * sizeof(float));
    }
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
    ln_adapter_free(&back);
    ln_adapter_free(&ad);
    ln_model_free(m2);
    ln_model_free(m);
    free_dataset(ds);
}

static void test_trainer_lora_2_ranks(void **s) { (void)s; check_trainer(CASE_LORA, 2); }
static void test_trainer_null_v2_4_ranks(void **s) { (void)s; check_trainer(CASE_NULL_V2, 4); }
static void test_trainer_full_2_ranks(void **s) { (void)s; check_trainer(CASE_FULL, 2); }

/* ---- calibration: covariances of a sharded forward (rank 0) = an unsharded forward's ---- */

#define NLAYERS 2
typedef struct { ln_cov cov[NLAYERS][LN_NINPUT]; int bad; } cov_set;

/* Runs on rank 0's thread: no cmocka asserts here (they longjmp), a flag checked afterwards. */
static void collect(int layer, ln_input which, const float *X, int tokens, int d_in, void *ctx)
{
    cov_set *c = ctx;
    ln_err e = {{0}};
    if (!c->cov[layer][which].sum && ln_cov_init(&c->cov[layer][which], d_in, &e)) c->bad = 1;
    if (c->cov[layer][which].d != d_in || ln_cov_add_sample(&c->cov[layer][which], X, tokens, &e)) c->bad = 1;
}

typedef struct { ln_model *full; cov_set *covs; } calib_ctx;

static int calib_rank(ln_comm *c, void *p, ln_err *e)
{
    calib_ctx *x = p;
    ln_model *shard;
    if (ln_tp_shard_model(x->full, c, &shard, e)) return -1;
    ln_tp_hook h = {.comm = c, .inner = collect, .inner_ctx = x->covs};
    ln_fwd_opts o = {.hook = ln_tp_calibration_hook, .hook_ctx = &h, .no_logits = 1};
    ln_acts *a = ln_acts_new();
    int rc = 0;
    for (int s = 0; s < 3 && rc == 0; s++) {
        ln_batch b;
        make_batch(&b);
        b.B = 1;
        b.ids[0] = (int32_t)s; /* three different samples */
        rc = ln_model_forward(shard, NULL, a, &b, &o, NULL, e);
        if (rc == 0 && h.failed) rc = ln_errf(e, "%s", h.err.msg);
        ln_batch_free(&b);
    }
    ln_acts_free(shard, a);
    ln_tp_hook_free(&h);
    ln_model_free(shard);
    return rc;
}

static void check_calibration(int R)
{
    ln_model *m;
    ln_adapter ad;
    build_full(CASE_FULL, &m, &ad);
    cov_set *ref = calloc(1, sizeof *ref), *got = calloc(1, sizeof *got);
    calib_ctx whole = {m, ref};
    ln_err e = {{0}};
    /* 1 rank: the plain hook on the whole model */
    {
        ln_fwd_opts o = {.hook = collect, .hook_ctx = ref, .no_logits = 1};
        ln_acts *a = ln_acts_new();
        for (int s = 0; s < 3; s++) {
            ln_batch b;
            make_batch(&b);
            b.B = 1;
            b.ids[0] = (int32_t)s;
            assert_int_equal(ln_model_forward(m, NULL, a, &b, &o, NULL, &e), 0);
            ln_batch_free(&b);
        }
        ln_acts_free(m, a);
    }
    calib_ctx *ctx = calloc((size_t)R, sizeof *ctx);
    void *ptrs[8];
    for (int r = 0; r < R; r++) { ctx[r] = (calib_ctx){m, got}; ptrs[r] = &ctx[r]; }
    if (comm_thread_run(R, calib_rank, ptrs, &e)) fail_msg("%d ranks: %s", R, e.msg);
    assert_int_equal(ref->bad, 0);
    assert_int_equal(got->bad, 0);
    double worst = 0;
    for (int l = 0; l < NLAYERS; l++)
        for (int i = 0; i < LN_NINPUT; i++) {
            ln_cov *a = &got->cov[l][i], *b = &ref->cov[l][i];
            assert_non_null(a->sum);
            assert_int_equal(a->d, b->d);
            assert_int_equal(a->samples, 3);
            double mx = 0, num = 0;
            for (int64_t k = 0; k < (int64_t)a->d * a->d; k++) {
                num = fmax(num, fabs(a->sum[k] - b->sum[k]));
                mx = fmax(mx, fabs(b->sum[k]));
            }
            worst = fmax(worst, num / mx);
            ln_cov_free(a);
            ln_cov_free(b);
        }
    printf("  calibration on %d ranks: 8 covariances (4 per layer), worst relative difference %.2e\n", R, worst);
    assert_true(worst <= TOL);
    (void)whole;
    free(ref);
    free(got);
    free(ctx);
    ln_model_free(m);
}

static void test_calibration_2_ranks(void **s) { (void)s; check_calibration(2); }
static void test_calibration_4_ranks(void **s) { (void)s; check_calibration(4); }

/* ---- LoRA-Null init with the eigensolves spread over ranks = ln_adapter_init on the whole model ---- */

typedef struct { double *C[NLAYERS][LN_NINPUT]; } cov_mats;
static const double *cov_of(void *ctx, int layer, ln_input which) { return ((cov_mats *)ctx)->C[layer][which]; }

typedef struct {
    ln_model *full;
    cov_mats *cov;
    ln_model *shard;
    ln_adapter ad;
    int solves;
} init_ctx;

static int init_rank(ln_comm *c, void *p, ln_err *e)
{
    init_ctx *x = p;
    if (ln_tp_shard_model(x->full, c, &x->shard, e)) return -1;
    if (ln_adapter_alloc(x->shard, &x->ad, "lora_null_v2", 4, 4.0f, LN_TARGETS_ALL, e)) return -1;
    return ln_tp_init_lora_null(x->shard, &x->ad, cov_of, x->cov, &x->solves, e);
}

/* (B A) of one target, d_out × d_in, in double */
static double *product(const ln_lora *lo)
{
    int r = lo->A.rows, dout = lo->B.rows, din = lo->A.cols;
    double *p = calloc((size_t)dout * din, sizeof(double));
    for (int i = 0; i < dout; i++)
        for (int j = 0; j < r; j++)
            for (int k = 0; k < din; k++) p[(size_t)i * din + k] += (double)lo->B.w[i * r + j] * lo->A.w[j * din + k];
    return p;
}

/* Covariances of every layer input from calibration forwards of the whole model m. */
static void make_covs(ln_model *m, cov_mats *out)
{
    ln_err e = {{0}};
    cov_mats cm;
    cov_set *cs = calloc(1, sizeof *cs);
    ln_fwd_opts o = {.hook = collect, .hook_ctx = cs, .no_logits = 1};
    ln_acts *a = ln_acts_new();
    /* 24 samples of 10 random tokens: 240 rows > every d_in (≤ 64), so each covariance has full
     * rank and a non-degenerate bottom of its spectrum (a degenerate null space has no unique
     * basis, and LAPACK's choice inside it may differ with the thread count). */
    ln_rng rr;
    ln_rng_seed(&rr, 2024);
    for (int s = 0; s < 24; s++) {
        ln_batch b;
        make_batch(&b);
        b.B = 1;
        for (int t = 0; t < SEQ; t++) b.ids[t] = (int32_t)(ln_rng_u64(&rr) % 48);
        assert_int_equal(ln_model_forward(m, NULL, a, &b, &o, NULL, &e), 0);
        ln_batch_free(&b);
    }
    ln_acts_free(m, a);
    for (int l = 0; l < NLAYERS; l++)
        for (int i = 0; i < LN_NINPUT; i++) {
            int d = cs->cov[l][i].d;
            cm.C[l][i] = malloc((size_t)d * d * sizeof(double));
            assert_int_equal(ln_cov_finish(&cs->cov[l][i], cm.C[l][i], &e), 0);
            ln_cov_free(&cs->cov[l][i]);
        }
    free(cs);
    *out = cm;
}

static void free_covs(cov_mats *cm)
{
    for (int l = 0; l < NLAYERS; l++)
        for (int i = 0; i < LN_NINPUT; i++) free(cm->C[l][i]);
}

static void check_init(int R)
{
    ln_err e = {{0}};
    ln_model *m, *pristine;
    ln_adapter unused;
    build_full(CASE_FULL, &m, &unused);
    build_full(CASE_FULL, &pristine, &unused);
    cov_mats cm;
    make_covs(m, &cm);
    /* 1 rank: the engine's own init */
    ln_adapter ad;
    ln_adapter_opts ao = {.method = "lora_null_v2", .rank = 4, .alpha = 4.0f, .targets = LN_TARGETS_ALL,
                          .covariance = cov_of, .method_ctx = &cm};
    assert_int_equal(ln_adapter_init(m, &ad, &ao, &e), 0);
    /* R ranks */
    init_ctx *ctx = calloc((size_t)R, sizeof *ctx);
    void *ptrs[8];
    for (int r = 0; r < R; r++) { ctx[r] = (init_ctx){.full = pristine, .cov = &cm}; ptrs[r] = &ctx[r]; }
    if (comm_thread_run(R, init_rank, ptrs, &e)) fail_msg("%d ranks: %s", R, e.msg);
    double worst_p = 0, worst_w = 0;
    int solves = 0, most = 0;
    for (int r = 0; r < R; r++) {
        solves += ctx[r].solves;
        most = ctx[r].solves > most ? ctx[r].solves : most;
        for (int l = 0; l < NLAYERS; l++)
            for (int t = 0; t < LN_NTARGET; t++) {
                ln_lora *F = &ad.lora[l * LN_NTARGET + t], *S = &ctx[r].ad.lora[l * LN_NTARGET + t];
                double *pf = product(F), *ps = product(S);
                int col = ln_tp_column_parallel((ln_target)t);
                int rows = S->B.rows, cols = S->A.cols, fcols = F->A.cols;
                int r0 = col ? r * rows : 0, c0 = col ? 0 : r * cols;
                double mx = 0, num = 0;
                for (size_t q = 0; q < (size_t)F->B.rows * fcols; q++) mx = fmax(mx, fabs(pf[q]));
                for (int i = 0; i < rows; i++)
                    for (int k = 0; k < cols; k++)
                        num = fmax(num, fabs(ps[(size_t)i * cols + k] - pf[(size_t)(r0 + i) * fcols + c0 + k]));
                worst_p = fmax(worst_p, num / mx);
                const ln_param *Wf = &m->layers[l].lin[t], *Ws = &ctx[r].shard->layers[l].lin[t];
                worst_w = fmax(worst_w, block_err(Ws->w, Ws->rows, Ws->cols, Wf->w, Wf->cols, r0, c0, maxabs(Wf->w, Wf->n)));
                assert_false(ctx[r].ad.lora[l * LN_NTARGET + t].A.trainable); /* v2: A frozen */
                free(pf);
                free(ps);
            }
    }
    printf("  LoRA-Null init on %d ranks: B A %.2e, residual W0' %.2e (relative); eigensolves %d in all, at most %d on a rank\n",
           R, worst_p, worst_w, solves, most);
    assert_true(worst_p <= TOL);
    assert_true(worst_w <= TOL);
    assert_int_equal(solves, 4 * NLAYERS);          /* 4 distinct inputs per layer, each solved once */
    assert_int_equal(most, (4 * NLAYERS + R - 1) / R); /* and spread evenly */
    for (int r = 0; r < R; r++) {
        ln_adapter_free(&ctx[r].ad);
        ln_model_free(ctx[r].shard);
    }
    free(ctx);
    ln_adapter_free(&ad);
    free_covs(&cm);
    ln_model_free(m);
    ln_model_free(pristine);
}

static void test_init_2_ranks(void **s) { (void)s; check_init(2); }
static void test_init_4_ranks(void **s) { (void)s; check_init(4); }

static void test_shard_config_errors(void **s)
{
    (void)s;
    ln_config cfg, sh;
    ln_err e = {{0}};
    assert_int_equal(ln_config_parse(CONFIG, "tp-config", &cfg, &e), 0);
    assert_int_equal(ln_tp_shard_config(&cfg, 3, &sh, &e), -1);
    assert_non_null(strstr(e.msg, "num_attention_heads 8 does not divide by 3 ranks"));
    assert_int_equal(ln_tp_shard_config(&cfg, 8, &sh, &e), -1);
    assert_non_null(strstr(e.msg, "num_key_value_heads 4"));
    assert_int_equal(ln_tp_shard_config(&cfg, 4, &sh, &e), 0);
    assert_int_equal(sh.num_heads, 2);
    assert_int_equal(sh.num_kv_heads, 1);
    assert_int_equal(sh.intermediate_size, 12);
}

/* ---- sharded loading: each rank reads only its blocks of the safetensors ---- */

typedef struct { const char *dir; ln_model *whole; int mismatches; } load_ctx;

static int cmp_param(const ln_param *a, const ln_param *b)
{
    if (a->rows != b->rows || a->cols != b->cols || strcmp(a->name, b->name) != 0) return 1;
    return memcmp(a->w, b->w, (size_t)a->n * sizeof(float)) != 0;
}

static int load_rank(ln_comm *c, void *p, ln_err *e)
{
    load_ctx *x = p;
    ln_model *cut, *read;
    if (ln_tp_shard_model(x->whole, c, &cut, e)) return -1;
    if (ln_tp_load_shard(x->dir, lnb_cpu(), c, &read, e)) {
        ln_model_free(cut);
        return -1;
    }
    int bad = memcmp(&cut->cfg, &read->cfg, sizeof cut->cfg) != 0 || cut->tied != read->tied || read->comm != c;
    bad += cmp_param(&cut->embed, &read->embed) + cmp_param(&cut->norm, &read->norm);
    if (!cut->tied) bad += cmp_param(&cut->lm_head, &read->lm_head);
    for (int l = 0; l < cut->cfg.num_layers; l++) {
        bad += cmp_param(&cut->layers[l].attn_norm, &read->layers[l].attn_norm);
        bad += cmp_param(&cut->layers[l].mlp_norm, &read->layers[l].mlp_norm);
        for (int t = 0; t < LN_NTARGET; t++) bad += cmp_param(&cut->layers[l].lin[t], &read->layers[l].lin[t]);
    }
    if (bad) __atomic_add_fetch(&x->mismatches, bad, __ATOMIC_SEQ_CST);
    ln_model_free(cut);
    ln_model_free(read);
    return 0;
}

/* ln_tp_load_shard equals ln_tp_shard_model of the whole load, bit for bit, for F32 and BF16
 * files, tied and untied heads, 1, 2 and 4 ranks; a rank count that does not divide is refused
 * naming the field. */
/* A shard recomputes activations when the whole model does (train --ranks N --recompute). */
static void test_shard_keeps_recompute(void **s)
{
    (void)s;
    ln_config cfg;
    ln_err e = {{0}};
    ln_model *full, *shard;
    ln_comm *ranks[2];
    assert_int_equal(ln_config_parse(CONFIG, "tp-config", &cfg, &e), 0);
    assert_int_equal(ln_model_new_random(&cfg, lnb_cpu(), 11, &full, &e), 0);
    assert_int_equal(comm_thread_group_new(2, ranks, &e), 0);
    for (int on = 0; on <= 1; on++) {
        full->recompute = on;
        assert_int_equal(ln_tp_shard_model(full, ranks[1], &shard, &e), 0);
        assert_int_equal(shard->recompute, on);
        ln_model_free(shard);
    }
    comm_free(ranks[0]);
    comm_free(ranks[1]);
    ln_model_free(full);
}

static void test_load_shard_equals_cut(void **s)
{
    (void)s;
    static const char *configs[2] = {
        "{\"vocab_size\":48,\"hidden_size\":32,\"intermediate_size\":48,\"num_hidden_layers\":2,"
        "\"num_attention_heads\":8,\"num_key_value_heads\":4,\"head_dim\":8,\"max_position_embeddings\":64,"
        "\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"tie_word_embeddings\":false}",
        "{\"vocab_size\":48,\"hidden_size\":32,\"intermediate_size\":48,\"num_hidden_layers\":2,"
        "\"num_attention_heads\":8,\"num_key_value_heads\":4,\"head_dim\":8,\"max_position_embeddings\":64,"
        "\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"tie_word_embeddings\":true}"};
    static const int dtypes[2] = {ST_F32, ST_BF16};
    for (int ci = 0; ci < 2; ci++)
        for (int di = 0; di < 2; di++) {
            ln_config cfg;
            ln_err e = {{0}};
            ln_model *m, *whole;
            char dir[] = "/tmp/loranull-tpload-XXXXXX";
            assert_non_null(mkdtemp(dir));
            assert_int_equal(ln_config_parse(configs[ci], "tp-config", &cfg, &e), 0);
            assert_int_equal(ln_model_new_random(&cfg, lnb_cpu(), 17, &m, &e), 0);
            assert_int_equal(ln_model_save(m, dir, dtypes[di], &e), 0);
            ln_model_free(m);
            assert_int_equal(ln_model_load(dir, lnb_cpu(), &whole, &e), 0);
            for (int R = 1; R <= 4; R *= 2) {
                load_ctx x = {dir, whole, 0};
                void *ctxs[4] = {&x, &x, &x, &x};
                if (comm_thread_run(R, load_rank, ctxs, &e)) fail_msg("%d ranks: %s", R, e.msg);
                assert_int_equal(x.mismatches, 0);
            }
            ln_model *bad;
            assert_int_equal(ln_model_load_part(dir, lnb_cpu(), 0, 3, &bad, &e), -1);
            assert_null(bad);
            assert_non_null(strstr(e.msg, "num_attention_heads does not divide by 3 tensor-parallel ranks"));
            ln_model_free(whole);
            char cmd[128];
            snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
            assert_int_equal(system(cmd), 0);
        }
}

/* ---- full fine-tuning on shards: no rank holds the whole model ---- */

typedef struct {
    const char *dir, *out, *resume;
    const ln_dataset *ds;
    int64_t stop_at;
    ln_train_result res;
} full_only_ctx;

/* One rank of a full fine-tune that holds only its shard: load it, init "full" (or restore a
 * checkpoint's blocks), train; checkpoints and the final model are written from the shards. */
static int full_only_rank(ln_comm *c, void *p, ln_err *e)
{
    full_only_ctx *x = p;
    int root = c->rank == 0;
    ln_model *shard, *shape;
    if (ln_tp_load_shard(x->dir, lnb_cpu(), c, &shard, e)) return -1;
    shape = ln_tp_whole_shape(shard);
    ln_adapter sad, w;
    ln_adapter_opts ao = {.method = "full"};
    int rc = x->resume ? ln_tp_load_checkpoint(shard, shape, x->resume, &sad, root ? &w : NULL, e)
                       : ln_tp_adapter_init(shard, shape, &ao, 1, &sad, root ? &w : NULL, NULL, e);
    if (rc == 0 && (!sad.full || (root && !w.full))) rc = ln_errf(e, "the shard's adapter is not full fine-tuning");
    ln_train_opts o = ckpt_opts();
    o.max_steps = 4;
    o.save_every = 2;
    o.out_dir = x->out;
    o.resume = x->resume;
    o.stop_at_step = x->stop_at;
    if (rc == 0) rc = ln_tp_train_shard(shard, &sad, root ? shape : NULL, root ? &w : NULL, x->ds, &o, &x->res, e);
    ln_model_free(shape);
    ln_model_free(shard);
    return rc;
}

static void run_full_only(int R, const char *dir, const ln_dataset *ds, const char *out, const char *resume,
                          int64_t stop_at)
{
    ln_err e = {{0}};
    full_only_ctx x[4];
    void *ptrs[4];
    for (int r = 0; r < R; r++) {
        x[r] = (full_only_ctx){.dir = dir, .ds = ds, .out = out, .resume = resume, .stop_at = stop_at};
        ptrs[r] = &x[r];
    }
    if (comm_thread_run(R, full_only_rank, ptrs, &e)) fail_msg("full fine-tuning on %d shards: %s", R, e.msg);
}

static int same_file(const char *a, const char *b)
{
    size_t na = 0, nb = 0;
    char *x = NULL, *y = NULL;
    ln_err e = {{0}};
    int same = ln_read_file(a, &x, &na, &e) == 0 && ln_read_file(b, &y, &nb, &e) == 0 && na == nb &&
               memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* Worst relative difference (to the largest magnitude of each tensor) between two saved models. */
static double model_diff(const char *a, const char *b)
{
    ln_err e = {{0}};
    st_set *sa, *sb;
    assert_int_equal(st_open(a, &sa, &e), 0);
    assert_int_equal(st_open(b, &sb, &e), 0);
    assert_int_equal(st_count(sa), st_count(sb));
    double worst = 0;
    for (size_t i = 0; i < st_count(sa); i++) {
        const st_tensor *t = st_at(sa, i), *u = st_find(sb, t->name);
        assert_non_null(u);
        assert_int_equal(t->numel, u->numel);
        const float *p = t->data, *q = u->data;
        double mx = maxabs(q, u->numel), d = 0;
        for (int64_t k = 0; k < t->numel; k++) d = fmax(d, fabs((double)p[k] - q[k]));
        worst = fmax(worst, d / (mx > 0 ? mx : 1));
    }
    st_close(sa);
    st_close(sb);
    return worst;
}

/* The CASE_FULL model saved into dir (a mkdtemp template), for ranks to load their shards from. */
static void save_full_model(char *dir)
{
    ln_err e = {{0}};
    ln_model *m;
    ln_adapter ad;
    assert_non_null(mkdtemp(dir));
    build_full(CASE_FULL, &m, &ad);
    assert_int_equal(ln_model_save(m, dir, ST_F32, &e), 0);
    ln_model_free(m);
}

/* Full fine-tuning on R shard-only ranks (ln_tp_load_shard, ln_tp_adapter_init "full",
 * ln_tp_train_shard): the final model and checkpoints are written by rank 0 one gathered tensor at
 * a time, and
 *  - the model's bytes equal ln_model_save of the old path's gathered whole model (every rank
 *    holding the whole model, ln_tp_train) and its checkpoints' bytes that path's;
 *  - stopped after step 2 and resumed on R shards (each reading its blocks of the checkpoint):
 *    the uninterrupted run's bytes;
 *  - the R-rank checkpoint resumes on 1 rank (ln_train_load_checkpoint + ln_train) and on R' shards
 *    within TOL of the uninterrupted R-rank model. */
static void check_full_on_shards(int R, int R2)
{
    ln_err e = {{0}};
    char dir[] = "/tmp/loranull-tpfull-XXXXXX", a[160], b[160], ck[200], f1[400], f2[400], cmd[200];
    save_full_model(dir);
    ln_model *m;
    ln_adapter ad;
    ln_dataset *ds = make_dataset();
    /* the new path, uninterrupted */
    snprintf(a, sizeof a, "%s/a", dir);
    run_full_only(R, dir, ds, a, NULL, 0);
    /* the old path: every rank holds the whole model; the trained weights gathered into it */
    assert_int_equal(ln_model_load(dir, lnb_cpu(), &m, &e), 0);
    ln_adapter_opts ao = {.method = "full"};
    assert_int_equal(ln_adapter_init(m, &ad, &ao, &e), 0);
    ln_train_opts o = ckpt_opts();
    o.max_steps = 4;
    o.save_every = 2;
    snprintf(b, sizeof b, "%s/b", dir);
    o.out_dir = b;
    ln_train_result res;
    assert_int_equal(ln_tp_train(m, &ad, ds, &o, R, &res, &e), 0);
    snprintf(cmd, sizeof cmd, "%s/whole", dir);
    assert_int_equal(ln_model_save(m, cmd, ST_F32, &e), 0);
    ln_model_free(m);
    snprintf(f1, sizeof f1, "%s/model.safetensors", a);
    snprintf(f2, sizeof f2, "%s/whole/model.safetensors", dir);
    assert_true(same_file(f1, f2));
    snprintf(f2, sizeof f2, "%s/whole/config.json", dir);
    snprintf(f1, sizeof f1, "%s/config.json", a);
    assert_true(same_file(f1, f2));
    for (int st = 2; st <= 4; st += 2) {
        snprintf(f1, sizeof f1, "%s/checkpoints/step-%06d/state.safetensors", a, st);
        snprintf(f2, sizeof f2, "%s/checkpoints/step-%06d/state.safetensors", b, st);
        assert_true(same_file(f1, f2));
    }
    /* stopped after step 2, resumed on R shards: bitwise */
    char c2[160];
    snprintf(c2, sizeof c2, "%s/c", dir);
    run_full_only(R, dir, ds, c2, NULL, 2);
    snprintf(ck, sizeof ck, "%s/checkpoints/step-000002", c2);
    run_full_only(R, dir, ds, c2, ck, 0);
    snprintf(f1, sizeof f1, "%s/model.safetensors", a);
    snprintf(f2, sizeof f2, "%s/model.safetensors", c2);
    assert_true(same_file(f1, f2));
    /* R's checkpoint on 1 rank, and on R2 shards */
    snprintf(ck, sizeof ck, "%s/checkpoints/step-000002", a);
    assert_int_equal(ln_model_load(dir, lnb_cpu(), &m, &e), 0);
    assert_int_equal(ln_train_load_checkpoint(m, ck, &ad, &e), 0);
    o.out_dir = NULL;
    o.resume = ck;
    assert_int_equal(ln_train(m, &ad, ds, &o, &res, &e), 0);
    snprintf(cmd, sizeof cmd, "%s/one", dir);
    assert_int_equal(ln_model_save(m, cmd, ST_F32, &e), 0);
    ln_model_free(m);
    snprintf(f1, sizeof f1, "%s/model.safetensors", a);
    snprintf(f2, sizeof f2, "%s/one/model.safetensors", dir);
    double d1 = model_diff(f2, f1);
    snprintf(c2, sizeof c2, "%s/d", dir);
    run_full_only(R2, dir, ds, c2, ck, 0);
    snprintf(f2, sizeof f2, "%s/model.safetensors", c2);
    double d2 = model_diff(f2, f1);
    printf("  full fine-tuning on %d shard-only ranks: model and checkpoints bitwise the whole-model path's, "
           "stop+resume bitwise; resumed on 1 rank %.2e, on %d ranks %.2e\n", R, d1, R2, d2);
    assert_true(d1 <= TOL);
    assert_true(d2 <= TOL);
    free_dataset(ds);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

static void test_full_on_shards_2(void **s) { (void)s; check_full_on_shards(2, 4); }
static void test_full_on_shards_4(void **s) { (void)s; check_full_on_shards(4, 2); }

/* ---- full fine-tuning's knowledge drift on shards ---- */

typedef struct { const char *dir; cov_mats *cov; json_t *row; } full_drift_ctx;

static void scale_weights(ln_model *m)
{
    for (int l = 0; l < m->cfg.num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++)
            for (int64_t k = 0; k < m->layers[l].lin[t].n; k++) {
                float *w = &m->layers[l].lin[t].w[k];
                *w += 10.0f * *w * fabsf(*w); /* elementwise, not proportional to W: the ratio depends on C */
            }
}

static int full_drift_rank(ln_comm *c, void *p, ln_err *e)
{
    full_drift_ctx *x = p;
    ln_model *shard, *shape;
    if (ln_tp_load_shard(x->dir, lnb_cpu(), c, &shard, e)) return -1;
    shape = ln_tp_whole_shape(shard);
    ln_adapter sad, w;
    ln_adapter_opts ao = {.method = "full"};
    ln_tp_drift *d = NULL;
    int rc = ln_tp_adapter_init(shard, shape, &ao, 1, &sad, c->rank == 0 ? &w : NULL, NULL, e);
    if (rc == 0) rc = ln_tp_drift_new(shard, &sad, NULL, NULL, cov_of, x->cov, &d, e);
    scale_weights(shard); /* "trained": every element of every block moved by a function of itself */
    if (rc == 0) {
        x->row = json_object();
        rc = ln_tp_drift_measure_full(d, shard, x->row, e);
    }
    ln_tp_drift_free(d);
    ln_model_free(shape);
    ln_model_free(shard);
    return rc;
}

/* The drift of a full fine-tune on R shard-only ranks (each keeping its W0 blocks, ΔW gathered one
 * weight at a time) equals the whole model's tracker, every module, bit for bit. */
static void check_full_drift(int R)
{
    ln_err e = {{0}};
    char dir[] = "/tmp/loranull-tpfdrift-XXXXXX", cmd[128];
    save_full_model(dir);
    ln_model *m;
    ln_adapter ad;
    assert_int_equal(ln_model_load(dir, lnb_cpu(), &m, &e), 0);
    cov_mats cm;
    make_covs(m, &cm);
    ln_adapter_opts ao = {.method = "full"};
    assert_int_equal(ln_adapter_init(m, &ad, &ao, &e), 0);
    ln_drift_tracker *tr;
    assert_int_equal(ln_drift_tracker_new(m, &ad, cov_of, &cm, &tr, &e), 0);
    scale_weights(m);
    json_t *ref = json_object();
    assert_int_equal(ln_drift_tracker_measure(tr, m, &ad, ref, &e), 0);
    full_drift_ctx x[4];
    void *ptrs[4];
    for (int r = 0; r < R; r++) {
        x[r] = (full_drift_ctx){.dir = dir, .cov = &cm};
        ptrs[r] = &x[r];
    }
    if (comm_thread_run(R, full_drift_rank, ptrs, &e)) fail_msg("full drift on %d ranks: %s", R, e.msg);
    json_t *got = json_object_get(x[0].row, "knowledge_drift");
    assert_int_equal(json_object_size(got), NLAYERS * LN_NTARGET);
    assert_int_equal(json_object_size(json_object_get(ref, "knowledge_drift")), NLAYERS * LN_NTARGET);
    const char *k;
    json_t *v;
    json_object_foreach(json_object_get(ref, "knowledge_drift"), k, v) {
        assert_non_null(json_object_get(got, k));
        assert_true(json_number_value(json_object_get(got, k)) == json_number_value(v));
    }
    double mean = json_number_value(json_object_get(x[0].row, "knowledge_drift_mean"));
    printf("  full fine-tuning's drift on %d shard-only ranks: %zu modules bitwise the whole tracker's (mean %.4e)\n",
           R, json_object_size(got), mean);
    assert_true(mean == json_number_value(json_object_get(ref, "knowledge_drift_mean")));
    assert_true(mean > 0);
    for (int r = 0; r < R; r++) json_decref(x[r].row);
    json_decref(ref);
    ln_drift_tracker_free(tr);
    free_covs(&cm);
    ln_model_free(m);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

static void test_full_drift_2_ranks(void **s) { (void)s; check_full_drift(2); }
static void test_full_drift_4_ranks(void **s) { (void)s; check_full_drift(4); }

/* ---- a rank that holds only its shard: init, drift and resume without the whole model ---- */

typedef struct {
    const char *dir, *method, *ckpt;
    cov_mats *cov;
    int spread;
    const ln_model *ref;        /* the whole model the checkpoint restores onto (read-only) */
    const ln_model *init_ref;   /* the whole model after ln_adapter_init (W0', read-only) */
    double init_w;              /* worst relative W0' difference of the initialised shard */
    const ln_adapter *ref_ad;
    ln_adapter whole;           /* rank 0: the gathered init */
    int solves, ckpt_mismatch;
    double ckpt_w;              /* worst relative W0' difference of the restored shard */
    json_t *row;                /* rank 0: the drift of the perturbed adapter */
} only_ctx;

static int only_rank(ln_comm *c, void *p, ln_err *e)
{
    only_ctx *x = p;
    int root = c->rank == 0;
    ln_model *shard, *shape;
    if (ln_tp_load_shard(x->dir, lnb_cpu(), c, &shard, e)) return -1;
    shape = ln_tp_whole_shape(shard);
    ln_adapter sad, w;
    ln_adapter_opts ao = {.method = x->method, .rank = 4, .alpha = 4.0f, .targets = LN_TARGETS_ALL, .seed = 9,
                          .covariance = cov_of, .method_ctx = x->cov};
    int rc = ln_tp_adapter_init(shard, shape, &ao, x->spread, &sad, root ? &w : NULL, &x->solves, e);
    for (int l = 0; rc == 0 && x->init_ref && l < NLAYERS; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            const ln_param *a = &shard->layers[l].lin[t], *b = &x->init_ref->layers[l].lin[t];
            int col = ln_tp_column_parallel((ln_target)t);
            x->init_w = fmax(x->init_w, block_err(a->w, a->rows, a->cols, b->w, b->cols, col ? c->rank * a->rows : 0,
                                                  col ? 0 : c->rank * a->cols, maxabs(b->w, b->n)));
        }
    ln_tp_drift *d = NULL;
    if (rc == 0) rc = ln_tp_drift_new(shard, &sad, shape, root ? &w : NULL, cov_of, x->cov, &d, e);
    if (rc == 0 && root) { /* a copy of the init as it was, for the caller */
        rc = ln_adapter_alloc(shape, &x->whole, x->method, 4, 4.0f, LN_TARGETS_ALL, e);
        for (int i = 0; rc == 0 && i < w.num_layers * LN_NTARGET; i++) {
            memcpy(x->whole.lora[i].A.w, w.lora[i].A.w, (size_t)w.lora[i].A.n * sizeof(float));
            memcpy(x->whole.lora[i].B.w, w.lora[i].B.w, (size_t)w.lora[i].B.n * sizeof(float));
            rc = ln_param_set_trainable(lnb_cpu(), &x->whole.lora[i].A, w.lora[i].A.trainable, e);
        }
        x->whole.residual = w.residual;
    }
    /* a trained-looking B: every element moved by 0.01, gathered and measured on rank 0 */
    for (int i = 0; rc == 0 && i < sad.num_layers * LN_NTARGET; i++)
        for (int64_t j = 0; j < sad.lora[i].B.n; j++) sad.lora[i].B.w[j] += 0.01f;
    if (rc == 0) rc = ln_tp_gather(shard, &sad, NULL, root ? &w : NULL, e);
    if (rc == 0 && root) {
        x->row = json_object();
        rc = ln_tp_drift_measure(d, shape, &w, x->row, e);
    }
    ln_tp_drift_free(d);
    ln_adapter_free(&sad);
    if (root) ln_adapter_free(&w);
    ln_model_free(shard);
    /* resume: a checkpoint restored onto a fresh shard, against the whole restore cut */
    if (rc == 0 && x->ckpt) {
        ln_model *rs, *cut;
        ln_adapter rad, rw, cut_ad;
        rc = ln_tp_load_shard(x->dir, lnb_cpu(), c, &rs, e);
        if (rc == 0) rc = ln_tp_load_checkpoint(rs, shape, x->ckpt, &rad, root ? &rw : NULL, e);
        if (rc == 0) rc = ln_tp_shard_model(x->ref, c, &cut, e);
        if (rc == 0) rc = ln_tp_shard_adapter(x->ref, x->ref_ad, cut, &cut_ad, e);
        if (rc == 0) {
            for (int l = 0; l < NLAYERS; l++)
                for (int t = 0; t < LN_NTARGET; t++) {
                    const ln_param *a = &rs->layers[l].lin[t], *b = &cut->layers[l].lin[t];
                    x->ckpt_w = fmax(x->ckpt_w, block_err(a->w, a->rows, a->cols, b->w, b->cols, 0, 0, maxabs(b->w, b->n)));
                    const ln_lora *la = &rad.lora[l * LN_NTARGET + t], *lb = &cut_ad.lora[l * LN_NTARGET + t];
                    x->ckpt_mismatch += memcmp(la->A.w, lb->A.w, (size_t)la->A.n * sizeof(float)) != 0;
                    x->ckpt_mismatch += memcmp(la->B.w, lb->B.w, (size_t)la->B.n * sizeof(float)) != 0;
                    x->ckpt_mismatch += la->A.trainable != lb->A.trainable || rad.residual != cut_ad.residual;
                }
            ln_adapter_free(&cut_ad);
            ln_model_free(cut);
            ln_adapter_free(&rad);
            if (root) ln_adapter_free(&rw);
        }
        ln_model_free(rs);
    }
    ln_model_free(shape);
    return rc;
}

/* The worker's path for R = 2 ranks from a model directory, no rank holding the whole model:
 * init on the shards (both ways of placing the eigensolves) equals ln_adapter_init on the whole
 * model (lora bitwise; lora_null_v2's B A ≤ TOL, the two placements ≤ TOL); the drift of
 * a perturbed adapter equals the whole model's tracker (≤ 1e-5 relative); a lora_null_v2
 * checkpoint restored onto shards equals the whole restore cut (factors bitwise, W0' ≤ TOL);
 * pissa and corda (one whole weight gathered at a time) equal the whole init bitwise, factors and
 * W0' (full fine-tuning: test_full_on_shards). */
static void test_shard_only_ranks(void **s)
{
    (void)s;
    ln_err e = {{0}};
    ln_model *m;
    ln_adapter unused;
    char dir[] = "/tmp/loranull-tponly-XXXXXX", ck[128], cmd[160];
    assert_non_null(mkdtemp(dir));
    build_full(CASE_FULL, &m, &unused);
    assert_int_equal(ln_model_save(m, dir, ST_F32, &e), 0);
    ln_model_free(m);
    assert_int_equal(ln_model_load(dir, lnb_cpu(), &m, &e), 0);
    cov_mats cm;
    make_covs(m, &cm);
    ln_model_free(m);
    static const char *methods[4] = {"lora", "lora_null_v2", "pissa", "corda"};
    ln_adapter first_whole;
    for (int mi = 0; mi < 4; mi++)
        for (int spread = 1; spread >= (mi == 1 ? 0 : 1); spread--) {
            /* the whole model's init and tracker */
            ln_model *wm;
            ln_adapter ad;
            ln_drift_tracker *tr;
            ln_adapter_opts ao = {.method = methods[mi], .rank = 4, .alpha = 4.0f, .targets = LN_TARGETS_ALL,
                                  .seed = 9, .covariance = cov_of, .method_ctx = &cm};
            assert_int_equal(ln_model_load(dir, lnb_cpu(), &wm, &e), 0);
            assert_int_equal(ln_adapter_init(wm, &ad, &ao, &e), 0);
            assert_int_equal(ln_drift_tracker_new(wm, &ad, cov_of, &cm, &tr, &e), 0);
            only_ctx x[2];
            for (int r = 0; r < 2; r++)
                x[r] = (only_ctx){.dir = dir, .method = methods[mi], .cov = &cm, .spread = spread, .init_ref = wm};
            void *ptrs[2] = {&x[0], &x[1]};
            if (comm_thread_run(2, only_rank, ptrs, &e)) fail_msg("%s: %s", methods[mi], e.msg);
            double worst = 0;
            int bits = 0;
            for (int i = 0; i < NLAYERS * LN_NTARGET; i++) {
                const ln_lora *a = &x[0].whole.lora[i], *b = &ad.lora[i];
                double *pa = product(a), *pb = product(b);
                double mx = maxabs(b->B.w, b->B.n) * maxabs(b->A.w, b->A.n) * b->A.rows, num = 0;
                for (int64_t q = 0; q < (int64_t)b->B.rows * b->A.cols; q++) num = fmax(num, fabs(pa[q] - pb[q]));
                worst = fmax(worst, num / mx);
                bits += memcmp(a->A.w, b->A.w, (size_t)a->A.n * sizeof(float)) == 0 &&
                        memcmp(a->B.w, b->B.w, (size_t)a->B.n * sizeof(float)) == 0;
                assert_int_equal(a->A.trainable, b->A.trainable);
                free(pa);
                free(pb);
            }
            /* lora: the same seeded draws; pissa, corda: ln_init_layer on the same gathered weight */
            if (mi != 1) assert_int_equal(bits, NLAYERS * LN_NTARGET);
            double init_w = fmax(x[0].init_w, x[1].init_w);
            if (mi != 1) assert_true(init_w == 0.0);
            assert_true(worst <= TOL);
            assert_true(init_w <= TOL);
            assert_int_equal(x[0].whole.residual, ad.residual);
            if (mi == 1 && spread) {
                assert_int_equal(x[0].solves, 2 * NLAYERS);
                assert_int_equal(x[1].solves, 2 * NLAYERS);
                first_whole = x[0].whole;
            } else if (mi == 1) {
                assert_int_equal(x[0].solves, 4 * NLAYERS); /* every solve on rank 0 */
                assert_int_equal(x[1].solves, 0);
                /* and the same factors as spread, up to the BLAS thread count's rounding (bitwise
                 * with one thread: test_wd_run_ranks' threads vs processes) */
                for (int i = 0; i < NLAYERS * LN_NTARGET; i++) {
                    const ln_param *a = &x[0].whole.lora[i].B, *b = &first_whole.lora[i].B;
                    assert_true(block_err(a->w, a->rows, a->cols, b->w, b->cols, 0, 0, maxabs(b->w, b->n)) <= TOL);
                }
                ln_adapter_free(&first_whole);
            }
            /* the drift of the perturbed adapter against the whole tracker's */
            for (int i = 0; i < NLAYERS * LN_NTARGET; i++)
                for (int64_t j = 0; j < ad.lora[i].B.n; j++) ad.lora[i].B.w[j] += 0.01f;
            json_t *ref = json_object();
            assert_int_equal(ln_drift_tracker_measure(tr, wm, &ad, ref, &e), 0);
            double dworst = 0;
            const char *k;
            json_t *v;
            json_object_foreach(json_object_get(ref, "knowledge_drift"), k, v) {
                json_t *got = json_object_get(json_object_get(x[0].row, "knowledge_drift"), k);
                assert_non_null(got);
                dworst = fmax(dworst, fabs(json_number_value(got) - json_number_value(v)) / json_number_value(v));
            }
            assert_int_equal(json_object_size(json_object_get(ref, "knowledge_drift")),
                             json_object_size(json_object_get(x[0].row, "knowledge_drift")));
            double mean_ref = json_number_value(json_object_get(ref, "knowledge_drift_mean"));
            dworst = fmax(dworst, fabs(json_number_value(json_object_get(x[0].row, "knowledge_drift_mean")) - mean_ref) / mean_ref);
            printf("  %s on 2 shard-only ranks (solves %s): init B A %.2e, W0' %.2e from the whole model's, drift %.2e "
                   "(mean %.3e)\n", methods[mi], spread ? "spread" : "on rank 0", worst, init_w, dworst, mean_ref);
            assert_true(dworst <= 1e-5);
            json_decref(ref);
            json_decref(x[0].row);
            if (mi != 1 || !spread) ln_adapter_free(&x[0].whole);
            ln_drift_tracker_free(tr);
            ln_adapter_free(&ad);
            ln_model_free(wm);
        }
    /* resume: a lora_null_v2 checkpoint of 2 steps on the whole model, restored onto shards */
    {
        ln_model *wm, *base;
        ln_adapter ad, rad;
        ln_adapter_opts ao = {.method = "lora_null_v2", .rank = 4, .alpha = 4.0f, .targets = LN_TARGETS_ALL,
                              .covariance = cov_of, .method_ctx = &cm};
        assert_int_equal(ln_model_load(dir, lnb_cpu(), &wm, &e), 0);
        assert_int_equal(ln_adapter_init(wm, &ad, &ao, &e), 0);
        ln_dataset *ds = make_dataset();
        ln_train_opts o = ckpt_opts();
        o.max_steps = 2;
        o.save_every = 2;
        char out[160];
        snprintf(out, sizeof out, "%s/out", dir);
        o.out_dir = out;
        ln_train_result res;
        assert_int_equal(ln_train(wm, &ad, ds, &o, &res, &e), 0);
        snprintf(ck, sizeof ck, "%s/out/checkpoints/step-000002", dir);
        assert_int_equal(ln_model_load(dir, lnb_cpu(), &base, &e), 0);
        assert_int_equal(ln_train_load_checkpoint(base, ck, &rad, &e), 0);
        only_ctx x[2];
        for (int r = 0; r < 2; r++)
            x[r] = (only_ctx){.dir = dir, .method = "lora", .cov = &cm, .spread = 1, .ckpt = ck, .ref = base,
                              .ref_ad = &rad};
        void *ptrs[2] = {&x[0], &x[1]};
        if (comm_thread_run(2, only_rank, ptrs, &e)) fail_msg("resume: %s", e.msg);
        printf("  checkpoint restored onto shards: factors %s, W0' %.2e from the whole restore\n",
               x[0].ckpt_mismatch + x[1].ckpt_mismatch ? "differ" : "bitwise", fmax(x[0].ckpt_w, x[1].ckpt_w));
        assert_int_equal(x[0].ckpt_mismatch + x[1].ckpt_mismatch, 0);
        assert_true(fmax(x[0].ckpt_w, x[1].ckpt_w) <= TOL);
        for (int r = 0; r < 2; r++) json_decref(x[r].row);
        ln_adapter_free(&x[0].whole);
        free_dataset(ds);
        ln_adapter_free(&rad);
        ln_adapter_free(&ad);
        ln_model_free(base);
        ln_model_free(wm);
    }
    free_covs(&cm);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* ---- one rank per "process": ln_tp_train_rank with its own whole model, checkpoints, resume on
 * another rank count, eval at eval points, packing ---- */

/* The base model a case's checkpoint is restored onto (no adapter, no residual). */
static ln_model *base_model(tp_case k)
{
    ln_config cfg;
    ln_err e = {{0}};
    ln_model *m;
    assert_int_equal(ln_config_parse(CONFIG, "tp-config", &cfg, &e), 0);
    assert_int_equal(ln_model_new_random(&cfg, lnb_cpu(), 11, &m, &e), 0);
    return m;
}

/* Trains a case on `ranks` (1: ln_train, else ln_tp_train) from scratch or from a checkpoint, into
 * dir; *m / *ad get the trained whole model and adapter. */
static void train_case(tp_case k, int ranks, const ln_dataset *ds, ln_train_opts o, const char *resume, ln_model **m,
                       ln_adapter *ad, ln_train_result *res)
{
    ln_err e = {{0}};
    if (resume) {
        *m = base_model(k);
        if (ln_train_load_checkpoint(*m, resume, ad, &e)) fail_msg("loading %s: %s", resume, e.msg);
        o.resume = resume;
    } else {
        build_full(k, m, ad);
    }
    int rc = ranks == 1 ? ln_train(*m, ad, ds, &o, res, &e) : ln_tp_train(*m, ad, ds, &o, ranks, res, &e);
    if (rc) fail_msg("case %d, %d ranks%s: %s", k, ranks, resume ? " (resumed)" : "", e.msg);
}

/* The same run on 1 and on R ranks, the callbacks' context (the opts field at ctx_field) c1, cR. */
static void train_1_and_R(tp_case k, int R, const ln_dataset *ds, ln_train_opts o, size_t ctx_field, void *c1,
                          void *cR, ln_model **m1, ln_adapter *a1, ln_model **mR, ln_adapter *aR)
{
    ln_train_result r;
    *(void **)((char *)&o + ctx_field) = c1;
    train_case(k, 1, ds, o, NULL, m1, a1, &r);
    *(void **)((char *)&o + ctx_field) = cR;
    train_case(k, R, ds, o, NULL, mR, aR, &r);
}

static void free_case(ln_model *m, ln_adapter *ad)
{
    if (!ad->full) ln_adapter_free(ad);
    ln_model_free(m);
}

/* Worst relative difference (or −1 when not bit-identical, with bitwise) between two trained runs. */
static double trained_diff(ln_model *m1, ln_adapter *a1, ln_model *m2, ln_adapter *a2, int *same_bits)
{
    ln_param **p1, **p2;
    int n1 = ln_trainable_params(m1, a1, &p1), n2 = ln_trainable_params(m2, a2, &p2);
    assert_int_equal(n1, n2);
    double worst = 0;
    *same_bits = 1;
    for (int i = 0; i < n1; i++) {
        assert_string_equal(p1[i]->name, p2[i]->name);
        assert_int_equal(p1[i]->n, p2[i]->n);
        if (memcmp(p1[i]->w, p2[i]->w, (size_t)p1[i]->n * sizeof(float))) *same_bits = 0;
        double err = block_err(p2[i]->w, p1[i]->rows, p1[i]->cols, p1[i]->w, p1[i]->cols, 0, 0,
                               maxabs(p1[i]->w, p1[i]->n));
        worst = err > worst ? err : worst;
    }
    free(p1);
    free(p2);
    return worst;
}

static void rm_rf(const char *dir)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* Save at step 3 of 6 (a stop) on `from` ranks, resume on `to` ranks: the final adapter against an
 * uninterrupted run on `to` ranks — bit-identical when from == to, else within TOL. The stop
 * checkpoint is the one-rank format whatever `from` was. */
static void check_resume(tp_case k, int from, int to)
{
    ln_dataset *ds = make_dataset();
    char dir[] = "/tmp/loranull-tp-ckpt-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char a[300], b[300], ck[400];
    snprintf(a, sizeof a, "%s/whole", dir);
    snprintf(b, sizeof b, "%s/split", dir);
    ln_train_opts o = ckpt_opts();
    o.save_every = 2;
    ln_model *mu, *mi, *mr;
    ln_adapter au, ai, ar;
    ln_train_result ru, ri, rr;
    o.out_dir = a;
    train_case(k, to, ds, o, NULL, &mu, &au, &ru);
    o.out_dir = b;
    o.stop_at_step = 3;
    train_case(k, from, ds, o, NULL, &mi, &ai, &ri);
    assert_true(ri.stopped);
    assert_int_equal(ri.steps, 3);
    snprintf(ck, sizeof ck, "%s/checkpoints/step-000003", b);
    assert_string_equal(ri.last_checkpoint, ck);
    /* save_every 2 wrote step 2 as well, in the same format */
    snprintf(ck, sizeof ck, "%s/checkpoints/step-000002/state.safetensors", b);
    assert_true(ln_file_exists(ck));
    snprintf(ck, sizeof ck, "%s/checkpoints/step-000003", b);
    o.stop_at_step = 0;
    train_case(k, to, ds, o, ck, &mr, &ar, &rr);
    assert_int_equal(rr.steps, 6);
    assert_false(rr.stopped);
    int same;
    double d = trained_diff(mu, &au, mr, &ar, &same);
    double dl = fabs(rr.last_loss - ru.last_loss) / fabs(ru.last_loss);
    printf("  resume, case %d: saved on %d ranks, resumed on %d: trained weights %.2e, last loss %.1e (relative)%s\n",
           k, from, to, d, dl, same ? ", bit-identical" : "");
    if (from == to) {
        assert_true(same);
        assert_true(rr.last_loss == ru.last_loss);
    } else {
        assert_true(d <= TOL);
        assert_true(dl <= TOL);
    }
    /* the resumed run's final adapter file equals the uninterrupted run's when the rank count is kept */
    if (from == to && !au.full) {
        char fa[400], fb[400];
        snprintf(fa, sizeof fa, "%s/adapter.safetensors", a);
        snprintf(fb, sizeof fb, "%s/adapter.safetensors", b);
        char *x, *y;
        size_t nx, ny;
        ln_err e = {{0}};
        assert_int_equal(ln_read_file(fa, &x, &nx, &e), 0);
        assert_int_equal(ln_read_file(fb, &y, &ny, &e), 0);
        assert_int_equal(nx, ny);
        assert_memory_equal(x, y, nx);
        free(x);
        free(y);
    }
    free_case(mu, &au);
    free_case(mi, &ai);
    free_case(mr, &ar);
    rm_rf(dir);
    free_dataset(ds);
}

static void test_resume_lora_2_to_2(void **s) { (void)s; check_resume(CASE_LORA, 2, 2); }
static void test_resume_null_v2_4_to_4(void **s) { (void)s; check_resume(CASE_NULL_V2, 4, 4); }
static void test_resume_full_2_to_2(void **s) { (void)s; check_resume(CASE_FULL, 2, 2); }
static void test_resume_lora_2_to_1(void **s) { (void)s; check_resume(CASE_LORA, 2, 1); }
static void test_resume_null_v2_1_to_2(void **s) { (void)s; check_resume(CASE_NULL_V2, 1, 2); }
static void test_resume_lora_4_to_2(void **s) { (void)s; check_resume(CASE_LORA, 4, 2); }
static void test_resume_full_1_to_4(void **s) { (void)s; check_resume(CASE_FULL, 1, 4); }

/* Each rank as its own "process": its own whole model and adapter, built the same way, and the
 * thread comm standing in for the network. */
typedef struct {
    tp_case k;
    const ln_dataset *ds;
    ln_train_opts o;
    ln_model *m;
    ln_adapter ad;
    ln_train_result res;
    int rows;
    float nudge;              /* added to the first A factor before training: a rank that disagrees */
} proc_ctx;

static void proc_row(json_t *row, void *p) { (void)row; ((proc_ctx *)p)->rows++; }

/* No cmocka asserts on these threads (they longjmp): build_full's asserts hold for this config. */
static int proc_rank(ln_comm *c, void *p, ln_err *e)
{
    proc_ctx *x = p;
    if (x->nudge != 0.0f) x->ad.lora[0].A.w[0] += x->nudge;
    x->o.on_row = proc_row;
    x->o.cb_ctx = x;
    return ln_tp_train_rank(c, x->m, &x->ad, x->ds, &x->o, &x->res, e);
}

/* Every rank fails before training, the message naming the last rank and what differs. */
static void expect_disagreement(proc_ctx *px, int R, void **ptrs, const char *what)
{
    ln_err e = {{0}};
    assert_int_equal(comm_thread_run(R, proc_rank, ptrs, &e), -1);
    printf("  a rank that disagrees: %s\n", e.msg);
    char want[96];
    snprintf(want, sizeof want, "rank %d's %s", R - 1, what);
    assert_non_null(strstr(e.msg, want));
    for (int r = 0; r < R; r++) assert_int_equal(px[r].rows, 0);
}

static void check_processes(tp_case k, int R)
{
    ln_dataset *ds = make_dataset();
    ln_train_opts o = ckpt_opts();
    ln_model *mt;
    ln_adapter at;
    ln_train_result rt;
    train_case(k, R, ds, o, NULL, &mt, &at, &rt); /* the same run on threads sharing one model */
    proc_ctx *px = calloc((size_t)R, sizeof *px);
    void *ptrs[4];
    for (int r = 0; r < R; r++) {
        px[r] = (proc_ctx){.k = k, .ds = ds, .o = o};
        build_full(k, &px[r].m, &px[r].ad);
        ptrs[r] = &px[r];
    }
    ln_err e = {{0}};
    if (comm_thread_run(R, proc_rank, ptrs, &e)) fail_msg("%d processes: %s", R, e.msg);
    int same;
    double d = trained_diff(mt, &at, px[0].m, &px[0].ad, &same);
    printf("  case %d, %d ranks each with its own model: rank 0's gathered adapter %s the threads' run (%.1e); "
           "rows: rank 0 %d, rank 1 %d\n", k, R, same ? "bit-identical to" : "differs from", d, px[0].rows, px[1].rows);
    assert_true(same);
    assert_int_equal(px[0].res.steps, 6);
    assert_int_equal(px[1].res.steps, 6);
    assert_int_equal(px[0].rows, 6); /* rank 0 reports */
    assert_int_equal(px[1].rows, 0);
    /* rank 1's own copy is not written: it still holds the untrained adapter */
    ln_model *m0;
    ln_adapter a0;
    build_full(k, &m0, &a0);
    (void)trained_diff(m0, &a0, px[1].m, &px[1].ad, &same);
    assert_true(same);
    free_case(m0, &a0);
    /* a rank whose adapter differs: every rank fails, naming it, instead of training apart */
    for (int r = 0; r < R; r++) {
        free_case(px[r].m, &px[r].ad);
        px[r] = (proc_ctx){.k = k, .ds = ds, .o = o, .nudge = r == R - 1 ? 1e-3f : 0.0f};
        build_full(k, &px[r].m, &px[r].ad);
    }
    if (k != CASE_FULL) expect_disagreement(px, R, ptrs, "initialised adapter");
    /* … whose options or data differ */
    ln_dataset *other = make_dataset();
    other->ex[5].input_ids[1] ^= 1;
    for (int r = 0; r < R; r++) px[r].nudge = 0.0f;
    px[R - 1].o.save_every = 2;
    expect_disagreement(px, R, ptrs, "training options");
    px[R - 1].o.save_every = 0;
    px[R - 1].ds = other;
    expect_disagreement(px, R, ptrs, "training data");
    free_dataset(other);
    for (int r = 0; r < R; r++) free_case(px[r].m, &px[r].ad);
    free(px);
    free_case(mt, &at);
    free_dataset(ds);
}

static void test_processes_lora_2(void **s) { (void)s; check_processes(CASE_LORA, 2); }
static void test_processes_null_v2_4(void **s) { (void)s; check_processes(CASE_NULL_V2, 4); }
static void test_processes_full_2(void **s) { (void)s; check_processes(CASE_FULL, 2); }

/* The eval callback: what it saw at each eval point (copies of every trainable tensor). */
#define MAX_EVALS 8
typedef struct {
    int n, whole, fail_at;
    int64_t steps[MAX_EVALS];
    float *w[MAX_EVALS];
    int64_t len;
} eval_seen;

static int record_eval(ln_model *m, ln_adapter *ad, int64_t step, json_t *row, void *ctx, ln_err *e)
{
    eval_seen *s = ctx;
    if (s->fail_at == step) return ln_errf(e, "the evaluation at step %lld failed on purpose", (long long)step);
    s->whole &= m->comm == NULL; /* the whole model, not a shard */
    ln_param **ps;
    int n = ln_trainable_params(m, ad, &ps);
    int64_t len = 0;
    for (int i = 0; i < n; i++) len += ps[i]->n;
    float *w = malloc((size_t)len * sizeof(float)), *q = w;
    for (int i = 0; i < n; i++) {
        memcpy(q, ps[i]->w, (size_t)ps[i]->n * sizeof(float));
        q += ps[i]->n;
    }
    free(ps);
    if (s->n < MAX_EVALS) {
        s->steps[s->n] = step;
        s->w[s->n++] = w;
        s->len = len;
    } else {
        free(w);
    }
    json_object_set_new(row, "seen", json_integer(step));
    return 0;
}

static void check_eval(tp_case k, int R)
{
    ln_dataset *ds = make_dataset();
    ln_train_opts o = ckpt_opts();
    o.eval = record_eval;
    o.eval_every = 2;
    eval_seen s1 = {.whole = 1, .fail_at = -1}, sR = {.whole = 1, .fail_at = -1};
    ln_model *m1, *mR;
    ln_adapter a1, aR;
    ln_train_result rR;
    train_1_and_R(k, R, ds, o, offsetof(ln_train_opts, eval_ctx), &s1, &sR, &m1, &a1, &mR, &aR);
    assert_int_equal(s1.n, 3);
    assert_int_equal(sR.n, 3);
    assert_true(sR.whole);
    double worst = 0;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(sR.steps[i], 2 * (i + 1));
        assert_int_equal(sR.len, s1.len);
        double scale = maxabs(s1.w[i], s1.len);
        for (int64_t j = 0; j < s1.len; j++) {
            double d = fabs((double)sR.w[i][j] - s1.w[i][j]) / scale;
            worst = d > worst ? d : worst;
        }
        free(s1.w[i]);
        free(sR.w[i]);
    }
    printf("  eval, case %d, %d ranks: the callback saw the whole model and the gathered adapter at steps 2, 4, 6, "
           "%.2e from 1 rank's (relative)\n", k, R, worst);
    assert_true(worst <= TOL);
    free_case(m1, &a1);
    free_case(mR, &aR);
    /* an evaluation that fails on rank 0 fails every rank, with its message (no hang) */
    eval_seen sf = {.whole = 1, .fail_at = 4};
    o.eval_ctx = &sf;
    build_full(k, &mR, &aR);
    ln_err e = {{0}};
    assert_int_equal(ln_tp_train(mR, &aR, ds, &o, R, &rR, &e), -1);
    assert_non_null(strstr(e.msg, "failed on purpose"));
    assert_int_equal(sf.n, 1);
    free(sf.w[0]);
    free_case(mR, &aR);
    free_dataset(ds);
}

static void test_eval_lora_2_ranks(void **s) { (void)s; check_eval(CASE_LORA, 2); }
static void test_eval_null_v2_4_ranks(void **s) { (void)s; check_eval(CASE_NULL_V2, 4); }

/* Packed rows (pack > 0): every step's loss and the trained adapter as on 1 rank. */
typedef struct { int n; double loss[16]; } loss_log;
static void log_loss(json_t *row, void *p)
{
    loss_log *l = p;
    if (l->n < 16) l->loss[l->n++] = json_number_value(json_object_get(row, "loss"));
}

static void check_pack(tp_case k, int R)
{
    ln_dataset *ds = make_dataset();
    ln_train_opts o = ckpt_opts();
    o.pack = 16;
    o.on_row = log_loss;
    loss_log l1 = {0}, lR = {0};
    ln_model *m1, *mR;
    ln_adapter a1, aR;
    train_1_and_R(k, R, ds, o, offsetof(ln_train_opts, cb_ctx), &l1, &lR, &m1, &a1, &mR, &aR);
    assert_int_equal(l1.n, 6);
    assert_int_equal(lR.n, 6);
    double worst = 0;
    for (int i = 0; i < 6; i++) {
        double d = fabs(lR.loss[i] - l1.loss[i]) / fabs(l1.loss[i]);
        worst = d > worst ? d : worst;
    }
    int same;
    double dw = trained_diff(m1, &a1, mR, &aR, &same);
    printf("  pack 16, case %d, %d ranks: losses %.1e, trained weights %.2e from 1 rank's (relative)\n", k, R, worst,
           dw);
    assert_true(worst <= TOL);
    assert_true(dw <= TOL);
    free_case(m1, &a1);
    free_case(mR, &aR);
    free_dataset(ds);
}

static void test_pack_lora_2_ranks(void **s) { (void)s; check_pack(CASE_LORA, 2); }
static void test_pack_full_4_ranks(void **s) { (void)s; check_pack(CASE_FULL, 4); }

/* A rank whose block is too big to allocate fails with a clear out-of-memory sentence naming the
 * tensor, and aborts the group: the other rank's gather fails instead of waiting for it. (Not under
 * ASan, whose allocator aborts on a request this size instead of returning NULL.) */
static int oom_rank(ln_comm *c, void *p, ln_err *e)
{
    float small[4] = {1, 2, 3, 4}, whole[8];
    ln_param q = {.name = "layers.0.mlp.up_proj.weight", .w = small, .n = 4, .rows = 2, .cols = 2, .ndim = 2};
    if (c->rank == 0) { /* 2^20 × 2^20 floats: 4 TiB */
        q.rows = q.cols = 1 << 20;
        q.n = (int64_t)q.rows * q.cols;
    }
    (void)p;
    return ln_tp_gather_tensor(c, lnb_cpu(), &q, LN_TP_ROWS, q.w, c->rank == 0 ? NULL : whole, e);
}

static void test_gather_out_of_memory_fails_every_rank(void **s)
{
    (void)s;
    if (LN_UNDER_ASAN) skip(); /* ASan's allocator aborts on a 4 TiB request instead of failing it */
    void *ptrs[2] = {NULL, NULL};
    ln_err e = {{0}};
    assert_int_equal(comm_thread_run(2, oom_rank, ptrs, &e), -1);
    printf("  %s\n", e.msg);
    assert_non_null(strstr(e.msg, "out of memory"));
    assert_non_null(strstr(e.msg, "layers.0.mlp.up_proj.weight"));
}

/* ---- a collective eval (ln_train_opts.eval_collective: the worker's shard-only path) ---- */

typedef struct {
    const ln_dataset *vds;
    int fail_rank;            /* −1: none */
    int64_t fail_step;
    int fail_after;           /* fail after the eval's collectives (the others wait at the barrier) */
    int on_shard[4];          /* calls per rank with a shard of more than one rank (each its own slot) */
} coll_eval;

/* Every rank: the validation loss of this rank's shard (ln_eval_loss: collective forwards). */
static int shard_val_loss(ln_model *m, ln_adapter *ad, int64_t step, json_t *row, void *ctx, ln_err *e)
{
    coll_eval *x = ctx;
    int rank = m->comm ? m->comm->rank : 0, fail = rank == x->fail_rank && step == x->fail_step;
    x->on_shard[rank] += m->comm && m->comm->size > 1;
    if (fail && !x->fail_after) return ln_errf(e, "rank %d's evaluation at step %lld failed on purpose", rank, (long long)step);
    double loss;
    if (ln_eval_loss(m, ad, x->vds, 2, &loss, e)) return -1;
    if (fail) return ln_errf(e, "rank %d's evaluation at step %lld failed on purpose", rank, (long long)step);
    json_object_set_new(row, "val_loss", json_real(loss));
    return 0;
}

typedef struct {
    ln_model *m;
    ln_adapter ad;
    const ln_dataset *ds;
    ln_train_opts o;
    ln_train_result res;
    ln_err err;
} coll_rank;

static int coll_rank_main(ln_comm *c, void *p, ln_err *e)
{
    coll_rank *x = p;
    int rc = ln_tp_train_rank(c, x->m, &x->ad, x->ds, &x->o, &x->res, e);
    if (rc) x->err = *e;
    return rc;
}

/* The rows of dir/metrics.jsonl (at most 16): *n rows, each a new object (json_decref). */
static void read_rows(const char *dir, json_t **rows, int *n)
{
    char path[256], line[4096];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    *n = 0;
    while (*n < 16 && fgets(line, sizeof line, f)) {
        json_error_t je;
        rows[*n] = json_loads(line, 0, &je);
        assert_non_null(rows[*n]);
        (*n)++;
    }
    fclose(f);
}

/* R thread ranks, each with its own whole model, training with a collective eval into dir. */
static int train_coll(tp_case k, int R, const ln_dataset *ds, ln_train_opts o, const char *dir, coll_rank *cr)
{
    void *ptrs[4];
    o.out_dir = dir;
    for (int r = 0; r < R; r++) {
        cr[r] = (coll_rank){.ds = ds, .o = o};
        build_full(k, &cr[r].m, &cr[r].ad);
        ptrs[r] = &cr[r];
    }
    ln_err e = {{0}};
    return comm_thread_run(R, coll_rank_main, ptrs, &e);
}

/* Rank 0's metrics.jsonl carries the eval fields of a collective eval at every eval point (steps
 * 2, 4, 6), as one rank's does (val_loss ≤ TOL from 1 rank's), and none elsewhere. An evaluation
 * failing on one rank — before its collectives (the others wait inside them) or after (the others
 * wait at the barrier) — fails every rank at that step's eval point, no hang, and rank 0 writes no
 * row for that step. */
static void test_collective_eval_rows_in_metrics(void **s)
{
    (void)s;
    enum { R = 2 };
    ln_dataset *ds = make_dataset();
    coll_eval ce = {.vds = ds, .fail_rank = -1};
    ln_train_opts o = ckpt_opts();
    o.eval = shard_val_loss;
    o.eval_ctx = &ce;
    o.eval_every = 2;
    o.eval_collective = 1; /* (ignored on one rank) */
    char d1[] = "/tmp/loranull-tpce1-XXXXXX", dR[] = "/tmp/loranull-tpceR-XXXXXX", cmd[160];
    assert_non_null(mkdtemp(d1));
    assert_non_null(mkdtemp(dR));
    ln_model *m1;
    ln_adapter a1;
    build_full(CASE_LORA, &m1, &a1);
    ln_train_opts o1 = o;
    o1.out_dir = d1;
    ln_train_result r1;
    ln_err e = {{0}};
    if (ln_train(m1, &a1, ds, &o1, &r1, &e)) fail_msg("1 rank: %s", e.msg);
    free_case(m1, &a1);
    coll_rank cr[R];
    if (train_coll(CASE_LORA, R, ds, o, dR, cr)) fail_msg("%d ranks: %s / %s", R, cr[0].err.msg, cr[1].err.msg);
    for (int r = 0; r < R; r++) assert_int_equal(ce.on_shard[r], 3); /* every rank, on its shard, steps 2, 4, 6 */
    json_t *rows1[16], *rowsR[16];
    int n1, nR;
    read_rows(d1, rows1, &n1);
    read_rows(dR, rowsR, &nR);
    assert_int_equal(n1, 6);
    assert_int_equal(nR, 6);
    double worst = 0;
    for (int i = 0; i < 6; i++) {
        assert_int_equal(json_integer_value(json_object_get(rowsR[i], "step")), i + 1);
        json_t *v1 = json_object_get(rows1[i], "val_loss"), *vR = json_object_get(rowsR[i], "val_loss");
        assert_true((v1 != NULL) == ((i + 1) % 2 == 0));
        assert_true((vR != NULL) == (v1 != NULL));
        if (v1) {
            double d = fabs(json_number_value(vR) - json_number_value(v1)) / fabs(json_number_value(v1));
            worst = d > worst ? d : worst;
        }
        json_decref(rows1[i]);
        json_decref(rowsR[i]);
    }
    printf("  collective eval, %d ranks: rank 0's metrics.jsonl has val_loss at steps 2, 4, 6, %.1e from 1 rank's "
           "(relative)\n", R, worst);
    assert_true(worst <= TOL);
    for (int r = 0; r < R; r++) free_case(cr[r].m, &cr[r].ad);
    /* failures at step 4: rank 1 before its forward, rank 0 after it */
    for (int c = 0; c < 2; c++) {
        ce = (coll_eval){.vds = ds, .fail_rank = c ? 0 : 1, .fail_step = 4, .fail_after = c};
        assert_int_equal(train_coll(CASE_LORA, R, ds, o, dR, cr), -1);
        for (int r = 0; r < R; r++) {
            printf("  eval failing on rank %d (%s its collectives): rank %d: %s\n", ce.fail_rank,
                   c ? "after" : "before", r, cr[r].err.msg);
            assert_non_null(strstr(cr[r].err.msg, "train step 4: evaluation"));
            if (r == ce.fail_rank) assert_non_null(strstr(cr[r].err.msg, "failed on purpose"));
            else assert_non_null(strstr(cr[r].err.msg, "aborted"));
            free_case(cr[r].m, &cr[r].ad);
        }
        read_rows(dR, rowsR, &nR);
        assert_int_equal(nR, 3); /* steps 1-3; the failed step 4 has no row */
        assert_non_null(json_object_get(rowsR[1], "val_loss"));
        for (int i = 0; i < nR; i++) json_decref(rowsR[i]);
    }
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", d1, dR);
    assert_int_equal(system(cmd), 0);
    free_dataset(ds);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shard_config_errors), cmocka_unit_test(test_shard_keeps_recompute),
        cmocka_unit_test(test_load_shard_equals_cut),
        cmocka_unit_test(test_shard_only_ranks), cmocka_unit_test(test_full_on_shards_2),
        cmocka_unit_test(test_full_on_shards_4), cmocka_unit_test(test_full_drift_2_ranks),
        cmocka_unit_test(test_full_drift_4_ranks),
        cmocka_unit_test(test_lora_2_ranks),   cmocka_unit_test(test_lora_4_ranks),
        cmocka_unit_test(test_null_v2_2_ranks), cmocka_unit_test(test_null_v2_4_ranks),
        cmocka_unit_test(test_full_2_ranks),   cmocka_unit_test(test_full_4_ranks),
        cmocka_unit_test(test_trainer_lora_2_ranks), cmocka_unit_test(test_trainer_null_v2_4_ranks),
        cmocka_unit_test(test_trainer_full_2_ranks), cmocka_unit_test(test_trainer_stop_and_out_dir),
        cmocka_unit_test(test_calibration_2_ranks), cmocka_unit_test(test_calibration_4_ranks),
        cmocka_unit_test(test_init_2_ranks), cmocka_unit_test(test_init_4_ranks),
        cmocka_unit_test(test_processes_lora_2), cmocka_unit_test(test_processes_null_v2_4),
        cmocka_unit_test(test_processes_full_2),
        cmocka_unit_test(test_resume_lora_2_to_2), cmocka_unit_test(test_resume_null_v2_4_to_4),
        cmocka_unit_test(test_resume_full_2_to_2), cmocka_unit_test(test_resume_lora_2_to_1),
        cmocka_unit_test(test_resume_null_v2_1_to_2), cmocka_unit_test(test_resume_lora_4_to_2),
        cmocka_unit_test(test_resume_full_1_to_4),
        cmocka_unit_test(test_eval_lora_2_ranks), cmocka_unit_test(test_eval_null_v2_4_ranks),
        cmocka_unit_test(test_pack_lora_2_ranks), cmocka_unit_test(test_pack_full_4_ranks),
        cmocka_unit_test(test_gather_out_of_memory_fails_every_rank),
        cmocka_unit_test(test_collective_eval_rows_in_metrics),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
