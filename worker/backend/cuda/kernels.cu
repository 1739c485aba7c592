/* kernels.cu — the CUDA backend's table (see cuda.h): context and device selection, memory,
 * cuBLAS GEMMs, and one kernel per layer pass (forward and backward side by side, as cpu.c).
 * Attention lives in attention.cu, cuSOLVER in solver.cu. Shapes as backend.h. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/backend/cuda/cuda_check.h"

extern "C" {
#include "worker/backend/cuda/cuda.h"
}

/* Attention entry points (attention.cu). */
void lnb_cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
                                int nh, int nkv, int hd);
void lnb_cuda_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout, const float *lse,
                                 const float *q, const float *k, const float *v, int B, int T, int nh, int nkv, int hd);

struct lnb_cuda_ctx lnb_cuda_g = {-1, 0, 0, 0, 0, 0, 0, 0, ""};
static int g_open = 0;

/* ================================================================ errors */

static char g_err[LN_ERR_MSG_MAX];
static int g_err_set = 0;

void lnb_cuda_note_error(const char *what, const char *detail, const char *file, int line)
{
    if (g_err_set) return;
    g_err_set = 1;
    snprintf(g_err, sizeof g_err, "CUDA backend: %.*s failed: %s at %s:%d", CALL_NAME(what), detail, file, line);
    fprintf(stderr, "%s\n", g_err);
}

extern "C" int lnb_cuda_check(ln_err *e)
{
    if (!g_err_set) return 0;
    g_err_set = 0;
    return ln_errf(e, "%s", g_err);
}

const char *lnb_cublas_status_name(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED (no usable GPU or driver)";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED (out of device memory)";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE (a size or leading dimension is wrong)";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH (the GPU lacks a needed feature)";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED (a kernel failed to run)";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED (this type/compute combination)";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
    }
}

const char *lnb_cusolver_status_name(cusolverStatus_t s)
{
    switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED (no usable GPU or driver)";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED (out of device memory)";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE (a size or parameter is wrong)";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "unknown cuSOLVER status";
    }
}

/* ================================================================ context */

extern "C" int lnb_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "no driver" status */
        return 0;
    }
    return n;
}

extern "C" const char *lnb_cuda_device_name(void) { return lnb_cuda_g.name; }
extern "C" int lnb_cuda_device(void) { return g_open ? lnb_cuda_g.device : -1; }

/* The stream and the cuBLAS/cuSOLVER handles on it (what lnb_cuda_open undoes when one fails). */
static int open_handles(ln_err *e)
{
    CUDA_TRY(cudaStreamCreateWithFlags(&lnb_cuda_g.stream, cudaStreamNonBlocking), e);
    CUBLAS_TRY(cublasCreate(&lnb_cuda_g.blas), e);
    CUBLAS_TRY(cublasSetStream(lnb_cuda_g.blas, lnb_cuda_g.stream), e);
    CUSOLVER_TRY(cusolverDnCreate(&lnb_cuda_g.solver), e);
    CUSOLVER_TRY(cusolverDnSetStream(lnb_cuda_g.solver, lnb_cuda_g.stream), e);
    return 0;
}

extern "C" int lnb_cuda_open(const lnb_cuda_opts *o, ln_err *e)
{
    if (g_open) return 0;
    int n = 0;
    cudaError_t st = cudaGetDeviceCount(&n);
    if (st != cudaSuccess || n == 0)
        return ln_errf(e, "CUDA backend: no usable GPU (cudaGetDeviceCount: %s)",
                       st != cudaSuccess ? cudaGetErrorString(st) : "0 devices");
    int dev = o ? o->device : -1;
    if (dev >= n) return ln_errf(e, "CUDA backend: device %d requested but only %d GPU(s) are present", dev, n);
    if (dev < 0) {
        /* The device with the most free memory (a shared node may have busy ones). */
        size_t best = 0;
        dev = 0;
        for (int i = 0; i < n; i++) {
            size_t fr = 0, tot = 0;
            if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&fr, &tot) == cudaSuccess && fr > best) {
                best = fr;
                dev = i;
            }
        }
    }
    CUDA_TRY(cudaSetDevice(dev), e);
    cudaDeviceProp p;
    CUDA_TRY(cudaGetDeviceProperties(&p, dev), e);
    if (!p.managedMemory)
        return ln_errf(e, "CUDA backend: device %d (%s) does not support managed memory, which this backend needs", dev,
                       p.name);
    lnb_cuda_g.device = dev;
    lnb_cuda_g.sm = p.major * 10 + p.minor;
    lnb_cuda_g.smem_optin = p.sharedMemPerBlockOptin;
    snprintf(lnb_cuda_g.name, sizeof lnb_cuda_g.name, "%.200s, %.1f GiB, sm_%d%d (device %d)", p.name,
             (double)p.totalGlobalMem / (1 << 30), p.major, p.minor, dev);
    if (open_handles(e)) { /* none of them is kept: a later open starts afresh */
        ln_err_prefix(e, "CUDA backend on device %d (%s)", dev, p.name);
        if (lnb_cuda_g.solver) cusolverDnDestroy(lnb_cuda_g.solver);
        if (lnb_cuda_g.blas) cublasDestroy(lnb_cuda_g.blas);
        if (lnb_cuda_g.stream) cudaStreamDestroy(lnb_cuda_g.stream);
        lnb_cuda_g.solver = 0;
        lnb_cuda_g.blas = 0;
        lnb_cuda_g.stream = 0;
        return -1;
    }
    lnb_cuda_g.math = o ? o->math : LNB_CUDA_MATH_BF16;
    /* calls queue their work; the engine waits through the table's sync where its host code touches
     * tensors. LORANULL_CUDA_SYNC=1 (debugging) also waits after every call. */
    const char *s = getenv("LORANULL_CUDA_SYNC");
    lnb_cuda_g.sync = s && *s && strcmp(s, "0") != 0;
    g_open = 1;
    return 0;
}

static void *g_ws[WS_NSLOTS];
static size_t g_ws_size[WS_NSLOTS];

extern "C" void lnb_cuda_unregister_all(void);

extern "C" void lnb_cuda_close(void)
{
    if (!g_open) return;
    lnb_cuda_unregister_all();
    cudaStreamSynchronize(lnb_cuda_g.stream);
    for (int i = 0; i < WS_NSLOTS; i++) {
        cudaFree(g_ws[i]);
        g_ws[i] = NULL;
        g_ws_size[i] = 0;
    }
    cusolverDnDestroy(lnb_cuda_g.solver);
    cublasDestroy(lnb_cuda_g.blas);
    cudaStreamDestroy(lnb_cuda_g.stream);
    g_open = 0;
}

extern "C" void lnb_cuda_set_math(lnb_cuda_math m) { lnb_cuda_g.math = m; }

extern "C" int lnb_cuda_sync(ln_err *e)
{
    CUDA_TRY(cudaStreamSynchronize(lnb_cuda_g.stream), e);
    return lnb_cuda_check(e);
}

void lnb_cuda_bind_thread(void)
{
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess || cur != lnb_cuda_g.device) CUDA_NOTE(cudaSetDevice(lnb_cuda_g.device));
}

void lnb_cuda_after_call(void)
{
    if (lnb_cuda_g.sync) CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
}

void *lnb_cuda_workspace(int slot, size_t bytes)
{
    if (bytes <= g_ws_size[slot]) return g_ws[slot];
    /* The stream may still read the old buffer. */
    CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
    cudaFree(g_ws[slot]);
    g_ws[slot] = NULL;
    g_ws_size[slot] = 0;
    size_t n = bytes + bytes / 4 + 256;
    cudaError_t st = cudaMalloc(&g_ws[slot], n);
    if (st != cudaSuccess) {
        lnb_cuda_note_error("cudaMalloc (workspace)", cudaGetErrorString(st), __FILE__, __LINE__);
        g_ws[slot] = NULL;
        return NULL;
    }
    g_ws_size[slot] = n;
    return g_ws[slot];
}

const void *lnb_cuda_device_view(const void *p, size_t bytes, int slot)
{
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) == cudaSuccess &&
        (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged))
        return p;
    cudaGetLastError();
    void *d = lnb_cuda_workspace(slot, bytes);
    if (!d) return NULL;
    CUDA_NOTE(cudaMemcpyAsync(d, p, bytes, cudaMemcpyHostToDevice, lnb_cuda_g.stream));
    return d;
}

/* ================================================================ memory */

static void *cu_alloc(size_t bytes)
{
    lnb_cuda_bind_thread();
    size_t n = (bytes + 255) & ~(size_t)255;
    if (n == 0) n = 256;
    void *p = NULL;
    if (cudaMallocManaged(&p, n, cudaMemAttachGlobal) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    /* Zeroed on the device, so the pages start out resident on the GPU. */
    if (cudaMemsetAsync(p, 0, n, lnb_cuda_g.stream) != cudaSuccess || cudaStreamSynchronize(lnb_cuda_g.stream) != cudaSuccess) {
        cudaFree(p);
        return NULL;
    }
    return p;
}
extern "C" void lnb_cuda_unregister(const float *w);

static void cu_free(void *p)
{
    if (!p) return;
    lnb_cuda_unregister((const float *)p); /* a later buffer at this address must not hit a stale bf16 copy */
    CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
    CUDA_NOTE(cudaFree(p));
}
static void cu_upload(void *dst, const void *host, size_t bytes)
{
    if (!bytes) return;
    CUDA_NOTE(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyDefault, lnb_cuda_g.stream));
    CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
}
static void cu_download(void *host, const void *src, size_t bytes)
{
    if (!bytes) return;
    CUDA_NOTE(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDefault, lnb_cuda_g.stream));
    CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
}
static void cu_zero(float *x, int64_t n)
{
    if (n) CUDA_NOTE(cudaMemsetAsync(x, 0, (size_t)n * sizeof(float), lnb_cuda_g.stream));
    lnb_cuda_after_call();
}
static void cu_copy(float *dst, const float *src, int64_t n)
{
    if (n && dst != src) CUDA_NOTE(cudaMemcpyAsync(dst, src, (size_t)n * sizeof(float), cudaMemcpyDefault, lnb_cuda_g.stream));
    lnb_cuda_after_call();
}

/* ================================================================ launch helpers */

static int grid_for(int64_t n, int threads)
{
    int64_t g = (n + threads - 1) / threads;
    return (int)(g < 65535 * 16 ? (g > 0 ? g : 1) : 65535 * 16);
}
#define STRIDE_LOOP(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

/* Sum over a block of 256 threads (warp shuffles, then one warp); the order is fixed. */
template <typename T> __device__ T block_sum(T v, T *sh)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) sh[w] = v;
    __syncthreads();
    T r = 0;
    if (w == 0) {
        r = l < (int)(blockDim.x >> 5) ? sh[l] : (T)0;
        for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
        if (l == 0) sh[0] = r;
    }
    __syncthreads();
    r = sh[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float *sh)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float r = l < (int)(blockDim.x >> 5) ? sh[l] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) r = fmaxf(r, __shfl_xor_sync(0xffffffffu, r, o));
        if (l == 0) sh[0] = r;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

/* ================================================================ BLAS-like */

cublasComputeType_t lnb_cuda_compute_type(void)
{
    switch (lnb_cuda_g.math) {
    case LNB_CUDA_MATH_FP32: return CUBLAS_COMPUTE_32F_PEDANTIC;
    case LNB_CUDA_MATH_TF32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    default: return CUBLAS_COMPUTE_32F_FAST_16BF;
    }
}

__global__ void k_scale_rows(float *C, int M, int N, int ldc, float beta)
{
    STRIDE_LOOP(i, (int64_t)M * N)
    {
        int64_t r = i / N, c = i % N;
        float *p = C + r * ldc + c;
        *p = beta == 0.0f ? 0.0f : beta * *p;
    }
}

/* ---- frozen weights multiplied from bf16 copies (lnb_cuda_register_bf16) ---- */

#include <cuda_bf16.h>

typedef struct { const float *w; int64_t n; __nv_bfloat16 *h; } bf16_entry;
static bf16_entry *g_bf16;
static int g_nbf16, g_capbf16;

static const bf16_entry *bf16_find(const float *p)
{
    for (int i = 0; i < g_nbf16; i++)
        if (g_bf16[i].w == p) return &g_bf16[i];
    return NULL;
}

__global__ void k_to_bf16(__nv_bfloat16 *dst, const float *src, int64_t n)
{
    STRIDE_LOOP(i, n) dst[i] = __float2bfloat16(src[i]);
}

extern "C" int lnb_cuda_register_bf16(const float *w, int64_t n, ln_err *e)
{
    if (bf16_find(w)) return 0;
    if (g_nbf16 == g_capbf16) { /* the table grows first: a failure leaves it and the device untouched */
        int cap = g_capbf16 ? 2 * g_capbf16 : 256;
        bf16_entry *t = (bf16_entry *)realloc(g_bf16, (size_t)cap * sizeof *g_bf16);
        if (!t) return ln_errf(e, "CUDA backend: out of host memory registering bf16 weights");
        g_bf16 = t;
        g_capbf16 = cap;
    }
    __nv_bfloat16 *h = NULL;
    cudaError_t st = cudaMalloc((void **)&h, (size_t)(n > 0 ? n : 1) * sizeof *h);
    if (st == cudaSuccess) {
        k_to_bf16<<<grid_for(n, 256), 256, 0, lnb_cuda_g.stream>>>(h, w, n);
        st = cudaGetLastError();
    }
    if (st == cudaSuccess) st = cudaStreamSynchronize(lnb_cuda_g.stream);
    if (st != cudaSuccess) {
        cudaFree(h);
        cudaGetLastError();
        return ln_errf(e, "CUDA backend: a bf16 copy of a %lld-element weight (%.1f MiB) failed: %s", (long long)n,
                       (double)n * 2 / (1 << 20), cudaGetErrorString(st));
    }
    g_bf16[g_nbf16++] = (bf16_entry){w, n, h};
    return 0;
}

extern "C" void lnb_cuda_unregister(const float *w)
{
    for (int i = 0; i < g_nbf16; i++)
        if (g_bf16[i].w == w) {
            CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
            cudaFree(g_bf16[i].h);
            g_bf16[i] = g_bf16[--g_nbf16];
            return;
        }
}

extern "C" void lnb_cuda_unregister_all(void)
{
    CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
    for (int i = 0; i < g_nbf16; i++) cudaFree(g_bf16[i].h);
    g_nbf16 = 0;
}

/* The bf16 image of a row-major operand with `rows` rows of `cols` used elements at leading
 * dimension ld: (rows − 1)·ld + cols elements from p, converted into workspace `slot`. */
static const __nv_bfloat16 *as_bf16(const float *p, int rows, int cols, int ld, int slot)
{
    const bf16_entry *b = bf16_find(p);
    if (b) return b->h;
    int64_t n = (int64_t)(rows - 1) * ld + cols;
    __nv_bfloat16 *d = (__nv_bfloat16 *)lnb_cuda_workspace(slot, (size_t)n * sizeof *d);
    if (!d) return NULL;
    k_to_bf16<<<grid_for(n, 256), 256, 0, lnb_cuda_g.stream>>>(d, p, n);
    LAUNCH_NOTE("to_bf16");
    return d;
}

/* Row-major C = α op(A) op(B) + β C is column-major Cᵀ = α op(B)ᵀ op(A)ᵀ + β Cᵀ: swap the
 * operands, keep the transposition flags. When either operand is a registered bf16 weight (and
 * the math mode is bf16) both go in as bf16 (the other converted on the fly) with fp32
 * accumulation and an fp32 C. */
static void cu_matmul(int tA, int tB, int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                      float beta, float *C, int ldc)
{
    if (M == 0 || N == 0) return;
    if (K == 0) {
        k_scale_rows<<<grid_for((int64_t)M * N, 256), 256, 0, lnb_cuda_g.stream>>>(C, M, N, ldc, beta);
        LAUNCH_NOTE("scale_rows");
    } else if (g_nbf16 && lnb_cuda_g.math == LNB_CUDA_MATH_BF16 && (bf16_find(A) || bf16_find(B))) {
        /* stored shapes: A is M×K (K×M when tA), B is K×N (N×K when tB) */
        const __nv_bfloat16 *a16 = as_bf16(A, tA ? K : M, tA ? M : K, lda, WS_BF16_A);
        const __nv_bfloat16 *b16 = as_bf16(B, tB ? N : K, tB ? K : N, ldb, WS_BF16_B);
        if (a16 && b16)
            CUBLAS_NOTE(cublasGemmEx(lnb_cuda_g.blas, tB ? CUBLAS_OP_T : CUBLAS_OP_N, tA ? CUBLAS_OP_T : CUBLAS_OP_N, N,
                                     M, K, &alpha, b16, CUDA_R_16BF, ldb, a16, CUDA_R_16BF, lda, &beta, C, CUDA_R_32F,
                                     ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else {
        CUBLAS_NOTE(cublasGemmEx(lnb_cuda_g.blas, tB ? CUBLAS_OP_T : CUBLAS_OP_N, tA ? CUBLAS_OP_T : CUBLAS_OP_N, N, M,
                                 K, &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &beta, C, CUDA_R_32F, ldc,
                                 lnb_cuda_compute_type(), CUBLAS_GEMM_DEFAULT));
    }
    lnb_cuda_after_call();
}

__global__ void k_axpy(int64_t n, float a, const float *x, float *y) { STRIDE_LOOP(i, n) y[i] += a * x[i]; }
__global__ void k_scale(int64_t n, float a, float *x) { STRIDE_LOOP(i, n) x[i] *= a; }

static void cu_axpy(int64_t n, float a, const float *x, float *y)
{
    if (!n) return;
    k_axpy<<<grid_for(n, 256), 256, 0, lnb_cuda_g.stream>>>(n, a, x, y);
    LAUNCH_NOTE("axpy");
    lnb_cuda_after_call();
}
static void cu_scale(int64_t n, float a, float *x)
{
    if (!n) return;
    k_scale<<<grid_for(n, 256), 256, 0, lnb_cuda_g.stream>>>(n, a, x);
    LAUNCH_NOTE("scale");
    lnb_cuda_after_call();
}

/* Σ x² in double: a fixed grid of SUMSQ_BLOCKS blocks, each summing a fixed strided subset, then
 * one block adding the partials in order — the same bits for the same input. */
#define SUMSQ_BLOCKS 512
__global__ void k_sumsq_part(const float *x, int64_t n, double *part)
{
    __shared__ double sh[32];
    double s = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    s = block_sum<double>(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}
__global__ void k_sum_parts(double *part, int n)
{
    __shared__ double sh[32];
    double s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
    s = block_sum<double>(s, sh);
    if (threadIdx.x == 0) part[n] = s;
}

static double cu_sumsq(const float *x, int64_t n)
{
    if (n <= 0) return 0.0;
    double *part = (double *)lnb_cuda_workspace(WS_REDUCE, (SUMSQ_BLOCKS + 1) * sizeof(double));
    if (!part) return NAN;
    k_sumsq_part<<<SUMSQ_BLOCKS, 256, 0, lnb_cuda_g.stream>>>(x, n, part);
    k_sum_parts<<<1, 256, 0, lnb_cuda_g.stream>>>(part, SUMSQ_BLOCKS);
    LAUNCH_NOTE("sumsq");
    double r = NAN;
    CUDA_NOTE(cudaMemcpyAsync(&r, part + SUMSQ_BLOCKS, sizeof r, cudaMemcpyDeviceToHost, lnb_cuda_g.stream));
    CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
    return r;
}

/* part[i·(SUMSQ_BLOCKS+1) + SUMSQ_BLOCKS] → res[i]: the k sums side by side for one copy */
__global__ void k_sumsq_gather(const double *part, int k, double *res)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < k; i += gridDim.x * blockDim.x)
        res[i] = part[(int64_t)i * (SUMSQ_BLOCKS + 1) + SUMSQ_BLOCKS];
}

/* The same two kernels per tensor as cu_sumsq (the same bits), one copy and one wait for all k. */
static int cu_sumsq_many(int k, const float *const *x, const int64_t *n, double *out)
{
    if (k <= 0) return 0;
    size_t stride = SUMSQ_BLOCKS + 1;
    double *part = (double *)lnb_cuda_workspace(WS_REDUCE, ((size_t)k * stride + (size_t)k) * sizeof(double));
    if (!part) return -1;
    double *res = part + (size_t)k * stride;
    for (int i = 0; i < k; i++) {
        double *pi = part + (size_t)i * stride;
        if (n[i] <= 0) continue; /* 0, set below (its slot is not written) */
        k_sumsq_part<<<SUMSQ_BLOCKS, 256, 0, lnb_cuda_g.stream>>>(x[i], n[i], pi);
        k_sum_parts<<<1, 256, 0, lnb_cuda_g.stream>>>(pi, SUMSQ_BLOCKS);
    }
    k_sumsq_gather<<<(k + 255) / 256, 256, 0, lnb_cuda_g.stream>>>(part, k, res);
    LAUNCH_NOTE("sumsq_many");
    for (int i = 0; i < k; i++) out[i] = NAN;
    CUDA_NOTE(cudaMemcpyAsync(out, res, (size_t)k * sizeof(double), cudaMemcpyDeviceToHost, lnb_cuda_g.stream));
    CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
    for (int i = 0; i < k; i++)
        if (n[i] <= 0) out[i] = 0.0;
    return 0;
}

/* ================================================================ embedding */

__global__ void k_embedding_forward(float *out, const int32_t *ids, const float *table, int N, int C)
{
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const float *src = table + (int64_t)ids[n] * C;
        float *dst = out + (int64_t)n * C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) dst[c] = src[c];
    }
}

/* One thread per column, rows in order: rows sharing an id add up deterministically. */
__global__ void k_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int N, int C)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int n = 0; n < N; n++) dtable[(int64_t)ids[n] * C + c] += dout[(int64_t)n * C + c];
}

static void cu_embedding_forward(float *out, const int32_t *ids, const float *table, int N, int C)
{
    const int32_t *d = (const int32_t *)lnb_cuda_device_view(ids, (size_t)N * sizeof(int32_t), WS_IDS);
    if (!d) return;
    k_embedding_forward<<<N < 65535 ? N : 65535, 256, 0, lnb_cuda_g.stream>>>(out, d, table, N, C);
    LAUNCH_NOTE("embedding_forward");
    lnb_cuda_after_call();
}
static void cu_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int N, int C)
{
    const int32_t *d = (const int32_t *)lnb_cuda_device_view(ids, (size_t)N * sizeof(int32_t), WS_IDS);
    if (!d) return;
    k_embedding_backward<<<(C + 127) / 128, 128, 0, lnb_cuda_g.stream>>>(dtable, dout, d, N, C);
    LAUNCH_NOTE("embedding_backward");
    lnb_cuda_after_call();
}

/* ================================================================ RMSNorm */

/* One block per row: out = w ⊙ x · r, r = 1/sqrt(mean(x²) + eps). */
__global__ void k_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C, float eps)
{
    __shared__ float sh[32];
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const float *xr = x + (int64_t)n * C;
        float ss = 0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) ss += xr[c] * xr[c];
        ss = block_sum<float>(ss, sh);
        float r = rsqrtf(ss / (float)C + eps);
        if (threadIdx.x == 0) rstd[n] = r;
        float *o = out + (int64_t)n * C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) o[c] = w[c] * (xr[c] * r);
    }
}

/* dx_j += r w_j dy_j − (r³/C) x_j Σ_c w_c dy_c x_c (one block per row) */
__global__ void k_rmsnorm_backward_dx(float *dx, const float *dout, const float *x, const float *w, const float *rstd,
                                      int N, int C)
{
    __shared__ float sh[32];
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const float *xr = x + (int64_t)n * C, *dy = dout + (int64_t)n * C;
        float r = rstd[n], dot = 0;
        for (int c = threadIdx.x; c < C; c += blockDim.x) dot += w[c] * dy[c] * xr[c];
        dot = block_sum<float>(dot, sh);
        float k = r * r * r * dot / (float)C;
        float *d = dx + (int64_t)n * C;
        for (int c = threadIdx.x; c < C; c += blockDim.x) d[c] += r * w[c] * dy[c] - k * xr[c];
    }
}

/* dw_c += Σ_n dy_c x_c r_n: one thread per column, rows in order. */
__global__ void k_rmsnorm_backward_dw(float *dw, const float *dout, const float *x, const float *rstd, int N, int C)
{
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0;
    for (int n = 0; n < N; n++) s += dout[(int64_t)n * C + c] * x[(int64_t)n * C + c] * rstd[n];
    dw[c] += s;
}

static void cu_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C, float eps)
{
    k_rmsnorm_forward<<<N < 65535 ? N : 65535, 256, 0, lnb_cuda_g.stream>>>(out, rstd, x, w, N, C, eps);
    LAUNCH_NOTE("rmsnorm_forward");
    lnb_cuda_after_call();
}
static void cu_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                                const float *rstd, int N, int C)
{
    k_rmsnorm_backward_dx<<<N < 65535 ? N : 65535, 256, 0, lnb_cuda_g.stream>>>(dx, dout, x, w, rstd, N, C);
    if (dw) k_rmsnorm_backward_dw<<<(C + 127) / 128, 128, 0, lnb_cuda_g.stream>>>(dw, dout, x, rstd, N, C);
    LAUNCH_NOTE("rmsnorm_backward");
    lnb_cuda_after_call();
}

/* ================================================================ RoPE */

/* HF rotate_half, one thread per (row, head, i < hd/2); sgn = −1 rotates back (the backward). */
__global__ void k_rope(float *x, const float *cosb, const float *sinb, int N, int T, int nh, int hd, float sgn)
{
    int h = hd / 2;
    STRIDE_LOOP(idx, (int64_t)N * nh * h)
    {
        int i = (int)(idx % h);
        int64_t nhd = idx / h; /* row·nh + head */
        int n = (int)(nhd / nh);
        float c = cosb[(int64_t)(n % T) * h + i], s = sgn * sinb[(int64_t)(n % T) * h + i];
        float *v = x + nhd * hd;
        float a = v[i], b = v[i + h];
        v[i] = a * c - b * s;
        v[i + h] = b * c + a * s;
    }
}

static void rope_apply(float *x, const float *cosb, const float *sinb, int N, int T, int nh, int hd, float sgn)
{
    size_t tb = (size_t)T * (hd / 2) * sizeof(float);
    const float *dc = (const float *)lnb_cuda_device_view(cosb, tb, WS_COS);
    const float *ds = (const float *)lnb_cuda_device_view(sinb, tb, WS_SIN);
    if (!dc || !ds) return;
    k_rope<<<grid_for((int64_t)N * nh * (hd / 2), 256), 256, 0, lnb_cuda_g.stream>>>(x, dc, ds, N, T, nh, hd, sgn);
    LAUNCH_NOTE("rope");
    lnb_cuda_after_call();
}
static void cu_rope_forward(float *x, const float *c, const float *s, int N, int T, int nh, int hd)
{
    rope_apply(x, c, s, N, T, nh, hd, 1.0f);
}
static void cu_rope_backward(float *dx, const float *c, const float *s, int N, int T, int nh, int hd)
{
    rope_apply(dx, c, s, N, T, nh, hd, -1.0f);
}

/* ================================================================ attention (attention.cu) */

static void cu_attention_forward(float *out, float *probs, const float *q, const float *k, const float *v, int B, int T,
                                 int nh, int nkv, int hd)
{
    lnb_cuda_attention_forward(out, probs, q, k, v, B, T, nh, nkv, hd);
    lnb_cuda_after_call();
}
static void cu_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout, const float *probs,
                                  const float *q, const float *k, const float *v, int B, int T, int nh, int nkv, int hd)
{
    lnb_cuda_attention_backward(dq, dk, dv, scratch, dout, probs, q, k, v, B, T, nh, nkv, hd);
    lnb_cuda_after_call();
}

/* ================================================================ SwiGLU */

__global__ void k_swiglu_forward(float *out, const float *gate, const float *up, int64_t n)
{
    STRIDE_LOOP(i, n)
    {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}
/* ∂/∂g = u σ(g) (1 + g (1 − σ(g))) ; ∂/∂u = g σ(g) */
__global__ void k_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                                  int64_t n)
{
    STRIDE_LOOP(i, n)
    {
        float g = gate[i], s = 1.0f / (1.0f + expf(-g)), d = dout[i];
        dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] = d * g * s;
    }
}
static void cu_swiglu_forward(float *out, const float *gate, const float *up, int64_t n)
{
    if (!n) return;
    k_swiglu_forward<<<grid_for(n, 256), 256, 0, lnb_cuda_g.stream>>>(out, gate, up, n);
    LAUNCH_NOTE("swiglu_forward");
    lnb_cuda_after_call();
}
static void cu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t n)
{
    if (!n) return;
    k_swiglu_backward<<<grid_for(n, 256), 256, 0, lnb_cuda_g.stream>>>(dgate, dup, dout, gate, up, n);
    LAUNCH_NOTE("swiglu_backward");
    lnb_cuda_after_call();
}

/* ================================================================ cross-entropy */

/* One block per row over a large vocabulary: max, Σ exp, then (when asked) the gradient
 * dscale·(softmax − onehot) written over the same row (each element by the thread that read it). */
__global__ void k_cross_entropy(const float *logits, float *dlogits, const int32_t *targets, int N, int V, float dscale,
                                double *rowloss)
{
    __shared__ float shf[32];
    __shared__ double shd[32];
    for (int n = blockIdx.x; n < N; n += gridDim.x) {
        const float *z = logits + (int64_t)n * V;
        float *d = dlogits ? dlogits + (int64_t)n * V : NULL;
        int y = targets[n];
        if (y < 0) {
            if (d)
                for (int j = threadIdx.x; j < V; j += blockDim.x) d[j] = 0.0f;
            if (threadIdx.x == 0) rowloss[n] = 0.0;
            continue;
        }
        float mx = -INFINITY;
        for (int j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, z[j]);
        mx = block_max(mx, shf);
        double sum = 0;
        for (int j = threadIdx.x; j < V; j += blockDim.x) sum += (double)expf(z[j] - mx);
        sum = block_sum<double>(sum, shd);
        float zy = z[y];
        if (threadIdx.x == 0) rowloss[n] = log(sum) - ((double)zy - mx);
        __syncthreads(); /* z[y] read before it is overwritten in place */
        if (d) {
            float inv = (float)(1.0 / sum);
            for (int j = threadIdx.x; j < V; j += blockDim.x) {
                float g = dscale * (expf(z[j] - mx) * inv);
                d[j] = j == y ? g - dscale : g;
            }
        }
    }
}

static double cu_cross_entropy(const float *logits, float *dlogits, const int32_t *targets, int N, int V, float dscale)
{
    if (N <= 0) return 0.0;
    const int32_t *dt = (const int32_t *)lnb_cuda_device_view(targets, (size_t)N * sizeof(int32_t), WS_TARGETS);
    double *rl = (double *)lnb_cuda_workspace(WS_REDUCE, (size_t)(N + SUMSQ_BLOCKS + 1) * sizeof(double));
    if (!dt || !rl) return NAN;
    k_cross_entropy<<<N < 65535 ? N : 65535, 512, 0, lnb_cuda_g.stream>>>(logits, dlogits, dt, N, V, dscale, rl);
    LAUNCH_NOTE("cross_entropy");
    double *h = (double *)malloc((size_t)N * sizeof(double));
    if (!h) return NAN;
    CUDA_NOTE(cudaMemcpyAsync(h, rl, (size_t)N * sizeof(double), cudaMemcpyDeviceToHost, lnb_cuda_g.stream));
    CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
    double total = 0;
    for (int n = 0; n < N; n++) total += h[n]; /* row order, as the CPU backend */
    free(h);
    return total;
}

/* ================================================================ AdamW */

__global__ void k_adamw(float *p, const float *g, float *m, float *v, int64_t n, float gscale, float lr, float b1,
                        float b2, float eps, float wd, float step, float sbc2)
{
    STRIDE_LOOP(i, n)
    {
        float gi = g[i] * gscale, pi = p[i] * (1.0f - lr * wd);
        float mi = b1 * m[i] + (1.0f - b1) * gi, vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step * mi / (sqrtf(vi) / sbc2 + eps);
    }
}
static void cu_adamw(float *p, const float *g, float *m, float *v, int64_t n, float gscale, float lr, float beta1,
                     float beta2, float eps, float wd, float bc1, float bc2)
{
    if (!n) return;
    k_adamw<<<grid_for(n, 256), 256, 0, lnb_cuda_g.stream>>>(p, g, m, v, n, gscale, lr, beta1, beta2, eps, wd, lr / bc1,
                                                            sqrtf(bc2));
    LAUNCH_NOTE("adamw");
    lnb_cuda_after_call();
}

/* ================================================================ fills (benchmarks) */

/* splitmix64 of (seed, index) → two uniforms → Box–Muller: any element computable on its own. */
__device__ uint64_t mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__global__ void k_fill_normal(float *x, int64_t n, uint64_t seed, float std)
{
    STRIDE_LOOP(i, n)
    {
        uint64_t a = mix64(seed ^ mix64((uint64_t)i));
        float u1 = ((a >> 40) + 1) * (1.0f / 16777217.0f), u2 = ((a >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f);
        x[i] = std * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    }
}
__global__ void k_fill_const(float *x, int64_t n, float v) { STRIDE_LOOP(i, n) x[i] = v; }

extern "C" void lnb_cuda_fill_normal(float *x, int64_t n, uint64_t seed, float std)
{
    if (!n) return;
    k_fill_normal<<<grid_for(n, 256), 256, 0, lnb_cuda_g.stream>>>(x, n, seed, std);
    LAUNCH_NOTE("fill_normal");
    lnb_cuda_after_call();
}
extern "C" void lnb_cuda_fill_const(float *x, int64_t n, float v)
{
    if (!n) return;
    k_fill_const<<<grid_for(n, 256), 256, 0, lnb_cuda_g.stream>>>(x, n, v);
    LAUNCH_NOTE("fill_const");
    lnb_cuda_after_call();
}

/* ================================================================ the table's hooks (backend.h) */

/* check: waits for the stream (a kernel that failed asynchronously shows up there), then reports
 * the first kept failure. Also the table's sync: after the wait, host code may touch any tensor. */
static int cu_check(ln_err *e)
{
    lnb_cuda_bind_thread();
    CUDA_NOTE(cudaStreamSynchronize(lnb_cuda_g.stream));
    return lnb_cuda_check(e);
}

/* freeze: a bf16 copy (lnb_cuda_register_bf16) in the bf16 math mode, the only one whose GEMMs read
 * such copies (cu_matmul); in the TF32 and FP32 modes a copy would be device memory never read. */
static int64_t cu_freeze(const float *w, int64_t n, ln_err *e)
{
    if (lnb_cuda_g.math != LNB_CUDA_MATH_BF16) return 0;
    lnb_cuda_bind_thread();
    if (lnb_cuda_register_bf16(w, n, e)) return -1;
    return n * (int64_t)sizeof(__nv_bfloat16);
}

static void cu_thaw(const float *w) { lnb_cuda_unregister(w); }

/* ================================================================ table */

static lnb_backend g_table;

extern "C" const lnb_backend *lnb_cuda(void)
{
    if (!g_open) return NULL;
    if (!g_table.name) {
        lnb_backend t;
        memset(&t, 0, sizeof t);
        t.name = "cuda";
        t.alloc = cu_alloc; t.free = cu_free; t.upload = cu_upload; t.download = cu_download;
        t.zero = cu_zero; t.copy = cu_copy;
        t.matmul = cu_matmul; t.axpy = cu_axpy; t.scale = cu_scale; t.sumsq = cu_sumsq;
        t.sumsq_many = cu_sumsq_many;
        t.embedding_forward = cu_embedding_forward; t.embedding_backward = cu_embedding_backward;
        t.rmsnorm_forward = cu_rmsnorm_forward; t.rmsnorm_backward = cu_rmsnorm_backward;
        t.rope_forward = cu_rope_forward; t.rope_backward = cu_rope_backward;
        t.attention_forward = cu_attention_forward; t.attention_backward = cu_attention_backward;
        t.swiglu_forward = cu_swiglu_forward; t.swiglu_backward = cu_swiglu_backward;
        t.cross_entropy = cu_cross_entropy; t.adamw = cu_adamw;
        t.attention_rows_only = 1;
        t.check = cu_check; t.freeze = cu_freeze; t.thaw = cu_thaw; t.frozen_form = "bf16";
        t.sync = cu_check; /* the same stream wait and kept-error report as check */
        g_table = t;
    }
    return &g_table;
}
