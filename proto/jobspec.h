/* jobspec.h — the one parser and validator of a fine-tuning job spec.
 *
 * The server validates POST /v1/fine_tuning/jobs bodies with it, the worker reads the normalised
 * spec it gets with a lease, and the CLI reads a job file with it — so all three agree on every
 * default and every limit. Shape (OpenAI's job create body plus loranull's fields):
 *
 *   {"model": "llama-3.2-1b", "training_file": "file-…", "validation_file": "file-…"|null,
 *    "seed": 42, "suffix": "my-run", "metadata": {"k": "v"},
 *    "method": {"type": "supervised", "supervised": {"hyperparameters": {
 *        "n_epochs": 3|"auto", "batch_size": 8|"auto", "learning_rate_multiplier": 1.0|"auto"}}},
 *    "hyperparameters": {… the same three, legacy place, plus loranull's extras:
 *        learning_rate, warmup_ratio, max_seq_len, grad_accum, weight_decay, max_grad_norm,
 *        eval_interval, save_interval},
 *    "adapter": {"type": "lora_null_v2", "rank": 8, "alpha": 8, "target_modules": ["q_proj",…],
 *                "calibration": {"file": "file-…", "samples": 256, "max_length": 1024}},
 *    "resources": {"ranks": 1, "device": "any"|"cpu"|"cuda"},
 *    "data": {"overlong": "truncate"|"reject", "chat_template": "auto"|"llama3"|"llama2",
 *             "pack": false|true|N}}
 *
 * Unknown fields are refused (a typo must not silently fall back to a default). A failure fills
 * `param` with the dotted path of the field at fault ("adapter.rank") and e with a sentence.
 * "auto" is resolved here, so the normalised spec has only concrete values. File ids are checked
 * for shape only; the server checks that they exist. */
#ifndef LN_JOBSPEC_H
#define LN_JOBSPEC_H

#include <stdint.h>

#include <jansson.h>

#include "common/err.h"

#define LN_JOBSPEC_PARAM_MAX 96
#define LN_JOBSPEC_MAX_TARGETS 7

typedef enum {
    LN_ADAPTER_LORA, LN_ADAPTER_PISSA, LN_ADAPTER_MILORA, LN_ADAPTER_CORDA, LN_ADAPTER_LORA_FA,
    LN_ADAPTER_LORA_NULL_V1, LN_ADAPTER_LORA_NULL_V2, LN_ADAPTER_FULL, LN_ADAPTER_COUNT
} ln_adapter_type;

typedef enum { LN_DEVICE_ANY, LN_DEVICE_CPU, LN_DEVICE_CUDA } ln_device_kind;

/* Defaults (documented in proto/openapi.yaml; change both together). */
#define LN_DEFAULT_N_EPOCHS 3
#define LN_DEFAULT_BATCH_SIZE 8
#define LN_DEFAULT_BASE_LR 2e-4        /* learning_rate = LN_DEFAULT_BASE_LR * multiplier */
#define LN_MAX_LR_MULTIPLIER 1000.0   /* learning_rate_multiplier in (0, 1000] */
#define LN_MAX_LR (LN_DEFAULT_BASE_LR * LN_MAX_LR_MULTIPLIER) /* learning_rate in (0, 0.2] */
#define LN_DEFAULT_RANK 8
#define LN_DEFAULT_CALIB_SAMPLES 256
#define LN_DEFAULT_CALIB_MAX_LEN 1024

typedef struct ln_hparams {
    int n_epochs;                  /* 1..1000 */
    int batch_size;                /* 1..65536 */
    double learning_rate_multiplier;
    double learning_rate;          /* effective: explicit (0, LN_MAX_LR], or base * multiplier */
    double warmup_ratio;           /* 0..1, default 0.03 */
    int max_seq_len;               /* 1..1048576, default 2048 */
    int grad_accum;                /* 1..65536, default 1 */
    double weight_decay;           /* >= 0, default 0 */
    double max_grad_norm;          /* > 0, default 1.0 (0 = no clipping) */
    int eval_interval;             /* steps, 0 = only at the end; default 0 */
    int save_interval;             /* steps, 0 = only at the end; default 0 */
} ln_hparams;

typedef struct ln_jobspec_adapter {
    ln_adapter_type type;          /* default lora_null_v2 */
    int rank;                      /* 1..4096 (ignored for full) */
    double alpha;                  /* default = rank (scale 1) */
    int n_targets;
    char targets[LN_JOBSPEC_MAX_TARGETS][16];  /* "q_proj" … "down_proj", in canonical order */
    char calibration_file[72];     /* "" = calibrate on the training file */
    int calibration_samples;       /* 1..1000000 */
    int calibration_max_length;    /* 1..1048576 */
} ln_jobspec_adapter;

/* How the training data becomes rows (the engine's ln_data_opts and ln_train_opts.pack). */
typedef struct ln_jobspec_data {
    int reject_overlong;           /* "overlong": 0 = "truncate" an example to max_seq_len (default),
                                    * 1 = "reject": an example longer than max_seq_len fails the job */
    char chat_template[8];         /* "auto" (from the model's tokenizer, default), "llama3", "llama2" */
    int pack;                      /* 0 = no packing (default); N = pack whole examples into rows of N
                                    * tokens. Input true means N = hyperparameters.max_seq_len. */
} ln_jobspec_data;

/* A parsed spec. Owns metadata (a JSON object or NULL): free with ln_jobspec_free. */
typedef struct ln_jobspec {
    char model[257];
    char training_file[72];
    char validation_file[72];      /* "" = none */
    int64_t seed;                  /* -1 = not given (the server then picks one) */
    char suffix[65];               /* "" = none */
    json_t *metadata;
    ln_hparams hp;
    ln_jobspec_adapter adapter;
    int ranks;                     /* 1..64 */
    ln_device_kind device;
    ln_jobspec_data data;
} ln_jobspec;

/* Parses and validates a job spec object. On failure returns -1, fills e and param. */
int ln_jobspec_parse(const json_t *obj, ln_jobspec *spec, char param[LN_JOBSPEC_PARAM_MAX], ln_err *e);
/* Same from JSON text (what the worker and CLI hold). */
int ln_jobspec_parse_text(const char *text, size_t len, ln_jobspec *spec, char param[LN_JOBSPEC_PARAM_MAX],
                          ln_err *e);
/* The normalised spec as JSON (every default filled in); a new reference owned by the caller.
 * Parsing it again yields the same spec. */
json_t *ln_jobspec_to_json(const ln_jobspec *spec);
void ln_jobspec_free(ln_jobspec *spec);

const char *ln_adapter_type_name(ln_adapter_type t);
const char *ln_device_kind_name(ln_device_kind d);
/* 1 if id looks like "file-" followed by 1..64 of [A-Za-z0-9_-]. */
int ln_jobspec_valid_file_id(const char *id);

#endif
