/* unicode.h — the little Unicode the tokenizer needs: UTF-8 decoding, the classes \p{L}, \p{N}
 * and \s of the pre-tokenizer patterns, and the LLaMA-3 / GPT-2 split patterns themselves,
 * implemented as hand-written matchers (no regex engine). */
#ifndef LN_UNICODE_H
#define LN_UNICODE_H

#include <stddef.h>
#include <stdint.h>

enum { LN_UNI_LETTER = 1, LN_UNI_NUMBER = 2, LN_UNI_SPACE = 4 };

/* Class bits of a code point: \p{L} (categories L*), \p{N} (N*), \s (Unicode White_Space). */
int ln_uni_class(uint32_t cp);

/* Decodes the UTF-8 character at s (n ≥ 1 bytes available) into *cp and returns its length.
 * An invalid or truncated sequence counts as one byte with *cp = 0xFFFD (class: none). */
int ln_utf8_next(const uint8_t *s, size_t n, uint32_t *cp);
/* Appends cp as UTF-8 to out (4 bytes room); returns the byte count. */
int ln_utf8_put(uint32_t cp, uint8_t *out);

typedef enum {
    /* (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
     * \s*[\r\n]+|\s+(?!\S)|\s+ */
    LN_SPLIT_LLAMA3,
    /* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
    LN_SPLIT_GPT2,
} ln_split_pattern;

/* The pattern strings as tokenizer.json writes them (to recognise them on load). */
extern const char *const ln_split_pattern_llama3;
extern const char *const ln_split_pattern_gpt2;

/* End (exclusive) of the pattern's leftmost-first match starting at s[i], i < n. Both patterns
 * match at every position, so consecutive calls cut the whole text into pieces. */
size_t ln_split_match(ln_split_pattern p, const uint8_t *s, size_t n, size_t i);

#endif
