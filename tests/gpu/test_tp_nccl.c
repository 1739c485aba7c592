/* Tensor parallelism on the CUDA backend through the NCCL comm: a one-rank NCCL group (what a GPU
 * worker of a gang holds, with size 1) trains with ln_tp_train_rank, against plain ln_train on the
 * same GPU, same model, adapter, data and options: per-step losses and every trained parameter must
 * agree (fp32 math; the shard of one rank is the whole model). LoRA on all seven targets, and full
 * fine-tuning.
 *
 * What this does NOT cover: at size 1 the engine skips its per-layer all-reduces, gradient
 * reductions and stop agreements (model.c, tensor_parallel.c: `size == 1`), so the collectives
 * that reach NCCL here are the gathers of the trained shards (host buffers, staged) — counted and
 * printed, and required to be more than none. The sharded math over NCCL needs ≥ 2 GPUs
 * (gang_gpu.py); test_nccl checks every collective on device, managed and host buffers. */
#include <stdint.h>

#include "tests/gpu/gpu_check.h"
#include "worker/engine/adapter.h"
#include "worker/engine/model.h"
#include "worker/engine/tensor_parallel.h"
#include "worker/engine/train.h"

static const char *CONFIG =
    "{\"vocab_size\":64,\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,"
    "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":16,\"max_position_embeddings\":64,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"tie_word_embeddings\":false}";
#define STEPS 6

static ln_config cfg;

/* The NCCL comm's own table, wrapped so that the test can count what reaches it. */
static const comm_ops *nccl_ops;
static int n_calls[4]; /* allreduce, allgather, broadcast, barrier */
static int count_allreduce(ln_comm *c, float *b, int64_t n, ln_err *e)
{
    n_calls[0]++;
    return nccl_ops->allreduce_sum(c, b, n, e);
}
static int count_allgather(ln_comm *c, const float *s, float *r, int64_t n, ln_err *e)
{
    n_calls[1]++;
    return nccl_ops->allgather(c, s, r, n, e);
}
static int count_broadcast(ln_comm *c, float *b, int64_t n, int root, ln_err *e)
{
    n_calls[2]++;
    return nccl_ops->broadcast(c, b, n, root, e);
}
static int count_barrier(ln_comm *c, ln_err *e)
{
    n_calls[3]++;
    return nccl_ops->barrier(c, e);
}
static void pass_abort(ln_comm *c) { nccl_ops->abort(c); }
static void pass_free(ln_comm *c) { nccl_ops->free(c); }
static comm_ops COUNTING = {.name = "nccl (counted)", .allreduce_sum = count_allreduce, .allgather = count_allgather,
                            .broadcast = count_broadcast, .barrier = count_barrier, .abort = pass_abort,
                            .free = pass_free};

typedef struct { int n; double loss[STEPS + 4]; } rows;
static void on_row(json_t *row, void *p)
{
    rows *r = p;
    if (r->n < STEPS + 4) r->loss[r->n++] = json_number_value(json_object_get(row, "loss"));
}

static ln_dataset *make_dataset(void)
{
    ln_dataset *d = calloc(1, sizeof *d);
    d->n = 12;
    d->ex = calloc((size_t)d->n, sizeof(ln_example));
    uint64_t s = 3;
    for (int i = 0; i < d->n; i++) {
        ln_example *x = &d->ex[i];
        x->len = 6 + i % 9;
        x->input_ids = malloc((size_t)x->len * sizeof(int32_t));
        x->labels = malloc((size_t)x->len * sizeof(int32_t));
        for (int t = 0; t < x->len; t++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            x->input_ids[t] = (int32_t)((s >> 33) % 64);
            x->labels[t] = t < 2 ? LN_IGNORE_INDEX : x->input_ids[t];
        }
        x->line = i + 1;
    }
    return d;
}

static void free_dataset(ln_dataset *d)
{
    for (int i = 0; i < d->n; i++) {
        free(d->ex[i].input_ids);
        free(d->ex[i].labels);
    }
    free(d->ex);
    free(d);
}

/* The same model (seed) and adapter (seeded factors) on the GPU. */
static void build(int full, ln_model **m, ln_adapter *ad)
{
    ln_err e = {{0}};
    if (ln_model_new_random(&cfg, lnb_cuda(), 11, m, &e)) goto fail;
    memset(ad, 0, sizeof *ad);
    if (full) {
        snprintf(ad->method, sizeof ad->method, "full");
        ad->full = 1;
        ad->num_layers = cfg.num_layers;
        if (ln_model_set_full_training(*m, &e)) goto fail;
        return;
    }
    if (ln_adapter_alloc(*m, ad, "lora", 4, 8.0f, LN_TARGETS_ALL, &e)) goto fail;
    uint64_t s = 5;
    for (int i = 0; i < cfg.num_layers * LN_NTARGET; i++) {
        ln_lora *lo = &ad->lora[i];
        float *f[2] = {lo->A.w, lo->B.w};
        int64_t n[2] = {lo->A.n, lo->B.n};
        for (int k = 0; k < 2; k++)
            for (int64_t j = 0; j < n[k]; j++) {
                s = s * 6364136223846793005ull + 1442695040888963407ull;
                f[k][j] = 0.2f * ((float)((s >> 40) % 2001) / 1000.0f - 1.0f); /* managed: host writes */
            }
    }
    return;
fail:
    printf("FAIL building the model: %s\n", e.msg);
    exit(1);
}

static void run_case(int full, const ln_dataset *ds)
{
    const char *name = full ? "full fine-tuning" : "LoRA r=4, all targets";
    ln_train_opts o = ln_train_defaults();
    o.max_steps = STEPS;
    o.batch_size = 2;
    o.grad_accum = 2;
    o.optim.lr = full ? 1e-3f : 1e-2f;
    o.optim.weight_decay = 0.01f;
    o.optim.max_grad_norm = 0.5f;
    o.warmup_ratio = 0.2;
    o.on_row = on_row;
    ln_model *m1, *m2;
    ln_adapter a1, a2;
    build(full, &m1, &a1);
    build(full, &m2, &a2);
    rows r1 = {0}, r2 = {0};
    ln_train_result t1, t2;
    ln_err e = {{0}};
    o.cb_ctx = &r1;
    int rc1 = ln_train(m1, &a1, ds, &o, &t1, &e);
    if (rc1) printf("#   ln_train: %s\n", e.msg);
    unsigned char id[COMM_NCCL_ID_BYTES];
    ln_comm *c = NULL;
    /* bounded: a bootstrap that cannot connect fails with a sentence, not at run.sh's timeout */
    int rc2 = comm_nccl_unique_id(id, &e) || comm_nccl_join(0, 1, id, lnb_cuda_device(), 20, NULL, &c, &e);
    if (!rc2) {
        nccl_ops = c->ops;
        c->ops = &COUNTING;
    }
    memset(n_calls, 0, sizeof n_calls);
    o.cb_ctx = &r2;
    if (!rc2) rc2 = ln_tp_train_rank(c, m2, &a2, ds, &o, &t2, &e);
    if (rc2) printf("#   ln_tp_train_rank over NCCL: %s\n", e.msg);
    char what[160];
    snprintf(what, sizeof what, "%s: both runs train %d steps", name, STEPS);
    check_true(what, !rc1 && !rc2 && t1.steps == STEPS && t2.steps == STEPS && r1.n == STEPS && r2.n == STEPS);
    check_cuda(name);
    printf("#   %s: collectives through NCCL: %d allreduce, %d allgather, %d broadcast, %d barrier\n", name,
           n_calls[0], n_calls[1], n_calls[2], n_calls[3]);
    if (!rc2) {
        int total = n_calls[0] + n_calls[1] + n_calls[2] + n_calls[3];
        snprintf(what, sizeof what, "%s: ln_tp_train_rank's collectives reached NCCL (%d)", name, total);
        check_true(what, total > 0);
    }
    if (!rc1 && !rc2) {
        double worst = 0;
        for (int i = 0; i < r1.n && i < r2.n; i++) {
            double d = fabs(r1.loss[i] - r2.loss[i]) / fmax(fabs(r1.loss[i]), 1e-12);
            worst = d > worst ? d : worst;
        }
        snprintf(what, sizeof what, "%s: per-step losses, 1-rank NCCL vs ln_train", name);
        check_close(what, worst, 1e-5);
        ln_param **p1, **p2;
        int n1 = ln_trainable_params(m1, &a1, &p1), n2 = ln_trainable_params(m2, &a2, &p2);
        snprintf(what, sizeof what, "%s: the same trainable parameters (%d)", name, n1);
        check_true(what, n1 == n2 && n1 > 0);
        double werr = 0;
        for (int i = 0; i < n1 && n1 == n2; i++) {
            double d = rel_err(p2[i]->w, p1[i]->w, p1[i]->n);
            werr = d > werr ? d : werr;
        }
        snprintf(what, sizeof what, "%s: trained parameters, 1-rank NCCL vs ln_train", name);
        check_close(what, werr, 1e-5);
        free(p1);
        free(p2);
    }
    if (c) comm_free(c);
    if (!full) {
        ln_adapter_free(&a1);
        ln_adapter_free(&a2);
    }
    ln_model_free(m1);
    ln_model_free(m2);
}

int main(void)
{
    setenv("NCCL_DEBUG", "WARN", 0); /* NCCL's own reason in the log, should a call fail */
    gpu_require("test_tp_nccl", LNB_CUDA_MATH_FP32);
    ln_err e = {{0}};
    if (ln_config_parse(CONFIG, "test_tp_nccl", &cfg, &e)) {
        printf("FAIL config: %s\n", e.msg);
        return 1;
    }
    ln_dataset *ds = make_dataset();
    run_case(0, ds);
    run_case(1, ds);
    free_dataset(ds);
    return gpu_done();
}
