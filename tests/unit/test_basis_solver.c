/* ln_nullspace_set_basis_solver: an installed eigensolver (what the CUDA build installs for GPU
 * jobs) is the one ln_adapter_init's LoRA-Null path uses — called for the covariances, its bases
 * give the same B A products as LAPACK's — and NULL restores LAPACK. The stand-in solver here
 * computes the same subset with LAPACK's dsyevx (a different algorithm than dsyevr). */
#include <lapacke.h>
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
#include "worker/engine/nullspace.h"
#include "worker/engine/rng.h"

static const char *CONFIG =
    "{\"vocab_size\":40,\"hidden_size\":24,\"intermediate_size\":40,\"num_hidden_layers\":2,"
    "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":6,\"max_position_embeddings\":64,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"tie_word_embeddings\":false}";

static int calls;

static int dsyevx_solver(const double *C, int d, int r, double *U, double *evals, ln_err *e)
{
#pragma omp atomic
    calls++;
    double *a = malloc((size_t)d * d * sizeof(double)), *w = malloc((size_t)d * sizeof(double));
    lapack_int *ifail = malloc((size_t)d * sizeof(lapack_int)), m = 0;
    memcpy(a, C, (size_t)d * d * sizeof(double));
    lapack_int info = LAPACKE_dsyevx(LAPACK_ROW_MAJOR, 'V', 'I', 'U', d, a, d, 0, 0, 1, r, 0.0, &m, w, U, r, ifail);
    if (evals) memcpy(evals, w, (size_t)r * sizeof(double));
    free(a); free(w); free(ifail);
    return info == 0 && m == r ? 0 : ln_errf(e, "dsyevx failed (info %d)", (int)info);
}

typedef struct { ln_cov cov[2][LN_NINPUT]; double *C[2][LN_NINPUT]; } calib;

static void hook(int layer, ln_input which, const float *X, int tokens, int d_in, void *ctx)
{
    calib *c = ctx;
    ln_err e = {{0}};
    if (!c->cov[layer][which].sum) ln_cov_init(&c->cov[layer][which], d_in, &e);
    ln_cov_add_sample(&c->cov[layer][which], X, tokens, &e);
}
static const double *cov_fn(void *ctx, int l, ln_input w) { return ((calib *)ctx)->C[l][w]; }

static double *product(const ln_lora *lo)
{
    int r = lo->A.rows, dout = lo->B.rows, din = lo->A.cols;
    double *p = calloc((size_t)dout * din, sizeof(double));
    for (int i = 0; i < dout; i++)
        for (int j = 0; j < r; j++)
            for (int k = 0; k < din; k++) p[(size_t)i * din + k] += (double)lo->B.w[i * r + j] * lo->A.w[j * din + k];
    return p;
}

static void init(calib *c, ln_model **m, ln_adapter *ad)
{
    ln_config cfg;
    ln_err e = {{0}};
    assert_int_equal(ln_config_parse(CONFIG, "cfg", &cfg, &e), 0);
    assert_int_equal(ln_model_new_random(&cfg, lnb_cpu(), 9, m, &e), 0);
    ln_adapter_opts o = {.method = "lora_null_v2", .rank = 3, .alpha = 3, .targets = LN_TARGETS_ALL,
                         .covariance = cov_fn, .method_ctx = c};
    if (ln_adapter_init(*m, ad, &o, &e)) fail_msg("%s", e.msg);
}

static void test_installed_solver_is_used(void **s)
{
    (void)s;
    calib *c = calloc(1, sizeof *c);
    ln_model *m;
    ln_config cfg;
    ln_err e = {{0}};
    assert_int_equal(ln_config_parse(CONFIG, "cfg", &cfg, &e), 0);
    assert_int_equal(ln_model_new_random(&cfg, lnb_cpu(), 9, &m, &e), 0);
    ln_rng r;
    ln_rng_seed(&r, 1);
    ln_acts *a = ln_acts_new();
    ln_fwd_opts fo = {.hook = hook, .hook_ctx = c, .no_logits = 1};
    for (int sidx = 0; sidx < 12; sidx++) { /* 12 × 16 = 192 rows > every d_in (≤ 40): full rank */
        int32_t ids[16];
        for (int t = 0; t < 16; t++) ids[t] = (int32_t)(ln_rng_u64(&r) % 40);
        ln_batch b = {.B = 1, .T = 16, .ids = ids};
        assert_int_equal(ln_model_forward(m, NULL, a, &b, &fo, NULL, &e), 0);
    }
    ln_acts_free(m, a);
    ln_model_free(m);
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < LN_NINPUT; i++) {
            int d = c->cov[l][i].d;
            c->C[l][i] = malloc((size_t)d * d * sizeof(double));
            assert_int_equal(ln_cov_finish(&c->cov[l][i], c->C[l][i], &e), 0);
            ln_cov_free(&c->cov[l][i]);
        }
    ln_model *m0, *m1, *m2;
    ln_adapter a0, a1, a2;
    calls = 0;
    init(c, &m0, &a0); /* LAPACK */
    assert_int_equal(calls, 0);
    ln_nullspace_set_basis_solver(dsyevx_solver);
    init(c, &m1, &a1);
    int used = calls;
    ln_nullspace_set_basis_solver(NULL);
    init(c, &m2, &a2);
    assert_true(used >= 2 * LN_NINPUT);  /* at least every distinct covariance */
    assert_int_equal(calls, used);       /* NULL restored LAPACK */
    double worst = 0;
    for (int i = 0; i < 2 * LN_NTARGET; i++) {
        double *p0 = product(&a0.lora[i]), *p1 = product(&a1.lora[i]);
        int64_t n = (int64_t)a0.lora[i].B.rows * a0.lora[i].A.cols;
        double mx = 0, num = 0;
        for (int64_t k = 0; k < n; k++) { mx = fmax(mx, fabs(p0[k])); num = fmax(num, fabs(p1[k] - p0[k])); }
        worst = fmax(worst, num / mx);
        free(p0);
        free(p1);
    }
    printf("  installed solver: %d calls, B A vs LAPACK's dsyevr path %.2e (relative)\n", used, worst);
    assert_true(worst < 1e-5);
    ln_adapter_free(&a0); ln_adapter_free(&a1); ln_adapter_free(&a2);
    ln_model_free(m0); ln_model_free(m1); ln_model_free(m2);
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < LN_NINPUT; i++) free(c->C[l][i]);
    free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_installed_solver_is_used)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
