/* Unit tests for worker/engine/data.c: pre-tokenized JSONL, validation errors that name file,
 * line and field, max_seq_len policies, counts, and the seeded, seekable loader. */
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
#include "worker/engine/data.h"

static char g_dir[] = "/tmp/ln_test_data_XXXXXX";

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

/* Writes text to <tmpdir>/name and returns the path (static buffer). */
static const char *write_tmp(const char *name, const char *text) {
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    ln_err e;
    assert_int_equal(ln_write_file_atomic(path, text, strlen(text), &e), 0);
    return path;
}

static void test_pretokenized_loads(void **state) {
    (void)state;
    const char *p = write_tmp("ok.jsonl",
                              "\xEF\xBB\xBF{\"input_ids\":[1,2,3]}\n"
                              "\n"
                              "{\"input_ids\":[4,5,6,7],\"labels\":[-100,-100,6,7]}\r\n");
    ln_dataset *d = NULL;
    ln_err e;
    assert_int_equal(ln_dataset_load(p, NULL, NULL, &d, &e), 0);
    assert_int_equal(d->n, 2);
    assert_int_equal(d->ex[0].len, 3);
    assert_int_equal(d->ex[0].line, 1);
    assert_int_equal(d->ex[0].labels[2], 3); /* labels default to input_ids */
    assert_int_equal(d->ex[1].line, 3);
    assert_int_equal(d->ex[1].labels[1], LN_IGNORE_INDEX);
    assert_int_equal(d->stats.examples, 2);
    assert_int_equal(d->stats.tokens, 7);
    /* trained = labels[1..] not -100: 2 (first) + 2 (second) */
    assert_int_equal(d->stats.trained_tokens, 4);
    assert_int_equal(d->stats.truncated, 0);
    ln_dataset_free(d);
}

/* One bad line per case; the error must name the file, the right line and the field. */
static void test_errors_name_line_and_field(void **state) {
    (void)state;
    struct { const char *line2; const char *want; } cases[] = {
        {"{\"input_ids\":[1,2", "line 2: bad JSON"},
        {"[1,2,3]", "line 2: a line must be a JSON object"},
        {"{\"input_ids\":[1,\"x\",3]}", "line 2: field \"input_ids[1]\" must be an integer"},
        {"{\"input_ids\":[]}", "line 2: field \"input_ids\" is empty"},
        {"{\"input_ids\":[1,2],\"labels\":[1]}", "line 2: field \"labels\" has 1 entries"},
        {"{\"input_ids\":[1,-5]}", "line 2: field \"input_ids[1]\" = -5"},
        {"{\"input_ids\":[1,2],\"labels\":[-100,-100]}", "line 2: example has no token that the loss trains"},
        {"{\"foo\":1}", "line 2: no known field"},
        {"{\"text\":\"a\",\"input_ids\":[1]}", "line 2: mixes the fields"},
        {"{\"prompt\":\"a\"}", "line 2: field \"completion\" is missing"},
        {"{\"text\":\"hello\"}", "line 2: this line is text, which needs a tokenizer"},
        {"{\"input_ids\":[1],\"input_ids\":[2]}", "line 2: bad JSON"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[256];
        snprintf(text, sizeof text, "{\"input_ids\":[1,2]}\n%s\n{\"input_ids\":[3,4]}\n", cases[i].line2);
        const char *p = write_tmp("bad.jsonl", text);
        ln_dataset *d = (ln_dataset *)0x1;
        ln_err e;
        assert_int_equal(ln_dataset_load(p, NULL, NULL, &d, &e), -1);
        assert_null(d);
        if (!strstr(e.msg, cases[i].want) || !strstr(e.msg, "bad.jsonl"))
            fail_msg("case %zu: got \"%s\", want \"%s\"", i, e.msg, cases[i].want);
    }
}

static void test_counts_every_bad_line(void **state) {
    (void)state;
    const char *p = write_tmp("many.jsonl", "{\"input_ids\":[1,2]}\nnope\n{\"input_ids\":[1,2]}\n{}\n");
    ln_dataset *d;
    ln_err e;
    assert_int_equal(ln_dataset_load(p, NULL, NULL, &d, &e), -1);
    assert_non_null(strstr(e.msg, "2 bad lines in all; "));
    assert_non_null(strstr(e.msg, "many.jsonl line 2: bad JSON"));
    assert_non_null(strstr(e.msg, "; line 4: no known field"));
}

static void test_overlong_policies(void **state) {
    (void)state;
    const char *p = write_tmp("long.jsonl", "{\"input_ids\":[1,2,3,4,5,6]}\n{\"input_ids\":[1,2]}\n"
                                            "{\"input_ids\":[1,2,3,4,5]}\n");
    ln_data_opts o = {.max_seq_len = 4, .overlong = LN_OVERLONG_REJECT};
    ln_dataset *d;
    ln_err e;
    assert_int_equal(ln_dataset_load(p, NULL, &o, &d, &e), -1);
    assert_non_null(strstr(e.msg, "line 1: example has 6 tokens, longer than max_seq_len 4"));
    assert_non_null(strstr(e.msg, "2 bad lines in all, 2 of them longer than max_seq_len"));
    o.overlong = LN_OVERLONG_TRUNCATE;
    assert_int_equal(ln_dataset_load(p, NULL, &o, &d, &e), 0);
    assert_int_equal(d->stats.truncated, 2);
    assert_int_equal(d->ex[0].len, 4);
    assert_int_equal(d->ex[2].len, 4);
    assert_int_equal(d->stats.tokens, 10);
    ln_dataset_free(d);
}

static void test_empty_file_is_an_error(void **state) {
    (void)state;
    const char *p = write_tmp("empty.jsonl", "\n  \n");
    ln_dataset *d;
    ln_err e;
    assert_int_equal(ln_dataset_load(p, NULL, NULL, &d, &e), -1);
    assert_non_null(strstr(e.msg, "no examples"));
    assert_int_equal(ln_dataset_load("/nonexistent/x.jsonl", NULL, NULL, &d, &e), -1);
    assert_non_null(strstr(e.msg, "/nonexistent/x.jsonl"));
}

static ln_dataset *make_numbered(int n) {
    char *text = ln_xmalloc((size_t)n * 32 + 1);
    size_t off = 0;
    for (int i = 0; i < n; i++) off += (size_t)sprintf(text + off, "{\"input_ids\":[%d,%d]}\n", i, i);
    const char *p = write_tmp("num.jsonl", text);
    free(text);
    ln_dataset *d;
    ln_err e;
    assert_int_equal(ln_dataset_load(p, NULL, NULL, &d, &e), 0);
    return d;
}

/* Each epoch is a permutation; epochs differ; the same seed gives the same order. */
static void test_loader_shuffles_per_epoch(void **state) {
    (void)state;
    enum { N = 50 };
    ln_dataset *d = make_numbered(N);
    ln_loader a, b;
    ln_loader_init(&a, d, 42, 1);
    ln_loader_init(&b, d, 42, 1);
    int ep0[N], ep1[N], in_order = 1;
    for (int ep = 0; ep < 2; ep++) {
        int seen[N] = {0};
        for (int i = 0; i < N; i++) {
            const ln_example *x = ln_loader_next(&a);
            const ln_example *y = ln_loader_next(&b);
            assert_ptr_equal(x, y);
            int id = x->input_ids[0];
            seen[id]++;
            (ep ? ep1 : ep0)[i] = id;
            if (id != i) in_order = 0;
        }
        for (int i = 0; i < N; i++) assert_int_equal(seen[i], 1);
    }
    assert_false(in_order);
    assert_int_not_equal(memcmp(ep0, ep1, sizeof ep0), 0);
    assert_int_equal(a.pos.epoch, 1);
    assert_int_equal(a.pos.index, N);
    ln_loader c;
    ln_loader_init(&c, d, 43, 1); /* another seed, another order */
    int same = 1;
    for (int i = 0; i < N; i++) same &= ln_loader_next(&c)->input_ids[0] == ep0[i];
    assert_false(same);
    ln_loader_free(&a);
    ln_loader_free(&b);
    ln_loader_free(&c);
    ln_dataset_free(d);
}

/* A position saved mid-epoch and restored in a fresh loader continues with the same examples. */
static void test_loader_seek_resumes(void **state) {
    (void)state;
    enum { N = 17 };
    ln_dataset *d = make_numbered(N);
    ln_loader a;
    ln_loader_init(&a, d, 7, 1);
    for (int i = 0; i < 30; i++) ln_loader_next(&a);
    ln_data_pos saved = a.pos;
    assert_int_equal(saved.epoch, 1);
    assert_int_equal(saved.index, 13);
    int want[40];
    for (int i = 0; i < 40; i++) want[i] = ln_loader_next(&a)->input_ids[0];
    ln_loader b;
    ln_loader_init(&b, d, 7, 1);
    ln_loader_seek(&b, saved);
    for (int i = 0; i < 40; i++) assert_int_equal(ln_loader_next(&b)->input_ids[0], want[i]);
    ln_loader c; /* without shuffling the order is the file's */
    ln_loader_init(&c, d, 7, 0);
    for (int i = 0; i < N; i++) assert_int_equal(ln_loader_next(&c)->input_ids[0], i);
    ln_loader_free(&a);
    ln_loader_free(&b);
    ln_loader_free(&c);
    ln_dataset_free(d);
}

/* Packing: whole examples in loader order, segments and positions restart per example, the first
 * token of each example masked, padding marked; the loader's position moves as without packing. */
static void test_packing(void **state) {
    (void)state;
    /* example i has length 1 + i % 5 and ids 100*i + k */
    enum { N = 23, CAP = 8 };
    char *text = ln_xmalloc(N * 64);
    size_t off = 0;
    for (int i = 0; i < N; i++) {
        off += (size_t)sprintf(text + off, "{\"input_ids\":[");
        for (int k = 0; k <= i % 5; k++) off += (size_t)sprintf(text + off, k ? ",%d" : "%d", 100 * i + k);
        off += (size_t)sprintf(text + off, "],\"labels\":[");
        for (int k = 0; k <= i % 5; k++) off += (size_t)sprintf(text + off, k ? ",%d" : "%d", 100 * i + k);
        off += (size_t)sprintf(text + off, "]}\n");
    }
    ln_dataset *d;
    ln_err e;
    /* one-token examples train nothing (position 0 is never a target): the file is refused */
    const char *p = write_tmp("pack.jsonl", text);
    free(text);
    int rc = ln_dataset_load(p, NULL, NULL, &d, &e);
    assert_int_equal(rc, -1); /* i % 5 == 0 -> 1 token, no trained token: rejected */
    assert_non_null(strstr(e.msg, "no token that the loss trains on"));

    text = ln_xmalloc(N * 64);
    off = 0;
    for (int i = 0; i < N; i++) {
        off += (size_t)sprintf(text + off, "{\"input_ids\":[");
        for (int k = 0; k <= 1 + i % 5; k++) off += (size_t)sprintf(text + off, k ? ",%d" : "%d", 100 * i + k);
        off += (size_t)sprintf(text + off, "]}\n");
    }
    p = write_tmp("pack.jsonl", text);
    free(text);
    assert_int_equal(ln_dataset_load(p, NULL, NULL, &d, &e), 0);
    ln_loader l, ref;
    ln_loader_init(&l, d, 5, 1);
    ln_loader_init(&ref, d, 5, 1);
    ln_packed_row r;
    ln_packed_row_init(&r, CAP);
    int seen = 0;
    ln_data_pos mid = {0, 0};
    int32_t after_mid[CAP];
    for (int row = 0; seen < 2 * N; row++) {
        int k = ln_loader_next_packed(&l, &r);
        assert_true(k >= 1);
        assert_int_equal(k, r.n_examples);
        int t = 0;
        for (int s = 0; s < k; s++) {
            const ln_example *x = ln_loader_next(&ref); /* the same order as unpacked */
            for (int i = 0; i < x->len; i++, t++) {
                assert_int_equal(r.input_ids[t], x->input_ids[i]);
                assert_int_equal(r.segment[t], s);
                assert_int_equal(r.position_ids[t], i);
                assert_int_equal(r.labels[t], i == 0 ? LN_IGNORE_INDEX : x->labels[i]);
            }
        }
        assert_int_equal(t, r.len);
        for (; t < CAP; t++) {
            assert_int_equal(r.segment[t], -1);
            assert_int_equal(r.labels[t], LN_IGNORE_INDEX);
        }
        /* greedy: the next example would not have fitted — or the epoch ended */
        const ln_example *next = &d->ex[l.order[l.pos.index < d->n ? l.pos.index : 0]];
        if (l.pos.index < d->n) assert_true(r.len + next->len > CAP);
        else assert_int_equal(l.pos.epoch, seen + k <= N ? 0 : 1);
        assert_true(seen % N + k <= N); /* no row spans two epochs */
        seen += k;
        if (row == 3) {
            mid = l.pos;
            int k2 = ln_loader_next_packed(&l, &r);
            assert_int_equal(k2, r.n_examples);
            memcpy(after_mid, r.input_ids, sizeof after_mid);
            seen += r.n_examples;
            for (int s = 0; s < r.n_examples; s++) ln_loader_next(&ref);
        }
    }
    /* resume: a fresh loader seeked to the saved position packs the same next row */
    ln_loader l2;
    ln_loader_init(&l2, d, 5, 1);
    ln_loader_seek(&l2, mid);
    ln_loader_next_packed(&l2, &r);
    assert_memory_equal(r.input_ids, after_mid, sizeof after_mid);
    /* an example longer than the row is cut, alone */
    ln_packed_row small;
    ln_packed_row_init(&small, 2);
    ln_loader l3;
    ln_loader_init(&l3, d, 5, 0);
    ln_loader_seek(&l3, (ln_data_pos){0, 4}); /* example 4 has 6 tokens */
    assert_int_equal(ln_loader_next_packed(&l3, &small), 1);
    assert_int_equal(small.len, 2);
    assert_int_equal(small.input_ids[1], 401);
    ln_packed_row_free(&small);
    ln_packed_row_free(&r);
    ln_loader_free(&l);
    ln_loader_free(&l2);
    ln_loader_free(&l3);
    ln_loader_free(&ref);
    ln_dataset_free(d);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pretokenized_loads),
        cmocka_unit_test(test_errors_name_line_and_field),
        cmocka_unit_test(test_counts_every_bad_line),
        cmocka_unit_test(test_overlong_policies),
        cmocka_unit_test(test_empty_file_is_an_error),
        cmocka_unit_test(test_loader_shuffles_per_epoch),
        cmocka_unit_test(test_loader_seek_resumes),
        cmocka_unit_test(test_packing),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
