/* tokenizer.c — tokenizer.json BPE, equal to Hugging Face `tokenizers` (see tokenizer.h).
 *
 * Pipeline, as HF runs it for one input:
 *   1. added tokens are cut out first (leftmost-longest match over their contents);
 *   2. each stretch of text between them is normalized (Prepend/Replace — LLaMA 2's "▁"),
 *   3. pre-tokenized (LLaMA-3 / GPT-2 split pattern, then ByteLevel's byte → char map),
 *   4. each piece ("word") goes through BPE: symbols = bytes (byte-level) or characters with
 *      <0xHH> byte fallback (SentencePiece-style); then the adjacent pair of lowest merge rank is
 *      merged until none is left (ties: leftmost). A min-heap of candidate pairs over a linked list
 *      of symbols keeps this O(n log n) on long words (LLaMA 2 has no pre-tokenizer, so a whole
 *      paragraph is one word);
 *   5. the post-processor's TemplateProcessing puts its ids (BOS) around the sequence.
 *
 * Internally the byte-level vocabulary is kept as raw bytes (the GPT-2 char alphabet decoded
 * once at load), so step 3's byte → char mapping costs nothing at encode time. */
#include "worker/engine/tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/util.h"
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
 * Small helpers
 * ------------------------------------------------------------------------------------------- */

void ln_ids_push(ln_ids *v, int32_t id) {
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 64;
        v->ids = ln_xrealloc(v->ids, (size_t)v->cap * sizeof *v->ids);
    }
    v->ids[v->n++] = id;
}

void ln_ids_free(ln_ids *v) {
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

static bytes_t bytes_dup(const void *p, size_t n) {
    bytes_t b = {ln_xmalloc(n + 1), (int)n};
    memcpy(b.p, p, n);
    b.p[n] = 0;
    return b;
}

static uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a, then a final mix for the low bits */
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    return h ^ (h >> 32);
}

static uint32_t pow2_at_least(uint32_t n) {
    uint32_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

static void str_map_init(str_map *m, const bytes_t *keys, int n_keys) {
    uint32_t cap = pow2_at_least((uint32_t)n_keys * 2 + 1);
    m->slots = ln_xcalloc(cap, sizeof *m->slots);
    m->mask = cap - 1;
    m->keys = keys;
}

/* Inserts id (its key is keys[id]); an existing equal key keeps its first id. */
static void str_map_put(str_map *m, int32_t id) {
    const bytes_t *k = &m->keys[id];
    uint32_t i = (uint32_t)hash_bytes(k->p, (size_t)k->len) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        int32_t s = m->slots[i];
        if (!s) { m->slots[i] = id + 1; return; }
        const bytes_t *o = &m->keys[s - 1];
        if (o->len == k->len && memcmp(o->p, k->p, (size_t)k->len) == 0) return;
    }
}

static int32_t str_map_get(const str_map *m, const uint8_t *p, size_t n) {
    if (!m->slots) return -1;
    uint32_t i = (uint32_t)hash_bytes(p, n) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        int32_t s = m->slots[i];
        if (!s) return -1;
        const bytes_t *o = &m->keys[s - 1];
        if ((size_t)o->len == n && memcmp(o->p, p, n) == 0) return s - 1;
    }
}

static inline uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1; }

static inline uint32_t pair_hash(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (uint32_t)k;
}

static void pair_map_init(pair_map *m, int n) {
    uint32_t cap = pow2_at_least((uint32_t)n * 2 + 1);
    m->keys = ln_xcalloc(cap, sizeof *m->keys);
    m->rank = ln_xmalloc(cap * sizeof *m->rank);
    m->merged = ln_xmalloc(cap * sizeof *m->merged);
    m->mask = cap - 1;
}

/* A later duplicate replaces an earlier one, as HF's HashMap collect does. */
static void pair_map_put(pair_map *m, int32_t a, int32_t b, int32_t rank, int32_t merged) {
    uint64_t k = pair_key(a, b);
    uint32_t i = pair_hash(k) & m->mask;
    while (m->keys[i] && m->keys[i] != k) i = (i + 1) & m->mask;
    m->keys[i] = k;
    m->rank[i] = rank;
    m->merged[i] = merged;
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

/* GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves; the other 68 bytes
 * (controls, space, 0x7F-0xA0, 0xAD) are given the code points 256, 257, … in byte order. */
static void byte_alphabet(uint32_t byte_to_cp[256]) {
    int k = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        byte_to_cp[b] = printable ? (uint32_t)b : (uint32_t)(256 + k++);
    }
}

/* Maps a byte-level token's text back to raw bytes; 0 if some character is outside the alphabet. */
static int byte_level_decode(const uint8_t *s, size_t n, const int16_t *cp_to_byte, bytes_t *out) {
    uint8_t *buf = ln_xmalloc(n + 1);
    int k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += (size_t)ln_utf8_next(s + i, n - i, &cp);
        if (cp >= 324 || cp_to_byte[cp] < 0) { free(buf); return 0; }
        buf[k++] = (uint8_t)cp_to_byte[cp];
    }
    buf[k] = 0;
    out->p = buf;
    out->len = k;
    return 1;
}

static const char *json_str(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Loading
 * ------------------------------------------------------------------------------------------- */

static int load_normalizer(ln_tokenizer *t, json_t *n, ln_err *e) {
    if (!n || json_is_null(n)) return 0;
    const char *type = json_str(n, "type");
    if (!type) return ln_errf(e, "normalizer has no \"type\"");
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(n, "normalizers");
        size_t i;
        json_t *x;
        json_array_foreach(list, i, x) if (load_normalizer(t, x, e)) return -1;
        return 0;
    }
    norm_step st = {0};
    if (!strcmp(type, "Prepend")) {
        const char *p = json_str(n, "prepend");
        if (!p) return ln_errf(e, "normalizer Prepend has no \"prepend\" string");
        st.kind = NORM_PREPEND;
        st.a = bytes_dup(p, strlen(p));
    } else if (!strcmp(type, "Replace")) {
        const char *pat = json_str(json_object_get(n, "pattern"), "String");
        const char *c = json_str(n, "content");
        if (!pat || !c || !*pat)
            return ln_errf(e, "normalizer Replace: only a non-empty {\"String\": …} pattern is supported");
        st.kind = NORM_REPLACE;
        st.a = bytes_dup(pat, strlen(pat));
        st.b = bytes_dup(c, strlen(c));
    } else {
        return ln_errf(e, "normalizer \"%s\" is not supported (supported: Sequence, Prepend, Replace)", type);
    }
    t->norm = ln_xrealloc(t->norm, (size_t)(t->n_norm + 1) * sizeof *t->norm);
    t->norm[t->n_norm++] = st;
    return 0;
}

static int load_pre_tokenizer(ln_tokenizer *t, json_t *p, int *saw_byte_level, ln_err *e) {
    if (!p || json_is_null(p)) return 0;
    const char *type = json_str(p, "type");
    if (!type) return ln_errf(e, "pre_tokenizer has no \"type\"");
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(p, "pretokenizers");
        size_t i;
        json_t *x;
        json_array_foreach(list, i, x) if (load_pre_tokenizer(t, x, saw_byte_level, e)) return -1;
        return 0;
    }
    if (!strcmp(type, "Split")) {
        const char *re = json_str(json_object_get(p, "pattern"), "Regex");
        const char *beh = json_str(p, "behavior");
        if (!re) return ln_errf(e, "pre_tokenizer Split: only a {\"Regex\": …} pattern is supported");
        if (beh && strcmp(beh, "Isolated"))
            return ln_errf(e, "pre_tokenizer Split: behavior \"%s\" is not supported (only Isolated)", beh);
        if (json_is_true(json_object_get(p, "invert")))
            return ln_errf(e, "pre_tokenizer Split: invert=true is not supported");
        if (t->has_split) return ln_errf(e, "pre_tokenizer: more than one Split is not supported");
        if (!strcmp(re, ln_split_pattern_llama3)) t->split = LN_SPLIT_LLAMA3;
        else if (!strcmp(re, ln_split_pattern_gpt2)) t->split = LN_SPLIT_GPT2;
        else return ln_errf(e, "pre_tokenizer Split: the regex is not one of the built-in patterns "
                               "(LLaMA-3 or GPT-2): %.120s", re);
        t->has_split = 1;
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) {
        *saw_byte_level = 1;
        int aps = json_is_true(json_object_get(p, "add_prefix_space"));
        json_t *ur = json_object_get(p, "use_regex");
        if (!ur || json_is_true(ur)) {
            /* ByteLevel splits by itself (GPT-2 pattern), after prefixing the whole stretch */
            if (t->has_split) return ln_errf(e, "pre_tokenizer: ByteLevel with use_regex after a Split is not supported");
            t->split = LN_SPLIT_GPT2;
            t->has_split = 1;
            t->prefix_segment = aps;
        } else {
            t->prefix_space = aps && t->has_split; /* runs on each piece of the Split before it */
            t->prefix_segment = aps && !t->has_split;
        }
        return 0;
    }
    if (!strcmp(type, "Metaspace")) {
        const char *r = json_str(p, "replacement");
        const char *scheme = json_str(p, "prepend_scheme");
        json_t *aps = json_object_get(p, "add_prefix_space"), *split = json_object_get(p, "split");
        if (!r) r = "\xe2\x96\x81";
        t->meta = 1;
        t->meta_rep = bytes_dup(r, strlen(r));
        if (scheme) {
            if (!strcmp(scheme, "always")) t->meta_prepend = 1;
            else if (!strcmp(scheme, "first")) t->meta_prepend = 2;
            else if (!strcmp(scheme, "never")) t->meta_prepend = 0;
            else return ln_errf(e, "pre_tokenizer Metaspace: unknown prepend_scheme \"%s\"", scheme);
        } else {
            t->meta_prepend = !json_is_false(aps);
        }
        t->meta_split = !json_is_false(split);
        return 0;
    }
    return ln_errf(e, "pre_tokenizer \"%s\" is not supported (supported: Sequence, Split, ByteLevel, Metaspace)", type);
}

static int load_decoder(ln_tokenizer *t, json_t *d, ln_err *e) {
    if (!d || json_is_null(d)) return 0;
    const char *type = json_str(d, "type");
    if (!type) return ln_errf(e, "decoder has no \"type\"");
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(d, "decoders");
        size_t i;
        json_t *x;
        json_array_foreach(list, i, x) if (load_decoder(t, x, e)) return -1;
        return 0;
    }
    dec_step st = {0};
    if (!strcmp(type, "ByteLevel")) st.kind = DEC_BYTE_LEVEL;
    else if (!strcmp(type, "ByteFallback")) st.kind = DEC_BYTE_FALLBACK;
    else if (!strcmp(type, "Fuse")) st.kind = DEC_FUSE;
    else if (!strcmp(type, "Replace")) {
        const char *pat = json_str(json_object_get(d, "pattern"), "String");
        const char *c = json_str(d, "content");
        if (!pat || !c || !*pat) return ln_errf(e, "decoder Replace: only a non-empty {\"String\": …} pattern is supported");
        st.kind = DEC_REPLACE;
        st.a = bytes_dup(pat, strlen(pat));
        st.b = bytes_dup(c, strlen(c));
    } else if (!strcmp(type, "Strip")) {
        const char *c = json_str(d, "content");
        st.kind = DEC_STRIP;
        st.a = bytes_dup(c ? c : " ", strlen(c ? c : " "));
        st.start = (int)json_integer_value(json_object_get(d, "start"));
        st.stop = (int)json_integer_value(json_object_get(d, "stop"));
    } else if (!strcmp(type, "Metaspace")) {
        const char *r = json_str(d, "replacement");
        const char *scheme = json_str(d, "prepend_scheme");
        st.kind = DEC_METASPACE;
        st.a = bytes_dup(r ? r : "\xe2\x96\x81", strlen(r ? r : "\xe2\x96\x81"));
        st.start = !(scheme && !strcmp(scheme, "never")) && !json_is_false(json_object_get(d, "add_prefix_space"));
    } else {
        return ln_errf(e, "decoder \"%s\" is not supported (supported: Sequence, ByteLevel, ByteFallback, "
                          "Fuse, Replace, Strip, Metaspace)", type);
    }
    t->dec = ln_xrealloc(t->dec, (size_t)(t->n_dec + 1) * sizeof *t->dec);
    t->dec[t->n_dec++] = st;
    return 0;
}

/* Finds the ids a TemplateProcessing's special token stands for. */
static int template_ids(json_t *specials, const char *name, int32_t *ids, int *n, ln_err *e) {
    json_t *ent = json_object_get(specials, name);
    json_t *list = json_object_get(ent, "ids");
    if (!json_is_array(list)) return ln_errf(e, "post_processor: special token \"%s\" has no ids", name);
    size_t i;
    json_t *x;
    json_array_foreach(list, i, x) {
        if (*n >= 8) return ln_errf(e, "post_processor: more than 8 special ids around a sequence");
        ids[(*n)++] = (int32_t)json_integer_value(x);
    }
    return 0;
}

static int load_post_processor(ln_tokenizer *t, json_t *p, ln_err *e) {
    if (!p || json_is_null(p)) return 0;
    const char *type = json_str(p, "type");
    if (!type) return ln_errf(e, "post_processor has no \"type\"");
    if (!strcmp(type, "Sequence")) {
        json_t *list = json_object_get(p, "processors");
        size_t i;
        json_t *x;
        json_array_foreach(list, i, x) if (load_post_processor(t, x, e)) return -1;
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) return 0; /* only adjusts offsets (trim_offsets), never ids */
    if (!strcmp(type, "TemplateProcessing")) {
        json_t *single = json_object_get(p, "single"), *specials = json_object_get(p, "special_tokens");
        int seen_a = 0;
        size_t i;
        json_t *x;
        t->n_pre = t->n_post = 0;
        json_array_foreach(single, i, x) {
            json_t *sp = json_object_get(x, "SpecialToken");
            if (sp) {
                const char *name = json_str(sp, "id");
                if (!name) return ln_errf(e, "post_processor: SpecialToken without id");
                if (template_ids(specials, name, seen_a ? t->post_ids : t->pre_ids,
                                 seen_a ? &t->n_post : &t->n_pre, e))
                    return -1;
            } else if (json_object_get(x, "Sequence")) {
                seen_a = 1;
            } else {
                return ln_errf(e, "post_processor: TemplateProcessing item %zu is neither SpecialToken nor Sequence", i);
            }
        }
        return 0;
    }
    if (!strcmp(type, "BertProcessing") || !strcmp(type, "RobertaProcessing")) {
        json_t *cls = json_object_get(p, "cls"), *sep = json_object_get(p, "sep");
        if (!json_is_array(cls) || !json_is_array(sep)) return ln_errf(e, "post_processor %s: cls/sep missing", type);
        t->pre_ids[0] = (int32_t)json_integer_value(json_array_get(cls, 1));
        t->post_ids[0] = (int32_t)json_integer_value(json_array_get(sep, 1));
        t->n_pre = t->n_post = 1;
        return 0;
    }
    return ln_errf(e, "post_processor \"%s\" is not supported (supported: Sequence, ByteLevel, "
                      "TemplateProcessing, BertProcessing, RobertaProcessing)", type);
}

/* Sorts added tokens longest-first inside each first-byte bucket (leftmost-longest matching). */
static int cmp_added_len(const void *a, const void *b, void *ctx) {
    const added_tok *t = ctx;
    return t[*(const int32_t *)b].match.len - t[*(const int32_t *)a].match.len;
}

static void index_added_where(ln_tokenizer *t, int normalized, int32_t **index) {
    int count[256] = {0};
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].match.len && t->added[i].normalized == normalized) count[t->added[i].match.p[0]]++;
    for (int b = 0; b < 256; b++) {
        if (!count[b]) continue;
        int32_t *list = ln_xmalloc((size_t)(count[b] + 1) * sizeof *list);
        int k = 0;
        for (int i = 0; i < t->n_added; i++)
            if (t->added[i].match.len && t->added[i].normalized == normalized && t->added[i].match.p[0] == b)
                list[k++] = i;
        qsort_r(list, (size_t)k, sizeof *list, cmp_added_len, t->added);
        list[k] = -1;
        index[b] = list;
    }
}

static void index_added(ln_tokenizer *t) {
    index_added_where(t, 0, t->added_raw);
    index_added_where(t, 1, t->added_norm);
    for (int i = 0; i < t->n_added; i++) t->has_norm_added |= t->added[i].normalized && t->added[i].match.len;
}

static int32_t config_token_id(ln_tokenizer *t, json_t *cfg, const char *key) {
    json_t *v = json_object_get(cfg, key);
    const char *s = json_is_string(v) ? json_string_value(v) : json_str(v, "content");
    return s ? ln_tokenizer_token_id(t, s) : -1;
}

/* tokenizer_config.json: bos_token / eos_token (a string or {"content": …}) and chat_template;
 * newer transformers write the template to chat_template.jinja beside it instead. */
static void load_config(ln_tokenizer *t, const char *dir) {
    char *jinja = ln_path_join(dir, "chat_template.jinja");
    size_t jl;
    ln_err ignored;
    if (ln_file_exists(jinja)) ln_read_file(jinja, &t->chat_template, &jl, &ignored);
    free(jinja);
    char *path = ln_path_join(dir, "tokenizer_config.json");
    json_error_t je;
    json_t *cfg = ln_file_exists(path) ? json_load_file(path, 0, &je) : NULL;
    free(path);
    if (!cfg) return;
    int32_t b = config_token_id(t, cfg, "bos_token"), eo = config_token_id(t, cfg, "eos_token");
    if (b >= 0) t->bos = b;
    if (eo >= 0) t->eos = eo;
    json_t *ct = json_object_get(cfg, "chat_template");
    if (json_is_string(ct) && !t->chat_template) t->chat_template = ln_xstrdup(json_string_value(ct));
    json_decref(cfg);
}

static aligned aligned_from_input(const uint8_t *seg, size_t n, int base);
static void aligned_free(aligned *a);
static void apply_norm_step(const norm_step *ns, uint8_t **cur_p, int32_t **al_p, size_t *m_p);

static int load_model(ln_tokenizer *t, json_t *model, json_t *added, int byte_level, ln_err *e) {
    const char *type = json_str(model, "type");
    if (!type || strcmp(type, "BPE")) return ln_errf(e, "model type \"%s\" is not supported (only BPE)", type ? type : "?");
    json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab)) return ln_errf(e, "model.vocab is missing or not an object");
    if (!json_is_array(merges)) return ln_errf(e, "model.merges is missing or not an array");
    if (json_is_string(json_object_get(model, "continuing_subword_prefix")) ||
        json_is_string(json_object_get(model, "end_of_word_suffix")))
        return ln_errf(e, "model: continuing_subword_prefix / end_of_word_suffix are not supported");
    t->byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    t->fuse_unk = json_is_true(json_object_get(model, "fuse_unk"));
    t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
    t->byte_level = byte_level;

    /* id space: the largest id among the vocabulary and the added tokens */
    int64_t max_id = -1;
    const char *key;
    json_t *v;
    json_object_foreach(vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 0x7FFFFFF)
            return ln_errf(e, "model.vocab[\"%s\"] is not a valid id", key);
        if (json_integer_value(v) > max_id) max_id = json_integer_value(v);
    }
    size_t i;
    json_t *x;
    json_array_foreach(added, i, x) {
        json_t *id = json_object_get(x, "id");
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) > 0x7FFFFFF ||
            !json_str(x, "content"))
            return ln_errf(e, "added_tokens[%zu] needs an integer \"id\" and a \"content\" string", i);
        if (json_integer_value(id) > max_id) max_id = json_integer_value(id);
    }
    if (max_id < 0) return ln_errf(e, "model.vocab is empty");
    t->n_ids = (int)max_id + 1;
    t->text = ln_xcalloc((size_t)t->n_ids, sizeof *t->text);
    t->bpe = ln_xcalloc((size_t)t->n_ids, sizeof *t->bpe);
    t->text_keys = ln_xcalloc((size_t)t->n_ids, sizeof *t->text_keys);
    t->is_special = ln_xcalloc((size_t)t->n_ids, 1);

    uint32_t byte_to_cp[256];
    int16_t cp_to_byte[324];
    byte_alphabet(byte_to_cp);
    for (int k = 0; k < 324; k++) cp_to_byte[k] = -1;
    for (int b = 0; b < 256; b++) cp_to_byte[byte_to_cp[b]] = (int16_t)b;

    str_map_init(&t->vocab, t->bpe, (int)json_object_size(vocab));
    json_object_foreach(vocab, key, v) {
        int32_t id = (int32_t)json_integer_value(v);
        size_t n = strlen(key);
        if (t->text[id]) return ln_errf(e, "model.vocab: id %d is given to both \"%s\" and \"%s\"", id, t->text[id], key);
        t->text[id] = ln_xstrdup(key);
        t->text_keys[id] = (bytes_t){(uint8_t *)t->text[id], (int)n};
        if (!(byte_level && byte_level_decode((const uint8_t *)key, n, cp_to_byte, &t->bpe[id])))
            t->bpe[id] = bytes_dup(key, n);
        str_map_put(&t->vocab, id);
    }
    for (int b = 0; b < 256; b++) {
        t->byte_id[b] = -1;
        if (byte_level) {
            uint8_t c = (uint8_t)b;
            t->byte_id[b] = str_map_get(&t->vocab, &c, 1);
        } else if (t->byte_fallback) {
            char name[8];
            snprintf(name, sizeof name, "<0x%02X>", b);
            t->byte_id[b] = str_map_get(&t->vocab, (const uint8_t *)name, 6);
        }
    }
    const char *unk = json_str(model, "unk_token");
    t->unk_id = unk ? str_map_get(&t->vocab, (const uint8_t *)unk, strlen(unk)) : -1;

    /* merges: "a b" strings (older files) or ["a", "b"] pairs (newer) */
    pair_map_init(&t->merges, (int)json_array_size(merges));
    json_array_foreach(merges, i, x) {
        const char *a = NULL, *b = NULL;
        char *own = NULL;
        if (json_is_string(x)) {
            own = ln_xstrdup(json_string_value(x));
            char *sp = strchr(own, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                free(own);
                return ln_errf(e, "model.merges[%zu] = \"%s\" is not two tokens separated by one space", i,
                               json_string_value(x));
            }
            *sp = 0;
            a = own;
            b = sp + 1;
        } else if (json_is_array(x) && json_array_size(x) == 2) {
            a = json_string_value(json_array_get(x, 0));
            b = json_string_value(json_array_get(x, 1));
        }
        if (!a || !b) return ln_errf(e, "model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", i);
        size_t la = strlen(a), lb = strlen(b);
        char *ab = ln_xmalloc(la + lb + 1);
        memcpy(ab, a, la);
        memcpy(ab + la, b, lb + 1);
        int32_t ia = -1, ib = -1, iab = -1;
        json_t *ja = json_object_get(vocab, a), *jb = json_object_get(vocab, b), *jab = json_object_get(vocab, ab);
        if (ja) ia = (int32_t)json_integer_value(ja);
        if (jb) ib = (int32_t)json_integer_value(jb);
        if (jab) iab = (int32_t)json_integer_value(jab);
        int rc = 0;
        if (ia < 0 || ib < 0 || iab < 0)
            rc = ln_errf(e, "model.merges[%zu] (\"%s\" + \"%s\"): \"%s\" is not in the vocabulary", i, a, b,
                         ia < 0 ? a : ib < 0 ? b : ab);
        else
            pair_map_put(&t->merges, ia, ib, (int32_t)i, iab);
        free(ab);
        free(own);
        if (rc) return -1;
    }

    /* added tokens: they may repeat vocabulary entries (LLaMA 2's <unk>, <s>, </s>) */
    t->n_added = (int)json_array_size(added);
    t->added = ln_xcalloc((size_t)(t->n_added ? t->n_added : 1), sizeof *t->added);
    json_array_foreach(added, i, x) {
        const char *c = json_str(x, "content");
        int32_t id = (int32_t)json_integer_value(json_object_get(x, "id"));
        added_tok *a = &t->added[i];
        a->content = bytes_dup(c, strlen(c));
        a->id = id;
        a->special = json_is_true(json_object_get(x, "special"));
        a->lstrip = json_is_true(json_object_get(x, "lstrip"));
        a->rstrip = json_is_true(json_object_get(x, "rstrip"));
        a->single_word = json_is_true(json_object_get(x, "single_word"));
        /* "normalized" defaults to true for non-special tokens, as in HF's AddedToken */
        json_t *nz = json_object_get(x, "normalized");
        a->normalized = nz ? json_is_true(nz) : !a->special;
        a->match = a->content;
        if (a->normalized && t->n_norm && a->content.len) {
            /* HF looks for the normalized form (LLaMA 2: "foo" is found as "▁foo") */
            aligned m = aligned_from_input(a->content.p, (size_t)a->content.len, 0);
            for (int st = 0; st < t->n_norm; st++) apply_norm_step(&t->norm[st], &m.p, &m.al, &m.n);
            a->match = bytes_dup(m.p, m.n);
            aligned_free(&m);
        }
        t->is_special[id] = (uint8_t)a->special;
        if (!t->text[id]) {
            /* HF spells (and decodes) a normalized added token by its normalized form */
            t->text[id] = strndup((const char *)a->match.p, (size_t)a->match.len);
            t->text_keys[id] = (bytes_t){(uint8_t *)t->text[id], a->match.len};
            t->bpe[id] = bytes_dup(a->match.p, (size_t)a->match.len);
        }
    }
    index_added(t);
    str_map_init(&t->by_text, t->text_keys, t->n_ids);
    for (int id = 0; id < t->n_ids; id++) if (t->text[id]) str_map_put(&t->by_text, id);
    /* An added token's content names it even where the vocabulary spells that id differently. */
    return 0;
}

int ln_tokenizer_load(const char *path, ln_tokenizer **out, ln_err *e) {
    *out = NULL;
    struct stat st;
    char *file = NULL, *dir = NULL;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        file = ln_path_join(path, "tokenizer.json");
        dir = ln_xstrdup(path);
    } else {
        file = ln_xstrdup(path);
        const char *slash = strrchr(path, '/');
        dir = slash ? strndup(path, (size_t)(slash - path)) : ln_xstrdup(".");
        if (!dir) dir = ln_xstrdup(".");
    }
    json_error_t je;
    json_t *root = json_load_file(file, 0, &je);
    ln_tokenizer *t = NULL;
    int rc = -1;
    if (!root) {
        if (!ln_file_exists(file)) ln_errf(e, "%s: no such file (a model folder needs tokenizer.json)", file);
        else ln_errf(e, "%s: bad JSON at line %d column %d: %s", file, je.line, je.column, je.text);
        goto out;
    }
    t = ln_xcalloc(1, sizeof *t);
    t->bos = t->eos = t->unk_id = -1;
    int saw_byte_level = 0;
    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_array(added)) { ln_errf(e, "added_tokens is not an array"); goto bad; }
    if (load_normalizer(t, json_object_get(root, "normalizer"), e)) goto bad;
    if (load_pre_tokenizer(t, json_object_get(root, "pre_tokenizer"), &saw_byte_level, e)) goto bad;
    json_t *no_added = json_array();
    int mrc = load_model(t, json_object_get(root, "model"), added ? added : no_added, saw_byte_level, e);
    json_decref(no_added);
    if (mrc) goto bad;
    if (load_post_processor(t, json_object_get(root, "post_processor"), e)) goto bad;
    if (load_decoder(t, json_object_get(root, "decoder"), e)) goto bad;
    if (saw_byte_level && t->n_norm) { ln_errf(e, "a normalizer together with ByteLevel is not supported"); goto bad; }
    for (int i = 0; i < t->n_pre + t->n_post; i++) {
        int32_t id = i < t->n_pre ? t->pre_ids[i] : t->post_ids[i - t->n_pre];
        if (id < 0 || id >= t->n_ids) { ln_errf(e, "post_processor: id %d is outside the vocabulary", id); goto bad; }
    }
    /* BOS/EOS: the post-processor's first id, else the well-known names; the config overrides. */
    if (t->n_pre) t->bos = t->pre_ids[0];
    static const char *const bos_names[] = {"<|begin_of_text|>", "<s>"};
    static const char *const eos_names[] = {"<|end_of_text|>", "</s>", "<|endoftext|>"};
    for (int k = 0; k < 2 && t->bos < 0; k++) t->bos = ln_tokenizer_token_id(t, bos_names[k]);
    for (int k = 0; k < 3 && t->eos < 0; k++) t->eos = ln_tokenizer_token_id(t, eos_names[k]);
    load_config(t, dir);
    rc = 0;
    *out = t;
    goto out;
bad:
    ln_err_prefix(e, "%s", file);
    ln_tokenizer_free(t);
out:
    if (root) json_decref(root);
    free(file);
    free(dir);
    return rc;
}

void ln_tokenizer_free(ln_tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_ids; i++) {
        free(t->text[i]);
        free(t->bpe[i].p);
    }
    free(t->text);
    free(t->bpe);
    free(t->text_keys);
    free(t->is_special);
    free(t->vocab.slots);
    free(t->by_text.slots);
    free(t->merges.keys);
    free(t->merges.rank);
    free(t->merges.merged);
    for (int i = 0; i < t->n_norm; i++) { free(t->norm[i].a.p); free(t->norm[i].b.p); }
    free(t->norm);
    free(t->meta_rep.p);
    for (int i = 0; i < t->n_dec; i++) { free(t->dec[i].a.p); free(t->dec[i].b.p); }
    free(t->dec);
    for (int i = 0; i < t->n_added; i++) {
        if (t->added[i].match.p != t->added[i].content.p) free(t->added[i].match.p);
        free(t->added[i].content.p);
    }
    free(t->added);
    for (int b = 0; b < 256; b++) { free(t->added_raw[b]); free(t->added_norm[b]); }
    free(t->chat_template);
    free(t);
}

/* ---------------------------------------------------------------------------------------------
 * BPE on one word
 * ------------------------------------------------------------------------------------------- */

typedef struct merge_cand {
    int32_t rank, pos, merged;
} merge_cand;

/* Scratch buffers of one encode call (so the tokenizer itself stays read-only). */
typedef struct scratch {
    int32_t *id, *start, *len, *prev, *next;
    int cap;
    merge_cand *heap;
    int heap_n, heap_cap;
} scratch;

static void scratch_reserve(scratch *s, int n) {
    if (n <= s->cap) return;
    int cap = s->cap ? s->cap : 64;
    while (cap < n) cap *= 2;
    s->id = ln_xrealloc(s->id, (size_t)cap * sizeof *s->id);
    s->start = ln_xrealloc(s->start, (size_t)cap * sizeof *s->start);
    s->len = ln_xrealloc(s->len, (size_t)cap * sizeof *s->len);
    s->prev = ln_xrealloc(s->prev, (size_t)cap * sizeof *s->prev);
    s->next = ln_xrealloc(s->next, (size_t)cap * sizeof *s->next);
    s->cap = cap;
}

static void scratch_free(scratch *s) {
    free(s->id); free(s->start); free(s->len); free(s->prev); free(s->next);
    free(s->heap);
}

static inline int cand_less(const merge_cand *a, const merge_cand *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(scratch *s, merge_cand c) {
    if (s->heap_n == s->heap_cap) {
        s->heap_cap = s->heap_cap ? s->heap_cap * 2 : 64;
        s->heap = ln_xrealloc(s->heap, (size_t)s->heap_cap * sizeof *s->heap);
    }
    int i = s->heap_n++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!cand_less(&c, &s->heap[p])) break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = c;
}

static merge_cand heap_pop(scratch *s) {
    merge_cand top = s->heap[0], last = s->heap[--s->heap_n];
    int i = 0, n = s->heap_n;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        const merge_cand *best = &last;
        if (l < n && cand_less(&s->heap[l], best)) { m = l; best = &s->heap[l]; }
        if (r < n && cand_less(&s->heap[r], best)) m = r;
        if (m == i) break;
        s->heap[i] = s->heap[m];
        i = m;
    }
    if (n) s->heap[i] = last;
    return top;
}

static void push_pair(const ln_tokenizer *t, scratch *s, int pos) {
    int nx = s->next[pos];
    if (nx < 0) return;
    merge_cand c;
    if (pair_map_get(&t->merges, s->id[pos], s->id[nx], &c.rank, &c.merged)) {
        c.pos = pos;
        heap_push(s, c);
    }
}

/* Builds the initial symbols of word w[0..n): bytes for byte-level; else characters, with
 * <0xHH> byte fallback or (fused) unk for characters outside the vocabulary. */
static int word_symbols(const ln_tokenizer *t, scratch *s, const uint8_t *w, int n) {
    scratch_reserve(s, n + 1);
    int k = 0;
    if (t->byte_level) {
        for (int i = 0; i < n; i++) {
            int32_t id = t->byte_id[w[i]];
            if (id < 0) id = t->unk_id;
            if (id < 0) continue;
            s->id[k] = id; s->start[k] = i; s->len[k] = 1; k++;
        }
        return k;
    }
    int prev_unk = 0;
    for (int i = 0; i < n;) {
        uint32_t cp;
        int cl = ln_utf8_next(w + i, (size_t)(n - i), &cp);
        int32_t id = str_map_get(&t->vocab, w + i, (size_t)cl);
        if (id >= 0) {
            s->id[k] = id; s->start[k] = i; s->len[k] = cl; k++;
            prev_unk = 0;
        } else {
            int all = t->byte_fallback;
            for (int b = 0; all && b < cl; b++) all = t->byte_id[w[i + b]] >= 0;
            if (all) {
                for (int b = 0; b < cl; b++) { s->id[k] = t->byte_id[w[i + b]]; s->start[k] = i + b; s->len[k] = 1; k++; }
                prev_unk = 0;
            } else if (t->unk_id >= 0) {
                if (t->fuse_unk && prev_unk) s->len[k - 1] += cl;
                else { s->id[k] = t->unk_id; s->start[k] = i; s->len[k] = cl; k++; }
                prev_unk = 1;
            }
        }
        i += cl;
    }
    return k;
}

/* Encodes one word; appends ids and (if offs) each token's byte range within the word + base. */
static void bpe_word(const ln_tokenizer *t, scratch *s, const uint8_t *w, int n, int base, ln_ids *out,
                     ln_ids *offs) {
    if (n == 0) return;
    if (t->ignore_merges) {
        int32_t id = str_map_get(&t->vocab, w, (size_t)n);
        if (id >= 0) {
            ln_ids_push(out, id);
            if (offs) { ln_ids_push(offs, base); ln_ids_push(offs, base + n); }
            return;
        }
    }
    int k = word_symbols(t, s, w, n);
    for (int i = 0; i < k; i++) { s->prev[i] = i - 1; s->next[i] = i + 1 < k ? i + 1 : -1; }
    s->heap_n = 0;
    for (int i = 0; i + 1 < k; i++) push_pair(t, s, i);
    while (s->heap_n) {
        merge_cand c = heap_pop(s);
        int p = c.pos, nx = s->next[p];
        if (s->len[p] == 0 || nx < 0) continue;          /* merged away meanwhile */
        int32_t r, m;
        if (!pair_map_get(&t->merges, s->id[p], s->id[nx], &r, &m) || m != c.merged) continue; /* stale */
        s->id[p] = m;
        s->len[p] += s->len[nx];
        s->len[nx] = 0;
        s->next[p] = s->next[nx];
        if (s->next[p] >= 0) s->prev[s->next[p]] = p;
        if (s->prev[p] >= 0) push_pair(t, s, s->prev[p]);
        push_pair(t, s, p);
    }
    for (int i = k ? 0 : -1; i >= 0; i = s->next[i]) {
        ln_ids_push(out, s->id[i]);
        if (offs) { ln_ids_push(offs, base + s->start[i]); ln_ids_push(offs, base + s->start[i] + s->len[i]); }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Encoding
 * ------------------------------------------------------------------------------------------- */

/* Widens [a, b) in text to whole UTF-8 characters (HF offsets count characters). */
static void widen_to_chars(const uint8_t *text, size_t len, int32_t *a, int32_t *b) {
    while (*a > 0 && (text[*a] & 0xC0) == 0x80) (*a)--;
    while ((size_t)*b < len && (text[*b] & 0xC0) == 0x80) (*b)++;
}

/* One normalizer step on (*cur, *al, *m): the text, its alignment (2 ints per byte), its length.
 * Prepend: the new bytes take the first character's original range (nothing on empty text).
 * Replace: the new bytes take the range of the text they replace. */
static void apply_norm_step(const norm_step *ns, uint8_t **cur_p, int32_t **al_p, size_t *m_p) {
    uint8_t *cur = *cur_p;
    int32_t *al = *al_p;
    size_t m = *m_p;
    size_t grow = ns->kind == NORM_PREPEND ? m + (size_t)ns->a.len
                : m / (size_t)ns->a.len * (size_t)(ns->b.len > ns->a.len ? ns->b.len : ns->a.len) + m;
    uint8_t *nx = ln_xmalloc(grow + 1);
    int32_t *na = ln_xmalloc((grow + 1) * 2 * sizeof *na);
    size_t k = 0;
    if (ns->kind == NORM_PREPEND) {
        if (m) {
            for (int j = 0; j < ns->a.len; j++) { nx[k] = ns->a.p[j]; na[2 * k] = al[0]; na[2 * k + 1] = al[1]; k++; }
            memcpy(nx + k, cur, m);
            memcpy(na + 2 * k, al, m * 2 * sizeof *al);
            k += m;
        }
    } else {
        size_t la = (size_t)ns->a.len;
        for (size_t i = 0; i < m;) {
            if (i + la <= m && memcmp(cur + i, ns->a.p, la) == 0) {
                int32_t os = al[2 * i], oe = al[2 * (i + la - 1) + 1];
                for (int j = 0; j < ns->b.len; j++) { nx[k] = ns->b.p[j]; na[2 * k] = os; na[2 * k + 1] = oe; k++; }
                i += la;
            } else {
                nx[k] = cur[i]; na[2 * k] = al[2 * i]; na[2 * k + 1] = al[2 * i + 1]; k++; i++;
            }
        }
    }
    free(cur);
    free(al);
    *cur_p = nx;
    *al_p = na;
    *m_p = k;
}



static aligned aligned_copy(const uint8_t *p, const int32_t *al, size_t n) {
    aligned a = {ln_xmalloc(n + 1), ln_xmalloc((n + 1) * 2 * sizeof(int32_t)), n};
    memcpy(a.p, p, n);
    memcpy(a.al, al, n * 2 * sizeof(int32_t));
    return a;
}

/* seg[0..n) of the input, whose first byte is at original offset base. */
static aligned aligned_from_input(const uint8_t *seg, size_t n, int base) {
    aligned a = {ln_xmalloc(n + 1), ln_xmalloc((n + 1) * 2 * sizeof(int32_t)), n};
    memcpy(a.p, seg, n);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int cl = ln_utf8_next(seg + i, n - i, &cp);
        for (int k = 0; k < cl; k++) {
            a.al[2 * (i + (size_t)k)] = base + (int32_t)i;
            a.al[2 * (i + (size_t)k) + 1] = base + (int32_t)i + cl;
        }
        i += (size_t)cl;
    }
    return a;
}

static void aligned_free(aligned *a) {
    free(a->p);
    free(a->al);
}

static int find_added(const ln_tokenizer *t, int32_t *const *index, const uint8_t *text, size_t n, size_t from,
                      size_t *start, size_t *stop);

/* Pre-tokenizes one piece (text between added tokens, already normalized) and runs BPE on each
 * word; offsets go through the piece's alignment. Metaspace and ByteLevel's add_prefix_space work
 * here, per piece, as HF's pre-tokenizers do. */
static void encode_piece(const ln_tokenizer *t, scratch *s, const uint8_t *p, const int32_t *al, size_t n,
                         ln_ids *out, ln_ids *offs) {
    if (n == 0) return;
    int transform = t->prefix_segment || t->meta;
    aligned w = transform ? aligned_copy(p, al, n) : (aligned){(uint8_t *)p, (int32_t *)al, n};
    if (t->prefix_segment && w.p[0] != ' ') {
        norm_step pre = {NORM_PREPEND, {(uint8_t *)" ", 1}, {0}};
        apply_norm_step(&pre, &w.p, &w.al, &w.n);
    }
    if (t->meta) {
        /* Metaspace: spaces become the replacement, which is then prepended unless the piece
         * already starts with it ("first": only to the piece that starts the input) */
        bytes_t space = {(uint8_t *)" ", 1};
        norm_step rep = {NORM_REPLACE, space, t->meta_rep};
        apply_norm_step(&rep, &w.p, &w.al, &w.n);
        int starts = w.n >= (size_t)t->meta_rep.len && !memcmp(w.p, t->meta_rep.p, (size_t)t->meta_rep.len);
        if (!starts && (t->meta_prepend == 1 || (t->meta_prepend == 2 && w.al[0] == 0))) {
            norm_step pre = {NORM_PREPEND, t->meta_rep, {0}};
            apply_norm_step(&pre, &w.p, &w.al, &w.n);
        }
    }
    int first = out->n;
    uint8_t *tmp = t->prefix_space ? ln_xmalloc(w.n + 2) : NULL;
    for (size_t pos = 0; pos < w.n;) {
        size_t end = w.n;
        if (t->meta && t->meta_split) {
            /* split before every replacement character, which stays with what follows it */
            size_t rl = (size_t)t->meta_rep.len;
            for (end = pos + 1; end < w.n; end++)
                if (end + rl <= w.n && !memcmp(w.p + end, t->meta_rep.p, rl)) break;
        } else if (t->has_split) {
            end = ln_split_match(t->split, w.p, w.n, pos);
        }
        if (t->prefix_space && w.p[pos] != ' ') {
            /* ByteLevel add_prefix_space after a Split: a space before each piece that lacks one;
             * it stands for the piece's first character */
            tmp[0] = ' ';
            memcpy(tmp + 1, w.p + pos, end - pos);
            int before = out->n;
            bpe_word(t, s, tmp, (int)(end - pos + 1), (int)pos - 1, out, offs);
            for (int i = before; offs && i < out->n; i++) {
                if (offs->ids[2 * i] < (int32_t)pos) offs->ids[2 * i] = (int32_t)pos;
                if (offs->ids[2 * i + 1] <= (int32_t)pos) offs->ids[2 * i + 1] = (int32_t)pos + 1;
            }
        } else {
            bpe_word(t, s, w.p + pos, (int)(end - pos), (int)pos, out, offs);
        }
        pos = end;
    }
    if (offs) /* piece byte ranges -> original character ranges */
        for (int i = first; i < out->n; i++) {
            int32_t a = offs->ids[2 * i], b = offs->ids[2 * i + 1];
            offs->ids[2 * i] = w.al[2 * a];
            offs->ids[2 * i + 1] = w.al[2 * (b - 1) + 1];
        }
    free(tmp);
    if (transform) aligned_free(&w);
}

/* Encodes a stretch of input that holds no (non-normalized) added token: normalizer, then the
 * normalized added tokens matched in the normalized text, then each piece between them
 * pre-tokenized and BPE'd — HF's order. base = the stretch's offset in the whole input. */
static void encode_segment(const ln_tokenizer *t, scratch *s, const uint8_t *text, size_t text_len,
                           size_t base, size_t n, ln_ids *out, ln_ids *offs) {
    const uint8_t *seg = text + base;
    if (n == 0) return;
    if (!t->n_norm && !t->has_norm_added && !t->meta && !t->prefix_segment && !t->prefix_space) {
        /* the common byte-level path: no text changes, offsets are the input's bytes */
        int first = out->n;
        for (size_t pos = 0; pos < n;) {
            size_t end = t->has_split ? ln_split_match(t->split, seg, n, pos) : n;
            bpe_word(t, s, seg + pos, (int)(end - pos), (int)(base + pos), out, offs);
            pos = end;
        }
        if (offs)
            for (int i = first; i < out->n; i++) widen_to_chars(text, text_len, &offs->ids[2 * i], &offs->ids[2 * i + 1]);
        return;
    }
    aligned a = aligned_from_input(seg, n, (int)base);
    for (int st = 0; st < t->n_norm; st++) apply_norm_step(&t->norm[st], &a.p, &a.al, &a.n);
    for (size_t pos = 0; pos < a.n;) {
        size_t at = a.n, stop = a.n;
        int k = t->has_norm_added ? find_added(t, t->added_norm, a.p, a.n, pos, &at, &stop) : -1;
        encode_piece(t, s, a.p + pos, a.al + 2 * pos, (k >= 0 ? at : a.n) - pos, out, offs);
        if (k < 0) break;
        ln_ids_push(out, t->added[k].id);
        if (offs) { ln_ids_push(offs, a.al[2 * at]); ln_ids_push(offs, a.al[2 * (stop - 1) + 1]); }
        pos = stop;
    }
    aligned_free(&a);
}

/* Leftmost-longest added token at or after pos: returns its index and start, or -1. */
static int next_added(const ln_tokenizer *t, int32_t *const *index, const uint8_t *text, size_t n, size_t pos,
                      size_t *at) {
    if (!t->n_added) return -1;
    for (size_t i = pos; i < n; i++) {
        const int32_t *list = index[text[i]];
        if (!list) continue;
        for (; *list >= 0; list++) {
            const added_tok *a = &t->added[*list];
            if (i + (size_t)a->match.len <= n && memcmp(text + i, a->match.p, (size_t)a->match.len) == 0) {
                *at = i;
                return *list;
            }
        }
    }
    return -1;
}

/* Class of the character that ends at text[end) (walking back over continuation bytes). */
static int class_before(const uint8_t *text, size_t end, size_t *start) {
    size_t i = end - 1;
    while (i > 0 && (text[i] & 0xC0) == 0x80) i--;
    uint32_t cp;
    ln_utf8_next(text + i, end - i, &cp);
    *start = i;
    return ln_uni_class(cp);
}

/* The next added token as HF's AddedVocabulary finds it: matches scanned left to right, a
 * single_word token discarded unless it stands between non-word characters, and lstrip/rstrip
 * widening the match over whitespace (never back into what an earlier match took: from). */
static int find_added(const ln_tokenizer *t, int32_t *const *index, const uint8_t *text, size_t n, size_t from,
                      size_t *start, size_t *stop) {
    for (size_t search = from;;) {
        size_t at;
        int a = next_added(t, index, text, n, search, &at);
        if (a < 0) return -1;
        const added_tok *tok = &t->added[a];
        size_t s = at, e = at + (size_t)tok->match.len;
        if (tok->single_word) {
            size_t p;
            uint32_t cp;
            int word_before = s > 0 && (class_before(text, s, &p) & (LN_UNI_LETTER | LN_UNI_NUMBER));
            int word_after = e < n && ln_utf8_next(text + e, n - e, &cp) &&
                             (ln_uni_class(cp) & (LN_UNI_LETTER | LN_UNI_NUMBER));
            if (word_before || word_after) { search = e; continue; } /* HF skips past it, too */
        }
        if (tok->lstrip) {
            size_t p;
            while (s > from && (class_before(text, s, &p) & LN_UNI_SPACE)) s = p;
        }
        if (tok->rstrip) {
            uint32_t cp;
            while (e < n) {
                int l = ln_utf8_next(text + e, n - e, &cp);
                if (!(ln_uni_class(cp) & LN_UNI_SPACE)) break;
                e += (size_t)l;
            }
        }
        *start = s;
        *stop = e;
        return a;
    }
}

int ln_tokenizer_encode(const ln_tokenizer *t, const char *text_in, size_t len, int add_special,
                        ln_ids *out, ln_ids *offs, ln_err *e) {
    const uint8_t *text = (const uint8_t *)text_in;
    scratch s = {0};
    if (len > (size_t)INT32_MAX / 4) return ln_errf(e, "text to tokenize is too long (%zu bytes)", len);
    if (add_special)
        for (int i = 0; i < t->n_pre; i++) {
            ln_ids_push(out, t->pre_ids[i]);
            if (offs) { ln_ids_push(offs, 0); ln_ids_push(offs, 0); }
        }
    size_t pos = 0;
    while (pos < len) {
        size_t at = len, stop = len;
        int a = find_added(t, t->added_raw, text, len, pos, &at, &stop);
        encode_segment(t, &s, text, len, pos, (a >= 0 ? at : len) - pos, out, offs);
        if (a < 0) break;
        ln_ids_push(out, t->added[a].id);
        if (offs) { ln_ids_push(offs, (int32_t)at); ln_ids_push(offs, (int32_t)stop); }
        pos = stop;
    }
    if (add_special)
        for (int i = 0; i < t->n_post; i++) {
            ln_ids_push(out, t->post_ids[i]);
            if (offs) { ln_ids_push(offs, 0); ln_ids_push(offs, 0); }
        }
    scratch_free(&s);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Decoding
 * ------------------------------------------------------------------------------------------- */

typedef struct strv {
    bytes_t *v;
    int n, cap;
} strv;

static void strv_push(strv *s, const void *p, size_t n) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->v = ln_xrealloc(s->v, (size_t)s->cap * sizeof *s->v);
    }
    s->v[s->n++] = bytes_dup(p, n);
}

static void strv_free(strv *s) {
    for (int i = 0; i < s->n; i++) free(s->v[i].p);
    free(s->v);
    s->v = NULL;
    s->n = s->cap = 0;
}

/* Replaces invalid UTF-8 by U+FFFD, one per maximal invalid subpart (as Rust's from_utf8_lossy). */
static bytes_t utf8_lossy(const uint8_t *p, size_t n) {
    uint8_t *o = ln_xmalloc(n * 3 + 1);
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint8_t c = p[i];
        int need = c < 0x80 ? 0 : (c >= 0xC2 && c <= 0xDF) ? 1 : (c >= 0xE0 && c <= 0xEF) ? 2 : (c >= 0xF0 && c <= 0xF4) ? 3 : -1;
        if (need == 0) { o[k++] = c; i++; continue; }
        size_t j = i + 1;
        int ok = need > 0;
        for (int q = 0; ok && q < need; q++, j++) {
            if (j >= n) { ok = 0; break; }
            uint8_t lo = 0x80, hi = 0xBF;
            if (q == 0) {
                if (c == 0xE0) lo = 0xA0;
                else if (c == 0xED) hi = 0x9F;
                else if (c == 0xF0) lo = 0x90;
                else if (c == 0xF4) hi = 0x8F;
            }
            if (p[j] < lo || p[j] > hi) { ok = 0; break; }
        }
        if (ok) { memcpy(o + k, p + i, j - i); k += j - i; i = j; }
        else { memcpy(o + k, "\xEF\xBF\xBD", 3); k += 3; i = j > i + 1 ? j : i + 1; }
    }
    bytes_t b = {o, (int)k};
    o[k] = 0;
    return b;
}

static void replace_all(bytes_t *tok, const bytes_t *a, const bytes_t *b) {
    if (tok->len < a->len) return;
    size_t cap = (size_t)tok->len / (size_t)a->len * (size_t)(b->len + 1) + (size_t)tok->len + 1;
    uint8_t *o = ln_xmalloc(cap);
    size_t k = 0;
    for (int i = 0; i < tok->len;) {
        if (i + a->len <= tok->len && memcmp(tok->p + i, a->p, (size_t)a->len) == 0) {
            memcpy(o + k, b->p, (size_t)b->len);
            k += (size_t)b->len;
            i += a->len;
        } else {
            o[k++] = tok->p[i++];
        }
    }
    o[k] = 0;
    free(tok->p);
    tok->p = o;
    tok->len = (int)k;
}

static int parse_byte_token(const bytes_t *b) {
    if (b->len != 6 || memcmp(b->p, "<0x", 3) || b->p[5] != '>') return -1;
    unsigned v;
    char hex[3] = {(char)b->p[3], (char)b->p[4], 0};
    char *end;
    v = (unsigned)strtoul(hex, &end, 16);
    return *end ? -1 : (int)v;
}

static void decode_step(const dec_step *st, strv *toks, const int16_t *cp_to_byte) {
    strv out = {0};
    switch (st->kind) {
    case DEC_BYTE_LEVEL: {
        /* each token's chars back to bytes (a token with a char outside the alphabet keeps its
         * UTF-8), all fused into one string, invalid UTF-8 replaced */
        size_t total = 0;
        for (int i = 0; i < toks->n; i++) total += (size_t)toks->v[i].len;
        uint8_t *buf = ln_xmalloc(total + 1);
        size_t k = 0;
        for (int i = 0; i < toks->n; i++) {
            bytes_t raw;
            if (byte_level_decode(toks->v[i].p, (size_t)toks->v[i].len, cp_to_byte, &raw)) {
                memcpy(buf + k, raw.p, (size_t)raw.len);
                k += (size_t)raw.len;
                free(raw.p);
            } else {
                memcpy(buf + k, toks->v[i].p, (size_t)toks->v[i].len);
                k += (size_t)toks->v[i].len;
            }
        }
        bytes_t l = utf8_lossy(buf, k);
        free(buf);
        if (out.n == out.cap) { out.cap = 1; out.v = ln_xmalloc(sizeof *out.v); }
        out.v[out.n++] = l;
        break;
    }
    case DEC_REPLACE:
        for (int i = 0; i < toks->n; i++) replace_all(&toks->v[i], &st->a, &st->b);
        return;
    case DEC_METASPACE: {
        /* every replacement char becomes a space — in the first token it is dropped (HF) */
        bytes_t sp = {(uint8_t *)" ", 1}, none = {(uint8_t *)"", 0};
        for (int i = 0; i < toks->n; i++) replace_all(&toks->v[i], &st->a, i == 0 && st->start ? &none : &sp);
        return;
    }
    case DEC_BYTE_FALLBACK: {
        uint8_t *pending = ln_xmalloc((size_t)toks->n + 1);
        int np = 0;
        for (int i = 0; i <= toks->n; i++) {
            int b = i < toks->n ? parse_byte_token(&toks->v[i]) : -1;
            if (b >= 0) { pending[np++] = (uint8_t)b; continue; }
            if (np) {
                /* a run of byte tokens becomes its text if it is valid UTF-8, else one U+FFFD per byte */
                bytes_t l = utf8_lossy(pending, (size_t)np);
                int valid = l.len == np && !memcmp(l.p, pending, (size_t)np);
                if (valid) strv_push(&out, pending, (size_t)np);
                else for (int q = 0; q < np; q++) strv_push(&out, "\xEF\xBF\xBD", 3);
                free(l.p);
                np = 0;
            }
            if (i < toks->n) strv_push(&out, toks->v[i].p, (size_t)toks->v[i].len);
        }
        free(pending);
        break;
    }
    case DEC_FUSE: {
        size_t total = 0;
        for (int i = 0; i < toks->n; i++) total += (size_t)toks->v[i].len;
        uint8_t *buf = ln_xmalloc(total + 1);
        size_t k = 0;
        for (int i = 0; i < toks->n; i++) { memcpy(buf + k, toks->v[i].p, (size_t)toks->v[i].len); k += (size_t)toks->v[i].len; }
        strv_push(&out, buf, k);
        free(buf);
        break;
    }
    case DEC_STRIP:
        for (int i = 0; i < toks->n; i++) {
            bytes_t *b = &toks->v[i];
            int cut = 0;
            for (int q = 0; q < st->start && cut + st->a.len <= b->len && !memcmp(b->p + cut, st->a.p, (size_t)st->a.len); q++) cut += st->a.len;
            int cute = 0;
            for (int q = 0; q < st->stop && cut + cute + st->a.len <= b->len &&
                            !memcmp(b->p + b->len - cute - st->a.len, st->a.p, (size_t)st->a.len); q++)
                cute += st->a.len;
            memmove(b->p, b->p + cut, (size_t)(b->len - cut));
            b->len -= cut + cute;
            b->p[b->len] = 0;
        }
        return;
    }
    strv_free(toks);
    *toks = out;
}

int ln_tokenizer_decode(const ln_tokenizer *t, const int32_t *ids, int n, int skip_special, char **out,
                        size_t *out_len, ln_err *e) {
    strv toks = {0};
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_ids || !t->text[ids[i]]) {
            strv_free(&toks);
            return ln_errf(e, "cannot decode id %d at position %d: not in the vocabulary (size %d)", ids[i], i, t->n_ids);
        }
        if (skip_special && t->is_special[ids[i]]) continue;
        strv_push(&toks, t->text[ids[i]], strlen(t->text[ids[i]]));
    }
    uint32_t byte_to_cp[256];
    int16_t cp_to_byte[324];
    byte_alphabet(byte_to_cp);
    for (int k = 0; k < 324; k++) cp_to_byte[k] = -1;
    for (int b = 0; b < 256; b++) cp_to_byte[byte_to_cp[b]] = (int16_t)b;
    for (int s = 0; s < t->n_dec; s++) decode_step(&t->dec[s], &toks, cp_to_byte);
    size_t total = 0;
    for (int i = 0; i < toks.n; i++) total += (size_t)toks.v[i].len;
    char *buf = ln_xmalloc(total + 1);
    size_t k = 0;
    for (int i = 0; i < toks.n; i++) { memcpy(buf + k, toks.v[i].p, (size_t)toks.v[i].len); k += (size_t)toks.v[i].len; }
    buf[k] = 0;
    strv_free(&toks);
    *out = buf;
    if (out_len) *out_len = k;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Queries
 * ------------------------------------------------------------------------------------------- */

int ln_tokenizer_vocab_size(const ln_tokenizer *t) { return t->n_ids; }
int32_t ln_tokenizer_bos_id(const ln_tokenizer *t) { return t->bos; }
int32_t ln_tokenizer_eos_id(const ln_tokenizer *t) { return t->eos; }
int ln_tokenizer_is_byte_level(const ln_tokenizer *t) { return t->byte_level; }
const char *ln_tokenizer_chat_template(const ln_tokenizer *t) { return t->chat_template; }

int32_t ln_tokenizer_token_id(const ln_tokenizer *t, const char *token) {
    for (int i = 0; i < t->n_added; i++) /* added contents win, as in HF's token_to_id */
        if ((size_t)t->added[i].content.len == strlen(token) && !memcmp(t->added[i].content.p, token, strlen(token)))
            return t->added[i].id;
    return str_map_get(&t->by_text, (const uint8_t *)token, strlen(token));
}

const char *ln_tokenizer_token_text(const ln_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_ids ? t->text[id] : NULL;
}
