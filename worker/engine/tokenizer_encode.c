/* tokenizer_encode.c — text to ids (pipeline in tokenizer.c's header comment): added tokens,
 * normalizer, pre-tokenizer, BPE by merge rank with a heap, post-processor ids, HF-equal offsets. */
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/engine/tokenizer_impl.h"
#include "worker/engine/unicode.h"

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
    int oom;           /* an allocation failed: the encode stops and fails */
} scratch;

/* realloc that keeps the old block and sets s->oom on failure. */
static int grow(scratch *s, void *pp, size_t bytes) {
    void **p = pp, *q = s->oom ? NULL : realloc(*p, bytes);
    if (!q) return s->oom = 1, -1;
    *p = q;
    return 0;
}

static int scratch_reserve(scratch *s, int n) {
    if (n <= s->cap) return 0;
    int cap = s->cap ? s->cap : 64;
    while (cap < n) cap *= 2;
    if (grow(s, &s->id, (size_t)cap * sizeof *s->id) || grow(s, &s->start, (size_t)cap * sizeof *s->start) ||
        grow(s, &s->len, (size_t)cap * sizeof *s->len) || grow(s, &s->prev, (size_t)cap * sizeof *s->prev) ||
        grow(s, &s->next, (size_t)cap * sizeof *s->next))
        return -1;
    s->cap = cap;
    return 0;
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
        int cap = s->heap_cap ? s->heap_cap * 2 : 64;
        if (grow(s, &s->heap, (size_t)cap * sizeof *s->heap)) return;
        s->heap_cap = cap;
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
    if (scratch_reserve(s, n + 1)) return 0;
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
        int32_t id = ln_tok_str_map_get(&t->vocab, w + i, (size_t)cl);
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
        int32_t id = ln_tok_str_map_get(&t->vocab, w, (size_t)n);
        if (id >= 0) {
            ln_ids_push(out, id);
            if (offs) { ln_ids_push(offs, base); ln_ids_push(offs, base + n); }
            return;
        }
    }
    int k = word_symbols(t, s, w, n);
    if (s->oom) return;
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
int ln_tok_norm_apply(const norm_step *ns, uint8_t **cur_p, int32_t **al_p, size_t *m_p) {
    uint8_t *cur = *cur_p;
    int32_t *al = *al_p;
    size_t m = *m_p;
    size_t grow = ns->kind == NORM_PREPEND ? m + (size_t)ns->a.len
                : m / (size_t)ns->a.len * (size_t)(ns->b.len > ns->a.len ? ns->b.len : ns->a.len) + m;
    uint8_t *nx = malloc(grow + 1);
    int32_t *na = nx ? malloc((grow + 1) * 2 * sizeof *na) : NULL;
    if (!na) {
        free(nx);
        return -1;
    }
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
    return 0;
}



/* An aligned buffer of n bytes, or p = al = NULL. */
static aligned aligned_new(size_t n) {
    aligned a = {malloc(n + 1), malloc((n + 1) * 2 * sizeof(int32_t)), n};
    if (!a.p || !a.al) {
        ln_tok_aligned_free(&a);
        a.p = NULL;
        a.al = NULL;
    }
    return a;
}

aligned ln_tok_aligned_copy(const uint8_t *p, const int32_t *al, size_t n) {
    aligned a = aligned_new(n);
    if (!a.p) return a;
    memcpy(a.p, p, n);
    memcpy(a.al, al, n * 2 * sizeof(int32_t));
    return a;
}

/* seg[0..n) of the input, whose first byte is at original offset base. */
aligned ln_tok_aligned_from_input(const uint8_t *seg, size_t n, int base) {
    aligned a = aligned_new(n);
    if (!a.p) return a;
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

void ln_tok_aligned_free(aligned *a) {
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
    aligned w = transform ? ln_tok_aligned_copy(p, al, n) : (aligned){(uint8_t *)p, (int32_t *)al, n};
    int bad = !w.p;
    if (!bad && t->prefix_segment && w.p[0] != ' ') {
        norm_step pre = {NORM_PREPEND, {(uint8_t *)" ", 1}, {0}};
        bad = ln_tok_norm_apply(&pre, &w.p, &w.al, &w.n);
    }
    if (!bad && t->meta) {
        /* Metaspace: spaces become the replacement, which is then prepended unless the piece
         * already starts with it ("first": only to the piece that starts the input) */
        bytes_t space = {(uint8_t *)" ", 1};
        norm_step rep = {NORM_REPLACE, space, t->meta_rep};
        bad = ln_tok_norm_apply(&rep, &w.p, &w.al, &w.n);
        int starts = w.n >= (size_t)t->meta_rep.len && !memcmp(w.p, t->meta_rep.p, (size_t)t->meta_rep.len);
        if (!bad && !starts && (t->meta_prepend == 1 || (t->meta_prepend == 2 && w.al[0] == 0))) {
            norm_step pre = {NORM_PREPEND, t->meta_rep, {0}};
            bad = ln_tok_norm_apply(&pre, &w.p, &w.al, &w.n);
        }
    }
    int first = out->n;
    uint8_t *tmp = !bad && t->prefix_space ? malloc(w.n + 2) : NULL;
    if (bad || (t->prefix_space && !tmp)) {
        s->oom = 1;
        if (transform) ln_tok_aligned_free(&w);
        return;
    }
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
            for (int i = before; offs && !offs->oom && i < out->n; i++) {
                if (offs->ids[2 * i] < (int32_t)pos) offs->ids[2 * i] = (int32_t)pos;
                if (offs->ids[2 * i + 1] <= (int32_t)pos) offs->ids[2 * i + 1] = (int32_t)pos + 1;
            }
        } else {
            bpe_word(t, s, w.p + pos, (int)(end - pos), (int)pos, out, offs);
        }
        pos = end;
    }
    if (offs && !s->oom && !offs->oom) /* piece byte ranges -> original character ranges */
        for (int i = first; i < out->n; i++) {
            int32_t a = offs->ids[2 * i], b = offs->ids[2 * i + 1];
            offs->ids[2 * i] = w.al[2 * a];
            offs->ids[2 * i + 1] = w.al[2 * (b - 1) + 1];
        }
    free(tmp);
    if (transform) ln_tok_aligned_free(&w);
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
        if (offs && !offs->oom)
            for (int i = first; i < out->n; i++) widen_to_chars(text, text_len, &offs->ids[2 * i], &offs->ids[2 * i + 1]);
        return;
    }
    aligned a = ln_tok_aligned_from_input(seg, n, (int)base);
    int bad = !a.p;
    for (int st = 0; st < t->n_norm && !bad; st++) bad = ln_tok_norm_apply(&t->norm[st], &a.p, &a.al, &a.n);
    if (bad) {
        s->oom = 1;
        ln_tok_aligned_free(&a);
        return;
    }
    for (size_t pos = 0; pos < a.n && !s->oom;) {
        size_t at = a.n, stop = a.n;
        int k = t->has_norm_added ? find_added(t, t->added_norm, a.p, a.n, pos, &at, &stop) : -1;
        encode_piece(t, s, a.p + pos, a.al + 2 * pos, (k >= 0 ? at : a.n) - pos, out, offs);
        if (k < 0) break;
        ln_ids_push(out, t->added[k].id);
        if (offs) { ln_ids_push(offs, a.al[2 * at]); ln_ids_push(offs, a.al[2 * (stop - 1) + 1]); }
        pos = stop;
    }
    ln_tok_aligned_free(&a);
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
    while (pos < len && !s.oom) {
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
    if (s.oom || out->oom || (offs && offs->oom)) {
        char size[32];
        return ln_errf(e, "tokenizer: out of memory encoding a text of %s", ln_fmt_bytes((double)len, size, sizeof size));
    }
    return 0;
}
