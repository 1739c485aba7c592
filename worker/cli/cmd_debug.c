/* cmd_debug.c — `loranull debug-grads` (hidden): one forward + backward over a whole JSONL file
 * (in file order, one batch), written as safetensors for the reference tests:
 *   "loss" [1], "logits" [B, T, V], "init.<param>" (every adapter factor, or every model weight in
 *   full mode, before the step) and "grad.<param>" for every trainable param. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/cli/args.h"
#include "worker/cli/commands.h"
#include "worker/engine/adapter.h"
#include "worker/engine/model.h"
#include "worker/engine/train.h"

typedef struct { st_writer *w; char **names; int n, cap; const char *prefix; int grads; } dump_ctx;

static void dump(ln_param *p, void *ctx)
{
    dump_ctx *d = ctx;
    const float *src = d->grads ? p->g : p->w;
    if (!src) return;
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 64;
        d->names = ln_xrealloc(d->names, (size_t)d->cap * sizeof(char *));
    }
    size_t len = strlen(d->prefix) + strlen(p->name) + 1;
    char *name = ln_xmalloc(len);
    snprintf(name, len, "%s%s", d->prefix, p->name);
    d->names[d->n++] = name;
    int64_t shape[2] = {p->rows, p->cols};
    /* copy: "init." must be the values before anything changes them */
    st_writer_add_f32(d->w, name, ST_F32, p->ndim, shape, src);
}

int cmd_debug_grads(int argc, char **argv)
{
    const char *model = NULL, *data = NULL, *out = NULL, *method = "lora", *targets = "q,k,v,o,gate,up,down";
    const char *adapter = NULL;
    int rank = 4;
    float alpha = 0;
    uint64_t seed = 42;
    const cli_opt opts[] = {
        {"model", CLI_STR, &model, "model directory"},
        {"data", CLI_STR, &data, "pre-tokenized JSONL, all of it one batch"},
        {"out", CLI_STR, &out, "output safetensors"},
        {"method", CLI_STR, &method, "lora, lora_fa or full"},
        {"rank", CLI_INT, &rank, "LoRA rank"},
        {"alpha", CLI_FLOAT, &alpha, "LoRA alpha"},
        {"targets", CLI_STR, &targets, "target modules"},
        {"seed", CLI_U64, &seed, "init seed"},
        {"adapter", CLI_STR, &adapter, "start from this adapter (PEFT dir or native) instead of an init"},
    };
    int nopts = (int)(sizeof opts / sizeof *opts);
    ln_err e = {{0}};
    ln_model *m = NULL;
    ln_adapter ad;
    memset(&ad, 0, sizeof ad);
    ln_dataset *ds = NULL;
    ln_acts *acts = NULL;
    ln_batch b = {0};
    st_writer *w = NULL;
    dump_ctx d = {0};
    int have_ad = 0;
    if (cli_parse(argc, argv, 1, opts, nopts, &e)) goto fail;
    if (!model || !data || !out) { ln_errf(&e, "debug-grads needs --model, --data and --out"); goto fail; }
    if (ln_model_load(model, lnb_cpu(), &m, &e)) goto fail;
    ln_data_opts dopts = {0};
    if (ln_dataset_load(data, NULL, &dopts, &ds, &e)) goto fail;
    unsigned mask;
    if (ln_targets_parse(targets, &mask, &e)) goto fail;
    if (adapter) {
        if (ln_adapter_load(m, adapter, &ad, &e)) goto fail;
        have_ad = 1;
        /* lora_fa on a loaded adapter: the same factors with A frozen */
        for (int i = 0; strcmp(method, "lora_fa") == 0 && i < ad.num_layers * LN_NTARGET; i++)
            if (ad.lora[i].A.w) ln_param_set_trainable(m->be, &ad.lora[i].A, 0, NULL);
    } else {
        ln_adapter_opts ao = {.method = method, .rank = rank, .alpha = alpha, .targets = mask, .seed = seed};
        if (ln_adapter_init(m, &ad, &ao, &e)) goto fail;
        have_ad = 1;
    }
    w = st_writer_new();
    d.w = w;
    d.prefix = "init.";
    if (ad.full) ln_model_for_each_param(m, dump, &d);
    else ln_adapter_for_each_param(&ad, dump, &d);
    const ln_example **ex = ln_xmalloc((size_t)ds->n * sizeof *ex);
    for (int64_t i = 0; i < ds->n; i++) ex[i] = &ds->ex[i];
    int brc = ln_batch_build(&b, ex, (int)ds->n, &e);
    free(ex);
    if (brc) goto fail;
    acts = ln_acts_new();
    double loss_sum = 0;
    if (ln_model_forward(m, &ad, acts, &b, NULL, &loss_sum, &e)) goto fail;
    float loss = (float)(loss_sum / (double)b.n_targets);
    int64_t one = 1, lshape[3] = {b.B, b.T, m->cfg.vocab_size};
    st_writer_add_f32(w, "loss", ST_F32, 1, &one, &loss);
    st_writer_add_f32(w, "logits", ST_F32, 3, lshape, ln_acts_logits(acts));
    if (ln_model_backward(m, &ad, acts, &b, 1.0f / (float)b.n_targets, &e)) goto fail;
    d.prefix = "grad.";
    d.grads = 1;
    ln_model_for_each_param(m, dump, &d);
    if (!ad.full) ln_adapter_for_each_param(&ad, dump, &d);
    if (st_writer_write(w, out, &e)) goto fail;
    st_writer_free(w);
    for (int i = 0; i < d.n; i++) free(d.names[i]);
    free(d.names);
    ln_batch_free(&b);
    ln_acts_free(m, acts);
    ln_adapter_free(&ad);
    ln_dataset_free(ds);
    ln_model_free(m);
    return 0;
fail:
    if (w) st_writer_free(w);
    for (int i = 0; i < d.n; i++) free(d.names[i]);
    free(d.names);
    ln_batch_free(&b);
    if (acts) ln_acts_free(m, acts);
    if (have_ad) ln_adapter_free(&ad);
    ln_dataset_free(ds);
    ln_model_free(m);
    fprintf(stderr, "loranull debug-grads: %s\n", e.msg);
    return 1;
}

/* `loranull bench-sgemm` (hidden): the sgemm ceiling of this machine through the same backend
 * the engine uses: C (M×N) = A (M×K) · Bᵀ (N×K), the shape of a linear layer's forward.
 * Prints {"m","n","k","gflops","seconds"} as JSON (best of --reps after one warm-up call). */
int cmd_bench_sgemm(int argc, char **argv)
{
    int M = 2048, N = 2048, K = 2048, reps = 5;
    const cli_opt opts[] = {
        {"m", CLI_INT, &M, "rows"}, {"n", CLI_INT, &N, "columns"}, {"k", CLI_INT, &K, "inner dimension"},
        {"reps", CLI_INT, &reps, "timed repetitions"},
    };
    ln_err e = {{0}};
    if (cli_parse(argc, argv, 1, opts, (int)(sizeof opts / sizeof *opts), &e)) {
        fprintf(stderr, "loranull bench-sgemm: %s\n", e.msg);
        return 1;
    }
    const lnb_backend *be = lnb_cpu();
    float *A = be->alloc((size_t)M * K * 4), *B = be->alloc((size_t)N * K * 4), *C = be->alloc((size_t)M * N * 4);
    if (!A || !B || !C) {
        fprintf(stderr, "loranull bench-sgemm: out of memory\n");
        return 1;
    }
    for (int64_t i = 0; i < (int64_t)M * K; i++) A[i] = (float)(i % 7) * 0.1f;
    for (int64_t i = 0; i < (int64_t)N * K; i++) B[i] = (float)(i % 5) * 0.1f;
    be->matmul(0, 1, M, N, K, 1.0f, A, K, B, K, 0.0f, C, N);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = ln_now_s();
        be->matmul(0, 1, M, N, K, 1.0f, A, K, B, K, 0.0f, C, N);
        double dt = ln_now_s() - t0;
        best = dt < best ? dt : best;
    }
    printf("{\"m\":%d,\"n\":%d,\"k\":%d,\"seconds\":%.6f,\"gflops\":%.2f}\n", M, N, K, best,
           2.0 * M * N * K / best / 1e9);
    be->free(A);
    be->free(B);
    be->free(C);
    return 0;
}
