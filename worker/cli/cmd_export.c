/* cmd_export.c — `loranull export`: a training run's adapter in PEFT's format, relative to the
 * ORIGINAL base weights (export.h), or with --merge a full merged checkpoint in the base's dtype. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/cli/args.h"
#include "worker/cli/commands.h"
#include "worker/engine/adapter.h"
#include "worker/engine/export.h"
#include "worker/engine/model.h"

/* The base model of a run: --model, else "model" in RUN/run.json (written by `loranull train`). */
static char *run_base_model(const char *run, const char *given, ln_err *e) {
    if (given) return ln_xstrdup(given);
    char *p = ln_path_join(run, "run.json");
    json_error_t je;
    json_t *o = ln_file_exists(p) ? json_load_file(p, 0, &je) : NULL;
    const char *m = o ? json_string_value(json_object_get(o, "model")) : NULL;
    char *res = m ? ln_xstrdup(m) : NULL;
    if (!res) ln_errf(e, "export: %s has no \"model\" field; pass the base model with --model DIR", p);
    json_decref(o);
    free(p);
    return res;
}

/* Copies the tokenizer files of the base next to a merged model, so it is usable as it is. */
static void copy_tokenizer(const char *from, const char *to) {
    const char *names[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char *src = ln_path_join(from, names[i]), *dst = ln_path_join(to, names[i]), *buf = NULL;
        size_t len;
        ln_err e;
        if (ln_file_exists(src) && ln_read_file(src, &buf, &len, &e) == 0) ln_write_file_atomic(dst, buf, len, &e);
        free(buf);
        free(src);
        free(dst);
    }
}

int cmd_export(int argc, char **argv) {
    const char *run = NULL, *out = NULL, *model = NULL, *dtype_s = NULL;
    int merge = 0;
    const cli_opt opts[] = {
        {"run", CLI_STR, &run, "training output directory (adapter.safetensors, or a full model)"},
        {"out", CLI_STR, &out, "directory to write the PEFT adapter (or with --merge the merged model) into"},
        {"merge", CLI_FLAG, &merge, "write a full merged checkpoint instead of an adapter"},
        {"model", CLI_STR, &model, "the ORIGINAL base model (default: \"model\" in RUN/run.json)"},
        {"dtype", CLI_STR, &dtype_s, "merged weights' dtype: f32, bf16 or f16 (default: the base's)"},
    };
    int nopts = (int)(sizeof opts / sizeof *opts);
    if (cli_wants_help(argc, argv)) {
        cli_usage("export", "--run DIR --out DIR [--merge] [--model BASE]", opts, nopts);
        return 0;
    }
    ln_err e = {{0}};
    ln_model *m = NULL, *orig = NULL;
    ln_adapter ad;
    memset(&ad, 0, sizeof ad);
    char *base = NULL, *native = NULL;
    int dtype = -1;
    if (cli_parse(argc, argv, 1, opts, nopts, &e)) goto fail;
    if (!run || !out) {
        ln_errf(&e, "export needs --run and --out");
        goto fail;
    }
    if (dtype_s) {
        if (strcmp(dtype_s, "f32") == 0) dtype = ST_F32;
        else if (strcmp(dtype_s, "bf16") == 0) dtype = ST_BF16;
        else if (strcmp(dtype_s, "f16") == 0) dtype = ST_F16;
        else {
            ln_errf(&e, "option --dtype: \"%s\" is not one of f32, bf16, f16", dtype_s);
            goto fail;
        }
    }
    native = ln_path_join(run, "adapter.safetensors");
    if (!ln_file_exists(native)) {
        /* A full fine-tune's run holds the model itself. */
        char *cfg = ln_path_join(run, "config.json");
        int full = ln_file_exists(cfg);
        free(cfg);
        if (!full) {
            ln_errf(&e, "export: %s has neither adapter.safetensors nor a full model (config.json)", run);
            goto fail;
        }
        if (!merge) {
            ln_errf(&e, "export: %s is a full fine-tune, which has no adapter; use --merge", run);
            goto fail;
        }
        if (ln_model_load(run, lnb_cpu(), &m, &e)) goto fail;
        ad.full = 1;
        ln_err be; /* the base only supplies the dtype and the tokenizer files here */
        base = run_base_model(run, model, &be);
        ln_config bc;
        if (dtype < 0 && base && ln_config_load(base, &bc, &be) == 0) dtype = ln_export_base_dtype(&bc);
        if (ln_export_merged(m, m, &ad, out, dtype, &e)) goto fail;
        copy_tokenizer(base ? base : run, out);
        printf("{\"out\":\"%s\",\"merged\":true,\"method\":\"full\"}\n", out);
        goto done;
    }
    if (!(base = run_base_model(run, model, &e))) goto fail;
    if (ln_model_load(base, lnb_cpu(), &m, &e)) goto fail;
    if (ln_adapter_load(m, run, &ad, &e)) goto fail;
    if (merge) {
        if (ln_model_load(base, lnb_cpu(), &orig, &e)) goto fail;
        if (ln_export_merged(orig, m, &ad, out, dtype, &e)) goto fail;
        copy_tokenizer(base, out);
        printf("{\"out\":\"%s\",\"merged\":true,\"method\":\"%s\"}\n", out, ad.method);
    } else {
        int r2;
        float a2;
        ln_export_peft_shape(&ad, &r2, &a2);
        if (ln_export_peft(m, &ad, base, out, &e)) goto fail;
        printf("{\"out\":\"%s\",\"merged\":false,\"method\":\"%s\",\"r\":%d,\"lora_alpha\":%g}\n", out, ad.method, r2,
               (double)a2);
    }
done:
    ln_adapter_free(&ad);
    ln_model_free(orig);
    ln_model_free(m);
    free(base);
    free(native);
    return 0;
fail:
    fprintf(stderr, "loranull export: %s\n", e.msg);
    ln_adapter_free(&ad);
    ln_model_free(orig);
    ln_model_free(m);
    free(base);
    free(native);
    return 1;
}
