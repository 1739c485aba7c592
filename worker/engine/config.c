/* config.c — config.json → ln_config, and back. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "common/util.h"
#include "worker/engine/config.h"

/* ---------------------------------------------------------------- helpers */

/* Reads an integer field; `req` makes absence an error, else *out keeps its default. */
static int get_int(json_t *o, const char *key, int req, int *out, const char *where, ln_err *e)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (req) return ln_errf(e, "%s: required field \"%s\" is missing", where, key);
        return 0;
    }
    if (!json_is_integer(v)) return ln_errf(e, "%s: field \"%s\" must be an integer", where, key);
    json_int_t x = json_integer_value(v);
    if (x < -2147483647 || x > 2147483647) return ln_errf(e, "%s: field \"%s\" is out of range", where, key);
    *out = (int)x;
    return 0;
}

static int get_num(json_t *o, const char *key, int req, float *out, const char *where, ln_err *e)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (req) return ln_errf(e, "%s: required field \"%s\" is missing", where, key);
        return 0;
    }
    if (!json_is_number(v)) return ln_errf(e, "%s: field \"%s\" must be a number", where, key);
    *out = (float)json_number_value(v);
    return 0;
}

/* bos/eos may be an int or a list of ints (LLaMA 3 instruct); we keep the first. */
static int get_token_id(json_t *o, const char *key, int *out, const char *where, ln_err *e)
{
    json_t *v = json_object_get(o, key);
    *out = -1;
    if (!v || json_is_null(v)) return 0;
    if (json_is_array(v) && json_array_size(v) > 0) v = json_array_get(v, 0);
    if (!json_is_integer(v)) return ln_errf(e, "%s: field \"%s\" must be a token id", where, key);
    *out = (int)json_integer_value(v);
    return 0;
}

static int parse_rope_scaling(json_t *rs, ln_config *c, const char *where, ln_err *e)
{
    c->rope_type = LN_ROPE_DEFAULT;
    c->rope_factor = 1.0f;
    if (!rs || json_is_null(rs)) return 0;
    if (!json_is_object(rs)) return ln_errf(e, "%s: \"rope_scaling\" must be an object or null", where);
    json_t *t = json_object_get(rs, "rope_type");
    if (!t) t = json_object_get(rs, "type");
    const char *type = json_is_string(t) ? json_string_value(t) : NULL;
    if (!type) return ln_errf(e, "%s: \"rope_scaling\" has no \"rope_type\"", where);
    if (strcmp(type, "default") == 0) return 0;
    if (get_num(rs, "factor", 1, &c->rope_factor, where, e)) return -1;
    if (!(c->rope_factor > 0)) return ln_errf(e, "%s: rope_scaling.factor must be > 0", where);
    if (strcmp(type, "linear") == 0) {
        c->rope_type = LN_ROPE_LINEAR;
        return 0;
    }
    if (strcmp(type, "llama3") == 0) {
        c->rope_type = LN_ROPE_LLAMA3;
        if (get_num(rs, "low_freq_factor", 1, &c->rope_low_freq_factor, where, e)) return -1;
        if (get_num(rs, "high_freq_factor", 1, &c->rope_high_freq_factor, where, e)) return -1;
        if (get_int(rs, "original_max_position_embeddings", 1, &c->rope_original_max_pos, where, e)) return -1;
        if (!(c->rope_high_freq_factor > c->rope_low_freq_factor))
            return ln_errf(e, "%s: rope_scaling.high_freq_factor must exceed low_freq_factor", where);
        if (c->rope_original_max_pos <= 0)
            return ln_errf(e, "%s: rope_scaling.original_max_position_embeddings must be positive", where);
        return 0;
    }
    return ln_errf(e, "%s: rope_scaling type \"%s\" is not supported (default, linear, llama3 are)", where, type);
}

/* ---------------------------------------------------------------- API */

int ln_config_parse(const char *text, const char *where, ln_config *c, ln_err *e)
{
    json_error_t je;
    json_t *o = json_loads(text, 0, &je);
    if (!o) return ln_errf(e, "%s: invalid JSON at line %d: %s", where, je.line, je.text);
    int rc = -1;
    memset(c, 0, sizeof *c);
    if (!json_is_object(o)) { ln_errf(e, "%s: expected a JSON object", where); goto out; }

    json_t *mt = json_object_get(o, "model_type");
    if (mt && json_is_string(mt) && strcmp(json_string_value(mt), "llama") != 0) {
        ln_errf(e, "%s: model_type \"%s\" is not supported (only \"llama\")", where, json_string_value(mt));
        goto out;
    }
    c->max_position_embeddings = 2048;
    c->rms_norm_eps = 1e-6f;
    c->rope_theta = 10000.0f;
    c->num_kv_heads = 0;
    c->head_dim = 0;
    if (get_int(o, "vocab_size", 1, &c->vocab_size, where, e) ||
        get_int(o, "hidden_size", 1, &c->hidden_size, where, e) ||
        get_int(o, "intermediate_size", 1, &c->intermediate_size, where, e) ||
        get_int(o, "num_hidden_layers", 1, &c->num_layers, where, e) ||
        get_int(o, "num_attention_heads", 1, &c->num_heads, where, e) ||
        get_int(o, "num_key_value_heads", 0, &c->num_kv_heads, where, e) ||
        get_int(o, "head_dim", 0, &c->head_dim, where, e) ||
        get_int(o, "max_position_embeddings", 0, &c->max_position_embeddings, where, e) ||
        get_num(o, "rms_norm_eps", 0, &c->rms_norm_eps, where, e) ||
        get_num(o, "rope_theta", 0, &c->rope_theta, where, e) ||
        get_token_id(o, "bos_token_id", &c->bos_token_id, where, e) ||
        get_token_id(o, "eos_token_id", &c->eos_token_id, where, e) ||
        get_token_id(o, "pad_token_id", &c->pad_token_id, where, e))
        goto out;
    /* transformers ≥ 5 writes "rope_parameters" (rope_type, rope_theta and the scaling fields
     * together); earlier versions "rope_theta" + "rope_scaling". */
    json_t *rp = json_object_get(o, "rope_parameters");
    if (rp && json_is_object(rp)) {
        if (get_num(rp, "rope_theta", 0, &c->rope_theta, where, e)) goto out;
        if (parse_rope_scaling(rp, c, where, e)) goto out;
    } else if (parse_rope_scaling(json_object_get(o, "rope_scaling"), c, where, e)) {
        goto out;
    }
    json_t *tie = json_object_get(o, "tie_word_embeddings");
    c->tie_word_embeddings = tie && json_is_true(tie);
    json_t *dt = json_object_get(o, "torch_dtype");
    if (!dt) dt = json_object_get(o, "dtype");
    if (json_is_string(dt)) snprintf(c->torch_dtype, sizeof c->torch_dtype, "%s", json_string_value(dt));
    json_t *hact = json_object_get(o, "hidden_act");
    if (hact && json_is_string(hact) && strcmp(json_string_value(hact), "silu") != 0) {
        ln_errf(e, "%s: hidden_act \"%s\" is not supported (only \"silu\")", where, json_string_value(hact));
        goto out;
    }
    json_t *ab = json_object_get(o, "attention_bias"), *mb = json_object_get(o, "mlp_bias");
    if ((ab && json_is_true(ab)) || (mb && json_is_true(mb))) {
        ln_errf(e, "%s: attention_bias/mlp_bias are not supported", where);
        goto out;
    }

    if (c->num_kv_heads == 0) c->num_kv_heads = c->num_heads;
    if (c->vocab_size <= 0 || c->hidden_size <= 0 || c->intermediate_size <= 0 || c->num_layers <= 0 ||
        c->num_heads <= 0 || c->num_kv_heads <= 0) {
        ln_errf(e, "%s: vocab_size, hidden_size, intermediate_size, num_hidden_layers and the head counts must be positive", where);
        goto out;
    }
    if (c->head_dim == 0) {
        if (c->hidden_size % c->num_heads) {
            ln_errf(e, "%s: hidden_size %d is not divisible by num_attention_heads %d (set head_dim)", where,
                    c->hidden_size, c->num_heads);
            goto out;
        }
        c->head_dim = c->hidden_size / c->num_heads;
    }
    if (c->head_dim <= 0 || c->head_dim % 2) {
        ln_errf(e, "%s: head_dim %d must be positive and even (RoPE rotates pairs)", where, c->head_dim);
        goto out;
    }
    if (c->num_heads % c->num_kv_heads) {
        ln_errf(e, "%s: num_attention_heads %d is not a multiple of num_key_value_heads %d", where,
                c->num_heads, c->num_kv_heads);
        goto out;
    }
    if (!(c->rms_norm_eps > 0) || !(c->rope_theta > 0)) {
        ln_errf(e, "%s: rms_norm_eps and rope_theta must be positive", where);
        goto out;
    }
    rc = 0;
out:
    json_decref(o);
    return rc;
}

int ln_config_load(const char *path, ln_config *c, ln_err *e)
{
    struct stat st;
    char *file = NULL, *text = NULL;
    size_t len;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) file = ln_path_join(path, "config.json");
    else file = ln_xstrdup(path);
    int rc = ln_read_file(file, &text, &len, e);
    if (rc == 0) rc = ln_config_parse(text, file, c, e);
    free(text);
    free(file);
    return rc;
}

char *ln_config_to_json(const ln_config *c)
{
    json_t *o = json_object();
    json_object_set_new(o, "architectures", json_pack("[s]", "LlamaForCausalLM"));
    json_object_set_new(o, "model_type", json_string("llama"));
    json_object_set_new(o, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(o, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(o, "intermediate_size", json_integer(c->intermediate_size));
    json_object_set_new(o, "num_hidden_layers", json_integer(c->num_layers));
    json_object_set_new(o, "num_attention_heads", json_integer(c->num_heads));
    json_object_set_new(o, "num_key_value_heads", json_integer(c->num_kv_heads));
    json_object_set_new(o, "head_dim", json_integer(c->head_dim));
    json_object_set_new(o, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(o, "rms_norm_eps", json_real(c->rms_norm_eps));
    json_object_set_new(o, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(o, "hidden_act", json_string("silu"));
    json_object_set_new(o, "attention_bias", json_false());
    json_object_set_new(o, "mlp_bias", json_false());
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    json_object_set_new(o, "torch_dtype", json_string(c->torch_dtype[0] ? c->torch_dtype : "float32"));
    if (c->bos_token_id >= 0) json_object_set_new(o, "bos_token_id", json_integer(c->bos_token_id));
    if (c->eos_token_id >= 0) json_object_set_new(o, "eos_token_id", json_integer(c->eos_token_id));
    if (c->pad_token_id >= 0) json_object_set_new(o, "pad_token_id", json_integer(c->pad_token_id));
    if (c->rope_type == LN_ROPE_LINEAR)
        json_object_set_new(o, "rope_scaling", json_pack("{s:s,s:f}", "rope_type", "linear", "factor", (double)c->rope_factor));
    else if (c->rope_type == LN_ROPE_LLAMA3)
        json_object_set_new(o, "rope_scaling",
                            json_pack("{s:s,s:f,s:f,s:f,s:i}", "rope_type", "llama3", "factor", (double)c->rope_factor,
                                      "low_freq_factor", (double)c->rope_low_freq_factor, "high_freq_factor",
                                      (double)c->rope_high_freq_factor, "original_max_position_embeddings",
                                      c->rope_original_max_pos));
    else
        json_object_set_new(o, "rope_scaling", json_null());
    char *s = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(o);
    return s;
}

/* inv_freq_i = θ^(−2i/d) (in fp32, as transformers computes it). llama3 scaling (transformers'
 * _compute_llama3_parameters): wavelengths longer than L/low are divided by factor, shorter than
 * L/high kept, and in between blended by s = (L/λ − low)/(high − low): (1−s)·f/factor + s·f. */
void ln_config_rope_inv_freq(const ln_config *c, float *inv_freq)
{
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        float f = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)c->head_dim);
        if (c->rope_type == LN_ROPE_LINEAR) {
            f = f / c->rope_factor;
        } else if (c->rope_type == LN_ROPE_LLAMA3) {
            float L = (float)c->rope_original_max_pos;
            float low_wl = L / c->rope_low_freq_factor, high_wl = L / c->rope_high_freq_factor;
            float wl = 2.0f * (float)M_PI / f;
            float fl = wl > low_wl ? f / c->rope_factor : f;
            if (!(wl < high_wl) && !(wl > low_wl)) {
                float s = (L / wl - c->rope_low_freq_factor) / (c->rope_high_freq_factor - c->rope_low_freq_factor);
                fl = (1.0f - s) * fl / c->rope_factor + s * fl;
            }
            f = fl;
        }
        inv_freq[i] = f;
    }
}
