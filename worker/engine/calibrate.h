/* calibrate.h — calibration: run the base model over samples of "knowledge" text and accumulate,
 * for every distinct linear-layer input, C = Σ_s X̂_sᵀ X̂_s / n with X̂_s = X_s / |max X_s|
 * (nullspace.h). A LLaMA layer has 4 distinct inputs (ln_input): q,k,v share one C and gate,up
 * share one — so 4 covariances per layer, each computed and decomposed once.
 *
 * Samples (the reference recipe — CorDA's / LoRA-Null's get_calib_data — seeded): the JSONL file is
 * read with the engine's data loader (any format data.h reads; every line validated), its examples
 * are joined into one token stream in file order, and `samples` windows of max_length tokens are
 * taken at seeded random offsets (with replacement); a stream no longer than max_length is one
 * sample. Offsets: splitmix64 seeded with seed ^ 0x63616C6962726174, each drawn uniformly (by
 * rejection) from [0, total − max_length]. One forward per window (batch 1, no padding), so the
 * scale 1/|max X_s| is per sample as the reference's is.
 *
 * File (`loranull covariance`, and the cache): safetensors, one F64 d_in × d_in tensor per
 * distinct input, named after the first target module that reads it:
 *   model.layers.{l}.self_attn.q_proj  (q,k,v)     model.layers.{l}.self_attn.o_proj
 *   model.layers.{l}.mlp.gate_proj     (gate,up)   model.layers.{l}.mlp.down_proj
 * with metadata format=loranull-covariance-v1, samples, tokens, max_length, seed, model_sha256,
 * data_sha256.
 *
 * Cache: keyed by sha256(model content hash, calibration file hash, samples, max_length, seed,
 * inputs, precision);
 * a second job on the same model and data loads the file instead of calibrating.
 *
 * Ownership: an ln_calibration owns its covariances. */
#ifndef LN_CALIBRATE_H
#define LN_CALIBRATE_H

#include <stdint.h>

#include "common/err.h"
#include "worker/engine/model.h"

typedef struct ln_tokenizer ln_tokenizer;

typedef struct ln_calibration {
    int num_layers;
    int d[LN_NINPUT];      /* d_in of each input kind */
    double **C;            /* num_layers × LN_NINPUT, each d × d (full symmetric) or NULL when
                            * no targeted module reads that input */
    int64_t samples, tokens;
    int max_length;
    uint64_t seed;
    char model_sha256[65], data_sha256[65];
    int from_cache;        /* 1 when loaded from the cache instead of computed */
} ln_calibration;

typedef struct ln_calib_opts {
    const char *path;        /* JSONL calibration file */
    int samples;             /* 0 = 256 */
    int max_length;          /* 0 = 1024 */
    uint64_t seed;
    unsigned targets;        /* 0 = all seven; inputs no target reads are skipped */
    const char *cache_dir;   /* NULL = $LORANULL_CACHE_DIR or ~/.cache/loranull/calibration;
                              * "" = no cache */
    const char *chat_template; /* for chat-format files; NULL = the tokenizer's */
    int fp64;                /* 1: every product in fp64 (ln_cov_add_sample); 0 (default): each
                              * sample's XᵀX in fp32, summed over samples in fp64 — half the cost */
} ln_calib_opts;

#define LN_CALIB_DEFAULT_SAMPLES 256
#define LN_CALIB_DEFAULT_MAX_LENGTH 1024

/* Where the covariance sums accumulate. None installed (the default): on the host (ln_cov,
 * nullspace.h), each layer input read through the host. A GPU job installs the CUDA backend's
 * (worker/backend/select.h installs it when "cuda" is selected): DSYRK in fp64 on the device, the
 * activations never leave it, and the sums are fetched to host memory once, when the last sample
 * is in. Its products are fp64, so its results are keyed in the cache as ln_calib_opts.fp64 = 1.
 * A covariance the accumulator cannot open (device memory) falls back to the host, with a warning.
 * Process-wide, like ln_nullspace_set_basis_solver; NULL restores the host path. */
typedef struct ln_cov_accumulator {
    const char *name;                                     /* for the log: "cuda" */
    /* A zeroed running sum of a d-wide input's scaled second moments; NULL with e set on failure. */
    void *(*open)(int d, ln_err *e);
    /* Adds one sample X (tokens × d fp32, in the model backend's memory), scaled by 1/|max X| as
     * ln_cov_add_sample does, with the same errors (non-finite, maximum 0). */
    int (*add)(void *sum, const float *X, int tokens, ln_err *e);
    /* C = sum / samples as a full symmetric d × d fp64 matrix in host memory. */
    int (*finish)(void *sum, double *C, ln_err *e);
    void (*close)(void *sum);
} ln_cov_accumulator;
void ln_calibrate_set_accumulator(const ln_cov_accumulator *acc);
const ln_cov_accumulator *ln_calibrate_accumulator(void);

/* Calibrates m (the base model, no adapter) on o->path, or loads the cached result. tok may be
 * NULL when every line is pre-tokenized. On a tensor-parallel shard (m->comm of 2+ ranks) it is
 * collective: every rank calls it, and rank 0 gets the whole model's covariances (the others an
 * ln_calibration holding none); the cache is keyed by the ranks' shard hashes. */
int ln_calibrate(ln_model *m, const ln_tokenizer *tok, const ln_calib_opts *o, ln_calibration **out,
                 ln_err *e);
void ln_calibration_free(ln_calibration *c);

/* The covariance target t of layer l reads (NULL if not computed). */
const double *ln_calibration_cov(const ln_calibration *c, int layer, ln_target t);

/* The same as an ln_covariance_fn (adapter.h) with ctx = the ln_calibration: pass it and the
 * calibration as ln_adapter_opts.covariance / .method_ctx. */
const double *ln_calibration_covariance(void *ctx, int layer, ln_input which);

/* Writes / reads the file format above. Load checks every tensor's name and shape against the
 * model config and names the one at fault. */
int ln_calibration_save(const ln_calibration *c, const char *path, ln_err *e);
int ln_calibration_load(const char *path, const ln_config *cfg, ln_calibration **out, ln_err *e);

/* SHA-256 of a model's weights as loaded (names and fp32 values, in the model's fixed order):
 * the same for a single-file and a sharded copy of one checkpoint. */
int ln_calibration_model_hash(ln_model *m, char out[65], ln_err *e);

/* The calibration forward's throughput helper for the bench: tokens/s of calibration and of a
 * plain forward over the same windows (no cache). Either pointer may be NULL. */
int ln_calibration_bench(ln_model *m, const ln_tokenizer *tok, const ln_calib_opts *o, double *calib_tps,
                         double *forward_tps, ln_err *e);

#endif
