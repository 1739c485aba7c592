/* tokenizer.h — Hugging Face tokenizer.json: BPE encode/decode equal to HF `tokenizers`.
 *
 * Two families (DESIGN.md §3):
 *   byte-level BPE (LLaMA 3): added tokens split out first, then the pre-tokenizer split
 *     pattern (LLaMA-3 or GPT-2 regex, implemented natively), bytes mapped through GPT-2's
 *     byte alphabet, BPE merges by rank (ignore_merges honoured);
 *   SentencePiece-style BPE (LLaMA 2): normalizer (Prepend "▁", Replace " "→"▁"), characters as
 *     symbols, <0xHH> byte fallback for characters outside the vocabulary, merges by rank.
 * The post-processor's TemplateProcessing gives the ids put around a single sequence (BOS…EOS).
 *
 * Ownership: an ln_tokenizer is immutable after load and may be shared by threads. */
#ifndef LN_TOKENIZER_H
#define LN_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

typedef struct ln_tokenizer ln_tokenizer;

/* A growable id list; the caller owns ids (free()). Start it zeroed. */
typedef struct ln_ids {
    int32_t *ids;
    int n, cap;
    int oom;      /* a push found no memory (and was dropped): the encode that did it fails */
} ln_ids;
void ln_ids_push(ln_ids *v, int32_t id);
void ln_ids_free(ln_ids *v);

/* path: a tokenizer.json file, or a folder holding one. */
int ln_tokenizer_load(const char *path, ln_tokenizer **out, ln_err *e);
void ln_tokenizer_free(ln_tokenizer *t);

/* Appends the ids of text[0..len) to out. add_special: put the post-processor's ids around
 * the sequence (e.g. LLaMA's BOS), as HF's encode(add_special_tokens=True) does.
 * offsets, if not NULL, receives 2 ints per id appended: [start, end) byte offsets into text,
 * widened to whole UTF-8 characters as HF's character offsets are (ids from the post-processor
 * get [0, 0)). It is grown like ids; the caller frees offsets->ids. */
int ln_tokenizer_encode(const ln_tokenizer *t, const char *text, size_t len, int add_special,
                        ln_ids *out, ln_ids *offsets, ln_err *e);

/* Text of ids (new string, caller frees). skip_special drops special added tokens. Invalid
 * UTF-8 from partial byte tokens becomes U+FFFD, as HF's lossy decode does. */
int ln_tokenizer_decode(const ln_tokenizer *t, const int32_t *ids, int n, int skip_special,
                        char **out, size_t *out_len, ln_err *e);

/* Size of the id space: max id + 1 over model vocabulary and added tokens. */
int ln_tokenizer_vocab_size(const ln_tokenizer *t);
/* Id of a token given by its text (model vocabulary in its JSON spelling, or an added token); -1 if none. */
int32_t ln_tokenizer_token_id(const ln_tokenizer *t, const char *token);
/* Text of a token id as written in tokenizer.json, or NULL. */
const char *ln_tokenizer_token_text(const ln_tokenizer *t, int32_t id);
/* BOS/EOS: from tokenizer_config.json when loaded from a folder that has one, else guessed from the
 * post-processor (BOS) and the well-known names (<|end_of_text|>, </s>). -1 when unknown. */
int32_t ln_tokenizer_bos_id(const ln_tokenizer *t);
int32_t ln_tokenizer_eos_id(const ln_tokenizer *t);
/* 1 for byte-level BPE (LLaMA 3 style), 0 for SentencePiece-style (LLaMA 2). */
int ln_tokenizer_is_byte_level(const ln_tokenizer *t);
/* The chat_template string from tokenizer_config.json, or NULL. */
const char *ln_tokenizer_chat_template(const ln_tokenizer *t);

/* Writes a valid byte-level BPE tokenizer.json to path: 256 byte tokens, then merges learnt from
 * a small built-in English/code text (as many as it yields, at most vocab_size - 266), then the 10
 * LLaMA-3.1 special tokens right after them (<|begin_of_text|>, <|end_of_text|>, …,
 * <|start_header_id|>, <|end_header_id|>, <|eom_id|>, <|eot_id|> — HF needs added tokens to follow
 * the vocabulary without a gap). So every id is < vocab_size, but the tokenizer may use fewer ids
 * than vocab_size (the model's extra embedding rows stay unused): load it and ask
 * ln_tokenizer_bos_id / ln_tokenizer_eos_id for the ids. vocab_size ≥ 266. */
int ln_tokenizer_make_default(const char *path, int vocab_size, ln_err *e);

#endif
