/* bench_comm.c — allreduce and allgather time of the thread and TCP comm backends on 2 ranks.
 *
 * Usage: bench_comm thread|tcp [MAX_BYTES]     (built by tests/bench/run.sh; run by bench_ranks.py)
 *
 * thread: two ranks on two threads of this process (comm_thread_run). tcp: two processes on
 * 127.0.0.1 (fork; rank 0 listens, rank 1 connects), as two workers of a split job talk. For each
 * buffer size (bytes each rank contributes: 1 KiB, 2 KiB, 4 KiB, …, MAX_BYTES, default 64 MiB) every rank
 * calls the collective `iters` times back to back (about 256 MiB moved per size, 3..2000 calls,
 * after one warm-up call) and rank 0 times each call. Prints one JSON object per (op, size):
 * the median and best call time, and the algorithm bandwidth of the median call — allreduce: the
 * buffer's bytes / time; allgather: the bytes each rank receives (2 × buffer) / time. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/err.h"
#include "common/util.h"
#include "worker/backend/comm/comm.h"

#define NRANKS 2

typedef struct sweep {
    int64_t max_bytes;
    const char *backend;
} sweep;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* One collective of n floats per rank: allreduce in place on buf, or allgather of buf into all. */
static int one_call(ln_comm *c, int gather, float *buf, float *all, int64_t n, ln_err *e)
{
    return gather ? comm_allgather(c, buf, all, n, e) : comm_allreduce_sum(c, buf, n, e);
}

/* Every rank runs the same sweep (same sizes, same call counts); rank 0 prints. */
static int run_sweep(ln_comm *c, void *ctx, ln_err *e)
{
    const sweep *s = ctx;
    int rank = comm_rank(c), rc = -1;
    int64_t max_n = s->max_bytes / (int64_t)sizeof(float);
    float *buf = ln_try_alloc((size_t)max_n * sizeof(float), "bench_comm: the send buffer", e);
    float *all = buf ? ln_try_alloc((size_t)max_n * NRANKS * sizeof(float), "bench_comm: the gather buffer", e)
                     : NULL;
    double *t = ln_try_alloc(2000 * sizeof(double), "bench_comm: the call times", e);
    if (!buf || !all || !t) goto out;
    for (int64_t i = 0; i < max_n; i++) buf[i] = (float)((i + rank) % 7) * 1e-3f;
    for (int gather = 0; gather < 2; gather++) {
        for (int64_t bytes = 1024; bytes <= s->max_bytes; bytes *= 2) {
            int64_t n = bytes / (int64_t)sizeof(float);
            int64_t iters = ((int64_t)256 << 20) / bytes;
            iters = iters < 3 ? 3 : iters > 2000 ? 2000 : iters;
            if (one_call(c, gather, buf, all, n, e)) goto out; /* warm-up: first touch of the buffers */
            for (int64_t i = 0; i < iters; i++) {
                double t0 = ln_now_s();
                if (one_call(c, gather, buf, all, n, e)) goto out;
                t[i] = ln_now_s() - t0;
            }
            if (rank != 0) continue;
            qsort(t, (size_t)iters, sizeof *t, cmp_double);
            double med = t[iters / 2], moved = gather ? (double)bytes * NRANKS : (double)bytes;
            printf("{\"backend\":\"%s\",\"op\":\"%s\",\"bytes\":%" PRId64 ",\"iters\":%" PRId64
                   ",\"median_s\":%.9f,\"best_s\":%.9f,\"algbw_GBps\":%.4f}\n",
                   s->backend, gather ? "allgather" : "allreduce", bytes, iters, med, t[0], moved / med / 1e9);
            fflush(stdout);
        }
    }
    rc = 0;
out:
    free(buf);
    free(all);
    free(t);
    return rc;
}

static int bench_thread(sweep *s, ln_err *e)
{
    void *ctxs[NRANKS] = {s, s};
    return comm_thread_run(NRANKS, run_sweep, ctxs, e);
}

/* Rank 0 in this process, rank 1 in a forked child; both on loopback. */
static int bench_tcp(sweep *s, ln_err *e)
{
    char token[COMM_TCP_TOKEN_LEN + 1];
    comm_tcp_listener *l = NULL;
    ln_comm *c = NULL;
    if (comm_tcp_token_new(token, e) || comm_tcp_listen("127.0.0.1", 0, 0, &l, e)) return -1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        comm_tcp_listener_free(l);
        return ln_errf(e, "bench_comm: fork of rank 1 failed");
    }
    if (pid == 0) {
        ln_err ce = {{0}};
        int rc = comm_tcp_connect(comm_tcp_listener_addr(l), 1, NRANKS, token, 30, NULL, &c, &ce);
        if (rc == 0) rc = run_sweep(c, s, &ce);
        if (rc) fprintf(stderr, "bench_comm: rank 1: %s\n", ce.msg);
        if (c) comm_free(c);
        _exit(rc ? 1 : 0);
    }
    int rc = comm_tcp_accept(l, NRANKS, token, 30, NULL, &c, e);
    if (rc == 0) rc = run_sweep(c, s, e);
    if (rc && c) comm_abort(c);
    if (c) comm_free(c);
    comm_tcp_listener_free(l);
    int status = 0;
    waitpid(pid, &status, 0);
    if (rc == 0 && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        return ln_errf(e, "bench_comm: rank 1's process failed (status %d)", status);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "thread") != 0 && strcmp(argv[1], "tcp") != 0)) {
        fprintf(stderr, "usage: bench_comm thread|tcp [MAX_BYTES]\n");
        return 2;
    }
    sweep s = {argc > 2 ? strtoll(argv[2], NULL, 10) : (int64_t)64 << 20, argv[1]};
    if (s.max_bytes < 1024) {
        fprintf(stderr, "bench_comm: MAX_BYTES must be at least 1024\n");
        return 2;
    }
    ln_err e = {{0}};
    if ((strcmp(s.backend, "thread") == 0 ? bench_thread(&s, &e) : bench_tcp(&s, &e)) != 0) {
        fprintf(stderr, "bench_comm: %s\n", e.msg);
        return 1;
    }
    return 0;
}
