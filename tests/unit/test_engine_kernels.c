/* Unit tests for the CPU backend kernels: every backward against central finite differences of
 * its forward (loss = Σ out ⊙ R for a fixed random R), plus the optimizer, schedule and config. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <omp.h>

#include "worker/backend/backend.h"
#include "worker/engine/config.h"
#include "worker/engine/model.h"
#include "worker/engine/optim.h"
#include "worker/engine/rng.h"

static ln_rng R;

static float *randv(int64_t n, float sc)
{
    float *v = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) v[i] = sc * ln_rng_normal(&R);
    return v;
}

static double dotv(const float *a, const float *b, int64_t n)
{
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* Relative error ‖a − b‖ / ‖b‖. */
static double relerr(const double *a, const double *b, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) { num += (a[i] - b[i]) * (a[i] - b[i]); den += b[i] * b[i]; }
    return sqrt(num / (den > 0 ? den : 1));
}

/* Central differences of loss() with respect to x[0..n), step h. */
typedef double (*loss_fn)(void *ctx);
static void numgrad(float *x, int64_t n, loss_fn f, void *ctx, double *out, float h)
{
    for (int64_t i = 0; i < n; i++) {
        float keep = x[i];
        x[i] = keep + h;
        double lp = f(ctx);
        x[i] = keep - h;
        double lm = f(ctx);
        x[i] = keep;
        out[i] = (lp - lm) / (2.0 * h);
    }
}

static double *to_d(const float *v, int64_t n)
{
    double *d = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) d[i] = v[i];
    return d;
}

/* ---------------------------------------------------------------- rmsnorm */

typedef struct { float *x, *w, *out, *rstd, *r; int N, C; } rms_ctx;
static double rms_loss(void *p)
{
    rms_ctx *c = p;
    lnb_cpu()->rmsnorm_forward(c->out, c->rstd, c->x, c->w, c->N, c->C, 1e-5f);
    return dotv(c->out, c->r, (int64_t)c->N * c->C);
}

static void test_rmsnorm_backward(void **state)
{
    (void)state;
    const lnb_backend *be = lnb_cpu();
    int N = 3, C = 8;
    rms_ctx c = {randv(N * C, 1), randv(C, 1), calloc(N * C, 4), calloc(N, 4), randv(N * C, 1), N, C};
    float *dx = calloc(N * C, 4), *dw = calloc(C, 4);
    rms_loss(&c);
    be->rmsnorm_backward(dx, dw, c.r, c.x, c.w, c.rstd, N, C);
    double *nx = malloc(N * C * 8), *nw = malloc(C * 8), *ax = to_d(dx, N * C), *aw = to_d(dw, C);
    numgrad(c.x, N * C, rms_loss, &c, nx, 1e-2f);
    numgrad(c.w, C, rms_loss, &c, nw, 1e-2f);
    assert_true(relerr(ax, nx, N * C) < 2e-3);
    assert_true(relerr(aw, nw, C) < 2e-3);
    /* dx accumulates: a second call doubles it */
    be->rmsnorm_backward(dx, NULL, c.r, c.x, c.w, c.rstd, N, C);
    assert_float_equal(dx[5], 2 * ax[5], 1e-5);
    free(c.x); free(c.w); free(c.out); free(c.rstd); free(c.r); free(dx); free(dw);
    free(nx); free(nw); free(ax); free(aw);
}

/* ---------------------------------------------------------------- rope */

static void test_rope_backward_is_transpose(void **state)
{
    (void)state;
    const lnb_backend *be = lnb_cpu();
    int T = 5, nh = 2, hd = 6, N = 2 * T, n = N * nh * hd;
    float *cos_t = malloc(T * 3 * 4), *sin_t = malloc(T * 3 * 4);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < 3; i++) {
            cos_t[t * 3 + i] = cosf(0.3f * t * (i + 1));
            sin_t[t * 3 + i] = sinf(0.3f * t * (i + 1));
        }
    float *x = randv(n, 1), *y = randv(n, 1), *rx = malloc(n * 4), *ry = malloc(n * 4);
    memcpy(rx, x, n * 4);
    memcpy(ry, y, n * 4);
    be->rope_forward(rx, cos_t, sin_t, N, T, nh, hd);
    be->rope_backward(ry, cos_t, sin_t, N, T, nh, hd);
    /* ⟨R x, y⟩ = ⟨x, Rᵀ y⟩ */
    assert_float_equal(dotv(rx, y, n), dotv(x, ry, n), 1e-4);
    /* a rotation keeps norms, and position 0 is the identity */
    assert_float_equal(dotv(rx, rx, n), dotv(x, x, n), 1e-3);
    assert_float_equal(rx[0], x[0], 1e-6);
    /* backward undoes forward */
    be->rope_backward(rx, cos_t, sin_t, N, T, nh, hd);
    for (int i = 0; i < n; i++) assert_float_equal(rx[i], x[i], 1e-5);
    free(cos_t); free(sin_t); free(x); free(y); free(rx); free(ry);
}

/* ---------------------------------------------------------------- attention */

typedef struct { float *q, *k, *v, *out, *probs, *r; int B, T, nh, nkv, hd; } att_ctx;
static double att_loss(void *p)
{
    att_ctx *c = p;
    lnb_cpu()->attention_forward(c->out, c->probs, c->q, c->k, c->v, c->B, c->T, c->nh, c->nkv, c->hd);
    return dotv(c->out, c->r, (int64_t)c->B * c->T * c->nh * c->hd);
}

static void attention_backward_gqa(int B, int T, int nh, int nkv, int hd)
{
    const lnb_backend *be = lnb_cpu();
    int nq = B * T * nh * hd, nk = B * T * nkv * hd;
    att_ctx c = {randv(nq, 1), randv(nk, 1), randv(nk, 1), calloc(nq, 4), calloc(B * nh * T * T, 4),
                 randv(nq, 1), B, T, nh, nkv, hd};
    att_loss(&c);
    /* causal: the first query attends only to itself */
    assert_float_equal(c.probs[0], 1.0f, 1e-6);
    assert_float_equal(c.probs[1], 0.0f, 0);
    float *dq = calloc(nq, 4), *dk = calloc(nk, 4), *dv = calloc(nk, 4), *scr = calloc(T * T, 4);
    be->attention_backward(dq, dk, dv, scr, c.r, c.probs, c.q, c.k, c.v, B, T, nh, nkv, hd);
    double *n1 = malloc(nq * 8), *n2 = malloc(nk * 8), *n3 = malloc(nk * 8);
    numgrad(c.q, nq, att_loss, &c, n1, 1e-2f);
    numgrad(c.k, nk, att_loss, &c, n2, 1e-2f);
    numgrad(c.v, nk, att_loss, &c, n3, 1e-2f);
    double *a1 = to_d(dq, nq), *a2 = to_d(dk, nk), *a3 = to_d(dv, nk);
    assert_true(relerr(a1, n1, nq) < 2e-3);
    assert_true(relerr(a2, n2, nk) < 2e-3);
    assert_true(relerr(a3, n3, nk) < 2e-3);
    free(c.q); free(c.k); free(c.v); free(c.out); free(c.probs); free(c.r);
    free(dq); free(dk); free(dv); free(scr); free(n1); free(n2); free(n3); free(a1); free(a2); free(a3);
}

static void test_attention_backward_gqa(void **state)
{
    (void)state;
    attention_backward_gqa(2, 4, 4, 2, 4);
    /* T = 70: two query blocks of the CPU backend (64 + 6), a partial one last */
    attention_backward_gqa(1, 70, 2, 1, 2);
}

/* ---------------------------------------------------------------- swiglu */

typedef struct { float *g, *u, *out, *r; int n; } sw_ctx;
static double sw_loss(void *p)
{
    sw_ctx *c = p;
    lnb_cpu()->swiglu_forward(c->out, c->g, c->u, c->n);
    return dotv(c->out, c->r, c->n);
}

static void test_swiglu_backward(void **state)
{
    (void)state;
    int n = 20;
    sw_ctx c = {randv(n, 2), randv(n, 1), calloc(n, 4), randv(n, 1), n};
    float *dg = calloc(n, 4), *du = calloc(n, 4);
    sw_loss(&c);
    lnb_cpu()->swiglu_backward(dg, du, c.r, c.g, c.u, n);
    double *ng = malloc(n * 8), *nu = malloc(n * 8), *ag = to_d(dg, n), *au = to_d(du, n);
    numgrad(c.g, n, sw_loss, &c, ng, 1e-2f);
    numgrad(c.u, n, sw_loss, &c, nu, 1e-2f);
    assert_true(relerr(ag, ng, n) < 2e-3);
    assert_true(relerr(au, nu, n) < 2e-3);
    free(c.g); free(c.u); free(c.out); free(c.r); free(dg); free(du); free(ng); free(nu); free(ag); free(au);
}

/* ---------------------------------------------------------------- cross-entropy */

typedef struct { float *z; int32_t *y; int N, V; } ce_ctx;
static double ce_loss(void *p)
{
    ce_ctx *c = p;
    return lnb_cpu()->cross_entropy(c->z, NULL, c->y, c->N, c->V, 0);
}

static void test_cross_entropy_backward_and_mask(void **state)
{
    (void)state;
    int N = 4, V = 7;
    int32_t y[4] = {3, -100, 0, 6};
    ce_ctx c = {randv(N * V, 2), y, N, V};
    float *d = calloc(N * V, 4);
    double loss = lnb_cpu()->cross_entropy(c.z, d, y, N, V, 1.0f);
    assert_float_equal(loss, ce_loss(&c), 1e-9);
    /* direct: −log softmax(z₀)[3] */
    double mx = -1e30, s = 0;
    for (int j = 0; j < V; j++) mx = c.z[j] > mx ? c.z[j] : mx;
    for (int j = 0; j < V; j++) s += exp(c.z[j] - mx);
    double l0 = log(s) - (c.z[3] - mx);
    double l2 = 0;
    { double m2 = -1e30, s2 = 0;
      for (int j = 0; j < V; j++) m2 = c.z[V * 2 + j] > m2 ? c.z[V * 2 + j] : m2;
      for (int j = 0; j < V; j++) s2 += exp(c.z[V * 2 + j] - m2);
      l2 = log(s2) - (c.z[V * 2] - m2); }
    double l3;
    { double m3 = -1e30, s3 = 0;
      for (int j = 0; j < V; j++) m3 = c.z[V * 3 + j] > m3 ? c.z[V * 3 + j] : m3;
      for (int j = 0; j < V; j++) s3 += exp(c.z[V * 3 + j] - m3);
      l3 = log(s3) - (c.z[V * 3 + 6] - m3); }
    assert_float_equal(loss, l0 + l2 + l3, 1e-5);
    for (int j = 0; j < V; j++) assert_float_equal(d[V + j], 0.0f, 0); /* masked row */
    double *num = malloc(N * V * 8), *an = to_d(d, N * V);
    numgrad(c.z, N * V, ce_loss, &c, num, 1e-2f);
    assert_true(relerr(an, num, N * V) < 2e-3);
    free(c.z); free(d); free(num); free(an);
}

/* ---------------------------------------------------------------- embedding, matmul, sumsq */

static void test_embedding_and_matmul(void **state)
{
    (void)state;
    const lnb_backend *be = lnb_cpu();
    float table[3 * 2] = {1, 2, 3, 4, 5, 6}, out[4 * 2], dt[6] = {0};
    int32_t ids[4] = {2, 0, 2, 1};
    be->embedding_forward(out, ids, table, 4, 2);
    assert_float_equal(out[0], 5, 0);
    assert_float_equal(out[7], 4, 0);
    float g[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    be->embedding_backward(dt, g, ids, 4, 2);
    assert_float_equal(dt[4], 2, 0); /* id 2 twice */
    assert_float_equal(dt[0], 1, 0);
    /* C = Aᵀ B with A (2×3) stored, B (2×2) */
    float A[6] = {1, 2, 3, 4, 5, 6}, Bm[4] = {1, 0, 0, 1}, Cm[6];
    be->matmul(1, 0, 3, 2, 2, 1.0f, A, 3, Bm, 2, 0.0f, Cm, 2);
    float want[6] = {1, 4, 2, 5, 3, 6};
    for (int i = 0; i < 6; i++) assert_float_equal(Cm[i], want[i], 0);
    float *big = randv(10000, 1);
    double s = 0;
    for (int i = 0; i < 10000; i++) s += (double)big[i] * big[i];
    assert_float_equal(be->sumsq(big, 10000), s, 1e-6 * s);
    free(big);
}

/* The backend splits large products over threads by rows (M ≥ N) or columns (M < N), with and
 * without transposes and leading dimensions wider than the matrix: all against a plain triple loop. */
static void test_matmul_split_paths(void **state)
{
    (void)state;
    omp_set_num_threads(3); /* an odd count: blocks of unequal size */
    const lnb_backend *be = lnb_cpu();
    int shapes[2][3] = {{301, 70, 100}, {40, 517, 130}}; /* row split, column split (> 4e6 flops each) */
    for (int sh = 0; sh < 2; sh++)
        for (int tA = 0; tA < 2; tA++)
            for (int tB = 0; tB < 2; tB++) {
                int M = shapes[sh][0], N = shapes[sh][1], K = shapes[sh][2];
                int lda = (tA ? M : K) + 3, ldb = (tB ? K : N) + 5, ldc = N + 2;
                float *A = randv((int64_t)(tA ? K : M) * lda, 1), *B = randv((int64_t)(tB ? N : K) * ldb, 1);
                float *C = randv((int64_t)M * ldc, 1), *C0 = malloc((size_t)M * ldc * sizeof(float));
                memcpy(C0, C, (size_t)M * ldc * sizeof(float));
                be->matmul(tA, tB, M, N, K, 0.5f, A, lda, B, ldb, 2.0f, C, ldc);
                double err = 0, ref2 = 0;
                for (int i = 0; i < M; i++)
                    for (int j = 0; j < N; j++) {
                        double acc = 0;
                        for (int k = 0; k < K; k++)
                            acc += (double)(tA ? A[(int64_t)k * lda + i] : A[(int64_t)i * lda + k]) *
                                   (tB ? B[(int64_t)j * ldb + k] : B[(int64_t)k * ldb + j]);
                        double want = 0.5 * acc + 2.0 * C0[(int64_t)i * ldc + j];
                        err += (C[(int64_t)i * ldc + j] - want) * (C[(int64_t)i * ldc + j] - want);
                        ref2 += want * want;
                    }
                assert_true(sqrt(err / ref2) < 1e-5);
                /* the padding columns beyond N are untouched */
                assert_float_equal(C[N], C0[N], 0);
                free(A); free(B); free(C); free(C0);
            }
    omp_set_num_threads(omp_get_num_procs());
}

/* ---------------------------------------------------------------- AdamW, schedule, config */

static void test_adamw_matches_formula(void **state)
{
    (void)state;
    float p[2] = {1.0f, -2.0f}, g[2] = {0.5f, -1.0f}, m[2] = {0}, v[2] = {0};
    float lr = 0.1f, wd = 0.01f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
    lnb_cpu()->adamw(p, g, m, v, 2, 1.0f, lr, b1, b2, eps, wd, 1 - b1, 1 - b2);
    /* step 1: m̂ = g, v̂ = g², update = lr·g/|g| = lr·sign(g) after decay */
    assert_float_equal(p[0], 1.0f * (1 - lr * wd) - lr, 1e-6);
    assert_float_equal(p[1], -2.0f * (1 - lr * wd) + lr, 1e-6);
    assert_float_equal(m[0], 0.05f, 1e-7);
    assert_float_equal(v[1], 0.001f, 1e-7);
}

static void test_schedule(void **state)
{
    (void)state;
    ln_optim_cfg c = ln_optim_defaults();
    c.lr = 1.0f;
    c.total_steps = 10;
    c.warmup_steps = 2;
    assert_float_equal(ln_lr_at(&c, 0), 0.0f, 0);
    assert_float_equal(ln_lr_at(&c, 1), 0.5f, 1e-7);
    assert_float_equal(ln_lr_at(&c, 2), 1.0f, 1e-7);
    assert_float_equal(ln_lr_at(&c, 6), 0.5f, 1e-6);  /* halfway through the cosine */
    assert_float_equal(ln_lr_at(&c, 10), 0.0f, 1e-7);
}

static void test_config_errors(void **state)
{
    (void)state;
    ln_config c;
    ln_err e;
    const char *ok = "{\"vocab_size\":10,\"hidden_size\":8,\"intermediate_size\":12,\"num_hidden_layers\":1,"
                     "\"num_attention_heads\":2,\"num_key_value_heads\":1,"
                     "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,\"low_freq_factor\":1,"
                     "\"high_freq_factor\":4,\"original_max_position_embeddings\":8192}}";
    assert_int_equal(ln_config_parse(ok, "cfg", &c, &e), 0);
    assert_int_equal(c.head_dim, 4);
    assert_int_equal(c.rope_type, LN_ROPE_LLAMA3);
    assert_int_equal(ln_config_parse("{\"vocab_size\":10}", "cfg.json", &c, &e), -1);
    assert_non_null(strstr(e.msg, "cfg.json"));
    assert_non_null(strstr(e.msg, "hidden_size"));
    const char *bad_heads = "{\"vocab_size\":10,\"hidden_size\":8,\"intermediate_size\":12,\"num_hidden_layers\":1,"
                            "\"num_attention_heads\":3,\"num_key_value_heads\":2,\"head_dim\":4}";
    assert_int_equal(ln_config_parse(bad_heads, "c", &c, &e), -1);
    assert_non_null(strstr(e.msg, "num_key_value_heads"));
    assert_int_equal(ln_config_parse("{not json", "c", &c, &e), -1);
    assert_non_null(strstr(e.msg, "invalid JSON"));
    unsigned mask;
    assert_int_equal(ln_targets_parse("q,v_proj,down", &mask, &e), 0);
    assert_int_equal(mask, (1u << LN_Q) | (1u << LN_V) | (1u << LN_DOWN));
    assert_int_equal(ln_targets_parse("q,lm_head", &mask, &e), -1);
    assert_non_null(strstr(e.msg, "lm_head"));
}

int main(void)
{
    ln_rng_seed(&R, 1234);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmsnorm_backward),
        cmocka_unit_test(test_rope_backward_is_transpose),
        cmocka_unit_test(test_attention_backward_gqa),
        cmocka_unit_test(test_swiglu_backward),
        cmocka_unit_test(test_cross_entropy_backward_and_mask),
        cmocka_unit_test(test_embedding_and_matmul),
        cmocka_unit_test(test_matmul_split_paths),
        cmocka_unit_test(test_adamw_matches_formula),
        cmocka_unit_test(test_schedule),
        cmocka_unit_test(test_config_errors),
    };
    return cmocka_run_group_tests_name("engine kernels", tests, NULL, NULL);
}
