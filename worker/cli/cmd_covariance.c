/* cmd_covariance.c — `loranull covariance`: calibrate a model and write its covariances
 * (calibrate.h: one F64 tensor per distinct layer input, named after the first target module
 * reading it). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/cli/args.h"
#include "worker/cli/calib_opts.h"
#include "worker/cli/commands.h"
#include "worker/cli/ranks.h"
#include "worker/engine/model.h"
#include "worker/engine/tokenizer.h"

/* --bench: one JSON line with calibration and plain-forward throughput over the same windows. */
static int covariance_bench(const char *model, const cli_calib *cal, const char *targets_s) {
    ln_err e = {{0}};
    ln_model *m = NULL;
    ln_tokenizer *tok = NULL;
    unsigned targets = LN_TARGETS_ALL;
    double ctps = 0, ftps = 0;
    if (!model || !cal->file) {
        ln_errf(&e, "covariance --bench needs --model and --calibration");
        goto fail;
    }
    if (targets_s && ln_targets_parse(targets_s, &targets, &e)) goto fail;
    if (ln_model_load(model, lnb_cpu(), &m, &e)) goto fail;
    char *tp = ln_path_join(model, "tokenizer.json");
    int rc = ln_file_exists(tp) ? ln_tokenizer_load(model, &tok, &e) : 0;
    free(tp);
    if (rc) goto fail;
    ln_calib_opts o = {.path = cal->file, .samples = cal->samples, .max_length = cal->max_length, .seed = cal->seed,
                       .targets = targets, .fp64 = cal->fp64};
    /* forward first (warms caches and the allocator), then calibration, then forward again; the
     * better forward figure is reported so calibration is not flattered by a cold first pass */
    double f1 = 0, f2 = 0;
    if (ln_calibration_bench(m, tok, &o, NULL, &f1, &e) || ln_calibration_bench(m, tok, &o, &ctps, NULL, &e) ||
        ln_calibration_bench(m, tok, &o, NULL, &f2, &e))
        goto fail;
    ftps = f1 > f2 ? f1 : f2;
    printf("{\"calibration_tokens_per_s\":%.1f,\"forward_tokens_per_s\":%.1f,\"ratio\":%.3f}\n", ctps, ftps, ctps / ftps);
    ln_tokenizer_free(tok);
    ln_model_free(m);
    return 0;
fail:
    fprintf(stderr, "loranull covariance: %s\n", e.msg);
    ln_tokenizer_free(tok);
    ln_model_free(m);
    return 1;
}

int cmd_covariance(int argc, char **argv) {
    const char *model = NULL, *out = NULL, *targets_s = NULL;
    cli_calib cal = {0};
    int bench = 0, ranks = 1;
    const cli_opt opts[] = {
        {"model", CLI_STR, &model, "model directory (config.json + safetensors [+ tokenizer.json])"},
        {"out", CLI_STR, &out, "covariance file to write (safetensors)"},
        {"targets", CLI_STR, &targets_s, "target modules whose inputs to calibrate (default all: q,k,v,o,gate,up,down)"},
        {"bench", CLI_FLAG, &bench, "measure calibration and plain forward tokens/s on the same windows (no cache)"},
        CLI_RANKS_OPT(ranks),
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
    if (bench && ranks != 1) {
        ln_errf(&e, "covariance --bench runs on one rank (drop --ranks %d)", ranks);
        goto fail;
    }
    if (bench) return covariance_bench(model, &cal, targets_s);
    if (!model || !cal.file || !out) {
        ln_errf(&e, "covariance needs --model, --calibration and --out");
        goto fail;
    }
    if (targets_s && ln_targets_parse(targets_s, &targets, &e)) goto fail;
    ln_config mc;
    if (ln_config_load(model, &mc, &e) || cli_ranks_check(ranks, NULL, &mc, &e)) goto fail;
    if (ln_model_load(model, lnb_cpu(), &m, &e)) goto fail;
    double t0 = ln_now_s();
    if (cli_calibrate_ranks(m, model, &cal, targets, ranks, &c, &e)) goto fail;
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
