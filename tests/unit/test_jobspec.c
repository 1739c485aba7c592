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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_and_normalised_round_trip),
        cmocka_unit_test(test_openai_method_auto_and_loranull_fields),
        cmocka_unit_test(test_errors_name_the_field),
        cmocka_unit_test(test_state_machine),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
