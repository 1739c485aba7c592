/* Unit tests for common/safetensors: round trip in every float dtype, sharded directories,
 * and each malformed header refused with its own message (never a crash or a read past the end). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/safetensors.h"
#include "common/util.h"

static char dir[256];

static int setup(void **state) {
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/ln_st_test_XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_round_trip_all_dtypes(void **state) {
    (void)state;
    float a[6] = {1.0f, -2.5f, 3.25f, 0.0f, 65504.0f, -1e-3f};
    int64_t shape[2] = {2, 3};
    st_writer *w = st_writer_new();
    st_writer_meta(w, "format", "pt");
    st_writer_add(w, "w.f32", ST_F32, 2, shape, a);
    st_writer_add_f32(w, "w.f16", ST_F16, 2, shape, a);
    st_writer_add_f32(w, "w.bf16", ST_BF16, 2, shape, a);
    int64_t s0[1] = {0};
    st_writer_add(w, "empty", ST_F32, 1, s0, NULL);
    char *path = ln_path_join(dir, "rt.safetensors");
    ln_err e;
    assert_int_equal(st_writer_write(w, path, &e), 0);
    st_writer_free(w);

    st_set *s;
    assert_int_equal(st_open(path, &s, &e), 0);
    assert_int_equal(st_count(s), 4);
    assert_string_equal(st_metadata(s, "format"), "pt");
    float out[6];
    const st_tensor *t = st_find(s, "w.f32");
    assert_non_null(t);
    assert_int_equal(t->ndim, 2);
    assert_int_equal(t->shape[1], 3);
    assert_int_equal(st_to_f32(t, out, 6, &e), 0);
    assert_memory_equal(out, a, sizeof a);
    assert_int_equal(st_to_f32(st_find(s, "w.f16"), out, 6, &e), 0);
    for (int i = 0; i < 6; i++) assert_true(out[i] == a[i] || (a[i] != 0 && fabsf((out[i] - a[i]) / a[i]) < 1e-3f));
    assert_int_equal(st_to_f32(st_find(s, "w.bf16"), out, 6, &e), 0);
    for (int i = 0; i < 6; i++) assert_true(out[i] == a[i] || (a[i] != 0 && fabsf((out[i] - a[i]) / a[i]) < 8e-3f));
    assert_null(st_find(s, "nope"));
    assert_int_equal(st_to_f32(st_find(s, "w.f32"), out, 5, &e), -1);
    assert_non_null(strstr(e.msg, "w.f32"));
    st_close(s);
    free(path);
}

static void test_half_conversions(void **state) {
    (void)state;
    /* Every f16 and bf16 bit pattern survives f16->f32->f16 (NaNs stay NaN). */
    for (uint32_t v = 0; v < 65536; v++) {
        float f = st_f16_to_f32((uint16_t)v);
        if (f != f) { assert_true(st_f16_to_f32(st_f32_to_f16(f)) != st_f16_to_f32(st_f32_to_f16(f))); continue; }
        assert_int_equal(st_f32_to_f16(f), v);
        float g = st_bf16_to_f32((uint16_t)v);
        if (g == g) assert_int_equal(st_f32_to_bf16(g), v);
    }
    /* Rounding to nearest even at the halfway point. */
    assert_int_equal(st_f32_to_bf16(1.0f + 1.0f / 256.0f), 0x3f80);  /* tie -> even (down) */
    assert_int_equal(st_f32_to_bf16(1.0f + 3.0f / 256.0f), 0x3f82);  /* tie -> even (up) */
    assert_int_equal(st_f32_to_f16(1e9f), 0x7c00);                   /* overflow -> inf */
    assert_true(st_f16_to_f32(st_f32_to_f16(1e-7f)) > 0.0f);          /* subnormal kept */
}

/* Writes an 8-byte length + the header + n data bytes; returns the path. */
static char *write_raw(const char *name, uint64_t hlen_field, const char *header, size_t ndata) {
    char *path = ln_path_join(dir, name);
    FILE *f = fopen(path, "wb");
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(hlen_field >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    for (size_t i = 0; i < ndata; i++) fputc(0, f);
    fclose(f);
    return path;
}

typedef struct { const char *name; int64_t hlen_delta; const char *header; size_t ndata; const char *expect; } bad_case;

static void test_malformed_headers(void **state) {
    (void)state;
    const bad_case cases[] = {
        {"huge", 200000000, "{}", 0, "exceeds"},
        {"trunc_header", 100, "{\"a\":{}}", 0, "truncated: header says"},
        {"not_json", 0, "{nope", 0, "not valid JSON"},
        {"not_brace", 0, "[1,2]", 0, "does not start with '{'"},
        {"bad_dtype", 0, "{\"t\":{\"dtype\":\"Q7\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "unknown or missing dtype"},
        {"neg_shape", 0, "{\"t\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "shape[0]"},
        {"size_mismatch", 0, "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, "need 8"},
        {"past_end", 0, "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "truncated: tensor"},
        {"hole", 0, "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "contiguous"},
        {"overlap", 0, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "contiguous"},
        {"trailing", 0, "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 12, "tensors cover 4"},
        {"dup_key", 0, "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "not valid JSON"},
        {"bad_offsets", 0, "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4]}}", 4, "data_offsets must be"},
        {"reversed", 0, "{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8, "out of order"},
        {"meta_nonstring", 0, "{\"__metadata__\":{\"k\":1}}", 0, "is not a string"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const bad_case *c = &cases[i];
        char *path = write_raw(c->name, strlen(c->header) + (uint64_t)c->hlen_delta, c->header, c->ndata);
        st_set *s = NULL;
        ln_err e = {{0}};
        int rc = st_open(path, &s, &e);
        if (rc == 0 || !strstr(e.msg, c->expect) || !strstr(e.msg, c->name))
            fail_msg("case %s: rc=%d msg=\"%s\" (wanted \"%s\" and the file name)", c->name, rc, e.msg, c->expect);
        assert_null(s);
        free(path);
    }
    /* A file shorter than the length field itself. */
    char *path = ln_path_join(dir, "tiny");
    FILE *f = fopen(path, "wb");
    fputs("abc", f);
    fclose(f);
    st_set *s;
    ln_err e;
    assert_int_equal(st_open(path, &s, &e), -1);
    assert_non_null(strstr(e.msg, "truncated"));
    free(path);
}

static void test_truncated_real_file(void **state) {
    (void)state;
    float a[256];
    for (int i = 0; i < 256; i++) a[i] = (float)i;
    int64_t shape[1] = {256};
    st_writer *w = st_writer_new();
    st_writer_add(w, "model.embed_tokens.weight", ST_F32, 1, shape, a);
    char *path = ln_path_join(dir, "cut.safetensors");
    ln_err e;
    assert_int_equal(st_writer_write(w, path, &e), 0);
    st_writer_free(w);
    assert_int_equal(truncate(path, 8 + 64 + 100), 0);
    st_set *s;
    assert_int_equal(st_open(path, &s, &e), -1);
    assert_non_null(strstr(e.msg, "model.embed_tokens.weight"));
    assert_non_null(strstr(e.msg, "cut.safetensors"));
    free(path);
}

static void test_sharded_directory(void **state) {
    (void)state;
    char *mdir = ln_path_join(dir, "sharded");
    ln_err e;
    assert_int_equal(ln_mkdir_p(mdir, &e), 0);
    float a[4] = {1, 2, 3, 4}, b[2] = {5, 6};
    int64_t s4[1] = {4}, s2[1] = {2};
    st_writer *w = st_writer_new();
    st_writer_add(w, "a", ST_F32, 1, s4, a);
    char *p1 = ln_path_join(mdir, "model-00001-of-00002.safetensors");
    assert_int_equal(st_writer_write(w, p1, &e), 0);
    st_writer_free(w);
    w = st_writer_new();
    st_writer_add(w, "b", ST_F32, 1, s2, b);
    char *p2 = ln_path_join(mdir, "model-00002-of-00002.safetensors");
    assert_int_equal(st_writer_write(w, p2, &e), 0);
    st_writer_free(w);
    char *idx = ln_path_join(mdir, "model.safetensors.index.json");
    const char *js = "{\"metadata\":{},\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\",\"b\":\"model-00002-of-00002.safetensors\"}}";
    assert_int_equal(ln_write_file_atomic(idx, js, strlen(js), &e), 0);
    st_set *s;
    assert_int_equal(st_open(mdir, &s, &e), 0);
    assert_int_equal(st_count(s), 2);
    float out[2];
    assert_int_equal(st_to_f32(st_find(s, "b"), out, 2, &e), 0);
    assert_true(out[1] == 6.0f);
    st_close(s);
    /* An index naming a tensor that no shard has. */
    js = "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\",\"c\":\"model-00002-of-00002.safetensors\"}}";
    assert_int_equal(ln_write_file_atomic(idx, js, strlen(js), &e), 0);
    assert_int_equal(st_open(mdir, &s, &e), -1);
    assert_non_null(strstr(e.msg, "\"c\""));
    /* A shard name that tries to leave the directory. */
    js = "{\"weight_map\":{\"a\":\"../x.safetensors\"}}";
    assert_int_equal(ln_write_file_atomic(idx, js, strlen(js), &e), 0);
    assert_int_equal(st_open(mdir, &s, &e), -1);
    assert_non_null(strstr(e.msg, "plain file name"));
    free(p1); free(p2); free(idx); free(mdir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_all_dtypes),
        cmocka_unit_test(test_half_conversions),
        cmocka_unit_test(test_malformed_headers),
        cmocka_unit_test(test_truncated_real_file),
        cmocka_unit_test(test_sharded_directory),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
