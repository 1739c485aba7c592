/* cmd_init.c — `loranull init`: a method's initial adapter factors for a model, written as
 * safetensors <module>.lora_A.weight (r × d_in) / <module>.lora_B.weight (d_out × r), e.g.
 * model.layers.0.self_attn.q_proj.lora_A.weight, F32, with metadata method/rank/alpha. Prints a
 * JSON line with the calibration and init times (the bench reads it). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/cli/args.h"
#include "worker/cli/calib_opts.h"
#include "worker/cli/commands.h"
#include "worker/cli/ranks.h"
#include "worker/engine/adapter.h"
#include "worker/engine/lora_init.h"
#include "worker/engine/model.h"

static int write_factors(const ln_model *m, const ln_adapter *ad, const char *dir, ln_err *e) {
    if (ln_mkdir_p(dir, e)) return -1;
    st_writer *w = st_writer_new();
    char buf[64];
    st_writer_meta(w, "method", ad->method);
    snprintf(buf, sizeof buf, "%d", ad->rank);
    st_writer_meta(w, "rank", buf);
    snprintf(buf, sizeof buf, "%.9g", (double)ad->alpha);
    st_writer_meta(w, "alpha", buf);
    const int n = ad->num_layers * LN_NTARGET;
    float **host = ln_xcalloc((size_t)2 * n, sizeof *host);
    char (*names)[2][160] = ln_xcalloc((size_t)n, sizeof *names);
    for (int l = 0; l < ad->num_layers; l++)
        for (int t = 0; t < LN_NTARGET; t++) {
            int i = l * LN_NTARGET + t;
            const ln_lora *lo = &ad->lora[i];
            if (!lo->A.w) continue;
            host[2 * i] = ln_xmalloc((size_t)lo->A.n * sizeof(float));
            host[2 * i + 1] = ln_xmalloc((size_t)lo->B.n * sizeof(float));
            m->be->download(host[2 * i], lo->A.w, (size_t)lo->A.n * sizeof(float));
            m->be->download(host[2 * i + 1], lo->B.w, (size_t)lo->B.n * sizeof(float));
            snprintf(names[i][0], sizeof names[i][0], "model.layers.%d.%s.lora_A.weight", l, ln_target_module((ln_target)t));
            snprintf(names[i][1], sizeof names[i][1], "model.layers.%d.%s.lora_B.weight", l, ln_target_module((ln_target)t));
            int64_t sa[2] = {lo->A.rows, lo->A.cols}, sb[2] = {lo->B.rows, lo->B.cols};
            st_writer_add(w, names[i][0], ST_F32, 2, sa, host[2 * i]);
            st_writer_add(w, names[i][1], ST_F32, 2, sb, host[2 * i + 1]);
        }
    char *p = ln_path_join(dir, "init.safetensors");
    int rc = st_writer_write(w, p, e);
    free(p);
    st_writer_free(w);
    for (int i = 0; i < 2 * n; i++) free(host[i]);
    free(host);
    free(names);
    return rc;
}

int cmd_init(int argc, char **argv) {
    const char *model = NULL, *out = NULL, *method = NULL, *targets_s = NULL, *cov_file = NULL;
    int rank = 0, ranks = 1;
    float alpha = 0;
    uint64_t seed = 0;
    cli_calib cal = {0};
    const cli_opt opts[] = {
        {"model", CLI_STR, &model, "model directory"},
        {"method", CLI_STR, &method, "lora, lora_fa, pissa, milora, corda, lora_null_v1, lora_null_v2"},
        {"rank", CLI_INT, &rank, "adapter rank r"},
        {"alpha", CLI_FLOAT, &alpha, "lora_alpha (default: r for residual methods, 2r for lora/lora_fa)"},
        {"targets", CLI_STR, &targets_s, "target modules (default all: q,k,v,o,gate,up,down)"},
        {"seed", CLI_U64, &seed, "seed of lora/lora_fa's random A (default 0)"},
        {"covariance", CLI_STR, &cov_file, "covariances from `loranull covariance` instead of --calibration"},
        {"out", CLI_STR, &out, "directory to write init.safetensors into"},
        {"ranks", CLI_INT, &ranks, "tensor-parallel ranks (threads): calibration on N shards, and lora_null_v1/v2's "
                                   "eigensolves spread over them (default 1)"},
        CLI_CALIB_OPTS(cal),
    };
    int nopts = (int)(sizeof opts / sizeof *opts);
    if (cli_wants_help(argc, argv)) {
        cli_usage("init", "--model DIR --method M --rank R [--calibration FILE] --out DIR", opts, nopts);
        return 0;
    }
    ln_err e = {{0}};
    ln_model *m = NULL;
    ln_calibration *c = NULL;
    ln_adapter ad;
    memset(&ad, 0, sizeof ad);
    int *solves = NULL;
    unsigned targets = LN_TARGETS_ALL;
    ln_method me;
    double t_cal = 0, t_init = 0;
    if (cli_parse(argc, argv, 1, opts, nopts, &e)) goto fail;
    if (!model || !method || rank <= 0 || !out) {
        ln_errf(&e, "init needs --model, --method, --rank (positive) and --out");
        goto fail;
    }
    if (ln_method_parse(method, &me, &e)) goto fail;
    if (!ln_method_is_adapter(me)) {
        ln_errf(&e, "init: method full has no adapter factors");
        goto fail;
    }
    if (targets_s && ln_targets_parse(targets_s, &targets, &e)) goto fail;
    ln_config mc;
    if (ln_config_load(model, &mc, &e) || cli_ranks_check(ranks, NULL, &mc, &e) ||
        cli_ranks_check_lora(ranks, &mc, rank, targets, &e))
        goto fail;
    if (ln_model_load(model, lnb_cpu(), &m, &e)) goto fail;
    solves = ln_xcalloc((size_t)ranks, sizeof *solves);
    if (ln_method_needs_calibration(me)) {
        double t0 = ln_now_s();
        if (cov_file) {
            if (ln_calibration_load(cov_file, &m->cfg, &c, &e)) goto fail;
        } else if (!cal.file) {
            ln_errf(&e, "init: method %s needs --calibration FILE (or --covariance FILE)", method);
            goto fail;
        } else if (cli_calibrate_ranks(m, model, &cal, targets, ranks, &c, &e)) {
            goto fail;
        }
        t_cal = ln_now_s() - t0;
    }
    ln_adapter_opts ao = {.method = method, .rank = rank, .alpha = alpha, .targets = targets, .seed = seed,
                          .covariance = ln_calibration_covariance, .method_ctx = c};
    double t0 = ln_now_s();
    if (cli_adapter_init_ranks(m, &ad, &ao, ranks, solves, &e)) goto fail;
    t_init = ln_now_s() - t0;
    if (write_factors(m, &ad, out, &e)) goto fail;
    printf("{\"method\":\"%s\",\"rank\":%d,\"alpha\":%g,\"layers\":%d,\"calibration_s\":%.4f,\"init_s\":%.4f,"
           "\"from_cache\":%s,\"ranks\":%d,\"eigensolves\":[",
           method, ad.rank, (double)ad.alpha, ad.num_layers, t_cal, t_init, c && c->from_cache ? "true" : "false",
           ranks);
    for (int r = 0; r < ranks; r++) printf("%s%d", r ? "," : "", solves[r]); /* per rank; all 0 unless spread */
    printf("]}\n");
    free(solves);
    ln_adapter_free(&ad);
    ln_calibration_free(c);
    ln_model_free(m);
    return 0;
fail:
    fprintf(stderr, "loranull init: %s\n", e.msg);
    free(solves);
    ln_adapter_free(&ad);
    ln_calibration_free(c);
    ln_model_free(m);
    return 1;
}
