/* Unit tests for worker/backend/comm (thread backend): every collective's result on 1..5 ranks,
 * the fixed rank-order summation (bit-equal to a serial left-to-right sum, whatever the thread
 * timing), a count mismatch reported on every rank, and an abort releasing waiting ranks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "worker/backend/comm/comm.h"

#define MAXR 5
#define NEL 1003 /* not a multiple of any rank count: uneven slices */

typedef struct {
    float buf[NEL];
    float gathered[MAXR * NEL];
    float bcast[NEL];
    int rc[4];
    ln_err err;
} rank_out;

/* Values whose float sum depends on the order they are added in. */
static float val(int rank, int i) { return (float)((rank + 1) * 1e7 + i * 0.37) * (rank % 2 ? -1.0f : 1.0f) + 0.1f * i; }

static int collectives(ln_comm *c, void *ctx, ln_err *e)
{
    rank_out *o = ctx;
    int r = comm_rank(c);
    for (int i = 0; i < NEL; i++) o->buf[i] = val(r, i);
    o->rc[0] = comm_allreduce_sum(c, o->buf, NEL, e);
    float mine[NEL];
    for (int i = 0; i < NEL; i++) mine[i] = (float)(r * 1000 + i);
    o->rc[1] = comm_allgather(c, mine, o->gathered, NEL, e);
    for (int i = 0; i < NEL; i++) o->bcast[i] = r == 1 % comm_size(c) ? (float)(-i) : 99.0f;
    o->rc[2] = comm_broadcast(c, o->bcast, NEL, 1 % comm_size(c), e);
    o->rc[3] = comm_barrier(c, e);
    return o->rc[0] || o->rc[1] || o->rc[2] || o->rc[3] ? -1 : 0;
}

static void test_collectives(void **state)
{
    (void)state;
    for (int R = 1; R <= MAXR; R++) {
        rank_out *outs = calloc(R, sizeof *outs);
        void *ctx[MAXR];
        for (int r = 0; r < R; r++) ctx[r] = &outs[r];
        ln_err e = {{0}};
        assert_int_equal(comm_thread_run(R, collectives, ctx, &e), 0);
        for (int r = 0; r < R; r++) {
            for (int i = 0; i < NEL; i++) {
                float s = val(0, i);
                for (int k = 1; k < R; k++) s += val(k, i); /* rank order, left to right */
                assert_memory_equal(&outs[r].buf[i], &s, sizeof s);
                assert_true(outs[r].bcast[i] == (float)(-i));
            }
            for (int k = 0; k < R; k++)
                for (int i = 0; i < NEL; i++) assert_true(outs[r].gathered[k * NEL + i] == (float)(k * 1000 + i));
        }
        free(outs);
    }
}

/* Rank 2 sends a different count: every rank fails, and the message names both counts. */
static int mismatch(ln_comm *c, void *ctx, ln_err *e)
{
    float buf[16] = {0};
    return comm_allreduce_sum(c, buf, comm_rank(c) == 2 ? 15 : 16, e);
}

static void test_count_mismatch(void **state)
{
    (void)state;
    ln_err e = {{0}};
    assert_int_equal(comm_thread_run(3, mismatch, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "disagree on the element count"));
    assert_non_null(strstr(e.msg, "rank 2: 15"));
}

/* Rank 0 fails before the collective; the others, already waiting, are released with an error. */
static int one_fails(ln_comm *c, void *ctx, ln_err *e)
{
    if (comm_rank(c) == 0) return ln_errf(e, "rank 0 could not load its shard");
    float x = 1.0f;
    return comm_allreduce_sum(c, &x, 1, e);
}

static void test_abort_releases(void **state)
{
    (void)state;
    ln_err e = {{0}};
    assert_int_equal(comm_thread_run(4, one_fails, NULL, &e), -1);
    assert_string_equal(e.msg, "rank 0 could not load its shard");
}

static void test_bad_arguments(void **state)
{
    (void)state;
    ln_comm *ranks[1];
    ln_err e = {{0}};
    assert_int_equal(comm_thread_group_new(0, ranks, &e), -1);
    assert_non_null(strstr(e.msg, "size 0"));
    assert_int_equal(comm_thread_group_new(1, ranks, &e), 0);
    float x = 3;
    assert_int_equal(comm_broadcast(ranks[0], &x, 1, 1, &e), -1);
    assert_non_null(strstr(e.msg, "root 1"));
    assert_int_equal(comm_allreduce_sum(ranks[0], &x, 1, &e), 0);
    assert_true(x == 3.0f);
    assert_string_equal(comm_backend_name(ranks[0]), "thread");
    comm_free(ranks[0]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_collectives),
        cmocka_unit_test(test_count_mismatch),
        cmocka_unit_test(test_abort_releases),
        cmocka_unit_test(test_bad_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
