/* Activation recomputation (ln_model.recompute): the same loss and bit-identical gradients as
 * keeping every activation — LoRA on all targets, LoRA-Null-v2-style (A frozen), full
 * fine-tuning, and a tensor-parallel shard on 2 thread ranks — and 5 AdamW steps that stay
 * bit-identical; plus the switch between the two modes on one ln_acts. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "worker/engine/adapter.h"
#include "worker/engine/model.h"
#include "worker/engine/optim.h"
#include "worker/engine/rng.h"
#include "worker/engine/tensor_parallel.h"
#include "worker/engine/train.h"

static const char *CONFIG =
    "{\"vocab_size\":64,\"hidden_size\":32,\"intermediate_size\":48,\"num_hidden_layers\":3,"
    "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":8,\"max_position_embeddings\":64,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"tie_word_embeddings\":true}";

enum { LORA, FROZEN_A, FULL };

static void build(int kind, ln_model **m, ln_adapter *ad)
{
    ln_config c;
    ln_err e = {{0}};
    assert_int_equal(ln_config_parse(CONFIG, "recompute-config", &c, &e), 0);
    assert_int_equal(ln_model_new_random(&c, lnb_cpu(), 4, m, &e), 0);
    memset(ad, 0, sizeof *ad);
    if (kind == FULL) {
        ad->full = 1;
        ad->num_layers = c.num_layers;
        assert_int_equal(ln_model_set_full_training(*m, &e), 0);
        return;
    }
    assert_int_equal(ln_adapter_alloc(*m, ad, "lora", 4, 8.0f, LN_TARGETS_ALL, &e), 0);
    ln_rng r;
    ln_rng_seed(&r, 8);
    for (int i = 0; i < c.num_layers * LN_NTARGET; i++) {
        for (int64_t j = 0; j < ad->lora[i].A.n; j++) ad->lora[i].A.w[j] = 0.2f * ln_rng_normal(&r);
        for (int64_t j = 0; j < ad->lora[i].B.n; j++) ad->lora[i].B.w[j] = 0.2f * ln_rng_normal(&r);
        if (kind == FROZEN_A) assert_int_equal(ln_param_set_trainable(lnb_cpu(), &ad->lora[i].A, 0, &e), 0);
    }
}

static void batch(ln_batch *b)
{
    ln_rng r;
    ln_rng_seed(&r, 17);
    b->B = 2;
    b->T = 12;
    b->ids = malloc(24 * sizeof(int32_t));
    b->targets = malloc(24 * sizeof(int32_t));
    b->n_targets = 0;
    for (int i = 0; i < 24; i++) {
        b->ids[i] = (int32_t)(ln_rng_u64(&r) % 64);
        b->targets[i] = i % 5 == 0 ? -100 : (int32_t)(ln_rng_u64(&r) % 64);
        b->n_targets += b->targets[i] >= 0;
    }
}

/* 5 steps; returns the losses and (copies of) the first step's gradients. */
typedef struct { double loss[5]; float **g; int64_t *sz; int n; } run_out;

static int run(ln_model *m, ln_adapter *ad, run_out *o, ln_err *e)
{
    ln_batch b;
    batch(&b);
    ln_param **ps;
    o->n = ln_trainable_params(m, ad->full ? NULL : ad, &ps);
    o->g = calloc((size_t)o->n, sizeof(float *));
    o->sz = calloc((size_t)o->n, sizeof(int64_t));
    for (int i = 0; i < o->n; i++) o->sz[i] = ps[i]->n;
    ln_optim_cfg oc = ln_optim_defaults();
    oc.lr = 1e-2f;
    oc.total_steps = 5;
    ln_optim opt;
    ln_acts *a = ln_acts_new();
    ln_adapter *use = ad->full ? NULL : ad;
    int rc = ln_optim_init(&opt, m->be, ps, o->n, &oc, e);
    for (int s = 0; s < 5 && rc == 0; s++) {
        ln_optim_zero_grad(&opt);
        rc = ln_model_forward(m, use, a, &b, NULL, &o->loss[s], e);
        if (rc == 0) rc = ln_model_backward(m, use, a, &b, 1.0f / (float)b.n_targets, e);
        if (rc == 0) rc = ln_tp_reduce_grads(m, use, e);
        double norm = 0;
        if (rc == 0) rc = ln_tp_grad_norm(m, use, &norm, e);
        if (rc) break;
        if (s == 0)
            for (int i = 0; i < o->n; i++) {
                o->g[i] = malloc((size_t)ps[i]->n * sizeof(float));
                memcpy(o->g[i], ps[i]->g, (size_t)ps[i]->n * sizeof(float));
            }
        ln_optim_step(&opt, ln_lr_at(&oc, s), norm > 1.0 ? (float)(1.0 / (norm + 1e-6)) : 1.0f);
    }
    ln_optim_free(&opt);
    ln_acts_free(m, a);
    free(ps);
    ln_batch_free(&b);
    return rc;
}

static void same(run_out *x, run_out *y)
{
    assert_int_equal(x->n, y->n);
    assert_memory_equal(x->loss, y->loss, sizeof x->loss);
    for (int i = 0; i < x->n; i++) {
        assert_int_equal(x->sz[i], y->sz[i]);
        assert_memory_equal(x->g[i], y->g[i], (size_t)x->sz[i] * sizeof(float));
    }
    assert_true(x->loss[4] < x->loss[0]);
}

static void free_out(run_out *o)
{
    for (int i = 0; i < o->n; i++) free(o->g[i]);
    free(o->g);
    free(o->sz);
}

static void check(int kind)
{
    ln_model *m0, *m1;
    ln_adapter a0, a1;
    build(kind, &m0, &a0);
    build(kind, &m1, &a1);
    m1->recompute = 1;
    run_out k = {0}, r = {0};
    ln_err e = {{0}};
    assert_int_equal(run(m0, &a0, &k, &e), 0);
    assert_int_equal(run(m1, &a1, &r, &e), 0);
    same(&k, &r);
    printf("  kind %d: %d gradients and 5 losses bit-identical with recomputation (loss sum %.4f -> %.4f)\n", kind, k.n,
           k.loss[0], k.loss[4]);
    free_out(&k);
    free_out(&r);
    if (!a0.full) { ln_adapter_free(&a0); ln_adapter_free(&a1); }
    ln_model_free(m0);
    ln_model_free(m1);
}

static void test_lora(void **s) { (void)s; check(LORA); }
static void test_frozen_a(void **s) { (void)s; check(FROZEN_A); }
static void test_full(void **s) { (void)s; check(FULL); }

/* Tensor parallel: 2 thread ranks with recomputation = 2 ranks without, bit for bit. */
typedef struct { ln_model *full; ln_adapter *full_ad; int recompute; run_out out; } tp_ctx;

static int tp_rank(ln_comm *c, void *p, ln_err *e)
{
    tp_ctx *x = p;
    ln_model *sh;
    ln_adapter sad;
    if (ln_tp_shard_model(x->full, c, &sh, e) || ln_tp_shard_adapter(x->full, x->full_ad, sh, &sad, e)) return -1;
    sh->recompute = x->recompute;
    int rc = run(sh, &sad, &x->out, e);
    ln_adapter_free(&sad);
    ln_model_free(sh);
    return rc;
}

static void test_tensor_parallel(void **s)
{
    (void)s;
    ln_model *m;
    ln_adapter ad;
    build(LORA, &m, &ad);
    tp_ctx c[2][2];
    ln_err e = {{0}};
    for (int rec = 0; rec < 2; rec++) {
        void *ptrs[2];
        for (int r = 0; r < 2; r++) {
            c[rec][r] = (tp_ctx){.full = m, .full_ad = &ad, .recompute = rec};
            ptrs[r] = &c[rec][r];
        }
        if (comm_thread_run(2, tp_rank, ptrs, &e)) fail_msg("%s", e.msg);
    }
    for (int r = 0; r < 2; r++) {
        same(&c[0][r].out, &c[1][r].out);
        free_out(&c[0][r].out);
        free_out(&c[1][r].out);
    }
    ln_adapter_free(&ad);
    ln_model_free(m);
}

/* One ln_acts used with and without recomputation in turn (it reallocates for the mode). */
static void test_switch_modes(void **s)
{
    (void)s;
    ln_model *m;
    ln_adapter ad;
    build(LORA, &m, &ad);
    ln_batch b;
    batch(&b);
    ln_acts *a = ln_acts_new();
    ln_err e = {{0}};
    double l[3];
    for (int i = 0; i < 3; i++) {
        m->recompute = i == 1;
        assert_int_equal(ln_model_forward(m, &ad, a, &b, NULL, &l[i], &e), 0);
        assert_int_equal(ln_model_backward(m, &ad, a, &b, 1.0f, &e), 0);
    }
    assert_true(l[0] == l[1] && l[1] == l[2]);
    ln_acts_free(m, a);
    ln_batch_free(&b);
    ln_adapter_free(&ad);
    ln_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lora), cmocka_unit_test(test_frozen_a), cmocka_unit_test(test_full),
        cmocka_unit_test(test_tensor_parallel), cmocka_unit_test(test_switch_modes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
