/* The whole engine on the CUDA backend against the CPU engine, same weights and batch:
 *   1. forward logits and loss of the base model;
 *   2. backward with LoRA factors on all seven targets: every A and B gradient;
 *   3. backward of full fine-tuning: every weight's gradient (embedding, norms, lm_head included);
 *   4. LoRA-Null-v2 (covariances from the CPU model's calibration hook, init on each backend —
 *      the GPU's bases by cuSOLVER syevdx — A frozen, residual W0 − BA): the step-0 logits equal the base model's, and 10 AdamW steps
 *      give the CPU run's losses — in fp32 math tightly, in bf16 tensor-core math loosely.
 * Head dim 64 (2 query heads, 1 kv head): the fp32 runs take the chunked attention, the bf16 run
 * the fused flash kernels (lnb_cuda_attention_path), so the whole engine trains through them. */
#include <stdint.h>

#include "tests/gpu/gpu_check.h"
#include "worker/engine/adapter.h"
#include "worker/engine/model.h"
#include "worker/engine/nullspace.h"
#include "worker/engine/optim.h"
#include "worker/engine/train.h"

static const char *CONFIG =
    "{\"vocab_size\":1000,\"hidden_size\":128,\"intermediate_size\":352,\"num_hidden_layers\":3,"
    "\"num_attention_heads\":2,\"num_key_value_heads\":1,\"head_dim\":64,\"max_position_embeddings\":256,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,\"tie_word_embeddings\":false,"
    "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
    "\"original_max_position_embeddings\":64}}";

static const lnb_backend *G, *H;
static ln_config cfg;
#define BB 2
#define TT 96
#define RANK 8
#define STEPS 10

static void make_batch(ln_batch *b, uint64_t seed)
{
    b->B = BB;
    b->T = TT;
    b->ids = malloc(BB * TT * sizeof(int32_t));
    b->targets = malloc(BB * TT * sizeof(int32_t));
    b->n_targets = 0;
    for (int i = 0; i < BB * TT; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        b->ids[i] = (int32_t)((seed >> 33) % 1000);
        b->targets[i] = i % 11 == 5 ? -100 : (int32_t)((seed >> 13) % 1000);
        b->n_targets += b->targets[i] >= 0;
    }
}

static ln_model *new_model(const lnb_backend *be)
{
    ln_model *m;
    ln_err e = {{0}};
    if (ln_model_new_random(&cfg, be, 21, &m, &e)) {
        printf("FAIL model: %s\n", e.msg);
        exit(1);
    }
    return m;
}

/* ln_adapter_free returns the factors through the backend that allocated them (adapter.be). */
static void adapter_free(const lnb_backend *be, ln_adapter *ad)
{
    (void)be;
    ln_adapter_free(ad);
}

static double loss_of(ln_model *m, ln_adapter *ad, ln_acts *a, ln_batch *b)
{
    double l = 0;
    ln_err e = {{0}};
    if (ln_model_forward(m, ad, a, b, NULL, &l, &e)) printf("FAIL forward: %s\n", e.msg);
    return l / (double)b->n_targets;
}

static void t_forward(ln_batch *b)
{
    ln_model *mc = new_model(H), *mg = new_model(G);
    ln_acts *ac = ln_acts_new(), *ag = ln_acts_new();
    double lc = loss_of(mc, NULL, ac, b), lg = loss_of(mg, NULL, ag, b);
    check_cuda("forward");
    check_close("base forward: logits", rel_err(ln_acts_logits(ag), ln_acts_logits(ac), (long long)BB * TT * cfg.vocab_size), 1e-4);
    check_close("base forward: loss", fabs(lg - lc) / lc, 1e-5);
    ln_acts_free(mc, ac);
    ln_acts_free(mg, ag);
    ln_model_free(mc);
    ln_model_free(mg);
}

/* Random non-zero factors (the same on both backends), both trainable. */
static void random_lora(ln_model *m, ln_adapter *ad)
{
    ln_err e = {{0}};
    if (ln_adapter_alloc(m, ad, "lora", RANK, 16.0f, LN_TARGETS_ALL, &e)) printf("FAIL adapter: %s\n", e.msg);
    uint64_t s = 77;
    for (int i = 0; i < cfg.num_layers * LN_NTARGET; i++) {
        ln_lora *lo = &ad->lora[i];
        float *h = malloc((size_t)(lo->A.n > lo->B.n ? lo->A.n : lo->B.n) * sizeof(float));
        for (int64_t j = 0; j < lo->A.n; j++) { s = s * 6364136223846793005ull + 1; h[j] = ((s >> 40) / 16777216.0f - 0.5f) * 0.2f; }
        m->be->upload(lo->A.w, h, (size_t)lo->A.n * sizeof(float));
        for (int64_t j = 0; j < lo->B.n; j++) { s = s * 6364136223846793005ull + 1; h[j] = ((s >> 40) / 16777216.0f - 0.5f) * 0.2f; }
        m->be->upload(lo->B.w, h, (size_t)lo->B.n * sizeof(float));
        free(h);
    }
}

/* Compares every trainable gradient of (mg, ag) with (mc, ac), param by param. */
static void compare_grads(const char *label, ln_model *mc, ln_adapter *adc, ln_model *mg, ln_adapter *adg, double tol)
{
    ln_param **pc, **pg;
    int nc = ln_trainable_params(mc, adc, &pc), ng = ln_trainable_params(mg, adg, &pg);
    check_true("same trainable parameters on both backends", nc == ng && nc > 0);
    double worst = 0;
    const char *wname = "";
    for (int i = 0; i < nc && i < ng; i++) {
        float *h = malloc((size_t)pg[i]->n * sizeof(float));
        G->download(h, pg[i]->g, (size_t)pg[i]->n * sizeof(float));
        double r = rel_err(h, pc[i]->g, pg[i]->n);
        if (r > worst) { worst = r; wname = pc[i]->name; }
        free(h);
    }
    char name[200];
    snprintf(name, sizeof name, "%s: %d gradients, worst %s", label, nc, wname);
    check_close(name, worst, tol);
    free(pc);
    free(pg);
}

static void t_backward_lora(ln_batch *b)
{
    ln_model *mc = new_model(H), *mg = new_model(G);
    ln_adapter adc, adg;
    random_lora(mc, &adc);
    random_lora(mg, &adg);
    ln_acts *ac = ln_acts_new(), *ag = ln_acts_new();
    ln_err e = {{0}};
    loss_of(mc, &adc, ac, b);
    loss_of(mg, &adg, ag, b);
    if (ln_model_backward(mc, &adc, ac, b, 1.0f / (float)b->n_targets, &e) ||
        ln_model_backward(mg, &adg, ag, b, 1.0f / (float)b->n_targets, &e))
        printf("FAIL backward: %s\n", e.msg);
    check_cuda("backward (lora)");
    compare_grads("LoRA backward (all seven targets)", mc, &adc, mg, &adg, 1e-4);
    ln_acts_free(mc, ac);
    ln_acts_free(mg, ag);
    adapter_free(H, &adc);
    adapter_free(G, &adg);
    ln_model_free(mc);
    ln_model_free(mg);
}

static void t_backward_full(ln_batch *b)
{
    ln_model *mc = new_model(H), *mg = new_model(G);
    ln_err e = {{0}};
    ln_model_set_full_training(mc, &e);
    ln_model_set_full_training(mg, &e);
    ln_acts *ac = ln_acts_new(), *ag = ln_acts_new();
    loss_of(mc, NULL, ac, b);
    loss_of(mg, NULL, ag, b);
    if (ln_model_backward(mc, NULL, ac, b, 1.0f / (float)b->n_targets, &e) ||
        ln_model_backward(mg, NULL, ag, b, 1.0f / (float)b->n_targets, &e))
        printf("FAIL backward: %s\n", e.msg);
    check_cuda("backward (full)");
    compare_grads("full fine-tuning backward", mc, NULL, mg, NULL, 1e-4);
    ln_acts_free(mc, ac);
    ln_acts_free(mg, ag);
    ln_model_free(mc);
    ln_model_free(mg);
}

/* ---- LoRA-Null-v2 ---- */

typedef struct { ln_cov cov[8][LN_NINPUT]; double *C[8][LN_NINPUT]; } calib;

static void hook(int layer, ln_input which, const float *X, int tokens, int d_in, void *ctx)
{
    calib *c = ctx;
    ln_err e = {{0}};
    if (ln_cov_add_sample(&c->cov[layer][which], X, tokens, &e)) printf("FAIL calibration: %s\n", e.msg);
    (void)d_in;
}

static const double *cov_fn(void *ctx, int layer, ln_input which) { return ((calib *)ctx)->C[layer][which]; }

/* Calibrates on the CPU model: 6 samples of 96 tokens. */
static void calibrate_cpu(calib *c)
{
    ln_model *m = new_model(H);
    ln_err e = {{0}};
    int dims[LN_NINPUT] = {cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size};
    for (int l = 0; l < cfg.num_layers; l++)
        for (int i = 0; i < LN_NINPUT; i++) ln_cov_init(&c->cov[l][i], dims[i], &e);
    ln_acts *a = ln_acts_new();
    ln_fwd_opts o = {.hook = hook, .hook_ctx = c, .no_logits = 1};
    for (int s = 0; s < 6; s++) {
        ln_batch b;
        make_batch(&b, 1000 + s);
        b.B = 1;
        ln_model_forward(m, NULL, a, &b, &o, NULL, &e);
        ln_batch_free(&b);
    }
    for (int l = 0; l < cfg.num_layers; l++)
        for (int i = 0; i < LN_NINPUT; i++) {
            c->C[l][i] = malloc((size_t)dims[i] * dims[i] * sizeof(double));
            ln_cov_finish(&c->cov[l][i], c->C[l][i], &e);
            ln_cov_free(&c->cov[l][i]);
        }
    ln_acts_free(m, a);
    ln_model_free(m);
}

static int null_v2(ln_model *m, ln_adapter *ad, calib *c)
{
    ln_err e = {{0}};
    ln_adapter_opts o = {.method = "lora_null_v2", .rank = RANK, .alpha = RANK, .targets = LN_TARGETS_ALL,
                         .seed = 1, .covariance = cov_fn, .method_ctx = c};
    if (ln_adapter_init(m, ad, &o, &e)) {
        printf("FAIL lora_null_v2 init on %s: %s\n", m->be->name, e.msg);
        return -1;
    }
    return 0;
}

/* STEPS AdamW steps of the whole batch; losses[s] before step s. */
static void train(ln_model *m, ln_adapter *ad, ln_batch *b, double *losses)
{
    ln_param **ps;
    int n = ln_trainable_params(m, ad, &ps);
    ln_optim_cfg oc = ln_optim_defaults();
    oc.lr = 2e-3f;
    oc.total_steps = STEPS;
    oc.warmup_steps = 1;
    ln_optim o;
    ln_err e = {{0}};
    ln_optim_init(&o, m->be, ps, n, &oc, &e);
    ln_acts *a = ln_acts_new();
    for (int s = 0; s < STEPS; s++) {
        ln_optim_zero_grad(&o);
        losses[s] = loss_of(m, ad, a, b);
        ln_model_backward(m, ad, a, b, 1.0f / (float)b->n_targets, &e);
        double norm = ln_optim_grad_norm(&o);
        ln_optim_step(&o, ln_lr_at(&oc, s), norm > 1.0 ? (float)(1.0 / (norm + 1e-6)) : 1.0f);
    }
    ln_acts_free(m, a);
    ln_optim_free(&o);
    free(ps);
}

static void t_lora_null_v2(ln_batch *b)
{
    calib *c = calloc(1, sizeof *c);
    calibrate_cpu(c);
    double base = 0, lc[STEPS], lg[STEPS], lb[STEPS];
    {
        ln_model *m = new_model(H);
        ln_acts *a = ln_acts_new();
        base = loss_of(m, NULL, a, b);
        ln_acts_free(m, a);
        ln_model_free(m);
    }
    ln_model *mc = new_model(H), *mg = new_model(G);
    ln_adapter adc, adg;
    if (null_v2(mc, &adc, c)) {
        gpu_failures++;
        return;
    }
    /* the GPU model's bases by cuSOLVER syevdx, as `loranull train --device cuda` does */
    ln_nullspace_set_basis_solver(lnb_cuda_nullspace_basis);
    int irc = null_v2(mg, &adg, c);
    ln_nullspace_set_basis_solver(NULL);
    if (irc) {
        gpu_failures++;
        return;
    }
    check_cuda("lora_null_v2 init");
    /* the init computes exactly what the base model did */
    ln_acts *a = ln_acts_new();
    double l0 = loss_of(mg, &adg, a, b);
    ln_acts_free(mg, a);
    check_close("lora_null_v2 step-0 loss = base loss (GPU)", fabs(l0 - base) / base, 1e-5);
    train(mc, &adc, b, lc);
    train(mg, &adg, b, lg);
    check_cuda("training (fp32 math)");
    double worst = 0;
    for (int s = 0; s < STEPS; s++) worst = fmax(worst, fabs(lg[s] - lc[s]) / lc[s]);
    printf("#   CPU losses %.6f -> %.6f, GPU fp32 %.6f -> %.6f\n", lc[0], lc[STEPS - 1], lg[0], lg[STEPS - 1]);
    check_close("lora_null_v2 10-step losses, GPU fp32 math vs CPU", worst, 1e-4);
    check_true("lora_null_v2 training lowers the loss", lc[STEPS - 1] < lc[0]);
    adapter_free(G, &adg);
    ln_model_free(mg);

    /* bf16 tensor-core math with the frozen base weights (and lm_head) multiplied from bf16
     * copies: the same run, loosely */
    lnb_cuda_set_math(LNB_CUDA_MATH_BF16);
    mg = new_model(G);
    if (null_v2(mg, &adg, c) == 0) {
        ln_err e = {{0}};
        int reg = lnb_cuda_register_bf16(mg->lm_head.w, mg->lm_head.n, &e);
        for (int l = 0; l < cfg.num_layers && reg == 0; l++)
            for (int t = 0; t < LN_NTARGET && reg == 0; t++)
                reg = lnb_cuda_register_bf16(mg->layers[l].lin[t].w, mg->layers[l].lin[t].n, &e);
        check_true("register the frozen weights as bf16", reg == 0);
        check_true("bf16 math: the engine's attention runs the fused kernels",
                   strcmp(lnb_cuda_attention_path(cfg.head_dim), "fused") == 0);
        train(mg, &adg, b, lb);
        check_cuda("training (bf16 math)");
        worst = 0;
        for (int s = 0; s < STEPS; s++) worst = fmax(worst, fabs(lb[s] - lc[s]) / lc[s]);
        printf("#   GPU bf16 losses %.6f -> %.6f\n", lb[0], lb[STEPS - 1]);
        check_close("lora_null_v2 10-step losses, GPU bf16 weights and math vs CPU", worst, 2e-2);
        lnb_cuda_unregister_all();
        adapter_free(G, &adg);
    }
    lnb_cuda_set_math(LNB_CUDA_MATH_FP32);
    ln_model_free(mg);
    adapter_free(H, &adc);
    ln_model_free(mc);
    for (int l = 0; l < cfg.num_layers; l++)
        for (int i = 0; i < LN_NINPUT; i++) free(c->C[l][i]);
    free(c);
}

int main(void)
{
    gpu_require("test_model", LNB_CUDA_MATH_FP32);
    G = lnb_cuda();
    H = lnb_cpu();
    ln_err e = {{0}};
    if (ln_config_parse(CONFIG, "test_model config", &cfg, &e)) {
        printf("FAIL config: %s\n", e.msg);
        return 1;
    }
    ln_batch b;
    make_batch(&b, 5);
    t_forward(&b);
    t_backward_lora(&b);
    t_backward_full(&b);
    t_lora_null_v2(&b);
    ln_batch_free(&b);
    return gpu_done();
}
