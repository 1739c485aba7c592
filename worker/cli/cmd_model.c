/* cmd_model.c — `loranull model new`: a randomly initialised LLaMA in Hugging Face layout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/backend/backend.h"
#include "worker/cli/args.h"
#include "worker/cli/commands.h"
#include "worker/engine/model.h"
#include "worker/engine/tokenizer.h"

int cmd_model(int argc, char **argv)
{
    const char *config = NULL, *out = NULL, *dtype = "f32";
    uint64_t seed = 0;
    int no_tok = 0;
    const cli_opt opts[] = {
        {"config", CLI_STR, &config, "config.json to build the model from (transformers' LlamaConfig fields)"},
        {"out", CLI_STR, &out, "directory to write config.json, model.safetensors, tokenizer.json into"},
        {"seed", CLI_U64, &seed, "seed of the random weights (default 0)"},
        {"dtype", CLI_STR, &dtype, "f32 (default), bf16 or f16"},
        {"no-tokenizer", CLI_FLAG, &no_tok, "do not write tokenizer.json"},
    };
    int nopts = (int)(sizeof opts / sizeof *opts);
    if (argc < 2 || strcmp(argv[1], "new") != 0 || cli_wants_help(argc, argv)) {
        cli_usage("model new", "--config CFG.json --out DIR [--seed N] [--dtype f32|bf16|f16]", opts, nopts);
        return argc >= 2 && cli_wants_help(argc, argv) ? 0 : 2;
    }
    ln_err e = {{0}};
    ln_config c;
    ln_model *m = NULL;
    st_dtype dt = ST_F32;
    if (cli_parse(argc, argv, 2, opts, nopts, &e)) goto fail;
    if (!config || !out) { ln_errf(&e, "model new needs --config and --out"); goto fail; }
    if (strcmp(dtype, "f32") == 0) dt = ST_F32;
    else if (strcmp(dtype, "bf16") == 0) dt = ST_BF16;
    else if (strcmp(dtype, "f16") == 0) dt = ST_F16;
    else { ln_errf(&e, "option --dtype: \"%s\" is not one of f32, bf16, f16", dtype); goto fail; }
    if (ln_config_load(config, &c, &e)) goto fail;
    if (ln_model_new_random(&c, lnb_cpu(), seed, &m, &e)) goto fail;
    if (ln_model_save(m, out, dt, &e)) goto fail;
    if (!no_tok) {
        if (c.vocab_size < 264) {
            fprintf(stderr, "loranull: note: vocab_size %d < 264, no tokenizer.json written (pre-tokenized data only)\n",
                    c.vocab_size);
        } else {
            char *tp = ln_path_join(out, "tokenizer.json");
            int rc = ln_tokenizer_make_default(tp, c.vocab_size, &e);
            free(tp);
            if (rc) goto fail;
        }
    }
    ln_model_free(m);
    return 0;
fail:
    ln_model_free(m);
    fprintf(stderr, "loranull model: %s\n", e.msg);
    return 1;
}
