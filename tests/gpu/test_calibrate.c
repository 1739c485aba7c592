/* Calibration covariances on the device (ln_calibrate_set_accumulator with the CUDA backend's
 * DSYRK accumulator, worker/backend/select.h) against the host's, through ln_calibrate itself:
 *   1. lnb_select("cuda") installs both device hooks (the accumulator and the syevdx basis solver);
 *   2. a tiny model on the GPU calibrated with the device accumulator vs the same model calibrated
 *      with the host fp64 path (which reads the same activations from managed memory): every
 *      covariance equal to fp64 rounding (the summation order differs);
 *   3. the same against the CPU model's host calibration (fp32 forward on both backends: 1e-4);
 *   4. a cache written by the device calibration is read back by a host job asking for fp64;
 *   5. a failing sample (non-finite, or maximum 0) is found without a host round trip and reported
 *      by finish naming the first one; the samples before it are not lost. */
#include <stdint.h>
#include <unistd.h>

#include "common/util.h"
#include "tests/gpu/gpu_check.h"
#include "worker/backend/select.h"
#include "worker/engine/calibrate.h"
#include "worker/engine/model.h"
#include "worker/engine/nullspace.h"

static const char *CONFIG =
    "{\"vocab_size\":500,\"hidden_size\":128,\"intermediate_size\":352,\"num_hidden_layers\":2,"
    "\"num_attention_heads\":8,\"num_key_value_heads\":2,\"head_dim\":16,\"max_position_embeddings\":256,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"tie_word_embeddings\":false}";

static char g_dir[] = "/tmp/ln_gpu_calib_XXXXXX";

static char *write_data(void)
{
    char *p = ln_path_join(g_dir, "calib.jsonl");
    FILE *f = fopen(p, "w");
    if (!f) {
        printf("FAIL cannot write %s\n", p);
        exit(1);
    }
    for (int i = 0; i < 8; i++) {
        fprintf(f, "{\"input_ids\": [");
        for (int k = 0; k < 40 + 23 * i; k++) fprintf(f, "%s%d", k ? ", " : "", (i * 131 + k * 37 + 5) % 500);
        fprintf(f, "]}\n");
    }
    fclose(f);
    return p;
}

static ln_calibration *calibrate(ln_model *m, const char *data, const ln_cov_accumulator *acc, const char *cache)
{
    ln_calibrate_set_accumulator(acc);
    ln_calib_opts o = {.path = data, .samples = 6, .max_length = 96, .seed = 3, .cache_dir = cache, .fp64 = 1};
    ln_calibration *c = NULL;
    ln_err e = {{0}};
    int rc = ln_calibrate(m, NULL, &o, &c, &e);
    ln_calibrate_set_accumulator(NULL);
    if (rc) {
        printf("FAIL calibration (%s sums): %s\n", acc ? acc->name : "host", e.msg);
        exit(1);
    }
    return c;
}

/* max |a − b| / max |b| over every covariance of the two calibrations. */
static double cov_err(const ln_calibration *a, const ln_calibration *b)
{
    double num = 0, den = 0;
    for (int l = 0; l < a->num_layers; l++)
        for (int in = 0; in < LN_NINPUT; in++) {
            const double *x = ln_calibration_covariance((void *)a, l, (ln_input)in);
            const double *y = ln_calibration_covariance((void *)b, l, (ln_input)in);
            if (!x || !y) return INFINITY;
            int64_t n = (int64_t)a->d[in] * a->d[in];
            for (int64_t i = 0; i < n; i++) {
                num = fmax(num, fabs(x[i] - y[i]));
                den = fmax(den, fabs(y[i]));
            }
        }
    return num / (den > 0 ? den : 1);
}

static void t_failing_samples(void)
{
    ln_err e = {{0}};
    const int d = 8, tok = 5;
    float X[3][5 * 8];
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < tok * d; i++) X[s][i] = s == 2 ? 0.0f : (float)((i * 7 + s) % 11) - 3.0f;
    X[1][17] = NAN;
    lnb_cuda_cov c;
    double C[64];
    int ok = lnb_cuda_cov_init(&c, d, &e) == 0;
    for (int s = 0; ok && s < 3; s++) ok = lnb_cuda_cov_add_sample(&c, X[s], tok, &e) == 0;
    check_true("samples are queued without a host round trip (no error yet)", ok);
    int rc = lnb_cuda_cov_finish(&c, C, &e);
    printf("#   %s\n", e.msg);
    check_true("finish names the first failing sample (1, non-finite)",
               rc == -1 && strstr(e.msg, "sample 1 has a non-finite activation"));
    lnb_cuda_cov_free(&c);
    ok = lnb_cuda_cov_init(&c, d, &e) == 0 && lnb_cuda_cov_add_sample(&c, X[0], tok, &e) == 0 &&
         lnb_cuda_cov_add_sample(&c, X[2], tok, &e) == 0;
    rc = ok ? lnb_cuda_cov_finish(&c, C, &e) : -1;
    check_true("finish names a sample whose maximum is 0", rc == -1 && strstr(e.msg, "sample 1 has maximum activation 0"));
    lnb_cuda_cov_free(&c);
}

int main(void)
{
    gpu_require("test_calibrate", LNB_CUDA_MATH_FP32);
    if (!mkdtemp(g_dir)) {
        printf("FAIL mkdtemp\n");
        return 1;
    }
    t_failing_samples();
    ln_err e = {{0}};
    const lnb_backend *G = lnb_select("cuda", &e);
    check_true("lnb_select(\"cuda\") opens the CUDA backend", G && strcmp(G->name, "cuda") == 0);
    const ln_cov_accumulator *acc = ln_calibrate_accumulator();
    check_true("lnb_select(\"cuda\") installs the device covariance accumulator", acc && strcmp(acc->name, "cuda") == 0);
    ln_calibrate_set_accumulator(NULL);
    ln_nullspace_set_basis_solver(NULL);
    if (!G || !acc) return gpu_done();

    ln_config cfg;
    if (ln_config_parse(CONFIG, "test config", &cfg, &e)) {
        printf("FAIL config: %s\n", e.msg);
        return 1;
    }
    ln_model *mg = NULL, *mc = NULL;
    if (ln_model_new_random(&cfg, G, 17, &mg, &e) || ln_model_new_random(&cfg, lnb_cpu(), 17, &mc, &e)) {
        printf("FAIL model: %s\n", e.msg);
        return 1;
    }
    char *data = write_data();
    ln_calibration *dev = calibrate(mg, data, acc, "");
    check_cuda("device calibration");
    ln_calibration *host = calibrate(mg, data, NULL, "");
    ln_calibration *cpu = calibrate(mc, data, NULL, "");
    check_true("device calibration: 6 samples", dev->samples == 6 && dev->tokens == host->tokens);
    check_close("device vs host covariances, same GPU activations (fp64)", cov_err(dev, host), 1e-12);
    check_close("device (GPU model) vs host (CPU model) covariances", cov_err(dev, cpu), 1e-4);

    char *cache = ln_path_join(g_dir, "cache");
    ln_calibration *c1 = calibrate(mg, data, acc, cache);
    ln_calibration *c2 = calibrate(mg, data, NULL, cache);
    check_true("a host fp64 job reads the device calibration's cache", !c1->from_cache && c2->from_cache);
    check_close("cached device covariances read back", cov_err(c2, c1), 0);

    ln_calibration_free(dev);
    ln_calibration_free(host);
    ln_calibration_free(cpu);
    ln_calibration_free(c1);
    ln_calibration_free(c2);
    ln_model_free(mg);
    ln_model_free(mc);
    free(cache);
    free(data);
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) printf("# could not remove %s\n", g_dir);
    return gpu_done();
}
