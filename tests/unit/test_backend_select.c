/* worker/backend/select.h in the CPU build: "cpu", "" and NULL give the CPU backend (also through
 * $LORANULL_DEVICE), "cuda" is refused with a sentence saying this build has no CUDA backend and
 * where one is built, a malformed or unknown device name is refused naming it; the memory plan
 * is a no-op on the CPU. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "worker/backend/select.h"

static void test_cpu(void **s)
{
    (void)s;
    ln_err e = {{0}};
    unsetenv("LORANULL_DEVICE");
    assert_ptr_equal(lnb_select("cpu", &e), lnb_cpu());
    assert_ptr_equal(lnb_select(NULL, &e), lnb_cpu());
    assert_ptr_equal(lnb_select("", &e), lnb_cpu());
    setenv("LORANULL_DEVICE", "cpu", 1);
    assert_ptr_equal(lnb_select(NULL, &e), lnb_cpu());
    unsetenv("LORANULL_DEVICE");
    lnb_cuda_plan_req q = {.vocab = 1 << 20, .hidden = 1 << 14, .layers = 1000};
    assert_int_equal(lnb_select_plan_check(lnb_cpu(), &q, &e), 0);
}

static void test_cuda_not_built(void **s)
{
    (void)s;
    ln_err e = {{0}};
    assert_null(lnb_select("cuda", &e));
    assert_non_null(strstr(e.msg, "device \"cuda\": this build of loranull has no CUDA backend"));
    assert_non_null(strstr(e.msg, "make cuda-bin"));
    setenv("LORANULL_DEVICE", "cuda:1", 1);
    assert_null(lnb_select(NULL, &e));
    assert_non_null(strstr(e.msg, "cuda:1"));
    unsetenv("LORANULL_DEVICE");
}

static void test_bad_names(void **s)
{
    (void)s;
    ln_err e = {{0}};
    assert_null(lnb_select("tpu", &e));
    assert_string_equal(e.msg, "device \"tpu\": expected cpu, cuda or cuda:N");
    assert_null(lnb_select("CPU", &e));
    assert_non_null(strstr(e.msg, "\"CPU\""));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu),
        cmocka_unit_test(test_cuda_not_built),
        cmocka_unit_test(test_bad_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
