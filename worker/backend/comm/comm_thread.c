/* comm_thread.c — the in-process thread backend of comm.h: N ranks, one thread each, sharing
 * one group. A collective is two barriers around direct reads of the other ranks' buffers:
 *   1. every rank posts its buffer pointers and count in its slot, then waits on the barrier;
 *   2. every rank does its part (for allreduce: a contiguous slice of elements, summed over
 *      ranks in rank order 0..N−1 and written back to every rank's buffer — each element is
 *      touched by exactly one thread, so there is no race and the order is fixed);
 *   3. a second barrier, so no rank reuses or frees its buffer while another still reads it. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/backend/comm/comm.h"

typedef struct slot {
    const float *src;
    float *dst;
    int64_t n;
    int root;
} slot;

typedef struct group {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int size, arrived, refs;
    unsigned long gen;
    int aborted;
    slot *slots;
} group;

static group *grp(ln_comm *c) { return c->impl; }

/* A generation barrier that an abort releases with an error instead of a hang. */
static int barrier_wait(ln_comm *c, const char *op, ln_err *e)
{
    group *g = grp(c);
    pthread_mutex_lock(&g->mu);
    if (g->aborted) {
        pthread_mutex_unlock(&g->mu);
        return ln_errf(e, "comm %s (rank %d of %d): the group was aborted by a failing rank", op, c->rank, c->size);
    }
    unsigned long gen = g->gen;
    if (++g->arrived == g->size) {
        g->arrived = 0;
        g->gen++;
        pthread_cond_broadcast(&g->cv);
    } else {
        while (gen == g->gen && !g->aborted) pthread_cond_wait(&g->cv, &g->mu);
    }
    int failed = gen == g->gen; /* released by an abort, not by the last arrival */
    pthread_mutex_unlock(&g->mu);
    if (failed) return ln_errf(e, "comm %s (rank %d of %d): the group was aborted by a failing rank", op, c->rank, c->size);
    return 0;
}

/* After the first barrier every rank sees every slot: a count that differs between ranks is
 * detected identically by all of them, so they all fail together. */
static int check_counts(ln_comm *c, const char *op, ln_err *e)
{
    group *g = grp(c);
    for (int r = 1; r < g->size; r++)
        if (g->slots[r].n != g->slots[0].n)
            return ln_errf(e, "comm %s (rank %d of %d): ranks disagree on the element count (rank 0: %lld, rank %d: %lld)",
                           op, c->rank, c->size, (long long)g->slots[0].n, r, (long long)g->slots[r].n);
    return 0;
}

static int thread_allreduce(ln_comm *c, float *buf, int64_t n, ln_err *e)
{
    group *g = grp(c);
    g->slots[c->rank] = (slot){.src = buf, .dst = buf, .n = n};
    if (barrier_wait(c, "allreduce", e)) return -1;
    if (check_counts(c, "allreduce", e)) return -1;
    int64_t lo = n * c->rank / c->size, hi = n * (c->rank + 1) / c->size;
    for (int64_t i = lo; i < hi; i++) {
        float s = g->slots[0].dst[i];
        for (int r = 1; r < g->size; r++) s += g->slots[r].dst[i];
        for (int r = 0; r < g->size; r++) g->slots[r].dst[i] = s;
    }
    return barrier_wait(c, "allreduce", e);
}

static int thread_allgather(ln_comm *c, const float *send, float *recv, int64_t n, ln_err *e)
{
    group *g = grp(c);
    g->slots[c->rank] = (slot){.src = send, .dst = recv, .n = n};
    if (barrier_wait(c, "allgather", e)) return -1;
    if (check_counts(c, "allgather", e)) return -1;
    for (int r = 0; r < g->size; r++)
        if (n) memcpy(recv + (int64_t)r * n, g->slots[r].src, (size_t)n * sizeof(float));
    return barrier_wait(c, "allgather", e);
}

static int thread_broadcast(ln_comm *c, float *buf, int64_t n, int root, ln_err *e)
{
    group *g = grp(c);
    g->slots[c->rank] = (slot){.src = buf, .dst = buf, .n = n, .root = root};
    if (barrier_wait(c, "broadcast", e)) return -1;
    if (check_counts(c, "broadcast", e)) return -1;
    for (int r = 1; r < g->size; r++)
        if (g->slots[r].root != g->slots[0].root)
            return ln_errf(e, "comm broadcast (rank %d of %d): ranks disagree on the root (rank 0: %d, rank %d: %d)",
                           c->rank, c->size, g->slots[0].root, r, g->slots[r].root);
    if (c->rank != root && n) memcpy(buf, g->slots[root].src, (size_t)n * sizeof(float));
    return barrier_wait(c, "broadcast", e);
}

static int thread_barrier(ln_comm *c, ln_err *e) { return barrier_wait(c, "barrier", e); }

static void thread_abort(ln_comm *c)
{
    group *g = grp(c);
    pthread_mutex_lock(&g->mu);
    g->aborted = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void thread_free(ln_comm *c)
{
    group *g = grp(c);
    pthread_mutex_lock(&g->mu);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (last) {
        pthread_mutex_destroy(&g->mu);
        pthread_cond_destroy(&g->cv);
        free(g->slots);
        free(g);
    }
    free(c);
}

static const comm_ops THREAD_OPS = {
    .name = "thread",
    .allreduce_sum = thread_allreduce, .allgather = thread_allgather, .broadcast = thread_broadcast,
    .barrier = thread_barrier, .abort = thread_abort, .free = thread_free,
};

int comm_thread_group_new(int size, ln_comm **ranks, ln_err *e)
{
    if (size < 1 || size > 4096) return ln_errf(e, "comm thread group: size %d must be in 1..4096", size);
    group *g = ln_xcalloc(1, sizeof *g);
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->size = g->refs = size;
    g->slots = ln_xcalloc((size_t)size, sizeof *g->slots);
    for (int r = 0; r < size; r++) {
        ranks[r] = ln_xcalloc(1, sizeof(ln_comm));
        *ranks[r] = (ln_comm){.ops = &THREAD_OPS, .rank = r, .size = size, .impl = g};
    }
    return 0;
}

/* ---------------------------------------------------------------- running ranks */

typedef struct run_arg {
    ln_comm *c;
    comm_rank_fn fn;
    void *ctx;
    int rc;
    ln_err err;
} run_arg;

static void *run_rank(void *p)
{
    run_arg *a = p;
    a->rc = a->fn(a->c, a->ctx, &a->err);
    if (a->rc) comm_abort(a->c);
    return NULL;
}

int comm_thread_run(int size, comm_rank_fn fn, void **ctxs, ln_err *e)
{
    ln_comm **ranks = ln_xcalloc((size_t)(size > 0 ? size : 1), sizeof *ranks);
    if (comm_thread_group_new(size, ranks, e)) {
        free(ranks);
        return -1;
    }
    run_arg *args = ln_xcalloc((size_t)size, sizeof *args);
    pthread_t *th = ln_xcalloc((size_t)size, sizeof *th);
    int started = 0, rc = 0;
    for (int r = 0; r < size; r++) {
        args[r] = (run_arg){.c = ranks[r], .fn = fn, .ctx = ctxs ? ctxs[r] : NULL};
        if (pthread_create(&th[r], NULL, run_rank, &args[r]) != 0) {
            comm_abort(ranks[0]);
            rc = ln_errf(e, "comm thread run: could not start the thread of rank %d of %d", r, size);
            break;
        }
        started++;
    }
    for (int r = 0; r < started; r++) pthread_join(th[r], NULL);
    /* A rank that failed first is the cause; the others usually report the abort. Prefer a rank
     * whose message is not the abort notice. */
    int first = -1;
    for (int r = 0; r < started && rc == 0; r++)
        if (args[r].rc && (first < 0 || strstr(args[first].err.msg, "aborted"))) first = r;
    if (rc == 0 && first >= 0) {
        if (e) *e = args[first].err;
        rc = -1;
    }
    for (int r = 0; r < size; r++) comm_free(ranks[r]);
    free(ranks);
    free(args);
    free(th);
    return rc;
}
