/* jobspec.c — parse, validate and normalise a job spec (see jobspec.h for the shape). */
#include "proto/jobspec.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---------------------------------------------------------------- names */

static const char *adapter_names[LN_ADAPTER_COUNT] = {
    "lora", "pissa", "milora", "corda", "lora_fa", "lora_null_v1", "lora_null_v2", "full"};

/* Canonical order of the LLaMA linear layers an adapter may target (never lm_head). */
static const char *target_names[LN_JOBSPEC_MAX_TARGETS] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

const char *ln_adapter_type_name(ln_adapter_type t) {
    return (t >= 0 && t < LN_ADAPTER_COUNT) ? adapter_names[t] : "?";
}

const char *ln_device_kind_name(ln_device_kind d) {
    return d == LN_DEVICE_CPU ? "cpu" : d == LN_DEVICE_CUDA ? "cuda" : "any";
}

int ln_jobspec_valid_file_id(const char *id) {
    if (strncmp(id, "file-", 5) != 0) return 0;
    size_t n = strlen(id + 5);
    if (n < 1 || n > 64) return 0;
    for (const char *p = id + 5; *p; p++) {
        char c = *p;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------- field helpers
 * Each returns 0 or -1 with param/e filled; `path` is the dotted name of the field. */

static int fail(char *param, ln_err *e, const char *path, const char *fmt, const char *detail) {
    snprintf(param, LN_JOBSPEC_PARAM_MAX, "%s", path);
    char msg[512];
    snprintf(msg, sizeof msg, fmt, detail);
    return ln_errf(e, "%s: %s", path, msg);
}

static int check_keys(const json_t *obj, const char *const *allowed, const char *prefix, char *param, ln_err *e) {
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)obj, k, v) {
        int ok = 0;
        for (int i = 0; allowed[i]; i++)
            if (strcmp(k, allowed[i]) == 0) ok = 1;
        if (!ok) {
            char path[LN_JOBSPEC_PARAM_MAX];
            snprintf(path, sizeof path, "%s%s", prefix, k);
            return fail(param, e, path, "unknown field%s", "");
        }
    }
    return 0;
}

/* Reads an integer in [lo, hi]; "auto" allowed when auto_val is not NULL (writes the default). */
static int get_int(const json_t *obj, const char *key, const char *path, int64_t lo, int64_t hi, int64_t def,
                   int allow_auto, int64_t *out, char *param, ln_err *e) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) { *out = def; return 0; }
    if (allow_auto && json_is_string(v) && strcmp(json_string_value(v), "auto") == 0) { *out = def; return 0; }
    int64_t x;
    if (json_is_integer(v)) x = json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) && fabs(json_real_value(v)) < 9e15)
        x = (int64_t)json_real_value(v);
    else return fail(param, e, path, "must be an integer%s", allow_auto ? " or \"auto\"" : "");
    if (x < lo || x > hi) {
        char d[96];
        snprintf(d, sizeof d, "%lld..%lld (got %lld)", (long long)lo, (long long)hi, (long long)x);
        return fail(param, e, path, "must be in %s", d);
    }
    *out = x;
    return 0;
}

static int get_num(const json_t *obj, const char *key, const char *path, double lo, double hi, int lo_open,
                   double def, int allow_auto, double *out, char *param, ln_err *e) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) { *out = def; return 0; }
    if (allow_auto && json_is_string(v) && strcmp(json_string_value(v), "auto") == 0) { *out = def; return 0; }
    if (!json_is_number(v)) return fail(param, e, path, "must be a number%s", allow_auto ? " or \"auto\"" : "");
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > hi || (lo_open && x == lo)) {
        char d[96];
        snprintf(d, sizeof d, "%s%g, %g] (got %g)", lo_open ? "(" : "[", lo, hi, x);
        return fail(param, e, path, "must be in %s", d);
    }
    *out = x;
    return 0;
}

/* Copies an optional string; charset check when `ident` (letters, digits, and ._-:/ ). */
static int get_str(const json_t *obj, const char *key, const char *path, int required, size_t maxlen, int ident,
                   char *out, size_t cap, char *param, ln_err *e) {
    json_t *v = json_object_get(obj, key);
    out[0] = 0;
    if (!v || json_is_null(v)) {
        if (required) return fail(param, e, path, "is required%s", "");
        return 0;
    }
    if (!json_is_string(v)) return fail(param, e, path, "must be a string%s", "");
    const char *s = json_string_value(v);
    size_t n = strlen(s);
    if (n == 0) return fail(param, e, path, "must not be empty%s", "");
    if (n > maxlen || n >= cap) {
        char d[32];
        snprintf(d, sizeof d, "%zu", maxlen);
        return fail(param, e, path, "is longer than %s characters", d);
    }
    if (ident) {
        for (const char *p = s; *p; p++) {
            char c = *p;
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
                  c == '-' || (ident == 2 && (c == ':' || c == '/'))))
                return fail(param, e, path, "may hold only letters, digits and . _ -%s",
                            ident == 2 ? " : /" : "");
        }
    }
    memcpy(out, s, n + 1);
    return 0;
}

static int get_file_id(const json_t *obj, const char *key, const char *path, int required, char *out, size_t cap,
                       char *param, ln_err *e) {
    if (get_str(obj, key, path, required, 69, 0, out, cap, param, e) != 0) return -1;
    if (out[0] && !ln_jobspec_valid_file_id(out)) return fail(param, e, path, "is not a file id (file-…)%s", "");
    return 0;
}

static int get_object(const json_t *obj, const char *key, const char *path, json_t **out, char *param, ln_err *e) {
    json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_object(v)) return fail(param, e, path, "must be an object%s", "");
    *out = v;
    return 0;
}

/* ---------------------------------------------------------------- sections */

/* The three OpenAI hyperparameters (plus, where `extras`, loranull's) from one object. */
static const char *const hp_openai_keys[] = {"n_epochs", "batch_size", "learning_rate_multiplier", NULL};
static const char *const hp_all_keys[] = {"n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate",
                                          "warmup_ratio", "max_seq_len", "grad_accum", "weight_decay",
                                          "max_grad_norm", "eval_interval", "save_interval", NULL};

static int parse_hparams(const json_t *h, const char *prefix, int extras, ln_hparams *hp, int *lr_given,
                         char *param, ln_err *e) {
    char p[LN_JOBSPEC_PARAM_MAX];
    if (check_keys(h, extras ? hp_all_keys : hp_openai_keys, prefix, param, e) != 0) return -1;
    int64_t x;
#define P(name) (snprintf(p, sizeof p, "%s%s", prefix, name), p)
    if (json_object_get(h, "n_epochs")) {
        if (get_int(h, "n_epochs", P("n_epochs"), 1, 1000, LN_DEFAULT_N_EPOCHS, 1, &x, param, e)) return -1;
        hp->n_epochs = (int)x;
    }
    if (json_object_get(h, "batch_size")) {
        if (get_int(h, "batch_size", P("batch_size"), 1, 65536, LN_DEFAULT_BATCH_SIZE, 1, &x, param, e)) return -1;
        hp->batch_size = (int)x;
    }
    if (json_object_get(h, "learning_rate_multiplier")) {
        if (get_num(h, "learning_rate_multiplier", P("learning_rate_multiplier"), 0, LN_MAX_LR_MULTIPLIER, 1, 1.0, 1,
                    &hp->learning_rate_multiplier, param, e))
            return -1;
    }
    if (!extras) return 0;
    if (json_object_get(h, "learning_rate") && !json_is_null(json_object_get(h, "learning_rate"))) {
        if (get_num(h, "learning_rate", P("learning_rate"), 0, LN_MAX_LR, 1, 0, 0, &hp->learning_rate, param, e))
            return -1;
        *lr_given = 1;
    }
    if (get_num(h, "warmup_ratio", P("warmup_ratio"), 0, 1, 0, hp->warmup_ratio, 0, &hp->warmup_ratio, param, e))
        return -1;
    if (get_int(h, "max_seq_len", P("max_seq_len"), 1, 1 << 20, hp->max_seq_len, 0, &x, param, e)) return -1;
    hp->max_seq_len = (int)x;
    if (get_int(h, "grad_accum", P("grad_accum"), 1, 65536, hp->grad_accum, 0, &x, param, e)) return -1;
    hp->grad_accum = (int)x;
    if (get_num(h, "weight_decay", P("weight_decay"), 0, 100, 0, hp->weight_decay, 0, &hp->weight_decay, param, e))
        return -1;
    if (get_num(h, "max_grad_norm", P("max_grad_norm"), 0, 1e6, 0, hp->max_grad_norm, 0, &hp->max_grad_norm, param,
                e))
        return -1;
    if (get_int(h, "eval_interval", P("eval_interval"), 0, 1 << 30, hp->eval_interval, 0, &x, param, e)) return -1;
    hp->eval_interval = (int)x;
    if (get_int(h, "save_interval", P("save_interval"), 0, 1 << 30, hp->save_interval, 0, &x, param, e)) return -1;
    hp->save_interval = (int)x;
#undef P
    return 0;
}

static int parse_method(const json_t *m, ln_hparams *hp, char *param, ln_err *e) {
    static const char *const keys[] = {"type", "supervised", NULL};
    if (check_keys(m, keys, "method.", param, e) != 0) return -1;
    char type[32];
    if (get_str(m, "type", "method.type", 1, 31, 1, type, sizeof type, param, e) != 0) return -1;
    if (strcmp(type, "supervised") != 0)
        return fail(param, e, "method.type", "\"%s\" is not supported; loranull trains \"supervised\" only", type);
    json_t *sup, *h;
    if (get_object(m, "supervised", "method.supervised", &sup, param, e) != 0) return -1;
    if (!sup) return 0;
    static const char *const skeys[] = {"hyperparameters", NULL};
    if (check_keys(sup, skeys, "method.supervised.", param, e) != 0) return -1;
    if (get_object(sup, "hyperparameters", "method.supervised.hyperparameters", &h, param, e) != 0) return -1;
    if (!h) return 0;
    return parse_hparams(h, "method.supervised.hyperparameters.", 0, hp, NULL, param, e);
}

static int parse_targets(const json_t *arr, ln_jobspec_adapter *a, char *param, ln_err *e) {
    if (!json_is_array(arr) || json_array_size(arr) == 0)
        return fail(param, e, "adapter.target_modules", "must be a non-empty array of layer names%s", "");
    int chosen[LN_JOBSPEC_MAX_TARGETS] = {0};
    size_t i;
    json_t *v;
    json_array_foreach(arr, i, v) {
        char path[LN_JOBSPEC_PARAM_MAX];
        snprintf(path, sizeof path, "adapter.target_modules[%zu]", i);
        if (!json_is_string(v)) return fail(param, e, path, "must be a string%s", "");
        const char *s = json_string_value(v);
        int found = -1;
        for (int t = 0; t < LN_JOBSPEC_MAX_TARGETS; t++) {
            size_t short_len = strlen(target_names[t]) - 5; /* "q" of "q_proj", "gate" of "gate_proj" */
            if (strcmp(s, target_names[t]) == 0 || (strlen(s) == short_len && strncmp(s, target_names[t], short_len) == 0))
                found = t;
        }
        if (found < 0)
            return fail(param, e, path,
                        "\"%s\" is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj", s);
        chosen[found] = 1;
    }
    a->n_targets = 0;
    for (int t = 0; t < LN_JOBSPEC_MAX_TARGETS; t++)
        if (chosen[t]) snprintf(a->targets[a->n_targets++], sizeof a->targets[0], "%s", target_names[t]);
    return 0;
}

static int parse_adapter(const json_t *a, ln_jobspec_adapter *ad, char *param, ln_err *e) {
    static const char *const keys[] = {"type", "rank", "alpha", "target_modules", "calibration", NULL};
    if (check_keys(a, keys, "adapter.", param, e) != 0) return -1;
    char type[32];
    if (get_str(a, "type", "adapter.type", 0, 31, 1, type, sizeof type, param, e) != 0) return -1;
    if (type[0]) {
        int found = -1;
        for (int t = 0; t < LN_ADAPTER_COUNT; t++)
            if (strcmp(type, adapter_names[t]) == 0) found = t;
        if (found < 0)
            return fail(param, e, "adapter.type",
                        "\"%s\" is not one of lora, pissa, milora, corda, lora_fa, lora_null_v1, lora_null_v2, full",
                        type);
        ad->type = (ln_adapter_type)found;
    }
    int64_t x;
    if (get_int(a, "rank", "adapter.rank", 1, 4096, ad->rank, 0, &x, param, e) != 0) return -1;
    ad->rank = (int)x;
    ad->alpha = ad->rank;
    if (get_num(a, "alpha", "adapter.alpha", 0, 1e6, 1, ad->alpha, 0, &ad->alpha, param, e) != 0) return -1;
    json_t *t = json_object_get(a, "target_modules");
    if (t && !json_is_null(t) && parse_targets(t, ad, param, e) != 0) return -1;
    json_t *c;
    if (get_object(a, "calibration", "adapter.calibration", &c, param, e) != 0) return -1;
    if (c) {
        static const char *const ckeys[] = {"file", "samples", "max_length", NULL};
        if (check_keys(c, ckeys, "adapter.calibration.", param, e) != 0) return -1;
        if (get_file_id(c, "file", "adapter.calibration.file", 0, ad->calibration_file, sizeof ad->calibration_file,
                        param, e) != 0)
            return -1;
        if (get_int(c, "samples", "adapter.calibration.samples", 1, 1000000, ad->calibration_samples, 0, &x, param, e))
            return -1;
        ad->calibration_samples = (int)x;
        if (get_int(c, "max_length", "adapter.calibration.max_length", 1, 1 << 20, ad->calibration_max_length, 0, &x,
                    param, e))
            return -1;
        ad->calibration_max_length = (int)x;
    }
    return 0;
}

/* "data": {"overlong", "chat_template", "pack"}; pack true needs max_seq_len, so hp is parsed first. */
static int parse_data(const json_t *d, const ln_hparams *hp, ln_jobspec_data *out, char *param, ln_err *e) {
    static const char *const keys[] = {"overlong", "chat_template", "pack", NULL};
    if (check_keys(d, keys, "data.", param, e) != 0) return -1;
    char v[16];
    if (get_str(d, "overlong", "data.overlong", 0, 15, 1, v, sizeof v, param, e) != 0) return -1;
    if (v[0]) {
        if (strcmp(v, "truncate") == 0) out->reject_overlong = 0;
        else if (strcmp(v, "reject") == 0) out->reject_overlong = 1;
        else return fail(param, e, "data.overlong", "\"%s\" is not one of truncate, reject", v);
    }
    if (get_str(d, "chat_template", "data.chat_template", 0, 15, 1, v, sizeof v, param, e) != 0) return -1;
    if (v[0]) {
        if (strcmp(v, "auto") != 0 && strcmp(v, "llama3") != 0 && strcmp(v, "llama2") != 0)
            return fail(param, e, "data.chat_template", "\"%s\" is not one of auto, llama3, llama2", v);
        memcpy(out->chat_template, v, strlen(v) + 1); /* one of three names, ≤ 6 characters */
    }
    json_t *p = json_object_get(d, "pack");
    if (json_is_boolean(p)) {
        out->pack = json_is_true(p) ? hp->max_seq_len : 0;
    } else if (p && !json_is_null(p)) {
        if (!json_is_number(p)) return fail(param, e, "data.pack", "must be true, false or a row length in tokens%s", "");
        int64_t x;
        if (get_int(d, "pack", "data.pack", 0, 1 << 20, 0, 0, &x, param, e) != 0) return -1;
        out->pack = (int)x;
    }
    return 0;
}

static int parse_metadata(const json_t *m, json_t **out, char *param, ln_err *e) {
    /* OpenAI's limits: at most 16 pairs, keys up to 64 characters, string values up to 512. */
    if (json_object_size(m) > 16) return fail(param, e, "metadata", "may hold at most 16 keys%s", "");
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)m, k, v) {
        char path[LN_JOBSPEC_PARAM_MAX];
        snprintf(path, sizeof path, "metadata.%.64s", k);
        if (strlen(k) > 64) return fail(param, e, "metadata", "keys must be at most 64 characters%s", "");
        if (!json_is_string(v)) return fail(param, e, path, "must be a string%s", "");
        if (strlen(json_string_value(v)) > 512) return fail(param, e, path, "must be at most 512 characters%s", "");
    }
    *out = json_deep_copy(m);
    return 0;
}

/* ---------------------------------------------------------------- API */

static void set_defaults(ln_jobspec *s) {
    memset(s, 0, sizeof *s);
    s->seed = -1;
    s->hp.n_epochs = LN_DEFAULT_N_EPOCHS;
    s->hp.batch_size = LN_DEFAULT_BATCH_SIZE;
    s->hp.learning_rate_multiplier = 1.0;
    s->hp.warmup_ratio = 0.03;
    s->hp.max_seq_len = 2048;
    s->hp.grad_accum = 1;
    s->hp.weight_decay = 0.0;
    s->hp.max_grad_norm = 1.0;
    s->adapter.type = LN_ADAPTER_LORA_NULL_V2;
    s->adapter.rank = LN_DEFAULT_RANK;
    s->adapter.alpha = LN_DEFAULT_RANK;
    s->adapter.n_targets = LN_JOBSPEC_MAX_TARGETS;
    for (int t = 0; t < LN_JOBSPEC_MAX_TARGETS; t++)
        snprintf(s->adapter.targets[t], sizeof s->adapter.targets[t], "%s", target_names[t]);
    s->adapter.calibration_samples = LN_DEFAULT_CALIB_SAMPLES;
    s->adapter.calibration_max_length = LN_DEFAULT_CALIB_MAX_LEN;
    s->ranks = 1;
    s->device = LN_DEVICE_ANY;
    snprintf(s->data.chat_template, sizeof s->data.chat_template, "auto");
}

int ln_jobspec_parse(const json_t *obj, ln_jobspec *s, char param[LN_JOBSPEC_PARAM_MAX], ln_err *e) {
    static const char *const keys[] = {"model", "training_file", "validation_file", "seed", "suffix", "metadata",
                                       "method", "hyperparameters", "adapter", "resources", "integrations", "data",
                                       NULL};
    set_defaults(s);
    param[0] = 0;
    if (!json_is_object(obj)) return fail(param, e, "body", "must be a JSON object%s", "");
    if (check_keys(obj, keys, "", param, e) != 0) goto err;
    if (get_str(obj, "model", "model", 1, 256, 2, s->model, sizeof s->model, param, e) != 0) goto err;
    if (get_file_id(obj, "training_file", "training_file", 1, s->training_file, sizeof s->training_file, param, e))
        goto err;
    if (get_file_id(obj, "validation_file", "validation_file", 0, s->validation_file, sizeof s->validation_file, param,
                    e))
        goto err;
    json_t *seed = json_object_get(obj, "seed");
    if (seed && !json_is_null(seed)) {
        int64_t x;
        if (get_int(obj, "seed", "seed", 0, 2147483647, 0, 0, &x, param, e) != 0) goto err;
        s->seed = x;
    }
    if (get_str(obj, "suffix", "suffix", 0, 64, 1, s->suffix, sizeof s->suffix, param, e) != 0) goto err;
    json_t *m;
    if (get_object(obj, "metadata", "metadata", &m, param, e) != 0) goto err;
    if (m && parse_metadata(m, &s->metadata, param, e) != 0) goto err;
    json_t *integ = json_object_get(obj, "integrations");
    if (integ && !json_is_null(integ) && !(json_is_array(integ) && json_array_size(integ) == 0)) {
        fail(param, e, "integrations", "are not supported (give null or [])%s", "");
        goto err;
    }

    /* Hyperparameters: legacy top-level object first, then method's (OpenAI's current place). */
    int lr_given = 0;
    json_t *h;
    if (get_object(obj, "hyperparameters", "hyperparameters", &h, param, e) != 0) goto err;
    if (h && parse_hparams(h, "hyperparameters.", 1, &s->hp, &lr_given, param, e) != 0) goto err;
    json_t *method;
    if (get_object(obj, "method", "method", &method, param, e) != 0) goto err;
    if (method && parse_method(method, &s->hp, param, e) != 0) goto err;
    if (lr_given && h && json_object_get(h, "learning_rate_multiplier") &&
        !json_is_null(json_object_get(h, "learning_rate_multiplier"))) {
        fail(param, e, "hyperparameters.learning_rate", "give learning_rate or learning_rate_multiplier, not both%s", "");
        goto err;
    }
    /* learning_rate and learning_rate_multiplier are one setting (lr = base × multiplier) and the
     * normalised spec carries both, so each is bounded here by the other's limits: whatever this
     * accepts, its normalised form is accepted again. lr ≤ LN_MAX_LR = fl(base × 1000) is the same
     * product a multiplier of 1000 gives (rounding is monotone), and base × multiplier must not
     * underflow to 0 (learning_rate is > 0). */
    if (!lr_given) {
        s->hp.learning_rate = LN_DEFAULT_BASE_LR * s->hp.learning_rate_multiplier;
        if (!(s->hp.learning_rate > 0)) {
            int in_method = method && json_object_get(json_object_get(json_object_get(method, "supervised"),
                                                                      "hyperparameters"),
                                                      "learning_rate_multiplier");
            fail(param, e,
                 in_method ? "method.supervised.hyperparameters.learning_rate_multiplier"
                           : "hyperparameters.learning_rate_multiplier",
                 "is too small: learning_rate = 2e-4 x multiplier would be 0%s", "");
            goto err;
        }
    } else {
        /* The derived multiplier is shown, never used; division may round one ulp past the bound. */
        s->hp.learning_rate_multiplier = s->hp.learning_rate / LN_DEFAULT_BASE_LR;
        if (s->hp.learning_rate_multiplier > LN_MAX_LR_MULTIPLIER) s->hp.learning_rate_multiplier = LN_MAX_LR_MULTIPLIER;
    }

    json_t *a;
    if (get_object(obj, "adapter", "adapter", &a, param, e) != 0) goto err;
    if (a && parse_adapter(a, &s->adapter, param, e) != 0) goto err;

    json_t *r;
    if (get_object(obj, "resources", "resources", &r, param, e) != 0) goto err;
    if (r) {
        static const char *const rkeys[] = {"ranks", "device", NULL};
        if (check_keys(r, rkeys, "resources.", param, e) != 0) goto err;
        int64_t x;
        if (get_int(r, "ranks", "resources.ranks", 1, 64, 1, 0, &x, param, e) != 0) goto err;
        s->ranks = (int)x;
        char dev[16];
        if (get_str(r, "device", "resources.device", 0, 8, 1, dev, sizeof dev, param, e) != 0) goto err;
        if (!dev[0] || strcmp(dev, "any") == 0) s->device = LN_DEVICE_ANY;
        else if (strcmp(dev, "cpu") == 0) s->device = LN_DEVICE_CPU;
        else if (strcmp(dev, "cuda") == 0) s->device = LN_DEVICE_CUDA;
        else {
            fail(param, e, "resources.device", "\"%s\" is not one of any, cpu, cuda", dev);
            goto err;
        }
    }
    json_t *d;
    if (get_object(obj, "data", "data", &d, param, e) != 0) goto err;
    if (d && parse_data(d, &s->hp, &s->data, param, e) != 0) goto err;
    return 0;
err:
    ln_jobspec_free(s);
    return -1;
}

int ln_jobspec_parse_text(const char *text, size_t len, ln_jobspec *spec, char param[LN_JOBSPEC_PARAM_MAX],
                          ln_err *e) {
    json_error_t je;
    json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!j) {
        set_defaults(spec);
        snprintf(param, LN_JOBSPEC_PARAM_MAX, "body");
        return ln_errf(e, "body: the job spec is not valid JSON: %s at line %d, column %d", je.text, je.line, je.column);
    }
    int rc = ln_jobspec_parse(j, spec, param, e);
    json_decref(j);
    return rc;
}

json_t *ln_jobspec_to_json(const ln_jobspec *s) {
    const ln_hparams *hp = &s->hp;
    json_t *targets = json_array();
    for (int t = 0; t < s->adapter.n_targets; t++) json_array_append_new(targets, json_string(s->adapter.targets[t]));
    json_t *hpo = json_pack("{s:i, s:i, s:f}", "n_epochs", hp->n_epochs, "batch_size", hp->batch_size,
                            "learning_rate_multiplier", hp->learning_rate_multiplier);
    json_t *all = json_pack("{s:i, s:i, s:f, s:f, s:f, s:i, s:i, s:f, s:f, s:i, s:i}", "n_epochs", hp->n_epochs,
                            "batch_size", hp->batch_size, "learning_rate_multiplier", hp->learning_rate_multiplier,
                            "learning_rate", hp->learning_rate, "warmup_ratio", hp->warmup_ratio, "max_seq_len",
                            hp->max_seq_len, "grad_accum", hp->grad_accum, "weight_decay", hp->weight_decay,
                            "max_grad_norm", hp->max_grad_norm, "eval_interval", hp->eval_interval, "save_interval",
                            hp->save_interval);
    /* learning_rate_multiplier is derived from learning_rate when that was given; re-parsing must
     * not see both, so the normalised form keeps only learning_rate (the value the engine uses). */
    json_object_del(all, "learning_rate_multiplier");
    json_t *calib = json_pack("{s:o, s:i, s:i}", "file",
                              s->adapter.calibration_file[0] ? json_string(s->adapter.calibration_file) : json_null(),
                              "samples", s->adapter.calibration_samples, "max_length",
                              s->adapter.calibration_max_length);
    json_t *j = json_pack(
        "{s:s, s:s, s:o, s:o, s:o, s:o, s:{s:s, s:{s:o}}, s:o, s:{s:s, s:i, s:f, s:o, s:o}, s:{s:i, s:s}}",
        "model", s->model, "training_file", s->training_file, "validation_file",
        s->validation_file[0] ? json_string(s->validation_file) : json_null(), "seed",
        s->seed >= 0 ? json_integer(s->seed) : json_null(), "suffix", s->suffix[0] ? json_string(s->suffix) : json_null(),
        "metadata", s->metadata ? json_deep_copy(s->metadata) : json_null(), "method", "type", "supervised",
        "supervised", "hyperparameters", hpo, "hyperparameters", all, "adapter", "type",
        ln_adapter_type_name(s->adapter.type), "rank", s->adapter.rank, "alpha", s->adapter.alpha, "target_modules",
        targets, "calibration", calib, "resources", "ranks", s->ranks, "device", ln_device_kind_name(s->device));
    json_object_set_new(j, "data", json_pack("{s:s, s:s, s:i}", "overlong",
                                             s->data.reject_overlong ? "reject" : "truncate", "chat_template",
                                             s->data.chat_template, "pack", s->data.pack));
    return j;
}

void ln_jobspec_free(ln_jobspec *s) {
    if (s->metadata) json_decref(s->metadata);
    s->metadata = NULL;
}
