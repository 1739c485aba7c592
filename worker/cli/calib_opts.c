/* calib_opts.c — see calib_opts.h. */
#include "worker/cli/calib_opts.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/cli/ranks.h"
#include "worker/engine/tokenizer.h"

int cli_calibrate(ln_model *m, const char *model_dir, const cli_calib *c, unsigned targets, ln_calibration **out,
                  ln_err *e) {
    if (!c->file) return ln_errf(e, "calibration needs --calibration FILE");
    if (c->samples < 0) return ln_errf(e, "option --calibration-samples: must be positive, got %d", c->samples);
    if (c->max_length < 0) return ln_errf(e, "option --calibration-max-length: must be positive, got %d", c->max_length);
    ln_tokenizer *tok = NULL;
    char *tp = ln_path_join(model_dir, "tokenizer.json");
    if (ln_file_exists(tp) && ln_tokenizer_load(model_dir, &tok, e) != 0) {
        free(tp);
        return -1;
    }
    free(tp);
    ln_calib_opts o = {.path = c->file, .samples = c->samples, .max_length = c->max_length, .seed = c->seed,
                       .targets = targets, .cache_dir = c->no_cache ? "" : c->cache_dir, .fp64 = c->fp64};
    /* the calibration forwards multiply the frozen weights from the backend's faster form (bf16
     * copies on a GPU); thawed after, since a residual init rewrites W0 next */
    int rc = ln_model_freeze_frozen(m, NULL, e);
    if (rc == 0) rc = ln_calibrate(m, tok, &o, out, e);
    ln_model_thaw(m);
    ln_tokenizer_free(tok);
    return rc;
}

/* ---------------------------------------------------------------- training */

int cli_knowledge_calibrate(cli_knowledge *k, ln_model *m, const char *model_dir, const cli_calib *c,
                            unsigned targets, int ranks, ln_err *e) {
    if (cli_calibrate_ranks(m, model_dir, c, targets, ranks, &k->calib, e) != 0)
        return ln_err_prefix(e, "--calibration");
    return 0;
}

/* The eval callback: the command's own first (val_loss, ...), then knowledge drift. */
static int knowledge_eval(ln_model *m, ln_adapter *ad, int64_t step, json_t *row, void *ctx, ln_err *e) {
    cli_knowledge *k = ctx;
    if (k->prev && k->prev(m, ad, step, row, k->prev_ctx, e) != 0) return -1;
    if (ln_drift_tracker_measure(k->drift, m, ad, row, e) != 0) return -1;
    json_decref(k->last);
    k->last = json_object();
    json_object_set(k->last, "knowledge_drift", json_object_get(row, "knowledge_drift"));
    json_object_set(k->last, "knowledge_drift_mean", json_object_get(row, "knowledge_drift_mean"));
    json_object_set(k->last, "knowledge_drift_max", json_object_get(row, "knowledge_drift_max"));
    json_object_set_new(k->last, "step", json_integer(step));
    k->last_step = step;
    return 0;
}

int cli_knowledge_track(cli_knowledge *k, ln_model *m, ln_adapter *ad, ln_train_opts *to, ln_err *e) {
    if (!k->calib) return 0;
    if (ln_drift_tracker_new(m, ad, ln_calibration_covariance, k->calib, &k->drift, e) != 0) return -1;
    k->prev = to->eval;
    k->prev_ctx = to->eval_ctx;
    to->eval = knowledge_eval;
    to->eval_ctx = k;
    return 0;
}

int cli_knowledge_summary(const cli_knowledge *k, const char *out_dir, ln_err *e) {
    if (!k->last) return 0;
    fprintf(stderr, "loranull train: knowledge drift at step %lld: mean %.3e, max %.3e over %zu layers\n",
            (long long)k->last_step, json_real_value(json_object_get(k->last, "knowledge_drift_mean")),
            json_real_value(json_object_get(k->last, "knowledge_drift_max")),
            json_object_size(json_object_get(k->last, "knowledge_drift")));
    if (!out_dir) return 0;
    char *txt = json_dumps(k->last, JSON_INDENT(2) | JSON_SORT_KEYS);
    char *p = ln_path_join(out_dir, "knowledge_drift.json");
    int rc = ln_write_file_atomic(p, txt, strlen(txt), e);
    free(p);
    free(txt);
    return rc;
}

void cli_knowledge_free(cli_knowledge *k) {
    ln_drift_tracker_free(k->drift);
    ln_calibration_free(k->calib);
    json_decref(k->last);
    memset(k, 0, sizeof *k);
}

int cli_write_run_json(const char *out_dir, const char *model_dir, const char *method, ln_err *e) {
    if (ln_mkdir_p(out_dir, e) != 0) return -1;
    char *abs = realpath(model_dir, NULL);
    json_t *o = json_object();
    json_object_set_new(o, "model", json_string(abs ? abs : model_dir));
    json_object_set_new(o, "method", json_string(method));
    char *txt = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS);
    char *p = ln_path_join(out_dir, "run.json");
    int rc = ln_write_file_atomic(p, txt, strlen(txt), e);
    free(p);
    free(txt);
    free(abs);
    json_decref(o);
    return rc;
}
