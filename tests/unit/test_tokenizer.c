/* Unit tests for worker/engine/tokenizer.c, unicode.c and chat.c: split-pattern pieces, Unicode
 * classes, BPE by rank with byte fallback, added tokens, decode, load errors that name the field,
 * the default tokenizer, a long word (heap merging), and chat lines through the data loader.
 * (Equality with HF `tokenizers` on 10k+ lines is tests/reference/test_tokenizer_ref.py.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/util.h"
#include "worker/engine/chat.h"
#include "worker/engine/data.h"
#include "worker/engine/tokenizer.h"
#include "worker/engine/unicode.h"

static char g_dir[] = "/tmp/ln_test_tok_XXXXXX";

static int setup(void **state) {
    (void)state;
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static const char *tmp_path(const char *name) {
    static char path[4][256];
    static int k;
    k = (k + 1) % 4;
    snprintf(path[k], sizeof path[k], "%s/%s", g_dir, name);
    return path[k];
}

static const char *write_tmp(const char *name, const char *text) {
    const char *p = tmp_path(name);
    ln_err e;
    assert_int_equal(ln_write_file_atomic(p, text, strlen(text), &e), 0);
    return p;
}

/* The pieces the LLaMA-3 pattern cuts s into, joined with '|'. */
static void split_pieces(ln_split_pattern pat, const char *s, char *out) {
    size_t n = strlen(s), o = 0;
    for (size_t i = 0; i < n;) {
        size_t e = ln_split_match(pat, (const uint8_t *)s, n, i);
        assert_true(e > i);
        if (i) out[o++] = '|';
        memcpy(out + o, s + i, e - i);
        o += e - i;
        i = e;
    }
    out[o] = 0;
}

static void test_llama3_split_pattern(void **state) {
    (void)state;
    struct { const char *in, *want; } c[] = {
        {"Hello world!", "Hello| world|!"},
        {"I'm   here\n\n\tok", "I|'m|  | here|\n\n|\tok"},
        {"1234567 apples", "123|456|7| apples"},
        {"it's THEY'RE", "it|'s| THEY|'RE"},
        {"  x", " | x"},
        {"a  ", "a|  "},
        {"x !!?\n\ny", "x| !!?\n\n|y"},
        {"\u00e9t\u00e9 \u65e5\u672c", "\u00e9t\u00e9| \u65e5\u672c"},
        {"tab\t\tend", "tab|\t|\tend"},
        {"a \n b", "a| \n| b"},
    };
    char out[256];
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        split_pieces(LN_SPLIT_LLAMA3, c[i].in, out);
        if (strcmp(out, c[i].want)) fail_msg("case %zu: got [%s], want [%s]", i, out, c[i].want);
    }
    split_pieces(LN_SPLIT_GPT2, "it's  1234 ok!!", out);
    assert_string_equal(out, "it|'s| | 1234| ok|!!");
}

static void test_unicode_classes(void **state) {
    (void)state;
    assert_int_equal(ln_uni_class('a'), LN_UNI_LETTER);
    assert_int_equal(ln_uni_class('7'), LN_UNI_NUMBER);
    assert_int_equal(ln_uni_class(' '), LN_UNI_SPACE);
    assert_int_equal(ln_uni_class(0x65E5), LN_UNI_LETTER);  /* 日 */
    assert_int_equal(ln_uni_class(0x0663), LN_UNI_NUMBER);  /* ٣ */
    assert_int_equal(ln_uni_class(0x2167), LN_UNI_NUMBER);  /* Ⅷ (Nl) */
    assert_int_equal(ln_uni_class(0x3000), LN_UNI_SPACE);   /* ideographic space */
    assert_int_equal(ln_uni_class(0x1F680), 0);             /* 🚀 */
    assert_int_equal(ln_uni_class(0x200B), 0);              /* zero-width space is not \s */
    uint32_t cp;
    assert_int_equal(ln_utf8_next((const uint8_t *)"\xF0\x9F\x9A\x80", 4, &cp), 4);
    assert_int_equal(cp, 0x1F680);
    assert_int_equal(ln_utf8_next((const uint8_t *)"\xC0\xAF", 2, &cp), 1); /* overlong */
    assert_int_equal(cp, 0xFFFD);
}

/* A small SentencePiece-style tokenizer: "▁" normalizer, byte fallback for 'z' and others. */
static const char *sp_json =
    "{\"version\":\"1.0\",\"added_tokens\":["
    "{\"id\":0,\"content\":\"<unk>\",\"special\":true},{\"id\":1,\"content\":\"<s>\",\"special\":true},"
    "{\"id\":2,\"content\":\"</s>\",\"special\":true}],"
    "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":\"\xe2\x96\x81\"},"
    "{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":\"\xe2\x96\x81\"}]},"
    "\"pre_tokenizer\":null,"
    "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\",\"type_id\":0}},"
    "{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],\"special_tokens\":{\"<s>\":{\"id\":\"<s>\",\"ids\":[1],\"tokens\":[\"<s>\"]}}},"
    "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":{\"String\":\"\xe2\x96\x81\"},"
    "\"content\":\" \"},{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"},{\"type\":\"Strip\",\"content\":\" \",\"start\":1,\"stop\":0}]},"
    "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"fuse_unk\":true,\"byte_fallback\":true,"
    "\"vocab\":{\"<unk>\":0,\"<s>\":1,\"</s>\":2,\"<0x7A>\":3,\"<0xC3>\":4,\"<0xA9>\":5,"
    "\"\xe2\x96\x81\":6,\"a\":7,\"b\":8,\"ab\":9,\"\xe2\x96\x81" "ab\":10,\"c\":11,\"abc\":12,\"\xe2\x96\x81" "a\":13},"
    "\"merges\":[\"a b\",\"\xe2\x96\x81 ab\",\"ab c\",\"\xe2\x96\x81 a\"]}}";

static ln_tokenizer *load_json(const char *name, const char *json) {
    ln_tokenizer *t = NULL;
    ln_err e;
    if (ln_tokenizer_load(write_tmp(name, json), &t, &e)) fail_msg("%s", e.msg);
    return t;
}

static void expect_ids(const ln_tokenizer *t, const char *s, int add, const int32_t *want, int n) {
    ln_ids ids = {0};
    ln_err e;
    assert_int_equal(ln_tokenizer_encode(t, s, strlen(s), add, &ids, NULL, &e), 0);
    if (ids.n != n) fail_msg("\"%s\": %d ids, want %d", s, ids.n, n);
    for (int i = 0; i < n; i++)
        if (ids.ids[i] != want[i]) fail_msg("\"%s\": id %d is %d, want %d", s, i, ids.ids[i], want[i]);
    ln_ids_free(&ids);
}

static void expect_decode(const ln_tokenizer *t, const int32_t *ids, int n, const char *want) {
    char *s;
    size_t len;
    ln_err e;
    assert_int_equal(ln_tokenizer_decode(t, ids, n, 0, &s, &len, &e), 0);
    assert_string_equal(s, want);
    free(s);
}

static void test_sentencepiece_bpe(void **state) {
    (void)state;
    ln_tokenizer *t = load_json("sp.json", sp_json);
    assert_false(ln_tokenizer_is_byte_level(t));
    assert_int_equal(ln_tokenizer_vocab_size(t), 14);
    assert_int_equal(ln_tokenizer_bos_id(t), 1);
    assert_int_equal(ln_tokenizer_eos_id(t), 2);
    /* "▁abc": merges by rank: a+b (0) first, then ▁+ab (1) beats ab+c (2) */
    expect_ids(t, "abc", 0, (const int32_t[]){10, 11}, 2);
    expect_ids(t, "abc", 1, (const int32_t[]){1, 10, 11}, 3);
    /* z and é have no token: byte fallback; "q" has no byte token either: unk, fused */
    expect_ids(t, "z\xc3\xa9", 0, (const int32_t[]){6, 3, 4, 5}, 4);
    expect_ids(t, "qq a", 0, (const int32_t[]){6, 0, 13}, 3);
    /* added tokens are cut out first; the text after one is normalized on its own */
    expect_ids(t, "a</s>b", 0, (const int32_t[]){13, 2, 6, 8}, 4);
    expect_ids(t, "", 1, (const int32_t[]){1}, 1);
    expect_decode(t, (const int32_t[]){10, 11, 6, 3, 4, 5}, 6, "abc z\xc3\xa9");
    expect_decode(t, (const int32_t[]){6, 4, 7}, 3, "\xef\xbf\xbd" "a"); /* a lone byte: U+FFFD */
    expect_decode(t, (const int32_t[]){1, 10}, 2, "<s> ab");
    ln_err e;
    char *s;
    assert_int_equal(ln_tokenizer_decode(t, (const int32_t[]){99}, 1, 0, &s, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "id 99"));
    assert_int_equal(ln_tokenizer_token_id(t, "\xe2\x96\x81" "ab"), 10);
    assert_int_equal(ln_tokenizer_token_id(t, "nope"), -1);
    /* offsets map back through the normalizer: "▁ab" covers "ab" at 0..2 */
    ln_ids ids = {0}, off = {0};
    assert_int_equal(ln_tokenizer_encode(t, "ab c", 4, 0, &ids, &off, &e), 0);
    assert_int_equal(ids.n, 3); /* "▁ab", "▁", "c" */
    assert_int_equal(off.ids[0], 0);
    assert_int_equal(off.ids[1], 2);
    assert_int_equal(off.ids[2], 2);
    assert_int_equal(off.ids[3], 3);
    ln_ids_free(&ids);
    ln_ids_free(&off);
    ln_tokenizer_free(t);
}

/* A paragraph without spaces is one word for a SentencePiece-style model: merging must stay
 * O(n log n). 400k symbols would take minutes with quadratic rescans. */
static void test_long_word_merges_fast(void **state) {
    (void)state;
    ln_tokenizer *t = load_json("sp2.json", sp_json);
    size_t n = 399999; /* a multiple of 3 */
    char *s = ln_xmalloc(n + 1);
    for (size_t i = 0; i < n; i++) s[i] = "abc"[i % 3];
    s[n] = 0;
    ln_ids ids = {0};
    ln_err e;
    double t0 = ln_now_s();
    assert_int_equal(ln_tokenizer_encode(t, s, n, 0, &ids, NULL, &e), 0);
    double dt = ln_now_s() - t0;
    /* "▁abcabc…": a+b everywhere (rank 0), then ▁+ab (1), then ab+c (2): ▁ab, c, abc, abc, … */
    assert_int_equal(ids.n, (int)(n / 3) + 1);
    assert_int_equal(ids.ids[0], 10);
    assert_int_equal(ids.ids[1], 11);
    assert_int_equal(ids.ids[2], 12);
    char *back;
    assert_int_equal(ln_tokenizer_decode(t, ids.ids, ids.n, 0, &back, NULL, &e), 0);
    assert_string_equal(back, s);
    assert_true(dt < 20.0);
    free(back);
    free(s);
    ln_ids_free(&ids);
    ln_tokenizer_free(t);
}

static void test_load_errors_name_the_field(void **state) {
    (void)state;
    struct { const char *json, *want; } c[] = {
        {"{\"model\":", "bad JSON"},
        {"{\"normalizer\":{\"type\":\"NFKC\"},\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}",
         "normalizer \"NFKC\" is not supported"},
        {"{\"model\":{\"type\":\"Unigram\",\"vocab\":[]}}", "model type \"Unigram\" is not supported"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[\"a c\"]}}",
         "model.merges[0] (\"a\" + \"c\"): \"c\" is not in the vocabulary"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[\"abc\"]}}",
         "model.merges[0] = \"abc\" is not two tokens"},
        {"{\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\w+\"},\"behavior\":\"Isolated\"},"
         "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}", "not one of the built-in patterns"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":\"x\"},\"merges\":[]}}", "model.vocab[\"a\"] is not a valid id"},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        ln_tokenizer *t = (ln_tokenizer *)0x1;
        ln_err e;
        const char *p = write_tmp("bad.json", c[i].json);
        assert_int_equal(ln_tokenizer_load(p, &t, &e), -1);
        assert_null(t);
        if (!strstr(e.msg, c[i].want) || !strstr(e.msg, "bad.json"))
            fail_msg("case %zu: got \"%s\", want \"%s\"", i, e.msg, c[i].want);
    }
    ln_tokenizer *t;
    ln_err e;
    assert_int_equal(ln_tokenizer_load(g_dir, &t, &e), -1); /* a folder without tokenizer.json */
    assert_non_null(strstr(e.msg, "tokenizer.json"));
}

/* The default tokenizer: byte-level, loads back, round-trips any bytes' text, specials at the end. */
static void test_default_tokenizer(void **state) {
    (void)state;
    ln_err e;
    assert_int_equal(ln_tokenizer_make_default(tmp_path("x.json"), 200, &e), -1);
    assert_non_null(strstr(e.msg, "too small"));
    const char *p = tmp_path("tokenizer.json");
    assert_int_equal(ln_tokenizer_make_default(p, 600, &e), 0);
    ln_tokenizer *t;
    assert_int_equal(ln_tokenizer_load(g_dir, &t, &e), 0);
    assert_true(ln_tokenizer_is_byte_level(t));
    int n = ln_tokenizer_vocab_size(t);
    assert_true(n > 266 && n <= 600);
    assert_int_equal(ln_tokenizer_token_id(t, "<|eot_id|>"), n - 1);
    assert_int_equal(ln_tokenizer_bos_id(t), ln_tokenizer_token_id(t, "<|begin_of_text|>"));
    assert_int_equal(ln_tokenizer_eos_id(t), ln_tokenizer_token_id(t, "<|end_of_text|>"));
    const char *s = "The answer is 42 \xf0\x9f\x9a\x80\n\n<|eot_id|>\xe6\x97\xa5\xe6\x9c\xac";
    ln_ids ids = {0};
    assert_int_equal(ln_tokenizer_encode(t, s, strlen(s), 1, &ids, NULL, &e), 0);
    assert_int_equal(ids.ids[0], ln_tokenizer_bos_id(t));
    int has_eot = 0;
    for (int i = 0; i < ids.n; i++) has_eot |= ids.ids[i] == n - 1;
    assert_true(has_eot);
    assert_true(ids.n < (int)strlen(s)); /* merges shorten common words */
    char *back;
    assert_int_equal(ln_tokenizer_decode(t, ids.ids + 1, ids.n - 1, 0, &back, NULL, &e), 0);
    assert_string_equal(back, s);
    free(back);
    assert_int_equal(ln_tokenizer_decode(t, ids.ids, ids.n, 1, &back, NULL, &e), 0); /* skip specials */
    assert_null(strstr(back, "<|"));
    free(back);
    ln_ids_free(&ids);
    ln_tokenizer_free(t);
}

/* Chat lines through the loader with the default tokenizer: masks cover assistant turns only. */
static void test_chat_through_loader(void **state) {
    (void)state;
    ln_err e;
    assert_int_equal(ln_tokenizer_make_default(tmp_path("tokenizer.json"), 600, &e), 0);
    ln_tokenizer *t;
    assert_int_equal(ln_tokenizer_load(g_dir, &t, &e), 0);
    const char *data = write_tmp("chat.jsonl",
        "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"},{\"role\":\"assistant\",\"content\":\"Hello\"}]}\n"
        "{\"messages\":[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"Q\"},"
        "{\"role\":\"assistant\",\"content\":\"A1\",\"weight\":0},{\"role\":\"user\",\"content\":\"Q2\"},"
        "{\"role\":\"assistant\",\"content\":\" A2 \"}]}\n"
        "{\"prompt\":\"P\",\"completion\":\" C\"}\n{\"text\":\"T\"}\n{\"input_ids\":[1,2,3]}\n");
    ln_data_opts o = {.chat_template = "llama3"};
    ln_dataset *d;
    if (ln_dataset_load(data, t, &o, &d, &e)) fail_msg("%s", e.msg);
    assert_int_equal(d->n, 5);
    int eot = ln_tokenizer_token_id(t, "<|eot_id|>");
    for (int k = 0; k < 2; k++) {
        /* the trained tokens, decoded, are exactly the trained assistant replies + <|eot_id|> */
        const ln_example *x = &d->ex[k];
        int32_t tr[64];
        int nt = 0;
        for (int i = 0; i < x->len; i++)
            if (x->labels[i] != LN_IGNORE_INDEX) { assert_int_equal(x->labels[i], x->input_ids[i]); tr[nt++] = x->labels[i]; }
        char *s;
        assert_int_equal(ln_tokenizer_decode(t, tr, nt, 0, &s, NULL, &e), 0);
        assert_string_equal(s, k == 0 ? "Hello<|eot_id|>" : "A2<|eot_id|>");
        free(s);
        assert_int_equal(x->input_ids[x->len - 1], eot);
    }
    const ln_example *pc = &d->ex[2];
    assert_int_equal(pc->labels[0], LN_IGNORE_INDEX);
    assert_int_equal(pc->labels[pc->len - 1], ln_tokenizer_eos_id(t));
    assert_int_equal(d->ex[3].labels[1], d->ex[3].input_ids[1]);
    ln_dataset_free(d);
    o.chat_template = "mistral";
    assert_int_equal(ln_dataset_load(data, t, &o, &d, &e), -1);
    assert_non_null(strstr(e.msg, "unknown chat template \"mistral\""));
    ln_tokenizer_free(t);
}

/* Random text — valid UTF-8 from many planes, and raw invalid bytes — never crashes the encoder;
 * valid text round-trips through both families, and offsets stay inside the text and ordered. */
static void test_random_text_roundtrips(void **state) {
    (void)state;
    ln_err e;
    assert_int_equal(ln_tokenizer_make_default(tmp_path("tokenizer.json"), 400, &e), 0);
    ln_tokenizer *bl, *sp = load_json("sp3.json", sp_json);
    assert_int_equal(ln_tokenizer_load(g_dir, &bl, &e), 0);
    static const uint32_t pool[] = {' ', ' ', '\n', '\t', 'a', 'b', 'c', 'Z', '7', '\'', 's', '<', '|', '>', 0xA0,
                                    0xE9, 0x416, 0x5D0, 0x627, 0x939, 0x3000, 0x65E5, 0xAC00, 0x1F680, 0x1F3FD,
                                    0x200D, 0x17F, 0x10FFFD};
    uint64_t rng = 12345;
    uint8_t buf[256];
    for (int iter = 0; iter < 3000; iter++) {
        size_t n = 0;
        int invalid = iter % 5 == 4;
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        int chars = (int)((rng >> 33) % 40);
        for (int c = 0; c < chars; c++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            if (invalid && (rng >> 60) == 0) buf[n++] = (uint8_t)(0x80 + ((rng >> 40) & 0x7F));
            else n += (size_t)ln_utf8_put(pool[(rng >> 35) % (sizeof pool / sizeof pool[0])], buf + n);
        }
        buf[n] = 0;
        for (int which = 0; which < 2; which++) {
            const ln_tokenizer *t = which ? sp : bl;
            ln_ids ids = {0}, off = {0};
            assert_int_equal(ln_tokenizer_encode(t, (const char *)buf, n, 1, &ids, &off, &e), 0);
            for (int i = 0; i < ids.n; i++) {
                assert_true(ids.ids[i] >= 0 && ids.ids[i] < ln_tokenizer_vocab_size(t));
                assert_true(off.ids[2 * i] <= off.ids[2 * i + 1] && (size_t)off.ids[2 * i + 1] <= n);
            }
            char *back;
            size_t bl_len;
            assert_int_equal(ln_tokenizer_decode(t, ids.ids, ids.n, 1, &back, &bl_len, &e), 0);
            /* SentencePiece-style unk ("q"-like characters outside vocab and bytes) cannot round-trip;
             * the byte-level one always does for valid UTF-8 */
            if (!invalid && which == 0 && (bl_len != n || memcmp(back, buf, n)))
                fail_msg("iteration %d: byte-level round trip failed for \"%s\" -> \"%s\"", iter, buf, back);
            free(back);
            ln_ids_free(&ids);
            ln_ids_free(&off);
        }
    }
    ln_tokenizer_free(bl);
    ln_tokenizer_free(sp);
}

/* The rendered text of both templates, and the trained spans in it. */
static void test_chat_render_templates(void **state) {
    (void)state;
    ln_tokenizer *t = load_json("sp4.json", sp_json); /* bos <s>, eos </s> */
    json_error_t je;
    json_t *obj = json_loads("{\"messages\":[{\"role\":\"system\",\"content\":\" Sys \"},"
                             "{\"role\":\"user\",\"content\":\" hi \"},{\"role\":\"assistant\",\"content\":\" yo \"},"
                             "{\"role\":\"user\",\"content\":\"u2\"},{\"role\":\"assistant\",\"content\":\"a2\","
                             "\"weight\":0}]}", 0, &je);
    assert_non_null(obj);
    ln_chat_rendered r;
    ln_err e;
    assert_int_equal(ln_chat_render(t, LN_TEMPLATE_LLAMA2, LN_CHAT_MESSAGES, obj, &r, &e), 0);
    assert_string_equal(r.text, "<s>[INST] <<SYS>>\n Sys \n<</SYS>>\n\n hi [/INST] yo </s><s>[INST] u2 [/INST] a2 </s>");
    assert_int_equal(r.n_spans, 1);
    assert_memory_equal(r.text + r.spans[0][0], "yo </s>", r.spans[0][1] - r.spans[0][0]);
    ln_chat_rendered_free(&r);
    assert_int_equal(ln_chat_render(t, LN_TEMPLATE_LLAMA3, LN_CHAT_MESSAGES, obj, &r, &e), 0);
    assert_string_equal(r.text, "<s><|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>"
                                "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
                                "<|start_header_id|>user<|end_header_id|>\n\nu2<|eot_id|>"
                                "<|start_header_id|>assistant<|end_header_id|>\n\na2<|eot_id|>");
    assert_int_equal(r.n_spans, 1);
    assert_memory_equal(r.text + r.spans[0][0], "yo<|eot_id|>", r.spans[0][1] - r.spans[0][0]);
    ln_chat_rendered_free(&r);
    json_decref(obj);
    ln_chat_template tpl;
    assert_int_equal(ln_chat_template_pick(t, NULL, &tpl, &e), 0);
    assert_int_equal(tpl, LN_TEMPLATE_LLAMA2); /* SentencePiece-style, no chat_template: llama2 */
    ln_tokenizer_free(t);
}

/* The real LLaMA 3 vocabulary, when the shared fixtures are there (CI has them). */
static void test_llama3_fixture(void **state) {
    (void)state;
    const char *root = getenv("LORANULL_ROOT");
    char path[512];
    snprintf(path, sizeof path, "%s/../shared/fixtures/tokenizers/llama3", root ? root : ".");
    if (!ln_file_exists(path)) { skip(); }
    ln_tokenizer *t;
    ln_err e;
    if (ln_tokenizer_load(path, &t, &e)) fail_msg("%s", e.msg);
    assert_int_equal(ln_tokenizer_vocab_size(t), 128256);
    assert_int_equal(ln_tokenizer_bos_id(t), 128000);
    expect_ids(t, "Hello world!", 0, (const int32_t[]){9906, 1917, 0}, 3);
    expect_ids(t, "I'm   here\n\n\tok", 0, (const int32_t[]){40, 2846, 256, 1618, 271, 60368}, 6);
    expect_ids(t, "<|begin_of_text|>x<|eot_id|>", 0, (const int32_t[]){128000, 87, 128009}, 3);
    expect_ids(t, "Hello", 1, (const int32_t[]){128000, 9906}, 2);
    ln_tokenizer_free(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama3_split_pattern),
        cmocka_unit_test(test_unicode_classes),
        cmocka_unit_test(test_sentencepiece_bpe),
        cmocka_unit_test(test_long_word_merges_fast),
        cmocka_unit_test(test_load_errors_name_the_field),
        cmocka_unit_test(test_default_tokenizer),
        cmocka_unit_test(test_chat_through_loader),
        cmocka_unit_test(test_random_text_roundtrips),
        cmocka_unit_test(test_chat_render_templates),
        cmocka_unit_test(test_llama3_fixture),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
