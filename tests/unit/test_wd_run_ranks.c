/* wd_run with r->comm: a 2-rank job whose ranks are two "processes" — two wd_runs, each with its
 * own model, files, work dir and outbox, joined only by a thread comm standing in for the network
 * (the daemon's TCP gang comm is another backend of the same interface). Each validates,
 * calibrates (LoRA-Null) and initialises on its own; rank 0 reports and exports, rank 1 posts
 * nothing and writes nothing (wd_run.h). Checked against the same job run with both ranks on
 * threads in one wd_run (comm NULL): the exported adapter bytes are the same. A stop seen only by
 * rank 1 stops both; rank 0's stop checkpoint, resumed by both, ends with the same bytes again. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/backend/backend.h"
#include "worker/backend/comm/comm.h"
#include "worker/engine/model.h"
#include "worker/engine/rng.h"
#include "worker/daemon/wd_run.h"

static const char *CONFIG =
    "{\"vocab_size\":48,\"hidden_size\":32,\"intermediate_size\":48,\"num_hidden_layers\":2,"
    "\"num_attention_heads\":8,\"num_key_value_heads\":4,\"head_dim\":8,\"max_position_embeddings\":64,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"tie_word_embeddings\":false}";

/* Layer weights dominate (4 layers of 245 760 floats; embeddings and lm_head 2 × 48 × 128): what a
 * rank holds of them shows in its memory. */
static const char *WIDE =
    "{\"vocab_size\":48,\"hidden_size\":128,\"intermediate_size\":512,\"num_hidden_layers\":4,"
    "\"num_attention_heads\":16,\"num_key_value_heads\":8,\"head_dim\":8,\"max_position_embeddings\":64,"
    "\"rms_norm_eps\":1e-5,\"rope_theta\":10000.0,\"tie_word_embeddings\":false}";

/* 300 steps of 2 examples: long enough to stop well before the end. */
static const char *SPEC =
    "{\"model\":\"tiny\",\"training_file\":\"file-train\",\"seed\":7,"
    "\"hyperparameters\":{\"n_epochs\":25,\"batch_size\":2,\"learning_rate\":0.01,\"save_interval\":50},"
    "\"adapter\":{\"type\":\"lora_null_v2\",\"rank\":4,\"calibration\":{\"samples\":8,\"max_length\":16}},"
    "\"resources\":{\"ranks\":2,\"device\":\"cpu\"}}";

static char g_root[64];
static const char *g_spec, *g_model = "model"; /* what proc_init runs (NULL: SPEC) */
static int g_calib;                               /* calibrate (and track drift) on the training file */

/* A random model of config json, saved as g_root/name. */
static int save_model(const char *json, const char *name, uint64_t seed)
{
    ln_err e = {{0}};
    ln_config cfg;
    ln_model *m = NULL;
    char p[256];
    snprintf(p, sizeof p, "%s/%s", g_root, name);
    int rc = ln_config_parse(json, name, &cfg, &e) || ln_model_new_random(&cfg, lnb_cpu(), seed, &m, &e) ||
             ln_model_save(m, p, ST_F32, &e);
    if (rc) fprintf(stderr, "setup: %s\n", e.msg);
    ln_model_free(m);
    return rc ? -1 : 0;
}

/* The models and the training file, once for the whole file. */
static int setup(void **state)
{
    (void)state;
    snprintf(g_root, sizeof g_root, "/tmp/loranull-wdrun-XXXXXX");
    if (!mkdtemp(g_root)) return -1;
    char p[256];
    if (save_model(CONFIG, "model", 3) || save_model(WIDE, "wide", 4)) return -1;
    snprintf(p, sizeof p, "%s/train.jsonl", g_root);
    FILE *f = fopen(p, "w");
    ln_rng r;
    ln_rng_seed(&r, 5);
    for (int i = 0; i < 24; i++) {
        fputs("{\"input_ids\": [", f);
        for (int t = 0, len = 6 + i % 7; t < len; t++) fprintf(f, "%s%d", t ? ", " : "", (int)(ln_rng_u64(&r) % 48));
        fputs("]}\n", f);
    }
    fclose(f);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_root);
    return system(cmd) == 0 ? 0 : -1;
}

typedef struct proc {
    wd_run r;
    wd_outbox out;
} proc;

/* One "process" holding `rank` of the job (comm NULL: every rank, on threads), in its own dir. */
static void proc_init(proc *x, const char *name, ln_comm *comm, int rank, const char *resume)
{
    memset(x, 0, sizeof *x);
    wd_outbox_init(&x->out, NULL, 100000, 100000);
    wd_run *r = &x->r;
    char param[LN_JOBSPEC_PARAM_MAX];
    ln_err e = {{0}};
    const char *spec = g_spec ? g_spec : SPEC;
    assert_int_equal(ln_jobspec_parse_text(spec, strlen(spec), &r->spec, param, &e), 0);
    snprintf(r->job_id, sizeof r->job_id, "ftjob-test");
    snprintf(r->model_name, sizeof r->model_name, "tiny");
    snprintf(r->model_dir, sizeof r->model_dir, "%s/%s", g_root, g_model);
    snprintf(r->dir, sizeof r->dir, "%s/%s", g_root, name);
    snprintf(r->files_dir, sizeof r->files_dir, "%s/files", g_root);
    snprintf(r->train_path, sizeof r->train_path, "%s/train.jsonl", g_root);
    snprintf(r->cache_dir, sizeof r->cache_dir, "%s/%s-cache", g_root, name);
    snprintf(r->resume, sizeof r->resume, "%s", resume ? resume : "");
    if (g_calib) snprintf(r->calib_path, sizeof r->calib_path, "%s", r->train_path);
    r->world = 2;
    r->comm = comm;
    r->rank = rank;
    r->be = lnb_cpu();
    r->out = &x->out;
    wd_run_init(r);
}

static void wait_done(proc *x, int n)
{
    for (int i = 0; i < n; i++)
        while (!atomic_load(&x[i].r.done)) sched_yield();
}

static void proc_free(proc *x)
{
    wd_run_finish(&x->r);
    wd_outbox_destroy(&x->out);
}

static char *read_all(const char *dir, const char *name, size_t *n)
{
    char *p = ln_path_join(dir, name), *buf = NULL;
    ln_err e = {{0}};
    if (ln_read_file(p, &buf, n, &e)) fail_msg("%s", e.msg);
    free(p);
    return buf;
}

static void assert_same_file(const char *dir_a, const char *dir_b, const char *name)
{
    size_t na, nb;
    char *a = read_all(dir_a, name, &na), *b = read_all(dir_b, name, &nb);
    assert_int_equal(na, nb);
    assert_memory_equal(a, b, na);
    free(a);
    free(b);
}

static int exists_under(const char *dir, const char *name)
{
    char *p = ln_path_join(dir, name);
    int x = ln_file_exists(p);
    free(p);
    return x;
}

/* The same job on threads in one wd_run: what the gang must reproduce. */
static void run_threads(proc *ref)
{
    proc_init(ref, "threads", NULL, 0, NULL);
    assert_int_equal(wd_run_start(&ref->r), 0);
    wait_done(ref, 1);
    if (ref->r.status != WD_RUN_OK) fail_msg("threads: %s", ref->r.err_msg);
}

/* Starts both ranks of a gang over a fresh thread comm, each on its backend. */
static void start_gang_with(proc *g, const char *tag, const char *resume, const lnb_backend *be0,
                            const lnb_backend *be1)
{
    ln_comm *c[2];
    ln_err e = {{0}};
    assert_int_equal(comm_thread_group_new(2, c, &e), 0);
    char n0[32], n1[32];
    snprintf(n0, sizeof n0, "%s-rank0", tag);
    snprintf(n1, sizeof n1, "%s-rank1", tag);
    proc_init(&g[0], n0, c[0], 0, resume);
    proc_init(&g[1], n1, c[1], 1, resume);
    g[0].r.be = be0;
    g[1].r.be = be1;
    assert_int_equal(wd_run_start(&g[0].r), 0);
    assert_int_equal(wd_run_start(&g[1].r), 0);
}

static void start_gang(proc *g, const char *tag, const char *resume)
{
    start_gang_with(g, tag, resume, lnb_cpu(), lnb_cpu());
}

static void end_gang(proc *g)
{
    ln_comm *c0 = g[0].r.comm, *c1 = g[1].r.comm;
    proc_free(&g[0]);
    proc_free(&g[1]);
    comm_free(c0);
    comm_free(c1);
}

static void test_gang_of_two_processes_equals_threads(void **state)
{
    (void)state;
    proc ref, g[2];
    run_threads(&ref);
    start_gang(g, "gang", NULL);
    wait_done(g, 2);
    if (g[0].r.status != WD_RUN_OK) fail_msg("rank 0: %s", g[0].r.err_msg);
    if (g[1].r.status != WD_RUN_OK) fail_msg("rank 1: %s", g[1].r.err_msg);
    /* rank 0 exported what the threads did, byte for byte */
    assert_same_file(ref.r.export_dir, g[0].r.export_dir, "adapter_model.safetensors");
    assert_int_equal(g[0].r.steps, 300);
    assert_int_equal(g[1].r.steps, 300);
    /* rank 0 reported like the one-process run; rank 1 posted nothing and wrote nothing */
    size_t ev_ref, pt_ref, ev0, pt0, ev1, pt1;
    wd_outbox_size(&ref.out, &ev_ref, &pt_ref);
    wd_outbox_size(&g[0].out, &ev0, &pt0);
    wd_outbox_size(&g[1].out, &ev1, &pt1);
    printf("  rank 0: %zu events, %zu metric points (threads: %zu, %zu); rank 1: %zu, %zu\n", ev0, pt0, ev_ref, pt_ref,
           ev1, pt1);
    assert_int_equal(pt0, pt_ref);
    assert_int_equal(ev0, ev_ref);
    assert_true(pt0 > 300); /* every step, the evaluations before and after, drift at eval points */
    assert_int_equal(ev1, 0);
    assert_int_equal(pt1, 0);
    assert_string_equal(g[1].r.export_dir, "");
    assert_true(exists_under(g[0].r.dir, "out/checkpoints/step-000050/state.safetensors"));
    assert_false(exists_under(g[1].r.dir, "out/checkpoints"));
    assert_false(exists_under(g[1].r.dir, "out/metrics.jsonl"));
    int64_t step;
    double loss;
    char dir[WD_PATH_MAX];
    assert_false(wd_run_take_checkpoint(&g[1].r, &step, &loss, dir));
    end_gang(g);
    proc_free(&ref);
}

/* A stop (a pause) seen only by rank 1's worker stops both after the same step; rank 0 writes the
 * stop checkpoint; both resume from it and end with the uninterrupted bytes. */
static void test_stop_on_rank_1_then_resume(void **state)
{
    (void)state;
    proc ref, g[2];
    run_threads(&ref);
    start_gang(g, "stop", NULL);
    size_t ev, pt = 0;
    while (pt < 20 && !atomic_load(&g[0].r.done)) { /* rank 0 has reported some steps */
        wd_outbox_size(&g[0].out, &ev, &pt);
        sched_yield();
    }
    atomic_store(&g[1].r.stop, WD_STOP_PAUSE);
    wait_done(g, 2);
    if (g[0].r.status == WD_RUN_FAILED) fail_msg("rank 0: %s", g[0].r.err_msg);
    if (g[1].r.status == WD_RUN_FAILED) fail_msg("rank 1: %s", g[1].r.err_msg);
    assert_int_equal(g[0].r.status, WD_RUN_STOPPED);
    assert_int_equal(g[1].r.status, WD_RUN_STOPPED);
    assert_int_equal(g[0].r.steps, g[1].r.steps);
    int64_t step = 0, s;
    double loss;
    char ck[WD_PATH_MAX];
    /* the newest checkpoint rank 0 noted is the stop's, at the step both stopped after */
    while (wd_run_take_checkpoint(&g[0].r, &s, &loss, ck)) step = s;
    printf("  rank 1's stop: both ranks stopped after step %lld of 300; rank 0's checkpoint %s\n",
           (long long)g[0].r.steps, ck);
    assert_int_equal(step, g[0].r.steps);
    assert_true(step < 300);
    char none[WD_PATH_MAX];
    assert_false(wd_run_take_checkpoint(&g[1].r, &s, &loss, none)); /* rank 1 wrote none */
    char resume[WD_PATH_MAX];
    snprintf(resume, sizeof resume, "%s", ck);
    end_gang(g);
    start_gang(g, "resumed", resume);
    wait_done(g, 2);
    if (g[0].r.status != WD_RUN_OK) fail_msg("rank 0 resumed: %s", g[0].r.err_msg);
    if (g[1].r.status != WD_RUN_OK) fail_msg("rank 1 resumed: %s", g[1].r.err_msg);
    assert_same_file(ref.r.export_dir, g[0].r.export_dir, "adapter_model.safetensors");
    end_gang(g);
    proc_free(&ref);
}

/* ---- a rank's memory: about 1/R of the weights ---- */

/* The CPU backend counting the bytes it holds and their peak, one counter per "process" (alloc has
 * no context, so one function pair per slot). A 64-byte header keeps each buffer's size. */
enum { SLOTS = 3, HDR = 64 };
static struct {
    lnb_backend be;
    pthread_mutex_t mu;
    size_t live, peak;
} g_count[SLOTS];

static void *counted_alloc(int k, size_t n)
{
    char *p = lnb_cpu()->alloc(n + HDR);
    if (!p) return NULL;
    memcpy(p, &n, sizeof n);
    pthread_mutex_lock(&g_count[k].mu);
    g_count[k].live += n;
    if (g_count[k].live > g_count[k].peak) g_count[k].peak = g_count[k].live;
    pthread_mutex_unlock(&g_count[k].mu);
    return p + HDR;
}

static void counted_free(int k, void *q)
{
    if (!q) return;
    char *p = (char *)q - HDR;
    size_t n;
    memcpy(&n, p, sizeof n);
    pthread_mutex_lock(&g_count[k].mu);
    g_count[k].live -= n;
    pthread_mutex_unlock(&g_count[k].mu);
    lnb_cpu()->free(p);
}

#define COUNTED_SLOT(k)                                                                                    \
    static void *counted_alloc##k(size_t n) { return counted_alloc(k, n); }                               \
    static void counted_free##k(void *p) { counted_free(k, p); }
COUNTED_SLOT(0)
COUNTED_SLOT(1)
COUNTED_SLOT(2)

static const lnb_backend *counting(int k)
{
    static void *(*const allocs[SLOTS])(size_t) = {counted_alloc0, counted_alloc1, counted_alloc2};
    static void (*const frees[SLOTS])(void *) = {counted_free0, counted_free1, counted_free2};
    g_count[k].be = *lnb_cpu();
    g_count[k].be.alloc = allocs[k];
    g_count[k].be.free = frees[k];
    pthread_mutex_init(&g_count[k].mu, NULL);
    g_count[k].live = g_count[k].peak = 0;
    return &g_count[k].be;
}

/* g_spec on the layer-heavy model: 1 rank on counting backend 2, then a gang of two "processes" on
 * counting backends 0 and 1; each must succeed. */
static void run_counted(const char *tag, proc *one, proc g[2])
{
    char n[32];
    g_model = "wide";
    snprintf(n, sizeof n, "%s-one", tag);
    proc_init(one, n, NULL, 0, NULL);
    one->r.world = 1;
    one->r.be = counting(2);
    assert_int_equal(wd_run_start(&one->r), 0);
    wait_done(one, 1);
    if (one->r.status != WD_RUN_OK) fail_msg("1 rank: %s", one->r.err_msg);
    snprintf(n, sizeof n, "%s-gang", tag);
    start_gang_with(g, n, NULL, counting(0), counting(1));
    wait_done(g, 2);
    if (g[0].r.status != WD_RUN_OK) fail_msg("rank 0: %s", g[0].r.err_msg);
    if (g[1].r.status != WD_RUN_OK) fail_msg("rank 1: %s", g[1].r.err_msg);
}

/* The same lora_null_v2 job (calibration, drift, validation at eval points, checkpoints, export)
 * on the layer-heavy model: 1 rank, then a gang of two "processes", each with its own counting
 * backend. Every byte of the model, adapter, optimizer and activations goes through the backend
 * (host scratch does not: one layer at most, see tensor_parallel.h); each rank's peak must be half
 * the weights plus no more than the 1-rank job's other bytes — no rank ever holds the whole model.
 * Measured: 1 rank 5.91 MB (weights 3.99 MB), rank 0 3.66 MB, rank 1 3.20 MB. */
static void test_each_rank_holds_half_the_weights(void **state)
{
    (void)state;
    g_spec = "{\"model\":\"tiny\",\"training_file\":\"file-train\",\"seed\":7,"
             "\"hyperparameters\":{\"n_epochs\":1,\"batch_size\":2,\"learning_rate\":0.01,\"save_interval\":4,"
             "\"eval_interval\":4},"
             "\"adapter\":{\"type\":\"lora_null_v2\",\"rank\":4,\"calibration\":{\"samples\":8,\"max_length\":16}},"
             "\"resources\":{\"ranks\":2,\"device\":\"cpu\"}}";
    proc one, g[2];
    run_counted("mem", &one, g);
    double whole = (4.0 * 245760 + 2 * 48 * 128 + 9 * 128) * sizeof(float); /* the model's weights */
    printf("  peak backend bytes: 1 rank %zu (weights %.0f); rank 0 %zu (%.3f of it), rank 1 %zu (%.3f)\n",
           g_count[2].peak, whole, g_count[0].peak, (double)g_count[0].peak / (double)g_count[2].peak,
           g_count[1].peak, (double)g_count[1].peak / (double)g_count[2].peak);
    assert_true((double)g_count[2].peak >= whole);
    /* a rank: half the weights, and no more of everything else than the 1-rank job (5% slack) */
    double rest = (double)g_count[2].peak - whole;
    for (int k = 0; k < 2; k++) {
        assert_true((double)g_count[k].peak <= 1.05 * (whole / 2 + rest));
        assert_true((double)g_count[k].peak < whole);
        assert_true((double)g_count[k].peak >= whole / 2); /* the shard itself is counted */
        assert_int_equal(g_count[k].live, 0);                 /* and every byte given back */
    }
    assert_int_equal(g_count[2].live, 0);
    end_gang(g);
    proc_free(&one);
    g_spec = NULL;
    g_model = "model";
}

/* Full fine-tuning, the same way (calibrated: knowledge drift at eval points): every weight, its
 * gradient and its two AdamW moments are split over the ranks (embeddings, norms and lm_head
 * replicated); checkpoints, the drift's ΔW and the merged export are gathered by rank 0 one tensor
 * at a time, outside the backend (host: one tensor; each rank's W0 blocks for the drift, host).
 * Each rank's peak must be half the layers' weight-sized state plus no more than the 1-rank job's
 * other bytes; and the gang's exported model is the threads' job's, byte for byte. */
static void test_full_rank_holds_half_the_weights(void **state)
{
    (void)state;
    g_spec = "{\"model\":\"tiny\",\"training_file\":\"file-train\",\"seed\":7,"
             "\"hyperparameters\":{\"n_epochs\":1,\"batch_size\":2,\"learning_rate\":0.001,\"save_interval\":4,"
             "\"eval_interval\":4},"
             "\"adapter\":{\"type\":\"full\",\"calibration\":{\"samples\":8,\"max_length\":16}},"
             "\"resources\":{\"ranks\":2,\"device\":\"cpu\"}}";
    proc one, g[2], ref;
    g_calib = 1;
    run_counted("full", &one, g);
    proc_init(&ref, "full-threads", NULL, 0, NULL);
    assert_int_equal(wd_run_start(&ref.r), 0);
    wait_done(&ref, 1);
    if (ref.r.status != WD_RUN_OK) fail_msg("threads: %s", ref.r.err_msg);
    g_calib = 0;
    assert_same_file(ref.r.export_dir, g[0].r.export_dir, "model.safetensors");
    /* rank 0 reported what the 1-rank job did: every step, the evaluations, the drift at eval points */
    size_t ev1, pt1, ev0, pt0, evt, ptt;
    wd_outbox_size(&one.out, &ev1, &pt1);
    wd_outbox_size(&g[0].out, &ev0, &pt0);
    wd_outbox_size(&ref.out, &evt, &ptt);
    printf("  full fine-tuning with drift: rank 0 %zu events, %zu metric points (1 rank: %zu, %zu; threads: %zu, %zu)\n",
           ev0, pt0, ev1, pt1, evt, ptt);
    assert_int_equal(pt0, pt1);
    assert_int_equal(pt0, ptt);
    assert_int_equal(ev0, evt);
    size_t ns;
    char *summary = read_all(g[0].r.export_dir, "eval_summary.json", &ns);
    assert_non_null(strstr(summary, "\"knowledge_drift\"")); /* measured on the shards */
    free(summary);
    assert_same_file(ref.r.export_dir, g[0].r.export_dir, "eval_summary.json"); /* the threads' drift, bitwise */
    assert_same_file(ref.r.export_dir, g[0].r.export_dir, "config.json");
    assert_true(exists_under(g[0].r.dir, "out/checkpoints/step-000004/state.safetensors"));
    assert_false(exists_under(g[1].r.dir, "out/checkpoints"));
    assert_string_equal(g[1].r.export_dir, "");
    /* the layers' weights, gradients and two moments: what splits */
    double layers = 4.0 * 4 * 245760 * sizeof(float);
    printf("  full fine-tuning, peak backend bytes: 1 rank %zu (layers' weight-sized state %.0f); rank 0 %zu (%.3f of "
           "it), rank 1 %zu (%.3f)\n", g_count[2].peak, layers, g_count[0].peak,
           (double)g_count[0].peak / (double)g_count[2].peak, g_count[1].peak,
           (double)g_count[1].peak / (double)g_count[2].peak);
    assert_true((double)g_count[2].peak >= layers);
    double rest = (double)g_count[2].peak - layers;
    for (int k = 0; k < 2; k++) {
        assert_true((double)g_count[k].peak <= 1.05 * (layers / 2 + rest));
        assert_true((double)g_count[k].peak >= layers / 2);
        assert_int_equal(g_count[k].live, 0);
    }
    assert_int_equal(g_count[2].live, 0);
    end_gang(g);
    proc_free(&one);
    proc_free(&ref);
    g_spec = NULL;
    g_model = "model";
}

int main(int argc, char **argv)
{
    (void)argc;
    if (!getenv("LN_WDRUN_TEST_REEXEC")) {
        setenv("LN_WDRUN_TEST_REEXEC", "1", 1);
        setenv("OMP_NUM_THREADS", "1", 1);
        setenv("OPENBLAS_NUM_THREADS", "1", 1);
        execv("/proc/self/exe", argv);
        perror("test_wd_run_ranks: re-executing with one thread");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gang_of_two_processes_equals_threads),
        cmocka_unit_test(test_stop_on_rank_1_then_resume),
        cmocka_unit_test(test_each_rank_holds_half_the_weights),
        cmocka_unit_test(test_full_rank_holds_half_the_weights),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
