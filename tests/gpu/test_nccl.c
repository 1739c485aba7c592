/* The NCCL comm backend (comm_nccl.c, CUDA build) on the GPUs of this machine: one rank per
 * device, one thread per rank, each rank's buffer filled with rank-dependent values; allreduce,
 * allgather, broadcast and barrier checked against the sums/copies computed on the host. With one
 * GPU it runs one rank (every call path still runs). A separate binary, so that a machine without
 * libnccl fails only this test. */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>

#include "tests/gpu/gpu_check.h"
#include "worker/backend/comm/comm.h"

#define N 1000
static unsigned char uid[COMM_NCCL_ID_BYTES];
static int ndev;

typedef struct { int rank, ok; char msg[LN_ERR_MSG_MAX]; } rank_res;

static void *rank_main(void *p)
{
    rank_res *r = p;
    ln_err e = {{0}};
    ln_comm *c = NULL;
    r->ok = 0;
    if (comm_nccl_new(r->rank, ndev, uid, r->rank, &c, &e)) {
        snprintf(r->msg, sizeof r->msg, "%s", e.msg);
        return NULL;
    }
    /* device buffers on this rank's GPU (the table's allocator serves device 0 only) */
    float *d = NULL, *g = NULL, h[N], o[N * 8];
    if (cudaMalloc((void **)&d, N * sizeof(float)) != cudaSuccess ||
        cudaMalloc((void **)&g, (size_t)N * ndev * sizeof(float)) != cudaSuccess) {
        snprintf(r->msg, sizeof r->msg, "cudaMalloc on device %d failed", r->rank);
        comm_free(c);
        return NULL;
    }
    for (int i = 0; i < N; i++) h[i] = (float)(r->rank + 1) * (float)i;
    cudaMemcpy(d, h, sizeof h, cudaMemcpyHostToDevice);
    int ok = comm_allgather(c, d, g, N, &e) == 0;
    if (ok) {
        cudaMemcpy(o, g, (size_t)N * ndev * sizeof(float), cudaMemcpyDeviceToHost);
        for (int k = 0; k < ndev && ok; k++)
            for (int i = 0; i < N; i++) ok &= o[k * N + i] == (float)(k + 1) * (float)i;
    }
    ok = ok && comm_allreduce_sum(c, d, N, &e) == 0;
    if (ok) {
        cudaMemcpy(o, d, sizeof h, cudaMemcpyDeviceToHost);
        float tot = (float)(ndev * (ndev + 1) / 2);
        for (int i = 0; i < N; i++) ok &= o[i] == tot * (float)i;
    }
    if (ok) {
        for (int i = 0; i < N; i++) h[i] = r->rank == 0 ? -1.0f * i : 5.0f;
        cudaMemcpy(d, h, sizeof h, cudaMemcpyHostToDevice);
        ok = comm_broadcast(c, d, N, 0, &e) == 0 && comm_barrier(c, &e) == 0;
        cudaMemcpy(o, d, sizeof h, cudaMemcpyDeviceToHost);
        for (int i = 0; i < N && ok; i++) ok &= o[i] == -1.0f * i;
    }
    if (!ok) snprintf(r->msg, sizeof r->msg, "rank %d: wrong result or error: %.900s", r->rank, e.msg);
    r->ok = ok;
    cudaFree(d);
    cudaFree(g);
    comm_free(c);
    return NULL;
}

int main(void)
{
    gpu_require("test_nccl", LNB_CUDA_MATH_FP32);
    ndev = lnb_cuda_device_count();
    if (ndev > 8) ndev = 8;
    ln_err e = {{0}};
    if (comm_nccl_unique_id(uid, &e)) {
        printf("FAIL %s\n", e.msg);
        return 1;
    }
    pthread_t th[8];
    rank_res res[8];
    for (int r = 0; r < ndev; r++) {
        res[r] = (rank_res){.rank = r};
        pthread_create(&th[r], NULL, rank_main, &res[r]);
    }
    for (int r = 0; r < ndev; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < ndev; r++) {
        char name[96];
        snprintf(name, sizeof name, "NCCL %d rank(s): allgather, allreduce, broadcast, barrier (rank %d)", ndev, r);
        check_true(name, res[r].ok);
        if (!res[r].ok) printf("#   %s\n", res[r].msg);
    }
    return gpu_done();
}
