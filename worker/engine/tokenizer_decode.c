/* tokenizer_decode.c — ids to text through the tokenizer.json decoder chain (ByteLevel,
 * Replace, ByteFallback, Fuse, Strip, Metaspace), as HF's decode does. */
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/engine/tokenizer_impl.h"
#include "worker/engine/unicode.h"

/* ---------------------------------------------------------------------------------------------
 * Decoding
 * ------------------------------------------------------------------------------------------- */

typedef struct strv {
    bytes_t *v;
    int n, cap;
    int oom;           /* an allocation failed (the push was dropped): the decode fails */
} strv;

static void strv_push(strv *s, const void *p, size_t n) {
    if (s->oom) return;
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 64;
        bytes_t *v = realloc(s->v, (size_t)cap * sizeof *s->v);
        if (!v) {
            s->oom = 1;
            return;
        }
        s->v = v;
        s->cap = cap;
    }
    bytes_t c = ln_tok_bytes_try_dup(p, n);
    if (!c.p) {
        s->oom = 1;
        return;
    }
    s->v[s->n++] = c;
}

static void strv_free(strv *s) {
    for (int i = 0; i < s->n; i++) free(s->v[i].p);
    free(s->v);
    s->v = NULL;
    s->n = s->cap = 0;
}

/* Replaces invalid UTF-8 by U+FFFD, one per maximal invalid subpart (as Rust's from_utf8_lossy).
 * {NULL, 0} when out of memory. */
static bytes_t utf8_lossy(const uint8_t *p, size_t n) {
    uint8_t *o = malloc(n * 3 + 1);
    if (!o) return (bytes_t){NULL, 0};
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

/* 0, or −1 when out of memory (tok unchanged). */
static int replace_all(bytes_t *tok, const bytes_t *a, const bytes_t *b) {
    if (tok->len < a->len) return 0;
    size_t cap = (size_t)tok->len / (size_t)a->len * (size_t)(b->len + 1) + (size_t)tok->len + 1;
    uint8_t *o = malloc(cap);
    if (!o) return -1;
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
    return 0;
}

static int parse_byte_token(const bytes_t *b) {
    if (b->len != 6 || memcmp(b->p, "<0x", 3) || b->p[5] != '>') return -1;
    unsigned v;
    char hex[3] = {(char)b->p[3], (char)b->p[4], 0};
    char *end;
    v = (unsigned)strtoul(hex, &end, 16);
    return *end ? -1 : (int)v;
}

/* A buffer for every token of toks end to end (+1), or NULL with toks->oom set. */
static uint8_t *strv_joined_buf(strv *toks) {
    size_t total = 0;
    for (int i = 0; i < toks->n; i++) total += (size_t)toks->v[i].len;
    uint8_t *buf = malloc(total + 1);
    if (!buf) toks->oom = 1;
    return buf;
}

/* One decoder step on toks; out of memory is left in toks->oom. */
static void decode_step(const dec_step *st, strv *toks, const int16_t *cp_to_byte) {
    strv out = {0};
    if (toks->oom) return;
    switch (st->kind) {
    case DEC_BYTE_LEVEL: {
        /* each token's chars back to bytes (a token with a char outside the alphabet keeps its
         * UTF-8), all fused into one string, invalid UTF-8 replaced */
        uint8_t *buf = strv_joined_buf(toks);
        if (!buf) return;
        size_t k = 0;
        for (int i = 0; i < toks->n; i++) {
            bytes_t raw;
            int r = ln_tok_byte_level_decode(toks->v[i].p, (size_t)toks->v[i].len, cp_to_byte, &raw);
            if (r < 0) {
                free(buf);
                toks->oom = 1;
                return;
            }
            if (r) {
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
        out.v = l.p ? malloc(sizeof *out.v) : NULL;
        if (!out.v) {
            free(l.p);
            toks->oom = 1;
            return;
        }
        out.cap = 1;
        out.v[out.n++] = l;
        break;
    }
    case DEC_REPLACE:
        for (int i = 0; i < toks->n && !toks->oom; i++) toks->oom = replace_all(&toks->v[i], &st->a, &st->b) != 0;
        return;
    case DEC_METASPACE: {
        /* every replacement char becomes a space — in the first token it is dropped (HF) */
        bytes_t sp = {(uint8_t *)" ", 1}, none = {(uint8_t *)"", 0};
        for (int i = 0; i < toks->n && !toks->oom; i++)
            toks->oom = replace_all(&toks->v[i], &st->a, i == 0 && st->start ? &none : &sp) != 0;
        return;
    }
    case DEC_BYTE_FALLBACK: {
        uint8_t *pending = malloc((size_t)toks->n + 1);
        if (!pending) {
            toks->oom = 1;
            return;
        }
        int np = 0;
        for (int i = 0; i <= toks->n; i++) {
            int b = i < toks->n ? parse_byte_token(&toks->v[i]) : -1;
            if (b >= 0) { pending[np++] = (uint8_t)b; continue; }
            if (np) {
                /* a run of byte tokens becomes its text if it is valid UTF-8, else one U+FFFD per byte */
                bytes_t l = utf8_lossy(pending, (size_t)np);
                if (!l.p) out.oom = 1;
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
        uint8_t *buf = strv_joined_buf(toks);
        if (!buf) return;
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
    ln_tok_byte_alphabet(byte_to_cp);
    for (int k = 0; k < 324; k++) cp_to_byte[k] = -1;
    for (int b = 0; b < 256; b++) cp_to_byte[byte_to_cp[b]] = (int16_t)b;
    for (int s = 0; s < t->n_dec; s++) decode_step(&t->dec[s], &toks, cp_to_byte);
    size_t total = 0;
    for (int i = 0; i < toks.n; i++) total += (size_t)toks.v[i].len;
    char *buf = toks.oom ? NULL : malloc(total + 1);
    if (!buf) {
        strv_free(&toks);
        return ln_errf(e, "tokenizer: out of memory decoding %d ids", n);
    }
    size_t k = 0;
    for (int i = 0; i < toks.n; i++) { memcpy(buf + k, toks.v[i].p, (size_t)toks.v[i].len); k += (size_t)toks.v[i].len; }
    buf[k] = 0;
    strv_free(&toks);
    *out = buf;
    if (out_len) *out_len = k;
    return 0;
}
