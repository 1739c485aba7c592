/* Unit tests for common/util's fallible allocation sentences: ln_try_allocf names the area, the
 * size (people's units, from ln_fmt_bytes) and what the buffer is for; a size that overflows
 * size_t is refused with its true size instead of wrapping to a small allocation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "common/util.h"
#include "tests/unit/sanitizer.h"

static void test_fmt_bytes(void **state) {
    (void)state;
    char b[32];
    assert_string_equal(ln_fmt_bytes(512, b, sizeof b), "512 B");
    assert_string_equal(ln_fmt_bytes(3 * 1024, b, sizeof b), "3.0 KiB");
    assert_string_equal(ln_fmt_bytes(64.0 * 1024 * 1024, b, sizeof b), "64.0 MiB");
    assert_string_equal(ln_fmt_bytes(1.2 * 1024 * 1024 * 1024, b, sizeof b), "1.20 GiB");
}

static void test_try_allocf(void **state) {
    (void)state;
    ln_err e = {{0}};
    double *p = ln_try_allocf(1000, sizeof(double), &e, "knowledge drift", "layer %d %s", 7, "mlp.down_proj");
    assert_non_null(p);
    assert_true(((uintptr_t)p & 63) == 0); /* 64-byte aligned like ln_try_alloc */
    p[999] = 1.0;
    free(p);
    assert_string_equal(e.msg, ""); /* success leaves the error alone */
    /* 2^62 × 8 overflows size_t: refused, with the size it would have been */
    void *q = ln_try_allocf((size_t)1 << 62, 8, &e, "knowledge drift", "the original weight of layer %d", 7);
    assert_null(q);
    assert_string_equal(e.msg, "knowledge drift: out of memory allocating 34359738368.00 GiB for the original weight "
                               "of layer 7");
    /* too big to map (ASan reports such a request instead of returning NULL) */
    if (!LN_UNDER_ASAN) {
        q = ln_try_allocf((size_t)1 << 50, 1, &e, "export", "a host copy of %s", "W");
        assert_null(q);
        assert_string_equal(e.msg, "export: out of memory allocating 1048576.00 GiB for a host copy of W");
    }
    /* NULL err: still NULL, no crash */
    assert_null(ln_try_allocf((size_t)1 << 62, 8, NULL, "x", "y"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fmt_bytes),
        cmocka_unit_test(test_try_allocf),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
