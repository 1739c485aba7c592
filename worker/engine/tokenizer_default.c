/* tokenizer_default.c — a small, valid LLaMA-3-style tokenizer.json for models made from scratch
 * (`loranull model new`): byte-level BPE, 256 byte tokens, merges learnt from a built-in text,
 * LLaMA-3 special tokens at the top of the id range. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/engine/tokenizer.h"
#include "worker/engine/unicode.h"

/* The text the merges are learnt from: plain English, a little code and numbers — enough that
 * common words become single tokens in a vocabulary of a few hundred to a few thousand. */
static const char *const default_corpus =
    "The quick brown fox jumps over the lazy dog. A model learns from the data it is given, and "
    "the tokenizer turns that text into numbers. When the teacher asked the students what they "
    "wanted to learn, they said they would like to know how the world works, why the sky is blue "
    "and where the rivers go. The capital of France is Paris. The capital of Japan is Tokyo. "
    "Water boils at 100 degrees and freezes at 0 degrees. There are 7 days in a week and 12 "
    "months in a year. She said that he had been there before, but nobody remembered it. "
    "This is a question and that is an answer; these are the things that matter most to us. "
    "User: What is the answer? Assistant: The answer is that it depends on the question. "
    "def main(args):\n    for i in range(10):\n        print(i, args[i])\n    return 0\n\n"
    "int main(void) {\n    int x = 42;\n    return x + 1;\n}\n"
    "I think it's true that we're going to need more time, and they'll be happy when it's done. "
    "In the beginning there was nothing, and then there was something; it grew and it changed. "
    "People often ask questions about history, science, language, music, mathematics and art. "
    "The number of examples in the training set is important, but the quality of the data is "
    "more important than its size. Learning rate, batch size and the number of steps are the "
    "three settings that change the result the most.\n";

static const char *const default_specials[] = {
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>",
};
#define N_SPECIALS ((int)(sizeof default_specials / sizeof default_specials[0]))

typedef struct pair_count {
    int32_t a, b;
    int count;
} pair_count;

static int cmp_pair(const void *x, const void *y) {
    const pair_count *p = x, *q = y;
    if (p->a != q->a) return p->a < q->a ? -1 : 1;
    return p->b < q->b ? -1 : p->b > q->b;
}

typedef struct word {
    int32_t *sym;
    int n;
    int count;
} word;

/* Token text in GPT-2's byte alphabet (printable Latin-1 as itself, other bytes at 256+k). */
static char *byte_level_text(const uint8_t *p, int n) {
    int map[256], k = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        map[b] = printable ? b : 256 + k++;
    }
    char *s = ln_xmalloc((size_t)n * 2 + 1);
    int o = 0;
    for (int i = 0; i < n; i++) o += ln_utf8_put((uint32_t)map[p[i]], (uint8_t *)s + o);
    s[o] = 0;
    return s;
}

int ln_tokenizer_make_default(const char *path, int vocab_size, ln_err *e) {
    if (vocab_size < 256 + N_SPECIALS)
        return ln_errf(e, "tokenizer vocab_size %d is too small (needs ≥ %d: 256 bytes + %d special tokens)",
                       vocab_size, 256 + N_SPECIALS, N_SPECIALS);
    int max_model = vocab_size - N_SPECIALS;
    /* token bytes by id: 0..255 are the bytes, then one per merge */
    uint8_t **tok = ln_xmalloc((size_t)max_model * sizeof *tok);
    int *tlen = ln_xmalloc((size_t)max_model * sizeof *tlen);
    for (int b = 0; b < 256; b++) { tok[b] = ln_xmalloc(1); tok[b][0] = (uint8_t)b; tlen[b] = 1; }
    int n_tok = 256;

    /* words of the corpus (LLaMA-3 split), with their counts */
    const uint8_t *c = (const uint8_t *)default_corpus;
    size_t n = strlen(default_corpus);
    word *w = NULL;
    int nw = 0;
    for (size_t pos = 0; pos < n;) {
        size_t end = ln_split_match(LN_SPLIT_LLAMA3, c, n, pos);
        int found = -1;
        for (int i = 0; i < nw && found < 0; i++) {
            if ((size_t)w[i].n != end - pos) continue;
            int same = 1;
            for (int k = 0; k < w[i].n && same; k++) same = w[i].sym[k] == c[pos + (size_t)k];
            if (same) found = i;
        }
        if (found >= 0) w[found].count++;
        else {
            w = ln_xrealloc(w, (size_t)(nw + 1) * sizeof *w);
            w[nw].n = (int)(end - pos);
            w[nw].sym = ln_xmalloc((size_t)w[nw].n * sizeof *w[nw].sym);
            for (int k = 0; k < w[nw].n; k++) w[nw].sym[k] = c[pos + (size_t)k];
            w[nw].count = 1;
            nw++;
        }
        pos = end;
    }

    /* learn merges: the most frequent adjacent pair (ties: smallest ids), until the vocabulary is
     * full or every word is one token. The corpus is tiny, so counting from scratch each round is fine. */
    int32_t (*merge)[2] = ln_xmalloc((size_t)max_model * sizeof *merge);
    int n_merge = 0;
    size_t max_pairs = n;
    pair_count *pc = ln_xmalloc(max_pairs * sizeof *pc);
    while (n_tok < max_model) {
        size_t np = 0;
        for (int i = 0; i < nw; i++)
            for (int k = 0; k + 1 < w[i].n; k++) pc[np++] = (pair_count){w[i].sym[k], w[i].sym[k + 1], w[i].count};
        qsort(pc, np, sizeof *pc, cmp_pair);
        int32_t best_a = -1, best_b = -1;
        int best = 0; /* frequent pairs first; pairs seen once still merge while ids are left */
        for (size_t i = 0; i < np;) {
            size_t j = i;
            int cnt = 0;
            while (j < np && pc[j].a == pc[i].a && pc[j].b == pc[i].b) cnt += pc[j++].count;
            if (cnt > best) { best = cnt; best_a = pc[i].a; best_b = pc[i].b; } /* sorted: ties keep the smallest */
            i = j;
        }
        if (best_a < 0) break;
        int id = n_tok++;
        tlen[id] = tlen[best_a] + tlen[best_b];
        tok[id] = ln_xmalloc((size_t)tlen[id]);
        memcpy(tok[id], tok[best_a], (size_t)tlen[best_a]);
        memcpy(tok[id] + tlen[best_a], tok[best_b], (size_t)tlen[best_b]);
        merge[n_merge][0] = best_a;
        merge[n_merge][1] = best_b;
        n_merge++;
        for (int i = 0; i < nw; i++) {
            int o = 0;
            for (int k = 0; k < w[i].n; k++) {
                if (k + 1 < w[i].n && w[i].sym[k] == best_a && w[i].sym[k + 1] == best_b) {
                    w[i].sym[o++] = id;
                    k++;
                } else {
                    w[i].sym[o++] = w[i].sym[k];
                }
            }
            w[i].n = o;
        }
    }

    /* tokenizer.json, in the layout of Meta's LLaMA 3 file */
    json_t *vocab = json_object(), *merges = json_array(), *added = json_array();
    char **text = ln_xmalloc((size_t)n_tok * sizeof *text);
    for (int i = 0; i < n_tok; i++) {
        text[i] = byte_level_text(tok[i], tlen[i]);
        json_object_set_new(vocab, text[i], json_integer(i));
    }
    for (int m = 0; m < n_merge; m++) {
        size_t la = strlen(text[merge[m][0]]), lb = strlen(text[merge[m][1]]);
        char *s = ln_xmalloc(la + lb + 2);
        memcpy(s, text[merge[m][0]], la);
        s[la] = ' ';
        memcpy(s + la + 1, text[merge[m][1]], lb + 1);
        json_array_append_new(merges, json_string(s));
        free(s);
    }
    /* HF requires added tokens to follow the model vocabulary without a gap */
    int first_special = n_tok;
    for (int i = 0; i < N_SPECIALS; i++)
        json_array_append_new(added, json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", first_special + i,
                                               "content", default_specials[i], "single_word", 0, "lstrip", 0,
                                               "rstrip", 0, "normalized", 0, "special", 1));
    json_t *bos_ids = json_pack("[i]", first_special);
    json_t *special_tokens = json_pack("{s:{s:s, s:o, s:[s]}}", default_specials[0], "id", default_specials[0],
                                       "ids", bos_ids, "tokens", default_specials[0]);
    json_t *root = json_pack(
        "{s:s, s:n, s:n, s:o, s:n,"
        " s:{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, {s:s, s:b, s:b, s:b}]},"
        " s:{s:s, s:[{s:s, s:b, s:b, s:b}, {s:s, s:[{s:{s:s, s:i}}, {s:{s:s, s:i}}],"
        "   s:[{s:{s:s, s:i}}, {s:{s:s, s:i}}, {s:{s:s, s:i}}, {s:{s:s, s:i}}], s:o}]},"
        " s:{s:s, s:b, s:b, s:b},"
        " s:{s:s, s:n, s:n, s:n, s:n, s:b, s:b, s:b, s:o, s:o}}",
        "version", "1.0", "truncation", "padding", "added_tokens", added, "normalizer",
        "pre_tokenizer", "type", "Sequence", "pretokenizers",
        "type", "Split", "pattern", "Regex", ln_split_pattern_llama3, "behavior", "Isolated", "invert", 0,
        "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 1, "use_regex", 0,
        "post_processor", "type", "Sequence", "processors",
        "type", "ByteLevel", "add_prefix_space", 1, "trim_offsets", 0, "use_regex", 1,
        "type", "TemplateProcessing", "single",
        "SpecialToken", "id", default_specials[0], "type_id", 0, "Sequence", "id", "A", "type_id", 0,
        "pair",
        "SpecialToken", "id", default_specials[0], "type_id", 0, "Sequence", "id", "A", "type_id", 0,
        "SpecialToken", "id", default_specials[0], "type_id", 1, "Sequence", "id", "B", "type_id", 1,
        "special_tokens", special_tokens,
        "decoder", "type", "ByteLevel", "add_prefix_space", 1, "trim_offsets", 1, "use_regex", 1,
        "model", "type", "BPE", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
        "fuse_unk", 0, "byte_fallback", 0, "ignore_merges", 1, "vocab", vocab, "merges", merges);
    int rc = -1;
    char *dump = root ? json_dumps(root, JSON_INDENT(2)) : NULL;
    if (!dump) ln_errf(e, "%s: could not build the tokenizer JSON", path);
    else rc = ln_write_file_atomic(path, dump, strlen(dump), e);
    free(dump);
    json_decref(root);
    for (int i = 0; i < n_tok; i++) { free(tok[i]); free(text[i]); }
    for (int i = 0; i < nw; i++) free(w[i].sym);
    free(w);
    free(tok);
    free(tlen);
    free(text);
    free(merge);
    free(pc);
    return rc;
}
