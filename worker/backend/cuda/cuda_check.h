/* cuda_check.h — one macro per library that turns a failed status into a sentence naming the
 * call, the file and the line (private to worker/backend/cuda). Each returns −1 from the
 * enclosing function with e filled. */
#ifndef LN_CUDA_CHECK_H
#define LN_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

extern "C" {
#include "common/err.h"
}

#include <string.h>

const char *lnb_cublas_status_name(cublasStatus_t s);
/* The function name of a stringified call ("cudaMalloc(&p, n)" → "cudaMalloc"): as %.*s args. */
#define CALL_NAME(s) (int)strcspn(s, "("), s
const char *lnb_cusolver_status_name(cusolverStatus_t s);

#define CUDA_TRY(call, e)                                                                                   \
    do {                                                                                                    \
        cudaError_t st_ = (call);                                                                           \
        if (st_ != cudaSuccess)                                                                             \
            return ln_errf(e, "CUDA %.*s failed: %s (%s) at %s:%d", CALL_NAME(#call), cudaGetErrorString(st_),            \
                           cudaGetErrorName(st_), __FILE__, __LINE__);                                      \
    } while (0)

#define CUBLAS_TRY(call, e)                                                                                 \
    do {                                                                                                    \
        cublasStatus_t st_ = (call);                                                                        \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                                                   \
            return ln_errf(e, "cuBLAS %.*s failed: %s at %s:%d", CALL_NAME(#call), lnb_cublas_status_name(st_), __FILE__, \
                           __LINE__);                                                                       \
    } while (0)

#define CUSOLVER_TRY(call, e)                                                                               \
    do {                                                                                                    \
        cusolverStatus_t st_ = (call);                                                                      \
        if (st_ != CUSOLVER_STATUS_SUCCESS)                                                                 \
            return ln_errf(e, "cuSOLVER %.*s failed: %s at %s:%d", CALL_NAME(#call), lnb_cusolver_status_name(st_),       \
                           __FILE__, __LINE__);                                                             \
    } while (0)

/* Inside kernels-can't-fail backend calls: the first failure is kept for lnb_cuda_check(). */
void lnb_cuda_note_error(const char *what, const char *detail, const char *file, int line);
#define CUDA_NOTE(call)                                                                                     \
    do {                                                                                                    \
        cudaError_t st_ = (call);                                                                           \
        if (st_ != cudaSuccess) lnb_cuda_note_error(#call, cudaGetErrorString(st_), __FILE__, __LINE__);     \
    } while (0)
#define CUBLAS_NOTE(call)                                                                                   \
    do {                                                                                                    \
        cublasStatus_t st_ = (call);                                                                        \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                                                   \
            lnb_cuda_note_error(#call, lnb_cublas_status_name(st_), __FILE__, __LINE__);                   \
    } while (0)
/* After a kernel launch: a bad configuration shows up here. */
#define LAUNCH_NOTE(name)                                                                                   \
    do {                                                                                                    \
        cudaError_t st_ = cudaGetLastError();                                                               \
        if (st_ != cudaSuccess) lnb_cuda_note_error("the launch of kernel " name, cudaGetErrorString(st_), __FILE__, __LINE__); \
    } while (0)

/* The process-wide context (kernels.cu owns it). */
struct lnb_cuda_ctx {
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    cusolverDnHandle_t solver;
    int math;
    int sm;                /* compute capability, major·10 + minor (80 = A100, 90 = H100/H200) */
    size_t smem_optin;     /* shared memory a block may opt in to (bytes) */
    int sync;              /* wait after each call (see cuda.h) */
    char name[400];
};
extern struct lnb_cuda_ctx lnb_cuda_g;

/* A grow-only device scratch buffer per slot (staging of host tables, reductions). NULL and a
 * noted error on failure. */
enum { WS_IDS, WS_TARGETS, WS_COS, WS_SIN, WS_REDUCE, WS_ATT_S, WS_ATT_DP, WS_SOLVER, WS_BF16_A, WS_BF16_B, WS_COV_X, WS_COV_FLAGS,
       WS_ATT_D, WS_NSLOTS };
void *lnb_cuda_workspace(int slot, size_t bytes);
/* p itself when the device can read it (device or managed memory), else a device copy of its
 * first `bytes` bytes in workspace `slot`. */
const void *lnb_cuda_device_view(const void *p, size_t bytes, int slot);
/* The compute type GEMMs use under the current math mode. */
cublasComputeType_t lnb_cuda_compute_type(void);
/* Makes the backend's device current on the calling thread (the CUDA runtime keeps the current
 * device per thread; the engine may call in from OpenMP or job threads). */
void lnb_cuda_bind_thread(void);
/* Waits for the stream when the context asks for synchronous calls. */
void lnb_cuda_after_call(void);

#endif
