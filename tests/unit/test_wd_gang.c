/* wd_gang (worker/daemon/wd_gang.h) in the CPU build: a GPU worker's rank of a gang split over
 * workers needs NCCL, which this build does not link (weak references, NULL): the gang ends with
 * WD_GANG_UNSUPPORTED and a sentence saying what to run instead — from the loop, never from
 * wd_gang_start itself, and before any request reaches the server (the URL here has none). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "worker/daemon/wd_gang.h"

typedef struct { int calls; wd_gang_result res; ln_comm *c; char msg[1200]; } outcome;

static void on_gang(void *ctx, wd_gang_result res, ln_comm *c, const wd_resp *r, const char *msg) {
    (void)r;
    outcome *o = ctx;
    o->calls++;
    o->res = res;
    o->c = c;
    snprintf(o->msg, sizeof o->msg, "%s", msg ? msg : "");
}

static void test_gpu_rank_without_nccl_is_unsupported_with_a_sentence(void **state) {
    (void)state;
    assert_false(wd_gang_nccl_linked());
    uv_loop_t loop;
    uv_loop_init(&loop);
    ln_err e = {{0}};
    wd_http *http = wd_http_new(&loop, "http://127.0.0.1:9", "wt-unused", &e); /* port 9: nothing listens */
    assert_non_null(http);
    for (int rank = 0; rank < 2; rank++) {
        outcome o = {0};
        wd_gang_opts opts = {.job_id = "ftjob-x", .gen = 1, .rank = rank, .world = 2, .timeout_s = 5, .nccl_device = 0};
        wd_gang *g = wd_gang_start(&loop, http, &opts, on_gang, &o);
        assert_non_null(g);
        assert_int_equal(o.calls, 0); /* never from wd_gang_start */
        uv_run(&loop, UV_RUN_DEFAULT);
        assert_int_equal(o.calls, 1);
        assert_int_equal(o.res, WD_GANG_UNSUPPORTED);
        assert_null(o.c);
        assert_non_null(strstr(o.msg, "has no NCCL"));
        assert_non_null(strstr(o.msg, "build/cuda/bin/loranull-worker"));
    }
    wd_http_free(http);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gpu_rank_without_nccl_is_unsupported_with_a_sentence),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
