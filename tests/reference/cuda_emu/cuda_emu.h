/* cuda_emu.h — a host emulation of the parts of CUDA that worker/backend/cuda/ uses, so that its
 * .cu files (lightly rewritten by tests/reference/emu_build.py) and the unchanged GPU test programs
 * (tests/gpu/test_*.c) build and run on a machine without a GPU. The stub headers in include/
 * (cuda_runtime.h, cuda_runtime_api.h, cuda_bf16.h, mma.h, cublas_v2.h, cusolverDn.h) all lead here.
 *
 * The C part (C tests include <cuda_runtime_api.h>): the runtime, cuBLAS and cuSOLVER types and
 * entry points, implemented in cuda_emu.cpp — memory from malloc at the exact size asked (NaN-filled:
 * neither cudaMalloc nor cudaMallocManaged clears memory, per the CUDA documentation), one device
 * ("an emulated H200"), work on streams queued and run at the synchronisation points CUDA defines
 * (so host code that reads a result before synchronising reads stale data, as on a GPU), every
 * device pointer a kernel, a copy or a library call receives checked against the live device
 * allocations. Whatever is not emulated aborts naming the function, never returns success silently.
 *
 * The C++ part (the .cu files): device qualifiers, threadIdx/blockIdx/blockDim/gridDim, barriers
 * and warp shuffles (every thread a fiber, cuda_emu.cpp), bf16, WMMA on whole 16 × 16 tiles, and
 * the launch that `kernel<<<grid, block, smem, stream>>>(args)` is rewritten to. */
#ifndef CUDA_EMU_H
#define CUDA_EMU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define EMU_DEFAULT(x) = x
extern "C" {
#else
#define EMU_DEFAULT(x)
#endif

/* ================================================================ runtime */

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600
} cudaError_t;

typedef struct emu_stream *cudaStream_t;
typedef struct emu_event *cudaEvent_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2, cudaMemoryTypeManaged = 3 };
typedef struct cudaPointerAttributes {
    enum cudaMemoryType type;
    int device;
    void *devicePointer;
    void *hostPointer;
} cudaPointerAttributes;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrManagedMemory = 83,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaMemAttachGlobal 0x01

typedef struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    int warpSize;
    int maxThreadsPerBlock;
    int maxThreadsDim[3];
    int maxGridSize[3];
    int major;
    int minor;
    int multiProcessorCount;
    int managedMemory;
    int concurrentManagedAccess;
    size_t sharedMemPerBlockOptin;
} cudaDeviceProp;

cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaGetDevice(int *dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev);
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int dev);
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaMalloc(void **p, size_t n);
cudaError_t cudaMallocManaged(void **p, size_t n, unsigned flags EMU_DEFAULT(cudaMemAttachGlobal));
cudaError_t cudaFree(void *p);
cudaError_t cudaMemset(void *p, int v, size_t n);
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s EMU_DEFAULT(0));
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind, cudaStream_t s EMU_DEFAULT(0));
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *a, const void *p);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s EMU_DEFAULT(0));
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);
cudaError_t cudaFuncSetAttribute(const void *fn, enum cudaFuncAttribute a, int v);

/* ================================================================ cuBLAS */

typedef struct emu_blas *cublasHandle_t;
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_ARCH_MISMATCH = 8,
    CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR = 14,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
    CUBLAS_STATUS_LICENSE_ERROR = 16
} cublasStatus_t;
typedef enum { CUBLAS_FILL_MODE_LOWER = 0, CUBLAS_FILL_MODE_UPPER = 1, CUBLAS_FILL_MODE_FULL = 2 } cublasFillMode_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
typedef enum {
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_64F = 70,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77
} cublasComputeType_t;
typedef enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_16BF = 14 } cudaDataType;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TENSOR_OP_MATH = 1, CUBLAS_PEDANTIC_MATH = 2, CUBLAS_TF32_TENSOR_OP_MATH = 3 } cublasMath_t;

cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType at, int lda, const void *B, cudaDataType bt,
                            int ldb, const void *beta, void *C, cudaDataType ct, int ldc, cublasComputeType_t compute,
                            cublasGemmAlgo_t algo);
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void *alpha, const void *A, cudaDataType at, int lda,
                                          long long sA, const void *B, cudaDataType bt, int ldb, long long sB,
                                          const void *beta, void *C, cudaDataType ct, int ldc, long long sC, int batch,
                                          cublasComputeType_t compute, cublasGemmAlgo_t algo);
cublasStatus_t cublasDgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const double *alpha, const double *A, int lda, const double *B, int ldb, const double *beta,
                           double *C, int ldc);
cublasStatus_t cublasDsyrk(cublasHandle_t h, cublasFillMode_t uplo, cublasOperation_t trans, int n, int k,
                           const double *alpha, const double *A, int lda, const double *beta, double *C, int ldc);

/* ================================================================ cuSOLVER (dense) */

typedef struct emu_solver *cusolverDnHandle_t;
typedef enum {
    CUSOLVER_STATUS_SUCCESS = 0,
    CUSOLVER_STATUS_NOT_INITIALIZED = 1,
    CUSOLVER_STATUS_ALLOC_FAILED = 2,
    CUSOLVER_STATUS_INVALID_VALUE = 3,
    CUSOLVER_STATUS_ARCH_MISMATCH = 4,
    CUSOLVER_STATUS_MAPPING_ERROR = 5,
    CUSOLVER_STATUS_EXECUTION_FAILED = 6,
    CUSOLVER_STATUS_INTERNAL_ERROR = 7,
    CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED = 8,
    CUSOLVER_STATUS_NOT_SUPPORTED = 9
} cusolverStatus_t;
typedef enum { CUSOLVER_EIG_MODE_NOVECTOR = 0, CUSOLVER_EIG_MODE_VECTOR = 1 } cusolverEigMode_t;
typedef enum { CUSOLVER_EIG_RANGE_ALL = 1001, CUSOLVER_EIG_RANGE_I = 1002, CUSOLVER_EIG_RANGE_V = 1003 } cusolverEigRange_t;

cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t *h);
cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t h);
cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t h, cudaStream_t s);
cusolverStatus_t cusolverDnDsyevdx_bufferSize(cusolverDnHandle_t h, cusolverEigMode_t jobz, cusolverEigRange_t range,
                                              cublasFillMode_t uplo, int n, const double *A, int lda, double vl,
                                              double vu, int il, int iu, int *meig, const double *W, int *lwork);
cusolverStatus_t cusolverDnDsyevdx(cusolverDnHandle_t h, cusolverEigMode_t jobz, cusolverEigRange_t range,
                                   cublasFillMode_t uplo, int n, double *A, int lda, double vl, double vu, int il,
                                   int iu, int *meig, double *W, double *work, int lwork, int *info);
cusolverStatus_t cusolverDnDgesvd_bufferSize(cusolverDnHandle_t h, int m, int n, int *lwork);
cusolverStatus_t cusolverDnDgesvd(cusolverDnHandle_t h, signed char jobu, signed char jobvt, int m, int n, double *A,
                                  int lda, double *S, double *U, int ldu, double *VT, int ldvt, double *work, int lwork,
                                  double *rwork, int *info);

#ifdef __cplusplus
} /* extern "C" */

/* ================================================================ C++: the device side */

#include <math.h>
#include <string.h>

#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

template <class T> static inline cudaError_t cudaMalloc(T **p, size_t n) { return cudaMalloc((void **)p, n); }
template <class T> static inline cudaError_t cudaMallocManaged(T **p, size_t n, unsigned f = cudaMemAttachGlobal)
{
    return cudaMallocManaged((void **)p, n, f);
}
template <class T> static inline cudaError_t cudaFuncSetAttribute(T *fn, enum cudaFuncAttribute a, int v)
{
    return cudaFuncSetAttribute((const void *)fn, a, v);
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
/* emu_build.py rewrites every __shared__ declaration; one it missed does not compile. */
#define __shared__ __shared___declaration_not_rewritten_by_emu_build_py

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

extern uint3 *emu_tid; /* the running thread's index */
extern uint3 emu_block_idx, emu_grid_dim;
extern dim3 emu_block_dim;
#define threadIdx (*emu_tid)
#define blockIdx (emu_block_idx)
#define blockDim (emu_block_dim)
#define gridDim (emu_grid_dim)

/* A loud failure: "FAIL cuda_emu: <kernel or call>: <what>" on stdout and stderr, exit 3. */
[[noreturn]] void emu_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
const char *emu_kernel_name(void);

void __syncthreads(void);
void __syncwarp(unsigned mask = 0xffffffffu);
uint64_t emu_shfl_xor(unsigned mask, uint64_t bits, int lane_mask);
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask)
{
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "a shuffle of at most 64 bits");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof v);
    b = emu_shfl_xor(mask, b, lane_mask);
    T r;
    memcpy(&r, &b, sizeof r);
    return r;
}
unsigned emu_flat_tid(void);

/* Shared memory of the running block: the launch's dynamic bytes, and each static __shared__
 * declaration (site) its own exact-size buffer; both NaN bytes (0xFF) at the start of every block. */
void *emu_dynamic_smem(void);
void *emu_static_smem(size_t bytes, const char *file, int line);

/* ---- device math the kernels use that the host library lacks ---- */
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline float cospif(float x) { return (float)cos(3.14159265358979323846 * (double)x); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

/* ---- bf16 ---- */
struct __nv_bfloat16 {
    uint16_t x;
};
static inline __nv_bfloat16 __float2bfloat16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) r.x = (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    else r.x = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);         /* nearest, ties to even */
    return r;
}
static inline float __bfloat162float(__nv_bfloat16 b)
{
    uint32_t u = (uint32_t)b.x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float emu_to_float(__nv_bfloat16 b) { return __bfloat162float(b); }
static inline float emu_to_float(float f) { return f; }

/* ---- WMMA on whole tiles: every lane's fragment holds the whole 16 × 16 tile (the kernels only
 * load, store, fill and multiply fragments, whose results do not depend on the hardware's element
 * placement); loads and stores check the 256-bit alignment and the leading dimensions the hardware
 * needs, and are collective (__syncwarp) as on the hardware. ---- */
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only 16 x 16 x 16 WMMA tiles are emulated");
    float v[16 * 16]; /* (row, col) of the tile, row-major */
};

static inline void check_ptr(const void *p, unsigned ldm, size_t elt, const char *what)
{
    if ((uintptr_t)p % 32) emu_fail("%s: %s pointer not 256-bit aligned (offset %d)", emu_kernel_name(), what, (int)((uintptr_t)p % 32));
    if ((ldm * elt) % 16) emu_fail("%s: %s leading dimension %u is not a multiple of 16 bytes", emu_kernel_name(), what, ldm);
}

template <class Use, class T, class Layout>
static inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout> &f, const T *p, unsigned ldm)
{
    check_ptr(p, ldm, sizeof(T), "load_matrix_sync");
    const bool col = std::is_same<Layout, col_major>::value;
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) f.v[r * 16 + c] = emu_to_float(col ? p[r + (size_t)c * ldm] : p[(size_t)r * ldm + c]);
    __syncwarp(); /* collective: no lane stores over the tile before every lane has it */
}

static inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p, unsigned ldm, layout_t l)
{
    check_ptr(p, ldm, sizeof(float), "load_matrix_sync (accumulator)");
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) f.v[r * 16 + c] = l == mem_col_major ? p[r + (size_t)c * ldm] : p[(size_t)r * ldm + c];
    __syncwarp();
}

static inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f, unsigned ldm, layout_t l)
{
    check_ptr(p, ldm, sizeof(float), "store_matrix_sync");
    /* each lane writes its share only (as the hardware does): a lane that reads the tile without
     * a __syncwarp after the store sees the other lanes' elements missing */
    for (int i = (int)(emu_flat_tid() % 32); i < 256; i += 32) {
        int r = i / 16, c = i % 16;
        (l == mem_col_major ? p[r + (size_t)c * ldm] : p[(size_t)r * ldm + c]) = f.v[i];
    }
}

template <class Use, class T, class Layout> static inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout> &f, float x)
{
    for (int i = 0; i < 256; i++) f.v[i] = x;
}

template <class T, class LA, class LB>
static inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, T, LA> &a,
                            const fragment<matrix_b, 16, 16, 16, T, LB> &b, const fragment<accumulator, 16, 16, 16, float> &c)
{
    float out[256];
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            float s = c.v[i * 16 + j];
            for (int k = 0; k < 16; k++) s += a.v[i * 16 + k] * b.v[k * 16 + j];
            out[i * 16 + j] = s;
        }
    memcpy(d.v, out, sizeof out);
}
} // namespace wmma
} // namespace nvcuda

/* ---- launches: `k<<<grid, block, smem, stream>>>(args)` becomes
 * emu_launch<BARRIERS>("k", k, emu_cfg(grid, block, smem, stream), args); BARRIERS = 0 where
 * emu_build.py found no barrier, shuffle or WMMA call reachable from the kernel: its threads then run
 * as plain calls (one reaching a barrier anyway fails loudly). ---- */
struct emu_config {
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
};
static inline emu_config emu_cfg(dim3 g, dim3 b, size_t smem = 0, cudaStream_t s = 0) { return emu_config{g, b, smem, s}; }

/* 0: the launch may go ahead; else the launch error is set (cudaGetLastError) and it is dropped. */
int emu_launch_check(const char *name, const void *fn, const emu_config &c);
/* A pointer argument must lie in a live device or managed allocation (a host pointer is an
 * illegal address on the device). */
void emu_check_kernel_ptr(const char *name, int arg, const void *p);
void emu_enqueue_grid(const char *name, const emu_config &c, int barriers, std::function<void()> body);

template <class T> static inline void emu_check_arg(const char *name, int i, const T &x)
{
    if constexpr (std::is_pointer<T>::value)
        if (x) emu_check_kernel_ptr(name, i, (const void *)x);
}

template <int BARRIERS, class... P, class... A>
static void emu_launch(const char *name, void (*kernel)(P...), emu_config c, A &&...args)
{
    static_assert(sizeof...(P) == sizeof...(A), "a kernel launched with the wrong number of arguments");
    if (emu_launch_check(name, (const void *)kernel, c)) return;
    std::tuple<typename std::decay<P>::type...> t(std::forward<A>(args)...); /* converted and copied at launch */
    std::apply([&](const auto &...x) {
        int i = 0;
        (emu_check_arg(name, i++, x), ...);
    }, t);
    emu_enqueue_grid(name, c, BARRIERS, [kernel, t]() { std::apply(kernel, t); });
}

/* Thread and block order: 0 in order, 1 reversed, n ≥ 2 random (seeded by n), warps running
 * ahead of each other. CUDA_EMU_ORDER sets it at start-up. */
void emu_set_order(int mode);

#endif /* __cplusplus */
#endif
