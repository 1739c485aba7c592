/* cmd_covariance.c — `loranull covariance`: calibrate a model and write its covariances
 * (calibrate.h: one F64 tensor per distinct layer input, named after the first target module
 * reading it). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "common/util.h"
#include "worker/cli/args.h"
#include "worker/cli/calib_opts.h"
#include "worker/cli/commands.h"
#include "worker/engine/model.h"

int cmd_covariance(int argc, char **argv) {
    const char *model = NULL, *out = NULL, *targets_s = NULL;
    cli_calib cal = {0};
    const cli_opt opts[] = {
        {"model", CLI_STR, &model, "model directory (config.json + safetensors [+ tokenizer.json])"},
        {"out", CLI_STR, &out, "covariance file to write (safetensors)"},
        {"targets", CLI_STR, &targets_s, "target modules whose inputs to calibrate (default all: q,k,v,o,gate,up,down)"},
        CLI_CALIB_OPTS(cal),
    };
    int nopts = (int)(sizeof opts / sizeof *opts);
    if (cli_wants_help(argc, argv)) {
        cli_usage("covariance", "--model DIR --calibration FILE --out cov.safetensors", opts, nopts);
        return 0;
    }
    ln_err e = {{0}};
    ln_model *m = NULL;
    ln_calibration *c = NULL;
    unsigned targets = LN_TARGETS_ALL;
    if (cli_parse(argc, argv, 1, opts, nopts, &e)) goto fail;
    if (!model || !cal.file || !out) {
        ln_errf(&e, "covariance needs --model, --calibration and --out");
        goto fail;
    }
    if (targets_s && ln_targets_parse(targets_s, &targets, &e)) goto fail;
    if (ln_model_load(model, lnb_cpu(), &m, &e)) goto fail;
    double t0 = ln_now_s();
    if (cli_calibrate(m, model, &cal, targets, &c, &e)) goto fail;
    double dt = ln_now_s() - t0;
    if (ln_calibration_save(c, out, &e)) goto fail;
    printf("{\"out\":\"%s\",\"samples\":%" PRId64 ",\"tokens\":%" PRId64 ",\"from_cache\":%s,\"seconds\":%.3f}\n", out,
           c->samples, c->tokens, c->from_cache ? "true" : "false", dt);
    ln_calibration_free(c);
    ln_model_free(m);
    return 0;
fail:
    fprintf(stderr, "loranull covariance: %s\n", e.msg);
    ln_calibration_free(c);
    ln_model_free(m);
    return 1;
}
