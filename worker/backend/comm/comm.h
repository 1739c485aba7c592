/* comm.h — collectives between the ranks of one job (tensor parallelism, DESIGN.md §3).
 *
 * One interface, two backends:
 *  - thread: N ranks in one process, one thread per rank (pthreads). Buffers are host memory.
 *    Reductions add the ranks' values in rank order 0, 1, …, N−1 for every element, whatever the
 *    thread timing, so a run is deterministic and N ranks reproduce 1 rank up to the rounding of
 *    the partial sums themselves. This is what CI tests the sharded math with.
 *  - nccl: one rank per GPU (one process or thread per rank), buffers in device (or managed)
 *    memory; compiled into the CUDA build only (comm_nccl.c, LN_WITH_NCCL). Ranks of a multi-node
 *    job exchange the 128-byte ncclUniqueId through the server's rendezvous.
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

/* ---- NCCL backend (CUDA build only: comm_nccl.c with LN_WITH_NCCL) ---- */

#define COMM_NCCL_ID_BYTES 128
/* Rank 0 makes the id and shares it with the others (the server's rendezvous, or memory). */
int comm_nccl_unique_id(unsigned char id[COMM_NCCL_ID_BYTES], ln_err *e);
/* Joins the group as `rank` of `size` on CUDA device `device` (cudaSetDevice is called). */
int comm_nccl_new(int rank, int size, const unsigned char id[COMM_NCCL_ID_BYTES], int device, ln_comm **out,
                  ln_err *e);

#endif
