/* comm.h — collectives between the ranks of one job (tensor parallelism, DESIGN.md §3).
 *
 * One interface, three backends:
 *  - thread: N ranks in one process, one thread per rank (pthreads). Buffers are host memory.
 *    Reductions add the ranks' values in rank order 0, 1, …, N−1 for every element, whatever the
 *    thread timing, so a run is deterministic and N ranks reproduce 1 rank up to the rounding of
 *    the partial sums themselves. This is what CI tests the sharded math with.
 *  - tcp: one rank per process or host (comm_tcp.c), the same sums as thread, over sockets: a
 *    CPU gang the server spreads over several workers.
 *  - nccl: one rank per GPU (one process or thread per rank), buffers in device, managed or
 *    (staged) host memory; compiled into the CUDA build only (comm_nccl.c, LN_WITH_NCCL). Ranks
 *    split over workers exchange the 128-byte ncclUniqueId through the server's rendezvous.
 *
 * Contract for every collective: every rank of the group calls it, in the same order, with the
 * same n (element count per rank). The call returns when this rank's result is complete
 * (synchronous). A mismatch in n is an error on every rank, not a hang. If one rank fails
 * outside a collective it calls comm_abort, and the others' pending and later collectives
 * return an error instead of waiting forever.
 *
 * Ownership: each rank owns its ln_comm handle and frees it with comm_free after the last
 * collective; the thread group's shared state is freed with its last handle. */
#ifndef LN_COMM_H
#define LN_COMM_H

#include <stdatomic.h>
#include <stdint.h>

#include "common/err.h"

typedef struct ln_comm ln_comm;

/* The backend's table; a backend fills one (see comm_thread.c, comm_nccl.c). */
typedef struct comm_ops {
    const char *name;
    int (*allreduce_sum)(ln_comm *c, float *buf, int64_t n, ln_err *e);
    int (*allgather)(ln_comm *c, const float *send, float *recv, int64_t n, ln_err *e);
    int (*broadcast)(ln_comm *c, float *buf, int64_t n, int root, ln_err *e);
    int (*barrier)(ln_comm *c, ln_err *e);
    void (*abort)(ln_comm *c);
    void (*free)(ln_comm *c);
} comm_ops;

struct ln_comm {
    const comm_ops *ops;
    int rank, size;
    void *impl;          /* the backend's state */
};

int comm_rank(const ln_comm *c);
int comm_size(const ln_comm *c);
const char *comm_backend_name(const ln_comm *c);

/* buf (n) ← Σ over ranks of buf (n), in place, on every rank. */
int comm_allreduce_sum(ln_comm *c, float *buf, int64_t n, ln_err *e);
/* recv (size · n) ← [send of rank 0 | send of rank 1 | …] on every rank. send may not alias recv. */
int comm_allgather(ln_comm *c, const float *send, float *recv, int64_t n, ln_err *e);
/* buf (n) ← buf of rank root, on every rank. */
int comm_broadcast(ln_comm *c, float *buf, int64_t n, int root, ln_err *e);
int comm_barrier(ln_comm *c, ln_err *e);
/* Marks the group failed: every rank's pending and future collectives fail. */
void comm_abort(ln_comm *c);
void comm_free(ln_comm *c);

/* ---- thread backend ---- */

/* Creates a group of `size` ranks; ranks[i] (an array of size handles the caller provides) is
 * the handle rank i uses from its own thread. */
int comm_thread_group_new(int size, ln_comm **ranks, ln_err *e);

/* Runs fn(rank's comm, ctx_i) on `size` threads, one per rank (ctx_i = ctxs[i]) and joins them;
 * a rank whose fn returns −1 aborts the group. Returns 0 when every rank returned 0, else −1
 * with the lowest failing rank's message in e (ranks' messages come from errs[i]). */
typedef int (*comm_rank_fn)(ln_comm *c, void *ctx, ln_err *e);
int comm_thread_run(int size, comm_rank_fn fn, void **ctxs, ln_err *e);

/* ---- TCP backend (comm_tcp.c): one rank per process or host ----
 *
 * Rank 0 listens (comm_tcp_listen), publishes its address and a secret token (the worker uses the
 * server's rendezvous), and waits for the others (comm_tcp_accept); ranks 1..size−1 connect
 * (comm_tcp_connect). A connection with a wrong token, a wrong group size or a taken rank is
 * refused and the accept goes on waiting. Sums are rank 0 + rank 1 + … for every element (the
 * thread backend's order: bitwise equal results). Host buffers; floats travel in host byte order.
 * A peer that dies makes this rank's next or pending collective fail naming it; there is no
 * timeout on a peer's data (keepalive finds a vanished host in about 90 s). `stop`, when not
 * NULL, is polled while connecting or accepting (about every 100 ms): non-zero gives up. */

#define COMM_TCP_TOKEN_LEN 64
#define COMM_TCP_ADDR_MAX 300

typedef struct comm_tcp_listener comm_tcp_listener;

/* A fresh random token (COMM_TCP_TOKEN_LEN hex characters). */
int comm_tcp_token_new(char token[COMM_TCP_TOKEN_LEN + 1], ln_err *e);
/* Listens on host (NULL/"" = every address) at the first free port of port_lo..port_hi (0..0 =
 * one the kernel picks). comm_tcp_listener_addr gives "host:port" ("[v6]:port") as bound. */
int comm_tcp_listen(const char *host, int port_lo, int port_hi, comm_tcp_listener **out, ln_err *e);
const char *comm_tcp_listener_addr(const comm_tcp_listener *l);
int comm_tcp_listener_port(const comm_tcp_listener *l);
void comm_tcp_listener_free(comm_tcp_listener *l);
/* Rank 0: waits up to timeout_s for ranks 1..size−1 to connect with token, then *out is rank 0's
 * handle. The listener stays the caller's (free it after). */
int comm_tcp_accept(comm_tcp_listener *l, int size, const char *token, double timeout_s, const atomic_int *stop,
                    ln_comm **out, ln_err *e);
/* Rank 1..size−1: connects to rank 0 at addr ("host:port"), retrying a refused connection until
 * timeout_s, and presents token, rank and size. */
int comm_tcp_connect(const char *addr, int rank, int size, const char *token, double timeout_s,
                     const atomic_int *stop, ln_comm **out, ln_err *e);
/* The rank whose connection ended first (a peer lost, not this rank's own abort), or −1; also −1
 * for a handle of another backend. Lets a caller tell "a peer died" from its own failure. */
int comm_tcp_lost_peer(const ln_comm *c);

/* ---- NCCL backend (CUDA build only: comm_nccl.c with LN_WITH_NCCL) ----
 *
 * One rank per GPU. Buffers may be device, managed or host memory: host pointers (malloc, the
 * stack) are staged through a device buffer of the rank, so the engine's host scratch works too.
 * Each collective first waits for the device's earlier work, and returns when complete. comm_abort
 * from any thread ends a pending collective of the rank (ncclCommAbort). A program that must link
 * without NCCL (the CPU build of loranull-worker) reaches these through weak references. */

#define COMM_NCCL_ID_BYTES 128
/* Rank 0 makes the id and shares it with the others (the server's rendezvous, or memory). */
int comm_nccl_unique_id(unsigned char id[COMM_NCCL_ID_BYTES], ln_err *e);
/* Joins the group as `rank` of `size` on CUDA device `device` (cudaSetDevice is called), waiting
 * at most timeout_s (0 = no limit) for the other ranks; `stop` (may be NULL), polled, gives up. */
int comm_nccl_join(int rank, int size, const unsigned char id[COMM_NCCL_ID_BYTES], int device, double timeout_s,
                   const atomic_int *stop, ln_comm **out, ln_err *e);
/* comm_nccl_join with no time limit. */
int comm_nccl_new(int rank, int size, const unsigned char id[COMM_NCCL_ID_BYTES], int device, ln_comm **out,
                  ln_err *e);

#endif
