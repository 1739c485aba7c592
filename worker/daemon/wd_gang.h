/* wd_gang.h — the ranks of a gang spread over workers find each other through the server's
 * rendezvous and join one comm group (worker/backend/comm/comm.h): TCP between CPU workers, NCCL
 * between GPU workers (one GPU, one rank each).
 *
 * CPU workers (key "tcp"):
 *   rank 0:  listen on the advertise host (a port of --comm-ports) ─▶ PUT rendezvous/tcp
 *            {"addr":"host:port","token":"<64 hex>","world_size":N} ─▶ accept ranks 1..N−1
 *   rank k:  GET rendezvous/tcp (long-poll, again while not_ready) ─▶ connect, present token + rank
 * GPU workers (key "nccl_unique_id"; opts.nccl_device ≥ 0):
 *   rank 0:  ncclGetUniqueId ─▶ PUT rendezvous/nccl_unique_id {"id":"<base64 of 128 bytes>",
 *            "world_size":N} ─▶ comm_nccl_join(0, N, id, device)
 *   rank k:  GET rendezvous/nccl_unique_id (long-poll) ─▶ comm_nccl_join(k, N, id, device)
 *   The id names rank 0's NCCL bootstrap address (NCCL_SOCKET_IFNAME picks the interface), not
 *   --advertise-host. The NCCL functions are weak references: a build without them (the CPU build)
 *   fails such a gang with a sentence saying so.
 *
 * The key is scoped to the lease generation by the server, and the token is fresh per attempt,
 * so a rank of an earlier attempt can neither read the address nor join the group. The HTTP
 * calls run on the loop (wd_http); the blocking accept/connect runs in a libuv work item, so
 * the loop keeps heart-beating. Everything is bounded by timeout_s from the start.
 *
 * Contract: wd_gang_start calls cb exactly once, later, from the loop — unless wd_gang_cancel
 * comes first, after which cb is never called and the gang frees itself (a group made in the
 * meantime is freed too). The gang owns itself; ln_comm passed to cb becomes the caller's. */
#ifndef WD_GANG_H
#define WD_GANG_H

#include <uv.h>

#include "worker/backend/comm/comm.h"
#include "worker/daemon/wd_http.h"

#define WD_GANG_KEY "tcp"
#define WD_GANG_KEY_NCCL "nccl_unique_id"

typedef struct wd_gang wd_gang;

typedef struct wd_gang_opts {
    const char *job_id;
    long long gen;             /* lease generation */
    int rank, world;
    const char *host;          /* rank 0: the address the others reach it at (and it listens on) */
    int port_lo, port_hi;      /* rank 0: ports to listen on (0, 0 = any free one) */
    double timeout_s;          /* the whole rendezvous, from wd_gang_start */
    int nccl_device;           /* ≥ 0: a GPU gang, NCCL on this CUDA device; −1: TCP */
} wd_gang_opts;

typedef enum {
    WD_GANG_OK,                /* c is this rank of the group */
    WD_GANG_REFUSED,           /* the server refused the lease (r: its 409/404 response) */
    WD_GANG_FAILED,            /* msg says why (timeout, unreachable peer, listen error): retryable */
    WD_GANG_UNSUPPORTED,       /* msg says why: this build cannot join such a gang (not retryable here) */
} wd_gang_result;

typedef void (*wd_gang_cb)(void *ctx, wd_gang_result res, ln_comm *c, const wd_resp *r, const char *msg);

/* Can this program join a GPU gang (are the NCCL functions linked)? */
int wd_gang_nccl_linked(void);

wd_gang *wd_gang_start(uv_loop_t *loop, wd_http *http, const wd_gang_opts *o, wd_gang_cb cb, void *ctx);
void wd_gang_cancel(wd_gang *g);

#endif
