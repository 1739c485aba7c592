/* cmd_train.c — `loranull train`: one training job on the local machine. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/util.h"
#include "worker/cli/args.h"
#include "worker/cli/calib_opts.h"
#include "worker/backend/select.h"
#include "worker/cli/commands.h"
#include "worker/cli/ranks.h"
#include "worker/engine/adapter.h"
#include "worker/engine/data.h"
#include "worker/engine/lora_init.h"
#include "worker/engine/model.h"
#include "worker/engine/nullspace.h"
#include "worker/engine/tensor_parallel.h"
#include "worker/engine/tokenizer.h"
#include "worker/engine/train.h"

typedef struct { const ln_dataset *val; int batch; } val_ctx;

/* Adds "val_loss" to the metrics row. */
static int eval_val(ln_model *m, ln_adapter *ad, int64_t step, json_t *row, void *ctx, ln_err *e)
{
    val_ctx *v = ctx;
    double loss;
    if (ln_eval_loss(m, ad, v->val, v->batch, &loss, e)) return -1;
    json_object_set_new(row, "val_loss", json_real(loss));
    return 0;
}

int cmd_train(int argc, char **argv)
{
    ln_train_opts to = ln_train_defaults();
    const char *model = NULL, *data = NULL, *val = NULL, *out = NULL, *method = "lora", *targets = "q,k,v,o,gate,up,down";
    const char *device = NULL, *cov_file = NULL;
    int rank = 8, max_seq_len = 2048, no_shuffle = 0, recompute = 0, ranks = 1;
    float alpha = 0;
    cli_calib cal = {0};
    cli_knowledge kn = {0};
    const cli_opt opts[] = {
        {"model", CLI_STR, &model, "base model directory (HF layout)"},
        {"data", CLI_STR, &data, "training data, JSONL (input_ids/labels, text, prompt/completion, messages)"},
        {"val-data", CLI_STR, &val, "validation JSONL: val_loss in metrics every --eval-every steps"},
        {"out", CLI_STR, &out, "output directory: metrics.jsonl, checkpoints/, the adapter (or model)"},
        {"device", CLI_STR, &device, "cpu (default), cuda or cuda:N (the CUDA build, build/cuda/bin/); or $LORANULL_DEVICE"},
        {"method", CLI_STR, &method, "lora (default), lora_fa, full, pissa, milora, corda, lora_null_v1, lora_null_v2"},
        {"rank", CLI_INT, &rank, "LoRA rank (default 8)"},
        {"alpha", CLI_FLOAT, &alpha, "LoRA alpha; scale = alpha/rank (default 2·rank; rank for residual methods)"},
        {"targets", CLI_STR, &targets, "modules to adapt (default q,k,v,o,gate,up,down)"},
        {"epochs", CLI_INT, &to.epochs, "passes over the data (default 1; ignored with --max-steps)"},
        {"max-steps", CLI_I64, &to.max_steps, "optimizer steps (overrides --epochs)"},
        {"batch-size", CLI_INT, &to.batch_size, "examples per micro-batch (default 8)"},
        {"grad-accum", CLI_INT, &to.grad_accum, "micro-batches per optimizer step (default 1)"},
        {"lr", CLI_FLOAT, &to.optim.lr, "peak learning rate (default 2e-4)"},
        {"weight-decay", CLI_FLOAT, &to.optim.weight_decay, "AdamW decoupled weight decay (default 0)"},
        {"warmup-ratio", CLI_DOUBLE, &to.warmup_ratio, "fraction of steps of linear warmup (default 0)"},
        {"max-grad-norm", CLI_FLOAT, &to.optim.max_grad_norm, "global gradient-norm clip (default 1; 0 = off)"},
        {"max-seq-len", CLI_INT, &max_seq_len, "truncate examples to this many tokens (default 2048)"},
        {"seed", CLI_U64, &to.seed, "seed of init and data order (default 42)"},
        {"no-shuffle", CLI_FLAG, &no_shuffle, "keep the file's order"},
        {"pack", CLI_INT, &to.pack, "pack whole examples into rows of N tokens (attention stays per example)"},
        CLI_RANKS_OPT(ranks),
        {"recompute", CLI_FLAG, &recompute, "activation recomputation: keep only each layer's input, redo the rest in the backward"},
        {"save-every", CLI_I64, &to.save_every, "checkpoint every N steps (default: only at the end)"},
        {"eval-every", CLI_I64, &to.eval_every, "validation every N steps (with --val-data)"},
        {"resume", CLI_STR, &to.resume, "continue from a checkpoint (OUT/checkpoints/step-N)"},
        {"stop-at-step", CLI_I64, &to.stop_at_step, NULL}, /* tests: an interruption after step N */
        {"covariance", CLI_STR, &cov_file, "covariances from `loranull covariance` instead of --calibration"},
        CLI_CALIB_OPTS(cal),
    };
    int nopts = (int)(sizeof opts / sizeof *opts);
    if (cli_wants_help(argc, argv)) {
        cli_usage("train", "--model DIR --data FILE.jsonl --out DIR [options]", opts, nopts);
        return 0;
    }
    ln_err e = {{0}};
    ln_model *m = NULL;
    ln_adapter ad;
    memset(&ad, 0, sizeof ad);
    ln_dataset *ds = NULL, *vds = NULL;
    ln_tokenizer *tok = NULL;
    int have_ad = 0;
    if (cli_parse(argc, argv, 1, opts, nopts, &e)) goto fail;
    if (!model || !data || !out) { ln_errf(&e, "train needs --model, --data and --out"); goto fail; }
    if (cal.file && cov_file) { ln_errf(&e, "train takes --calibration or --covariance, not both"); goto fail; }
    to.shuffle = !no_shuffle;
    to.out_dir = out;
    to.progress = isatty(2);
    const lnb_backend *be = lnb_select(device, &e);
    if (!be) goto fail;
    {
        /* on a GPU: the memory plan first, so a job that cannot fit fails now, with the numbers */
        ln_config mc;
        unsigned tm = 0;
        if (ln_config_load(model, &mc, &e) || ln_targets_parse(targets, &tm, &e) ||
            cli_ranks_check(ranks, be, &mc, &e))
            goto fail;
        /* (a resumed adapter has the checkpoint's rank: its shards are checked when they are cut) */
        if (!to.resume && strcmp(method, "full") != 0 && cli_ranks_check_lora(ranks, &mc, rank, tm, &e)) goto fail;
        int nt = 0;
        for (int t = 0; t < LN_NTARGET; t++) nt += (tm >> t) & 1;
        int full = strcmp(method, "full") == 0;
        ln_method mm = LN_METHOD_LORA;
        if (!full && ln_method_parse(method, &mm, &e)) goto fail;
        /* what the worker's plan counts too (wd_run.c): the init's scratch and a residual method's
         * A0/B0, the calibration window and device covariances, the validation forward */
        lnb_cuda_plan_req pq = {.vocab = mc.vocab_size, .hidden = mc.hidden_size, .intermediate = mc.intermediate_size,
                                .layers = mc.num_layers, .heads = mc.num_heads, .kv_heads = mc.num_kv_heads,
                                .head_dim = mc.head_dim, .tied = mc.tie_word_embeddings, .batch = to.batch_size,
                                .seq = max_seq_len, .rank = full ? 0 : rank, .targets = nt, .target_mask = tm,
                                .train_a = strcmp(method, "lora_fa") != 0 && strcmp(method, "lora_null_v2") != 0,
                                .residual = !full && !to.resume && ln_method_has_residual(mm),
                                .method = full || to.resume ? NULL : method, .calibrate = cal.file != NULL,
                                .calib_max_length = cal.max_length,
                                .device_covariances = cal.file != NULL && ln_calibrate_accumulator() != NULL,
                                .recompute = recompute, .eval_during_training = val != NULL,
                                .bf16_copies = !full}; /* ln_train freezes every frozen weight (model.h) */
        if (lnb_select_plan_check(be, &pq, &e)) goto fail;
    }
    if (ln_model_load(model, be, &m, &e)) goto fail;
    m->recompute = recompute;
    ln_nullspace_set_basis_solver(lnb_select_basis_solver(be)); /* GPU: LoRA-Null bases by cuSOLVER */
    char *tp = ln_path_join(model, "tokenizer.json");
    int rc = ln_file_exists(tp) ? ln_tokenizer_load(tp, &tok, &e) : 0;
    free(tp);
    if (rc) goto fail;
    ln_data_opts dopts = {.max_seq_len = max_seq_len, .overlong = LN_OVERLONG_TRUNCATE, .chat_template = NULL};
    if (ln_dataset_load(data, tok, &dopts, &ds, &e)) goto fail;
    if (val && ln_dataset_load(val, tok, &dopts, &vds, &e)) goto fail;
    unsigned mask;
    if (ln_targets_parse(targets, &mask, &e)) goto fail;
    if (cal.file && cli_knowledge_calibrate(&kn, m, model, &cal, mask, ranks, &e)) goto fail;
    if (cov_file && ln_calibration_load(cov_file, &m->cfg, &kn.calib, &e)) goto fail;
    if (to.resume) {
        if (ln_train_load_checkpoint(m, to.resume, &ad, &e)) goto fail;
    } else {
        ln_adapter_opts ao = {.method = method, .rank = rank, .alpha = alpha, .targets = mask, .seed = to.seed,
                              .covariance = ln_calibration_covariance, .method_ctx = kn.calib};
        if (cli_adapter_init_ranks(m, &ad, &ao, ranks, NULL, &e)) goto fail;
    }
    have_ad = 1;
    val_ctx vc = {vds, to.batch_size};
    if (vds) {
        to.eval = eval_val;
        to.eval_ctx = &vc;
    }
    if (cli_knowledge_track(&kn, m, &ad, &to, &e) || cli_write_run_json(out, model, method, &e)) goto fail;
    ln_train_result res;
    if (ranks > 1 ? ln_tp_train(m, &ad, ds, &to, ranks, &res, &e) : ln_train(m, &ad, ds, &to, &res, &e)) goto fail;
    if (cli_knowledge_summary(&kn, out, &e)) goto fail;
    fprintf(stderr, "loranull train: %lld steps, last loss %.4f%s; output in %s\n", (long long)res.steps, res.last_loss,
            res.stopped ? " (stopped early; resume from the last checkpoint)" : "", out);
    ln_adapter_free(&ad);
    cli_knowledge_free(&kn);
    ln_dataset_free(ds);
    ln_dataset_free(vds);
    ln_tokenizer_free(tok);
    ln_model_free(m);
    return 0;
fail:
    if (have_ad) ln_adapter_free(&ad);
    cli_knowledge_free(&kn);
    ln_dataset_free(ds);
    ln_dataset_free(vds);
    ln_tokenizer_free(tok);
    ln_model_free(m);
    fprintf(stderr, "loranull train: %s\n", e.msg);
    return 1;
}
