/* bench_gpu — the GPU benchmark of issue 7, in phases so that tests/gpu/run.sh can bound each
 * one with `timeout`:
 *   bench_gpu peak  OUT.json   measured dense bf16 GEMM throughput (cuBLAS, fp32 accumulation)
 *   bench_gpu init  OUT.json   LoRA-Null init of ONE LLaMA-3-8B layer on the GPU: 4 covariances
 *                              (one 1024-token sample each, DSYRK), 4 subset eigensolves (syevdx,
 *                              r = 128; q,k,v and gate,up share theirs), 7 factorisations (DGEMM +
 *                              gesvd); the whole-model figure is 32× that (printed as such)
 *   bench_gpu train OUT.json [steps] LLaMA-3-8B shapes (random weights, fp32 storage in managed
 *                              memory), sequence 2048, batch 1, LoRA-Null-v2 rank 128 on all seven
 *                              targets (A frozen, B trains), AdamW: tokens/s and MFU
 *                              (LORANULL_BENCH_BF16_WEIGHTS=0: fp32 weights into cuBLAS's bf16
 *                              compute; LORANULL_BENCH_RECOMPUTE=1: activation recomputation;
 *                              attention by the fused flash kernels unless LORANULL_CUDA_ATTN=chunked)
 *   bench_gpu calib OUT.json [samples] whole-model calibration of the same model: `samples` (256)
 *                              windows of 1024 tokens through ln_calibration_bench — the engine's
 *                              calibration loop, forward passes with the hook, every layer's 4
 *                              covariances summed on the device (DSYRK, the accumulator a GPU job
 *                              installs) and fetched to the host at the end
 * MFU = model FLOPs per step / step time / the peak measured by `peak` (read back from
 * PEAK_TFLOPS in the environment, else measured again). Model FLOPs = every GEMM the engine
 * issues through the backend table (counted exactly by wrapping matmul) + causal attention
 * counted as 6·B·nh·hd·T² per layer (forward 2·2·T²/2·hd, backward twice that, no recompute). */
#include <stdint.h>
#include <time.h>

#include <cuda_runtime.h>

#include "tests/gpu/gpu_check.h"
#include <unistd.h>

#include "worker/backend/select.h"
#include "worker/engine/adapter.h"
#include "worker/engine/calibrate.h"
#include "worker/engine/model.h"
#include "worker/engine/optim.h"

static const char *CONFIG_8B =
    "{\"vocab_size\":128256,\"hidden_size\":4096,\"intermediate_size\":14336,\"num_hidden_layers\":32,"
    "\"num_attention_heads\":32,\"num_key_value_heads\":8,\"head_dim\":128,\"max_position_embeddings\":131072,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,\"tie_word_embeddings\":false,"
    "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
    "\"original_max_position_embeddings\":8192}}";

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static FILE *json_open(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        printf("FAIL cannot write %s\n", path);
        exit(1);
    }
    return f;
}

static void die(const char *what, ln_err *e)
{
    printf("FAIL %s: %s\n", what, e->msg);
    exit(1);
}

/* ---------------------------------------------------------------- peak */

static int phase_peak(const char *out)
{
    ln_err e = {{0}};
    double best = 0;
    int sizes[3] = {4096, 8192, 16384};
    FILE *f = json_open(out);
    fprintf(f, "{\"device\":\"%s\",\"bf16_gemm\":{", lnb_cuda_device_name());
    for (int i = 0; i < 3; i++) {
        double tf = 0;
        if (lnb_cuda_bf16_gemm_peak(sizes[i], sizes[i] >= 16384 ? 5 : 20, &tf, &e)) die("bf16 GEMM", &e);
        printf("bf16 GEMM %5d^3: %.1f TFLOP/s\n", sizes[i], tf);
        fprintf(f, "%s\"%d\":%.2f", i ? "," : "", sizes[i], tf);
        best = tf > best ? tf : best;
    }
    fprintf(f, "},\"peak_tflops\":%.2f}\n", best);
    fclose(f);
    printf("PEAK_TFLOPS=%.2f\n", best);
    return 0;
}

/* ---------------------------------------------------------------- init */

static int phase_init(const char *out)
{
    ln_err e = {{0}};
    ln_config c;
    if (ln_config_parse(CONFIG_8B, "8B", &c, &e)) die("config", &e);
    const lnb_backend *G = lnb_cuda();
    int C = c.hidden_size, I = c.intermediate_size, qd = c.num_heads * c.head_dim, kvd = c.num_kv_heads * c.head_dim;
    int r = 128, tokens = 1024;
    int din[4] = {C, qd, C, I};
    const char *iname[4] = {"qkv", "o", "gate_up", "down"};
    double t_cov[4], t_eig[4], t_fac = 0;
    double *Cs[4], *Us[4];
    float *X = G->alloc((size_t)tokens * I * sizeof(float));
    for (int i = 0; i < 4; i++) {
        int d = din[i];
        lnb_cuda_fill_normal(X, (int64_t)tokens * d, 100 + i, 1.0f);
        lnb_cuda_cov cv;
        if (lnb_cuda_cov_init(&cv, d, &e)) die("covariance", &e);
        lnb_cuda_sync(&e);
        double t0 = now();
        if (lnb_cuda_cov_add_sample(&cv, X, tokens, &e) || lnb_cuda_sync(&e)) die("covariance", &e); /* queued: wait */
        t_cov[i] = now() - t0;
        Cs[i] = malloc((size_t)d * d * sizeof(double));
        Us[i] = malloc((size_t)d * r * sizeof(double));
        if (lnb_cuda_cov_finish(&cv, Cs[i], &e)) die("covariance", &e);
        lnb_cuda_cov_free(&cv);
        t0 = now();
        if (lnb_cuda_nullspace_basis(Cs[i], d, r, Us[i], NULL, &e)) die("eigensolve", &e);
        t_eig[i] = now() - t0;
        printf("input %-7s d=%5d: covariance (1 x %d tokens) %.3f s, syevdx r=%d %.3f s\n", iname[i], d, tokens, t_cov[i],
               r, t_eig[i]);
    }
    G->free(X);
    int tdims[7][3] = {{qd, C, 0}, {kvd, C, 0}, {kvd, C, 0}, {C, qd, 1}, {I, C, 2}, {I, C, 2}, {C, I, 3}};
    for (int t = 0; t < 7; t++) {
        int dout = tdims[t][0], dn = tdims[t][1];
        float *W = G->alloc((size_t)dout * dn * sizeof(float));
        float *A = G->alloc((size_t)r * dn * sizeof(float)), *B = G->alloc((size_t)dout * r * sizeof(float));
        lnb_cuda_fill_normal(W, (int64_t)dout * dn, 7 + t, 0.02f);
        lnb_cuda_sync(&e);
        double t0 = now();
        if (lnb_cuda_nullspace_factor(W, dout, dn, Us[tdims[t][2]], r, 1.0, A, B, &e)) die("factor", &e);
        double dt = now() - t0;
        t_fac += dt;
        printf("factor %s %5d x %5d: %.3f s\n", ln_target_name((ln_target)t), dout, dn, dt);
        G->free(W); G->free(A); G->free(B);
    }
    double eig = t_eig[0] + t_eig[1] + t_eig[2] + t_eig[3], cov = t_cov[0] + t_cov[1] + t_cov[2] + t_cov[3];
    double layer = eig + t_fac;
    printf("one layer: 4 eigensolves %.2f s + 7 factorisations %.2f s = %.2f s; whole model (32 layers) ~ %.1f s\n", eig,
           t_fac, layer, 32 * layer);
    printf("calibration covariance update per 1024-token sample, one layer: %.3f s (x32 layers x256 samples ~ %.0f s)\n",
           cov, cov * 32 * 256);
    FILE *f = json_open(out);
    fprintf(f, "{\"device\":\"%s\",\"rank\":%d,\"eig_s\":[%.4f,%.4f,%.4f,%.4f],\"factor_s\":%.4f,\"layer_init_s\":%.4f,"
               "\"model_init_s_est\":%.3f,\"cov_sample_layer_s\":%.4f}\n",
            lnb_cuda_device_name(), r, t_eig[0], t_eig[1], t_eig[2], t_eig[3], t_fac, layer, 32 * layer, cov);
    fclose(f);
    for (int i = 0; i < 4; i++) { free(Cs[i]); free(Us[i]); }
    return 0;
}

/* ---------------------------------------------------------------- train */

static const lnb_backend *G0;
static double g_flops;
static void counted_matmul(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                           int ldb, float beta, float *Cm, int ldc)
{
    g_flops += 2.0 * M * N * K;
    G0->matmul(tA, tB, M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc);
}

static void param_new(const lnb_backend *be, ln_param *p, int rows, int cols, int ndim, float std, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    p->rows = rows;
    p->cols = cols;
    p->ndim = ndim;
    p->n = (int64_t)rows * cols;
    p->owned = 1;
    p->decay = ndim == 2;
    p->w = be->alloc((size_t)p->n * sizeof(float));
    if (!p->w) {
        printf("FAIL out of device memory for a %d x %d weight\n", rows, cols);
        exit(1);
    }
    if (std > 0) lnb_cuda_fill_normal(p->w, p->n, seed, std);
    else lnb_cuda_fill_const(p->w, p->n, 1.0f);
}

/* The LLaMA-3-8B-shaped model with random weights on backend be; bf16w: the frozen base weights and
 * lm_head multiplied from bf16 copies (else fp32 storage into cuBLAS's bf16 compute mode). */
static ln_model *build_model(const lnb_backend *be, const ln_config *cp, int bf16w)
{
    ln_err e = {{0}};
    const ln_config c = *cp;
    ln_model *m = calloc(1, sizeof *m);
    m->cfg = c;
    m->be = be;
    int C = c.hidden_size;
    param_new(be, &m->embed, c.vocab_size, C, 2, 0.02f, 1);
    param_new(be, &m->norm, C, 1, 1, 0, 0);
    param_new(be, &m->lm_head, c.vocab_size, C, 2, 0.02f, 2);
    m->layers = calloc((size_t)c.num_layers, sizeof(ln_layer));
    for (int l = 0; l < c.num_layers; l++) {
        param_new(be, &m->layers[l].attn_norm, C, 1, 1, 0, 0);
        param_new(be, &m->layers[l].mlp_norm, C, 1, 1, 0, 0);
        for (int t = 0; t < LN_NTARGET; t++) {
            int dout, din;
            ln_model_target_dims(&c, (ln_target)t, &dout, &din);
            param_new(be, &m->layers[l].lin[t], dout, din, 2, 0.02f, 1000 + l * 8 + t);
        }
    }
    if (bf16w) {
        if (lnb_cuda_register_bf16(m->lm_head.w, m->lm_head.n, &e)) die("bf16 weights", &e);
        for (int l = 0; l < c.num_layers; l++)
            for (int t = 0; t < LN_NTARGET; t++)
                if (lnb_cuda_register_bf16(m->layers[l].lin[t].w, m->layers[l].lin[t].n, &e)) die("bf16 weights", &e);
    }
    return m;
}

static int phase_train(const char *out, int steps)
{
    ln_err e = {{0}};
    ln_config c;
    if (ln_config_parse(CONFIG_8B, "8B", &c, &e)) die("config", &e);
    const int Bsz = 1, T = 2048, r = 128;
    lnb_cuda_plan_req q = {.vocab = c.vocab_size, .hidden = c.hidden_size, .intermediate = c.intermediate_size,
                           .layers = c.num_layers, .heads = c.num_heads, .kv_heads = c.num_kv_heads,
                           .head_dim = c.head_dim, .tied = 0, .batch = Bsz, .seq = T, .rank = r, .targets = 7,
                           .train_a = 0};
    const char *bw = getenv("LORANULL_BENCH_BF16_WEIGHTS");
    int bf16w = !(bw && strcmp(bw, "0") == 0);
    q.bf16_copies = bf16w;
    lnb_cuda_plan plan;
    if (lnb_cuda_plan_check(&q, &plan, &e)) die("memory plan", &e);
    printf("memory plan: %.1f GiB of %.1f GiB free (weights %.1f, activations %.1f)\n", plan.total / (1 << 30),
           plan.free_bytes / (1 << 30), plan.weights / (1 << 30), plan.activations / (1 << 30));
    G0 = lnb_cuda();
    static lnb_backend counted;
    counted = *G0;
    counted.matmul = counted_matmul;
    const lnb_backend *be = &counted;

    double t0 = now();
    ln_model *m = build_model(be, &c, bf16w);
    ln_adapter ad;
    if (ln_adapter_alloc(m, &ad, "lora_null_v2", r, (float)r, LN_TARGETS_ALL, &e)) die("adapter", &e);
    for (int i = 0; i < c.num_layers * LN_NTARGET; i++) {
        lnb_cuda_fill_normal(ad.lora[i].A.w, ad.lora[i].A.n, 5000 + i, 0.01f);
        lnb_cuda_fill_normal(ad.lora[i].B.w, ad.lora[i].B.n, 9000 + i, 0.01f);
        ln_param_set_trainable(be, &ad.lora[i].A, 0, &e); /* v2: A frozen */
    }
    const char *rcp = getenv("LORANULL_BENCH_RECOMPUTE");
    m->recompute = rcp && strcmp(rcp, "1") == 0;
    printf("model + adapter built in %.1f s (base weights: %s%s)\n", now() - t0, m->recompute ? "activation recomputation, " : "",
           bf16w ? "bf16 copies for the GEMMs" : "fp32 into bf16 compute");

    ln_batch b = {.B = Bsz, .T = T};
    b.ids = malloc((size_t)Bsz * T * sizeof(int32_t));
    b.targets = malloc((size_t)Bsz * T * sizeof(int32_t));
    for (int i = 0; i < Bsz * T; i++) {
        b.ids[i] = (int32_t)((i * 2654435761u) % c.vocab_size);
        b.targets[i] = (int32_t)((i * 40503u + 7) % c.vocab_size);
    }
    b.n_targets = (int64_t)Bsz * T;
    ln_param **ps;
    int np = 0;
    {
        /* trainable: every B */
        ps = calloc((size_t)c.num_layers * LN_NTARGET, sizeof *ps);
        for (int i = 0; i < c.num_layers * LN_NTARGET; i++) ps[np++] = &ad.lora[i].B;
    }
    ln_optim_cfg oc = ln_optim_defaults();
    oc.total_steps = steps + 1;
    ln_optim o;
    if (ln_optim_init(&o, be, ps, np, &oc, &e)) die("optimizer", &e);
    ln_acts *a = ln_acts_new();
    double step_time = 0, loss = 0, fl = 0;
    for (int s = 0; s <= steps; s++) {
        if (lnb_cuda_sync(&e)) die("step", &e);
        g_flops = 0;
        double ts = now();
        ln_optim_zero_grad(&o);
        /* the step train.c runs: only rows with a target reach the lm_head, in chunks, its backward
         * fused into the forward (a logits chunk, not N × V, as the memory plan counts) */
        ln_fwd_opts fo = {.trained_rows_only = 1, .head_grad_scale = 1.0f / (float)b.n_targets};
        if (ln_model_forward(m, &ad, a, &b, &fo, &loss, &e)) die("forward", &e);
        if (ln_model_backward(m, &ad, a, &b, fo.head_grad_scale, &e)) die("backward", &e);
        double norm = ln_optim_grad_norm(&o);
        ln_optim_step(&o, ln_lr_at(&oc, s), norm > 1.0 ? (float)(1.0 / (norm + 1e-6)) : 1.0f);
        if (lnb_cuda_sync(&e)) die("step", &e);
        double dt = now() - ts;
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        printf("step %d: loss %.4f, %.3f s, device memory in use %.1f GiB%s\n", s, loss / b.n_targets, dt,
               (double)(tot - fr) / (1 << 30), s == 0 ? " (warm-up, not counted)" : "");
        if (s > 0) {
            step_time += dt;
            fl = g_flops;
        }
    }
    step_time /= steps;
    double attn = 6.0 * Bsz * c.num_heads * c.head_dim * (double)T * T * c.num_layers;
    double model_flops = fl + attn;
    const char *pk = getenv("PEAK_TFLOPS");
    double peak = pk ? atof(pk) : 0;
    if (peak <= 0 && lnb_cuda_bf16_gemm_peak(8192, 20, &peak, &e)) die("peak", &e);
    double tps = Bsz * T / step_time, achieved = model_flops / step_time / 1e12, mfu = achieved / peak;
    printf("LLaMA-3-8B shapes, seq %d, batch %d, lora_null_v2 r=%d on 7 targets: %.3f s/step, %.0f tokens/s\n", T, Bsz, r,
           step_time, tps);
    printf("MFU here = model FLOPs per step / step time / measured dense bf16 GEMM peak. Model FLOPs = 2·M·N·K of "
           "every GEMM the engine issues (forward, input gradients, LoRA factors' gradients, lm_head; frozen weights "
           "get no weight-gradient GEMM, so not 6·params·tokens)%s + causal attention 6·B·heads·head_dim·T² per layer\n",
           m->recompute ? " — with recomputation the re-run forward GEMMs are counted too (hardware FLOPs)" : "");
    printf("model FLOPs/step %.2f TFLOP (GEMMs %.2f + attention %.2f): %.1f TFLOP/s = %.1f%% MFU of the measured %.1f TFLOP/s bf16 peak\n",
           model_flops / 1e12, fl / 1e12, attn / 1e12, achieved, 100 * mfu, peak);
    FILE *f = json_open(out);
    fprintf(f, "{\"device\":\"%s\",\"seq\":%d,\"batch\":%d,\"rank\":%d,\"steps\":%d,\"step_s\":%.4f,\"tokens_per_s\":%.1f,"
               "\"model_tflop_per_step\":%.3f,\"gemm_tflop_per_step\":%.3f,\"achieved_tflops\":%.2f,\"peak_tflops\":%.2f,"
               "\"mfu\":%.4f,\"loss\":%.5f,\"plan_gib\":%.2f,\"bf16_weights\":%d,\"recompute\":%d}\n",
            lnb_cuda_device_name(), T, Bsz, r, steps, step_time, tps, model_flops / 1e12, fl / 1e12, achieved, peak, mfu,
            loss / b.n_targets, plan.total / (1 << 30), bf16w, m->recompute);
    fclose(f);
    return 0;
}

/* ---------------------------------------------------------------- calibration */

static int phase_calib(const char *out, int samples)
{
    ln_err e = {{0}};
    ln_config c;
    if (ln_config_parse(CONFIG_8B, "8B", &c, &e)) die("config", &e);
    const int len = 1024;
    /* pre-tokenized calibration text: 64 lines of 4096 random ids (262,144 tokens to draw from) */
    char dir[] = "/tmp/ln_bench_calib_XXXXXX";
    if (!mkdtemp(dir)) die("mkdtemp", &e);
    char path[64];
    snprintf(path, sizeof path, "%s/calib.jsonl", dir);
    FILE *f = json_open(path);
    uint64_t st = 7;
    for (int i = 0; i < 64; i++) {
        fputs("{\"input_ids\":[", f);
        for (int k = 0; k < 4096; k++) {
            st = st * 6364136223846793005ull + 1442695040888963407ull;
            fprintf(f, "%s%d", k ? "," : "", (int)((st >> 33) % (uint64_t)c.vocab_size));
        }
        fputs("]}\n", f);
    }
    fclose(f);
    double t0 = now();
    ln_model *m = build_model(lnb_cuda(), &c, 1);
    if (lnb_cuda_sync(&e)) die("model", &e);
    printf("model built in %.1f s\n", now() - t0);
    /* what a GPU job gets from lnb_select("cuda"): covariances summed on the device */
    ln_calibrate_set_accumulator(lnb_select_cov_accumulator(lnb_cuda()));
    ln_calib_opts o = {.path = path, .samples = samples, .max_length = len, .seed = 1, .cache_dir = ""};
    double tps = 0;
    t0 = now();
    if (ln_calibration_bench(m, NULL, &o, &tps, NULL, &e)) die("calibration", &e);
    double wall = now() - t0, secs = (double)samples * len / tps;
    printf("calibration of the whole model (32 layers x 4 covariances, device sums): %d x %d tokens in %.1f s "
           "(%.0f tokens/s)\n", samples, len, secs, tps);
    if (samples != 256) /* the loop is linear in the samples */
        printf("calibration 256 x 1024 tokens, extrapolated from %d samples: %.1f s\n", samples, secs * 256.0 / samples);
    f = json_open(out);
    fprintf(f, "{\"device\":\"%s\",\"samples\":%d,\"max_length\":%d,\"calib_s\":%.3f,\"tokens_per_s\":%.1f,"
               "\"calib_256x1024_s\":%.3f,\"extrapolated\":%s,\"wall_s\":%.3f}\n",
            lnb_cuda_device_name(), samples, len, secs, tps, secs * 256.0 / samples, samples == 256 ? "false" : "true",
            wall);
    fclose(f);
    remove(path);
    rmdir(dir);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench_gpu peak|init|train|calib OUT.json [steps|samples]\n");
        return 2;
    }
    setenv("LORANULL_CUDA_SYNC", "0", 0); /* nothing below reads device tensors from the host mid-step */
    gpu_require("bench_gpu", LNB_CUDA_MATH_BF16);
    if (strcmp(argv[1], "peak") == 0) return phase_peak(argv[2]);
    if (strcmp(argv[1], "init") == 0) return phase_init(argv[2]);
    if (strcmp(argv[1], "train") == 0) return phase_train(argv[2], argc > 3 ? atoi(argv[3]) : 3);
    if (strcmp(argv[1], "calib") == 0) return phase_calib(argv[2], argc > 3 && atoi(argv[3]) > 0 ? atoi(argv[3]) : 256);
    fprintf(stderr, "bench_gpu: unknown phase %s (peak, init, train or calib)\n", argv[1]);
    return 2;
}
