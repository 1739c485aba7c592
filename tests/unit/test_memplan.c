/* Unit tests for the CPU memory plan (worker/engine/memplan.c): its parts equal what the engine
 * really allocates through the backend on a small model (weights, adapter + gradients for lora and
 * a residual lora_fa, AdamW moments, a training forward/backward's activations with and without
 * recomputation); what is available is read from MemAvailable, a cgroup v2 limit (and its
 * ancestors'), a cgroup v1 limit and RLIMIT_AS; and a job too big fails with the numbers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <pthread.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/util.h"
#include "worker/backend/backend.h"
#include "worker/backend/comm/comm.h"
#include "worker/engine/adapter.h"
#include "worker/engine/memplan.h"
#include "worker/engine/model.h"
#include "worker/engine/optim.h"
#include "worker/engine/tensor_parallel.h"
#include "tests/unit/sanitizer.h"

/* ---------------------------------------------------------------- a counting CPU backend */

/* The CPU backend with alloc/free that keep the bytes it holds (sizes by pointer): in all, and per
 * thread slot (a tensor-parallel rank's thread sets its own, so each rank's bytes are its own). */
#define MAX_LIVE 8192
#define SLOTS 4
static struct {
    void *p;
    size_t n;
    int slot;
} g_live[MAX_LIVE];
static double g_bytes, g_slot[SLOTS];
static _Thread_local int t_slot;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static lnb_backend g_be;

static void *count_alloc(size_t n) {
    void *p = lnb_cpu()->alloc(n);
    if (!p) return NULL;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < MAX_LIVE; i++)
        if (!g_live[i].p) {
            g_live[i].p = p;
            g_live[i].n = n;
            g_live[i].slot = t_slot;
            g_bytes += (double)n;
            g_slot[t_slot] += (double)n;
            pthread_mutex_unlock(&g_mu);
            return p;
        }
    pthread_mutex_unlock(&g_mu);
    fail_msg("counting backend: more than %d live buffers", MAX_LIVE);
    return NULL;
}

static void count_free(void *p) {
    if (!p) return;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < MAX_LIVE; i++)
        if (g_live[i].p == p) {
            g_bytes -= (double)g_live[i].n;
            g_slot[g_live[i].slot] -= (double)g_live[i].n;
            g_live[i].p = NULL;
            break;
        }
    pthread_mutex_unlock(&g_mu);
    lnb_cpu()->free(p);
}

static double slot_bytes(void) {
    pthread_mutex_lock(&g_mu);
    double b = g_slot[t_slot];
    pthread_mutex_unlock(&g_mu);
    return b;
}

/* The bytes the counting backend holds for m's rotary tables (model.c's rope_ensure allocates them
 * through the model's backend at a forward's first longer T; 0 before any forward). */
static double rope_held(const ln_model *m) {
    double b = 0;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < MAX_LIVE; i++)
        if (g_live[i].p && (g_live[i].p == m->rope_cos || g_live[i].p == m->rope_sin)) b += (double)g_live[i].n;
    pthread_mutex_unlock(&g_mu);
    return b;
}

static const lnb_backend *counting(void) {
    g_be = *lnb_cpu();
    g_be.alloc = count_alloc;
    g_be.free = count_free;
    return &g_be;
}

static const char *CFG_JSON =
    "{\"vocab_size\": 96, \"hidden_size\": 48, \"intermediate_size\": 80, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"max_position_embeddings\": 64,"
    " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, \"tie_word_embeddings\": false}";

static void push(ln_param *p, void *ctx) {
    ln_param ***list = ctx;
    if (p->trainable) *(*list)++ = p;
}

/* Weights, adapter, AdamW and one training step's activations, counted, against the plan. */
static void check_against_engine(const char *method, unsigned targets, int recompute) {
    ln_config cfg;
    ln_err e;
    assert_int_equal(ln_config_parse(CFG_JSON, "memplan test", &cfg, &e), 0);
    const lnb_backend *be = counting();
    const int B = 2, T = 16, r = 4;
    ln_memplan_req q = {.cfg = &cfg, .batch = B, .seq = T, .rank = r, .targets = targets,
                        .train_a = strcmp(method, "lora_fa") != 0, .residual = 0, .method = method,
                        .recompute = recompute};
    double before = g_bytes;
    ln_model *m = NULL;
    assert_int_equal(ln_model_new_random(&cfg, be, 1, &m, &e), 0);
    m->recompute = recompute;
    ln_memplan p;
    ln_memplan_estimate(&q, &p);
    assert_true(g_bytes - before == p.weights);

    before = g_bytes;
    ln_adapter ad;
    ln_adapter_opts ao = {.method = method, .rank = r, .alpha = 8, .targets = targets, .seed = 1};
    assert_int_equal(ln_adapter_init(m, &ad, &ao, &e), 0);
    assert_int_equal(ln_adapter_make_residual(m, &ad, &e), 0); /* + A0, B0 */
    q.residual = 1;
    ln_memplan_estimate(&q, &p);
    if (g_bytes - before != p.adapter)
        fail_msg("%s: adapter holds %.0f bytes, the plan says %.0f", method, g_bytes - before, p.adapter);

    before = g_bytes;
    ln_param *params[4 * LN_NTARGET], **end = params;
    ln_adapter_for_each_param(&ad, push, &end);
    ln_optim o;
    ln_optim_cfg oc = ln_optim_defaults();
    assert_int_equal(ln_optim_init(&o, be, params, (int)(end - params), &oc, &e), 0);
    if (g_bytes - before != p.optimizer)
        fail_msg("%s: AdamW holds %.0f bytes, the plan says %.0f", method, g_bytes - before, p.optimizer);

    /* one training step's forward and backward (every row trained, lm_head in chunks) */
    int32_t ids[2 * 16], tg[2 * 16];
    for (int i = 0; i < B * T; i++) {
        ids[i] = (i * 7) % cfg.vocab_size;
        tg[i] = (i * 5 + 1) % cfg.vocab_size;
    }
    ln_batch b = {.B = B, .T = T, .ids = ids, .targets = tg, .n_targets = B * T};
    before = g_bytes;
    ln_acts *acts = ln_acts_new();
    ln_fwd_opts fo = {.trained_rows_only = 1, .head_grad_scale = 1.0f / (B * T)};
    double loss;
    assert_int_equal(ln_model_forward(m, &ad, acts, &b, &fo, &loss, &e), 0);
    if (ln_model_backward(m, &ad, acts, &b, fo.head_grad_scale, &e) != 0) fail_msg("backward: %s", e.msg);
    double host_index = (double)B * T * (4 * 4 + 8); /* model.c's per-token index arrays (malloc) */
    /* the model's rotary tables: allocated by this first forward, the plan's for T tokens */
    const double rope = rope_held(m);
    if (rope != p.rope || rope != 2.0 * 4 * T * (cfg.head_dim / 2))
        fail_msg("%s: the rotary tables hold %.0f bytes, the plan says %.0f", method, rope, p.rope);
    before += rope;
    if (g_bytes - before != p.activations - host_index)
        fail_msg("%s (recompute %d): a step's activations hold %.0f bytes, the plan says %.0f", method, recompute,
                 g_bytes - before, p.activations - host_index);
    printf("  %s, targets 0x%x, recompute %d: weights %.0f, adapter %.0f, AdamW %.0f, activations %.0f bytes "
           "— as allocated\n", method, targets, recompute, p.weights, p.adapter, p.optimizer, p.activations);

    /* an evaluation's loss (its own ln_acts, forward-only) beside the training one */
    q.eval_during_training = 1;
    ln_memplan_estimate(&q, &p);
    before = g_bytes;
    ln_acts *ev = ln_acts_new();
    ln_fwd_opts fe = {.trained_rows_only = 1};
    assert_int_equal(ln_model_forward(m, &ad, ev, &b, &fe, &loss, &e), 0);
    if (g_bytes - before != p.eval_activations - host_index)
        fail_msg("%s: an evaluation's activations hold %.0f bytes, the plan says %.0f", method, g_bytes - before,
                 p.eval_activations - host_index);
    assert_true(p.eval_activations < p.activations);
    ln_acts_free(m, ev);

    /* a calibration window's forward (no logits, no adapter), forward-only too */
    const int Tc = 24;
    q.calibrate = 1;
    q.calib_max_length = Tc;
    ln_memplan_estimate(&q, &p);
    int32_t cids[24];
    for (int i = 0; i < Tc; i++) cids[i] = (i * 3 + 2) % cfg.vocab_size;
    ln_batch cb = {.B = 1, .T = Tc, .ids = cids};
    before = g_bytes;
    ln_acts *ca = ln_acts_new();
    ln_fwd_opts fc = {.no_logits = 1};
    assert_int_equal(ln_model_forward(m, NULL, ca, &cb, &fc, NULL, &e), 0);
    /* a window longer than the batches: the tables grew to its Tc (the old ones freed), as planned
     * for the calibration phase and for training after it */
    if (rope_held(m) != p.calib_rope || p.calib_rope != p.rope || p.rope != 2.0 * 4 * Tc * (cfg.head_dim / 2))
        fail_msg("the rotary tables hold %.0f bytes after a %d-token window, the plan says %.0f (training %.0f)",
                 rope_held(m), Tc, p.calib_rope, p.rope);
    before += rope_held(m) - rope;
    if (g_bytes - before != p.calib_activations - (double)Tc * (4 * 4 + 8))
        fail_msg("a calibration forward's activations hold %.0f bytes, the plan says %.0f", g_bytes - before,
                 p.calib_activations - (double)Tc * (4 * 4 + 8));
    printf("  evaluation %.0f, calibration window %.0f bytes — as allocated\n", p.eval_activations,
           p.calib_activations);
    ln_acts_free(m, ca);
    ln_acts_free(m, acts);
    ln_optim_free(&o);
    ln_adapter_free(&ad);
    ln_model_free(m);
}

static void test_plan_equals_engine_allocations(void **state) {
    (void)state;
    check_against_engine("lora", LN_TARGETS_ALL, 0);
    check_against_engine("lora", (1u << LN_Q) | (1u << LN_V) | (1u << LN_DOWN), 1);
    check_against_engine("lora_fa", LN_TARGETS_ALL, 0);
}

/* ---------------------------------------------------------------- a 2-rank shard */

/* What one tensor-parallel rank (a thread, its own counting slot) holds: its shard of the weights,
 * its adapter shard (+ rank 0's gathered whole adapter), AdamW on the shard, a training step's
 * activations, an evaluation's and a calibration window's forward, each as allocated. */
typedef struct {
    ln_model *full;
    const char *method;
    unsigned targets;
    int B, T, Tc, r, recompute;
    double weights, adapter, optimizer, activations, eval_activations, calib_activations, calib_gather, rope;
} tp_count;

static void no_inner(int layer, ln_input which, const float *X, int tokens, int d_in, void *ctx) {
    (void)layer, (void)which, (void)X, (void)tokens, (void)d_in, (void)ctx;
}

static double g_cov_store[LN_NINPUT][80 * 80]; /* whole widths: at most 80 */
static const double *diag_cov(void *ctx, int layer, ln_input which) {
    (void)ctx;
    (void)layer;
    return g_cov_store[which];
}

static int count_rank(ln_comm *c, void *ctx, ln_err *e) {
    tp_count *k = (tp_count *)ctx + comm_rank(c);
    t_slot = 1 + comm_rank(c);
    int root = comm_rank(c) == 0;
    double b = slot_bytes();
    ln_model *sh = NULL;
    if (ln_tp_shard_model(k->full, c, &sh, e) != 0) return -1;
    sh->recompute = k->recompute;
    k->weights = slot_bytes() - b;
    ln_model *shape = ln_tp_whole_shape(sh);

    b = slot_bytes();
    ln_adapter sad = {0}, whole = {0};
    ln_adapter_opts ao = {.method = k->method, .rank = k->r, .alpha = 8, .targets = k->targets, .seed = 1,
                          .covariance = diag_cov};
    if (k->r > 0 ? ln_tp_adapter_init(sh, shape, &ao, 1, &sad, root ? &whole : NULL, NULL, e)
                 : ln_model_set_full_training(sh, e)) /* full fine-tuning: every weight's gradient */
        return -1;
    k->adapter = slot_bytes() - b;

    b = slot_bytes();
    ln_param *params[16 * LN_NTARGET * 4], **end = params;
    if (k->r > 0) ln_adapter_for_each_param(&sad, push, &end);
    else ln_model_for_each_param(sh, push, &end);
    ln_optim o;
    ln_optim_cfg oc = ln_optim_defaults();
    if (ln_optim_init(&o, sh->be, params, (int)(end - params), &oc, e) != 0) return -1;
    k->optimizer = slot_bytes() - b;

    int32_t ids[64], tg[64];
    for (int i = 0; i < k->B * k->T; i++) {
        ids[i] = (i * 7) % sh->cfg.vocab_size;
        tg[i] = (i * 5 + 1) % sh->cfg.vocab_size;
    }
    ln_batch bt = {.B = k->B, .T = k->T, .ids = ids, .targets = tg, .n_targets = k->B * k->T};
    double loss;
    b = slot_bytes();
    ln_acts *acts = ln_acts_new();
    ln_fwd_opts fo = {.trained_rows_only = 1, .head_grad_scale = 1.0f / (k->B * k->T)};
    ln_adapter *ad = k->r > 0 ? &sad : NULL;
    if (ln_model_forward(sh, ad, acts, &bt, &fo, &loss, e) != 0 ||
        ln_model_backward(sh, ad, acts, &bt, fo.head_grad_scale, e) != 0)
        return -1;
    k->activations = slot_bytes() - b - rope_held(sh); /* the shard's rotary tables apart */

    b = slot_bytes();
    ln_acts *ev = ln_acts_new();
    ln_fwd_opts fe = {.trained_rows_only = 1};
    if (ln_model_forward(sh, ad, ev, &bt, &fe, &loss, e) != 0) return -1;
    k->eval_activations = slot_bytes() - b;
    ln_acts_free(sh, ev);

    /* a calibration window through the tensor-parallel hook: its gather scratch (host) is
     * this rank's block, every rank's, and the whole rows of the widest row-parallel input */
    b = slot_bytes();
    ln_batch cb = {.B = 1, .T = k->Tc, .ids = ids};
    ln_acts *ca = ln_acts_new();
    ln_tp_hook th = {.comm = c, .inner = no_inner};
    ln_fwd_opts fc = {.no_logits = 1, .hook = ln_tp_calibration_hook, .hook_ctx = &th};
    double rope = rope_held(sh);
    if (ln_model_forward(sh, NULL, ca, &cb, &fc, NULL, e) != 0 || th.failed) return -1;
    k->rope = rope_held(sh); /* grown to the window's Tc */
    k->calib_activations = slot_bytes() - b - (k->rope - rope);
    k->calib_gather = 4.0 * ((double)th.cap / comm_size(c) + 2.0 * (double)th.cap);
    ln_tp_hook_free(&th);
    ln_acts_free(sh, ca);

    ln_acts_free(sh, acts);
    ln_optim_free(&o);
    if (k->r > 0) ln_adapter_free(&sad);
    if (root && k->r > 0) ln_adapter_free(&whole);
    ln_model_free(shape);
    ln_model_free(sh);
    return 0;
}

/* A shard's parts as a counting backend sees each of 2 ranks allocate them, against the plan of
 * both ranks on threads of one process (ranks_here 2) and of rank 1 alone in its process. */
static void check_two_ranks(const char *method, unsigned targets, int recompute) {
    ln_config cfg;
    ln_err e;
    assert_int_equal(ln_config_parse(CFG_JSON, "memplan test", &cfg, &e), 0);
    const int R = 2;
    for (int t = 0; t < LN_NTARGET; t++) { /* each whole input's covariance: diag(1, 2, …, d) */
        int o, d;
        ln_model_target_dims(&cfg, (ln_target)t, &o, &d);
        double *C = g_cov_store[ln_target_input((ln_target)t)];
        memset(C, 0, (size_t)d * d * sizeof *C);
        for (int i = 0; i < d; i++) C[(size_t)i * d + i] = 1.0 + i;
    }
    ln_model *full = NULL;
    const lnb_backend *be = counting();
    assert_int_equal(ln_model_new_random(&cfg, be, 1, &full, &e), 0);
    tp_count k[2];
    for (int i = 0; i < R; i++)
        k[i] = (tp_count){.full = full, .method = method, .targets = targets, .B = 2, .T = 16, .Tc = 24,
                          .r = strcmp(method, "full") ? 4 : 0, .recompute = recompute};
    void *ctxs[2] = {k, k};
    if (comm_thread_run(R, count_rank, ctxs, &e) != 0) fail_msg("2 ranks: %s", e.msg);
    ln_model_free(full);

    int null = !strncmp(method, "lora_null", 9);
    ln_memplan_req q = {.cfg = &cfg, .batch = 2, .seq = 16, .rank = k[0].r, .targets = targets,
                        .train_a = strcmp(method, "lora_fa") != 0 && strcmp(method, "lora_null_v2") != 0,
                        .residual = null, .method = method, .recompute = recompute, .eval_during_training = 1,
                        .calibrate = 1, .calib_max_length = 24, .ranks = R};
    ln_memplan both, one;
    ln_memplan_estimate(&q, &both);
    q.ranks_here = 1;
    q.first_rank = 1;
    ln_memplan_estimate(&q, &one);
    assert_true(both.root_here && !one.root_here && both.ranks_here == 2 && one.ranks_here == 1);
    const double tok = 16.0 * 2 * (4 * 4 + 8), ctok = 24.0 * (4 * 4 + 8); /* host index arrays (malloc) */
    struct {
        const char *what;
        double r0, r1, plan_both, plan_one;
    } rows[] = {
        {"weights", k[0].weights, k[1].weights, both.weights, one.weights},
        {"adapter (+ rank 0's gathered one)", k[0].adapter, k[1].adapter, both.adapter + both.gathered_adapter,
         one.adapter + one.gathered_adapter},
        {"AdamW", k[0].optimizer, k[1].optimizer, both.optimizer, one.optimizer},
        {"training activations", k[0].activations, k[1].activations, both.activations - 2 * tok,
         one.activations - tok},
        {"evaluation activations", k[0].eval_activations, k[1].eval_activations, both.eval_activations - 2 * tok,
         one.eval_activations - tok},
        {"calibration activations", k[0].calib_activations, k[1].calib_activations,
         both.calib_activations - 2 * ctok, one.calib_activations - ctok},
        {"calibration gathers", k[0].calib_gather, k[1].calib_gather, both.calib_gather, one.calib_gather},
        {"rotary tables", k[0].rope, k[1].rope, both.rope, one.rope},
    };
    for (size_t i = 0; i < sizeof rows / sizeof *rows; i++) {
        if (rows[i].r0 + rows[i].r1 != rows[i].plan_both)
            fail_msg("%s, 2 ranks here: %s hold %.0f + %.0f bytes, the plan says %.0f", method, rows[i].what,
                     rows[i].r0, rows[i].r1, rows[i].plan_both);
        if (rows[i].r1 != rows[i].plan_one)
            fail_msg("%s, rank 1 alone: %s hold %.0f bytes, the plan says %.0f", method, rows[i].what, rows[i].r1,
                     rows[i].plan_one);
    }
    /* a shard is less than the whole model; rank 0's extras are rank 0's */
    ln_memplan whole;
    q.ranks = 1;
    q.ranks_here = q.first_rank = 0;
    ln_memplan_estimate(&q, &whole);
    assert_true(one.weights < whole.weights && one.covariances == 0 && one.bases == 0 && one.gathered_adapter == 0);
    assert_true(both.covariances == whole.covariances);
    assert_true(both.gathered_adapter == (k[0].r > 0 ? whole.adapter : 0)); /* full: nothing gathered */
    if (k[0].r == 0) { /* full fine-tuning's drift copies: each rank its blocks of W0, together the whole */
        q.drift = 1;
        ln_memplan_estimate(&q, &whole);
        q.ranks = R;
        ln_memplan_estimate(&q, &both);
        assert_true(whole.drift > 0 && both.drift == whole.drift);
    }
    assert_true(both.calib_gather == 2 * one.calib_gather && one.calib_gather > 0);
    printf("  %s, 2 ranks, recompute %d: rank 0 weights %.0f adapter %.0f AdamW %.0f activations %.0f, rank 1 "
           "weights %.0f adapter %.0f (1 rank: weights %.0f) — as allocated\n",
           method, recompute, k[0].weights, k[0].adapter, k[0].optimizer, k[0].activations, k[1].weights,
           k[1].adapter, whole.weights);
}

static void test_plan_per_rank_equals_shard_allocations(void **state) {
    (void)state;
    check_two_ranks("lora", LN_TARGETS_ALL, 0);
    check_two_ranks("lora_null_v1", LN_TARGETS_ALL, 0);
    check_two_ranks("lora_null_v2", (1u << LN_Q) | (1u << LN_O) | (1u << LN_DOWN), 1);
    check_two_ranks("full", LN_TARGETS_ALL, 0);
}

/* Full fine-tuning: gradients and moments for every weight; the drift tracker's W0 copies. */
static void test_full_fine_tuning_parts(void **state) {
    (void)state;
    ln_config cfg;
    ln_err e;
    assert_int_equal(ln_config_parse(CFG_JSON, "memplan test", &cfg, &e), 0);
    const lnb_backend *be = counting();
    ln_model *m = NULL;
    double before = g_bytes;
    assert_int_equal(ln_model_new_random(&cfg, be, 1, &m, &e), 0);
    double w = g_bytes - before;
    assert_int_equal(ln_model_set_full_training(m, &e), 0);
    ln_memplan p;
    ln_memplan_req q = {.cfg = &cfg, .batch = 1, .seq = 8, .rank = 0, .calibrate = 1, .drift = 1};
    ln_memplan_estimate(&q, &p);
    assert_true(p.weights == w);
    assert_true(g_bytes - before - w == p.adapter); /* the gradients */
    assert_true(p.optimizer == 2 * p.weights);
    int lin = 0;
    for (int t = 0; t < LN_NTARGET; t++) {
        int o, i;
        ln_model_target_dims(&cfg, (ln_target)t, &o, &i);
        lin += o * i;
    }
    assert_true(p.drift == 4.0 * cfg.num_layers * lin);
    ln_model_free(m);
}

/* Calibration: 4 covariances per layer, once (each sum is finished in place). */
static void test_calibration_phase(void **state) {
    (void)state;
    ln_config cfg;
    ln_err e;
    assert_int_equal(ln_config_parse(CFG_JSON, "memplan test", &cfg, &e), 0);
    ln_memplan_req q = {.cfg = &cfg, .batch = 1, .seq = 8, .rank = 4, .residual = 1, .method = "lora_null_v1",
                        .calibrate = 1, .calib_max_length = 32};
    ln_memplan p;
    ln_memplan_estimate(&q, &p);
    const double C = 48, I = 80, qd = 48, L = 2;
    assert_true(p.covariances == 8.0 * L * (C * C + qd * qd + C * C + I * I));
    assert_true(p.bases == 8.0 * L * (C + qd + C + I) * 4);
    assert_true(p.phase[LN_PHASE_CALIBRATION] ==
                p.weights + p.covariances + p.calib_scratch + p.calib_activations + p.calib_rope);
    assert_true(p.calib_activations > 0);
    /* only q targeted: one covariance per layer */
    q.targets = 1u << LN_Q;
    ln_memplan_estimate(&q, &p);
    assert_true(p.covariances == 8.0 * L * C * C);
    /* no calibration: no such phase */
    q.calibrate = 0;
    q.method = "lora";
    q.residual = 0;
    ln_memplan_estimate(&q, &p);
    assert_true(p.covariances == 0 && p.phase[LN_PHASE_CALIBRATION] == 0);
    assert_int_equal(p.peak_phase, LN_PHASE_TRAINING);
}

/* ---------------------------------------------------------------- what is available */

static char g_root[] = "/tmp/ln_memplan_XXXXXX";

static void put(const char *rel, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s%s", g_root, rel);
    char *dir = ln_xstrdup(path);
    *strrchr(dir, '/') = 0;
    ln_err e;
    assert_int_equal(ln_mkdir_p(dir, &e), 0);
    free(dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_available_from_meminfo_and_cgroups(void **state) {
    (void)state;
    ln_err e;
    double b;
    char from[96];
    assert_non_null(mkdtemp(g_root));
    /* nothing readable: a sentence, not a guess */
    assert_int_equal(ln_mem_available(g_root, &b, from, sizeof from, &e), -1);
    assert_non_null(strstr(e.msg, "cannot tell the available memory"));

    put("/proc/meminfo", "MemTotal:       64000000 kB\nMemFree:  100 kB\nMemAvailable:   32000000 kB\n");
    assert_int_equal(ln_mem_available(g_root, &b, from, sizeof from, &e), 0);
    assert_true(b == 32000000.0 * 1024);
    assert_string_equal(from, "MemAvailable");

    /* cgroup v2: max − (current − inactive_file) */
    put("/proc/self/cgroup", "0::/kubepods/pod1/job\n");
    put("/sys/fs/cgroup/kubepods/pod1/job/memory.max", "8589934592\n");
    put("/sys/fs/cgroup/kubepods/pod1/job/memory.current", "3221225472\n");
    put("/sys/fs/cgroup/kubepods/pod1/job/memory.stat", "anon 1\nfile 5\ninactive_file 1073741824\nactive_file 2\n");
    assert_int_equal(ln_mem_available(g_root, &b, from, sizeof from, &e), 0);
    assert_true(b == 8589934592.0 - (3221225472.0 - 1073741824.0)); /* 6 GiB */
    assert_string_equal(from, "cgroup memory.max");
    /* an ancestor's tighter limit wins; "max" means none */
    put("/sys/fs/cgroup/kubepods/memory.max", "4294967296\n");
    put("/sys/fs/cgroup/kubepods/memory.current", "1073741824\n");
    put("/sys/fs/cgroup/kubepods/pod1/memory.max", "max\n");
    assert_int_equal(ln_mem_available(g_root, &b, from, sizeof from, &e), 0);
    assert_true(b == 3221225472.0);

    /* cgroup v1 */
    put("/proc/self/cgroup", "12:cpu,cpuacct:/x\n11:memory:/docker/abc\n");
    put("/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "2147483648\n");
    put("/sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes", "536870912\n");
    assert_int_equal(ln_mem_available(g_root, &b, from, sizeof from, &e), 0);
    assert_true(b == 1610612736.0);
    assert_string_equal(from, "cgroup memory.limit_in_bytes");
    put("/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n"); /* unlimited */
    assert_int_equal(ln_mem_available(g_root, &b, from, sizeof from, &e), 0);
    assert_string_equal(from, "MemAvailable");
}

/* RLIMIT_AS − what is mapped, in a child (the limit cannot be lifted again by the test process). */
static void test_available_from_rlimit(void **state) {
    (void)state;
    if (LN_UNDER_ASAN) {
        printf("  skipped under ASan (its shadow memory makes RLIMIT_AS meaningless)\n");
        return;
    }
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        FILE *f = fopen("/proc/self/statm", "r");
        unsigned long pages;
        if (!f || fscanf(f, "%lu", &pages) != 1) _exit(2);
        fclose(f);
        struct rlimit rl;
        getrlimit(RLIMIT_AS, &rl);
        rl.rlim_cur = pages * (unsigned long)sysconf(_SC_PAGESIZE) + (64ul << 20);
        if (setrlimit(RLIMIT_AS, &rl) != 0) _exit(3);
        double b;
        char from[96];
        ln_err e;
        if (ln_mem_available("", &b, from, sizeof from, &e) != 0) _exit(4);
        if (strcmp(from, "RLIMIT_AS") != 0) _exit(5);
        _exit(b > (48 << 20) && b <= (64 << 20) ? 0 : 6);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

/* A job whose peak does not fit fails with needed vs available and the peak phase's parts. */
static void test_check_sentence(void **state) {
    (void)state;
    ln_config cfg;
    ln_err e;
    /* 8B-like: 32 layers, hidden 4096, intermediate 14336, vocab 128256 */
    const char *big = "{\"vocab_size\": 128256, \"hidden_size\": 4096, \"intermediate_size\": 14336,"
                      " \"num_hidden_layers\": 32, \"num_attention_heads\": 32, \"num_key_value_heads\": 8,"
                      " \"max_position_embeddings\": 8192, \"rms_norm_eps\": 1e-5, \"rope_theta\": 500000.0,"
                      " \"tie_word_embeddings\": false}";
    assert_int_equal(ln_config_parse(big, "8B", &cfg, &e), 0);
    put("/proc/self/cgroup", "0::/\n");
    put("/proc/meminfo", "MemAvailable:   25165824 kB\n"); /* 24 GiB */
    ln_memplan_req q = {.cfg = &cfg, .batch = 1, .seq = 2048, .rank = 16, .train_a = 1, .residual = 1,
                        .method = "lora_null_v1", .calibrate = 1, .calib_max_length = 1024,
                        .eval_during_training = 1};
    ln_memplan p;
    assert_int_equal(ln_memplan_check(&q, g_root, &p, &e), -1);
    printf("  %s\n", e.msg);
    assert_non_null(strstr(e.msg, "CPU memory plan: the job needs "));
    assert_non_null(strstr(e.msg, "but only 24.00 GiB are available (MemAvailable), so it would run out of memory"));
    /* the peak is a training step of 2048 tokens (its activations), with an evaluation's beside it */
    assert_int_equal(p.peak_phase, LN_PHASE_TRAINING);
    assert_non_null(strstr(e.msg, "(training: weights 29.92 GiB, covariances 61.00 GiB, "));
    assert_non_null(strstr(e.msg, ", evaluation activations "));
    assert_null(strstr(e.msg, "2 × "));
    /* the model's rotary tables for 2048 positions: 2 × 2048 × 64 floats */
    assert_true(p.rope == 2.0 * 4 * 2048 * 64 && p.calib_rope == 2.0 * 4 * 1024 * 64);
    assert_non_null(strstr(e.msg, ", rotary tables 1.0 MiB)"));
    /* 32 layers × (3 × 4096² + 14336²) fp64 = 61.0 GiB of covariances, held once: each sum is
     * finished in place */
    assert_true(p.covariances == 8.0 * 32 * (3.0 * 4096 * 4096 + 14336.0 * 14336));
    assert_true(p.phase[LN_PHASE_CALIBRATION] ==
                p.weights + p.covariances + p.calib_scratch + p.calib_activations + p.calib_rope);
    /* a 1024-token calibration window keeps one layer's activations and no logits: 0.41 GiB (the
     * training layout with every layer and 1024 × 128256 logits took 13.3 GiB) */
    assert_true(p.calib_activations > 0.40 * (1 << 30) && p.calib_activations < 0.42 * (1 << 30));
    /* the evaluation: one layer's activations and one chunk of logits, far below the training step's */
    assert_true(p.eval_activations < p.activations / 10);
    char a[32], b[32], c[32];
    printf("  8B: calibration phase %s (window activations %s); evaluation activations %s\n",
           ln_fmt_bytes(p.phase[LN_PHASE_CALIBRATION], a, sizeof a), ln_fmt_bytes(p.calib_activations, b, sizeof b),
           ln_fmt_bytes(p.eval_activations, c, sizeof c));
    /* 2 ranks, one per process: rank 1 holds half the layers' weights and none of rank 0's
     * covariances; rank 0 holds them and the gathered adapter; both ranks on threads hold the sum */
    q.ranks = 2;
    q.ranks_here = 1;
    q.first_rank = 1;
    ln_memplan r1, r0, th;
    assert_int_equal(ln_memplan_check(&q, g_root, &r1, &e), -1);
    printf("  %s\n", e.msg);
    assert_non_null(strstr(e.msg, "(training, rank 1 of 2 here: weights 16.92 GiB, adapter and gradients "));
    assert_null(strstr(e.msg, "covariances"));
    q.first_rank = 0;
    ln_memplan_estimate(&q, &r0);
    q.ranks_here = 0;
    assert_int_equal(ln_memplan_check(&q, g_root, &th, &e), -1);
    assert_non_null(strstr(e.msg, "(training, ranks 0-1 of 2 here: weights 33.83 GiB, covariances 61.00 GiB, "));
    assert_true(r0.covariances == p.covariances && r0.gathered_adapter == p.adapter && r1.covariances == 0);
    assert_true(r0.peak - r1.peak > p.covariances);
    assert_true(th.weights == 2 * r1.weights && th.peak > r0.peak);
    /* 2 × 16.92 GiB: embeddings and lm_head (2 × 1.96 GiB) are on each rank whole */
    assert_true(th.weights > p.weights && th.weights - p.weights < 4.0 * (1 << 30));
    char d[32];
    printf("  8B, 2 ranks: rank 0 %s, rank 1 %s, both on threads %s (1 rank %s)\n",
           ln_fmt_bytes(r0.peak, a, sizeof a), ln_fmt_bytes(r1.peak, b, sizeof b), ln_fmt_bytes(th.peak, c, sizeof c),
           ln_fmt_bytes(p.peak, d, sizeof d));
    q.ranks = 0;
    /* enough memory: passes */
    put("/proc/meminfo", "MemAvailable:   2147483648 kB\n"); /* 2 TiB */
    assert_int_equal(ln_memplan_check(&q, g_root, &p, &e), 0);
    assert_true(p.available == 2147483648.0 * 1024);
}

/* ---------------------------------------------------------------- the GPU plan's arithmetic */

#define GIB (1024.0 * 1024.0 * 1024.0)

/* 8B on the device: every phase's parts, the covariance sums on the device while they fit beside
 * the calibration window (the rest on the host), the peak phase named in the sentence, ranks. */
static void test_gpu_plan(void **state) {
    (void)state;
    ln_err e;
    lnb_cuda_plan_req g = {.vocab = 128256, .hidden = 4096, .intermediate = 14336, .layers = 32, .heads = 32,
                           .kv_heads = 8, .head_dim = 128, .batch = 1, .seq = 2048, .rank = 16, .targets = 7,
                           .train_a = 1, .residual = 1, .method = "lora_null_v1", .calibrate = 1,
                           .calib_max_length = 1024, .device_covariances = 1, .eval_during_training = 1};
    lnb_cuda_plan p;
    /* an H200's free memory: everything fits; the calibration phase (weights + 61 GiB of fp64 sums)
     * is the peak */
    assert_int_equal(ln_memplan_gpu(&g, 139.0 * GIB, 140.0 * GIB, "H200", &p, &e), 0);
    const double sums = 8.0 * 32 * (3.0 * 4096 * 4096 + 14336.0 * 14336), flags = 512.0 * 32 * 4;
    assert_true(p.covariances == sums + flags && p.covariances_host == 0);
    assert_int_equal(p.peak_phase, LN_PHASE_CALIBRATION);
    assert_true(p.total == p.weights + p.calib_activations + p.covariances + p.workspace + p.calib_rope);
    /* the CPU plan of the same job: the same weights, adapter, AdamW; the device keeps attention
     * rows only, so its activations are below the CPU layout's */
    ln_config cfg = {.vocab_size = 128256, .hidden_size = 4096, .intermediate_size = 14336, .num_layers = 32,
                     .num_heads = 32, .num_kv_heads = 8, .head_dim = 128};
    ln_memplan_req q = {.cfg = &cfg, .batch = 1, .seq = 2048, .rank = 16, .train_a = 1, .residual = 1,
                        .method = "lora_null_v1", .calibrate = 1, .calib_max_length = 1024, .eval_during_training = 1};
    ln_memplan c;
    ln_memplan_estimate(&q, &c);
    assert_true(p.weights == c.weights && p.adapter == c.adapter && p.optimizer == c.optimizer);
    assert_true(p.activations + p.logits < c.activations);
    assert_true(p.logits == 4.0 * (2048 < LN_HEAD_CHUNK ? 2048 : LN_HEAD_CHUNK) * 128256);
    assert_true(p.calib_activations > 0 && p.calib_activations < c.calib_activations);
    assert_true(p.init_scratch >= 8.0 * 2 * 14336.0 * 14336); /* the down input's eigensolve */
    char a[32], b[32], d[32], f[32];
    printf("  8B on 139 GiB free: calibration %s (sums %s), init %s, training %s\n",
           ln_fmt_bytes(p.phase[LN_PHASE_CALIBRATION], a, sizeof a), ln_fmt_bytes(p.covariances, b, sizeof b),
           ln_fmt_bytes(p.phase[LN_PHASE_INIT], d, sizeof d), ln_fmt_bytes(p.phase[LN_PHASE_TRAINING], f, sizeof f));

    /* 80 GiB free: the sums that do not fit beside the weights, the window and the workspaces sum
     * on the host; the device is full in calibration, and the job fits */
    assert_int_equal(ln_memplan_gpu(&g, 80.0 * GIB, 80.0 * GIB, "A100", &p, &e), 0);
    assert_true(p.covariances > 0 && p.covariances_host > 0);
    assert_true(p.covariances + p.covariances_host == sums + flags);
    assert_true(p.phase[LN_PHASE_CALIBRATION] <= 80.0 * GIB);
    assert_true(80.0 * GIB - p.phase[LN_PHASE_CALIBRATION] < 8.0 * 14336.0 * 14336 + 512); /* no sum fits more */
    printf("  8B on 80 GiB free: sums %s on the device, %s on the host; peak %s\n",
           ln_fmt_bytes(p.covariances, a, sizeof a), ln_fmt_bytes(p.covariances_host, b, sizeof b),
           ln_memplan_phase_name((ln_memplan_phase)p.peak_phase));
    assert_int_equal(p.peak_phase, LN_PHASE_CALIBRATION);
    /* without the device accumulator: no sums on the device */
    g.device_covariances = 0;
    assert_int_equal(ln_memplan_gpu(&g, 139.0 * GIB, 140.0 * GIB, "H200", &p, &e), 0);
    assert_true(p.covariances == 0 && p.covariances_host == 0);
    assert_int_equal(p.peak_phase, LN_PHASE_TRAINING);

    /* 24 GiB free: fails in training with needed vs free and its parts */
    assert_int_equal(ln_memplan_gpu(&g, 24.0 * GIB, 24.0 * GIB, "L4", &p, &e), -1);
    printf("  %s\n", e.msg);
    assert_non_null(strstr(e.msg, "GPU memory plan: the job needs "));
    assert_non_null(strstr(e.msg, " at its peak (training: weights 29.92 GiB, adapter and gradients 480.0 MiB, "));
    assert_non_null(strstr(e.msg, "but only 24.00 GiB of 24.00 GiB are free on L4; use a smaller batch"));
    assert_null(strstr(e.msg, "covariance"));
    /* bf16 copies of every linear and lm_head: 2 bytes each on top */
    g.bf16_copies = 1;
    lnb_cuda_plan pb;
    ln_memplan_gpu(&g, 24.0 * GIB, 24.0 * GIB, "L4", &pb, &e);
    double lin = 4096.0 * 4096 * 2 + 4096.0 * 1024 * 2 + 3 * 4096.0 * 14336; /* q o, k v, gate up down */
    assert_true(pb.weights - p.weights == 2.0 * (32 * lin + 128256.0 * 4096));
    g.bf16_copies = 0;

    /* a long calibration window on a small device: calibration is the peak, and the sentence says so */
    g.device_covariances = 1;
    g.calib_max_length = 65536;
    g.seq = 256;
    assert_int_equal(ln_memplan_gpu(&g, 40.0 * GIB, 40.0 * GIB, "L40S", &p, &e), -1);
    printf("  %s\n", e.msg);
    assert_int_equal(p.peak_phase, LN_PHASE_CALIBRATION);
    assert_non_null(strstr(e.msg, "at its peak (calibration: weights 29.92 GiB, calibration activations "));
    assert_non_null(strstr(e.msg, "; use a shorter calibration max_length, or more ranks"));
    g.calib_max_length = 1024;
    g.seq = 2048;

    /* 2 ranks, one GPU each: rank 1 holds its shard, no sums, no gathered adapter; rank 0 both */
    g.ranks = 2;
    g.ranks_here = 1;
    g.first_rank = 1;
    lnb_cuda_plan r1, r0;
    assert_int_equal(ln_memplan_gpu(&g, 24.0 * GIB, 24.0 * GIB, "L4", &r1, &e), -1);
    printf("  %s\n", e.msg);
    assert_non_null(strstr(e.msg, "(training, rank 1 of 2 here: weights 16.92 GiB, "));
    assert_true(r1.covariances == 0 && r1.gathered_adapter == 0 && r1.weights < p.weights);
    g.first_rank = 0;
    assert_int_equal(ln_memplan_gpu(&g, 139.0 * GIB, 140.0 * GIB, "H200", &r0, &e), 0);
    assert_true(r0.covariances == sums + flags && r0.gathered_adapter == c.adapter);
    assert_true(r0.weights == r1.weights && r0.adapter == r1.adapter);
}

static int teardown(void **state) {
    (void)state;
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_root);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_equals_engine_allocations),
        cmocka_unit_test(test_plan_per_rank_equals_shard_allocations),
        cmocka_unit_test(test_full_fine_tuning_parts),
        cmocka_unit_test(test_calibration_phase),
        cmocka_unit_test(test_available_from_meminfo_and_cgroups),
        cmocka_unit_test(test_available_from_rlimit),
        cmocka_unit_test(test_check_sentence),
        cmocka_unit_test(test_gpu_plan),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
