/* config.h — a LLaMA model's hyperparameters, read from Hugging Face's config.json.
 *
 * Fields as transformers' LlamaConfig names them. head_dim defaults to hidden/heads;
 * num_key_value_heads to num_attention_heads; rope_scaling may be absent, {"rope_type":"llama3",
 * "factor","low_freq_factor","high_freq_factor","original_max_position_embeddings"} or
 * {"rope_type":"linear","factor"} ("type" is accepted for "rope_type", as transformers does).
 * transformers ≥ 5 writes the same fields, with rope_theta, as "rope_parameters"; both are read. */
#ifndef LN_CONFIG_H
#define LN_CONFIG_H

#include "common/err.h"

typedef enum { LN_ROPE_DEFAULT, LN_ROPE_LINEAR, LN_ROPE_LLAMA3 } ln_rope_type;

typedef struct ln_config {
    int vocab_size;
    int hidden_size;
    int intermediate_size;
    int num_layers;          /* num_hidden_layers */
    int num_heads;           /* num_attention_heads */
    int num_kv_heads;        /* num_key_value_heads */
    int head_dim;
    int max_position_embeddings;
    float rms_norm_eps;
    float rope_theta;
    ln_rope_type rope_type;
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_pos;
    int tie_word_embeddings;
    int bos_token_id, eos_token_id, pad_token_id; /* -1 when absent */
    char torch_dtype[16];   /* "float32", "bfloat16", "float16" or "" */
} ln_config;

/* Parses config.json text; `where` names the file in messages. Validates every field
 * (positive sizes, heads divide, head_dim even, ...). */
int ln_config_parse(const char *json, const char *where, ln_config *c, ln_err *e);
/* Reads DIR/config.json (or the file itself when path is a file). */
int ln_config_load(const char *path, ln_config *c, ln_err *e);
/* Renders c as a transformers-compatible config.json (malloc'd string, caller frees). */
char *ln_config_to_json(const ln_config *c);

/* RoPE inverse frequencies (head_dim/2 floats), with rope_scaling applied as transformers does. */
void ln_config_rope_inv_freq(const ln_config *c, float *inv_freq);

#endif
