/* Unit tests for the knowledge-drift tracker's start-up (worker/engine/drift_tracker.c): its
 * denominators tr(W0 C W0ᵀ) equal, within 1e-10 relative, what the tracker computed before they
 * were made cheaper — W0 rebuilt from the residual W0' + s·B0 A0 by a plain fp64 loop, then the
 * dense product W0·C by dsymm — for a residual method (pissa), a plain one (lora) and full
 * fine-tuning, on a small random model with synthetic covariances.
 *
 * With LN_DRIFT_BENCH=1 it also times both ways on a bigger random model (no assertion on time):
 *   LN_DRIFT_BENCH=1 build/release/tests/test_drift_tracker */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <cblas.h>
#include <math.h>
#include <omp.h>

#include "common/util.h"
#include "worker/backend/backend.h"
#include "worker/engine/adapter.h"
#include "worker/engine/drift.h"
#include "worker/engine/model.h"
#include "worker/engine/nullspace.h"

/* ---------------------------------------------------------------- helpers */

typedef struct {
    double *C[LN_NINPUT];
} covs;

/* C = diag((i+1)/d) + vvᵀ/100 + an outlier feature, symmetric positive definite. */
static double *synthetic_cov(int d, int salt) {
    double *C = malloc((size_t)d * d * sizeof *C);
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) {
            double vi = sin(0.1 * i + salt), vj = sin(0.1 * j + salt);
            C[(size_t)i * d + j] = 0.01 * vi * vj + (i == j ? (i + 1.0) / d + (i == 3 ? 50.0 : 0.0) : 0.0);
        }
    return C;
}

static const double *cov_of(void *ctx, int layer, ln_input which) {
    (void)layer;
    return ((covs *)ctx)->C[which];
}

static covs make_covs(const ln_config *c) {
    covs cv;
    int qd = c->num_heads * c->head_dim;
    int d[LN_NINPUT] = {[LN_IN_QKV] = c->hidden_size, [LN_IN_O] = qd, [LN_IN_GATEUP] = c->hidden_size,
                        [LN_IN_DOWN] = c->intermediate_size};
    for (int i = 0; i < LN_NINPUT; i++) cv.C[i] = synthetic_cov(d[i], i);
    return cv;
}

static void free_covs(covs *cv) {
    for (int i = 0; i < LN_NINPUT; i++) free(cv->C[i]);
}

static ln_model *new_model(const char *json, ln_config *cfg) {
    ln_err e;
    ln_model *m = NULL;
    if (ln_config_parse(json, "drift test config", cfg, &e) != 0 || ln_model_new_random(cfg, lnb_cpu(), 5, &m, &e) != 0)
        fail_msg("%s", e.msg);
    return m;
}

/* The denominator as the tracker computed it before: W0 = W0' + s·B0 A0 rebuilt row by row in
 * fp64 (residual adapters), then tr(W0 C W0ᵀ) = Σ (W0 C)∘W0 from one dsymm. */
static double old_denominator(const ln_param *W, const ln_lora *lo, double s, const double *C) {
    const int d_out = W->rows, d_in = W->cols;
    double *w = malloc((size_t)d_out * d_in * sizeof *w), *t = malloc((size_t)d_out * d_in * sizeof *t);
    double *row = malloc((size_t)d_in * sizeof *row);
    for (int o = 0; o < d_out; o++) {
        for (int c = 0; c < d_in; c++) row[c] = 0.0;
        if (lo) {
            const int r = lo->A.rows;
            for (int k = 0; k < r; k++) {
                double b = s * lo->B0[(size_t)o * r + k];
                for (int c = 0; c < d_in; c++) row[c] += b * lo->A0[(size_t)k * d_in + c];
            }
        }
        for (int c = 0; c < d_in; c++) w[(size_t)o * d_in + c] = (float)((double)W->w[(size_t)o * d_in + c] + row[c]);
    }
    cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, d_out, d_in, 1.0, C, d_in, w, d_in, 0.0, t, d_in);
    double acc = 0;
    for (size_t k = 0; k < (size_t)d_out * d_in; k++) acc += t[k] * w[k];
    free(w);
    free(t);
    free(row);
    return acc;
}

/* ---------------------------------------------------------------- tests */

static const char *SMALL =
    "{\"vocab_size\": 64, \"hidden_size\": 48, \"intermediate_size\": 80, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"max_position_embeddings\": 64,"
    " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, \"tie_word_embeddings\": false}";

static void test_denominators_equal_the_old_computation(void **state) {
    (void)state;
    const char *methods[] = {"pissa", "lora", "full"};
    for (size_t k = 0; k < sizeof methods / sizeof *methods; k++) {
        ln_config cfg;
        ln_model *m = new_model(SMALL, &cfg);
        covs cv = make_covs(&cfg);
        ln_adapter ad;
        ln_err e;
        ln_adapter_opts ao = {.method = methods[k], .rank = 6, .alpha = 12, .seed = 2};
        if (ln_adapter_init(m, &ad, &ao, &e) != 0) fail_msg("%s: %s", methods[k], e.msg);
        ln_drift_tracker *t = NULL;
        if (ln_drift_tracker_new(m, &ad, cov_of, &cv, &t, &e) != 0) fail_msg("%s: %s", methods[k], e.msg);
        int n = 0;
        double worst = 0;
        for (int l = 0; l < cfg.num_layers; l++)
            for (int tg = 0; tg < LN_NTARGET; tg++) {
                double den;
                assert_int_equal(ln_drift_tracker_denominator(t, l, (ln_target)tg, &den), 0);
                const ln_lora *lo = ad.full || !ad.residual ? NULL : &ad.lora[l * LN_NTARGET + tg];
                double want = old_denominator(&m->layers[l].lin[tg], lo, (double)ad.scale,
                                              cv.C[ln_target_input((ln_target)tg)]);
                assert_true(want > 0);
                worst = fmax(worst, fabs(den - want) / want);
                n++;
            }
        printf("  %s: %d denominators, worst relative difference to the old computation %.2e\n", methods[k], n,
               worst);
        if (!(worst <= 1e-10)) fail_msg("%s: denominators differ from the old computation by %.2e", methods[k], worst);
        double den;
        assert_int_equal(ln_drift_tracker_denominator(t, cfg.num_layers, LN_Q, &den), -1);
        ln_drift_tracker_free(t);
        ln_adapter_free(&ad);
        free_covs(&cv);
        ln_model_free(m);
    }
}

/* LN_DRIFT_BENCH=1: start-up of a tracker for a residual adapter on a bigger model, timed the old
 * way (fp64 loop rebuild + dsymm) and by ln_drift_tracker_new. Prints; asserts only equality. */
static void test_bench_startup(void **state) {
    (void)state;
    const char *on = getenv("LN_DRIFT_BENCH");
    if (!on || strcmp(on, "1") != 0) {
        printf("  skipped (LN_DRIFT_BENCH=1 runs it)\n");
        return;
    }
    const char *json = getenv("LN_DRIFT_BENCH_CONFIG");
    if (!json)
        json = "{\"vocab_size\": 256, \"hidden_size\": 1024, \"intermediate_size\": 2816, \"num_hidden_layers\": 2,"
               " \"num_attention_heads\": 16, \"num_key_value_heads\": 8, \"max_position_embeddings\": 64,"
               " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, \"tie_word_embeddings\": false}";
    ln_config cfg;
    ln_model *m = new_model(json, &cfg);
    covs cv = make_covs(&cfg);
    ln_adapter ad;
    ln_err e;
    ln_adapter_opts ao = {.method = "lora", .rank = 16, .alpha = 32, .seed = 2};
    if (ln_adapter_init(m, &ad, &ao, &e) != 0) fail_msg("%s", e.msg);
    /* a residual with the lora factors as B0, A0: the rebuild runs as for pissa, without its SVD */
    assert_int_equal(ln_adapter_make_residual(m, &ad, &e), 0);
    double t0 = ln_now_s(), sum_old = 0;
    ln_blas_threads_begin();
    for (int l = 0; l < cfg.num_layers; l++)
        for (int tg = 0; tg < LN_NTARGET; tg++)
            sum_old += old_denominator(&m->layers[l].lin[tg], &ad.lora[l * LN_NTARGET + tg], (double)ad.scale,
                                       cv.C[ln_target_input((ln_target)tg)]);
    ln_blas_threads_end();
    double t_old = ln_now_s() - t0;
    t0 = ln_now_s();
    ln_drift_tracker *t = NULL;
    if (ln_drift_tracker_new(m, &ad, cov_of, &cv, &t, &e) != 0) fail_msg("%s", e.msg);
    double t_new = ln_now_s() - t0, sum_new = 0;
    for (int l = 0; l < cfg.num_layers; l++)
        for (int tg = 0; tg < LN_NTARGET; tg++) {
            double den;
            assert_int_equal(ln_drift_tracker_denominator(t, l, (ln_target)tg, &den), 0);
            sum_new += den;
        }
    printf("  drift tracker start-up, %d layers (hidden %d, intermediate %d), %d BLAS threads: old %.3f s, "
           "new %.3f s (%.2fx); sums of denominators differ by %.1e (relative)\n",
           cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, omp_get_max_threads(), t_old, t_new,
           t_old / t_new, fabs(sum_new - sum_old) / sum_old);
    assert_true(fabs(sum_new - sum_old) <= 1e-10 * sum_old);
    ln_drift_tracker_free(t);
    ln_adapter_free(&ad);
    free_covs(&cv);
    ln_model_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_denominators_equal_the_old_computation),
        cmocka_unit_test(test_bench_startup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
