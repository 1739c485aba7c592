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
 * Files: this one loads tokenizer.json and answers queries; tokenizer_encode.c runs steps 1-5;
 * tokenizer_decode.c turns ids back into text; tokenizer_impl.h holds the shared types.
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
#include "worker/engine/tokenizer_impl.h"
#include "worker/engine/unicode.h"

/* ---------------------------------------------------------------------------------------------
 * Small helpers
 * ------------------------------------------------------------------------------------------- */

void ln_ids_push(ln_ids *v, int32_t id) {
    if (v->oom) return;
    if (v->n == v->cap) {
        int cap = v->cap ? v->cap * 2 : 64;
        int32_t *ids = realloc(v->ids, (size_t)cap * sizeof *v->ids);
        if (!ids) {
            v->oom = 1;
            return;
        }
        v->ids = ids;
        v->cap = cap;
    }
    v->ids[v->n++] = id;
}

void ln_ids_free(ln_ids *v) {
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = v->oom = 0;
}

bytes_t ln_tok_bytes_dup(const void *p, size_t n) {
    bytes_t b = {ln_xmalloc(n + 1), (int)n};
    memcpy(b.p, p, n);
    b.p[n] = 0;
    return b;
}

bytes_t ln_tok_bytes_try_dup(const void *p, size_t n) {
    uint8_t *c = malloc(n + 1);
    if (!c) return (bytes_t){NULL, 0};
    memcpy(c, p, n);
    c[n] = 0;
    return (bytes_t){c, (int)n};
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

/* The vocabulary-sized tables fail with this sentence (bytes: what could not be had). */
static int tables_oom(ln_err *e, double bytes, const char *what, int n) {
    char size[32];
    return ln_errf(e, "tokenizer: out of memory allocating %s for %s (%d entries)", ln_fmt_bytes(bytes, size, sizeof size),
                   what, n);
}

static int str_map_init(str_map *m, const bytes_t *keys, int n_keys, ln_err *e) {
    uint32_t cap = pow2_at_least((uint32_t)n_keys * 2 + 1);
    m->slots = calloc(cap, sizeof *m->slots);
    if (!m->slots) return tables_oom(e, (double)cap * sizeof *m->slots, "a token map", n_keys);
    m->mask = cap - 1;
    m->keys = keys;
    return 0;
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

int32_t ln_tok_str_map_get(const str_map *m, const uint8_t *p, size_t n) {
    if (!m->slots) return -1;
    uint32_t i = (uint32_t)hash_bytes(p, n) & m->mask;
    for (;; i = (i + 1) & m->mask) {
        int32_t s = m->slots[i];
        if (!s) return -1;
        const bytes_t *o = &m->keys[s - 1];
        if ((size_t)o->len == n && memcmp(o->p, p, n) == 0) return s - 1;
    }
}


static int pair_map_init(pair_map *m, int n, ln_err *e) {
    uint32_t cap = pow2_at_least((uint32_t)n * 2 + 1);
    m->keys = calloc(cap, sizeof *m->keys);
    m->rank = malloc(cap * sizeof *m->rank);
    m->merged = malloc(cap * sizeof *m->merged);
    if (!m->keys || !m->rank || !m->merged)
        return tables_oom(e, (double)cap * (sizeof *m->keys + sizeof *m->rank + sizeof *m->merged), "the merge map", n);
    m->mask = cap - 1;
    return 0;
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


/* GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves; the other 68 bytes
 * (controls, space, 0x7F-0xA0, 0xAD) are given the code points 256, 257, … in byte order. */
void ln_tok_byte_alphabet(uint32_t byte_to_cp[256]) {
    int k = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        byte_to_cp[b] = printable ? (uint32_t)b : (uint32_t)(256 + k++);
    }
}

/* Maps a byte-level token's text back to raw bytes; 0 if some character is outside the alphabet, −1
 * out of memory. */
int ln_tok_byte_level_decode(const uint8_t *s, size_t n, const int16_t *cp_to_byte, bytes_t *out) {
    uint8_t *buf = malloc(n + 1);
    if (!buf) return -1;
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
        st.a = ln_tok_bytes_dup(p, strlen(p));
    } else if (!strcmp(type, "Replace")) {
        const char *pat = json_str(json_object_get(n, "pattern"), "String");
        const char *c = json_str(n, "content");
        if (!pat || !c || !*pat)
            return ln_errf(e, "normalizer Replace: only a non-empty {\"String\": …} pattern is supported");
        st.kind = NORM_REPLACE;
        st.a = ln_tok_bytes_dup(pat, strlen(pat));
        st.b = ln_tok_bytes_dup(c, strlen(c));
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
        t->meta_rep = ln_tok_bytes_dup(r, strlen(r));
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
        st.a = ln_tok_bytes_dup(pat, strlen(pat));
        st.b = ln_tok_bytes_dup(c, strlen(c));
    } else if (!strcmp(type, "Strip")) {
        const char *c = json_str(d, "content");
        st.kind = DEC_STRIP;
        st.a = ln_tok_bytes_dup(c ? c : " ", strlen(c ? c : " "));
        st.start = (int)json_integer_value(json_object_get(d, "start"));
        st.stop = (int)json_integer_value(json_object_get(d, "stop"));
    } else if (!strcmp(type, "Metaspace")) {
        const char *r = json_str(d, "replacement");
        const char *scheme = json_str(d, "prepend_scheme");
        st.kind = DEC_METASPACE;
        st.a = ln_tok_bytes_dup(r ? r : "\xe2\x96\x81", strlen(r ? r : "\xe2\x96\x81"));
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
    t->text = calloc((size_t)t->n_ids, sizeof *t->text);
    t->bpe = calloc((size_t)t->n_ids, sizeof *t->bpe);
    t->text_keys = calloc((size_t)t->n_ids, sizeof *t->text_keys);
    t->is_special = calloc((size_t)t->n_ids, 1);
    if (!t->text || !t->bpe || !t->text_keys || !t->is_special)
        return tables_oom(e, (double)t->n_ids * (sizeof *t->text + sizeof *t->bpe + sizeof *t->text_keys + 1),
                          "the id tables", t->n_ids);

    uint32_t byte_to_cp[256];
    int16_t cp_to_byte[324];
    ln_tok_byte_alphabet(byte_to_cp);
    for (int k = 0; k < 324; k++) cp_to_byte[k] = -1;
    for (int b = 0; b < 256; b++) cp_to_byte[byte_to_cp[b]] = (int16_t)b;

    if (str_map_init(&t->vocab, t->bpe, (int)json_object_size(vocab), e)) return -1;
    json_object_foreach(vocab, key, v) {
        int32_t id = (int32_t)json_integer_value(v);
        size_t n = strlen(key);
        if (t->text[id]) return ln_errf(e, "model.vocab: id %d is given to both \"%s\" and \"%s\"", id, t->text[id], key);
        t->text[id] = strdup(key);
        int r = !t->text[id] ? -1
                : byte_level ? ln_tok_byte_level_decode((const uint8_t *)key, n, cp_to_byte, &t->bpe[id])
                             : 0;
        if (r == 0) t->bpe[id] = ln_tok_bytes_try_dup(key, n);
        if (r < 0 || !t->bpe[id].p) return tables_oom(e, (double)n + 1, "a vocabulary entry", t->n_ids);
        t->text_keys[id] = (bytes_t){(uint8_t *)t->text[id], (int)n};
        str_map_put(&t->vocab, id);
    }
    for (int b = 0; b < 256; b++) {
        t->byte_id[b] = -1;
        if (byte_level) {
            uint8_t c = (uint8_t)b;
            t->byte_id[b] = ln_tok_str_map_get(&t->vocab, &c, 1);
        } else if (t->byte_fallback) {
            char name[8];
            snprintf(name, sizeof name, "<0x%02X>", b);
            t->byte_id[b] = ln_tok_str_map_get(&t->vocab, (const uint8_t *)name, 6);
        }
    }
    const char *unk = json_str(model, "unk_token");
    t->unk_id = unk ? ln_tok_str_map_get(&t->vocab, (const uint8_t *)unk, strlen(unk)) : -1;

    /* merges: "a b" strings (older files) or ["a", "b"] pairs (newer) */
    if (pair_map_init(&t->merges, (int)json_array_size(merges), e)) return -1;
    json_array_foreach(merges, i, x) {
        const char *a = NULL, *b = NULL;
        char *own = NULL;
        if (json_is_string(x)) {
            own = strdup(json_string_value(x));
            if (!own) return tables_oom(e, (double)json_string_length(x) + 1, "a merge", (int)json_array_size(merges));
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
        char *ab = malloc(la + lb + 1);
        if (!ab) {
            free(own);
            return tables_oom(e, (double)(la + lb + 1), "a merge", (int)json_array_size(merges));
        }
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
        a->content = ln_tok_bytes_dup(c, strlen(c));
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
            aligned m = ln_tok_aligned_from_input(a->content.p, (size_t)a->content.len, 0);
            int bad = !m.p;
            for (int st = 0; st < t->n_norm && !bad; st++) bad = ln_tok_norm_apply(&t->norm[st], &m.p, &m.al, &m.n);
            if (bad) {
                ln_tok_aligned_free(&m);
                return ln_errf(e, "tokenizer: out of memory normalizing added token %d", a->id);
            }
            a->match = ln_tok_bytes_dup(m.p, m.n);
            ln_tok_aligned_free(&m);
        }
        t->is_special[id] = (uint8_t)a->special;
        if (!t->text[id]) {
            /* HF spells (and decodes) a normalized added token by its normalized form */
            t->text[id] = strndup((const char *)a->match.p, (size_t)a->match.len);
            t->text_keys[id] = (bytes_t){(uint8_t *)t->text[id], a->match.len};
            t->bpe[id] = ln_tok_bytes_dup(a->match.p, (size_t)a->match.len);
        }
    }
    index_added(t);
    if (str_map_init(&t->by_text, t->text_keys, t->n_ids, e)) return -1;
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
        else if (json_error_code(&je) == json_error_out_of_memory || !je.text[0])
            ln_errf(e, "%s: out of memory parsing the tokenizer's JSON", file);
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
    for (int i = 0; i < t->n_ids; i++) { /* either table may be missing after an out of memory */
        if (t->text) free(t->text[i]);
        if (t->bpe) free(t->bpe[i].p);
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
    return ln_tok_str_map_get(&t->by_text, (const uint8_t *)token, strlen(token));
}

const char *ln_tokenizer_token_text(const ln_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_ids ? t->text[id] : NULL;
}
