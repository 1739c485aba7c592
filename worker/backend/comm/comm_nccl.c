/* comm_nccl.c — the NCCL backend of comm.h. Compiled into the CUDA build only (the Makefile's
 * cuda section builds this file with -DLN_WITH_NCCL); in the CPU build it is empty.
 *
 * Buffers: device or managed memory goes to NCCL as it is; any other pointer (malloc, the stack,
 * pinned host memory) is staged through a device buffer of this rank (cudaPointerGetAttributes
 * tells them apart), so the engine may pass its host scratch too. LORANULL_NCCL_STAGE_MANAGED=1
 * stages managed buffers as well (a fallback, should a platform's NCCL mishandle them). Each collective runs on the
 * rank's own stream after the device's earlier work (the backend's stream may still be writing
 * a managed tensor), and is waited for before returning: the interface stays synchronous.
 *
 * The communicator is non-blocking (ncclConfig_t.blocking = 0): joining and every wait poll
 * ncclCommGetAsyncError and the stream, so a join is bounded (timeout_s, stop) and a collective
 * whose peer never comes can be ended by comm_abort from another thread (the waiting thread sees
 * the flag within a millisecond and calls ncclCommAbort itself; an idle comm is aborted at once).
 * Every failure is one sentence naming the NCCL or CUDA call, the rank and the reason
 * (ncclGetErrorString, and ncclCommGetAsyncError's status when the call itself succeeded), with
 * NCCL's own last message (ncclGetLastError) when it has one.
 *
 * Unlike the thread and tcp backends, ranks that disagree on a count are NOT detected: NCCL trusts
 * them, so such a collective hangs (until comm_abort) or mixes data. Only the engine's lockstep
 * keeps them equal. */
#ifdef LN_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/util.h"
#include "worker/backend/comm/comm.h"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 14, 0)
#error "comm_nccl.c needs NCCL 2.14 or newer (non-blocking communicators)"
#endif

/* A staging buffer above this many floats (64 MiB) is freed after its collective: a large host
 * gather (tensor_parallel.c's whole-tensor gathers) must not keep that much device memory. */
#define STAGE_KEEP_FLOATS ((size_t)16 << 20)

typedef struct nccl_state {
    ncclComm_t comm;         /* NULL once aborted or freed */
    cudaStream_t stream;
    int device;
    int *dflag;              /* one int of device memory for the barrier */
    float *stage;            /* device buffer for host pointers, grown on demand */
    size_t stage_n;          /* its size in floats */
    pthread_mutex_t mu;      /* guards comm against an abort from another thread */
    int busy;                /* a collective is in flight on the owner's thread */
    atomic_int aborted;
    int failed;              /* an NCCL error left the comm unusable: free aborts it */
    int stage_managed;       /* LORANULL_NCCL_STAGE_MANAGED=1: managed buffers staged like host ones */
} nccl_state;

static nccl_state *st(ln_comm *c) { return c->impl; }
static void leave(ln_comm *c);

static void nap_ms(long ms)
{
    struct timespec t = {0, ms * 1000000L};
    nanosleep(&t, NULL);
}

/* Aborts the NCCL comm (once). Caller holds mu, or owns the comm alone. The calling thread's
 * current device is left as it was (comm_abort may come from any thread). */
static void abort_locked(nccl_state *s)
{
    if (!s->comm) return;
    int old = -1;
    cudaGetDevice(&old);
    cudaSetDevice(s->device);
    ncclCommAbort(s->comm);
    s->comm = NULL;
    if (old >= 0 && old != s->device) cudaSetDevice(old);
}

/* NCCL's own message for the last failure (its WARN line: which transport, which peer), or "". */
static const char *nccl_detail(void)
{
    const char *d = ncclGetLastError(NULL);
    return d ? d : "";
}

static int nccl_fail(ln_comm *c, ln_err *e, const char *call, ncclResult_t r)
{
    nccl_state *s = st(c);
    s->failed = 1;
    const char *d = nccl_detail();
    return ln_errf(e, "NCCL %s failed on rank %d of %d (device %d): %s%s%s%s", call, c->rank, c->size, s->device,
                   ncclGetErrorString(r),
                   r == ncclRemoteError || r == ncclSystemError ? " (a peer rank may have failed or been stopped)" : "",
                   *d ? "; NCCL says: " : "", d);
}

static int cuda_fail(ln_comm *c, ln_err *e, const char *call, cudaError_t ce)
{
    st(c)->failed = 1;
    return ln_errf(e, "CUDA %s failed on rank %d of %d (device %d): %s", call, c->rank, c->size, st(c)->device,
                   cudaGetErrorString(ce));
}

/* Enters a collective: the comm is neither aborted nor failed, and stays ours until leave(). */
static int enter(ln_comm *c, ln_err *e)
{
    nccl_state *s = st(c);
    pthread_mutex_lock(&s->mu);
    int dead = atomic_load(&s->aborted) || !s->comm || s->failed;
    if (!dead) s->busy = 1;
    pthread_mutex_unlock(&s->mu);
    if (dead && s->failed)
        return ln_errf(e, "NCCL comm: rank %d of %d: an earlier collective failed, so the group is unusable", c->rank,
                       c->size);
    if (dead) return ln_errf(e, "NCCL comm: rank %d of %d: the group was aborted", c->rank, c->size);
    cudaError_t ce = cudaSetDevice(s->device);
    /* The device's earlier work (the backend's stream may still write a managed buffer). */
    if (ce == cudaSuccess) ce = cudaDeviceSynchronize();
    if (ce != cudaSuccess) {
        leave(c);
        return cuda_fail(c, e, "cudaSetDevice + cudaDeviceSynchronize before a collective", ce);
    }
    return 0;
}

static void leave(ln_comm *c)
{
    nccl_state *s = st(c);
    pthread_mutex_lock(&s->mu);
    s->busy = 0;
    if (atomic_load(&s->aborted) || s->failed) abort_locked(s); /* a peer must not wait for a dead rank */
    pthread_mutex_unlock(&s->mu);
    if (s->stage_n > STAGE_KEEP_FLOATS) {
        /* After the abort above, if any: cudaFree waits for the device, and a hung collective
         * would never end. */
        cudaFree(s->stage);
        s->stage = NULL;
        s->stage_n = 0;
    }
}

/* Waits for what this rank enqueued: polls the comm's asynchronous error, the stream and the abort
 * flag (the NCCL pattern for a non-blocking comm; a lost peer is reported, not waited for). */
static int wait_done(ln_comm *c, const char *what, ln_err *e)
{
    nccl_state *s = st(c);
    for (long spins = 0;; spins++) {
        if (atomic_load(&s->aborted))
            return ln_errf(e, "NCCL %s on rank %d of %d: the group was aborted while this rank waited", what, c->rank,
                           c->size);
        ncclResult_t ar = ncclSuccess;
        ncclResult_t qr = ncclCommGetAsyncError(s->comm, &ar);
        if (qr != ncclSuccess) return nccl_fail(c, e, "ncclCommGetAsyncError", qr);
        if (ar != ncclSuccess && ar != ncclInProgress) {
            char call[96];
            snprintf(call, sizeof call, "%s (asynchronous error)", what);
            return nccl_fail(c, e, call, ar);
        }
        if (ar == ncclSuccess) {
            cudaError_t ce = cudaStreamQuery(s->stream);
            if (ce == cudaSuccess) return 0;
            if (ce != cudaErrorNotReady) return cuda_fail(c, e, "cudaStreamQuery after a collective", ce);
        }
        if (spins > 2000) nap_ms(1); /* spin briefly, then sleep: a short collective stays fast */
    }
}

/* Launch status of a non-blocking NCCL call: ncclInProgress is fine (wait_done polls). */
static int launched(ln_comm *c, const char *call, ncclResult_t r, ln_err *e)
{
    if (r == ncclSuccess || r == ncclInProgress) return 0;
    return nccl_fail(c, e, call, r);
}

/* Device memory NCCL may use as it is (device memory of this rank's GPU, or managed memory)? */
static int on_device(const nccl_state *s, const void *p)
{
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky-free error a plain host pointer may leave */
        return 0;
    }
    if (a.type == cudaMemoryTypeManaged) return !s->stage_managed;
    return a.type == cudaMemoryTypeDevice && a.device == s->device;
}

/* A device buffer of at least n floats for staging host memory (fallible: it scales with n). */
static int stage_buf(ln_comm *c, size_t n, ln_err *e)
{
    nccl_state *s = st(c);
    if (n <= s->stage_n) return 0;
    cudaFree(s->stage);
    s->stage = NULL;
    s->stage_n = 0;
    cudaError_t ce = cudaMalloc((void **)&s->stage, n * sizeof(float));
    if (ce != cudaSuccess) {
        cudaGetLastError();
        s->stage = NULL;
        s->failed = 1; /* the others have launched theirs: the group is aborted (leave) */
        return ln_errf(e, "NCCL comm: rank %d of %d could not allocate %.1f MiB on device %d to stage a host buffer "
                          "for a collective: %s", c->rank, c->size, (double)n * sizeof(float) / (1 << 20), s->device,
                       cudaGetErrorString(ce));
    }
    s->stage_n = n;
    return 0;
}

/* A staging copy on the rank's stream. cudaMemcpyDefault (unified addressing) lets the driver read
 * the direction from the pointers: a "host" buffer here may also be pinned memory or memory of
 * another GPU, for which a fixed HostToDevice kind would be wrong. */
static int copy(ln_comm *c, void *dst, const void *src, size_t bytes, const char *what, ln_err *e)
{
    cudaError_t ce = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, st(c)->stream);
    return ce == cudaSuccess ? 0 : cuda_fail(c, e, what, ce);
}

/* In-place collectives (allreduce, broadcast) on buf: staged when buf is host memory. */
static int inplace(ln_comm *c, float *buf, int64_t n, int root, ln_err *e)
{
    nccl_state *s = st(c);
    const char *what = root < 0 ? "ncclAllReduce" : "ncclBroadcast";
    if (n < 0) return ln_errf(e, "NCCL %s on rank %d: negative count %lld", what, c->rank, (long long)n);
    if (enter(c, e)) return -1;
    if (n == 0) { /* every rank has nothing: no NCCL call (a NULL buffer is allowed) */
        leave(c);
        return 0;
    }
    int host = !on_device(s, buf);
    float *d = buf;
    int rc = 0;
    if (host) {
        rc = stage_buf(c, (size_t)n, e);
        if (rc == 0) rc = copy(c, s->stage, buf, (size_t)n * sizeof(float), "cudaMemcpyAsync (staging in)", e);
        d = s->stage;
    }
    if (rc == 0)
        rc = launched(c, what,
                      root < 0 ? ncclAllReduce(d, d, (size_t)n, ncclFloat32, ncclSum, s->comm, s->stream)
                               : ncclBroadcast(d, d, (size_t)n, ncclFloat32, root, s->comm, s->stream), e);
    /* Waited for before the copy out: a copy into pageable memory would block until the collective
     * ends, where no abort is seen. */
    if (rc == 0) rc = wait_done(c, what, e);
    if (rc == 0 && host) rc = copy(c, buf, d, (size_t)n * sizeof(float), "cudaMemcpyAsync (staging out)", e);
    if (rc == 0 && host) rc = wait_done(c, "the copy out of a staged collective", e);
    leave(c);
    return rc;
}

static int nccl_allreduce(ln_comm *c, float *buf, int64_t n, ln_err *e) { return inplace(c, buf, n, -1, e); }

static int nccl_broadcast(ln_comm *c, float *buf, int64_t n, int root, ln_err *e)
{
    if (root < 0 || root >= c->size)
        return ln_errf(e, "NCCL broadcast on rank %d: root %d is not in the group of %d", c->rank, root, c->size);
    return inplace(c, buf, n, root, e);
}

static int nccl_allgather(ln_comm *c, const float *send, float *recv, int64_t n, ln_err *e)
{
    nccl_state *s = st(c);
    if (n < 0) return ln_errf(e, "NCCL ncclAllGather on rank %d: negative count %lld", c->rank, (long long)n);
    if (enter(c, e)) return -1;
    if (n == 0) {
        leave(c);
        return 0;
    }
    size_t total = (size_t)n * (size_t)c->size;
    int hs = !on_device(s, send), hr = !on_device(s, recv);
    const float *ds = send;
    float *dr = recv;
    int rc = hs || hr ? stage_buf(c, (hr ? total : 0) + (hs ? (size_t)n : 0), e) : 0;
    if (rc == 0 && hr) dr = s->stage;
    if (rc == 0 && hs) {
        float *t = s->stage + (hr ? total : 0);
        rc = copy(c, t, send, (size_t)n * sizeof(float), "cudaMemcpyAsync (staging in)", e);
        ds = t;
    }
    if (rc == 0) rc = launched(c, "ncclAllGather", ncclAllGather(ds, dr, (size_t)n, ncclFloat32, s->comm, s->stream), e);
    if (rc == 0) rc = wait_done(c, "ncclAllGather", e);
    if (rc == 0 && hr) rc = copy(c, recv, dr, total * sizeof(float), "cudaMemcpyAsync (staging out)", e);
    if (rc == 0 && hr) rc = wait_done(c, "the copy out of a staged collective", e);
    leave(c);
    return rc;
}

static int nccl_barrier(ln_comm *c, ln_err *e)
{
    nccl_state *s = st(c);
    if (enter(c, e)) return -1;
    int rc = launched(c, "ncclAllReduce (barrier)",
                      ncclAllReduce(s->dflag, s->dflag, 1, ncclInt32, ncclSum, s->comm, s->stream), e);
    if (rc == 0) rc = wait_done(c, "ncclAllReduce (barrier)", e);
    leave(c);
    return rc;
}

/* From any thread: marks the group failed; an idle comm is aborted now (its peers' transports see
 * it go), a busy one by its own thread within a millisecond (wait_done, then leave). */
static void nccl_abort(ln_comm *c)
{
    nccl_state *s = st(c);
    atomic_store(&s->aborted, 1);
    pthread_mutex_lock(&s->mu);
    if (!s->busy) abort_locked(s);
    pthread_mutex_unlock(&s->mu);
}

/* Seconds comm_free waits for a healthy comm to finalize before it aborts it instead. Finalizing
 * ends in a barrier of the ranks on this host (NCCL's commDestroySync): it completes when they
 * free theirs too, so comm_free may block that long — ranks held by one process are freed from
 * their own threads at once, or aborted first (an aborted comm is freed without waiting). */
#define FINALIZE_WAIT_S 10.0

/* ncclCommFinalize on the non-blocking comm, polled until it is globally quiescent: 0, or −1 when
 * it failed or took longer than FINALIZE_WAIT_S (a peer that is gone or still busy). */
static int finalize_bounded(nccl_state *s)
{
    ncclResult_t r = ncclCommFinalize(s->comm);
    double deadline = ln_now_s() + FINALIZE_WAIT_S;
    for (long spins = 0; r == ncclInProgress; spins++) {
        if (ln_now_s() > deadline) return -1;
        nap_ms(spins < 100 ? 1 : 10);
        if (ncclCommGetAsyncError(s->comm, &r) != ncclSuccess) return -1;
    }
    return r == ncclSuccess ? 0 : -1;
}

static void nccl_free(ln_comm *c)
{
    nccl_state *s = st(c);
    int old = -1;
    cudaGetDevice(&old);
    cudaSetDevice(s->device);
    if (s->comm) {
        /* A healthy comm is finalized (its last operations flushed: a peer may still be receiving
         * this rank's last bytes), then destroyed, which is local once finalized. A failed one, or
         * one whose peers do not quiesce in time, is aborted: freeing never waits long on a peer
         * that is gone. Destroy and abort run to completion even on a non-blocking comm. */
        if (s->failed || atomic_load(&s->aborted) || finalize_bounded(s) != 0) ncclCommAbort(s->comm);
        else if (ncclCommDestroy(s->comm) != ncclSuccess) ncclCommAbort(s->comm);
        s->comm = NULL;
    }
    cudaFree(s->stage);
    cudaFree(s->dflag);
    cudaStreamDestroy(s->stream);
    if (old >= 0 && old != s->device) cudaSetDevice(old);
    pthread_mutex_destroy(&s->mu);
    free(s);
    free(c);
}

static const comm_ops NCCL_OPS = {
    .name = "nccl",
    .allreduce_sum = nccl_allreduce, .allgather = nccl_allgather, .broadcast = nccl_broadcast,
    .barrier = nccl_barrier, .abort = nccl_abort, .free = nccl_free,
};

int comm_nccl_unique_id(unsigned char id[COMM_NCCL_ID_BYTES], ln_err *e)
{
    ncclUniqueId u;
    ncclResult_t r = ncclGetUniqueId(&u);
    if (r != ncclSuccess)
        return ln_errf(e, "NCCL ncclGetUniqueId failed: %s (rank 0 makes the id from its network interfaces: "
                          "NCCL_SOCKET_IFNAME picks one)%s%s", ncclGetErrorString(r),
                       *nccl_detail() ? "; NCCL says: " : "", nccl_detail());
    _Static_assert(sizeof u == COMM_NCCL_ID_BYTES, "ncclUniqueId is 128 bytes");
    memcpy(id, &u, sizeof u);
    return 0;
}

int comm_nccl_join(int rank, int size, const unsigned char id[COMM_NCCL_ID_BYTES], int device, double timeout_s,
                   const atomic_int *stop, ln_comm **out, ln_err *e)
{
    *out = NULL;
    if (size < 1 || rank < 0 || rank >= size)
        return ln_errf(e, "NCCL comm: rank %d is not in a group of %d", rank, size);
    if (device < 0) return ln_errf(e, "NCCL comm: rank %d: device %d is not a GPU index", rank, device);
    /* The library loaded may not be the one built against (a GPU machine's own, e.g. a CUDA wheel's). */
    int v = 0;
    if (ncclGetVersion(&v) != ncclSuccess || v < NCCL_VERSION(2, 14, 0))
        return ln_errf(e, "NCCL comm: rank %d: the NCCL library loaded is version %d.%d.%d, older than 2.14 (needed "
                          "for non-blocking communicators): put a newer libnccl.so.2 first on LD_LIBRARY_PATH", rank,
                       v / 10000, v / 100 % 100, v % 100);
    ln_comm *c = calloc(1, sizeof *c);
    nccl_state *s = calloc(1, sizeof *s);
    if (!c || !s) {
        free(c);
        free(s);
        return ln_errf(e, "NCCL comm: rank %d: out of host memory for its handle", rank);
    }
    *c = (ln_comm){.ops = &NCCL_OPS, .rank = rank, .size = size, .impl = s};
    s->device = device;
    const char *sm = getenv("LORANULL_NCCL_STAGE_MANAGED");
    s->stage_managed = sm && strcmp(sm, "1") == 0;
    pthread_mutex_init(&s->mu, NULL);
    atomic_init(&s->aborted, 0);
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    cudaError_t ce = cudaSetDevice(device);
    if (ce == cudaSuccess) ce = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking);
    if (ce == cudaSuccess) ce = cudaMalloc((void **)&s->dflag, sizeof(int));
    if (ce == cudaSuccess) ce = cudaMemset(s->dflag, 0, sizeof(int));
    if (ce != cudaSuccess) {
        cudaGetLastError();
        ln_errf(e, "NCCL comm: rank %d could not set up CUDA device %d: %s", rank, device, cudaGetErrorString(ce));
        goto fail;
    }
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclResult_t r = ncclCommInitRankConfig(&s->comm, size, u, rank, &cfg);
    double deadline = timeout_s > 0 ? ln_now_s() + timeout_s : 0;
    for (long spins = 0; r == ncclInProgress; spins++) {
        if (stop && atomic_load(stop)) {
            ln_errf(e, "NCCL comm: rank %d of %d stopped waiting for the group (cancelled)", rank, size);
            goto fail;
        }
        if (deadline && ln_now_s() > deadline) {
            ln_errf(e, "NCCL ncclCommInitRank: rank %d of %d on device %d: the other ranks did not join within %.0f s "
                       "(rank 0's id names its bootstrap address: it must be reachable, see NCCL_SOCKET_IFNAME)",
                    rank, size, device, timeout_s);
            goto fail;
        }
        ncclResult_t q = ncclCommGetAsyncError(s->comm, &r);
        if (q != ncclSuccess) r = q;
        if (r == ncclInProgress) nap_ms(spins < 100 ? 1 : 10);
    }
    if (r != ncclSuccess) {
        const char *d = nccl_detail();
        ln_errf(e, "NCCL ncclCommInitRank failed for rank %d of %d on device %d: %s%s%s", rank, size, device,
                ncclGetErrorString(r), *d ? "; NCCL says: " : "", d);
        goto fail;
    }
    *out = c;
    return 0;
fail:
    if (s->comm) ncclCommAbort(s->comm);
    cudaFree(s->dflag);
    if (s->stream) cudaStreamDestroy(s->stream);
    pthread_mutex_destroy(&s->mu);
    free(s);
    free(c);
    return -1;
}

int comm_nccl_new(int rank, int size, const unsigned char id[COMM_NCCL_ID_BYTES], int device, ln_comm **out,
                  ln_err *e)
{
    return comm_nccl_join(rank, size, id, device, 0, NULL, out, e);
}
#else
/* CPU build: no NCCL. (A translation unit must declare something.) */
typedef int comm_nccl_not_built;
#endif
