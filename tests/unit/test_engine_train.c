/* Unit tests for the training loop's API (train.h): a should_stop interruption leaves a
 * checkpoint that resumes to exactly the uninterrupted run; eval and on_row callbacks see every row. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/engine/adapter.h"
#include "worker/engine/train.h"

static char tmpdir[256];

static ln_config tiny_config(void)
{
    ln_config c;
    ln_err e;
    const char *j = "{\"vocab_size\":40,\"hidden_size\":16,\"intermediate_size\":24,\"num_hidden_layers\":2,"
                    "\"num_attention_heads\":4,\"num_key_value_heads\":2}";
    assert_int_equal(ln_config_parse(j, "tiny", &c, &e), 0);
    return c;
}

static ln_dataset *tiny_data(void)
{
    char *p = ln_path_join(tmpdir, "d.jsonl");
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    for (int i = 0; i < 5; i++) {
        fprintf(f, "{\"input_ids\":[");
        for (int t = 0; t < 6 + i; t++) fprintf(f, "%s%d", t ? "," : "", (i * 7 + t * 3) % 40);
        fprintf(f, "]}\n");
    }
    fclose(f);
    ln_dataset *ds;
    ln_err e;
    ln_data_opts o = {0};
    assert_int_equal(ln_dataset_load(p, NULL, &o, &ds, &e), 0);
    free(p);
    return ds;
}

typedef struct { int calls, stop_after, rows, evals; } cb_state;

static int stop_cb(void *ctx)
{
    cb_state *s = ctx;
    return s->stop_after > 0 && s->calls++ >= s->stop_after;
}
static void row_cb(json_t *row, void *ctx)
{
    cb_state *s = ctx;
    assert_non_null(json_object_get(row, "loss"));
    assert_non_null(json_object_get(row, "grad_norm"));
    s->rows++;
}
static int eval_cb(ln_model *m, ln_adapter *ad, int64_t step, json_t *row, void *ctx, ln_err *e)
{
    cb_state *s = ctx;
    json_object_set_new(row, "probe", json_integer(step));
    s->evals++;
    return 0;
}

/* Trains 8 steps (or until should_stop), returning the B factor of layer 1's v_proj. */
static void run(const char *out, int stop_after, const char *resume, float *b_out, cb_state *st)
{
    ln_config c = tiny_config();
    ln_model *m;
    ln_err e = {{0}};
    assert_int_equal(ln_model_new_random(&c, lnb_cpu(), 5, &m, &e), 0);
    ln_dataset *ds = tiny_data();
    ln_adapter ad;
    if (resume) {
        assert_int_equal(ln_train_load_checkpoint(m, resume, &ad, &e), 0);
    } else {
        ln_adapter_opts ao = {.method = "lora", .rank = 2, .seed = 3};
        assert_int_equal(ln_adapter_init(m, &ad, &ao, &e), 0);
    }
    ln_train_opts o = ln_train_defaults();
    o.max_steps = 8;
    o.batch_size = 2;
    o.optim.lr = 1e-2f;
    o.warmup_ratio = 0.25;
    o.out_dir = out;
    o.resume = resume;
    o.should_stop = stop_cb;
    o.on_row = row_cb;
    o.cb_ctx = st;
    o.eval = eval_cb;
    o.eval_ctx = st;
    o.eval_every = 3;
    st->stop_after = stop_after;
    ln_train_result r;
    int rc = ln_train(m, &ad, ds, &o, &r, &e);
    if (rc) fail_msg("%s", e.msg);
    if (stop_after > 0) {
        assert_true(r.stopped);
        assert_int_equal(r.steps, 3); /* optimizer steps done before the stop */
        assert_non_null(strstr(r.last_checkpoint, "step-000003"));
    } else {
        assert_int_equal(r.steps, 8);
    }
    const ln_lora *lo = &ad.lora[1 * LN_NTARGET + LN_V];
    memcpy(b_out, lo->B.w, (size_t)lo->B.n * sizeof(float));
    ln_adapter_free(&ad);
    ln_dataset_free(ds);
    ln_model_free(m);
}

static void test_should_stop_checkpoints_and_resumes_identically(void **state)
{
    (void)state;
    char *a = ln_path_join(tmpdir, "a"), *b = ln_path_join(tmpdir, "b");
    float fa[32] = {0}, fb[32] = {0}; /* B of v_proj: 8 × 2 used, the rest stays 0 */
    cb_state sa = {0}, sb = {0}, sc = {0};
    run(a, 0, NULL, fa, &sa);
    assert_int_equal(sa.rows, 8);
    assert_int_equal(sa.evals, 3); /* steps 3, 6 and the last */
    run(b, 3, NULL, fb, &sb);      /* stops before the 4th step */
    assert_int_equal(sb.rows, 3);
    char *ck = ln_path_join(b, "checkpoints/step-000003");
    run(b, 0, ck, fb, &sc);
    assert_int_equal(sc.rows, 5);
    assert_memory_equal(fa, fb, sizeof fa);
    /* any B entry moved: the comparison is not between two zero matrices */
    int moved = 0;
    for (size_t i = 0; i < sizeof fa / sizeof *fa; i++) moved |= fa[i] != 0.0f;
    assert_true(moved);
    free(ck);
    free(a);
    free(b);
}

static void test_resume_refuses_a_non_checkpoint(void **state)
{
    (void)state;
    ln_config c = tiny_config();
    ln_model *m;
    ln_err e = {{0}};
    assert_int_equal(ln_model_new_random(&c, lnb_cpu(), 5, &m, &e), 0);
    char *p = ln_path_join(tmpdir, "plain.safetensors");
    st_writer *w = st_writer_new();
    float x[2] = {1, 2};
    int64_t shape[1] = {2};
    st_writer_add(w, "x", ST_F32, 1, shape, x);
    assert_int_equal(st_writer_write(w, p, &e), 0);
    st_writer_free(w);
    ln_adapter ad;
    assert_int_equal(ln_train_load_checkpoint(m, p, &ad, &e), -1);
    assert_non_null(strstr(e.msg, "not a loranull checkpoint"));
    free(p);
    ln_model_free(m);
}

/* The lm_head on trained rows only, in chunks and fused with its backward (training), gives the
 * loss and gradients of the plain full-logits pass. 2 × 700 rows: more than one LN_HEAD_CHUNK. */
static void test_trained_rows_only_equals_full_logits(void **state)
{
    (void)state;
    ln_config c = tiny_config();
    ln_model *m;
    ln_err e = {{0}};
    assert_int_equal(ln_model_new_random(&c, lnb_cpu(), 9, &m, &e), 0);
    ln_adapter ad;
    ln_adapter_opts ao = {.method = "full"};
    assert_int_equal(ln_adapter_init(m, &ad, &ao, &e), 0);
    enum { B = 2, T = 700 };
    int32_t *ids = malloc(B * T * sizeof(int32_t)), *tg = malloc(B * T * sizeof(int32_t));
    int64_t nt = 0;
    for (int i = 0; i < B * T; i++) {
        ids[i] = (i * 7 + 3) % 40;
        tg[i] = (i % 5 == 0 || i % T > 650) ? -100 : (i * 11 + 1) % 40; /* masked prompt-like rows */
        nt += tg[i] >= 0;
    }
    assert_true(nt > LN_HEAD_CHUNK);
    ln_batch b = {.B = B, .T = T, .ids = ids, .targets = tg, .n_targets = nt};
    float scale = 1.0f / (float)nt;
    double loss[2];
    float *g[2], *gl[2];
    for (int mode = 0; mode < 2; mode++) {
        ln_acts *a = ln_acts_new();
        ln_fwd_opts o = {.trained_rows_only = mode, .head_grad_scale = mode ? scale : 0.0f};
        memset(m->embed.g, 0, (size_t)m->embed.n * sizeof(float));
        memset(m->lm_head.g, 0, (size_t)m->lm_head.n * sizeof(float));
        assert_int_equal(ln_model_forward(m, &ad, a, &b, &o, &loss[mode], &e), 0);
        assert_int_equal(ln_model_backward(m, &ad, a, &b, scale, &e), 0);
        g[mode] = malloc((size_t)m->embed.n * sizeof(float));
        memcpy(g[mode], m->embed.g, (size_t)m->embed.n * sizeof(float));
        gl[mode] = malloc((size_t)m->lm_head.n * sizeof(float));
        memcpy(gl[mode], m->lm_head.g, (size_t)m->lm_head.n * sizeof(float));
        if (mode) { /* a backward with another scale than the fused head used is refused */
            assert_int_equal(ln_model_backward(m, &ad, a, &b, 2 * scale, &e), -1);
            assert_non_null(strstr(e.msg, "head_grad_scale"));
        }
        ln_acts_free(m, a);
    }
    assert_float_equal(loss[0], loss[1], 1e-6 * loss[0]);
    float **pairs[2] = {g, gl};
    int64_t ns[2] = {m->embed.n, m->lm_head.n};
    for (int k = 0; k < 2; k++) {
        double num = 0, den = 0;
        for (int64_t i = 0; i < ns[k]; i++) {
            double d = (double)pairs[k][0][i] - pairs[k][1][i];
            num += d * d;
            den += (double)pairs[k][0][i] * pairs[k][0][i];
        }
        assert_true(den > 0);
        assert_true(num <= 1e-10 * den);
    }
    free(g[0]); free(g[1]); free(gl[0]); free(gl[1]);
    free(ids);
    free(tg);
    ln_adapter_free(&ad);
    ln_model_free(m);
}

/* The rotary tables live in the model's backend memory (model.c's rope_ensure: computed on the
 * host, uploaded): a counting backend holds them after a forward, their values are the host formula's
 * bits, a longer forward grows them (the old ones freed) without changing a shorter forward's loss,
 * and ln_model_free gives every buffer back. */
#define ROPE_LIVE 1024
static void *g_rope_live[ROPE_LIVE];
static int g_rope_nlive;
static void *rope_count_alloc(size_t n)
{
    void *p = lnb_cpu()->alloc(n);
    for (int i = 0; p && i < ROPE_LIVE; i++)
        if (!g_rope_live[i]) {
            g_rope_live[i] = p;
            g_rope_nlive++;
            return p;
        }
    fail_msg("counting backend: more than %d live buffers", ROPE_LIVE);
    return NULL;
}
static void rope_count_free(void *p)
{
    for (int i = 0; p && i < ROPE_LIVE; i++)
        if (g_rope_live[i] == p) {
            g_rope_live[i] = NULL;
            g_rope_nlive--;
        }
    lnb_cpu()->free(p);
}
static int rope_is_live(const void *p)
{
    for (int i = 0; p && i < ROPE_LIVE; i++)
        if (g_rope_live[i] == p) return 1;
    return 0;
}
static void check_rope_tables(const ln_model *m, int T)
{
    const int half = m->cfg.head_dim / 2;
    assert_int_equal(m->rope_T, T);
    assert_true(rope_is_live(m->rope_cos) && rope_is_live(m->rope_sin));
    float inv[64], *c = malloc((size_t)T * half * sizeof(float)), *s = malloc((size_t)T * half * sizeof(float));
    assert_true(half <= 64);
    ln_config_rope_inv_freq(&m->cfg, inv);
    m->be->download(c, m->rope_cos, (size_t)T * half * sizeof(float));
    m->be->download(s, m->rope_sin, (size_t)T * half * sizeof(float));
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            float ang = (float)t * inv[i], wc = cosf(ang), ws = sinf(ang);
            assert_memory_equal(&c[t * half + i], &wc, sizeof wc);
            assert_memory_equal(&s[t * half + i], &ws, sizeof ws);
        }
    free(c);
    free(s);
}
static double rope_forward_loss(ln_model *m, int T)
{
    int32_t ids[32], tg[32];
    for (int t = 0; t < T; t++) {
        ids[t] = (t * 7 + 3) % 40;
        tg[t] = (t * 11 + 1) % 40;
    }
    ln_batch b = {.B = 1, .T = T, .ids = ids, .targets = tg, .n_targets = T};
    ln_acts *a = ln_acts_new();
    ln_fwd_opts o = {.trained_rows_only = 1};
    double loss = 0;
    ln_err e = {{0}};
    assert_int_equal(ln_model_forward(m, NULL, a, &b, &o, &loss, &e), 0);
    ln_acts_free(m, a);
    return loss;
}
static void test_rope_tables_in_backend_memory(void **state)
{
    (void)state;
    lnb_backend be = *lnb_cpu();
    be.alloc = rope_count_alloc;
    be.free = rope_count_free;
    ln_config c = tiny_config();
    ln_model *m;
    ln_err e = {{0}};
    assert_int_equal(ln_model_new_random(&c, &be, 5, &m, &e), 0);
    assert_null(m->rope_cos);
    const int held = g_rope_nlive;
    double short1 = rope_forward_loss(m, 6);
    check_rope_tables(m, 6);
    assert_int_equal(g_rope_nlive, held + 2); /* cos and sin, nothing else left behind */
    rope_forward_loss(m, 30);
    check_rope_tables(m, 30);
    assert_int_equal(g_rope_nlive, held + 2); /* the 6-position tables were given back */
    double short2 = rope_forward_loss(m, 6);
    check_rope_tables(m, 30); /* a shorter forward keeps them */
    assert_memory_equal(&short1, &short2, sizeof short1);
    ln_model_free(m);
    assert_int_equal(g_rope_nlive, 0);
}

/* A packed row (two examples back to back + padding, ln_batch.segment) computes exactly what the
 * two examples compute as separate sequences: the same loss sum and every gradient. */
typedef struct { float *buf; int64_t off; } grab_ctx;
static void grab(ln_param *p, void *ctx)
{
    grab_ctx *g = ctx;
    if (!p->g) return;
    memcpy(g->buf + g->off, p->g, (size_t)p->n * sizeof(float));
    g->off += p->n;
}
static void zero_g(ln_param *p, void *ctx)
{
    (void)ctx;
    if (p->g) memset(p->g, 0, (size_t)p->n * sizeof(float));
}

static void test_packed_rows_equal_separate_sequences(void **state)
{
    (void)state;
    ln_config c = tiny_config();
    ln_model *m;
    ln_err e = {{0}};
    assert_int_equal(ln_model_new_random(&c, lnb_cpu(), 21, &m, &e), 0);
    ln_adapter ad;
    ln_adapter_opts ao = {.method = "full"};
    assert_int_equal(ln_adapter_init(m, &ad, &ao, &e), 0);
    int32_t e1[7] = {3, 9, 14, 2, 27, 8, 30}, e2[5] = {11, 4, 39, 17, 6};
    /* separate: B = 2, T = 7, right-padded; position t predicts token t+1 of its own example */
    int32_t ids_s[14] = {0}, tg_s[14];
    for (int i = 0; i < 14; i++) tg_s[i] = -100;
    for (int t = 0; t < 7; t++) { ids_s[t] = e1[t]; if (t < 6) tg_s[t] = e1[t + 1]; }
    for (int t = 0; t < 5; t++) { ids_s[7 + t] = e2[t]; if (t < 4) tg_s[7 + t] = e2[t + 1]; }
    ln_batch sep = {.B = 2, .T = 7, .ids = ids_s, .targets = tg_s, .n_targets = 10};
    /* packed: one row of 15 = e1 ++ e2 ++ 3 padding tokens */
    int32_t ids_p[15] = {0}, tg_p[15], seg[15];
    for (int i = 0; i < 15; i++) { tg_p[i] = -100; seg[i] = -1; }
    for (int t = 0; t < 7; t++) { ids_p[t] = e1[t]; seg[t] = 0; if (t < 6) tg_p[t] = e1[t + 1]; }
    for (int t = 0; t < 5; t++) { ids_p[7 + t] = e2[t]; seg[7 + t] = 1; if (t < 4) tg_p[7 + t] = e2[t + 1]; }
    ln_batch pk = {.B = 1, .T = 15, .ids = ids_p, .targets = tg_p, .n_targets = 10};
    int64_t total = 0;
    double loss[2];
    float *grads[2];
    ln_batch *bs[2] = {&sep, &pk};
    for (int k = 0; k < 2; k++) {
        ln_model_for_each_param(m, zero_g, NULL);
        ln_acts *a = ln_acts_new();
        ln_fwd_opts fo = {.segment = k ? seg : NULL};
        assert_int_equal(ln_model_forward(m, &ad, a, bs[k], &fo, &loss[k], &e), 0);
        assert_int_equal(ln_model_backward(m, &ad, a, bs[k], 0.1f, &e), 0);
        grads[k] = calloc(1 << 16, sizeof(float));
        grab_ctx g = {grads[k], 0};
        ln_model_for_each_param(m, grab, &g);
        total = g.off;
        assert_true(total < (1 << 16));
        ln_acts_free(m, a);
    }
    assert_float_equal(loss[0], loss[1], 1e-5 * loss[0]);
    double num = 0, den = 0;
    for (int64_t i = 0; i < total; i++) {
        double d = (double)grads[0][i] - grads[1][i];
        num += d * d;
        den += (double)grads[0][i] * grads[0][i];
    }
    assert_true(den > 0);
    assert_true(num <= 1e-10 * den);
    /* without the segments the packed row would let e2 attend to e1: a different loss */
    ln_acts *a = ln_acts_new();
    double leak;
    assert_int_equal(ln_model_forward(m, &ad, a, &pk, NULL, &leak, &e), 0);
    assert_true(fabs(leak - loss[0]) > 1e-4 * loss[0]);
    ln_acts_free(m, a);
    free(grads[0]);
    free(grads[1]);
    ln_adapter_free(&ad);
    ln_model_free(m);
}

/* Weights grown so large that the activations overflow fail the next step, naming it, instead of
 * training on with a flat ln(V) loss and no gradient. */
typedef struct { int rows, bad_rows; } div_state;
static void div_row(json_t *row, void *ctx)
{
    div_state *s = ctx;
    s->rows++;
    s->bad_rows += !isfinite(json_number_value(json_object_get(row, "loss")));
}

static void test_overflowing_update_fails_naming_the_step(void **state)
{
    (void)state;
    ln_config c = tiny_config();
    ln_model *m;
    ln_err e = {{0}};
    assert_int_equal(ln_model_new_random(&c, lnb_cpu(), 5, &m, &e), 0);
    ln_dataset *ds = tiny_data();
    ln_adapter ad;
    ln_adapter_opts ao = {.method = "lora", .rank = 2, .seed = 3};
    assert_int_equal(ln_adapter_init(m, &ad, &ao, &e), 0);
    ln_train_opts o = ln_train_defaults();
    o.max_steps = 8;
    o.batch_size = 2;
    /* Adam's first update moves every B entry by ~lr: the hidden states' Σx² then overflows a float
     * while every weight stays finite (before the check: loss ln(40) at every step, gradient 0). */
    o.optim.lr = 1e10f;
    o.optim.max_grad_norm = 0;
    div_state st = {0};
    o.on_row = div_row;
    o.cb_ctx = &st;
    ln_train_result r;
    int rc = ln_train(m, &ad, ds, &o, &r, &e);
    assert_int_equal(rc, -1);
    assert_non_null(strstr(e.msg, "not finite"));
    /* the step that overflowed: no row was reported for it, and the rows before were finite */
    char want[64];
    snprintf(want, sizeof want, "train step %d:", st.rows + 1);
    if (!strstr(e.msg, want)) fail_msg("expected '%s' in: %s", want, e.msg);
    assert_true(st.rows < 8);
    assert_int_equal(st.bad_rows, 0);
    assert_int_equal(st.rows, 1);
    ln_adapter_free(&ad);

    /* An update that itself overflows to inf fails at once, naming the tensor. */
    assert_int_equal(ln_adapter_init(m, &ad, &ao, &e), 0);
    o.optim.lr = 3e38f;
    st.rows = 0;
    assert_int_equal(ln_train(m, &ad, ds, &o, &r, &e), -1);
    if (!strstr(e.msg, "train step 1:") || !strstr(e.msg, "lora_") || !strstr(e.msg, "not finite after the update"))
        fail_msg("unexpected error: %s", e.msg);
    assert_int_equal(st.rows, 0);
    ln_adapter_free(&ad);
    ln_dataset_free(ds);
    ln_model_free(m);
}

/* A model whose file holds an inf is refused at load, naming the tensor. */
static void test_model_with_a_non_finite_weight_is_refused(void **state)
{
    (void)state;
    ln_config c = tiny_config();
    ln_model *m;
    ln_err e = {{0}};
    assert_int_equal(ln_model_new_random(&c, lnb_cpu(), 5, &m, &e), 0);
    char *dir = ln_path_join(tmpdir, "bad-model");
    assert_int_equal(ln_mkdir_p(dir, &e), 0);
    assert_int_equal(ln_model_save(m, dir, ST_F32, &e), 0);
    ln_model *ok;
    assert_int_equal(ln_model_load(dir, lnb_cpu(), &ok, &e), 0); /* the clean copy loads */
    ln_model_free(ok);
    m->layers[1].lin[LN_O].w[5] = INFINITY;
    assert_int_equal(ln_model_save(m, dir, ST_F32, &e), 0);
    ln_model *bad = NULL;
    assert_int_equal(ln_model_load(dir, lnb_cpu(), &bad, &e), -1);
    assert_null(bad);
    if (!strstr(e.msg, "model.layers.1.self_attn.o_proj.weight") || !strstr(e.msg, "not finite") ||
        !strstr(e.msg, "index 5"))
        fail_msg("unexpected error: %s", e.msg);
    free(dir);
    ln_model_free(m);
}

/* Writes a NaN into element `at` of F32 tensor `name` of a safetensors file, in place. */
static void poison_tensor(const char *path, const char *name, int at)
{
    char *buf;
    size_t len;
    ln_err e;
    assert_int_equal(ln_read_file(path, &buf, &len, &e), 0);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | (unsigned char)buf[i];
    json_t *h = json_loadb(buf + 8, (size_t)hlen, 0, NULL);
    assert_non_null(h);
    json_t *t = json_object_get(h, name);
    if (!t) fail_msg("no tensor %s in %s", name, path);
    assert_string_equal(json_string_value(json_object_get(t, "dtype")), "F32");
    size_t off = 8 + (size_t)hlen + (size_t)json_integer_value(json_array_get(json_object_get(t, "data_offsets"), 0));
    float nan = NAN;
    memcpy(buf + off + (size_t)at * sizeof(float), &nan, sizeof nan);
    json_decref(h);
    assert_int_equal(ln_write_file_atomic(path, buf, len, &e), 0);
    free(buf);
}

/* A checkpoint whose adapter holds a NaN is refused when loaded, naming the tensor. */
static void test_checkpoint_with_a_nan_is_refused(void **state)
{
    (void)state;
    char *out = ln_path_join(tmpdir, "nan-ck");
    float b[32];
    cb_state st = {0};
    run(out, 3, NULL, b, &st);
    char *ck = ln_path_join(out, "checkpoints/step-000003");
    ln_config c = tiny_config();
    ln_model *m;
    ln_err e = {{0}};
    assert_int_equal(ln_model_new_random(&c, lnb_cpu(), 5, &m, &e), 0);
    ln_adapter ad;
    assert_int_equal(ln_train_load_checkpoint(m, ck, &ad, &e), 0); /* the clean one loads */
    ln_adapter_free(&ad);
    char *file = ln_path_join(ck, "state.safetensors");
    const char *name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    poison_tensor(file, name, 3);
    assert_int_equal(ln_train_load_checkpoint(m, ck, &ad, &e), -1);
    if (!strstr(e.msg, name) || !strstr(e.msg, "not finite") || !strstr(e.msg, "index 3"))
        fail_msg("unexpected error: %s", e.msg);
    free(file);
    free(ck);
    free(out);
    ln_model_free(m);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ln_test_train_%d", (int)getpid());
    ln_err e;
    if (ln_mkdir_p(tmpdir, &e)) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_should_stop_checkpoints_and_resumes_identically),
        cmocka_unit_test(test_resume_refuses_a_non_checkpoint),
        cmocka_unit_test(test_trained_rows_only_equals_full_logits),
        cmocka_unit_test(test_packed_rows_equal_separate_sequences),
        cmocka_unit_test(test_overflowing_update_fails_naming_the_step),
        cmocka_unit_test(test_model_with_a_non_finite_weight_is_refused),
        cmocka_unit_test(test_checkpoint_with_a_nan_is_refused),
        cmocka_unit_test(test_rope_tables_in_backend_memory),
    };
    int rc = cmocka_run_group_tests_name("engine training loop", tests, NULL, NULL);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) rc = rc ? rc : 1;
    return rc;
}
