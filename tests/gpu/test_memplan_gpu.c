/* test_memplan_gpu — the GPU memory plan (ln_memplan_gpu, behind lnb_cuda_plan_check) against
 * what the engine really allocates through the CUDA backend's table, byte for byte: the weights,
 * a residual adapter (A, B, gradients, A0, B0), AdamW, a training step's activations (attention
 * rows only) and its logits chunk, an evaluation's and a calibration window's forward-only
 * activations; and the device covariance sums (cudaMalloc'd, measured by cudaMemGetInfo to the
 * allocation granule). lnb_cuda_plan_check itself gives the same parts and the device's numbers. */
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "tests/gpu/gpu_check.h"
#include "worker/engine/adapter.h"
#include "worker/engine/memplan.h"
#include "worker/engine/model.h"
#include "worker/engine/optim.h"

/* The CUDA table with an alloc/free that keep the bytes it holds (one thread). */
#define MAX_LIVE 8192
static struct {
    void *p;
    size_t n;
} g_live[MAX_LIVE];
static double g_bytes;
static lnb_backend g_be;

static void *count_alloc(size_t n)
{
    void *p = lnb_cuda()->alloc(n);
    if (!p) return NULL;
    for (int i = 0; i < MAX_LIVE; i++)
        if (!g_live[i].p) {
            g_live[i].p = p;
            g_live[i].n = n;
            g_bytes += (double)n;
            return p;
        }
    printf("FAIL counting backend: more than %d live buffers\n", MAX_LIVE);
    exit(1);
}

static void count_free(void *p)
{
    if (!p) return;
    for (int i = 0; i < MAX_LIVE; i++)
        if (g_live[i].p == p) {
            g_bytes -= (double)g_live[i].n;
            g_live[i].p = NULL;
            break;
        }
    lnb_cuda()->free(p);
}

/* The bytes held for m's rotary tables (model.c's rope_ensure: backend memory, from a first forward). */
static double rope_held(const ln_model *m)
{
    double b = 0;
    for (int i = 0; i < MAX_LIVE; i++)
        if (g_live[i].p && (g_live[i].p == m->rope_cos || g_live[i].p == m->rope_sin)) b += (double)g_live[i].n;
    return b;
}

static void push(ln_param *p, void *ctx)
{
    ln_param ***list = ctx;
    if (p->trainable) *(*list)++ = p;
}

static void die(const char *what, const ln_err *e)
{
    printf("FAIL %s: %s\n", what, e->msg);
    exit(1);
}

/* A bytes-equal check: the plan's part against what was allocated. */
static void check_bytes(const char *what, double got, double plan)
{
    char name[160];
    snprintf(name, sizeof name, "%s: %.0f bytes allocated, plan %.0f", what, got, plan);
    check_true(name, got == plan);
}

int main(void)
{
    gpu_require("test_memplan_gpu", LNB_CUDA_MATH_FP32);
    ln_err e = {{0}};
    ln_config cfg;
    const char *json = "{\"vocab_size\": 4096, \"hidden_size\": 512, \"intermediate_size\": 1408,"
                       " \"num_hidden_layers\": 3, \"num_attention_heads\": 8, \"num_key_value_heads\": 2,"
                       " \"head_dim\": 64, \"max_position_embeddings\": 512, \"rms_norm_eps\": 1e-5,"
                       " \"rope_theta\": 10000.0, \"tie_word_embeddings\": false}";
    if (ln_config_parse(json, "test_memplan_gpu", &cfg, &e)) die("config", &e);
    g_be = *lnb_cuda();
    g_be.alloc = count_alloc;
    g_be.free = count_free;
    const int B = 2, T = 128, Tc = 96, r = 16;
    lnb_cuda_plan_req q = {.vocab = cfg.vocab_size, .hidden = cfg.hidden_size, .intermediate = cfg.intermediate_size,
                           .layers = cfg.num_layers, .heads = cfg.num_heads, .kv_heads = cfg.num_kv_heads,
                           .head_dim = cfg.head_dim, .batch = B, .seq = T, .rank = r, .targets = 7, .train_a = 1,
                           .residual = 1, .method = "lora", .calibrate = 1, .calib_max_length = Tc,
                           .device_covariances = 1, .eval_during_training = 1};
    lnb_cuda_plan p;
    if (ln_memplan_gpu(&q, 1e15, 1e15, "test", &p, &e)) die("plan", &e);

    double before = g_bytes;
    ln_model *m = NULL;
    if (ln_model_new_random(&cfg, &g_be, 3, &m, &e)) die("model", &e);
    check_bytes("weights", g_bytes - before, p.weights);

    before = g_bytes;
    ln_adapter ad;
    ln_adapter_opts ao = {.method = "lora", .rank = r, .alpha = 32, .seed = 1};
    if (ln_adapter_init(m, &ad, &ao, &e) || ln_adapter_make_residual(m, &ad, &e)) die("adapter", &e);
    check_bytes("adapter, gradients, A0 and B0", g_bytes - before, p.adapter);

    before = g_bytes;
    ln_param *params[4 * LN_NTARGET * 3], **end = params;
    ln_adapter_for_each_param(&ad, push, &end);
    ln_optim o;
    ln_optim_cfg oc = ln_optim_defaults();
    if (ln_optim_init(&o, &g_be, params, (int)(end - params), &oc, &e)) die("AdamW", &e);
    check_bytes("AdamW moments", g_bytes - before, p.optimizer);

    int32_t *ids = malloc(sizeof(int32_t) * B * T), *tg = malloc(sizeof(int32_t) * B * T);
    for (int i = 0; i < B * T; i++) {
        ids[i] = (i * 7) % cfg.vocab_size;
        tg[i] = (i * 5 + 1) % cfg.vocab_size;
    }
    ln_batch b = {.B = B, .T = T, .ids = ids, .targets = tg, .n_targets = B * T};
    double loss;
    before = g_bytes;
    ln_acts *acts = ln_acts_new();
    ln_fwd_opts fo = {.trained_rows_only = 1, .head_grad_scale = 1.0f / (B * T)};
    if (ln_model_forward(m, &ad, acts, &b, &fo, &loss, &e) || ln_model_backward(m, &ad, acts, &b, fo.head_grad_scale, &e))
        die("a training step", &e);
    const double rope = rope_held(m); /* allocated by this first forward, for its T */
    check_bytes("the rotary tables (cos, sin) of the longest forward", rope, p.rope);
    check_bytes("a training step's activations and logits chunk (rows-only attention)", g_bytes - before - rope,
                p.activations + p.logits);

    before = g_bytes;
    ln_acts *ev = ln_acts_new();
    ln_fwd_opts fe = {.trained_rows_only = 1};
    if (ln_model_forward(m, &ad, ev, &b, &fe, &loss, &e)) die("an evaluation forward", &e);
    check_bytes("an evaluation's forward-only activations", g_bytes - before, p.eval_activations);
    ln_acts_free(m, ev);

    before = g_bytes;
    ln_batch cb = {.B = 1, .T = Tc, .ids = ids};
    ln_acts *ca = ln_acts_new();
    ln_fwd_opts fc = {.no_logits = 1};
    if (ln_model_forward(m, NULL, ca, &cb, &fc, NULL, &e)) die("a calibration forward", &e);
    check_bytes("a calibration window's forward-only activations", g_bytes - before, p.calib_activations);
    check_true("a shorter window kept the rotary tables; the plan's window tables are its Tc's",
               rope_held(m) == rope && p.calib_rope == 2.0 * sizeof(float) * Tc * (cfg.head_dim / 2));
    ln_acts_free(m, ca);
    check_cuda("the forwards");

    /* the covariance sums: every layer input kind of every layer, as calibrate.c opens them */
    size_t f0 = 0, f1 = 0, tot = 0;
    cudaDeviceSynchronize();
    cudaMemGetInfo(&f0, &tot);
    lnb_cuda_cov covs[3 * LN_NINPUT];
    int d[LN_NINPUT] = {cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size}, n = 0;
    for (int l = 0; l < cfg.num_layers; l++)
        for (int i = 0; i < LN_NINPUT; i++)
            if (lnb_cuda_cov_init(&covs[n++], d[i], &e)) die("a covariance sum", &e);
    cudaDeviceSynchronize();
    cudaMemGetInfo(&f1, &tot);
    double got = (double)f0 - (double)f1, granule = 2.0 * (1 << 20) * n;
    char what[160];
    snprintf(what, sizeof what, "covariance sums: %.1f MiB taken on the device, plan %.1f MiB (to 2 MiB a sum)",
             got / (1 << 20), p.covariances / (1 << 20));
    check_true(what, got >= p.covariances - granule && got <= p.covariances + granule);
    for (int i = 0; i < n; i++) lnb_cuda_cov_free(&covs[i]);

    /* lnb_cuda_plan_check: the same parts, the device's numbers, a verdict that matches them */
    lnb_cuda_plan pc;
    int rc = lnb_cuda_plan_check(&q, &pc, &e);
    check_true("lnb_cuda_plan_check: the same parts as the arithmetic",
               pc.weights == p.weights && pc.adapter == p.adapter && pc.optimizer == p.optimizer &&
                   pc.activations == p.activations && pc.device_bytes > 0);
    check_true("lnb_cuda_plan_check: its verdict matches its numbers", (rc == 0) == (pc.total <= pc.free_bytes));
    q.layers = 100000; /* cannot fit: a sentence naming the peak phase */
    rc = lnb_cuda_plan_check(&q, &pc, &e);
    check_true("a job that cannot fit is refused, naming its peak phase",
               rc == -1 && strstr(e.msg, "GPU memory plan: the job needs ") && strstr(e.msg, " at its peak ("));
    printf("#   %s\n", e.msg);

    ln_acts_free(m, acts);
    ln_optim_free(&o);
    ln_adapter_free(&ad);
    ln_model_free(m);
    free(ids);
    free(tg);
    return gpu_done();
}
