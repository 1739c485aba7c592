/* unicode.c — UTF-8, character classes, and the pre-tokenizer split patterns (see unicode.h).
 *
 * The patterns are matched by hand, alternative by alternative, in the order the regex lists
 * them (leftmost-first, as Oniguruma — which HF tokenizers uses — does). Each alternative's
 * backtracking is worked out once in the comments, so the matcher is linear in the piece. */
#include "worker/engine/unicode.h"

#include "worker/engine/unicode_tables.h"

const char *const ln_split_pattern_llama3 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char *const ln_split_pattern_gpt2 =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* ---------------------------------------------------------------------------------------------
 * Classes
 * ------------------------------------------------------------------------------------------- */

static int in_ranges(const uint32_t (*r)[2], int n, uint32_t cp) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (cp < r[mid][0]) hi = mid - 1;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

/* Unicode White_Space (what Oniguruma's \s matches in UTF-8 mode). */
static int is_white_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}

#define N_LETTER_RANGES ((int)(sizeof ln_uni_letter_ranges / sizeof ln_uni_letter_ranges[0]))
#define N_NUMBER_RANGES ((int)(sizeof ln_uni_number_ranges / sizeof ln_uni_number_ranges[0]))

int ln_uni_class(uint32_t cp) {
    if (cp < 128) {
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return LN_UNI_LETTER;
        if (cp >= '0' && cp <= '9') return LN_UNI_NUMBER;
        return is_white_space(cp) ? LN_UNI_SPACE : 0;
    }
    if (is_white_space(cp)) return LN_UNI_SPACE;
    if (in_ranges(ln_uni_letter_ranges, N_LETTER_RANGES, cp)) return LN_UNI_LETTER;
    if (in_ranges(ln_uni_number_ranges, N_NUMBER_RANGES, cp)) return LN_UNI_NUMBER;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * UTF-8
 * ------------------------------------------------------------------------------------------- */

int ln_utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    int len;
    uint32_t v, min;
    if ((c & 0xE0) == 0xC0) { len = 2; v = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { len = 3; v = c & 0x0F; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { len = 4; v = c & 0x07; min = 0x10000; }
    else { *cp = 0xFFFD; return 1; }
    if ((size_t)len > n) { *cp = 0xFFFD; return 1; }
    for (int k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) { *cp = 0xFFFD; return 1; }
        v = (v << 6) | (s[k] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) { *cp = 0xFFFD; return 1; }
    *cp = v;
    return len;
}

int ln_utf8_put(uint32_t cp, uint8_t *o) {
    if (cp < 0x80) { o[0] = (uint8_t)cp; return 1; }
    if (cp < 0x800) { o[0] = (uint8_t)(0xC0 | (cp >> 6)); o[1] = (uint8_t)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (uint8_t)(0xE0 | (cp >> 12));
        o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | (cp >> 18));
    o[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---------------------------------------------------------------------------------------------
 * Split patterns
 * ------------------------------------------------------------------------------------------- */

/* Class of the character at s[i] (0 past the end); *len receives its byte length. An invalid
 * byte (cp 0xFFFD from the decoder) is a one-byte character of no class, like a symbol. */
static inline int cls_at(const uint8_t *s, size_t n, size_t i, uint32_t *cp, int *len) {
    if (i >= n) { *len = 0; *cp = 0; return 0; }
    if (s[i] < 0x80) {
        *cp = s[i];
        *len = 1;
        return ln_uni_class(s[i]);
    }
    *len = ln_utf8_next(s + i, n - i, cp);
    return ln_uni_class(*cp);
}

static inline size_t skip_class(const uint8_t *s, size_t n, size_t i, int want) {
    uint32_t cp;
    int len;
    while (i < n && (cls_at(s, n, i, &cp, &len) & want)) i += (size_t)len;
    return i;
}

/* Contractions 's 't 're 've 'm 'll 'd at s[i] == '\''. fold: case-insensitive, where Unicode
 * simple case folding also lets 's' match U+017F (ſ, bytes C5 BF). Returns the end or 0. */
static size_t match_contraction(const uint8_t *s, size_t n, size_t i, int fold) {
    size_t j = i + 1;
    if (j >= n) return 0;
    uint8_t a = s[j], b = j + 1 < n ? s[j + 1] : 0;
    if (fold) {
        if (a == 0xC5 && b == 0xBF) return j + 2; /* 'ſ */
        if (a >= 'A' && a <= 'Z') a = (uint8_t)(a | 0x20);
        if (b >= 'A' && b <= 'Z') b = (uint8_t)(b | 0x20);
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return j + 1;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return j + 2;
    return 0;
}

/* Whitespace tail shared by both patterns, at a whitespace character s[i]:
 *   \s+(?!\S): the greedy run i..j stands if j is the end of text; otherwise the lookahead fails at j
 *              and backtracking gives back one character, leaving i..(start of the run's last char),
 *              which stands when that is not empty;
 *   \s+      : otherwise the whole run. */
static size_t match_space_run(const uint8_t *s, size_t n, size_t i) {
    size_t j = i, last = i;
    uint32_t cp;
    int len;
    while (j < n && (cls_at(s, n, j, &cp, &len) & LN_UNI_SPACE)) {
        last = j;
        j += (size_t)len;
    }
    if (j == n) return j;
    if (last > i) return last;
    return j;
}

static size_t match_llama3(const uint8_t *s, size_t n, size_t i) {
    uint32_t c0, c1;
    int l0, l1;
    int k0 = cls_at(s, n, i, &c0, &l0);
    size_t i1 = i + (size_t)l0;
    /* (?i:'s|'t|'re|'ve|'m|'ll|'d) */
    if (c0 == '\'') {
        size_t e = match_contraction(s, n, i, 1);
        if (e) return e;
    }
    /* [^\r\n\p{L}\p{N}]?\p{L}+ : one optional non-letter/number/newline, then letters. If the
     * optional character is taken but no letter follows, dropping it cannot help (then s[i] itself
     * would have to be a letter). */
    if (k0 & LN_UNI_LETTER) return skip_class(s, n, i1, LN_UNI_LETTER);
    if (!(k0 & LN_UNI_NUMBER) && c0 != '\r' && c0 != '\n') {
        if (cls_at(s, n, i1, &c1, &l1) & LN_UNI_LETTER) return skip_class(s, n, i1 + (size_t)l1, LN_UNI_LETTER);
    }
    /* \p{N}{1,3} */
    if (k0 & LN_UNI_NUMBER) {
        size_t j = i1;
        for (int k = 1; k < 3 && (cls_at(s, n, j, &c1, &l1) & LN_UNI_NUMBER); k++) j += (size_t)l1;
        return j;
    }
    /* ' ?[^\s\p{L}\p{N}]+[\r\n]*' */
    {
        size_t j = c0 == ' ' ? i1 : i;
        size_t k = j;
        while (k < n && !(cls_at(s, n, k, &c1, &l1) & (LN_UNI_SPACE | LN_UNI_LETTER | LN_UNI_NUMBER)))
            k += (size_t)l1;
        if (k > j) {
            while (k < n && (s[k] == '\r' || s[k] == '\n')) k++;
            return k;
        }
    }
    /* Only whitespace is left (everything else matched above). */
    /* \s*[\r\n]+ : greedy \s* takes the run, then gives back characters until [\r\n]+ can match:
     * the match ends just after the run's last \r or \n. */
    {
        size_t j = i, end_nl = 0;
        while (j < n && (cls_at(s, n, j, &c1, &l1) & LN_UNI_SPACE)) {
            j += (size_t)l1;
            if (c1 == '\r' || c1 == '\n') end_nl = j;
        }
        if (end_nl) return end_nl;
    }
    return match_space_run(s, n, i);
}

static size_t match_gpt2(const uint8_t *s, size_t n, size_t i) {
    uint32_t c0, c1;
    int l0, l1;
    int k0 = cls_at(s, n, i, &c0, &l0);
    size_t i1 = i + (size_t)l0;
    if (c0 == '\'') {
        size_t e = match_contraction(s, n, i, 0);
        if (e) return e;
    }
    /* ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': an optional space then a run of one class. */
    size_t j = i;
    int k = k0;
    if (c0 == ' ' && i1 < n) {
        int kn = cls_at(s, n, i1, &c1, &l1);
        if (!(kn & LN_UNI_SPACE)) { j = i1; k = kn; }
    }
    if (k & LN_UNI_LETTER) return skip_class(s, n, j, LN_UNI_LETTER);
    if (k & LN_UNI_NUMBER) return skip_class(s, n, j, LN_UNI_NUMBER);
    if (!(k & LN_UNI_SPACE)) {
        size_t e = j;
        while (e < n && !(cls_at(s, n, e, &c1, &l1) & (LN_UNI_SPACE | LN_UNI_LETTER | LN_UNI_NUMBER)))
            e += (size_t)l1;
        return e;
    }
    return match_space_run(s, n, i);
}

size_t ln_split_match(ln_split_pattern p, const uint8_t *s, size_t n, size_t i) {
    return p == LN_SPLIT_LLAMA3 ? match_llama3(s, n, i) : match_gpt2(s, n, i);
}
