/* Unit tests for proto/jobspec (the one job spec validator) and the server's job state machine. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "proto/jobspec.h"
#include "server/jobs.h"

static int parse(const char *text, ln_jobspec *s, char param[LN_JOBSPEC_PARAM_MAX], ln_err *e) {
    return ln_jobspec_parse_text(text, strlen(text), s, param, e);
}

static void test_defaults_and_normalised_round_trip(void **state) {
    (void)state;
    ln_jobspec s, s2;
    char param[LN_JOBSPEC_PARAM_MAX];
    ln_err e;
    assert_int_equal(parse("{\"model\":\"llama-3.2-1b\",\"training_file\":\"file-abc\"}", &s, param, &e), 0);
    assert_string_equal(s.model, "llama-3.2-1b");
    assert_int_equal(s.adapter.type, LN_ADAPTER_LORA_NULL_V2);
    assert_int_equal(s.adapter.rank, LN_DEFAULT_RANK);
    assert_int_equal(s.adapter.n_targets, 7);
    assert_int_equal(s.hp.n_epochs, LN_DEFAULT_N_EPOCHS);
    assert_true(s.hp.learning_rate == LN_DEFAULT_BASE_LR);
    assert_int_equal(s.seed, -1);
    assert_int_equal(s.ranks, 1);
    assert_string_equal(s.adapter.calibration_file, "");

    /* The normalised JSON parses back to the same spec. */
    json_t *j = ln_jobspec_to_json(&s);
    char *text = json_dumps(j, JSON_COMPACT);
    assert_int_equal(parse(text, &s2, param, &e), 0);
    assert_string_equal(s2.model, s.model);
    assert_int_equal(s2.adapter.rank, s.adapter.rank);
    assert_true(s2.hp.learning_rate == s.hp.learning_rate);
    assert_int_equal(s2.hp.n_epochs, s.hp.n_epochs);
    free(text);
    json_decref(j);
    ln_jobspec_free(&s);
    ln_jobspec_free(&s2);
}

static void test_openai_method_auto_and_loranull_fields(void **state) {
    (void)state;
    ln_jobspec s;
    char param[LN_JOBSPEC_PARAM_MAX];
    ln_err e;
    const char *t = "{\"model\":\"m\",\"training_file\":\"file-1\",\"seed\":7,\"suffix\":\"run-1\","
                    "\"metadata\":{\"team\":\"a\"},"
                    "\"method\":{\"type\":\"supervised\",\"supervised\":{\"hyperparameters\":"
                    "{\"n_epochs\":\"auto\",\"batch_size\":16,\"learning_rate_multiplier\":2}}},"
                    "\"hyperparameters\":{\"max_seq_len\":512,\"grad_accum\":4},"
                    "\"adapter\":{\"type\":\"pissa\",\"rank\":16,\"alpha\":32,\"target_modules\":[\"q\",\"v_proj\"],"
                    "\"calibration\":{\"file\":\"file-k\",\"samples\":64,\"max_length\":256}},"
                    "\"resources\":{\"ranks\":4,\"device\":\"cuda\"}}";
    assert_int_equal(parse(t, &s, param, &e), 0);
    assert_int_equal(s.hp.n_epochs, LN_DEFAULT_N_EPOCHS);
    assert_int_equal(s.hp.batch_size, 16);
    assert_true(s.hp.learning_rate == 2 * LN_DEFAULT_BASE_LR);
    assert_int_equal(s.hp.max_seq_len, 512);
    assert_int_equal(s.hp.grad_accum, 4);
    assert_int_equal(s.adapter.type, LN_ADAPTER_PISSA);
    assert_true(s.adapter.alpha == 32);
    assert_int_equal(s.adapter.n_targets, 2);
    assert_string_equal(s.adapter.targets[0], "q_proj");
    assert_string_equal(s.adapter.targets[1], "v_proj");
    assert_string_equal(s.adapter.calibration_file, "file-k");
    assert_int_equal(s.adapter.calibration_samples, 64);
    assert_int_equal(s.ranks, 4);
    assert_int_equal(s.device, LN_DEVICE_CUDA);
    assert_int_equal(s.seed, 7);
    assert_string_equal(json_string_value(json_object_get(s.metadata, "team")), "a");
    ln_jobspec_free(&s);
}

/* Every bad spec names the field at fault. */
static void test_errors_name_the_field(void **state) {
    (void)state;
    static const struct { const char *text, *param; } cases[] = {
        {"[]", "body"},
        {"{\"training_file\":\"file-1\"}", "model"},
        {"{\"model\":\"m\"}", "training_file"},
        {"{\"model\":\"m b\",\"training_file\":\"file-1\"}", "model"},
        {"{\"model\":\"m\",\"training_file\":\"../x\"}", "training_file"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"typo\":1}", "typo"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"adapter\":{\"rank\":0}}", "adapter.rank"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"adapter\":{\"rank\":1.5}}", "adapter.rank"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"adapter\":{\"type\":\"dora\"}}", "adapter.type"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"adapter\":{\"target_modules\":[\"q\",\"lm_head\"]}}",
         "adapter.target_modules[1]"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"adapter\":{\"calibration\":{\"samples\":-1}}}",
         "adapter.calibration.samples"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"method\":{\"type\":\"dpo\"}}", "method.type"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"hyperparameters\":{\"warmup_ratio\":2}}",
         "hyperparameters.warmup_ratio"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"hyperparameters\":{\"learning_rate\":0.1,"
         "\"learning_rate_multiplier\":2}}", "hyperparameters.learning_rate"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"resources\":{\"device\":\"tpu\"}}", "resources.device"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"metadata\":{\"k\":1}}", "metadata.k"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\",\"seed\":-3}", "seed"},
        {"{\"model\":\"m\",\"training_file\":\"file-1\" ", "body"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ln_jobspec s;
        char param[LN_JOBSPEC_PARAM_MAX];
        ln_err e;
        int rc = parse(cases[i].text, &s, param, &e);
        if (rc != -1 || strcmp(param, cases[i].param) != 0)
            fail_msg("case %zu (%s): rc=%d param='%s' (want '%s'): %s", i, cases[i].text, rc, param, cases[i].param,
                     e.msg);
        assert_non_null(strstr(e.msg, cases[i].param));
    }
}

static void test_state_machine(void **state) {
    (void)state;
    assert_true(jobs_transition_ok("validating_files", "queued"));
    assert_true(jobs_transition_ok("queued", "running"));
    assert_true(jobs_transition_ok("running", "queued"));    /* lease expired, retry */
    assert_true(jobs_transition_ok("running", "paused"));
    assert_true(jobs_transition_ok("paused", "queued"));     /* resume */
    assert_true(jobs_transition_ok("paused", "cancelled"));
    /* Refused: leaving a terminal state, skipping the queue, resuming what is not paused. */
    static const char *const terminal[] = {"succeeded", "failed", "cancelled"};
    static const char *const all[] = {"validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"};
    for (int t = 0; t < 3; t++)
        for (int a = 0; a < 7; a++) assert_false(jobs_transition_ok(terminal[t], all[a]));
    assert_false(jobs_transition_ok("validating_files", "running"));
    assert_false(jobs_transition_ok("queued", "succeeded"));
    assert_false(jobs_transition_ok("paused", "running"));
    assert_false(jobs_transition_ok("validating_files", "paused"));
    assert_true(jobs_is_terminal("failed") && !jobs_is_terminal("paused"));
}

/* ---------------------------------------------------------------- round trip, property style
 * Many random specs built from each field's edge values (bounds, one ulp either side, tiny and
 * huge numbers, "auto", null): whatever ln_jobspec_parse accepts, its normalised JSON must parse
 * again to the same settings, and normalising that must be a fixed point. */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}
#define PICK(arr) (arr[rng() % (sizeof arr / sizeof arr[0])])

static json_t *random_spec(void) {
    static const double reals[] = {5e-324, 1e-320, 1e-300, 1e-12, 1e-8, 2e-4, 0.03, 0.1, 0.19999999999999998, 0.2,
                                   0.20000000000000004, 0.5, 1, 10, 99.99999999999999, 100, 999.9999999999999, 1000,
                                   1000.0000000000001, 1e6, 1e300, 0, -1e-300};
    static const long long ints[] = {-1, 0, 1, 2, 7, 8, 64, 1000, 1001, 4096, 4097, 65536, 65537, 1 << 20,
                                     (1 << 20) + 1, 1 << 30, 2147483647, 2147483648LL};
    static const char *const hp_real[] = {"learning_rate_multiplier", "learning_rate", "warmup_ratio", "weight_decay",
                                          "max_grad_norm"};
    static const char *const hp_int[] = {"n_epochs", "batch_size", "max_seq_len", "grad_accum", "eval_interval",
                                         "save_interval"};
    static const char *const types[] = {"lora", "pissa", "milora", "corda", "lora_fa", "lora_null_v1", "lora_null_v2",
                                        "full"};
    static const char *const mods[] = {"q_proj", "k", "v_proj", "o", "gate_proj", "up", "down_proj"};
    json_t *j = json_pack("{s:s, s:s}", "model", "llama-3.2-1b", "training_file", "file-train");
    if (rng() % 2) json_object_set_new(j, "seed", json_integer(PICK(ints)));
    if (rng() % 3 == 0) json_object_set_new(j, "validation_file", rng() % 2 ? json_string("file-val") : json_null());
    if (rng() % 3 == 0) json_object_set_new(j, "suffix", json_string("run-1"));
    if (rng() % 3 == 0) json_object_set_new(j, "metadata", json_pack("{s:s}", "k", "v"));
    json_t *hp = json_object();
    for (size_t i = 0; i < 5; i++)
        if (rng() % 3 == 0) json_object_set_new(hp, hp_real[i], json_real(PICK(reals)));
    for (size_t i = 0; i < 6; i++)
        if (rng() % 3 == 0) json_object_set_new(hp, hp_int[i], json_integer(PICK(ints)));
    if (rng() % 4 == 0) json_object_set_new(hp, "n_epochs", json_string("auto"));
    if (rng() % 4 == 0) json_object_del(hp, "learning_rate"); /* otherwise both often clash */
    json_object_set_new(j, "hyperparameters", hp);
    if (rng() % 2) {
        json_t *mh = json_object();
        if (rng() % 2) json_object_set_new(mh, "learning_rate_multiplier", rng() % 4 ? json_real(PICK(reals)) : json_string("auto"));
        if (rng() % 2) json_object_set_new(mh, "batch_size", json_integer(PICK(ints)));
        if (rng() % 2) json_object_set_new(mh, "n_epochs", json_integer(PICK(ints)));
        json_object_set_new(j, "method", json_pack("{s:s, s:{s:o}}", "type", "supervised", "supervised",
                                                   "hyperparameters", mh));
    }
    if (rng() % 2) {
        json_t *a = json_object();
        if (rng() % 2) json_object_set_new(a, "type", json_string(PICK(types)));
        if (rng() % 2) json_object_set_new(a, "rank", json_integer(PICK(ints)));
        if (rng() % 2) json_object_set_new(a, "alpha", json_real(PICK(reals)));
        if (rng() % 2) {
            json_t *t = json_array();
            for (int k = 0, n = 1 + (int)(rng() % 4); k < n; k++) json_array_append_new(t, json_string(PICK(mods)));
            json_object_set_new(a, "target_modules", t);
        }
        if (rng() % 2)
            json_object_set_new(a, "calibration", json_pack("{s:o, s:I, s:I}", "file",
                                                            rng() % 2 ? json_string("file-cal") : json_null(),
                                                            "samples", (json_int_t)PICK(ints), "max_length",
                                                            (json_int_t)PICK(ints)));
        json_object_set_new(j, "adapter", a);
    }
    if (rng() % 2) {
        static const char *const overlong[] = {"truncate", "reject", "drop"};
        static const char *const tmpl[] = {"auto", "llama3", "llama2", "chatml"};
        json_t *d = json_object();
        if (rng() % 2) json_object_set_new(d, "overlong", json_string(PICK(overlong)));
        if (rng() % 2) json_object_set_new(d, "chat_template", json_string(PICK(tmpl)));
        if (rng() % 2) json_object_set_new(d, "pack", rng() % 2 ? json_boolean(rng() % 2) : json_integer(PICK(ints)));
        json_object_set_new(j, "data", d);
    }
    if (rng() % 2)
        json_object_set_new(j, "resources", json_pack("{s:I, s:s}", "ranks", (json_int_t)(rng() % 70),
                                                      "device", rng() % 2 ? "cpu" : "any"));
    return j;
}

static char *normalised_text(const ln_jobspec *s) {
    json_t *j = ln_jobspec_to_json(s);
    char *t = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(j);
    return t;
}

static void test_round_trip_property(void **state) {
    (void)state;
    int accepted = 0, refused = 0;
    for (int i = 0; i < 20000; i++) {
        json_t *in = random_spec();
        ln_jobspec s1, s2, s3;
        char param[LN_JOBSPEC_PARAM_MAX];
        ln_err e;
        if (ln_jobspec_parse(in, &s1, param, &e) != 0) {
            assert_true(param[0] != 0); /* a refusal always names the field */
            refused++;
            json_decref(in);
            continue;
        }
        accepted++;
        char *t1 = normalised_text(&s1);
        if (ln_jobspec_parse_text(t1, strlen(t1), &s2, param, &e) != 0) {
            char *src = json_dumps(in, JSON_COMPACT);
            fail_msg("accepted %s\nbut its normalised form %s\nis refused: %s", src, t1, e.msg);
        }
        /* Every setting the engine uses survives exactly; the derived multiplier may move one ulp. */
        assert_true(s2.hp.learning_rate == s1.hp.learning_rate);
        assert_true(s2.hp.learning_rate_multiplier > 0 && s2.hp.learning_rate_multiplier <= LN_MAX_LR_MULTIPLIER);
        assert_true(s2.hp.warmup_ratio == s1.hp.warmup_ratio && s2.hp.weight_decay == s1.hp.weight_decay &&
                    s2.hp.max_grad_norm == s1.hp.max_grad_norm && s2.adapter.alpha == s1.adapter.alpha);
        assert_int_equal(s2.hp.n_epochs, s1.hp.n_epochs);
        assert_int_equal(s2.hp.batch_size, s1.hp.batch_size);
        assert_int_equal(s2.hp.max_seq_len, s1.hp.max_seq_len);
        assert_int_equal(s2.hp.grad_accum, s1.hp.grad_accum);
        assert_int_equal(s2.adapter.rank, s1.adapter.rank);
        assert_int_equal(s2.adapter.n_targets, s1.adapter.n_targets);
        assert_int_equal(s2.seed, s1.seed);
        assert_int_equal(s2.ranks, s1.ranks);
        assert_int_equal(memcmp(&s2.data, &s1.data, sizeof s1.data), 0);
        char *t2 = normalised_text(&s2);
        assert_int_equal(ln_jobspec_parse_text(t2, strlen(t2), &s3, param, &e), 0);
        char *t3 = normalised_text(&s3);
        assert_string_equal(t3, t2);
        free(t1);
        free(t2);
        free(t3);
        ln_jobspec_free(&s1);
        ln_jobspec_free(&s2);
        ln_jobspec_free(&s3);
        json_decref(in);
    }
    /* The generator reaches both sides of the bounds. */
    assert_true(accepted > 1000 && refused > 1000);
}

static void test_learning_rate_bound_on_input(void **state) {
    (void)state;
    ln_jobspec s;
    char param[LN_JOBSPEC_PARAM_MAX];
    ln_err e;
    /* Was accepted (bound 10), then the normalised multiplier 50000 broke its own bound of 1000. */
    assert_int_equal(parse("{\"model\":\"m\",\"training_file\":\"file-a\",\"hyperparameters\":{\"learning_rate\":10}}",
                           &s, param, &e),
                     -1);
    assert_string_equal(param, "hyperparameters.learning_rate");
    assert_non_null(strstr(e.msg, "hyperparameters.learning_rate"));
    assert_non_null(strstr(e.msg, "0.2"));
    /* The largest multiplier's rate is accepted both ways. */
    assert_int_equal(parse("{\"model\":\"m\",\"training_file\":\"file-a\",\"hyperparameters\":{\"learning_rate\":0.2}}",
                           &s, param, &e),
                     0);
    ln_jobspec_free(&s);
    /* A multiplier so small the rate would underflow to 0 is refused by name. */
    assert_int_equal(parse("{\"model\":\"m\",\"training_file\":\"file-a\",\"method\":{\"type\":\"supervised\","
                           "\"supervised\":{\"hyperparameters\":{\"learning_rate_multiplier\":5e-324}}}}",
                           &s, param, &e),
                     -1);
    assert_string_equal(param, "method.supervised.hyperparameters.learning_rate_multiplier");
}

static void test_data_options(void **state) {
    (void)state;
    ln_jobspec s;
    char param[LN_JOBSPEC_PARAM_MAX];
    ln_err e;
    /* Defaults: what `loranull train` does without flags. */
    assert_int_equal(parse("{\"model\":\"m\",\"training_file\":\"file-a\"}", &s, param, &e), 0);
    assert_int_equal(s.data.reject_overlong, 0);
    assert_string_equal(s.data.chat_template, "auto");
    assert_int_equal(s.data.pack, 0);
    ln_jobspec_free(&s);
    /* pack true = rows of max_seq_len tokens, whichever order the fields come in. */
    assert_int_equal(parse("{\"data\":{\"pack\":true,\"overlong\":\"reject\",\"chat_template\":\"llama2\"},"
                           "\"model\":\"m\",\"training_file\":\"file-a\",\"hyperparameters\":{\"max_seq_len\":512}}",
                           &s, param, &e),
                     0);
    assert_int_equal(s.data.pack, 512);
    assert_int_equal(s.data.reject_overlong, 1);
    assert_string_equal(s.data.chat_template, "llama2");
    json_t *j = ln_jobspec_to_json(&s);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(j, "data"), "pack")), 512);
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "data"), "overlong")), "reject");
    json_decref(j);
    ln_jobspec_free(&s);
    assert_int_equal(parse("{\"model\":\"m\",\"training_file\":\"file-a\",\"data\":{\"pack\":4096}}", &s, param, &e), 0);
    assert_int_equal(s.data.pack, 4096);
    ln_jobspec_free(&s);
    /* Each bad value names its field. */
    static const struct { const char *data, *param, *words; } bad[] = {
        {"{\"overlong\":\"drop\"}", "data.overlong", "truncate, reject"},
        {"{\"overlong\":1}", "data.overlong", "string"},
        {"{\"chat_template\":\"chatml\"}", "data.chat_template", "auto, llama3, llama2"},
        {"{\"pack\":-1}", "data.pack", "0..1048576"},
        {"{\"pack\":\"yes\"}", "data.pack", "true, false"},
        {"{\"pack\":1.5}", "data.pack", "integer"},
        {"{\"packing\":true}", "data.packing", "unknown"},
        {"[]", "data", "object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char text[256];
        snprintf(text, sizeof text, "{\"model\":\"m\",\"training_file\":\"file-a\",\"data\":%s}", bad[i].data);
        assert_int_equal(parse(text, &s, param, &e), -1);
        assert_string_equal(param, bad[i].param);
        if (!strstr(e.msg, bad[i].words)) fail_msg("%s: message '%s' lacks '%s'", bad[i].data, e.msg, bad[i].words);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_and_normalised_round_trip),
        cmocka_unit_test(test_openai_method_auto_and_loranull_fields),
        cmocka_unit_test(test_errors_name_the_field),
        cmocka_unit_test(test_state_machine),
        cmocka_unit_test(test_round_trip_property),
        cmocka_unit_test(test_learning_rate_bound_on_input),
        cmocka_unit_test(test_data_options),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
