/* comm_tcp.c — the TCP backend of comm.h: one rank per process (or host), a star around rank 0.
 *
 * Rank 0 (the hub) listens; every other rank connects once and presents the group's secret
 * token, its rank and the group size. Every collective starts with a header exchange: each rank
 * sends (op, sequence number, n, root) to the hub, the hub compares them with its own and sends
 * every rank the same verdict, so a mismatch fails all ranks with one message naming both
 * values, and no data has moved. The header round trip is also the barrier.
 *
 * Data (floats in host byte order; a gang runs on one architecture):
 *  - allreduce: in chunks of CHUNK floats, lock-step: each rank sends its chunk, the hub sums
 *    rank 0's + rank 1's + … + rank N−1's for every element — the thread backend's order, so
 *    the results are bitwise equal to it — and sends the sum back before the next chunk. Lock
 *    step keeps at most one chunk per link in flight, so no send can wait on a send.
 *  - allgather: every rank sends its n floats to the hub, which sends the whole N·n back.
 *  - broadcast: the root's buffer reaches the hub (unless the hub is the root), which sends it
 *    to every rank but the root.
 * Data moves only after the header round, when every rank is inside the collective, so no rank
 * sends into a peer that is still computing (whose full receive buffer would otherwise hold the
 * sender in zero-window probes long enough for TCP_USER_TIMEOUT to call the link dead).
 * There is no timeout on a peer's data (ranks may compute for minutes between collectives): a
 * peer that dies closes its sockets (the kernel does so for a killed process), which ends the
 * read on the other side; a host that vanishes is found by TCP keepalive and TCP_USER_TIMEOUT.
 * A collective that fails half way shuts every link of this rank down, so the others fail too
 * (through the hub) instead of waiting for data that will never come. comm_abort does the same
 * from any thread: shutdown(2) wakes a blocked read or write; the descriptors are closed only by
 * comm_free. */
#include <errno.h>
#include <endian.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/util.h"
#include "worker/backend/comm/comm.h"

#define CHUNK (256 * 1024)               /* floats per allreduce step (1 MiB) */
#define HELLO_MAGIC 0x4c4e5443u          /* "LNTC" */
#define HELLO_TIMEOUT_MS 5000            /* a connection must say who it is within this */
#define KEEPALIVE_IDLE_S 30
#define KEEPALIVE_INTVL_S 10
#define KEEPALIVE_CNT 6
#define USER_TIMEOUT_MS (120 * 1000)     /* unacknowledged data on a link for this long: dead */

enum { OP_ALLREDUCE = 1, OP_ALLGATHER, OP_BROADCAST, OP_BARRIER };
enum { HELLO_OK = 0, HELLO_BAD_TOKEN, HELLO_BAD_RANK, HELLO_DUP_RANK, HELLO_BAD_SIZE };

static const char *op_name(uint64_t op)
{
    switch (op) {
    case OP_ALLREDUCE: return "allreduce";
    case OP_ALLGATHER: return "allgather";
    case OP_BROADCAST: return "broadcast";
    case OP_BARRIER: return "barrier";
    default: return "unknown";
    }
}

typedef struct tcp_group {
    int *fd;                  /* hub: fd[r] for r = 1..size−1 (fd[0] unused); others: fd[0] = the hub */
    int nfd;
    float *scratch;           /* hub: one chunk from a peer */
    uint64_t seq;             /* collectives so far */
    atomic_int aborted;       /* comm_abort was called on this rank */
    atomic_int broken;        /* a collective failed half way: the streams are out of step */
    atomic_int lost_peer;     /* rank whose link ended first, or −1 */
} tcp_group;

struct comm_tcp_listener {
    int fd;
    char addr[COMM_TCP_ADDR_MAX];
};

static tcp_group *tg(ln_comm *c) { return c->impl; }

/* ---------------------------------------------------------------- sockets */

static double now_s(void) { return ln_now_s(); }

static int stop_requested(const atomic_int *stop) { return stop && atomic_load(stop); }

static void link_options(int fd)
{
    int one = 1, idle = KEEPALIVE_IDLE_S, intvl = KEEPALIVE_INTVL_S, cnt = KEEPALIVE_CNT;
    unsigned int ut = USER_TIMEOUT_MS;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
    setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ut, sizeof ut);
}

static int set_blocking(int fd, int blocking)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) return -1;
    return fcntl(fd, F_SETFL, blocking ? fl & ~O_NONBLOCK : fl | O_NONBLOCK);
}

/* Writes all of p; 0, or −1 with errno (EPIPE when the peer closed). */
static int write_all(int fd, const void *p, size_t n)
{
    const char *b = p;
    while (n > 0) {
        ssize_t k = send(fd, b, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Reads exactly n bytes, within timeout_ms (< 0: no limit — a collective waits as long as its
 * peers compute); 0, or −1 with errno (0 = the peer closed the connection). */
static int read_within(int fd, void *p, size_t n, int timeout_ms)
{
    char *b = p;
    double end = now_s() + timeout_ms / 1000.0;
    while (n > 0) {
        if (timeout_ms >= 0) {
            int left = (int)((end - now_s()) * 1000);
            if (left <= 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            struct pollfd pf = {.fd = fd, .events = POLLIN};
            if (poll(&pf, 1, left) <= 0) continue; /* EINTR, or the deadline (checked above) */
        }
        ssize_t k = recv(fd, b, n, 0);
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -1;
        }
        if (k == 0) {
            errno = 0;
            return -1;
        }
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

static int read_all(int fd, void *p, size_t n) { return read_within(fd, p, n, -1); }

/* "host:port" or "[v6]:port" → host and port. */
static int split_addr(const char *addr, char *host, size_t hn, char *port, size_t pn, ln_err *e)
{
    const char *colon = strrchr(addr, ':');
    if (!colon || colon == addr || !colon[1])
        return ln_errf(e, "comm tcp: address \"%s\" is not host:port", addr);
    const char *h = addr;
    size_t hl = (size_t)(colon - addr);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl == 0 || hl >= hn || strlen(colon + 1) >= pn)
        return ln_errf(e, "comm tcp: address \"%s\" is not host:port", addr);
    memcpy(host, h, hl);
    host[hl] = 0;
    snprintf(port, pn, "%s", colon + 1);
    for (const char *q = port; *q; q++)
        if (*q < '0' || *q > '9') return ln_errf(e, "comm tcp: address \"%s\": the port is not a number", addr);
    return 0;
}

/* ---------------------------------------------------------------- group state */

static void shutdown_links(tcp_group *g)
{
    for (int i = 0; i < g->nfd; i++)
        if (g->fd[i] >= 0) shutdown(g->fd[i], SHUT_RDWR);
}

/* A link to peer failed during op (errno says how): breaks the group — every link shut down, so
 * the other ranks fail too instead of waiting — and says why. */
static int fail_link(ln_comm *c, const char *op, int peer, ln_err *e)
{
    tcp_group *g = tg(c);
    int err = errno;
    atomic_store(&g->broken, 1);
    shutdown_links(g);
    if (atomic_load(&g->aborted))
        return ln_errf(e, "comm %s (rank %d of %d): the group was aborted by this rank", op, c->rank, c->size);
    int expected = -1;
    atomic_compare_exchange_strong(&g->lost_peer, &expected, peer);
    if (err == 0 || err == ECONNRESET || err == EPIPE)
        return ln_errf(e, "comm %s (rank %d of %d): the connection to rank %d was closed (rank %d's process ended, "
                          "failed or aborted the group)", op, c->rank, c->size, peer, peer);
    return ln_errf(e, "comm %s (rank %d of %d): the connection to rank %d failed: %s", op, c->rank, c->size, peer,
                   strerror(err));
}

static int check_usable(ln_comm *c, const char *op, ln_err *e)
{
    tcp_group *g = tg(c);
    if (atomic_load(&g->aborted))
        return ln_errf(e, "comm %s (rank %d of %d): the group was aborted by this rank", op, c->rank, c->size);
    if (atomic_load(&g->broken)) {
        int p = atomic_load(&g->lost_peer);
        return ln_errf(e, "comm %s (rank %d of %d): an earlier collective failed (the connection to rank %d was lost)",
                       op, c->rank, c->size, p);
    }
    return 0;
}

/* ---------------------------------------------------------------- the header round */

typedef struct hdr {
    uint64_t op, seq, n, root;
} hdr;

static void put_u64s(unsigned char *out, const uint64_t *v, int k)
{
    for (int i = 0; i < k; i++) {
        uint64_t be = htobe64(v[i]);
        memcpy(out + 8 * i, &be, 8);
    }
}

static void get_u64s(const unsigned char *in, uint64_t *v, int k)
{
    for (int i = 0; i < k; i++) {
        uint64_t be;
        memcpy(&be, in + 8 * i, 8);
        v[i] = be64toh(be);
    }
}

/* verdict: status (0 ok, 1 mismatch), the disagreeing rank, rank 0's header, that rank's header */
#define VERDICT_WORDS 10

static int verdict_error(ln_comm *c, const char *op, const uint64_t *v, ln_err *e)
{
    hdr h0 = {v[2], v[3], v[4], v[5]}, hk = {v[6], v[7], v[8], v[9]};
    int k = (int)v[1];
    if (h0.op != hk.op)
        return ln_errf(e, "comm %s (rank %d of %d): ranks disagree on the collective (rank 0: %s, rank %d: %s)", op,
                       c->rank, c->size, op_name(h0.op), k, op_name(hk.op));
    if (h0.n != hk.n)
        return ln_errf(e, "comm %s (rank %d of %d): ranks disagree on the element count (rank 0: %lld, rank %d: %lld)",
                       op, c->rank, c->size, (long long)h0.n, k, (long long)hk.n);
    if (h0.root != hk.root)
        return ln_errf(e, "comm %s (rank %d of %d): ranks disagree on the root (rank 0: %d, rank %d: %d)", op, c->rank,
                       c->size, (int)h0.root, k, (int)hk.root);
    /* Same call, different sequence number: a rank skipped a collective. */
    return ln_errf(e, "comm %s (rank %d of %d): ranks are out of step (rank 0 is at collective %llu, rank %d at %llu)",
                   op, c->rank, c->size, (unsigned long long)h0.seq, k, (unsigned long long)hk.seq);
}

/* Every rank's header reaches the hub, every rank gets the same verdict back. 0 = agreed. */
static int header_round(ln_comm *c, uint64_t op, int64_t n, int root, ln_err *e)
{
    tcp_group *g = tg(c);
    const char *name = op_name(op);
    if (check_usable(c, name, e)) return -1;
    uint64_t mine[4] = {op, g->seq++, (uint64_t)n, (uint64_t)root};
    unsigned char buf[8 * VERDICT_WORDS];
    uint64_t v[VERDICT_WORDS] = {0};
    if (c->rank != 0) {
        put_u64s(buf, mine, 4);
        if (write_all(g->fd[0], buf, 32)) return fail_link(c, name, 0, e);
        if (read_all(g->fd[0], buf, sizeof buf)) return fail_link(c, name, 0, e);
        get_u64s(buf, v, VERDICT_WORDS);
    } else {
        int bad = -1;
        uint64_t theirs[4] = {0}, badh[4] = {0};
        for (int r = 1; r < c->size; r++) {
            if (read_all(g->fd[r], buf, 32)) return fail_link(c, name, r, e);
            get_u64s(buf, theirs, 4);
            if (bad < 0 && memcmp(theirs, mine, sizeof mine) != 0) {
                bad = r;
                memcpy(badh, theirs, sizeof badh);
            }
        }
        v[0] = bad >= 0;
        v[1] = bad >= 0 ? (uint64_t)bad : 0;
        memcpy(&v[2], mine, sizeof mine);
        memcpy(&v[6], badh, sizeof badh);
        put_u64s(buf, v, VERDICT_WORDS);
        for (int r = 1; r < c->size; r++)
            if (write_all(g->fd[r], buf, sizeof buf)) return fail_link(c, name, r, e);
    }
    if (v[0]) {
        /* Nobody sends data after a refused header, so the streams stay in step; realign the
         * sequence numbers on rank 0's so the next collective can still agree. */
        g->seq = v[3] + 1;
        return verdict_error(c, name, v, e);
    }
    return 0;
}

/* ---------------------------------------------------------------- collectives */

static int tcp_allreduce(ln_comm *c, float *buf, int64_t n, ln_err *e)
{
    tcp_group *g = tg(c);
    if (header_round(c, OP_ALLREDUCE, n, 0, e)) return -1;
    for (int64_t lo = 0; lo < n; lo += CHUNK) {
        size_t k = (size_t)(n - lo < CHUNK ? n - lo : CHUNK), bytes = k * sizeof(float);
        float *x = buf + lo;
        if (c->rank != 0) {
            if (write_all(g->fd[0], x, bytes) || read_all(g->fd[0], x, bytes)) return fail_link(c, "allreduce", 0, e);
            continue;
        }
        /* rank 0's values first, then each rank's added in rank order: ((x0 + x1) + x2) + … */
        for (int r = 1; r < c->size; r++) {
            if (read_all(g->fd[r], g->scratch, bytes)) return fail_link(c, "allreduce", r, e);
            for (size_t i = 0; i < k; i++) x[i] += g->scratch[i];
        }
        for (int r = 1; r < c->size; r++)
            if (write_all(g->fd[r], x, bytes)) return fail_link(c, "allreduce", r, e);
    }
    return 0;
}

static int tcp_allgather(ln_comm *c, const float *send, float *recv, int64_t n, ln_err *e)
{
    tcp_group *g = tg(c);
    if (header_round(c, OP_ALLGATHER, n, 0, e)) return -1;
    if (n == 0) return 0;
    size_t bytes = (size_t)n * sizeof(float);
    if (c->rank != 0) {
        if (write_all(g->fd[0], send, bytes) || read_all(g->fd[0], recv, bytes * (size_t)c->size))
            return fail_link(c, "allgather", 0, e);
        return 0;
    }
    memcpy(recv, send, bytes);
    for (int r = 1; r < c->size; r++)
        if (read_all(g->fd[r], recv + (int64_t)r * n, bytes)) return fail_link(c, "allgather", r, e);
    for (int r = 1; r < c->size; r++)
        if (write_all(g->fd[r], recv, bytes * (size_t)c->size)) return fail_link(c, "allgather", r, e);
    return 0;
}

static int tcp_broadcast(ln_comm *c, float *buf, int64_t n, int root, ln_err *e)
{
    tcp_group *g = tg(c);
    if (header_round(c, OP_BROADCAST, n, root, e)) return -1;
    if (n == 0) return 0;
    size_t bytes = (size_t)n * sizeof(float);
    if (c->rank != 0) {
        int rc = c->rank == root ? write_all(g->fd[0], buf, bytes) : read_all(g->fd[0], buf, bytes);
        return rc ? fail_link(c, "broadcast", 0, e) : 0;
    }
    if (root != 0 && read_all(g->fd[root], buf, bytes)) return fail_link(c, "broadcast", root, e);
    for (int r = 1; r < c->size; r++)
        if (r != root && write_all(g->fd[r], buf, bytes)) return fail_link(c, "broadcast", r, e);
    return 0;
}

static int tcp_barrier(ln_comm *c, ln_err *e) { return header_round(c, OP_BARRIER, 0, 0, e); }

static void tcp_abort(ln_comm *c)
{
    tcp_group *g = tg(c);
    atomic_store(&g->aborted, 1);
    shutdown_links(g);
}

static void tcp_free(ln_comm *c)
{
    tcp_group *g = tg(c);
    for (int i = 0; i < g->nfd; i++)
        if (g->fd[i] >= 0) close(g->fd[i]);
    free(g->fd);
    free(g->scratch);
    free(g);
    free(c);
}

static const comm_ops TCP_OPS = {
    .name = "tcp",
    .allreduce_sum = tcp_allreduce, .allgather = tcp_allgather, .broadcast = tcp_broadcast,
    .barrier = tcp_barrier, .abort = tcp_abort, .free = tcp_free,
};

static ln_comm *group_new(int rank, int size, int *fds, int nfd)
{
    tcp_group *g = ln_xcalloc(1, sizeof *g);
    g->fd = fds;
    g->nfd = nfd;
    if (rank == 0 && size > 1) g->scratch = ln_xmalloc(CHUNK * sizeof(float));
    atomic_init(&g->aborted, 0);
    atomic_init(&g->broken, 0);
    atomic_init(&g->lost_peer, -1);
    ln_comm *c = ln_xcalloc(1, sizeof *c);
    *c = (ln_comm){.ops = &TCP_OPS, .rank = rank, .size = size, .impl = g};
    return c;
}

int comm_tcp_lost_peer(const ln_comm *c)
{
    if (!c || c->ops != &TCP_OPS) return -1;
    return atomic_load(&((tcp_group *)c->impl)->lost_peer);
}

/* ---------------------------------------------------------------- setting up */

int comm_tcp_token_new(char token[COMM_TCP_TOKEN_LEN + 1], ln_err *e)
{
    unsigned char raw[COMM_TCP_TOKEN_LEN / 2];
    size_t got = 0;
    while (got < sizeof raw) {
        ssize_t k = getrandom(raw + got, sizeof raw - got, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return ln_errf(e, "comm tcp: could not read random bytes for the group token: %s", strerror(errno));
        got += (size_t)k;
    }
    for (size_t i = 0; i < sizeof raw; i++) snprintf(token + 2 * i, 3, "%02x", raw[i]);
    return 0;
}

static int token_ok(const char *token, ln_err *e)
{
    size_t n = token ? strlen(token) : 0;
    if (n == 0 || n > COMM_TCP_TOKEN_LEN)
        return ln_errf(e, "comm tcp: the group token must be 1..%d characters (it has %zu)", COMM_TCP_TOKEN_LEN, n);
    return 0;
}

int comm_tcp_listen(const char *host, int port_lo, int port_hi, comm_tcp_listener **out, ln_err *e)
{
    *out = NULL;
    if (port_lo < 0 || port_hi < port_lo || port_hi > 65535)
        return ln_errf(e, "comm tcp listen: port range %d-%d is not within 0-65535", port_lo, port_hi);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai = NULL;
    int gr = getaddrinfo(host && *host ? host : NULL, "0", &hints, &ai);
    if (gr) return ln_errf(e, "comm tcp listen: cannot resolve %s: %s", host ? host : "(any)", gai_strerror(gr));
    int fd = -1, last = 0;
    for (int port = port_lo; port <= port_hi && fd < 0; port++) {
        for (struct addrinfo *p = ai; p && fd < 0; p = p->ai_next) {
            int s = socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol);
            if (s < 0) {
                last = errno;
                continue;
            }
            int one = 1;
            setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
            struct sockaddr_storage sa;
            memcpy(&sa, p->ai_addr, p->ai_addrlen);
            if (sa.ss_family == AF_INET) ((struct sockaddr_in *)&sa)->sin_port = htons((uint16_t)port);
            else ((struct sockaddr_in6 *)&sa)->sin6_port = htons((uint16_t)port);
            if (bind(s, (struct sockaddr *)&sa, p->ai_addrlen) == 0 && listen(s, 64) == 0) {
                fd = s;
            } else {
                last = errno;
                close(s);
            }
        }
    }
    freeaddrinfo(ai);
    if (fd < 0)
        return ln_errf(e, "comm tcp listen: cannot listen on %s port %d-%d: %s", host ? host : "(any)", port_lo, port_hi,
                       strerror(last));
    struct sockaddr_storage sa;
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    char h[NI_MAXHOST], p[NI_MAXSERV];
    getnameinfo((struct sockaddr *)&sa, sl, h, sizeof h, p, sizeof p, NI_NUMERICHOST | NI_NUMERICSERV);
    comm_tcp_listener *l = ln_xcalloc(1, sizeof *l);
    l->fd = fd;
    snprintf(l->addr, sizeof l->addr, sa.ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", h, p);
    *out = l;
    return 0;
}

const char *comm_tcp_listener_addr(const comm_tcp_listener *l) { return l->addr; }

int comm_tcp_listener_port(const comm_tcp_listener *l)
{
    const char *colon = strrchr(l->addr, ':');
    return colon ? atoi(colon + 1) : 0;
}

void comm_tcp_listener_free(comm_tcp_listener *l)
{
    if (!l) return;
    close(l->fd);
    free(l);
}

#define HELLO_BYTES (8 * 3 + COMM_TCP_TOKEN_LEN)

/* The hello of one new connection: 0 and its rank when it belongs to the group; −1 (refused,
 * with the reason sent back to it and logged into why) otherwise. */
static int hello_check(int fd, int size, const char *token, const int *fds, int *rank, char *why, size_t wn)
{
    unsigned char b[HELLO_BYTES];
    if (read_within(fd, b, sizeof b, HELLO_TIMEOUT_MS)) {
        snprintf(why, wn, "a connection sent no valid hello within %d ms", HELLO_TIMEOUT_MS);
        return -1;
    }
    uint64_t v[3];
    get_u64s(b, v, 3);
    char tok[COMM_TCP_TOKEN_LEN] = {0};
    memcpy(tok, token, strlen(token)); /* at most COMM_TCP_TOKEN_LEN (token_ok) */
    /* Compare every byte (no early exit), so the time taken says nothing about the token. */
    unsigned char diff = 0;
    for (int i = 0; i < COMM_TCP_TOKEN_LEN; i++) diff |= (unsigned char)(b[24 + i] ^ (unsigned char)tok[i]);
    uint64_t code = HELLO_OK;
    if (v[0] != HELLO_MAGIC || diff) code = HELLO_BAD_TOKEN;
    else if (v[2] != (uint64_t)size) code = HELLO_BAD_SIZE;
    else if (v[1] < 1 || v[1] >= (uint64_t)size) code = HELLO_BAD_RANK;
    else if (fds[v[1]] >= 0) code = HELLO_DUP_RANK;
    unsigned char reply[8];
    put_u64s(reply, &code, 1);
    int sent = write_all(fd, reply, sizeof reply);
    switch (code) {
    case HELLO_OK: *rank = (int)v[1]; return sent;
    case HELLO_BAD_TOKEN: snprintf(why, wn, "refused a connection with a wrong token"); break;
    case HELLO_BAD_SIZE: snprintf(why, wn, "refused rank %llu: it expects a group of %llu, not %d", (unsigned long long)v[1], (unsigned long long)v[2], size); break;
    case HELLO_BAD_RANK: snprintf(why, wn, "refused a connection claiming rank %llu of %d", (unsigned long long)v[1], size); break;
    default: snprintf(why, wn, "refused a second connection as rank %llu", (unsigned long long)v[1]); break;
    }
    return -1;
}

int comm_tcp_accept(comm_tcp_listener *l, int size, const char *token, double timeout_s, const atomic_int *stop,
                    ln_comm **out, ln_err *e)
{
    *out = NULL;
    if (size < 1 || size > 4096) return ln_errf(e, "comm tcp accept: group size %d must be in 1..4096", size);
    if (token_ok(token, e)) return -1;
    int *fds = ln_xmalloc((size_t)size * sizeof *fds);
    for (int r = 0; r < size; r++) fds[r] = -1;
    int joined = 1;
    double end = now_s() + timeout_s;
    char why[200] = "";
    while (joined < size) {
        double left = end - now_s();
        if (left <= 0 || stop_requested(stop)) {
            char missing[256] = "";
            size_t k = 0;
            for (int r = 1; r < size && k + 16 < sizeof missing; r++)
                if (fds[r] < 0) k += (size_t)snprintf(missing + k, sizeof missing - k, "%s%d", k ? ", " : "", r);
            for (int r = 1; r < size; r++)
                if (fds[r] >= 0) close(fds[r]);
            free(fds);
            if (stop_requested(stop))
                return ln_errf(e, "comm tcp accept on %s: stopped while waiting for rank(s) %s", l->addr, missing);
            return ln_errf(e, "comm tcp accept on %s: rank(s) %s did not connect within %.0f s%s%s", l->addr, missing,
                           timeout_s, why[0] ? "; last refusal: " : "", why);
        }
        struct pollfd pf = {.fd = l->fd, .events = POLLIN};
        int wait_ms = left < 0.1 ? (int)(left * 1000) + 1 : 100;
        int pr = poll(&pf, 1, wait_ms);
        if (pr <= 0) continue;
        int s = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
        if (s < 0) continue;
        int rank = -1;
        if (hello_check(s, size, token, fds, &rank, why, sizeof why) != 0) {
            close(s);
            continue;
        }
        set_blocking(s, 1);
        link_options(s);
        fds[rank] = s;
        joined++;
    }
    *out = group_new(0, size, fds, size);
    return 0;
}

/* connect(2) with a deadline: 0 and the connected socket, or −1 with errno. */
static int connect_once(const struct addrinfo *p, double end, int *out)
{
    int s = socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, p->ai_protocol);
    if (s < 0) return -1;
    if (connect(s, p->ai_addr, p->ai_addrlen) != 0 && errno != EINPROGRESS) {
        int err = errno;
        close(s);
        errno = err;
        return -1;
    }
    for (;;) {
        int left = (int)((end - now_s()) * 1000);
        if (left <= 0) {
            close(s);
            errno = ETIMEDOUT;
            return -1;
        }
        struct pollfd pf = {.fd = s, .events = POLLOUT};
        int pr = poll(&pf, 1, left < 100 ? left : 100);
        if (pr < 0 && errno != EINTR) break;
        if (pr > 0) break;
    }
    int err = 0;
    socklen_t el = sizeof err;
    if (getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err) {
        close(s);
        errno = err ? err : EIO;
        return -1;
    }
    set_blocking(s, 1);
    *out = s;
    return 0;
}

int comm_tcp_connect(const char *addr, int rank, int size, const char *token, double timeout_s,
                     const atomic_int *stop, ln_comm **out, ln_err *e)
{
    *out = NULL;
    if (size < 2 || size > 4096 || rank < 1 || rank >= size)
        return ln_errf(e, "comm tcp connect: rank %d of %d: a connecting rank must be 1..size-1 of a group of 2..4096",
                       rank, size);
    if (token_ok(token, e)) return -1;
    char host[256], port[16];
    if (split_addr(addr, host, sizeof host, port, sizeof port, e)) return -1;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    int gr = getaddrinfo(host, port, &hints, &ai);
    if (gr) return ln_errf(e, "comm tcp connect (rank %d): cannot resolve %s: %s", rank, host, gai_strerror(gr));
    double end = now_s() + timeout_s;
    int s = -1, err = 0;
    while (s < 0) {
        for (struct addrinfo *p = ai; p && s < 0; p = p->ai_next)
            if (connect_once(p, end, &s) != 0) err = errno;
        if (s >= 0 || now_s() >= end || stop_requested(stop)) break;
        struct timespec ts = {0, 100 * 1000 * 1000}; /* rank 0 may not listen yet: try again */
        nanosleep(&ts, NULL);
    }
    freeaddrinfo(ai);
    if (s < 0) {
        if (stop_requested(stop)) return ln_errf(e, "comm tcp connect (rank %d): stopped while connecting to rank 0 at %s", rank, addr);
        return ln_errf(e, "comm tcp connect (rank %d): cannot reach rank 0 at %s within %.0f s: %s", rank, addr,
                       timeout_s, strerror(err ? err : ETIMEDOUT));
    }
    unsigned char b[HELLO_BYTES] = {0};
    uint64_t v[3] = {HELLO_MAGIC, (uint64_t)rank, (uint64_t)size};
    put_u64s(b, v, 3);
    memcpy(b + 24, token, strlen(token));
    unsigned char reply[8];
    int left_ms = (int)((end - now_s()) * 1000);
    if (write_all(s, b, sizeof b) || read_within(s, reply, sizeof reply, left_ms > 1000 ? left_ms : 1000)) {
        int er = errno;
        close(s);
        return ln_errf(e, "comm tcp connect (rank %d): rank 0 at %s closed the connection during the hello%s%s", rank,
                       addr, er ? ": " : "", er ? strerror(er) : "");
    }
    uint64_t code;
    get_u64s(reply, &code, 1);
    if (code != HELLO_OK) {
        close(s);
        const char *why = code == HELLO_BAD_TOKEN ? "wrong group token (a stale attempt or another job's address)"
                          : code == HELLO_BAD_SIZE ? "the group size differs"
                          : code == HELLO_BAD_RANK ? "the rank is out of range"
                                                   : "another process already joined as this rank";
        return ln_errf(e, "comm tcp connect (rank %d of %d): rank 0 at %s refused the connection: %s", rank, size, addr,
                       why);
    }
    link_options(s);
    int *fds = ln_xmalloc(sizeof *fds);
    fds[0] = s;
    *out = group_new(rank, size, fds, 1);
    return 0;
}
