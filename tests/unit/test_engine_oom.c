/* Out of memory in the engine fails the job instead of aborting the worker: export (PEFT and
 * merged), the knowledge-drift tracker (full fine-tuning and a residual adapter), the LoRA-Null
 * init (null-space basis, factors, residual), loading a data file (reading it, parsing its
 * lines — not "bad JSON"), calibration (model hash, sums, product scratch, forward), building a
 * batch, rendering a chat example, tokenizing a long text (and decoding it), loading a big
 * tokenizer and the safetensors writer's copies each run in a child
 * process; the CPU attention backward, which cannot fail, must give the same bits when its
 * per-thread blocks cannot be had (this binary
 * run again, so nothing of OpenBLAS or OpenMP is inherited through fork) under a real
 * address-space limit (RLIMIT_AS = what the child already maps + a slack). The slack doubles
 * from 256 KiB until the path succeeds; at every step the child must come back normally with
 * either success or one "… out of memory allocating <size> for <what>" sentence — an abort or a
 * signal fails the test. ASan/UBSan builds skip it: ASan's shadow memory needs terabytes of
 * address space, so RLIMIT_AS cannot stand for a memory limit there. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <cblas.h>
#include <jansson.h>
#include <malloc.h>
#include <math.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/safetensors.h"
#include "common/util.h"
#include "worker/backend/backend.h"
#include "worker/engine/adapter.h"
#include "worker/engine/calibrate.h"
#include "worker/engine/chat.h"
#include "worker/engine/data.h"
#include "worker/engine/drift.h"
#include "worker/engine/export.h"
#include "worker/engine/model.h"
#include "worker/engine/tokenizer.h"
#include "worker/engine/train.h"
#include "tests/unit/sanitizer.h"

static char g_dir[] = "/tmp/ln_oom_XXXXXX";

/* One layer wide enough that every path's big buffers are megabytes: W_q 1 MiB, W_down 2 MiB,
 * a 1024² fp64 covariance 8 MiB. */
static const char *CFG_JSON =
    "{\"vocab_size\": 64, \"hidden_size\": 512, \"intermediate_size\": 1024, \"num_hidden_layers\": 1,"
    " \"num_attention_heads\": 8, \"num_key_value_heads\": 4, \"max_position_embeddings\": 64,"
    " \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, \"tie_word_embeddings\": false}";

/* ---------------------------------------------------------------- the paths */

/* Synthetic covariances, PSD: C = diag(i+1)/d + 0.01·vvᵀ, one per input width. */
typedef struct {
    double *hidden, *inter;
    int dh, di;
} covs;

static double *synthetic_cov(int d) {
    double *C = malloc((size_t)d * d * sizeof *C);
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) {
            double vi = sin(0.1 * i), vj = sin(0.1 * j);
            C[(size_t)i * d + j] = 0.01 * vi * vj + (i == j ? (i + 1.0) / d : 0.0);
        }
    return C;
}

static const double *cov_of(void *ctx, int layer, ln_input which) {
    (void)layer;
    covs *c = ctx;
    return which == LN_IN_DOWN ? c->inter : c->hidden;
}

/* What the child prepares before the limit and then runs under it, once per slack. */
typedef struct {
    ln_model *m, *orig;
    ln_adapter ad;
    covs cv;
    int runs;
} world;

typedef int (*path_fn)(world *w, ln_err *e);

static ln_model *new_model(void) {
    ln_config cfg;
    ln_err e;
    ln_model *m = NULL;
    if (ln_config_parse(CFG_JSON, "oom test config", &cfg, &e) != 0 ||
        ln_model_new_random(&cfg, lnb_cpu(), 3, &m, &e) != 0) {
        fprintf(stderr, "setup: %s\n", e.msg);
        _exit(3);
    }
    return m;
}

static void setup_adapter(world *w, const char *method) {
    ln_err e;
    ln_adapter_opts ao = {.method = method, .rank = 96, .alpha = 96, .seed = 1, .covariance = cov_of,
                          .method_ctx = &w->cv};
    if (ln_adapter_init(w->m, &w->ad, &ao, &e) != 0) {
        fprintf(stderr, "setup %s: %s\n", method, e.msg);
        _exit(3);
    }
}

static char *next_dir(world *w, const char *what) {
    char name[64];
    snprintf(name, sizeof name, "%s_%d_%d", what, (int)getpid(), w->runs++);
    return ln_path_join(g_dir, name);
}

static int run_export_peft(world *w, ln_err *e) {
    char *dir = next_dir(w, "peft");
    int rc = ln_export_peft(w->m, &w->ad, "base", dir, e);
    free(dir);
    return rc;
}

static int run_export_merged(world *w, ln_err *e) {
    char *dir = next_dir(w, "merged");
    int rc = ln_export_merged(w->orig, w->m, &w->ad, dir, ST_BF16, e);
    free(dir);
    return rc;
}

static int run_drift(world *w, ln_err *e) {
    ln_drift_tracker *t = NULL;
    if (ln_drift_tracker_new(w->m, &w->ad, cov_of, &w->cv, &t, e) != 0) return -1;
    json_t *row = json_object();
    int rc = row ? ln_drift_tracker_measure(t, w->m, &w->ad, row, e) : ln_errf(e, "json_object: out of memory");
    json_decref(row);
    ln_drift_tracker_free(t);
    return rc;
}

static int run_init_lora_null(world *w, ln_err *e) {
    ln_adapter ad;
    ln_adapter_opts ao = {.method = "lora_null_v1", .rank = 64, .alpha = 64, .seed = 1, .covariance = cov_of,
                          .method_ctx = &w->cv};
    if (ln_adapter_init(w->m, &ad, &ao, e) != 0) return -1;
    ln_adapter_free(&ad);
    return 0;
}

/* Writes `lines` pre-tokenized lines of `len` ids (id (i·mi + k·mk) mod 64) into path. */
static void write_ids_jsonl(const char *path, int lines, int len, int mi, int mk) {
    FILE *f = fopen(path, "w");
    for (int i = 0; f && i < lines; i++) {
        fputs("{\"input_ids\": [", f);
        for (int k = 0; k < len; k++) fprintf(f, "%s%d", k ? ", " : "", (i * mi + k * mk) % 64);
        fputs("]}\n", f);
    }
    if (!f || fclose(f) != 0) _exit(8);
}

/* A 4 MiB JSONL file of pre-tokenized lines, read and validated whole. */
static int run_data_load(world *w, ln_err *e) {
    char *path = ln_path_join(g_dir, "data.jsonl");
    if (w->runs++ == 0) write_ids_jsonl(path, 2000, 400, 1, 1);
    ln_dataset *ds = NULL;
    ln_data_opts o = {.max_seq_len = 0};
    int rc = ln_dataset_load(path, NULL, &o, &ds, e);
    ln_dataset_free(ds);
    free(path);
    return rc;
}

/* Calibration of the one-layer model: hashing it, its windows, the covariance sums (2–8 MiB each),
 * the fp32 product scratch and the forward-only activations. */
static int run_calibration(world *w, ln_err *e) {
    char *path = ln_path_join(g_dir, "calib.jsonl");
    if (w->runs++ == 0) write_ids_jsonl(path, 8, 48, 7, 3);
    ln_calibration *c = NULL;
    ln_calib_opts o = {.path = path, .samples = 4, .max_length = 32, .seed = 1, .cache_dir = ""};
    int rc = ln_calibrate(w->m, NULL, &o, &c, e);
    ln_calibration_free(c);
    free(path);
    return rc;
}

/* A batch of 16 rows of 8192 tokens: ids and targets 512 KiB each. */
static int run_batch_build(world *w, ln_err *e) {
    enum { ROWS = 16, LEN = 8192 };
    static int32_t ids[LEN], labels[LEN];
    static ln_example ex[ROWS];
    static const ln_example *px[ROWS];
    if (w->runs++ == 0)
        for (int i = 0; i < ROWS; i++) {
            for (int k = 0; k < LEN; k++) ids[k] = labels[k] = k % 64;
            ex[i] = (ln_example){.input_ids = ids, .labels = labels, .len = LEN};
            px[i] = &ex[i];
        }
    ln_batch b;
    if (ln_batch_build(&b, px, ROWS, e) != 0) return -1;
    int rc = b.B == ROWS && b.T == LEN && b.n_targets == (int64_t)ROWS * (LEN - 1) ? 0
                                                                                   : ln_errf(e, "wrong batch");
    ln_batch_free(&b);
    return rc;
}

/* A 4 MiB "text" example (made before the limit) rendered: the text grows by doubling. */
static json_t *g_chat_obj;

static int prepare_chat_render(world *w, ln_err *e) {
    (void)w;
    (void)e;
    char *text = malloc((4 << 20) + 1);
    for (int i = 0; i < 4 << 20; i++) text[i] = (char)('a' + i % 26);
    text[4 << 20] = 0;
    g_chat_obj = json_pack("{s:s}", "text", text);
    free(text);
    return 0;
}

static int run_chat_render(world *w, ln_err *e) {
    (void)w;
    ln_chat_rendered r;
    int rc = ln_chat_render(NULL, LN_TEMPLATE_LLAMA3, LN_CHAT_TEXT, g_chat_obj, &r, e);
    if (rc == 0 && r.len != (size_t)4 << 20) rc = ln_errf(e, "rendered %zu bytes", r.len);
    if (rc == 0) ln_chat_rendered_free(&r);
    return rc;
}

/* The default tokenizer (made and loaded before the limit) on 4 MiB of words, with offsets. */
static ln_tokenizer *g_tok;
static char *g_words;

static int prepare_tokenize(world *w, ln_err *e) {
    (void)w;
    char *path = ln_path_join(g_dir, "tokenizer.json");
    int rc = ln_tokenizer_make_default(path, 512, e);
    if (rc == 0) rc = ln_tokenizer_load(path, &g_tok, e);
    free(path);
    g_words = malloc((4 << 20) + 1);
    for (int i = 0; i < 4 << 20; i++) g_words[i] = i % 7 == 6 ? ' ' : (char)('a' + (i * 5) % 26);
    g_words[4 << 20] = 0;
    return rc;
}

static int run_tokenize(world *w, ln_err *e) {
    (void)w;
    ln_ids ids = {0}, offs = {0};
    int rc = ln_tokenizer_encode(g_tok, g_words, (size_t)4 << 20, 1, &ids, &offs, e);
    if (rc == 0 && (ids.n < (4 << 20) / 7 || offs.n != 2 * ids.n)) rc = ln_errf(e, "%d ids, %d offsets", ids.n, offs.n);
    ln_ids_free(&ids);
    ln_ids_free(&offs);
    return rc;
}

/* Decoding those 4 MiB back (their ids made before the limit). */
static ln_ids g_word_ids;

static int prepare_detokenize(world *w, ln_err *e) {
    if (prepare_tokenize(w, e) != 0) return -1;
    return ln_tokenizer_encode(g_tok, g_words, (size_t)4 << 20, 0, &g_word_ids, NULL, e);
}

static int run_detokenize(world *w, ln_err *e) {
    (void)w;
    char *text = NULL;
    size_t len = 0;
    int rc = ln_tokenizer_decode(g_tok, g_word_ids.ids, g_word_ids.n, 0, &text, &len, e);
    if (rc == 0 && (len != (size_t)4 << 20 || memcmp(text, g_words, len) != 0))
        rc = ln_errf(e, "decoded %zu bytes, not the 4 MiB encoded", len);
    free(text);
    return rc;
}

/* Loading a tokenizer of 64K more ids (the default one, made before the limit, with vocabulary
 * entries "zz<n>" added): its JSON, id tables and maps. */
static int prepare_tokenizer_load(world *w, ln_err *e) {
    (void)w;
    char *path = ln_path_join(g_dir, "tokenizer_big.json");
    int rc = ln_tokenizer_make_default(path, 300, e);
    json_t *root = rc == 0 ? json_load_file(path, 0, NULL) : NULL;
    json_t *vocab = json_object_get(json_object_get(root, "model"), "vocab");
    if (rc == 0 && !vocab) rc = ln_errf(e, "no model.vocab in %s", path);
    for (int i = 0; rc == 0 && i < 65536; i++) {
        char key[16];
        snprintf(key, sizeof key, "zz%d", i);
        json_object_set_new(vocab, key, json_integer(1000 + i));
    }
    if (rc == 0 && json_dump_file(root, path, JSON_COMPACT) != 0) rc = ln_errf(e, "cannot rewrite %s", path);
    json_decref(root);
    free(path);
    return rc;
}

static int run_tokenizer_load(world *w, ln_err *e) {
    (void)w;
    char *path = ln_path_join(g_dir, "tokenizer_big.json");
    ln_tokenizer *t = NULL;
    int rc = ln_tokenizer_load(path, &t, e);
    ln_tokenizer_free(t);
    free(path);
    return rc;
}

/* A safetensors file of converted copies (the model's W_down as BF16 and F32). */
static int run_writer_copies(world *w, ln_err *e) {
    char *dir = next_dir(w, "writer");
    st_writer *sw = st_writer_new();
    const ln_param *p = &w->m->layers[0].lin[LN_DOWN];
    int64_t shape[2] = {p->rows, p->cols};
    st_writer_add_f32(sw, "down.bf16", ST_BF16, 2, shape, p->w);
    st_writer_add_f32(sw, "down.f32", ST_F32, 2, shape, p->w);
    int rc = ln_mkdir_p(dir, e);
    char *path = ln_path_join(dir, "t.safetensors");
    if (rc == 0) rc = st_writer_write(sw, path, e);
    st_writer_free(sw);
    free(path);
    free(dir);
    return rc;
}

/* The CPU attention backward under the limit: its per-thread block (64 × 2048 floats, 512 KiB)
 * cannot be had, so it works in the caller's scratch — and must give the same bits. Succeeds or
 * fails with a sentence without "out of memory" (which fails the test). */
enum { AT = 2048, AH = 2, AKV = 1, AD = 8 };
static struct {
    float *q, *k, *v, *probs, *dout, *dq, *dk, *dv, *scratch, *ref;
} g_att;

/* Before the limit: the inputs, and the results with the kernel's own blocks. */
static int prepare_attention_backward(world *w, ln_err *e) {
    (void)w;
    (void)e;
    const lnb_backend *be = lnb_cpu();
    const size_t nq = (size_t)AT * AH * AD, nk = (size_t)AT * AKV * AD;
    {
        float **bufs[] = {&g_att.q, &g_att.k, &g_att.v, &g_att.dout, &g_att.dq, &g_att.dk, &g_att.dv, &g_att.ref};
        size_t lens[] = {nq, nk, nk, nq, nq, nk, nk, nq + 2 * nk};
        for (int i = 0; i < 8; i++) *bufs[i] = calloc(lens[i], sizeof(float));
        g_att.probs = calloc((size_t)AH * AT * AT, sizeof(float));
        g_att.scratch = calloc((size_t)AT * AT, sizeof(float));
        for (size_t i = 0; i < nq; i++) g_att.q[i] = sinf(0.37f * (float)i), g_att.dout[i] = cosf(0.11f * (float)i);
        for (size_t i = 0; i < nk; i++) g_att.k[i] = cosf(0.23f * (float)i), g_att.v[i] = sinf(0.07f * (float)i);
        be->attention_forward(g_att.dq, g_att.probs, g_att.q, g_att.k, g_att.v, 1, AT, AH, AKV, AD);
        be->attention_backward(g_att.dq, g_att.dk, g_att.dv, g_att.scratch, g_att.dout, g_att.probs, g_att.q, g_att.k,
                               g_att.v, 1, AT, AH, AKV, AD);
        memcpy(g_att.ref, g_att.dq, nq * sizeof(float));
        memcpy(g_att.ref + nq, g_att.dk, nk * sizeof(float));
        memcpy(g_att.ref + nq + nk, g_att.dv, nk * sizeof(float));
    }
    return 0;
}

static int run_attention_backward(world *w, ln_err *e) {
    (void)w;
    const lnb_backend *be = lnb_cpu();
    const size_t nq = (size_t)AT * AH * AD, nk = (size_t)AT * AKV * AD;
    void *probe = malloc((size_t)64 * AT * sizeof(float)); /* what the kernel asks for per thread */
    int fell_back = probe == NULL;
    free(probe);
    memset(g_att.dq, 0, nq * sizeof(float));
    be->attention_backward(g_att.dq, g_att.dk, g_att.dv, g_att.scratch, g_att.dout, g_att.probs, g_att.q, g_att.k,
                           g_att.v, 1, AT, AH, AKV, AD);
    if (memcmp(g_att.ref, g_att.dq, nq * sizeof(float)) || memcmp(g_att.ref + nq, g_att.dk, nk * sizeof(float)) ||
        memcmp(g_att.ref + nq + nk, g_att.dv, nk * sizeof(float)))
        return ln_errf(e, "attention backward: other results under the limit (fell back: %d)", fell_back);
    if (!fell_back) return ln_errf(e, "attention backward: its block fit under the limit; the fallback did not run");
    return 0;
}

/* ---------------------------------------------------------------- the child */

static size_t mapped_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    if (!f || fscanf(f, "%lu", &pages) != 1) _exit(4);
    fclose(f);
    return (size_t)pages * (size_t)sysconf(_SC_PAGESIZE);
}

#define MAX_STEPS 12

/* The paths by name, for the child's command line. */
static const struct {
    const char *name, *method;
    int merged;
    path_fn run;
    path_fn prepare; /* before the limit, once (NULL: nothing) */
} PATHS[] = {
    {"export_peft", "pissa", 0, run_export_peft, NULL},
    {"export_merged", "pissa", 1, run_export_merged, NULL},
    {"drift_full", "full", 0, run_drift, NULL},
    {"drift_residual", "pissa", 0, run_drift, NULL},
    {"init_lora_null", NULL, 0, run_init_lora_null, NULL},
    {"data_load", NULL, 0, run_data_load, NULL},
    {"calibration", NULL, 0, run_calibration, NULL},
    {"batch_build", NULL, 0, run_batch_build, NULL},
    {"chat_render", NULL, 0, run_chat_render, prepare_chat_render},
    {"writer_copies", NULL, 0, run_writer_copies, NULL},
    {"tokenize", NULL, 0, run_tokenize, prepare_tokenize},
    {"tokenizer_load", NULL, 0, run_tokenizer_load, prepare_tokenizer_load},
    {"detokenize", NULL, 0, run_detokenize, prepare_detokenize},
    {"attention_backward", NULL, 0, run_attention_backward, prepare_attention_backward},
};

/* The child (this binary run again with --oom-child NAME, a fresh process: no OpenBLAS or OpenMP
 * state inherited through fork). Writes one line per slack to fd 3: "<slack> <rc> <message>". */
static int child_main(const char *name, const char *dir) {
    size_t k = 0;
    while (k < sizeof PATHS / sizeof *PATHS && strcmp(PATHS[k].name, name) != 0) k++;
    if (k == sizeof PATHS / sizeof *PATHS) return 2;
    snprintf(g_dir, sizeof g_dir, "%s", dir);
    /* a fixed threshold: every big buffer is its own mapping, returned at free, so what the
     * process maps is what it holds (glibc would otherwise keep freed megabytes in its heap) */
    mallopt(M_MMAP_THRESHOLD, 64 << 10);
    world w = {0};
    w.cv.dh = 512;
    w.cv.di = 1024;
    w.cv.hidden = synthetic_cov(w.cv.dh);
    w.cv.inter = synthetic_cov(w.cv.di);
    w.m = new_model();
    if (PATHS[k].method) setup_adapter(&w, PATHS[k].method);
    if (PATHS[k].merged) w.orig = new_model();
    ln_err pe;
    if (PATHS[k].prepare && PATHS[k].prepare(&w, &pe) != 0) {
        fprintf(stderr, "prepare %s: %s\n", name, pe.msg);
        _exit(3);
    }
    /* OpenBLAS maps its work buffer on the first level-3 call too big for its small-matrix kernels,
     * and under a limit it waits for one forever instead of failing (see the report): map it now. */
    enum { N = 256 };
    double *a = calloc(N * N, sizeof *a), *c = calloc(N * N, sizeof *c);
    for (int i = 0; i < N; i++) a[i * N + i] = 1.0;
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, N, N, 1.0, a, N, a, N, 0.0, c, N);
    cblas_dtrmm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, N, N, 1.0, a, N, c, N);
    free(a);
    free(c);
    size_t slack = 256 << 10;
    for (int step = 0; step < MAX_STEPS; step++, slack *= 2) {
        ln_err e = {{0}};
        struct rlimit old, lim;
        getrlimit(RLIMIT_AS, &old);
        lim = old;
        lim.rlim_cur = mapped_bytes() + slack;
        if (setrlimit(RLIMIT_AS, &lim) != 0) return 5;
        int rc = PATHS[k].run(&w, &e);
        setrlimit(RLIMIT_AS, &old);
        dprintf(3, "%zu %d %s\n", slack, rc, rc == 0 ? "ok" : e.msg);
        if (rc == 0) break;
    }
    return 0;
}

/* Runs the path in a child over the slacks; checks every outcome and that the first one ran
 * out of memory naming `area` and the last one succeeded (area NULL: a path that cannot fail,
 * which must succeed at the smallest slack). */
static void check_path(const char *name, const char *area) {
    if (LN_UNDER_ASAN) {
        printf("  %s: skipped under ASan (its shadow memory makes RLIMIT_AS meaningless)\n", name);
        return;
    }
    int p[2];
    assert_int_equal(pipe(p), 0);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        dup2(p[1], 3); /* the child's lines; its stdout stays the test's (LAPACKE talks there) */
        setenv("OPENBLAS_NUM_THREADS", "1", 1); /* no thread stacks or buffers to map under the limit */
        setenv("OMP_NUM_THREADS", "1", 1);
        execl("/proc/self/exe", "test_engine_oom", "--oom-child", name, g_dir, (char *)NULL);
        _exit(7);
    }
    close(p[1]);
    char buf[16384];
    size_t len = 0;
    ssize_t got;
    while (len < sizeof buf - 1 && (got = read(p[0], buf + len, sizeof buf - 1 - len)) > 0) len += (size_t)got;
    buf[len] = 0;
    close(p[0]);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    printf("  %s:\n%s", name, buf);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("%s: the child did not exit normally (%s %d) after:\n%s", name,
                 WIFSIGNALED(status) ? "signal" : "exit status", WIFSIGNALED(status) ? WTERMSIG(status)
                                                                                   : WEXITSTATUS(status), buf);
    int lines = 0, first_rc = 0, last_rc = -1;
    char first_msg[LN_ERR_MSG_MAX] = "";
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        size_t slack;
        int rc, off = 0;
        assert_int_equal(sscanf(line, "%zu %d %n", &slack, &rc, &off), 2);
        const char *msg = line + off;
        if (rc != 0 && !strstr(msg, "out of memory"))
            fail_msg("%s with %zu bytes of slack: failed without naming out of memory: %s", name, slack, msg);
        if (lines == 0) {
            first_rc = rc;
            snprintf(first_msg, sizeof first_msg, "%s", msg);
        }
        last_rc = rc;
        lines++;
    }
    if (!area) {
        if (lines != 1 || first_rc != 0) fail_msg("%s: failed with the smallest slack: %s", name, first_msg);
        return;
    }
    assert_true(lines >= 2);
    if (first_rc == 0) fail_msg("%s: succeeded even with the smallest slack", name);
    if (!strstr(first_msg, area)) fail_msg("%s: the first failure does not name \"%s\": %s", name, area, first_msg);
    if (last_rc != 0) fail_msg("%s: never succeeded, even with the largest slack", name);
}

/* ---------------------------------------------------------------- tests */

static void test_export_peft_out_of_memory(void **state) {
    (void)state;
    check_path("export_peft", "export");
}

static void test_export_merged_out_of_memory(void **state) {
    (void)state;
    check_path("export_merged", "merge");
}

static void test_drift_tracker_full_out_of_memory(void **state) {
    (void)state;
    check_path("drift_full", "knowledge drift");
}

static void test_drift_tracker_residual_out_of_memory(void **state) {
    (void)state;
    check_path("drift_residual", "knowledge drift");
}

static void test_lora_null_init_out_of_memory(void **state) {
    (void)state;
    check_path("init_lora_null", "out of memory");
}

static void test_data_load_out_of_memory(void **state) {
    (void)state;
    check_path("data_load", "out of memory");
}

static void test_calibration_out_of_memory(void **state) {
    (void)state;
    check_path("calibration", "calibration");
}

static void test_batch_build_out_of_memory(void **state) {
    (void)state;
    check_path("batch_build", "batch: out of memory allocating 512.0 KiB for the token ids of 16 rows of 8192 tokens");
}

static void test_chat_render_out_of_memory(void **state) {
    (void)state;
    check_path("chat_render", "chat template: out of memory allocating");
}

static void test_writer_copies_out_of_memory(void **state) {
    (void)state;
    check_path("writer_copies", "safetensors writer: out of memory allocating 1.0 MiB for a copy of tensor down.bf16");
}

static void test_tokenize_out_of_memory(void **state) {
    (void)state;
    check_path("tokenize", "tokenizer: out of memory encoding a text of 4.0 MiB");
}

static void test_tokenizer_load_out_of_memory(void **state) {
    (void)state;
    check_path("tokenizer_load", "out of memory");
}

static void test_detokenize_out_of_memory(void **state) {
    (void)state;
    check_path("detokenize", "tokenizer: out of memory decoding");
}

static void test_attention_backward_without_its_blocks(void **state) {
    (void)state;
    check_path("attention_backward", NULL);
}

static int setup(void **state) {
    (void)state;
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--oom-child") == 0) return child_main(argv[2], argv[3]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_export_peft_out_of_memory),
        cmocka_unit_test(test_export_merged_out_of_memory),
        cmocka_unit_test(test_drift_tracker_full_out_of_memory),
        cmocka_unit_test(test_drift_tracker_residual_out_of_memory),
        cmocka_unit_test(test_lora_null_init_out_of_memory),
        cmocka_unit_test(test_data_load_out_of_memory),
        cmocka_unit_test(test_calibration_out_of_memory),
        cmocka_unit_test(test_batch_build_out_of_memory),
        cmocka_unit_test(test_chat_render_out_of_memory),
        cmocka_unit_test(test_writer_copies_out_of_memory),
        cmocka_unit_test(test_tokenize_out_of_memory),
        cmocka_unit_test(test_tokenizer_load_out_of_memory),
        cmocka_unit_test(test_detokenize_out_of_memory),
        cmocka_unit_test(test_attention_backward_without_its_blocks),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
