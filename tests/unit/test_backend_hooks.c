/* The engine through a backend's optional hooks (backend.h: check, freeze, thaw), without a GPU.
 *
 * The test table is the CPU table plus: freeze, which keeps an exact copy of the weight that the
 * table's matmul then reads instead of the weight (as the CUDA backend reads its bf16 copy) and
 * counts the weights and their pointers; thaw, which drops the copy after comparing it with the
 * weight (a weight changed while frozen would have been multiplied stale; a weight freed before
 * its thaw is a use-after-free in the ASan build); and check, which reports an injected kernel
 * failure once, like the CUDA backend's kept first error. Asserted:
 *  (a) ln_train freezes exactly the frozen weights a GEMM reads: every layer's seven linears and
 *      lm_head (targeted or not), for lora, lora_null_v2 and pissa — the residual methods' after
 *      their init rewrote W0 — and nothing for full fine-tuning;
 *  (b) everything frozen is thawed before it changes (full training's trainable flags) or is freed,
 *      and ln_train leaves a caller's freeze to the caller;
 *  (c) a check failure at step k fails ln_train with "hooktest device error at train step k" and
 *      no checkpoint of a step ≥ k nor a final adapter is written (the failure in a training step
 *      or in an evaluation);
 *  (d) the losses and trained factors are the CPU table's, bit for bit (the copies are exact);
 *  and a 2-rank tensor-parallel run: each rank freezes its shard's 15 weights, the same bits as the
 *  CPU table's 2-rank run, and a failure on a rank fails the run with no later checkpoint. */
#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/util.h"
#include "worker/engine/adapter.h"
#include "worker/engine/tensor_parallel.h"
#include "worker/engine/train.h"

#include "common/safetensors.h"
#include "worker/daemon/wd_run.h" /* after the engine's headers (see wd_run.c) */

static char tmpdir[256];
static ln_config g_cfg;   /* 2 layers, 4 heads over 2 kv heads, hidden 16, intermediate 24, vocab 40 */
static char g_data[300]; /* six examples of 6 to 11 tokens */

/* ================================================================ the test table */

#define MAX_FROZEN 256

typedef struct {
    const float *w;
    int64_t n;
    float *copy;  /* NULL once thawed */
    uint64_t sum; /* the weight's bytes when frozen */
} frozen_entry;

static struct {
    pthread_mutex_t mu;
    frozen_entry e[MAX_FROZEN];
    int n;                    /* entries ever made */
    int freezes, thaws, stale; /* stale: a frozen weight whose bytes differed from its copy */
    int fault_armed, fault;   /* the next matmul fails (kept until a check) */
    int64_t matmuls, fault_at; /* fault_at > 0: the matmul of that number fails */
} H = {.mu = PTHREAD_MUTEX_INITIALIZER};

static uint64_t hash_floats(const float *w, int64_t n)
{
    uint64_t h = 1469598103934665603ull;
    const unsigned char *b = (const unsigned char *)w;
    for (int64_t i = 0; i < n * (int64_t)sizeof(float); i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

static void hooks_reset(void)
{
    pthread_mutex_lock(&H.mu);
    for (int i = 0; i < H.n; i++) free(H.e[i].copy);
    memset(H.e, 0, sizeof H.e);
    H.n = H.freezes = H.thaws = H.stale = H.fault_armed = H.fault = 0;
    H.matmuls = H.fault_at = 0;
    pthread_mutex_unlock(&H.mu);
}

/* The live entry of w (the mutex held), or NULL. */
static frozen_entry *live_of(const float *w)
{
    for (int i = 0; i < H.n; i++)
        if (H.e[i].w == w && H.e[i].copy) return &H.e[i];
    return NULL;
}

static int64_t t_freeze(const float *w, int64_t n, ln_err *e)
{
    pthread_mutex_lock(&H.mu);
    int64_t rc = (int64_t)(n * sizeof(float));
    if (!live_of(w)) {
        if (H.n == MAX_FROZEN) {
            pthread_mutex_unlock(&H.mu);
            return ln_errf(e, "hooktest: more than %d frozen weights", MAX_FROZEN);
        }
        frozen_entry *f = &H.e[H.n++];
        f->w = w;
        f->n = n;
        f->copy = ln_xmalloc((size_t)n * sizeof(float));
        memcpy(f->copy, w, (size_t)n * sizeof(float));
        f->sum = hash_floats(w, n);
        H.freezes++;
    }
    pthread_mutex_unlock(&H.mu);
    return rc;
}

static void t_thaw(const float *w)
{
    pthread_mutex_lock(&H.mu);
    frozen_entry *f = live_of(w);
    if (f) {
        if (memcmp(f->copy, w, (size_t)f->n * sizeof(float)) != 0) H.stale++; /* reads w: not freed yet */
        free(f->copy);
        f->copy = NULL;
        H.thaws++;
    }
    pthread_mutex_unlock(&H.mu);
}

static int t_check(ln_err *e)
{
    pthread_mutex_lock(&H.mu);
    int f = H.fault;
    H.fault = 0;
    pthread_mutex_unlock(&H.mu);
    return f ? ln_errf(e, "hooktest backend: sgemm failed: injected kernel fault") : 0;
}

/* An operand the GEMM reads: the frozen copy when there is one (checked against the weight). */
static const float *operand(const float *p)
{
    frozen_entry *f = live_of(p);
    if (!f) return p;
    if (memcmp(f->copy, p, (size_t)f->n * sizeof(float)) != 0) H.stale++;
    return f->copy;
}

static void t_matmul(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                     int ldb, float beta, float *C, int ldc)
{
    pthread_mutex_lock(&H.mu);
    const float *a = operand(A), *b = operand(B);
    H.matmuls++;
    if (H.fault_armed || H.matmuls == H.fault_at) {
        H.fault_armed = 0;
        H.fault = 1;
    }
    pthread_mutex_unlock(&H.mu);
    lnb_cpu()->matmul(tA, tB, M, N, K, alpha, a, lda, b, ldb, beta, C, ldc);
}

static lnb_backend g_table;

static const lnb_backend *hook_table(void)
{
    g_table = *lnb_cpu();
    g_table.name = "hooktest";
    g_table.matmul = t_matmul;
    g_table.check = t_check;
    g_table.freeze = t_freeze;
    g_table.thaw = t_thaw;
    g_table.frozen_form = "fp32-copy";
    return &g_table;
}

static void arm_fault(void)
{
    pthread_mutex_lock(&H.mu);
    H.fault_armed = 1;
    pthread_mutex_unlock(&H.mu);
}

/* ================================================================ model, data, adapters */

/* A training job: the model on a table, an adapter, the data. */
typedef struct {
    ln_model *m;
    ln_adapter ad;
    ln_dataset *ds;
} job;

/* Covariances for lora_null_v2: XᵀX/n of a fixed random X per input width (SPD). */
static double g_cov[LN_NINPUT][24 * 24];
static const double *cov_of(void *ctx, int layer, ln_input which)
{
    (void)ctx;
    (void)layer;
    return g_cov[which];
}
static void make_covariances(void)
{
    const int widths[LN_NINPUT] = {16, 16, 16, 24}; /* q,k,v / o / gate,up / down inputs */
    uint64_t s = 99;
    for (int i = 0; i < LN_NINPUT; i++) {
        int d = widths[i], n = 64;
        double *X = ln_xmalloc((size_t)n * d * sizeof(double));
        for (int k = 0; k < n * d; k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            X[k] = (double)(s >> 11) / 9007199254740992.0 - 0.5;
        }
        for (int a = 0; a < d; a++)
            for (int b = 0; b < d; b++) {
                double acc = 0;
                for (int k = 0; k < n; k++) acc += X[k * d + a] * X[k * d + b];
                g_cov[i][a * d + b] = acc / n;
            }
        free(X);
    }
}

/* A fresh seeded model on `be` with method's adapter (targets 0 = all seven), and the data. */
static job job_new(const lnb_backend *be, const char *method, unsigned targets)
{
    job j;
    ln_err e = {{0}};
    assert_int_equal(ln_model_new_random(&g_cfg, be, 5, &j.m, &e), 0);
    ln_adapter_opts ao = {.method = method, .rank = 2, .seed = 3, .targets = targets, .covariance = cov_of};
    if (ln_adapter_init(j.m, &j.ad, &ao, &e)) fail_msg("%s init: %s", method, e.msg);
    ln_data_opts d = {0};
    assert_int_equal(ln_dataset_load(g_data, NULL, &d, &j.ds, &e), 0);
    return j;
}

static void job_free(job *j)
{
    ln_dataset_free(j->ds);
    ln_adapter_free(&j->ad);
    ln_model_free(j->m);
}

/* ln_train, or ln_tp_train over `ranks` threads. */
static int job_train(job *j, const ln_train_opts *o, int ranks, ln_train_result *r, ln_err *e)
{
    return ranks == 1 ? ln_train(j->m, &j->ad, j->ds, o, r, e) : ln_tp_train(j->m, &j->ad, j->ds, o, ranks, r, e);
}

static ln_train_opts train_opts(int steps, const char *out)
{
    ln_train_opts o = ln_train_defaults();
    o.max_steps = steps;
    o.batch_size = 2;
    o.optim.lr = 1e-2f;
    o.out_dir = out;
    return o;
}

/* The GEMM weights of m: layers' linears, lm_head (what ln_model_freeze_frozen covers). */
static int gemm_weights(const ln_model *m, const float **w)
{
    int n = 0;
    for (int l = 0; l < m->cfg.num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) w[n++] = m->layers[l].lin[t].w;
    w[n++] = m->lm_head.w;
    return n;
}

/* Every entry ever frozen is one of want[0..n) and each of those was frozen once. */
static void assert_frozen_set(const float *const *want, int n)
{
    assert_int_equal(H.n, n);
    for (int i = 0; i < n; i++) {
        int hits = 0;
        for (int k = 0; k < H.n; k++) hits += H.e[k].w == want[i];
        if (hits != 1) fail_msg("weight %d was frozen %d times (expected once)", i, hits);
    }
}

static uint64_t entry_sum(const float *w)
{
    for (int k = 0; k < H.n; k++)
        if (H.e[k].w == w) return H.e[k].sum;
    fail_msg("weight %p was never frozen", (const void *)w);
    return 0;
}

/* ================================================================ (a) what is frozen, and when */

static void freezes_exactly_the_frozen_weights(const char *method, unsigned targets, int residual)
{
    hooks_reset();
    ln_err e = {{0}};
    /* W0 before the init: a residual method's freeze must see the rewritten one */
    ln_model *m0;
    assert_int_equal(ln_model_new_random(&g_cfg, lnb_cpu(), 5, &m0, &e), 0);
    uint64_t before = hash_floats(m0->layers[0].lin[LN_Q].w, m0->layers[0].lin[LN_Q].n);
    ln_model_free(m0);

    job j = job_new(hook_table(), method, targets);
    const ln_param *q = &j.m->layers[0].lin[LN_Q];
    uint64_t after_init = hash_floats(q->w, q->n);
    assert_true(residual ? after_init != before : after_init == before);
    assert_int_equal(H.freezes, 0); /* nothing before training */

    ln_train_opts o = train_opts(3, NULL);
    ln_train_result r;
    if (job_train(&j, &o, 1, &r, &e)) fail_msg("%s: %s", method, e.msg);

    const float *want[64];
    int n = gemm_weights(j.m, want);
    assert_int_equal(n, 2 * LN_NTARGET + 1);
    assert_int_equal(H.freezes, n);
    assert_frozen_set(want, n);
    assert_true(entry_sum(q->w) == after_init); /* frozen after the init, as the GEMMs read it */
    /* every one thawed on the way out, none changed while frozen, no factor ever frozen */
    assert_int_equal(H.thaws, n);
    assert_int_equal(H.stale, 0);
    for (int i = 0; i < j.ad.num_layers * LN_NTARGET; i++)
        for (int k = 0; k < H.n; k++) {
            assert_ptr_not_equal(H.e[k].w, j.ad.lora[i].A.w);
            assert_ptr_not_equal(H.e[k].w, j.ad.lora[i].B.w);
        }
    assert_int_equal(j.m->frozen, 0);
    job_free(&j);
    assert_int_equal(H.thaws, n); /* nothing left for the free */
}

static void test_lora_freezes_every_linear_and_lm_head(void **state)
{
    (void)state;
    /* q and v targeted: the five others and lm_head are GEMM weights as frozen as they are */
    freezes_exactly_the_frozen_weights("lora", (1u << LN_Q) | (1u << LN_V), 0);
}

static void test_lora_null_v2_freezes_after_its_init(void **state)
{
    (void)state;
    freezes_exactly_the_frozen_weights("lora_null_v2", 0, 1);
}

static void test_pissa_freezes_after_its_init(void **state)
{
    (void)state;
    freezes_exactly_the_frozen_weights("pissa", 0, 1);
}

static void test_full_fine_tuning_freezes_nothing(void **state)
{
    (void)state;
    hooks_reset();
    job j = job_new(hook_table(), "full", 0);
    ln_train_opts o = train_opts(2, NULL);
    ln_train_result r;
    ln_err e = {{0}};
    if (job_train(&j, &o, 1, &r, &e)) fail_msg("%s", e.msg);
    assert_int_equal(H.freezes, 0);
    assert_int_equal(ln_model_freeze_frozen(j.m, &j.ad, &e), 0);
    assert_int_equal(H.freezes, 0);
    job_free(&j);
}

/* ================================================================ (b) thawed before a change or a free */

static void test_thawed_before_weights_change_or_are_freed(void **state)
{
    (void)state;
    hooks_reset();
    ln_err e = {{0}};
    job j = job_new(hook_table(), "lora", 0);
    const int n = 2 * LN_NTARGET + 1;

    /* a caller's freeze (the worker's, covering its evaluations) is the caller's: ln_train keeps it */
    assert_int_equal(ln_model_freeze_frozen(j.m, &j.ad, &e), 0);
    assert_int_equal(H.freezes, n);
    assert_int_equal(ln_model_freeze_frozen(j.m, &j.ad, &e), 0); /* again: nothing more */
    assert_int_equal(H.freezes, n);
    ln_train_opts o = train_opts(2, NULL);
    ln_train_result r;
    if (job_train(&j, &o, 1, &r, &e)) fail_msg("%s", e.msg);
    assert_int_equal(H.freezes, n);
    assert_int_equal(H.thaws, 0);

    /* one weight made trainable: that one thawed first */
    ln_param *up = &j.m->layers[1].lin[LN_UP];
    assert_int_equal(ln_param_set_trainable(j.m->be, up, 1, &e), 0);
    assert_int_equal(H.thaws, 1);
    assert_null(live_of(up->w));
    assert_int_equal(ln_param_set_trainable(j.m->be, up, 0, &e), 0);

    /* the model freed while frozen: every weight thawed before its memory went (a thaw reads the
     * weight: one after the free fails the ASan build) */
    job_free(&j);
    assert_int_equal(H.thaws, n);
    assert_int_equal(H.stale, 0);

    /* full fine-tuning after a freeze: thawed before any weight trains */
    hooks_reset();
    j = job_new(hook_table(), "lora", 0);
    assert_int_equal(ln_model_freeze_frozen(j.m, &j.ad, &e), 0);
    assert_int_equal(ln_model_set_full_training(j.m, &e), 0);
    assert_int_equal(H.thaws, n);
    assert_int_equal(j.m->frozen, 0);
    job_free(&j);
}

/* ================================================================ (c) a failing check */

typedef struct {
    int64_t arm_after_row, arm_in_eval; /* the step whose row, or whose evaluation, arms the fault */
    int rows;
    const ln_dataset *ds;
} fault_plan;

static void arm_on_row(json_t *row, void *ctx)
{
    fault_plan *p = ctx;
    p->rows++;
    if (json_integer_value(json_object_get(row, "step")) == p->arm_after_row) arm_fault();
}

/* An evaluation's loss over the training data: forwards through the same table. */
static int eval_loss(ln_model *m, ln_adapter *ad, int64_t step, json_t *row, void *ctx, ln_err *e)
{
    fault_plan *p = ctx;
    if (step == p->arm_in_eval) arm_fault();
    double loss;
    if (ln_eval_loss(m, ad, p->ds, 2, &loss, e)) return -1;
    json_object_set_new(row, "val_loss", json_real(loss));
    return 0;
}

static int64_t highest_checkpoint(const char *out)
{
    char *cd = ln_path_join(out, "checkpoints");
    DIR *d = opendir(cd);
    free(cd);
    int64_t best = 0;
    if (!d) return 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        long long s;
        if (sscanf(de->d_name, "step-%lld", &s) == 1 && s > best) best = s;
    }
    closedir(d);
    return best;
}

static int has_final_adapter(const char *out)
{
    char *p = ln_path_join(out, "adapter.safetensors");
    int x = ln_file_exists(p);
    free(p);
    return x;
}

/* Trains 6 steps with a checkpoint each, the fault injected into step k's training (after step
 * k−1's row) or into step k's evaluation; ranks 1 or 2. */
static void check_failure_at(int k, int in_eval, int ranks, const char *method)
{
    hooks_reset();
    ln_err e = {{0}};
    job j = job_new(hook_table(), method, 0);
    char out[300];
    snprintf(out, sizeof out, "%s/fail-%d-%d-%d-%s", tmpdir, k, in_eval, ranks, method);
    ln_train_opts o = train_opts(6, out);
    o.save_every = 1;
    fault_plan plan = {in_eval ? -1 : k - 1, in_eval ? k : -1, 0, j.ds};
    o.on_row = arm_on_row;
    o.cb_ctx = &plan;
    o.eval = eval_loss;
    o.eval_ctx = &plan;
    o.eval_every = 1;
    ln_train_result r;
    if (!in_eval && k == 1) arm_fault(); /* the first step's first matmul */
    assert_int_equal(job_train(&j, &o, ranks, &r, &e), -1);
    if (ranks == 1) {
        char want[96];
        if (in_eval) snprintf(want, sizeof want, "train step %d: evaluation: hooktest device error in an evaluation", k);
        else snprintf(want, sizeof want, "hooktest device error at train step %d", k);
        if (!strstr(e.msg, want) || !strstr(e.msg, "injected kernel fault"))
            fail_msg("expected \"%s: … injected kernel fault\", got: %s", want, e.msg);
        assert_int_equal(plan.rows, k - 1); /* no metrics row of the failed step */
    }
    assert_int_equal(highest_checkpoint(out), k - 1); /* every good step's, none after */
    assert_false(has_final_adapter(out));
    assert_int_equal(H.thaws, H.freezes); /* thawed on the way out of a failure too */
    assert_int_equal(H.stale, 0);
    job_free(&j);
}

static void test_check_failure_in_a_step_fails_it_and_saves_nothing_after(void **state)
{
    (void)state;
    check_failure_at(4, 0, 1, "lora");
    check_failure_at(1, 0, 1, "lora_null_v2");
}

static void test_check_failure_in_an_evaluation_fails_its_step(void **state)
{
    (void)state;
    check_failure_at(3, 1, 1, "lora");
}

/* ================================================================ (d) the same numbers */

/* Trains method 5 steps on be (ranks 1 or 2): last loss, and the trained B of layer 1's v. */
static double train_numbers(const lnb_backend *be, const char *method, int ranks, float *b, int64_t *bn)
{
    ln_err e = {{0}};
    job j = job_new(be, method, 0);
    ln_train_opts o = train_opts(5, NULL);
    o.grad_accum = 2;
    ln_train_result r;
    if (job_train(&j, &o, ranks, &r, &e)) fail_msg("%s on %s, %d rank(s): %s", method, be->name, ranks, e.msg);
    const ln_param *B = &j.ad.lora[1 * LN_NTARGET + LN_V].B;
    memcpy(b, B->w, (size_t)B->n * sizeof(float));
    *bn = B->n;
    job_free(&j);
    return r.last_loss;
}

static void same_numbers(const char *method, int ranks)
{
    float b0[256], b1[256];
    int64_t n0, n1;
    double l0 = train_numbers(lnb_cpu(), method, ranks, b0, &n0);
    hooks_reset();
    double l1 = train_numbers(hook_table(), method, ranks, b1, &n1);
    assert_true(l0 == l1);
    assert_int_equal(n0, n1);
    assert_memory_equal(b0, b1, (size_t)n0 * sizeof(float));
    assert_true(H.freezes > 0 && H.matmuls > 0);
    assert_int_equal(H.stale, 0);
}

static void test_losses_equal_the_cpu_tables(void **state)
{
    (void)state;
    same_numbers("lora", 1);
    same_numbers("lora_null_v2", 1);
}

/* ================================================================ tensor parallel */

static void test_two_ranks_freeze_their_shards(void **state)
{
    (void)state;
    same_numbers("lora_null_v2", 2);
    /* each rank's shard: its 14 linears' blocks and its lm_head, all thawed */
    assert_int_equal(H.freezes, 2 * (2 * LN_NTARGET + 1));
    assert_int_equal(H.thaws, H.freezes);
    for (int i = 0; i < H.n; i++)
        for (int k = i + 1; k < H.n; k++) assert_ptr_not_equal(H.e[i].w, H.e[k].w);

    /* the whole model the shards were cut from is never frozen */
    hooks_reset();
    job j = job_new(hook_table(), "lora", 0);
    ln_train_opts o = train_opts(2, NULL);
    ln_train_result r;
    ln_err e = {{0}};
    assert_int_equal(job_train(&j, &o, 2, &r, &e), 0);
    const float *whole[64];
    int n = gemm_weights(j.m, whole);
    for (int i = 0; i < n; i++)
        for (int k = 0; k < H.n; k++) assert_ptr_not_equal(H.e[k].w, whole[i]);
    job_free(&j);
}

static void test_two_ranks_fail_together_on_a_check_failure(void **state)
{
    (void)state;
    check_failure_at(3, 0, 2, "lora");
}

/* ================================================================ the worker */

/* A one-rank job in wd_run on the test table, in tmpdir/name: lora, or lora_null_v2 calibrated on the
 * training file; the matmul number fault_at fails (0: none). Returns the finished run's status;
 * code, retryable and msg get what the daemon would post. */
/* wd_run_device_lost of the last worker_job: what makes the daemon exit for a fresh context */
static int g_device_lost;

static wd_run_status worker_job(const char *name, int calibrated, int64_t fault_at, char *code, int *retryable,
                                char *msg, size_t cap)
{
    char spec[600];
    snprintf(spec, sizeof spec,
             "{\"model\":\"tiny\",\"training_file\":\"file-train\",\"seed\":7,\"hyperparameters\":{\"n_epochs\":2,"
             "\"batch_size\":2,\"learning_rate\":0.01,\"save_interval\":1},\"adapter\":{\"type\":\"%s\",\"rank\":2%s},"
             "\"resources\":{\"ranks\":1,\"device\":\"cpu\"}}",
             calibrated ? "lora_null_v2" : "lora",
             calibrated ? ",\"calibration\":{\"samples\":4,\"max_length\":16}" : "");
    hooks_reset();
    H.fault_at = fault_at;
    wd_outbox out;
    wd_outbox_init(&out, NULL, 100000, 100000);
    wd_run r;
    memset(&r, 0, sizeof r);
    char param[LN_JOBSPEC_PARAM_MAX];
    ln_err e = {{0}};
    assert_int_equal(ln_jobspec_parse_text(spec, strlen(spec), &r.spec, param, &e), 0);
    snprintf(r.job_id, sizeof r.job_id, "ftjob-hooks");
    snprintf(r.model_name, sizeof r.model_name, "tiny");
    snprintf(r.model_dir, sizeof r.model_dir, "%s/model", tmpdir);
    snprintf(r.dir, sizeof r.dir, "%s/%s", tmpdir, name);
    snprintf(r.files_dir, sizeof r.files_dir, "%s/files", tmpdir);
    snprintf(r.train_path, sizeof r.train_path, "%s", g_data);
    if (calibrated) snprintf(r.calib_path, sizeof r.calib_path, "%s", g_data);
    snprintf(r.cache_dir, sizeof r.cache_dir, "%s/cache", tmpdir);
    r.world = 1;
    r.be = hook_table();
    r.out = &out;
    wd_run_init(&r);
    assert_int_equal(wd_run_start(&r), 0);
    wd_run_finish(&r);
    wd_outbox_destroy(&out);
    snprintf(code, 64, "%s", r.err_code);
    snprintf(msg, cap, "%s", r.err_msg);
    *retryable = r.retryable;
    g_device_lost = wd_run_device_lost(&r);
    return r.status;
}

/* The worker's model, saved once in tmpdir/model. */
static void save_worker_model(void)
{
    static int saved;
    if (saved) return;
    ln_model *m;
    ln_err e = {{0}};
    char dir[300];
    snprintf(dir, sizeof dir, "%s/model", tmpdir);
    assert_int_equal(ln_model_new_random(&g_cfg, lnb_cpu(), 5, &m, &e), 0);
    assert_int_equal(ln_model_save(m, dir, ST_F32, &e), 0);
    ln_model_free(m);
    saved = 1;
}

static void test_worker_fails_a_device_error_as_device_error(void **state)
{
    (void)state;
    char code[64], msg[2048];
    int retry;
    save_worker_model();

    /* a good run: the worker froze the 15 GEMM weights once (before its first evaluation) and the
     * model's free thawed them */
    if (worker_job("good", 0, 0, code, &retry, msg, sizeof msg) != WD_RUN_OK) fail_msg("%s: %s", code, msg);
    assert_int_equal(g_device_lost, 0);
    assert_int_equal(H.freezes, 2 * LN_NTARGET + 1);
    assert_int_equal(H.thaws, H.freezes);
    assert_int_equal(H.stale, 0);
    int64_t total = H.matmuls;

    /* a kernel failing two thirds of the way: device_error, retryable, the device's sentence */
    assert_int_equal(worker_job("bad", 0, total * 2 / 3, code, &retry, msg, sizeof msg), WD_RUN_FAILED);
    print_message("worker: %s (retryable %d): %s\n", code, retry, msg);
    assert_string_equal(code, "device_error");
    assert_int_equal(retry, 1);
    assert_int_equal(g_device_lost, 1); /* the daemon exits with WD_EXIT_DEVICE_LOST after reporting */
    if (!strstr(msg, "hooktest device error at train step") || !strstr(msg, "injected kernel fault"))
        fail_msg("unexpected message: %s", msg);
    assert_int_equal(H.thaws, H.freezes);
}

/* A calibrated job: the calibration's forwards on frozen copies of the loaded W0, thawed before the
 * init rewrites it; then the rewritten W0 frozen for the evaluations and the training. */
static void test_worker_freezes_for_calibration_then_after_the_init(void **state)
{
    (void)state;
    char code[64], msg[2048];
    int retry;
    save_worker_model();
    if (worker_job("calibrated", 1, 0, code, &retry, msg, sizeof msg) != WD_RUN_OK) fail_msg("%s: %s", code, msg);
    const int n = 2 * LN_NTARGET + 1;
    assert_int_equal(H.freezes, 2 * n);
    assert_int_equal(H.thaws, 2 * n);
    assert_int_equal(H.stale, 0); /* no GEMM read a copy older than its weight */
    /* the same weights twice (the model stays loaded), the first time as loaded, the second as the
     * init left them: layer 0's q differs between the two (lora_null_v2 is residual) */
    ln_model *m;
    ln_err e = {{0}};
    char dir[300];
    snprintf(dir, sizeof dir, "%s/model", tmpdir);
    assert_int_equal(ln_model_load(dir, lnb_cpu(), &m, &e), 0);
    const int64_t qn = m->layers[0].lin[LN_Q].n;
    uint64_t loaded = hash_floats(m->layers[0].lin[LN_Q].w, qn);
    ln_model_free(m);
    int first = -1, second = -1;
    for (int k = 0; k < H.n; k++)
        if (H.e[k].n == qn && H.e[k].sum == loaded) first = k;
    assert_true(first >= 0 && first < n);
    for (int k = n; k < H.n; k++)
        if (H.e[k].w == H.e[first].w) second = k;
    assert_true(second >= n);
    assert_true(H.e[second].sum != loaded);
}

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ln_hooks_XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    make_covariances();
    ln_err e;
    assert_int_equal(ln_config_parse("{\"vocab_size\":40,\"hidden_size\":16,\"intermediate_size\":24,"
                                     "\"num_hidden_layers\":2,\"num_attention_heads\":4,\"num_key_value_heads\":2}",
                                     "hooks", &g_cfg, &e), 0);
    snprintf(g_data, sizeof g_data, "%s/data.jsonl", tmpdir);
    FILE *f = fopen(g_data, "w");
    assert_non_null(f);
    for (int x = 0; x < 6; x++) {
        fputs("{\"input_ids\":[", f);
        for (int t = 0; t < 6 + x; t++) fprintf(f, t ? ",%d" : "%d", (1 + 7 * x + 3 * t) % 40);
        fputs("]}\n", f);
    }
    fclose(f);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    hooks_reset();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lora_freezes_every_linear_and_lm_head),
        cmocka_unit_test(test_lora_null_v2_freezes_after_its_init),
        cmocka_unit_test(test_pissa_freezes_after_its_init),
        cmocka_unit_test(test_full_fine_tuning_freezes_nothing),
        cmocka_unit_test(test_thawed_before_weights_change_or_are_freed),
        cmocka_unit_test(test_check_failure_in_a_step_fails_it_and_saves_nothing_after),
        cmocka_unit_test(test_check_failure_in_an_evaluation_fails_its_step),
        cmocka_unit_test(test_losses_equal_the_cpu_tables),
        cmocka_unit_test(test_two_ranks_freeze_their_shards),
        cmocka_unit_test(test_two_ranks_fail_together_on_a_check_failure),
        cmocka_unit_test(test_worker_fails_a_device_error_as_device_error),
        cmocka_unit_test(test_worker_freezes_for_calibration_then_after_the_init),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
