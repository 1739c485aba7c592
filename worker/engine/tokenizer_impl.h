/* tokenizer_impl.h — the inside of an ln_tokenizer, shared by tokenizer.c (loading, queries),
 * tokenizer_encode.c (normalize, pre-tokenize, BPE) and tokenizer_decode.c. Not a public API. */
#ifndef LN_TOKENIZER_IMPL_H
#define LN_TOKENIZER_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "worker/engine/tokenizer.h"
#include "worker/engine/unicode.h"

/* ---------------------------------------------------------------------------------------------
 * Types
 * ------------------------------------------------------------------------------------------- */

typedef struct bytes_t {
    uint8_t *p;
    int len;
} bytes_t;

/* Text with an alignment: al[2k], al[2k+1] = the original [start, end) of the character byte k
 * came from (so offsets computed through it are whole characters, as HF's). */
typedef struct aligned {
    uint8_t *p;
    int32_t *al;
    size_t n;
} aligned;

typedef struct added_tok {
    bytes_t content;
    bytes_t match;   /* what is looked for: content, or for a normalized token the normalizer's output */
    int32_t id;
    int special;
    int lstrip, rstrip, single_word, normalized; /* HF AddedToken flags */
} added_tok;

typedef enum { NORM_PREPEND, NORM_REPLACE } norm_kind;
typedef struct norm_step {
    norm_kind kind;
    bytes_t a, b; /* prepend: a; replace: a -> b */
} norm_step;

typedef enum { DEC_BYTE_LEVEL, DEC_REPLACE, DEC_BYTE_FALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE } dec_kind;
typedef struct dec_step {
    dec_kind kind;
    bytes_t a, b;        /* replace: a -> b; strip: a = content char; metaspace: a = replacement */
    int start, stop;     /* strip counts; metaspace: start = 1 when the first token's space goes */
} dec_step;

/* Open-addressing map from a token's bytes to its id; slots hold id + 1 (0 = empty). */
typedef struct str_map {
    int32_t *slots;
    uint32_t mask;
    const bytes_t *keys; /* indexed by id */
} str_map;

/* Open-addressing map from a pair of ids to (rank, merged id). */
typedef struct pair_map {
    uint64_t *keys; /* (a << 32 | b) + 1; 0 = empty */
    int32_t *rank, *merged;
    uint32_t mask;
} pair_map;

struct ln_tokenizer {
    int n_ids;               /* max id + 1 */
    char **text;             /* id -> token text as in tokenizer.json (NULL for a hole) */
    bytes_t *bpe;            /* id -> bytes in BPE space (raw bytes for byte-level) */
    str_map vocab;           /* model vocabulary, BPE-space bytes -> id */
    str_map by_text;         /* every token incl. added, JSON text -> id */
    bytes_t *text_keys;      /* keys of by_text */
    pair_map merges;
    int byte_level;          /* model vocabulary in GPT-2's byte alphabet */
    int byte_fallback, fuse_unk, ignore_merges;
    int32_t unk_id;
    int32_t byte_id[256];    /* byte-level: id of byte b; fallback: id of <0xHH>; -1 if none */
    int has_split;
    ln_split_pattern split;
    int prefix_space;        /* ByteLevel add_prefix_space after a Split: a space before each piece */
    int prefix_segment;      /* ByteLevel add_prefix_space with its own regex: one before the stretch */
    int meta;                /* Metaspace pre-tokenizer: ' ' -> replacement, maybe prepended, maybe split */
    bytes_t meta_rep;
    int meta_prepend;        /* 0 never, 1 always, 2 first (only a stretch that starts the input) */
    int meta_split;
    norm_step *norm;
    int n_norm;
    added_tok *added;
    int n_added;
    int32_t *added_raw[256];  /* per first byte: added tokens matched in the input (normalized=false), */
    int32_t *added_norm[256]; /* …and those matched in normalized text; longest first, -1 terminated */
    int has_norm_added;
    uint8_t *is_special;     /* id -> 1 for special added tokens */
    int32_t pre_ids[8], post_ids[8];
    int n_pre, n_post;
    dec_step *dec;
    int n_dec;
    int32_t bos, eos;
    char *chat_template;
};

/* ---------------------------------------------------------------------------------------------
 * Shared helpers
 * ------------------------------------------------------------------------------------------- */

static inline uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1; }

static inline uint32_t pair_hash(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (uint32_t)k;
}

static inline int pair_map_get(const pair_map *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged) {
    uint64_t k = pair_key(a, b);
    uint32_t i = pair_hash(k) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        if (!m->keys[i]) return 0;
        if (m->keys[i] == k) {
            *rank = m->rank[i];
            *merged = m->merged[i];
            return 1;
        }
    }
}

/* A NUL-terminated copy of p[0..n). */
bytes_t ln_tok_bytes_dup(const void *p, size_t n);
/* The same, {NULL, 0} when out of memory (for what scales with the vocabulary or the text). */
bytes_t ln_tok_bytes_try_dup(const void *p, size_t n);
/* Id of the token with these bytes in m, or -1. */
int32_t ln_tok_str_map_get(const str_map *m, const uint8_t *p, size_t n);
/* GPT-2's byte -> code point alphabet. */
void ln_tok_byte_alphabet(uint32_t byte_to_cp[256]);
/* A byte-level token's text back to raw bytes; 0 if a character is outside the alphabet. */
/* 1 decoded into out, 0 when a character is outside the alphabet, −1 out of memory. */
int ln_tok_byte_level_decode(const uint8_t *s, size_t n, const int16_t *cp_to_byte, bytes_t *out);
/* One normalizer step on aligned text (tokenizer_encode.c). */
/* 0, or −1 when out of memory (the text is then left as it was). */
int ln_tok_norm_apply(const norm_step *ns, uint8_t **cur_p, int32_t **al_p, size_t *m_p);
/* seg[0..n) of the input, first byte at original offset base, aligned to its characters. */
/* Both return p = al = NULL when out of memory. */
aligned ln_tok_aligned_from_input(const uint8_t *seg, size_t n, int base);
aligned ln_tok_aligned_copy(const uint8_t *p, const int32_t *al, size_t n);
void ln_tok_aligned_free(aligned *a);

#endif
