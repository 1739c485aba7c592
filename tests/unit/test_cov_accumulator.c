/* ln_calibrate_set_accumulator (worker/engine/calibrate.h): an installed covariance accumulator
 * is the one calibration sums with — what a GPU job installs (DSYRK on the device, select.h);
 * here a host accumulator over ln_cov that counts its calls stands in for it, so the engine's side
 * of the contract is tested without a GPU:
 *   - every needed covariance is opened, fed every sample, finished and closed, and the result
 *     equals the host fp64 path bit for bit;
 *   - an accumulator that cannot open a covariance leaves that one to the host (same result);
 *   - an accumulator that fails a sample fails the calibration naming the layer input, and
 *     every sum it opened is closed;
 *   - its results are cached under the fp64 key (a later fp64 job hits, an fp32 job does not). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "common/util.h"
#include "worker/backend/backend.h"
#include "worker/engine/calibrate.h"
#include "worker/engine/model.h"
#include "worker/engine/nullspace.h"

static const char *CFG_JSON =
    "{\"vocab_size\": 64, \"hidden_size\": 32, \"intermediate_size\": 48, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"max_position_embeddings\": 128,"
    " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, \"tie_word_embeddings\": false}";

/* ---------------------------------------------------------------- the counting accumulator */

static struct {
    int opens, adds, finishes, closes;
    int fail_open_d;   /* open fails for this width (0 = never) */
    int fail_add_at;   /* the n-th add (1-based) fails (0 = never) */
} g;

static void *acc_open(int d, ln_err *e) {
    if (d == g.fail_open_d) {
        ln_errf(e, "test accumulator: no room for a %d x %d sum", d, d);
        return NULL;
    }
    ln_cov *c = calloc(1, sizeof *c);
    if (!c || ln_cov_init(c, d, e) != 0) {
        free(c);
        return NULL;
    }
    g.opens++;
    return c;
}

static int acc_add(void *c, const float *X, int tokens, ln_err *e) {
    if (++g.adds == g.fail_add_at) return ln_errf(e, "test accumulator: sample refused");
    return ln_cov_add_sample(c, X, tokens, e);
}

static int acc_finish(void *c, double *C, ln_err *e) {
    g.finishes++;
    return ln_cov_finish(c, C, e);
}

static void acc_close(void *c) {
    g.closes++;
    ln_cov_free(c);
    free(c);
}

static const ln_cov_accumulator COUNTING = {"counting", acc_open, acc_add, acc_finish, acc_close};

/* ---------------------------------------------------------------- fixture */

/* One model, calibration file and cache folder for every test (made by setup). */
static struct {
    char dir[32];
    ln_model *m;
    char *data, *cache;
} fx = {.dir = "/tmp/ln_covacc_XXXXXX"};

static int setup(void **state) {
    (void)state;
    ln_err e;
    ln_config cfg;
    if (!mkdtemp(fx.dir) || ln_config_parse(CFG_JSON, "test config", &cfg, &e) != 0 ||
        ln_model_new_random(&cfg, lnb_cpu(), 11, &fx.m, &e) != 0)
        return -1;
    fx.data = ln_path_join(fx.dir, "calib.jsonl");
    fx.cache = ln_path_join(fx.dir, "cache");
    FILE *f = fopen(fx.data, "w");
    if (!f) return -1;
    for (int i = 0; i < 5; i++) { /* lines of 12, 21, 30, 39, 48 pre-tokenized ids */
        fputs("{\"input_ids\": [", f);
        for (int k = 0; k < 12 + 9 * i; k++) fprintf(f, "%s%d", k ? ", " : "", (i * 17 + k * 13 + 3) % 64);
        fputs("]}\n", f);
    }
    return fclose(f);
}

static int teardown(void **state) {
    (void)state;
    ln_calibrate_set_accumulator(NULL);
    ln_model_free(fx.m);
    free(fx.data);
    free(fx.cache);
    char cmd[64];
    snprintf(cmd, sizeof cmd, "rm -rf %s", fx.dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* 3 windows of 16 tokens with `acc` installed (NULL = the host); cache NULL = none. Returns the
 * calibration (NULL on failure); fails the test on an error unless expect_fail, and on success
 * if expect_fail. The accumulator is uninstalled after. */
static ln_calibration *calibrate(const ln_cov_accumulator *acc, int fp64, const char *cache, int expect_fail,
                                 ln_err *e) {
    ln_calib_opts o = {.path = fx.data, .samples = 3, .max_length = 16, .seed = 9, .cache_dir = cache ? cache : "",
                       .fp64 = fp64};
    ln_calibration *c = NULL;
    ln_calibrate_set_accumulator(acc);
    int rc = ln_calibrate(fx.m, NULL, &o, &c, e);
    ln_calibrate_set_accumulator(NULL);
    if (rc != 0 && !expect_fail) fail_msg("%s", e->msg);
    if (rc == 0 && expect_fail) fail_msg("calibration succeeded where it should fail");
    return c;
}

static void assert_same_covariances(const ln_calibration *a, const ln_calibration *b) {
    for (int l = 0; l < a->num_layers; l++)
        for (int in = 0; in < LN_NINPUT; in++) {
            const double *x = ln_calibration_covariance((void *)a, l, (ln_input)in);
            const double *y = ln_calibration_covariance((void *)b, l, (ln_input)in);
            assert_non_null(x);
            assert_non_null(y);
            int d = a->d[in];
            assert_memory_equal(x, y, (size_t)d * d * sizeof(double));
        }
}

/* ---------------------------------------------------------------- tests */

static void test_installed_accumulator_sums_every_covariance(void **state) {
    (void)state;
    ln_err e;
    ln_calibration *host = calibrate(NULL, 1, NULL, 0, &e);
    memset(&g, 0, sizeof g);
    ln_calibrate_set_accumulator(&COUNTING);
    assert_ptr_equal(ln_calibrate_accumulator(), &COUNTING);
    ln_calibration *acc = calibrate(&COUNTING, 0, NULL, 0, &e);
    const int L = fx.m->cfg.num_layers;
    assert_int_equal(g.opens, L * LN_NINPUT);
    assert_int_equal(g.adds, 3 * L * LN_NINPUT); /* every sample reaches every distinct input */
    assert_int_equal(g.finishes, L * LN_NINPUT);
    assert_int_equal(g.closes, g.opens);
    assert_int_equal(acc->samples, 3);
    /* fp64 products like the host's fp64 path, in the same order: the same bits */
    assert_same_covariances(acc, host);
    ln_calibration_free(acc);
    ln_calibration_free(host);
}

static void test_unopenable_covariance_falls_back_to_host(void **state) {
    (void)state;
    ln_err e;
    ln_calibration *host = calibrate(NULL, 1, NULL, 0, &e);
    memset(&g, 0, sizeof g);
    g.fail_open_d = fx.m->cfg.intermediate_size; /* the down_proj inputs */
    ln_calibration *acc = calibrate(&COUNTING, 0, NULL, 0, &e);
    const int L = fx.m->cfg.num_layers;
    assert_int_equal(g.opens, L * (LN_NINPUT - 1));
    assert_int_equal(g.adds, 3 * L * (LN_NINPUT - 1));
    assert_int_equal(g.closes, g.opens);
    assert_same_covariances(acc, host);
    ln_calibration_free(acc);
    ln_calibration_free(host);
}

static void test_failing_sample_fails_calibration_and_closes_sums(void **state) {
    (void)state;
    ln_err e = {{0}};
    memset(&g, 0, sizeof g);
    g.fail_add_at = LN_NINPUT + 2; /* layer 1's second input of the first sample */
    assert_null(calibrate(&COUNTING, 0, NULL, 1, &e));
    assert_non_null(strstr(e.msg, "test accumulator: sample refused"));
    assert_non_null(strstr(e.msg, "layer 1"));
    assert_int_equal(g.opens, fx.m->cfg.num_layers * LN_NINPUT);
    assert_int_equal(g.closes, g.opens);
}

static void test_accumulator_results_are_cached_as_fp64(void **state) {
    (void)state;
    ln_err e;
    memset(&g, 0, sizeof g);
    ln_calibration *a = calibrate(&COUNTING, 0, fx.cache, 0, &e);
    assert_false(a->from_cache);
    /* a host job asking for fp64 products finds it ... */
    ln_calibration *b = calibrate(NULL, 1, fx.cache, 0, &e);
    assert_true(b->from_cache);
    assert_same_covariances(a, b);
    /* ... one asking for fp32 products does not */
    ln_calibration *c = calibrate(NULL, 0, fx.cache, 0, &e);
    assert_false(c->from_cache);
    ln_calibration_free(a);
    ln_calibration_free(b);
    ln_calibration_free(c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_installed_accumulator_sums_every_covariance),
        cmocka_unit_test(test_unopenable_covariance_falls_back_to_host),
        cmocka_unit_test(test_failing_sample_fails_calibration_and_closes_sums),
        cmocka_unit_test(test_accumulator_results_are_cached_as_fp64),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
