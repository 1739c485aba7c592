/* flash_emu.cpp — runs the CUDA source of worker/backend/cuda/attention.cu on the host, kernel for
 * kernel, so that what no GPU has run yet is at least executed as written: the WMMA fragment
 * layouts and leading dimensions, the shared-memory carving, the lane ↔ row mapping, the
 * barriers and shuffles, the launch configuration (grid, block, dynamic shared memory and its
 * opt-in), and the cuBLAS calls of the chunked path.
 *
 * How: tests/reference/test_flash_tiling.py rewrites attention.cu slightly (the CUDA headers →
 * this file's definitions, `kernel<<<g, b, smem, stream>>>(args)` → emu_launch(...), the extern
 * shared array → the block's buffer) into attention_emu.inc and compiles this file with it.
 * Every CUDA thread of a block is a fiber (ucontext) with its own stack; fibers run one at a time
 * and switch only inside __syncthreads / __syncwarp / shuffles, so a missing barrier shows as a
 * wrong (or NaN) result deterministically, and a barrier not every thread reaches is reported as
 * a deadlock. Blocks run one after another. Shared memory starts as NaN bytes (0xFF) in every
 * block, like the garbage of a real GPU, so a read before a write poisons the result; it and every
 * workspace are allocated at their exact size, so the address sanitizer sees any overrun. WMMA
 * fragments hold the whole 16 × 16 tile in every lane (the kernels never touch fragment elements,
 * only load/store/fill/mma, whose results do not depend on the hardware's element placement);
 * loads and stores check the pointer alignment (256 bits) and leading dimensions (multiples of
 * 8 for bf16, 4 for fp32) that the hardware needs. What it cannot show: speed, occupancy, and
 * races that only real concurrency reveals (the fibers run in program order; the driver runs
 * every case twice, lanes in forward and in reverse order, and demands the same bits).
 *
 *   flash_emu B T nh nkv hd   → prints "err <what> <value>" lines (relative to dense fp64), "ok"
 *                               or "FAIL ..." lines, exit 0 / 1.
 *   FLASH_EMU_PATH=fused|chunked|fused>chunked|chunked>fused: one path, or one path's forward with
 *   the other's backward (default: fused, then chunked); FLASH_EMU_ORDERS=n: the first n of
 *   the four thread orders (default 4); LORANULL_CUDA_ATTN_CHUNK as in attention.cu. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <map>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

extern "C" {
#include "common/err.h"
}

/* ================================================================ device qualifiers, bf16 */

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))

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

static inline float emu_bf2f(__nv_bfloat16 b)
{
    uint32_t u = (uint32_t)b.x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float emu_bf2f(float f) { return f; }

static inline int min(int a, int b) { return a < b ? a : b; }

static void emu_die(const char *fmt, const char *a, long b = 0, long c = 0)
{
    printf("FAIL ");
    printf(fmt, a, b, c);
    printf("\n");
    fflush(stdout);
    exit(1);
}

/* ================================================================ fibers, barriers, shuffles */

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3_ {
    unsigned x, y, z;
};

struct emu_barrier {
    int count;
    unsigned gen;
};

struct emu_fiber {
    ucontext_t ctx;
    uint3_ tid;
    int done;
    emu_barrier *wbar; /* waiting in this barrier until its generation leaves wgen */
    unsigned wgen;
    std::vector<char> stack;
};

static std::vector<emu_fiber> g_fib;
static ucontext_t g_sched;
static emu_fiber *g_cur;
static uint3_ g_block, g_grid_dim;
static dim3 g_block_dim;
static const char *g_kernel = "";
#if EMU_ASAN
static void *g_asan_fake;
static const void *g_sched_stack; /* the scheduler's stack, as ASan learns it on a fiber's first entry */
static size_t g_sched_stack_size;
#endif

#define threadIdx (g_cur->tid)
#define blockIdx (g_block)
#define blockDim (g_block_dim)
#define gridDim (g_grid_dim)

static void emu_switch_to_sched()
{
#if EMU_ASAN
    __sanitizer_start_switch_fiber(g_cur->done ? NULL : &g_asan_fake, g_sched_stack, g_sched_stack_size);
#endif
    swapcontext(&g_cur->ctx, &g_sched);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(g_asan_fake, NULL, NULL);
#endif
}

static emu_barrier g_bar_block, g_bar_warp[32];
static float g_shfl[32][32];

static void emu_bar_wait(emu_barrier &b, int n)
{
    unsigned gen = b.gen;
    if (++b.count == n) {
        b.count = 0;
        b.gen++;
        return;
    }
    g_cur->wbar = &b;
    g_cur->wgen = gen;
    while (b.gen == gen) emu_switch_to_sched(); /* the scheduler resumes it once the barrier opens */
    g_cur->wbar = NULL;
}

static unsigned emu_flat_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

static void __syncthreads() { emu_bar_wait(g_bar_block, (int)(blockDim.x * blockDim.y * blockDim.z)); }

static void __syncwarp(unsigned mask = 0xffffffffu)
{
    if (mask != 0xffffffffu) emu_die("%s: __syncwarp with a partial mask is not emulated", g_kernel);
    emu_bar_wait(g_bar_warp[emu_flat_tid() / 32], 32);
}

static float __shfl_xor_sync(unsigned mask, float v, int lane_mask)
{
    if (mask != 0xffffffffu) emu_die("%s: a shuffle with a partial mask is not emulated", g_kernel);
    unsigned t = emu_flat_tid(), w = t / 32, l = t % 32;
    g_shfl[w][l] = v;
    __syncwarp();
    float r = g_shfl[w][(l ^ (unsigned)lane_mask) & 31];
    __syncwarp();
    return r;
}

/* ================================================================ WMMA on whole tiles */

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
    float v[16 * 16]; /* (row, col) of the tile this fragment holds, row-major */
};

static void check_ptr(const void *p, unsigned ldm, size_t elt, const char *what)
{
    if ((uintptr_t)p % 32) emu_die("%s: %s pointer not 256-bit aligned (offset %ld)", g_kernel, (long)((uintptr_t)p % 32));
    if ((ldm * elt) % 16) emu_die("%s: %s leading dimension %ld is not a multiple of 16 bytes", g_kernel, (long)ldm);
    (void)what;
}

template <class Use, class T, class Layout>
static void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout> &f, const T *p, unsigned ldm)
{
    check_ptr(p, ldm, sizeof(T), "load_matrix_sync");
    const bool col = std::is_same<Layout, col_major>::value;
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) f.v[r * 16 + c] = emu_bf2f(col ? p[r + (size_t)c * ldm] : p[(size_t)r * ldm + c]);
    __syncwarp(); /* collective: no lane stores over the tile before every lane has it */
}

static void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p, unsigned ldm, layout_t l)
{
    check_ptr(p, ldm, sizeof(float), "load_matrix_sync (accumulator)");
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++) f.v[r * 16 + c] = l == mem_col_major ? p[r + (size_t)c * ldm] : p[(size_t)r * ldm + c];
    __syncwarp();
}

static void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f, unsigned ldm, layout_t l)
{
    check_ptr(p, ldm, sizeof(float), "store_matrix_sync");
    /* each lane writes its share only (as the hardware does): a lane that reads the tile without
     * a __syncwarp after the store sees the other lanes' elements missing */
    for (int i = (int)(emu_flat_tid() % 32); i < 256; i += 32) {
        int r = i / 16, c = i % 16;
        (l == mem_col_major ? p[r + (size_t)c * ldm] : p[(size_t)r * ldm + c]) = f.v[i];
    }
}

template <class Use, class T, class Layout> static void fill_fragment(fragment<Use, 16, 16, 16, T, Layout> &f, float x)
{
    for (int i = 0; i < 256; i++) f.v[i] = x;
}

template <class T, class LA, class LB>
static void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, T, LA> &a,
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

/* ================================================================ runtime, cuBLAS, the backend's context */

typedef int cudaError_t;
typedef void *cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
static cudaError_t g_last_error;
static const char *cudaGetErrorString(cudaError_t e)
{
    return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "invalid configuration argument";
}
static cudaError_t cudaGetLastError()
{
    cudaError_t e = g_last_error;
    g_last_error = cudaSuccess;
    return e;
}
static cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t)
{
    memset(p, v, n);
    return cudaSuccess;
}
static std::map<const void *, int> g_smem_optin;
static const int SMEM_DEFAULT = 48 * 1024, SMEM_OPTIN_MAX = 227 * 1024; /* H100/H200 */
template <class F> static cudaError_t cudaFuncSetAttribute(F *fn, cudaFuncAttribute a, int v)
{
    if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 || v > SMEM_OPTIN_MAX) return cudaErrorInvalidValue;
    g_smem_optin[(const void *)fn] = v;
    return cudaSuccess;
}

typedef void *cublasHandle_t;
typedef int cublasStatus_t;
enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 };
typedef int cublasOperation_t;
enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
typedef int cudaDataType;
enum { CUDA_R_32F = 0 };
typedef int cublasComputeType_t;
enum { CUBLAS_COMPUTE_32F = 68 };
typedef int cublasGemmAlgo_t;
enum { CUBLAS_GEMM_DEFAULT = -1 };
typedef void *cusolverDnHandle_t;
typedef int cusolverStatus_t;

/* Column-major C = α op(A) op(B) + β C per batch, fp64 sums; the argument checks cuBLAS makes. */
static cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                                 int k, const void *alpha, const void *A, cudaDataType, int lda,
                                                 long long sA, const void *B, cudaDataType, int ldb, long long sB,
                                                 const void *beta, void *C, cudaDataType, int ldc, long long sC,
                                                 int batch, cublasComputeType_t, cublasGemmAlgo_t)
{
    if (m < 0 || n < 0 || k < 0 || batch < 0 || lda < (ta ? k : m) || lda < 1 || ldb < (tb ? n : k) || ldb < 1 ||
        ldc < m || ldc < 1)
        return CUBLAS_STATUS_INVALID_VALUE;
    float al = *(const float *)alpha, be = *(const float *)beta;
    for (int p = 0; p < batch; p++) {
        const float *a = (const float *)A + p * sA, *b = (const float *)B + p * sB;
        float *c = (float *)C + p * sC;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                double s = 0;
                for (int l = 0; l < k; l++)
                    s += (double)(ta ? a[l + (size_t)i * lda] : a[i + (size_t)l * lda]) *
                         (tb ? b[j + (size_t)l * ldb] : b[l + (size_t)j * ldb]);
                float *cij = c + i + (size_t)j * ldc;
                *cij = (float)(al * s + (be == 0.0f ? 0.0 : (double)be * *cij));
            }
    }
    return CUBLAS_STATUS_SUCCESS;
}

/* ================================================================ launches */

static unsigned char *g_smem;
static unsigned char *emu_smem() { return g_smem; }
static void (*g_body)(void *);
static void *g_body_arg;

static void emu_fiber_main()
{
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(NULL, &g_sched_stack, &g_sched_stack_size);
#endif
    g_body(g_body_arg);
    g_cur->done = 1;
    emu_switch_to_sched();
}

static void emu_resume(emu_fiber &f)
{
    g_cur = &f;
#if EMU_ASAN
    void *fake = NULL;
    __sanitizer_start_switch_fiber(&fake, f.stack.data(), f.stack.size());
#endif
    swapcontext(&g_sched, &f.ctx);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
}

static int emu_runnable(const emu_fiber &f) { return !f.done && (!f.wbar || f.wbar->gen != f.wgen); }

/* How the fibers of a block take turns: lanes in order (0), in reverse order (1), or (≥ 2) a
 * random warp at a time (seeded), each of its runnable lanes to its next barrier — warps then run
 * ahead of one another as they may on the hardware, which shows a missing __syncthreads. */
static int g_sched_mode;
static uint64_t g_rng = 1;

static void emu_run_block(unsigned nthreads)
{
    static const size_t STACK = 256 * 1024;
    if (g_fib.size() < nthreads) g_fib.resize(nthreads);
    for (unsigned i = 0; i < nthreads; i++) {
        emu_fiber &f = g_fib[i];
        if (f.stack.size() < STACK) f.stack.resize(STACK);
        f.tid = {i % g_block_dim.x, (i / g_block_dim.x) % g_block_dim.y, i / (g_block_dim.x * g_block_dim.y)};
        f.done = 0;
        f.wbar = NULL;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = NULL;
        makecontext(&f.ctx, emu_fiber_main, 0);
    }
    g_bar_block = {0, 0};
    for (auto &b : g_bar_warp) b = {0, 0};
    unsigned nwarps = (nthreads + 31) / 32;
    std::vector<unsigned> warps;
    for (;;) {
        int live = 0, ran = 0;
        for (unsigned i = 0; i < nthreads; i++) live += !g_fib[i].done;
        if (!live) break;
        if (g_sched_mode < 2) {
            for (unsigned k = 0; k < nthreads; k++) {
                emu_fiber &f = g_fib[g_sched_mode ? nthreads - 1 - k : k];
                if (emu_runnable(f)) {
                    emu_resume(f);
                    ran = 1;
                }
            }
        } else {
            warps.clear();
            for (unsigned w = 0; w < nwarps; w++)
                for (unsigned l = w * 32; l < nthreads && l < w * 32 + 32; l++)
                    if (emu_runnable(g_fib[l])) {
                        warps.push_back(w);
                        break;
                    }
            if (!warps.empty()) {
                g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
                unsigned w = warps[(g_rng >> 33) % warps.size()];
                for (unsigned l = w * 32; l < nthreads && l < w * 32 + 32; l++)
                    if (emu_runnable(g_fib[l])) {
                        emu_resume(g_fib[l]);
                        ran = 1;
                    }
            }
        }
        if (!ran)
            emu_die("%s: deadlock in block (%ld, %ld): a barrier that not every thread reaches", g_kernel, g_block.x, g_block.y);
    }
}

template <class K, class... A>
static void emu_launch(const char *name, K *kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, A... args)
{
    g_kernel = name;
    unsigned nthreads = block.x * block.y * block.z;
    auto it = g_smem_optin.find((const void *)kernel);
    size_t allowed = it != g_smem_optin.end() && it->second > SMEM_DEFAULT ? (size_t)it->second : (size_t)SMEM_DEFAULT;
    if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535 || smem > allowed) {
        printf("# launch of %s refused: grid (%u,%u,%u) block %u smem %zu (allowed %zu)\n", name, grid.x, grid.y, grid.z,
               nthreads, smem, allowed);
        g_last_error = smem > allowed ? cudaErrorInvalidValue : cudaErrorInvalidConfiguration;
        return;
    }
    auto call = [&]() { kernel(args...); };
    g_body = [](void *p) { (*(decltype(call) *)p)(); };
    g_body_arg = &call;
    g_block_dim = block;
    g_grid_dim = {grid.x, grid.y, grid.z};
    void *buf = NULL;
    if (smem && posix_memalign(&buf, 128, smem)) emu_die("%s: out of memory", name);
    g_smem = (unsigned char *)buf;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                g_block = {x, y, z};
                if (smem) memset(g_smem, 0xff, smem);
                emu_run_block(nthreads);
            }
    free(buf);
    g_smem = NULL;
}

/* ================================================================ the kernels, as written */

/* attention_emu.inc: worker/backend/cuda/cuda_check.h (the backend's context, workspace slots and
 * error macros, without the CUDA library headers), then attention.cu with its launches rewritten. */
#include "attention_emu.inc"

/* ================================================================ the backend's context */

struct lnb_cuda_ctx lnb_cuda_g;

const char *lnb_cublas_status_name(cublasStatus_t s) { return s ? "CUBLAS_STATUS_INVALID_VALUE" : "OK"; }

static int g_noted;
void lnb_cuda_note_error(const char *what, const char *detail, const char *file, int line)
{
    printf("FAIL noted CUDA error: %s: %s at %s:%d\n", what, detail, file, line);
    g_noted++;
}

static void *g_ws[WS_NSLOTS];
static size_t g_ws_size[WS_NSLOTS];
/* Exactly `bytes` (the real one rounds up: an overrun here is one there too), NaN-filled. */
void *lnb_cuda_workspace(int slot, size_t bytes)
{
    if (bytes <= g_ws_size[slot]) return g_ws[slot];
    free(g_ws[slot]);
    g_ws[slot] = malloc(bytes ? bytes : 1);
    memset(g_ws[slot], 0xff, bytes);
    g_ws_size[slot] = bytes;
    return g_ws[slot];
}
cublasComputeType_t lnb_cuda_compute_type(void) { return CUBLAS_COMPUTE_32F; }

/* ================================================================ the checks */

static float *alloc_filled(int64_t n, uint64_t seed, float scale)
{
    float *p = (float *)malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = scale * ((float)((seed >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f);
    }
    return p;
}

/* Dense causal GQA attention and its gradients in fp64. */
static void dense(int B, int T, int nh, int nkv, int hd, const float *q, const float *k, const float *v, const float *go,
                  double *out, double *lse, double *dq, double *dk, double *dv)
{
    int grp = nh / nkv;
    double sc = 1.0 / sqrt((double)hd);
    std::vector<double> P((size_t)T * T), dP((size_t)T * T);
    memset(dk, 0, sizeof(double) * B * T * nkv * hd);
    memset(dv, 0, sizeof(double) * B * T * nkv * hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++) {
            int g = h / grp;
            auto Q = [&](int t, int c) { return (double)q[(((int64_t)b * T + t) * nh + h) * hd + c]; };
            auto K = [&](int t, int c) { return (double)k[(((int64_t)b * T + t) * nkv + g) * hd + c]; };
            auto V = [&](int t, int c) { return (double)v[(((int64_t)b * T + t) * nkv + g) * hd + c]; };
            auto G = [&](int t, int c) { return (double)go[(((int64_t)b * T + t) * nh + h) * hd + c]; };
            for (int t = 0; t < T; t++) {
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= t; j++) {
                    double s = 0;
                    for (int c = 0; c < hd; c++) s += Q(t, c) * K(j, c);
                    P[(size_t)t * T + j] = s * sc;
                    mx = fmax(mx, s * sc);
                }
                for (int j = 0; j <= t; j++) sum += exp(P[(size_t)t * T + j] - mx);
                lse[((int64_t)b * nh + h) * T + t] = mx + log(sum);
                for (int j = 0; j <= t; j++) P[(size_t)t * T + j] = exp(P[(size_t)t * T + j] - mx) / sum;
                double Dt = 0;
                for (int j = 0; j <= t; j++) {
                    double s = 0;
                    for (int c = 0; c < hd; c++) s += G(t, c) * V(j, c);
                    dP[(size_t)t * T + j] = s;
                    Dt += s * P[(size_t)t * T + j];
                }
                for (int c = 0; c < hd; c++) {
                    double o = 0, a = 0;
                    for (int j = 0; j <= t; j++) {
                        o += P[(size_t)t * T + j] * V(j, c);
                        a += P[(size_t)t * T + j] * (dP[(size_t)t * T + j] - Dt) * K(j, c);
                    }
                    out[(((int64_t)b * T + t) * nh + h) * hd + c] = o;
                    dq[(((int64_t)b * T + t) * nh + h) * hd + c] = a * sc;
                }
                for (int j = 0; j <= t; j++) {
                    double ds = P[(size_t)t * T + j] * (dP[(size_t)t * T + j] - Dt);
                    for (int c = 0; c < hd; c++) {
                        dk[(((int64_t)b * T + j) * nkv + g) * hd + c] += ds * Q(t, c) * sc;
                        dv[(((int64_t)b * T + j) * nkv + g) * hd + c] += P[(size_t)t * T + j] * G(t, c);
                    }
                }
            }
        }
}

/* max |a − ref| / max |ref|; a NaN anywhere gives +inf */
static double rel(const float *a, const double *ref, int64_t n)
{
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]);
        if (!(d <= num)) num = isnan(d) ? INFINITY : d;
        den = fmax(den, fabs(ref[i]));
    }
    return num / (den > 1e-30 ? den : 1e-30);
}

static double abs_err(const float *a, const double *ref, int64_t n)
{
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]);
        if (!(d <= m)) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

struct result {
    std::vector<float> out, lse, dq, dk, dv;
};

static int g_fail;

static void take_path(const char *path, int hd)
{
    setenv("LORANULL_CUDA_ATTN", path, 1);
    const char *got = lnb_cuda_attention_path(hd);
    if (strcmp(got, path) != 0) {
        printf("FAIL path: asked for %s at hd %d, lnb_cuda_attention_path says %s\n", path, hd, got);
        g_fail++;
    }
}

/* The forward by path fwd, the backward by path bwd (the same but for the LSE contract check). */
static void run(const char *fwd, const char *bwd, int B, int T, int nh, int nkv, int hd, const float *q, const float *k,
                const float *v, const float *go, result &r)
{
    int64_t nq = (int64_t)B * T * nh * hd, nk = (int64_t)B * T * nkv * hd, nl = (int64_t)B * nh * T;
    /* outputs start as NaN: whatever a path leaves unwritten shows */
    r.out.assign(nq, NAN);
    r.lse.assign(nl, NAN);
    r.dq.assign(nq, NAN);
    r.dk.assign(nk, NAN);
    r.dv.assign(nk, NAN);
    take_path(fwd, hd);
    lnb_cuda_attention_forward(r.out.data(), r.lse.data(), q, k, v, B, T, nh, nkv, hd);
    take_path(bwd, hd);
    lnb_cuda_attention_backward(r.dq.data(), r.dk.data(), r.dv.data(), NULL, go, r.lse.data(), q, k, v, B, T, nh, nkv, hd);
    unsetenv("LORANULL_CUDA_ATTN");
}

static void check(const char *what, double err, double tol)
{
    int ok = err <= tol;
    printf("%s err %s %.3e (tol %.1e)\n", ok ? "ok  " : "FAIL", what, err, tol);
    if (!ok) g_fail++;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: flash_emu B T nh nkv hd\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int B = atoi(argv[1]), T = atoi(argv[2]), nh = atoi(argv[3]), nkv = atoi(argv[4]), hd = atoi(argv[5]);
    lnb_cuda_g.sm = 90;
    lnb_cuda_g.smem_optin = SMEM_OPTIN_MAX;
    lnb_cuda_g.math = 0; /* bf16 */
    int64_t nq = (int64_t)B * T * nh * hd, nk = (int64_t)B * T * nkv * hd, nl = (int64_t)B * nh * T;
    uint64_t s = (uint64_t)T * 131 + hd * 7 + nkv;
    float *q = alloc_filled(nq, s + 1, 1.5f), *k = alloc_filled(nk, s + 2, 1.0f), *v = alloc_filled(nk, s + 3, 1.0f),
          *go = alloc_filled(nq, s + 4, 1.0f);
    std::vector<double> out(nq), lse(nl), dq(nq), dk(nk), dv(nk);
    dense(B, T, nh, nkv, hd, q, k, v, go, out.data(), lse.data(), dq.data(), dk.data(), dv.data());

    /* fused, chunked, and each forward with the other's backward (both keep the natural-log LSE) */
    const char *paths[4] = {"fused", "chunked", "fused>chunked", "chunked>fused"}, *only = getenv("FLASH_EMU_PATH");
    for (int p = 0; p < 4; p++) {
        if (only ? strcmp(only, paths[p]) != 0 : p >= 2) continue;
        char fwd[16], bwd[16];
        snprintf(fwd, sizeof fwd, "%s", p < 2 ? paths[p] : p == 2 ? "fused" : "chunked");
        snprintf(bwd, sizeof bwd, "%s", p < 2 ? paths[p] : p == 2 ? "chunked" : "fused");
        result r, rr;
        g_sched_mode = 0;
        run(fwd, bwd, B, T, nh, nkv, hd, q, k, v, go, r);
        /* fused: bf16 tensor-core operands (tolerances of test_flash_tiling.py's bf16 emulation);
         * chunked: fp32 with fp64 sums here */
        double tol = p == 1 ? 1e-5 : 2e-2;
        char name[64];
#define CHK(f, n, t)                                                        \
    snprintf(name, sizeof name, "%s %s", paths[p], #f);                     \
    check(name, rel(r.f.data(), f.data(), n), t)
        CHK(out, nq, tol);
        CHK(dq, nq, 1.5 * tol);
        CHK(dk, nk, 1.5 * tol);
        CHK(dv, nk, 1.5 * tol);
#undef CHK
        snprintf(name, sizeof name, "%s lse(abs)", paths[p]);
        check(name, abs_err(r.lse.data(), lse.data(), nl), 1.5 * tol);
        /* the same bits whatever the order the threads take turns in (a race changes them) */
        static const char *order[4] = {"", "lanes in reverse order", "warps at random (seed 1)", "warps at random (seed 2)"};
        const char *orders = getenv("FLASH_EMU_ORDERS"); /* 1: the first order only (the ASan run) */
        int norders = orders && atoi(orders) >= 1 && atoi(orders) <= 4 ? atoi(orders) : 4;
        for (int mode = 1; mode < norders; mode++) {
            g_sched_mode = mode;
            g_rng = (uint64_t)mode;
            run(fwd, bwd, B, T, nh, nkv, hd, q, k, v, go, rr);
            int same = memcmp(r.out.data(), rr.out.data(), nq * 4) == 0 &&
                       memcmp(r.lse.data(), rr.lse.data(), nl * 4) == 0 && memcmp(r.dq.data(), rr.dq.data(), nq * 4) == 0 &&
                       memcmp(r.dk.data(), rr.dk.data(), nk * 4) == 0 && memcmp(r.dv.data(), rr.dv.data(), nk * 4) == 0;
            printf("%s %s: same bits with the %s\n", same ? "ok  " : "FAIL", paths[p], order[mode]);
            if (!same) g_fail++;
        }
    }
    if (g_noted) g_fail++;
    free(q);
    free(k);
    free(v);
    free(go);
    for (int i = 0; i < WS_NSLOTS; i++) free(g_ws[i]);
    printf("%s flash_emu B%d T%d nh%d nkv%d hd%d\n", g_fail ? "FAIL" : "PASS", B, T, nh, nkv, hd);
    return g_fail ? 1 : 0;
}
