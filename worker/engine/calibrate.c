/* calibrate.c — calibration forward passes, covariance file, cache (see calibrate.h). */
#include "worker/engine/calibrate.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "common/util.h"
#include "worker/engine/data.h"
#include "worker/engine/lora_init.h"
#include "worker/engine/nullspace.h"
#include "worker/engine/tensor_parallel.h"

/* The first target reading each input names its covariance. */
static const ln_target INPUT_NAMER[LN_NINPUT] = {
    [LN_IN_QKV] = LN_Q, [LN_IN_O] = LN_O, [LN_IN_GATEUP] = LN_GATE, [LN_IN_DOWN] = LN_DOWN};

/* ---------------------------------------------------------------- small helpers */

static uint64_t mix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform integer in [0, n) without modulo bias. */
static uint64_t below(uint64_t *s, uint64_t n) {
    uint64_t lim = UINT64_MAX - UINT64_MAX % n, x;
    do x = mix64(s);
    while (x >= lim);
    return x % n;
}

static unsigned inputs_needed(unsigned targets) {
    unsigned need = 0;
    for (int t = 0; t < LN_NTARGET; t++)
        if (targets & (1u << t)) need |= 1u << ln_target_input((ln_target)t);
    return need;
}

static void cov_name(char *buf, size_t n, int layer, ln_input in) {
    snprintf(buf, n, "model.layers.%d.%s", layer, ln_target_module(INPUT_NAMER[in]));
}

static ln_calibration *calib_new(const ln_config *cfg) {
    ln_calibration *c = ln_xcalloc(1, sizeof *c);
    c->num_layers = cfg->num_layers;
    for (int in = 0; in < LN_NINPUT; in++) {
        int d_out, d_in;
        ln_model_target_dims(cfg, INPUT_NAMER[in], &d_out, &d_in);
        c->d[in] = d_in;
    }
    c->C = ln_xcalloc((size_t)cfg->num_layers * LN_NINPUT, sizeof *c->C);
    return c;
}

void ln_calibration_free(ln_calibration *c) {
    if (!c) return;
    for (int i = 0; i < c->num_layers * LN_NINPUT; i++) {
        if (!c->C[i]) continue;
        ln_init_forget_basis(c->C[i]);
        free(c->C[i]);
    }
    free(c->C);
    free(c);
}

const double *ln_calibration_covariance(void *ctx, int layer, ln_input which) {
    const ln_calibration *c = ctx;
    if (!c || layer < 0 || layer >= c->num_layers || (unsigned)which >= LN_NINPUT) return NULL;
    return c->C[layer * LN_NINPUT + which];
}

const double *ln_calibration_cov(const ln_calibration *c, int layer, ln_target t) {
    if (!c || layer < 0 || layer >= c->num_layers || (unsigned)t >= LN_NTARGET) return NULL;
    return c->C[layer * LN_NINPUT + ln_target_input(t)];
}

/* ---------------------------------------------------------------- hashing */

typedef struct {
    ln_param **p;
    int n, cap, failed;
} param_list;

static void collect_param(ln_param *p, void *ctx) {
    param_list *l = ctx;
    if (l->failed) return;
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        ln_param **np = realloc(l->p, (size_t)cap * sizeof *l->p);
        if (!np) {
            l->failed = 1;
            return;
        }
        l->p = np;
        l->cap = cap;
    }
    l->p[l->n++] = p;
}

/* sha256 over (name, sha256(values)) of every parameter in the model's order; the per-parameter
 * digests run in parallel (hashing an 8B model's 32 GB of fp32 is the slow part of a cache hit). */
int ln_calibration_model_hash(ln_model *m, char out[65], ln_err *e) {
    param_list l = {0};
    ln_model_for_each_param(m, collect_param, &l);
    uint8_t(*dig)[32] = l.failed ? NULL
                                 : ln_try_allocf((size_t)(l.n ? l.n : 1), sizeof *dig, e, "calibration",
                                                 "the digests of the model's %d tensors", l.n);
    if (!dig) {
        free(l.p);
        return l.failed ? ln_errf(e, "calibration: out of memory listing the model's tensors to hash") : -1;
    }
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < l.n; i++) {
        sha256_ctx c;
        sha256_init(&c);
        /* through the backend (weights may live off the host), 4 MiB at a time at most */
        const size_t chunk = l.p[i]->n < ((int64_t)1 << 20) ? (size_t)(l.p[i]->n ? l.p[i]->n : 1) : (size_t)1 << 20;
        ln_err he;
        float *h = ln_try_allocf(chunk, sizeof(float), &he, "calibration", "hashing %s", l.p[i]->name);
        if (!h) {
#pragma omp critical(ln_calib_hash_err)
            if (!failed) {
                failed = 1;
                *e = he;
            }
            continue;
        }
        for (int64_t k = 0; k < l.p[i]->n; k += (int64_t)chunk) {
            size_t len = (size_t)(l.p[i]->n - k) < chunk ? (size_t)(l.p[i]->n - k) : chunk;
            m->be->download(h, l.p[i]->w + k, len * sizeof(float));
            sha256_update(&c, h, len * sizeof(float));
        }
        free(h);
        sha256_final(&c, dig[i]);
    }
    sha256_ctx c;
    sha256_init(&c);
    for (int i = 0; i < l.n; i++) {
        sha256_update(&c, l.p[i]->name, strlen(l.p[i]->name) + 1);
        sha256_update(&c, dig[i], 32);
    }
    uint8_t d[32];
    sha256_final(&c, d);
    sha256_to_hex(d, out);
    free(dig);
    free(l.p);
    return failed ? -1 : 0;
}

static int file_hash(const char *path, char out[65], ln_err *e) {
    FILE *f = fopen(path, "rb");
    if (!f) return ln_errf(e, "%s: cannot open calibration file: %s", path, strerror(errno));
    sha256_ctx c;
    sha256_init(&c);
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) sha256_update(&c, buf, n);
    int bad = ferror(f);
    fclose(f);
    if (bad) return ln_errf(e, "%s: read error", path);
    uint8_t d[32];
    sha256_final(&c, d);
    sha256_to_hex(d, out);
    return 0;
}

/* ---------------------------------------------------------------- samples */

typedef struct {
    const int32_t *ids;
    int len;
} window;

/* The calibration samples: windows into one token stream (owned here). */
typedef struct {
    int32_t *stream;
    int64_t total;
    window *win;
    int64_t count;
} sample_set;

static void sample_set_free(sample_set *ss) {
    free(ss->stream);
    free(ss->win);
    memset(ss, 0, sizeof *ss);
}

/* The reference recipe (CorDA's / LoRA-Null's get_calib_data): the examples joined into one stream
 * (in file order; each example's own tokens, so its BOS/EOS separate it from the next), then
 * `samples` windows of max_length tokens at seeded random offsets, drawn with replacement. A stream
 * no longer than max_length is one sample. */
static int choose_windows(const ln_dataset *ds, int samples, int max_length, uint64_t seed, sample_set *ss,
                          ln_err *e) {
    memset(ss, 0, sizeof *ss);
    for (int64_t i = 0; i < ds->n; i++) ss->total += ds->ex[i].len;
    if (ss->total == 0) return 0;
    ss->stream = ln_try_alloc((size_t)ss->total * sizeof(int32_t), "calibration token stream", e);
    if (!ss->stream) return -1;
    int64_t at = 0;
    for (int64_t i = 0; i < ds->n; i++) {
        memcpy(ss->stream + at, ds->ex[i].input_ids, (size_t)ds->ex[i].len * sizeof(int32_t));
        at += ds->ex[i].len;
    }
    uint64_t st = seed ^ 0x63616C6962726174ull;
    if (ss->total <= max_length) {
        ss->count = 1;
        ss->win = ln_try_allocf(1, sizeof *ss->win, e, "calibration", "one sample window");
        if (!ss->win) {
            sample_set_free(ss);
            return -1;
        }
        ss->win[0] = (window){ss->stream, (int)ss->total};
        return 0;
    }
    ss->count = samples;
    ss->win = ln_try_allocf((size_t)samples, sizeof *ss->win, e, "calibration", "%d sample windows", samples);
    if (!ss->win) {
        sample_set_free(ss);
        return -1;
    }
    for (int i = 0; i < samples; i++) {
        int64_t off = (int64_t)below(&st, (uint64_t)(ss->total - max_length) + 1);
        ss->win[i] = (window){ss->stream + off, max_length};
    }
    return 0;
}

static int load_windows(const ln_tokenizer *tok, const ln_calib_opts *o, sample_set *ss, ln_err *e) {
    ln_data_opts dopts = {.max_seq_len = 0, .overlong = LN_OVERLONG_TRUNCATE, .chat_template = o->chat_template};
    ln_dataset *ds = NULL;
    if (ln_dataset_load(o->path, tok, &dopts, &ds, e) != 0) return ln_err_prefix(e, "calibration");
    int samples = o->samples > 0 ? o->samples : LN_CALIB_DEFAULT_SAMPLES;
    int max_length = o->max_length > 0 ? o->max_length : LN_CALIB_DEFAULT_MAX_LENGTH;
    int rc = choose_windows(ds, samples, max_length, o->seed, ss, e);
    ln_dataset_free(ds);
    if (rc != 0) return -1;
    if (ss->count == 0) {
        sample_set_free(ss);
        return ln_errf(e, "%s: the calibration file has no tokens to calibrate on", o->path);
    }
    return 0;
}

/* ---------------------------------------------------------------- on tensor-parallel shards */

/* A shard (m->comm with 2+ ranks) calibrates collectively: every rank runs the same forwards and
 * ln_tp_calibration_hook hands the whole layer inputs to rank 0, which alone accumulates, caches and
 * returns the covariances (the other ranks get an ln_calibration without any). The widths are the
 * unsharded model's; the cache key's model hash is the hash of the ranks' shard hashes in rank order. */
static ln_comm *tp_comm(const ln_model *m) { return m->comm && m->comm->size > 1 ? m->comm : NULL; }

static void tp_whole_config(const ln_model *m, ln_config *whole) {
    ln_comm *c = tp_comm(m);
    int R = c ? c->size : 1;
    *whole = m->cfg;
    whole->num_heads *= R;
    whole->num_kv_heads *= R;
    whole->intermediate_size *= R;
}

static int tp_model_hash(ln_model *m, char out[65], ln_err *e) {
    if (ln_calibration_model_hash(m, out, e) != 0) return -1;
    ln_comm *c = tp_comm(m);
    if (!c) return 0;
    float mine[16];
    memcpy(mine, out, sizeof mine); /* the 64 hex characters */
    float *all = ln_xmalloc((size_t)c->size * sizeof mine);
    int rc = comm_allgather(c, mine, all, 16, e);
    if (rc == 0) sha256_hex(all, (size_t)c->size * sizeof mine, out);
    free(all);
    return rc ? ln_err_prefix(e, "calibration: hashing the model's %d shards", c->size) : 0;
}

/* ---------------------------------------------------------------- forward with the hook */

/* The installed accumulator (NULL = the host's ln_cov). */
static const ln_cov_accumulator *g_accumulator;

void ln_calibrate_set_accumulator(const ln_cov_accumulator *acc) { g_accumulator = acc; }
const ln_cov_accumulator *ln_calibrate_accumulator(void) { return g_accumulator; }

typedef struct {
    ln_cov *covs;      /* num_layers × LN_NINPUT; .d set where needed, .sum NULL where not on the host */
    const lnb_backend *be; /* synced before a host sum reads X */
    const ln_cov_accumulator *acc;
    void **dev;        /* num_layers × LN_NINPUT sums of acc (NULL where on the host or not needed) */
    float *scratch;    /* max d × max d floats for the fp32 products; NULL = fp64 products */
    int failed;
    ln_err err;
} hook_ctx;

/* Opens covariance i (width d) with the installed accumulator, or on the host when there is none
 * or it cannot (the warning names the layer input and why). */
static int cov_open(hook_ctx *h, int i, int d, ln_err *e) {
    h->covs[i].d = d;
    if (h->acc) {
        ln_err ae = {{0}};
        if ((h->dev[i] = h->acc->open(d, &ae))) return 0;
        ln_log(LN_LOG_WARN, "calibration", "layer %d %s input: %s covariance unavailable, summing on the host: %s",
               i / LN_NINPUT, ln_target_module(INPUT_NAMER[i % LN_NINPUT]), h->acc->name, ae.msg);
    }
    return ln_cov_init(&h->covs[i], d, e);
}

static void calib_hook(int layer, ln_input which, const float *X, int tokens, int d_in, void *ctx) {
    hook_ctx *h = ctx;
    int i = layer * LN_NINPUT + which;
    ln_cov *c = &h->covs[i];
    void *dev = h->dev ? h->dev[i] : NULL;
    if (h->failed || (!c->sum && !dev)) return;
    if (d_in != c->d) {
        h->failed = 1;
        ln_errf(&h->err, "calibration: layer %d input %d has width %d, expected %d", layer, (int)which, d_in, c->d);
        return;
    }
    /* the accumulator queues its sum behind the forward that writes X; a host sum reads X, so the
     * backend's queued calls must have run first */
    int rc = dev ? h->acc->add(dev, X, tokens, &h->err)
                 : ln_backend_sync(h->be, &h->err, "before its sum on the host") ? -1
                 : h->scratch ? ln_cov_add_sample_f32(c, X, tokens, h->scratch, &h->err)
                              : ln_cov_add_sample(c, X, tokens, &h->err);
    if (rc != 0) {
        h->failed = 1;
        ln_err_prefix(&h->err, "calibration: layer %d %s input", layer, ln_target_module(INPUT_NAMER[which]));
    }
}

/* One window's forward-only pass (no labels: no_logits stops after the last layer). */
static int run_forward(ln_model *m, ln_acts *acts, const window *w, ln_input_hook hook, void *ctx, ln_err *e) {
    ln_batch b = {.B = 1, .T = w->len, .ids = (int32_t *)w->ids};
    ln_fwd_opts fo = {.hook = hook, .hook_ctx = ctx, .no_logits = 1};
    return ln_model_forward(m, NULL, acts, &b, &fo, NULL, e);
}

static int calibrate_compute(ln_model *m, const window *win, int64_t count, unsigned need, int fp64,
                             ln_calibration *c, ln_err *e) {
    const int L = m->cfg.num_layers;
    hook_ctx h = {.covs = ln_xcalloc((size_t)L * LN_NINPUT, sizeof(ln_cov)), .be = m->be, .acc = g_accumulator};
    ln_tp_hook tph = {.comm = tp_comm(m), .inner = calib_hook, .inner_ctx = &h, .be = m->be};
    ln_input_hook hook = tph.comm ? ln_tp_calibration_hook : calib_hook;
    void *hook_arg = tph.comm ? (void *)&tph : (void *)&h;
    int rc = -1;
    if (h.acc) h.dev = ln_xcalloc((size_t)L * LN_NINPUT, sizeof *h.dev);
    if (need && !fp64 && !h.acc) {
        int dmax = 0;
        for (int in = 0; in < LN_NINPUT; in++)
            if ((need & (1u << in)) && c->d[in] > dmax) dmax = c->d[in];
        h.scratch = ln_try_allocf((size_t)dmax * dmax, sizeof(float), e, "calibration",
                                  "the fp32 product of a %d-wide layer input", dmax);
        if (!h.scratch) goto out;
    }
    for (int l = 0; l < L; l++)
        for (int in = 0; in < LN_NINPUT; in++)
            if ((need & (1u << in)) && cov_open(&h, l * LN_NINPUT + in, c->d[in], e) != 0) {
                ln_err_prefix(e, "calibration: the sum of layer %d %s input", l, ln_target_module(INPUT_NAMER[in]));
                goto out;
            }
    ln_acts *acts = ln_acts_new();
    double t0 = ln_now_s();
    for (int64_t s = 0; s < count; s++) {
        if (run_forward(m, acts, &win[s], hook, hook_arg, e) != 0) {
            ln_err_prefix(e, "calibration sample %" PRId64, s);
            ln_acts_free(m, acts);
            goto out;
        }
        if (h.failed || tph.failed) {
            *e = h.failed ? h.err : tph.err;
            ln_acts_free(m, acts);
            goto out;
        }
        c->tokens += win[s].len;
    }
    ln_acts_free(m, acts);
    c->samples = count;
    for (int i = 0; i < L * LN_NINPUT; i++) {
        void *dev = h.dev ? h.dev[i] : NULL;
        if (!h.covs[i].sum && !dev) continue;
        int d = h.covs[i].d;
        /* a host sum becomes its covariance in place (ln_cov_finish reads the upper triangle and
         * writes only it and the lower one below it), so the sums and the finished covariances are
         * never held together: the peak is one set */
        if (dev) {
            c->C[i] = ln_try_allocf((size_t)d * d, sizeof(double), e, "calibration",
                                    "the covariance of layer %d %s input (%d x %d fp64)", i / LN_NINPUT,
                                    ln_target_module(INPUT_NAMER[i % LN_NINPUT]), d, d);
            if (!c->C[i]) goto out;
        }
        if (dev ? h.acc->finish(dev, c->C[i], e) : ln_cov_finish(&h.covs[i], h.covs[i].sum, e)) {
            ln_err_prefix(e, "calibration: layer %d %s input", i / LN_NINPUT,
                          ln_target_module(INPUT_NAMER[i % LN_NINPUT]));
            goto out;
        }
        if (!dev) { /* the sum's buffer is the covariance now */
            c->C[i] = h.covs[i].sum;
            h.covs[i].sum = NULL;
        }
        ln_init_share_basis(c->C[i], d);
        if (dev) { /* the device sum is no longer needed: free it as soon as it is fetched */
            h.acc->close(dev);
            h.dev[i] = NULL;
        }
    }
    if (!tph.comm || tph.comm->rank == 0) /* shards: once, from the rank that holds the covariances */
        ln_log(LN_LOG_INFO, "calibration", "samples=%" PRId64 " tokens=%" PRId64 " seconds=%.3f sums=%s", c->samples,
               c->tokens, ln_now_s() - t0, h.acc ? h.acc->name : "host");
    rc = 0;
out:
    for (int i = 0; i < L * LN_NINPUT; i++) {
        ln_cov_free(&h.covs[i]);
        if (h.dev && h.dev[i]) h.acc->close(h.dev[i]);
    }
    free(h.dev);
    free(h.covs);
    free(h.scratch);
    ln_tp_hook_free(&tph);
    return rc;
}

/* ---------------------------------------------------------------- file */

int ln_calibration_save(const ln_calibration *c, const char *path, ln_err *e) {
    st_writer *w = st_writer_new();
    char name[160], buf[64];
    char (*names)[160] = ln_xcalloc((size_t)c->num_layers * LN_NINPUT, sizeof *names);
    int any = 0;
    for (int l = 0; l < c->num_layers; l++)
        for (int in = 0; in < LN_NINPUT; in++) {
            const double *C = c->C[l * LN_NINPUT + in];
            if (!C) continue;
            cov_name(name, sizeof name, l, (ln_input)in);
            memcpy(names[l * LN_NINPUT + in], name, sizeof name);
            int64_t shape[2] = {c->d[in], c->d[in]};
            st_writer_add(w, names[l * LN_NINPUT + in], ST_F64, 2, shape, C);
            any = 1;
        }
    st_writer_meta(w, "format", "loranull-covariance-v1");
    snprintf(buf, sizeof buf, "%" PRId64, c->samples);
    st_writer_meta(w, "samples", buf);
    snprintf(buf, sizeof buf, "%" PRId64, c->tokens);
    st_writer_meta(w, "tokens", buf);
    snprintf(buf, sizeof buf, "%d", c->max_length);
    st_writer_meta(w, "max_length", buf);
    snprintf(buf, sizeof buf, "%" PRIu64, c->seed);
    st_writer_meta(w, "seed", buf);
    st_writer_meta(w, "model_sha256", c->model_sha256);
    st_writer_meta(w, "data_sha256", c->data_sha256);
    int rc = any ? st_writer_write(w, path, e) : ln_errf(e, "%s: no covariance to save", path);
    st_writer_free(w);
    free(names);
    return rc;
}

int ln_calibration_load(const char *path, const ln_config *cfg, ln_calibration **out, ln_err *e) {
    st_set *s = NULL;
    if (st_open(path, &s, e) != 0) return -1;
    ln_calibration *c = calib_new(cfg);
    char name[160];
    int found = 0;
    for (int l = 0; l < c->num_layers; l++)
        for (int in = 0; in < LN_NINPUT; in++) {
            cov_name(name, sizeof name, l, (ln_input)in);
            const st_tensor *t = st_find(s, name);
            if (!t) continue;
            int d = c->d[in];
            if (t->ndim != 2 || t->shape[0] != d || t->shape[1] != d) {
                ln_errf(e, "%s: tensor %s must be %d x %d (the model's d_in), got a %d-d tensor of %" PRId64 " values",
                        path, name, d, d, t->ndim, t->numel);
                goto fail;
            }
            double *C = ln_try_alloc((size_t)d * d * sizeof(double), "covariance", e);
            if (!C) goto fail;
            c->C[l * LN_NINPUT + in] = C;
            ln_init_share_basis(C, d);
            if (t->dtype == ST_F64) {
                memcpy(C, t->data, (size_t)d * d * sizeof(double));
            } else {
                float *f = ln_try_alloc((size_t)d * d * sizeof(float), "covariance", e);
                if (!f) goto fail;
                if (st_to_f32(t, f, t->numel, e) != 0) {
                    free(f);
                    ln_err_prefix(e, "%s", path);
                    goto fail;
                }
                for (size_t i = 0; i < (size_t)d * d; i++) C[i] = f[i];
                free(f);
            }
            found++;
        }
    if (!found) {
        ln_errf(e, "%s: no covariance tensors named like model.layers.0.self_attn.q_proj for this model", path);
        goto fail;
    }
    const char *v;
    if ((v = st_metadata(s, "samples"))) c->samples = strtoll(v, NULL, 10);
    if ((v = st_metadata(s, "tokens"))) c->tokens = strtoll(v, NULL, 10);
    if ((v = st_metadata(s, "max_length"))) c->max_length = atoi(v);
    if ((v = st_metadata(s, "seed"))) c->seed = strtoull(v, NULL, 10);
    if ((v = st_metadata(s, "model_sha256"))) snprintf(c->model_sha256, sizeof c->model_sha256, "%s", v);
    if ((v = st_metadata(s, "data_sha256"))) snprintf(c->data_sha256, sizeof c->data_sha256, "%s", v);
    st_close(s);
    *out = c;
    return 0;
fail:
    st_close(s);
    ln_calibration_free(c);
    return -1;
}

/* ---------------------------------------------------------------- entry points */

static char *cache_path(const ln_calib_opts *o, const char *key) {
    const char *dir = o->cache_dir;
    char *own = NULL;
    if (!dir) dir = getenv("LORANULL_CACHE_DIR");
    if (!dir || !*dir) {
        if (o->cache_dir && !*o->cache_dir) return NULL;
        const char *home = getenv("HOME");
        if (!home || !*home) return NULL;
        own = ln_path_join(home, ".cache/loranull/calibration");
        dir = own;
    }
    char file[80];
    snprintf(file, sizeof file, "%s.safetensors", key);
    char *p = ln_path_join(dir, file);
    free(own);
    return p;
}

int ln_calibrate(ln_model *m, const ln_tokenizer *tok, const ln_calib_opts *o, ln_calibration **out, ln_err *e) {
    int samples = o->samples > 0 ? o->samples : LN_CALIB_DEFAULT_SAMPLES;
    int max_length = o->max_length > 0 ? o->max_length : LN_CALIB_DEFAULT_MAX_LENGTH;
    unsigned targets = o->targets ? o->targets : LN_TARGETS_ALL;
    char model_hash[65], data_hash[65], key[65], keytext[256];
    int fp64 = o->fp64 || g_accumulator; /* an installed accumulator's products are fp64 */
    if (file_hash(o->path, data_hash, e) != 0) return -1;
    ln_comm *tp = tp_comm(m);
    int rank0 = !tp || tp->rank == 0;
    ln_config whole;
    tp_whole_config(m, &whole);
    if (tp_model_hash(m, model_hash, e) != 0) return -1;
    snprintf(keytext, sizeof keytext, "model=%s data=%s samples=%d max_length=%d seed=%" PRIu64 " inputs=%u fp64=%d",
             model_hash, data_hash, samples, max_length, o->seed, inputs_needed(targets), fp64);
    sha256_hex(keytext, strlen(keytext), key);
    char *cpath = cache_path(o, key);
    ln_calibration *hit = NULL;
    if (cpath && rank0 && ln_file_exists(cpath)) {
        ln_err ce;
        if (ln_calibration_load(cpath, &whole, &hit, &ce) == 0)
            ln_log(LN_LOG_INFO, "calibration", "cache hit %s", cpath);
        else
            ln_log(LN_LOG_WARN, "calibration", "ignoring unreadable cache %s: %s", cpath, ce.msg);
    }
    float found = hit != NULL; /* on shards: rank 0's finding, on every rank */
    if (tp && comm_broadcast(tp, &found, 1, 0, e) != 0) {
        ln_calibration_free(hit);
        free(cpath);
        return ln_err_prefix(e, "calibration: agreeing on the cache");
    }
    if (found != 0.0f) {
        if (!hit) hit = calib_new(&whole);
        hit->from_cache = 1;
        free(cpath);
        *out = hit;
        return 0;
    }
    sample_set ss;
    ln_calib_opts oo = *o;
    oo.samples = samples;
    oo.max_length = max_length;
    if (load_windows(tok, &oo, &ss, e) != 0) {
        free(cpath);
        return -1;
    }
    ln_calibration *c = calib_new(&whole);
    c->max_length = max_length;
    c->seed = o->seed;
    memcpy(c->model_sha256, model_hash, sizeof model_hash);
    memcpy(c->data_sha256, data_hash, sizeof data_hash);
    int rc = calibrate_compute(m, ss.win, ss.count, rank0 ? inputs_needed(targets) : 0, o->fp64, c, e);
    sample_set_free(&ss);
    /* a device whose forward kernels failed summed garbage: no covariances (nor a cache) from it */
    if (rc == 0) rc = ln_model_check_device(m, e, "during calibration");
    if (rc != 0) {
        ln_calibration_free(c);
        free(cpath);
        return -1;
    }
    if (cpath && rank0) {
        ln_err ce;
        char *slash = strrchr(cpath, '/');
        if (slash) *slash = 0;
        int ok = ln_mkdir_p(cpath, &ce) == 0;
        if (slash) *slash = '/';
        if (!ok || ln_calibration_save(c, cpath, &ce) != 0)
            ln_log(LN_LOG_WARN, "calibration", "could not write the cache %s: %s", cpath, ce.msg);
    }
    free(cpath);
    *out = c;
    return 0;
}

int ln_calibration_bench(ln_model *m, const ln_tokenizer *tok, const ln_calib_opts *o, double *calib_tps,
                         double *forward_tps, ln_err *e) {
    sample_set ss;
    int64_t tokens = 0;
    if (load_windows(tok, o, &ss, e) != 0) return -1;
    for (int64_t s = 0; s < ss.count; s++) tokens += ss.win[s].len;
    int rc = -1;
    if (forward_tps) {
        ln_acts *acts = ln_acts_new();
        double t0 = ln_now_s();
        for (int64_t s = 0; s < ss.count; s++)
            if (run_forward(m, acts, &ss.win[s], NULL, NULL, e) != 0) {
                ln_acts_free(m, acts);
                goto out;
            }
        *forward_tps = (double)tokens / (ln_now_s() - t0);
        ln_acts_free(m, acts);
    }
    if (calib_tps) {
        ln_calibration *c = calib_new(&m->cfg);
        double t0 = ln_now_s();
        int r = calibrate_compute(m, ss.win, ss.count, inputs_needed(o->targets ? o->targets : LN_TARGETS_ALL), o->fp64,
                                  c, e);
        double dt = ln_now_s() - t0;
        ln_calibration_free(c);
        if (r != 0) goto out;
        *calib_tps = (double)tokens / dt;
    }
    rc = 0;
out:
    sample_set_free(&ss);
    return rc;
}
