/* calib_opts.h — the calibration options every subcommand that calibrates shares
 * (`covariance`, `init`, `train`): --calibration FILE, --calibration-samples N (256),
 * --calibration-max-length L (1024), --calibration-seed S, --calibration-cache DIR, --no-calibration-cache,
 * --calibration-fp64.
 *
 * Usage: declare a cli_calib, splice CLI_CALIB_OPTS(c) into the command's cli_opt array, and call
 * cli_calibrate after loading the model. */
#ifndef LN_CLI_CALIB_OPTS_H
#define LN_CLI_CALIB_OPTS_H

#include <stdint.h>

#include "common/err.h"
#include "worker/engine/adapter.h"
#include "worker/engine/calibrate.h"
#include "worker/engine/drift.h"
#include "worker/engine/train.h"

typedef struct cli_calib {
    const char *file;
    int samples, max_length;
    uint64_t seed;
    const char *cache_dir;
    int no_cache;
    int fp64;
} cli_calib;

#define CLI_CALIB_OPTS(c)                                                                                     \
    {"calibration", CLI_STR, &(c).file, "JSONL of knowledge text to calibrate on (any format the data loader reads)"}, \
    {"calibration-samples", CLI_INT, &(c).samples, "calibration samples (default 256)"},                      \
    {"calibration-max-length", CLI_INT, &(c).max_length, "tokens per calibration sample at most (default 1024)"}, \
    {"calibration-seed", CLI_U64, &(c).seed, "seed choosing the calibration windows (default 0)"},            \
    {"calibration-cache", CLI_STR, &(c).cache_dir, "covariance cache directory (default ~/.cache/loranull/calibration)"}, \
    {"no-calibration-cache", CLI_FLAG, &(c).no_cache, "neither read nor write the covariance cache"}, \
    {"calibration-fp64", CLI_FLAG, &(c).fp64, "every product in fp64 (default: each sample's in fp32, summed in fp64)"}

/* Calibrates m (loaded from model_dir; its tokenizer.json is used when present) on c->file.
 * Prints nothing; *out is owned by the caller (ln_calibration_free). */
int cli_calibrate(ln_model *m, const char *model_dir, const cli_calib *c, unsigned targets, ln_calibration **out,
                  ln_err *e);

/* ---- a training job's knowledge side (`loranull train --calibration FILE`) ----
 * cli_knowledge_calibrate: the covariances (on `ranks` shards: ranks.h), before the adapter is
 *   initialised (pass ln_calibration_covariance / k->calib as ln_adapter_opts.covariance /
 *   .method_ctx); `train --covariance FILE` loads k->calib from a file instead.
 * cli_knowledge_track: after the adapter exists (fresh or resumed), adds per-layer knowledge drift
 *   to the metrics row of every eval (every --eval-every steps and after the last), after the
 *   command's own eval callback.
 * cli_knowledge_summary: after training, writes OUT/knowledge_drift.json (the last measurement)
 *   and prints one line on stderr. */
typedef struct cli_knowledge {
    ln_calibration *calib;
    ln_drift_tracker *drift;
    ln_eval_fn prev;
    void *prev_ctx;
    json_t *last;       /* the last row's drift fields (owned) */
    int64_t last_step;
} cli_knowledge;

int cli_knowledge_calibrate(cli_knowledge *k, ln_model *m, const char *model_dir, const cli_calib *c,
                            unsigned targets, int ranks, ln_err *e);
int cli_knowledge_track(cli_knowledge *k, ln_model *m, ln_adapter *ad, ln_train_opts *to, ln_err *e);
int cli_knowledge_summary(const cli_knowledge *k, const char *out_dir, ln_err *e);
void cli_knowledge_free(cli_knowledge *k);

/* OUT/run.json: {"model": the base model directory, "method": ...}: what `loranull export` needs
 * to find the ORIGINAL base weights of a run. */
int cli_write_run_json(const char *out_dir, const char *model_dir, const char *method, ln_err *e);

#endif
