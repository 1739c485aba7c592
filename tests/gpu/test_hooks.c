/* The CUDA table's optional hooks (backend.h: freeze, thaw, check) as the engine uses them:
 *  - freeze keeps a bf16 copy in the bf16 math mode (2 bytes a float) and none in fp32 math; a GEMM
 *    reading a frozen weight multiplies the copy; after thaw a changed weight is multiplied as it
 *    is now (no stale copy);
 *  - check reports the first kept error (a GEMM cuBLAS refused) in the engine's sentence, once;
 *  - ln_train of lora and of pissa (a residual method: frozen after its init rewrote W0) on the
 *    CUDA table in bf16 math: losses within 2e-2 of the CPU table's, everything thawed after. */
#include <stdint.h>

#include "tests/gpu/gpu_check.h"
#include "worker/backend/backend.h"
#include "worker/engine/adapter.h"
#include "worker/engine/train.h"

static uint64_t rs = 777;
static float frand(void)
{
    rs = rs * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rs >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

/* y = x Wᵀ (N × K by K → N × M) on backend be; x, W host; y host. */
static void linear(const lnb_backend *be, const float *W, const float *x, float *y, int N, int M, int K)
{
    float *dw = be->alloc((size_t)M * K * sizeof(float)), *dx = be->alloc((size_t)N * K * sizeof(float));
    float *dy = be->alloc((size_t)N * M * sizeof(float));
    be->upload(dw, W, (size_t)M * K * sizeof(float));
    be->upload(dx, x, (size_t)N * K * sizeof(float));
    be->matmul(0, 1, N, M, K, 1.0f, dx, K, dw, K, 0.0f, dy, M);
    be->download(y, dy, (size_t)N * M * sizeof(float));
    be->free(dw);
    be->free(dx);
    be->free(dy);
}

static void test_freeze_and_thaw(const lnb_backend *G)
{
    enum { N = 64, M = 96, K = 128 };
    static float W[M * K], W2[M * K], x[N * K], yc[N * M], yg[N * M];
    for (int i = 0; i < M * K; i++) W[i] = frand(), W2[i] = frand();
    for (int i = 0; i < N * K; i++) x[i] = frand();
    ln_err e = {{0}};
    float *dw = G->alloc(sizeof W), *dx = G->alloc(sizeof x), *dy = G->alloc(sizeof yg);
    G->upload(dw, W, sizeof W);
    G->upload(dx, x, sizeof x);
    check_true("the CUDA table has check, freeze, thaw", G->check && G->freeze && G->thaw && G->frozen_form);

    lnb_cuda_set_math(LNB_CUDA_MATH_FP32);
    check_true("fp32 math: freeze keeps no copy (0 bytes)", G->freeze(dw, M * K, &e) == 0);
    G->thaw(dw);
    lnb_cuda_set_math(LNB_CUDA_MATH_BF16);
    check_true("bf16 math: freeze keeps a bf16 copy (2 bytes a float)", G->freeze(dw, M * K, &e) == 2 * M * K);
    linear(lnb_cpu(), W, x, yc, N, M, K);
    G->matmul(0, 1, N, M, K, 1.0f, dx, K, dw, K, 0.0f, dy, M);
    G->download(yg, dy, sizeof yg);
    check_close("GEMM on a frozen weight vs the fp32 CPU product", rel_err(yg, yc, N * M), 2e-2);
    /* the weight changes after its thaw: the next GEMM reads the new one, no stale copy */
    G->thaw(dw);
    G->upload(dw, W2, sizeof W2);
    linear(lnb_cpu(), W2, x, yc, N, M, K);
    G->matmul(0, 1, N, M, K, 1.0f, dx, K, dw, K, 0.0f, dy, M);
    G->download(yg, dy, sizeof yg);
    check_close("after thaw and a change: the new weight's product", rel_err(yg, yc, N * M), 2e-2);
    check_true("no error kept", G->check(&e) == 0);
    G->free(dw);
    G->free(dx);
    G->free(dy);
}

static void test_check(const lnb_backend *G)
{
    ln_err e = {{0}};
    float *x = G->alloc(64 * sizeof(float));
    G->matmul(0, 0, 4, 4, 4, 1.0f, x, 1, x, 1, 0.0f, x, 1); /* lda 1 < K: cuBLAS refuses it */
    int rc = G->check(&e);
    printf("# kept: %s\n", e.msg);
    check_true("check reports the refused GEMM", rc == -1 && strstr(e.msg, "cublasGemmEx"));
    check_true("and clears it", G->check(&e) == 0);
    G->free(x);
}

/* 4 steps of method on be; the last loss. */
static double train(const lnb_backend *be, const char *method, const char *data, int *thawed)
{
    ln_err e = {{0}};
    ln_config c;
    const char *j = "{\"vocab_size\":64,\"hidden_size\":128,\"intermediate_size\":192,\"num_hidden_layers\":2,"
                    "\"num_attention_heads\":2,\"num_key_value_heads\":1,\"head_dim\":64}";
    ln_model *m = NULL;
    ln_adapter ad;
    ln_dataset *ds = NULL;
    ln_adapter_opts ao = {.method = method, .rank = 4, .seed = 3};
    ln_data_opts d = {0};
    ln_train_opts o = ln_train_defaults();
    o.max_steps = 4;
    o.batch_size = 2;
    o.optim.lr = 5e-3f;
    ln_train_result r = {0};
    if (ln_config_parse(j, "hooks", &c, &e) || ln_model_new_random(&c, be, 5, &m, &e) ||
        ln_adapter_init(m, &ad, &ao, &e) || ln_dataset_load(data, NULL, &d, &ds, &e) ||
        ln_train(m, &ad, ds, &o, &r, &e)) {
        printf("FAIL %s on %s: %s\n", method, be->name, e.msg);
        exit(1);
    }
    *thawed = !m->frozen;
    ln_dataset_free(ds);
    ln_adapter_free(&ad);
    ln_model_free(m);
    return r.last_loss;
}

static void test_train(const lnb_backend *G)
{
    const char *data = "test_hooks.jsonl";
    FILE *f = fopen(data, "w");
    for (int i = 0; i < 8; i++) {
        fputs("{\"input_ids\":[", f);
        for (int t = 0; t < 24 + i; t++) fprintf(f, t ? ",%d" : "%d", (5 * i + 11 * t + 3) % 64);
        fputs("]}\n", f);
    }
    fclose(f);
    const char *methods[] = {"lora", "pissa"};
    for (int k = 0; k < 2; k++) {
        int tc, tg;
        double lc = train(lnb_cpu(), methods[k], data, &tc), lg = train(G, methods[k], data, &tg);
        char what[96];
        snprintf(what, sizeof what, "%s: ln_train's last loss, bf16 frozen weights vs CPU", methods[k]);
        check_close(what, fabs(lg - lc) / lc, 2e-2);
        snprintf(what, sizeof what, "%s: ln_train thawed what it froze", methods[k]);
        check_true(what, tg);
    }
    remove(data);
}

int main(void)
{
    gpu_require("test_hooks", LNB_CUDA_MATH_BF16);
    const lnb_backend *G = lnb_cuda();
    test_freeze_and_thaw(G);
    test_check(G);
    test_train(G);
    return gpu_done();
}
