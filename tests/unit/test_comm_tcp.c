/* Unit tests for worker/backend/comm/comm_tcp.c on 127.0.0.1: on 2 and 4 ranks (threads of this
 * process, each with its own sockets) every collective gives bitwise the thread backend's result
 * for random buffers of 0, 1, 1003 and 1.6 M floats (6.4 MB, several allreduce chunks); a count
 * mismatch fails every rank naming both counts and leaves the group usable; a wrong token, a
 * wrong group size, a taken rank and a stray that sends garbage are refused while the accept
 * keeps waiting for the right peer; a killed peer process (fork + SIGKILL) fails rank 0's collective naming it, and the other
 * processes' too; comm_abort fails the peer's pending collective and this rank's next one;
 * connect and accept give up after their timeouts naming what is missing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "worker/backend/comm/comm.h"

#define MAXR 4
#define BIG 1600003 /* floats: 6.4 MB, not a multiple of the 256 K chunk */
#define TOKEN "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

static const int64_t SIZES[] = {0, 1, 1003, BIG};
#define NSIZES ((int)(sizeof SIZES / sizeof SIZES[0]))

/* Values of mixed sign and magnitude, so a float sum depends on the order of its terms. */
static float rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    double u = (double)(*s >> 11) / 9007199254740992.0;
    int ex = (int)(*s % 17) - 8;
    return (float)((u - 0.5) * (double)(1 << (ex + 8)) / 256.0);
}

static void fill(float *x, int64_t n, int rank, int which)
{
    uint64_t s = 0x9e3779b97f4a7c15ull ^ (uint64_t)(rank * 7919 + which * 104729 + 1);
    for (int64_t i = 0; i < n; i++) x[i] = rnd(&s);
}

/* What one rank computes: allreduce, allgather, broadcast from 0 and from the last rank, barrier,
 * for every size. The results are kept for comparison across backends. */
typedef struct rank_io {
    float *red[NSIZES], *gat[NSIZES], *bc0[NSIZES], *bcl[NSIZES];
    int64_t shift;  /* added to n of the first allreduce (mismatch test) */
} rank_io;

static int collectives(ln_comm *c, void *ctx, ln_err *e)
{
    rank_io *io = ctx;
    int r = comm_rank(c), R = comm_size(c);
    for (int k = 0; k < NSIZES; k++) {
        int64_t n = SIZES[k], ng = n > 300000 ? 300000 : n;
        io->red[k] = malloc((size_t)(n ? n : 1) * sizeof(float));
        io->gat[k] = malloc((size_t)(ng ? ng * R : 1) * sizeof(float));
        io->bc0[k] = malloc((size_t)(n ? n : 1) * sizeof(float));
        io->bcl[k] = malloc((size_t)(n ? n : 1) * sizeof(float));
        float *mine = malloc((size_t)(ng ? ng : 1) * sizeof(float));
        fill(io->red[k], n, r, 0);
        fill(mine, ng, r, 1);
        fill(io->bc0[k], n, r, 2);
        fill(io->bcl[k], n, r, 3);
        int rc = comm_allreduce_sum(c, io->red[k], n, e) || comm_allgather(c, mine, io->gat[k], ng, e) ||
                 comm_broadcast(c, io->bc0[k], n, 0, e) || comm_broadcast(c, io->bcl[k], n, R - 1, e) ||
                 comm_barrier(c, e);
        free(mine);
        if (rc) return -1;
    }
    return 0;
}

static void io_free(rank_io *io)
{
    for (int k = 0; k < NSIZES; k++) {
        free(io->red[k]);
        free(io->gat[k]);
        free(io->bc0[k]);
        free(io->bcl[k]);
    }
}

/* ---------------------------------------------------------------- running TCP ranks on threads */

typedef struct tcp_rank {
    int rank, size;
    comm_tcp_listener *l; /* rank 0 */
    const char *addr;
    const char *token;
    comm_rank_fn fn;
    void *ctx;
    int rc;
    ln_err err;
    ln_comm *c;
} tcp_rank;

static void *tcp_rank_main(void *p)
{
    tcp_rank *t = p;
    ln_comm *c = NULL;
    int rc = t->rank == 0 ? comm_tcp_accept(t->l, t->size, t->token, 30, NULL, &c, &t->err)
                          : comm_tcp_connect(t->addr, t->rank, t->size, t->token, 30, NULL, &c, &t->err);
    if (rc == 0) {
        assert_int_equal(comm_rank(c), t->rank);
        assert_int_equal(comm_size(c), t->size);
        assert_string_equal(comm_backend_name(c), "tcp");
        rc = t->fn(c, t->ctx, &t->err);
        if (rc) comm_abort(c);
        comm_free(c);
    }
    t->rc = rc;
    return NULL;
}

/* Runs fn on R TCP ranks (threads); rcs and errs per rank. */
static void tcp_run(int R, comm_rank_fn fn, void **ctxs, tcp_rank *t)
{
    comm_tcp_listener *l = NULL;
    ln_err e = {{0}};
    assert_int_equal(comm_tcp_listen("127.0.0.1", 0, 0, &l, &e), 0);
    assert_true(comm_tcp_listener_port(l) > 0);
    pthread_t th[MAXR];
    for (int r = 0; r < R; r++) {
        t[r] = (tcp_rank){.rank = r, .size = R, .l = l, .addr = comm_tcp_listener_addr(l), .token = TOKEN, .fn = fn,
                          .ctx = ctxs[r]};
        assert_int_equal(pthread_create(&th[r], NULL, tcp_rank_main, &t[r]), 0);
    }
    for (int r = 0; r < R; r++) pthread_join(th[r], NULL);
    comm_tcp_listener_free(l);
}

static void check_bitwise(int R)
{
    rank_io th[MAXR] = {0}, tc[MAXR] = {0};
    void *cth[MAXR], *ctc[MAXR];
    for (int r = 0; r < R; r++) {
        cth[r] = &th[r];
        ctc[r] = &tc[r];
    }
    ln_err e = {{0}};
    assert_int_equal(comm_thread_run(R, collectives, cth, &e), 0);
    tcp_rank t[MAXR];
    tcp_run(R, collectives, ctc, t);
    for (int r = 0; r < R; r++) {
        if (t[r].rc) fail_msg("rank %d: %s", r, t[r].err.msg);
        for (int k = 0; k < NSIZES; k++) {
            int64_t n = SIZES[k], ng = n > 300000 ? 300000 : n;
            if (n == 0) continue; /* n = 0 went through every collective; nothing to compare */
            assert_memory_equal(tc[r].red[k], th[r].red[k], (size_t)n * sizeof(float));
            assert_memory_equal(tc[r].gat[k], th[r].gat[k], (size_t)(ng * R) * sizeof(float));
            assert_memory_equal(tc[r].bc0[k], th[r].bc0[k], (size_t)n * sizeof(float));
            assert_memory_equal(tc[r].bcl[k], th[r].bcl[k], (size_t)n * sizeof(float));
        }
        /* and the sum is really rank 0 + rank 1 + … (not merely the same on both backends) */
        float *x = malloc(1003 * sizeof(float)), *y = malloc(1003 * sizeof(float));
        fill(x, 1003, 0, 0);
        for (int q = 1; q < R; q++) {
            fill(y, 1003, q, 0);
            for (int i = 0; i < 1003; i++) x[i] += y[i];
        }
        assert_memory_equal(tc[r].red[2], x, 1003 * sizeof(float));
        free(x);
        free(y);
    }
    for (int r = 0; r < R; r++) {
        io_free(&th[r]);
        io_free(&tc[r]);
    }
}

static void test_bitwise_2(void **state) { check_bitwise(2); }
static void test_bitwise_4(void **state) { check_bitwise(4); }

/* ---------------------------------------------------------------- count mismatch */

static int mismatch(ln_comm *c, void *ctx, ln_err *e)
{
    float buf[12] = {0};
    int64_t n = comm_rank(c) == 1 ? 11 : 10;
    if (comm_allreduce_sum(c, buf, n, e) == 0) return 0; /* the test fails on rc 0 */
    char first[LN_ERR_MSG_MAX];
    snprintf(first, sizeof first, "%s", e->msg);
    /* The group is still in step: the next collective works. */
    for (int i = 0; i < 10; i++) buf[i] = (float)(comm_rank(c) + 1);
    ln_err e2 = {{0}};
    if (comm_allreduce_sum(c, buf, 10, &e2) != 0) {
        *e = e2;
        ln_err_prefix(e, "after the mismatch");
        return -2;
    }
    for (int i = 0; i < 10; i++)
        if (buf[i] != (float)(comm_size(c) * (comm_size(c) + 1) / 2)) return -3;
    snprintf(e->msg, sizeof e->msg, "%s", first);
    return -1;
}

static void test_count_mismatch(void **state)
{
    for (int R = 2; R <= 4; R += 2) {
        tcp_rank t[MAXR];
        void *ctx[MAXR] = {0};
        tcp_run(R, mismatch, ctx, t);
        for (int r = 0; r < R; r++) {
            if (t[r].rc != -1) fail_msg("rank %d of %d: rc %d: %s", r, R, t[r].rc, t[r].err.msg);
            assert_non_null(strstr(t[r].err.msg, "element count (rank 0: 10, rank 1: 11)"));
        }
    }
}

/* ---------------------------------------------------------------- refusals */

static void *connect_expect_refusal(void *p)
{
    tcp_rank *t = p;
    ln_comm *c = NULL;
    t->rc = comm_tcp_connect(t->addr, t->rank, t->size, t->token, 10, NULL, &c, &t->err);
    if (c) comm_free(c);
    return NULL;
}

/* Rank 0 of test_wrong_token_refused: only accepts (the handle is checked by the test). */
static void *hub_accept_only(void *p)
{
    tcp_rank *t = p;
    t->rc = comm_tcp_accept(t->l, t->size, t->token, 30, NULL, &t->c, &t->err);
    return NULL;
}

static void test_wrong_token_refused(void **state)
{
    comm_tcp_listener *l = NULL;
    ln_err e = {{0}};
    assert_int_equal(comm_tcp_listen("127.0.0.1", 0, 0, &l, &e), 0);
    const char *addr = comm_tcp_listener_addr(l);
    tcp_rank hub = {.rank = 0, .size = 3, .l = l, .token = TOKEN};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, hub_accept_only, &hub), 0);
    tcp_rank bad[4] = {
        {.rank = 1, .size = 3, .addr = addr, .token = "not-the-token"},
        {.rank = 1, .size = 2, .addr = addr, .token = TOKEN},
        {.rank = 1, .size = 3, .addr = addr, .token = TOKEN "x"},
        {.rank = 2, .size = 3, .addr = addr, .token = TOKEN}, /* joins (then a second rank 2 is refused) */
    };
    for (int i = 0; i < 3; i++) connect_expect_refusal(&bad[i]);
    assert_int_equal(bad[0].rc, -1);
    assert_non_null(strstr(bad[0].err.msg, "refused the connection: wrong group token"));
    assert_int_equal(bad[1].rc, -1);
    assert_non_null(strstr(bad[1].err.msg, "the group size differs"));
    assert_int_equal(bad[2].rc, -1);
    assert_non_null(strstr(bad[2].err.msg, "token must be 1..64"));
    /* A stray (an HTTP probe) that sends a few bytes and hangs up: dropped, the accept goes on. */
    int port = comm_tcp_listener_port(l);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    assert_int_equal(connect(s, (struct sockaddr *)&sa, sizeof sa), 0);
    const char probe[] = "GET / HTTP/1.0\r\n\r\n";
    assert_int_equal(write(s, probe, sizeof probe - 1), (ssize_t)(sizeof probe - 1));
    close(s);
    ln_comm *c2 = NULL, *c1 = NULL;
    assert_int_equal(comm_tcp_connect(addr, 2, 3, TOKEN, 10, NULL, &c2, &e), 0);
    tcp_rank dup = {.rank = 2, .size = 3, .addr = addr, .token = TOKEN};
    connect_expect_refusal(&dup);
    assert_int_equal(dup.rc, -1);
    assert_non_null(strstr(dup.err.msg, "already joined as this rank"));
    assert_int_equal(comm_tcp_connect(addr, 1, 3, TOKEN, 10, NULL, &c1, &e), 0);
    pthread_join(th, NULL);
    if (hub.rc) fail_msg("accept: %s", hub.err.msg);
    comm_free(hub.c);
    comm_free(c1);
    comm_free(c2);
    comm_tcp_listener_free(l);
}

/* ---------------------------------------------------------------- a killed peer */

/* A child process joins as `rank`, does one allreduce, then either waits to be killed (victim)
 * or runs a second allreduce, which must fail because the victim is gone: exit 0 if it did. */
static void child(const char *addr, int rank, int size, int victim)
{
    ln_comm *c = NULL;
    ln_err e = {{0}};
    if (comm_tcp_connect(addr, rank, size, TOKEN, 30, NULL, &c, &e)) _exit(10);
    float x[4] = {1, 1, 1, 1};
    if (comm_allreduce_sum(c, x, 4, &e) || x[0] != (float)size) _exit(11);
    if (rank == victim) {
        for (;;) pause();
    }
    int rc = comm_allreduce_sum(c, x, 4, &e);
    comm_free(c);
    _exit(rc == -1 && strstr(e.msg, "connection to rank 0") ? 0 : 12);
}

typedef struct killer {
    pid_t pid;
} killer;

static void *kill_later(void *p)
{
    killer *k = p;
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL); /* either before or during rank 0's collective: both must fail */
    kill(k->pid, SIGKILL);
    return NULL;
}

static void check_killed_peer(int R, int victim)
{
    comm_tcp_listener *l = NULL;
    ln_err e = {{0}};
    assert_int_equal(comm_tcp_listen("127.0.0.1", 0, 0, &l, &e), 0);
    pid_t pids[MAXR] = {0};
    for (int r = 1; r < R; r++) {
        fflush(NULL);
        pids[r] = fork();
        assert_true(pids[r] >= 0);
        if (pids[r] == 0) child(comm_tcp_listener_addr(l), r, R, victim);
    }
    ln_comm *c = NULL;
    assert_int_equal(comm_tcp_accept(l, R, TOKEN, 30, NULL, &c, &e), 0);
    float x[4] = {1, 1, 1, 1};
    assert_int_equal(comm_allreduce_sum(c, x, 4, &e), 0);
    assert_true(x[0] == (float)R);
    killer k = {pids[victim]};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, kill_later, &k), 0);
    int rc = comm_allreduce_sum(c, x, 4, &e);
    pthread_join(th, NULL);
    assert_int_equal(rc, -1);
    char want[64];
    snprintf(want, sizeof want, "connection to rank %d was closed", victim);
    if (!strstr(e.msg, want)) fail_msg("expected \"%s\" in: %s", want, e.msg);
    assert_int_equal(comm_tcp_lost_peer(c), victim);
    /* later collectives fail at once, naming the same rank */
    assert_int_equal(comm_barrier(c, &e), -1);
    snprintf(want, sizeof want, "connection to rank %d was lost", victim);
    assert_non_null(strstr(e.msg, want));
    for (int r = 1; r < R; r++) {
        int st = 0;
        assert_int_equal(waitpid(pids[r], &st, 0), pids[r]);
        if (r == victim) assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
        else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fail_msg("rank %d's process: status 0x%x", r, st);
    }
    comm_free(c);
    comm_tcp_listener_free(l);
}

static void test_killed_peer_2(void **state) { check_killed_peer(2, 1); }
static void test_killed_peer_4(void **state) { check_killed_peer(4, 2); }

/* ---------------------------------------------------------------- abort and timeouts */

static int abort_rank1(ln_comm *c, void *ctx, ln_err *e)
{
    float x[8] = {0};
    if (comm_rank(c) == 1) {
        comm_abort(c); /* fails outside a collective */
        int rc = comm_barrier(c, e);
        return rc == -1 && strstr(e->msg, "aborted by this rank") ? -1 : -2;
    }
    return comm_allreduce_sum(c, x, 8, e);
}

static void test_abort(void **state)
{
    tcp_rank t[2];
    void *ctx[2] = {0};
    tcp_run(2, abort_rank1, ctx, t);
    assert_int_equal(t[1].rc, -1);
    assert_int_equal(t[0].rc, -1);
    assert_non_null(strstr(t[0].err.msg, "connection to rank 1 was closed"));
}

static void test_timeouts(void **state)
{
    /* nothing listens on a port we just closed */
    comm_tcp_listener *l = NULL;
    ln_err e = {{0}};
    assert_int_equal(comm_tcp_listen("127.0.0.1", 0, 0, &l, &e), 0);
    char addr[COMM_TCP_ADDR_MAX];
    snprintf(addr, sizeof addr, "%s", comm_tcp_listener_addr(l));
    comm_tcp_listener_free(l);
    ln_comm *c = NULL;
    assert_int_equal(comm_tcp_connect(addr, 1, 2, TOKEN, 0.3, NULL, &c, &e), -1);
    assert_null(c);
    assert_non_null(strstr(e.msg, "cannot reach rank 0 at"));
    /* an accept nobody joins names the missing ranks */
    assert_int_equal(comm_tcp_listen("127.0.0.1", 0, 0, &l, &e), 0);
    assert_int_equal(comm_tcp_accept(l, 3, TOKEN, 0.3, NULL, &c, &e), -1);
    assert_non_null(strstr(e.msg, "rank(s) 1, 2 did not connect within"));
    /* a stop flag ends it too */
    atomic_int stop;
    atomic_init(&stop, 1);
    assert_int_equal(comm_tcp_accept(l, 2, TOKEN, 60, &stop, &c, &e), -1);
    assert_non_null(strstr(e.msg, "stopped while waiting for rank(s) 1"));
    comm_tcp_listener_free(l);
    /* bad arguments */
    assert_int_equal(comm_tcp_connect("no-port", 1, 2, TOKEN, 1, NULL, &c, &e), -1);
    assert_non_null(strstr(e.msg, "is not host:port"));
    assert_int_equal(comm_tcp_connect("127.0.0.1:1", 0, 2, TOKEN, 1, NULL, &c, &e), -1);
    assert_int_equal(comm_tcp_listen("127.0.0.1", 5, 2, &l, &e), -1);
    /* a port range: the first free port in it */
    comm_tcp_listener *a = NULL, *b = NULL;
    assert_int_equal(comm_tcp_listen("127.0.0.1", 0, 0, &a, &e), 0);
    int p = comm_tcp_listener_port(a);
    comm_tcp_listener_free(a);
    if (p < 65000) {
        assert_int_equal(comm_tcp_listen("127.0.0.1", p, p + 20, &a, &e), 0);
        assert_int_equal(comm_tcp_listen("127.0.0.1", p, p + 20, &b, &e), 0);
        assert_true(comm_tcp_listener_port(a) >= p && comm_tcp_listener_port(a) <= p + 20);
        assert_true(comm_tcp_listener_port(b) != comm_tcp_listener_port(a));
        comm_tcp_listener_free(a);
        comm_tcp_listener_free(b);
    }
    char tok[COMM_TCP_TOKEN_LEN + 1], tok2[COMM_TCP_TOKEN_LEN + 1];
    assert_int_equal(comm_tcp_token_new(tok, &e), 0);
    assert_int_equal(comm_tcp_token_new(tok2, &e), 0);
    assert_int_equal(strlen(tok), COMM_TCP_TOKEN_LEN);
    assert_string_not_equal(tok, tok2);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bitwise_2),
        cmocka_unit_test(test_bitwise_4),
        cmocka_unit_test(test_count_mismatch),
        cmocka_unit_test(test_wrong_token_refused),
        cmocka_unit_test(test_killed_peer_2),
        cmocka_unit_test(test_killed_peer_4),
        cmocka_unit_test(test_abort),
        cmocka_unit_test(test_timeouts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
