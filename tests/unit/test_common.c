/* Unit tests for common/: SHA-256 against FIPS 180-4 vectors, error helpers, paths. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "common/err.h"
#include "common/sha256.h"
#include "common/util.h"

static void test_sha256_vectors(void **state) {
    (void)state;
    char hex[65];
    sha256_hex("", 0, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    sha256_hex("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sha256_hex(two, strlen(two), hex);
    assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

static void test_sha256_streaming_equals_oneshot(void **state) {
    (void)state;
    char buf[1000];
    for (int i = 0; i < 1000; i++) buf[i] = (char)(i * 7);
    char a[65], b[65];
    sha256_hex(buf, sizeof buf, a);
    sha256_ctx c;
    sha256_init(&c);
    for (int i = 0; i < 1000; i += 37) sha256_update(&c, buf + i, i + 37 <= 1000 ? 37 : 1000 - i);
    uint8_t d[32];
    sha256_final(&c, d);
    sha256_to_hex(d, b);
    assert_string_equal(a, b);
}

static void test_err_prefix(void **state) {
    (void)state;
    ln_err e;
    assert_int_equal(ln_errf(&e, "bad field %s", "lr"), -1);
    ln_err_prefix(&e, "job.json line %d", 3);
    assert_string_equal(e.msg, "job.json line 3: bad field lr");
}

static void test_path_join(void **state) {
    (void)state;
    char *p = ln_path_join("a/b", "c");
    assert_string_equal(p, "a/b/c");
    free(p);
    p = ln_path_join("a/b/", "c");
    assert_string_equal(p, "a/b/c");
    free(p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_vectors),
        cmocka_unit_test(test_sha256_streaming_equals_oneshot),
        cmocka_unit_test(test_err_prefix),
        cmocka_unit_test(test_path_join),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
