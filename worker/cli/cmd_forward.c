/* cmd_forward.c — `loranull forward`: logits of a model (+ adapter) for given token ids.
 * The ids file is JSON: one list of ids, or a list of equally long lists (a batch). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/cli/args.h"
#include "worker/cli/commands.h"
#include "worker/engine/adapter.h"
#include "worker/engine/model.h"

/* Reads the ids file into a (B, T) batch without targets. */
static int read_ids(const char *path, ln_batch *b, ln_err *e)
{
    json_error_t je;
    json_t *o = json_load_file(path, 0, &je);
    if (!o) return ln_errf(e, "%s: invalid JSON at line %d: %s", path, je.line, je.text);
    int rc = -1;
    memset(b, 0, sizeof *b);
    if (!json_is_array(o) || json_array_size(o) == 0) { ln_errf(e, "%s: expected a non-empty list of token ids", path); goto out; }
    int nested = json_is_array(json_array_get(o, 0));
    size_t B = nested ? json_array_size(o) : 1;
    json_t *row0 = nested ? json_array_get(o, 0) : o;
    size_t T = json_array_size(row0);
    if (T == 0) { ln_errf(e, "%s: row 0 is empty", path); goto out; }
    b->B = (int)B;
    b->T = (int)T;
    b->ids = ln_xmalloc(B * T * sizeof(int32_t));
    for (size_t i = 0; i < B; i++) {
        json_t *row = nested ? json_array_get(o, i) : o;
        if (!json_is_array(row) || json_array_size(row) != T) {
            ln_errf(e, "%s: row %zu has %zu ids but row 0 has %zu (rows must be equally long)", path, i,
                    json_is_array(row) ? json_array_size(row) : 0, T);
            goto out;
        }
        for (size_t t = 0; t < T; t++) {
            json_t *v = json_array_get(row, t);
            if (!json_is_integer(v)) { ln_errf(e, "%s: row %zu, position %zu is not an integer token id", path, i, t); goto out; }
            b->ids[i * T + t] = (int32_t)json_integer_value(v);
        }
    }
    rc = 0;
out:
    if (rc) { free(b->ids); b->ids = NULL; }
    json_decref(o);
    return rc;
}

int cmd_forward(int argc, char **argv)
{
    const char *model = NULL, *adapter = NULL, *ids = NULL, *out = NULL;
    const cli_opt opts[] = {
        {"model", CLI_STR, &model, "model directory (config.json + safetensors)"},
        {"adapter", CLI_STR, &adapter, "adapter: a PEFT dir, a training output dir or adapter.safetensors"},
        {"input-ids", CLI_STR, &ids, "JSON file: [ids...] or [[ids...], ...] (equal lengths)"},
        {"out", CLI_STR, &out, "where to write logits.safetensors (tensor \"logits\", B × T × V, F32)"},
    };
    int nopts = (int)(sizeof opts / sizeof *opts);
    if (cli_wants_help(argc, argv)) {
        cli_usage("forward", "--model DIR [--adapter DIR] --input-ids FILE --out logits.safetensors", opts, nopts);
        return 0;
    }
    ln_err e = {{0}};
    ln_model *m = NULL;
    ln_adapter ad;
    memset(&ad, 0, sizeof ad);
    ln_acts *acts = NULL;
    ln_batch b = {0};
    int have_ad = 0;
    if (cli_parse(argc, argv, 1, opts, nopts, &e)) goto fail;
    if (!model || !ids || !out) { ln_errf(&e, "forward needs --model, --input-ids and --out"); goto fail; }
    if (read_ids(ids, &b, &e)) goto fail;
    if (ln_model_load(model, lnb_cpu(), &m, &e)) goto fail;
    if (adapter) {
        if (ln_adapter_load(m, adapter, &ad, &e)) goto fail;
        have_ad = 1;
    }
    acts = ln_acts_new();
    if (ln_model_forward(m, have_ad ? &ad : NULL, acts, &b, NULL, NULL, &e)) goto fail;
    st_writer *w = st_writer_new();
    int64_t shape[3] = {b.B, b.T, m->cfg.vocab_size};
    st_writer_add(w, "logits", ST_F32, 3, shape, ln_acts_logits(acts));
    int rc = st_writer_write(w, out, &e);
    st_writer_free(w);
    if (rc) goto fail;
    ln_acts_free(m, acts);
    if (have_ad) ln_adapter_free(&ad);
    ln_model_free(m);
    free(b.ids);
    return 0;
fail:
    if (acts) ln_acts_free(m, acts);
    if (have_ad) ln_adapter_free(&ad);
    ln_model_free(m);
    free(b.ids);
    fprintf(stderr, "loranull forward: %s\n", e.msg);
    return 1;
}
