/* comm_nccl.c — the NCCL backend of comm.h. Compiled into the CUDA build only (the Makefile's
 * cuda section builds this file with -DLN_WITH_NCCL); in the CPU build it is empty.
 * Buffers are device or managed memory. Each collective runs on the rank's own stream and
 * is waited for before returning, so the interface stays synchronous like the thread backend. */
#ifdef LN_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/backend/comm/comm.h"

typedef struct nccl_state {
    ncclComm_t comm;
    cudaStream_t stream;
    int device;
    int *dflag;          /* one int of device memory for the barrier */
} nccl_state;

/* Turns an NCCL or CUDA status into one sentence naming the call, the rank and where. */
#define NCCL_TRY(c, call, e)                                                                          \
    do {                                                                                              \
        ncclResult_t st_ = (call);                                                                    \
        if (st_ != ncclSuccess)                                                                       \
            return ln_errf(e, "NCCL %.*s failed on rank %d of %d: %s (%s:%d)", (int)strcspn(#call, "("), #call, (c)->rank, (c)->size, \
                           ncclGetErrorString(st_), __FILE__, __LINE__);                              \
    } while (0)
#define CUDA_TRY_C(c, call, e)                                                                        \
    do {                                                                                              \
        cudaError_t st_ = (call);                                                                     \
        if (st_ != cudaSuccess)                                                                       \
            return ln_errf(e, "CUDA %.*s failed on rank %d of %d: %s (%s:%d)", (int)strcspn(#call, "("), #call, (c)->rank, (c)->size, \
                           cudaGetErrorString(st_), __FILE__, __LINE__);                              \
    } while (0)

static nccl_state *st(ln_comm *c) { return c->impl; }

static int nccl_allreduce(ln_comm *c, float *buf, int64_t n, ln_err *e)
{
    nccl_state *s = st(c);
    NCCL_TRY(c, ncclAllReduce(buf, buf, (size_t)n, ncclFloat32, ncclSum, s->comm, s->stream), e);
    CUDA_TRY_C(c, cudaStreamSynchronize(s->stream), e);
    return 0;
}

static int nccl_allgather(ln_comm *c, const float *send, float *recv, int64_t n, ln_err *e)
{
    nccl_state *s = st(c);
    NCCL_TRY(c, ncclAllGather(send, recv, (size_t)n, ncclFloat32, s->comm, s->stream), e);
    CUDA_TRY_C(c, cudaStreamSynchronize(s->stream), e);
    return 0;
}

static int nccl_broadcast(ln_comm *c, float *buf, int64_t n, int root, ln_err *e)
{
    nccl_state *s = st(c);
    NCCL_TRY(c, ncclBroadcast(buf, buf, (size_t)n, ncclFloat32, root, s->comm, s->stream), e);
    CUDA_TRY_C(c, cudaStreamSynchronize(s->stream), e);
    return 0;
}

static int nccl_barrier(ln_comm *c, ln_err *e)
{
    nccl_state *s = st(c);
    NCCL_TRY(c, ncclAllReduce(s->dflag, s->dflag, 1, ncclInt32, ncclSum, s->comm, s->stream), e);
    CUDA_TRY_C(c, cudaStreamSynchronize(s->stream), e);
    return 0;
}

static void nccl_abort(ln_comm *c) { ncclCommAbort(st(c)->comm); st(c)->comm = NULL; }

static void nccl_free(ln_comm *c)
{
    nccl_state *s = st(c);
    if (s->comm) ncclCommDestroy(s->comm);
    cudaFree(s->dflag);
    cudaStreamDestroy(s->stream);
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
    if (r != ncclSuccess) return ln_errf(e, "NCCL ncclGetUniqueId failed: %s (%s:%d)", ncclGetErrorString(r), __FILE__, __LINE__);
    _Static_assert(sizeof u == COMM_NCCL_ID_BYTES, "ncclUniqueId is 128 bytes");
    memcpy(id, &u, sizeof u);
    return 0;
}

int comm_nccl_new(int rank, int size, const unsigned char id[COMM_NCCL_ID_BYTES], int device, ln_comm **out,
                  ln_err *e)
{
    *out = NULL;
    if (size < 1 || rank < 0 || rank >= size)
        return ln_errf(e, "NCCL comm: rank %d is not in a group of %d", rank, size);
    ln_comm *c = ln_xcalloc(1, sizeof *c);
    nccl_state *s = ln_xcalloc(1, sizeof *s);
    *c = (ln_comm){.ops = &NCCL_OPS, .rank = rank, .size = size, .impl = s};
    s->device = device;
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    cudaError_t ce = cudaSetDevice(device);
    if (ce == cudaSuccess) ce = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking);
    if (ce == cudaSuccess) ce = cudaMalloc((void **)&s->dflag, sizeof(int));
    if (ce != cudaSuccess) {
        free(s);
        free(c);
        return ln_errf(e, "NCCL comm: rank %d could not set up CUDA device %d: %s", rank, device, cudaGetErrorString(ce));
    }
    ncclResult_t r = ncclCommInitRank(&s->comm, size, u, rank);
    if (r != ncclSuccess) {
        cudaFree(s->dflag);
        cudaStreamDestroy(s->stream);
        free(s);
        free(c);
        return ln_errf(e, "NCCL ncclCommInitRank failed for rank %d of %d on device %d: %s", rank, size, device,
                       ncclGetErrorString(r));
    }
    *out = c;
    return 0;
}
#else
/* CPU build: no NCCL. (A translation unit must declare something.) */
typedef int comm_nccl_not_built;
#endif
