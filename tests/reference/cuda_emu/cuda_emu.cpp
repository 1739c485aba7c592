/* cuda_emu.cpp — the implementation behind cuda_emu.h: one emulated device (an H200's limits),
 * memory, streams and events, the fiber scheduler that runs kernels, cuBLAS and cuSOLVER.
 *
 * Semantics kept from CUDA, because a shim that is more forgiving than the hardware would let a
 * test pass that fails on a GPU:
 *  - cudaMalloc / cudaMallocManaged memory is not cleared (documented): it starts as NaN bytes
 *    (0xFF), 256-byte aligned. Managed memory: malloc'd at exactly the size asked (ASan sees an
 *    overrun). Device-only (cudaMalloc) memory: the same under ASan; otherwise pages of its own
 *    ending within 255 bytes of the data, then a guard page, inaccessible to host code except while
 *    device work runs — a host dereference of a device pointer (a crash on a GPU) or an overrun
 *    fails naming the allocation.
 *  - Work on a stream (kernels, async copies and memsets, cuBLAS, cuSOLVER's gesvd) is queued and
 *    runs only when something waits for that stream: cudaStreamSynchronize, cudaDeviceSynchronize,
 *    cudaEventSynchronize, cudaFree (an implicit device synchronisation), a copy to or from pageable
 *    host memory (CUDA makes those synchronous), cudaMemcpy (the legacy default stream, which does
 *    not wait for non-blocking streams), syevdx (it writes a host count). Host code that reads a
 *    result before waiting reads what was there before, as on a GPU.
 *  - Every pointer a kernel receives, and every range a copy, memset, cuBLAS or cuSOLVER call
 *    touches, must lie in a live device or managed allocation: anything else is an illegal address
 *    on the device, reported here as a FAIL naming the kernel or call (exit 3).
 *  - Launch limits: ≤ 1024 threads a block, grid y, z ≤ 65535, dynamic shared memory ≤ 48 KiB
 *    unless opted in with cudaFuncSetAttribute (≤ 227 KiB); static shared memory counts too.
 *  - Kernels: each CUDA thread is a fiber with its own stack (a register switch in user space on
 *    x86-64 — ucontext's signal-mask system calls made the barrier-heavy kernels 10× slower —,
 *    ucontext elsewhere), switching only inside __syncthreads / __syncwarp / shuffles / WMMA
 *    (straight from one fiber to the next in orders 0 and 1); a barrier some thread never reaches
 *    is a reported deadlock; shared memory (static and dynamic) is NaN bytes at the start of every block. Kernels
 *    in which emu_build.py finds no barrier run their threads as plain calls (fast), and fail
 *    loudly should one reach a barrier. Blocks run one after another, in the order CUDA_EMU_ORDER
 *    says (0 in order, 1 reversed, n ≥ 2 shuffled by seed n, warps then also running ahead of one
 *    another): a result that depends on the order of blocks or warps shows as a difference between
 *    runs in two orders.
 *  - cuBLAS: argument checks as the library makes them (sizes, leading dimensions, type and compute
 *    type pairs: CUBLAS_STATUS_INVALID_VALUE / NOT_SUPPORTED), bf16 operands exact, fp32 operands
 *    rounded to bf16 (COMPUTE_32F_FAST_16BF) or tf32 (FAST_TF32) as the tensor cores take them,
 *    fp32 accumulation by fused multiply-adds in eight interleaved partial sums (fp64 for the D
 *    routines); β = 0 never reads C.
 *  - cuSOLVER: syevdx (range by index) and gesvd (m ≥ n only, as cuSOLVER) over LAPACKE; lwork and
 *    the workspace checked against what the bufferSize query said; the eigen/SVD input is left NaN
 *    where the library leaves it undefined.
 *  - CUDA_EMU_ASYNC=1 (async mode, outside ASan): managed memory gets pages of its own too, and
 *    they are inaccessible to host code while any stream has work queued and none runs: host code
 *    that reads or writes a tensor before waiting for the kernels that use it (a race on a GPU,
 *    or stale data) faults at once; the FAIL names the allocation, how much work was queued and
 *    the last call queued, with the host backtrace, and aborts. Stricter than a GPU with concurrent
 *    managed access, where touching a tensor no queued work uses is harmless: any touch counts.
 * Not emulated: speed, occupancy, true concurrency (lanes of a warp and warps of a block interleave
 * only at barriers; blocks one after another), the exact bits of the GPU's math functions (the
 * host libm's expf etc. instead; nvcc's FMA contraction is mirrored with -ffp-contract=fast),
 * atomics, several devices, NCCL; and, under ASan, the guard on device-only memory. */
#include "cuda_emu.h"

#include <lapacke.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <execinfo.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <ucontext.h>

#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

static std::recursive_mutex g_mu; /* one caller in the emulator at a time (the engine calls from several threads) */
#define LOCK std::lock_guard<std::recursive_mutex> lock_(g_mu)

static const char *g_kernel = "(host)";
const char *emu_kernel_name(void) { return g_kernel; }

void emu_fail(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("FAIL cuda_emu: %s\n", msg);
    fflush(stdout);
    fprintf(stderr, "FAIL cuda_emu: %s\n", msg);
    exit(3);
}

/* ================================================================ the device */

static const size_t EMU_TOTAL = (size_t)140 << 30; /* an H200's 140 GiB */
static const int SMEM_DEFAULT = 48 * 1024, SMEM_OPTIN_MAX = 227 * 1024;
static thread_local int t_device = 0;
static cudaError_t g_last_error = cudaSuccess;

static cudaError_t set_err(cudaError_t e)
{
    if (e != cudaSuccess) g_last_error = e;
    return e;
}

extern "C" cudaError_t cudaGetDeviceCount(int *n)
{
    *n = 1;
    return cudaSuccess;
}
extern "C" cudaError_t cudaSetDevice(int dev)
{
    if (dev != 0) return set_err(cudaErrorInvalidDevice);
    t_device = dev;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGetDevice(int *dev)
{
    *dev = t_device;
    return cudaSuccess;
}
extern "C" cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int dev)
{
    if (dev != 0) return set_err(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "NVIDIA H200 (host emulation, tests/reference/cuda_emu)");
    p->totalGlobalMem = EMU_TOTAL;
    p->sharedMemPerBlock = SMEM_DEFAULT;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024, p->maxThreadsDim[1] = 1024, p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 0x7fffffff, p->maxGridSize[1] = 65535, p->maxGridSize[2] = 65535;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    p->managedMemory = 1;
    p->concurrentManagedAccess = 1;
    p->sharedMemPerBlockOptin = SMEM_OPTIN_MAX;
    return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int dev)
{
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, dev)) return cudaErrorInvalidDevice;
    switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = (int)p.sharedMemPerBlock; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = p.multiProcessorCount; break;
    case cudaDevAttrComputeCapabilityMajor: *v = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *v = p.minor; break;
    case cudaDevAttrManagedMemory: *v = 1; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = (int)p.sharedMemPerBlockOptin; break;
    default: emu_fail("cudaDeviceGetAttribute: attribute %d is not emulated", (int)a);
    }
    return cudaSuccess;
}

static const char *err_name(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    }
    return "unknown cudaError_t";
}
extern "C" const char *cudaGetErrorName(cudaError_t e) { return err_name(e); }
extern "C" const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    }
    return "unrecognized error code";
}
extern "C" cudaError_t cudaGetLastError(void)
{
    LOCK;
    cudaError_t e = g_last_error;
    g_last_error = cudaSuccess;
    return e;
}
extern "C" cudaError_t cudaPeekAtLastError(void) { return g_last_error; }

/* ================================================================ memory */

struct emu_alloc {
    size_t n;
    int managed;
    char *map;    /* device-only (and, in async mode, managed) memory outside ASan: its pages (then a
                   * guard page), else NULL */
    size_t map_n; /* the pages holding the data */
};
static std::map<uintptr_t, emu_alloc> g_allocs;
static size_t g_bytes;

/* The allocation holding [p, p + n) (n = 0: p may be one past the end), or NULL. */
static const emu_alloc *find_alloc(const void *p, size_t n, uintptr_t *base = NULL)
{
    uintptr_t a = (uintptr_t)p;
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return NULL;
    --it;
    if (a < it->first || a > it->first + it->second.n) return NULL;
    if (n > it->first + it->second.n - a) return NULL;
    if (base) *base = it->first;
    return &it->second;
}

/* what: the call; a range that is not device memory is an illegal address on the GPU. */
static void need_device(const char *what, const char *operand, const void *p, size_t n)
{
    if (n == 0) return;
    if (!find_alloc(p, n)) {
        const emu_alloc *a = find_alloc(p, 0);
        if (a) emu_fail("%s: %s: %zu bytes at %p run past the end of its %zu-byte device allocation", what, operand, n, p, a->n);
        emu_fail("%s: %s (%p, %zu bytes) is not device or managed memory (an illegal address on a GPU)", what, operand, p, n);
    }
}

/* ---- device-only memory: the host may not touch it ----
 * Outside ASan a cudaMalloc allocation has pages of its own, ending 0-255 bytes after the data
 * (CUDA's 256-byte alignment), then a guard page; its pages are inaccessible except while device
 * work runs (a kernel, a copy, a library call), so host code that dereferences a device pointer —
 * a crash on a GPU — stops here with a FAIL naming the allocation, and so does an access past its
 * pages. Under ASan, malloc at the exact size instead (ASan then sees overruns to the byte). */
static int g_device_open; /* device work running (nesting) */
static const size_t PAGE = 4096;

/* Async mode (CUDA_EMU_ASYNC=1): managed memory is closed to the host too, while work is queued. */
static int g_async = -1;        /* decided at the first allocation */
static int g_managed_closed;    /* the managed allocations are inaccessible now */
static size_t g_queued;         /* work queued over every stream, not yet run */
static const char *g_last_queued = "";

static void protect_all(int prot)
{
    for (auto &kv : g_allocs)
        if (kv.second.map && !kv.second.managed && mprotect(kv.second.map, kv.second.map_n, prot))
            emu_fail("mprotect failed");
}
static void close_managed(int closed)
{
    if (closed == g_managed_closed) return;
    for (auto &kv : g_allocs)
        if (kv.second.map && kv.second.managed &&
            mprotect(kv.second.map, kv.second.map_n, closed ? PROT_NONE : PROT_READ | PROT_WRITE))
            emu_fail("async mode: mprotect failed");
    g_managed_closed = closed;
}
static void device_open(void)
{
    if (g_device_open++ == 0) {
        protect_all(PROT_READ | PROT_WRITE);
        close_managed(0);
    }
}
static void device_close(void)
{
    if (--g_device_open == 0) {
        protect_all(PROT_NONE);
        if (g_async > 0 && g_queued) close_managed(1); /* another stream's work is still queued */
    }
}

/* A host access to closed managed memory: what, where, and the host's backtrace; then abort. */
static void async_fault(uintptr_t a, uintptr_t base, const emu_alloc &al)
{
    char msg[640];
    int len = snprintf(msg, sizeof msg,
                       "FAIL cuda_emu: host code touched device memory with work queued: %p is byte %zu of a "
                       "%zu-byte managed allocation at %p, while %zu calls were queued (the last %s) — the host "
                       "read or wrote a tensor before waiting for the device (a race with the kernels on a GPU). "
                       "Host backtrace (a frame without a name: addr2line -f -e EXE OFFSET):\n",
                       (void *)a, (size_t)(a - base), al.n, (void *)base, g_queued, g_last_queued);
    if (write(2, msg, (size_t)len) == len) {
        void *frames[64];
        backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
    }
    signal(SIGABRT, SIG_DFL);
    abort();
}

static int async_mode(void)
{
    if (g_async < 0) {
        const char *v = getenv("CUDA_EMU_ASYNC");
        g_async = v && *v && strcmp(v, "0") != 0;
        if (g_async && EMU_ASAN) emu_fail("CUDA_EMU_ASYNC=1 needs the emulation built without ASan");
        if (g_async) printf("# cuda_emu: async mode: managed memory is closed to the host while work is queued\n");
    }
    return g_async;
}

static void on_segv(int sig, siginfo_t *si, void *)
{
    uintptr_t a = (uintptr_t)si->si_addr;
    for (auto &kv : g_allocs) {
        const emu_alloc &al = kv.second;
        if (!al.map || a < (uintptr_t)al.map || a >= (uintptr_t)al.map + al.map_n + PAGE) continue;
        if (al.managed && a < (uintptr_t)al.map + al.map_n) async_fault(a, kv.first, al);
        emu_fail("host code touched %s memory at %p (%s a %zu-byte %s allocation at %p): an invalid access on a GPU",
                 al.managed ? "managed" : "device-only", si->si_addr, a < kv.first + al.n ? "inside" : "past the end of",
                 al.n, al.managed ? "cudaMallocManaged" : "cudaMalloc", (void *)kv.first);
    }
    signal(sig, SIG_DFL); /* not ours: the access faults again, as it would have */
}

static cudaError_t do_alloc(void **p, size_t n, int managed)
{
    LOCK;
    *p = NULL;
    if (n == 0) return cudaSuccess; /* CUDA: a zero-size request gives NULL and success */
    if (n > EMU_TOTAL - g_bytes) return set_err(cudaErrorMemoryAllocation);
    void *q = NULL;
    emu_alloc al = {n, managed, NULL, 0};
    if ((!managed || async_mode()) && !EMU_ASAN) {
        static int handler;
        if (!handler++) {
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_sigaction = on_segv;
            sa.sa_flags = SA_SIGINFO;
            sigaction(SIGSEGV, &sa, NULL);
        }
        al.map_n = (n + PAGE - 1) / PAGE * PAGE;
        void *m = mmap(NULL, al.map_n + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return set_err(cudaErrorMemoryAllocation);
        al.map = (char *)m;
        q = al.map + al.map_n - (n + 255) / 256 * 256;
        mprotect(al.map + al.map_n, PAGE, PROT_NONE); /* the guard page */
    } else if (posix_memalign(&q, 256, n))
        return set_err(cudaErrorMemoryAllocation);
    memset(q, 0xff, n); /* not cleared on a GPU: NaN bytes here */
    if (al.map && !g_device_open && (!managed || g_managed_closed)) mprotect(al.map, al.map_n, PROT_NONE);
    g_allocs[(uintptr_t)q] = al;
    g_bytes += n;
    *p = q;
    return cudaSuccess;
}
extern "C" cudaError_t cudaMalloc(void **p, size_t n) { return do_alloc(p, n, 0); }
extern "C" cudaError_t cudaMallocManaged(void **p, size_t n, unsigned flags)
{
    if (flags != cudaMemAttachGlobal) emu_fail("cudaMallocManaged: flags %u are not emulated", flags);
    return do_alloc(p, n, 1);
}

static void flush_all(void);

extern "C" cudaError_t cudaFree(void *p)
{
    LOCK;
    if (!p) return cudaSuccess;
    flush_all(); /* cudaFree synchronises the device */
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end()) return set_err(cudaErrorInvalidValue);
    g_bytes -= it->second.n;
    if (it->second.map) munmap(it->second.map, it->second.map_n + PAGE);
    else free(p);
    g_allocs.erase(it);
    return cudaSuccess;
}

extern "C" cudaError_t cudaMemGetInfo(size_t *fr, size_t *tot)
{
    LOCK;
    *fr = EMU_TOTAL - g_bytes;
    *tot = EMU_TOTAL;
    return cudaSuccess;
}

extern "C" cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *a, const void *p)
{
    LOCK;
    memset(a, 0, sizeof *a);
    uintptr_t base = 0;
    const emu_alloc *al = p ? find_alloc(p, 0, &base) : NULL;
    if (al && (uintptr_t)p < base + al->n) {
        a->type = al->managed ? cudaMemoryTypeManaged : cudaMemoryTypeDevice;
        a->devicePointer = (void *)p;
        a->hostPointer = al->managed ? (void *)p : NULL;
    } else {
        a->type = cudaMemoryTypeUnregistered; /* CUDA 11+: success for a host pointer */
        a->device = -2;
    }
    return cudaSuccess;
}

/* ================================================================ streams, events, the queue */

struct emu_stream {
    unsigned flags;
    std::deque<std::function<void()>> q;
};
static emu_stream g_legacy = {0, {}};
static std::set<emu_stream *> g_streams;

static emu_stream *stream_of(cudaStream_t s, const char *what)
{
    if (!s) return &g_legacy;
    if (!g_streams.count(s)) emu_fail("%s: stream %p was never created or is destroyed", what, (void *)s);
    return s;
}

static void flush(emu_stream *s)
{
    if (s->q.empty()) return;
    device_open();
    while (!s->q.empty()) {
        std::function<void()> f = std::move(s->q.front());
        s->q.pop_front();
        g_queued--;
        f();
    }
    device_close();
}
/* A copy or memset the host performs for the device, now. */
static void device_now(void *dst, const void *src, int v, size_t n)
{
    device_open();
    if (src) memcpy(dst, src, n);
    else memset(dst, v, n);
    device_close();
}
static void flush_all(void)
{
    flush(&g_legacy);
    for (emu_stream *s : g_streams) flush(s);
}
/* What the legacy default stream waits for: itself and every blocking stream. */
static void flush_legacy(void)
{
    flush(&g_legacy);
    for (emu_stream *s : g_streams)
        if (!(s->flags & cudaStreamNonBlocking)) flush(s);
}

extern "C" cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    LOCK;
    *s = new emu_stream{flags, {}};
    g_streams.insert(*s);
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
extern "C" cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    LOCK;
    if (!s || !g_streams.count(s)) return set_err(cudaErrorInvalidResourceHandle);
    flush(s); /* its work completes */
    g_streams.erase(s);
    delete s;
    return cudaSuccess;
}
extern "C" cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    LOCK;
    emu_stream *st = stream_of(s, "cudaStreamSynchronize");
    if (st == &g_legacy) flush_legacy();
    else flush(st);
    return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceSynchronize(void)
{
    LOCK;
    flush_all();
    return cudaSuccess;
}

static void enqueue(cudaStream_t s, const char *what, std::function<void()> f)
{
    emu_stream *st = stream_of(s, what);
    st->q.push_back(std::move(f));
    g_queued++;
    g_last_queued = what;
    if (g_async > 0 && !g_device_open) close_managed(1);
    /* the legacy stream waits for blocking streams' earlier work: run that first */
    if (st == &g_legacy)
        for (emu_stream *o : g_streams)
            if (!(o->flags & cudaStreamNonBlocking) && !o->q.empty()) flush(o);
}

struct emu_event {
    int recorded, done;
    double t;
    emu_stream *on;
};
static std::set<emu_event *> g_events;
static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}
extern "C" cudaError_t cudaEventCreate(cudaEvent_t *e)
{
    LOCK;
    *e = new emu_event{0, 0, 0.0, NULL};
    g_events.insert(*e);
    return cudaSuccess;
}
extern "C" cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    LOCK;
    if (!g_events.count(e)) return set_err(cudaErrorInvalidResourceHandle);
    if (e->on && e->recorded && !e->done) flush(e->on);
    g_events.erase(e);
    delete e;
    return cudaSuccess;
}
extern "C" cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    LOCK;
    if (!g_events.count(e)) return set_err(cudaErrorInvalidResourceHandle);
    e->recorded = 1;
    e->done = 0;
    e->on = stream_of(s, "cudaEventRecord");
    enqueue(s, "cudaEventRecord", [e]() {
        e->t = now_ms();
        e->done = 1;
    });
    return cudaSuccess;
}
extern "C" cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    LOCK;
    if (!g_events.count(e)) return set_err(cudaErrorInvalidResourceHandle);
    if (e->recorded && !e->done) flush(e->on);
    return cudaSuccess;
}
extern "C" cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b)
{
    LOCK;
    if (!g_events.count(a) || !g_events.count(b)) return set_err(cudaErrorInvalidResourceHandle);
    if (!a->done || !b->done) return set_err(cudaErrorNotReady);
    *ms = (float)(b->t - a->t);
    return cudaSuccess;
}

/* ================================================================ copies and memsets */

static int is_device_only(const void *p)
{
    const emu_alloc *a = find_alloc(p, 0);
    return a && !a->managed;
}

/* Checks the ranges against the kind; 1 when either side is pageable host memory (a synchronous copy). */
static int check_copy(const char *what, void *dst, const void *src, size_t n, enum cudaMemcpyKind kind)
{
    int dd = find_alloc(dst, 0) != NULL, sd = find_alloc(src, 0) != NULL;
    switch (kind) {
    case cudaMemcpyHostToDevice:
        need_device(what, "the destination", dst, n);
        if (is_device_only(src)) emu_fail("%s: HostToDevice from device memory %p", what, src);
        break;
    case cudaMemcpyDeviceToHost:
        need_device(what, "the source", src, n);
        if (is_device_only(dst)) emu_fail("%s: DeviceToHost into device memory %p", what, (void *)dst);
        break;
    case cudaMemcpyDeviceToDevice:
        need_device(what, "the source", src, n);
        need_device(what, "the destination", dst, n);
        break;
    case cudaMemcpyHostToHost:
        if (is_device_only(src) || is_device_only(dst)) emu_fail("%s: HostToHost with device memory", what);
        break;
    case cudaMemcpyDefault:
        if (sd) need_device(what, "the source", src, n);
        if (dd) need_device(what, "the destination", dst, n);
        break;
    default: emu_fail("%s: copy kind %d", what, (int)kind);
    }
    if ((char *)dst < (const char *)src + n && (const char *)src < (char *)dst + n && n)
        emu_fail("%s: overlapping source and destination", what);
    return !dd || !sd;
}

extern "C" cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind, cudaStream_t s)
{
    LOCK;
    if (!n) return cudaSuccess;
    if (check_copy("cudaMemcpyAsync", dst, src, n, kind)) {
        /* pageable host memory: CUDA copies it before returning, after the stream's earlier work */
        emu_stream *st = stream_of(s, "cudaMemcpyAsync");
        if (st == &g_legacy) flush_legacy();
        else flush(st);
        device_now(dst, src, 0, n);
        return cudaSuccess;
    }
    enqueue(s, "cudaMemcpyAsync", [=]() { memcpy(dst, src, n); });
    return cudaSuccess;
}
extern "C" cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind)
{
    LOCK;
    if (!n) return cudaSuccess;
    check_copy("cudaMemcpy", dst, src, n, kind);
    flush_legacy();
    device_now(dst, src, 0, n);
    return cudaSuccess;
}
extern "C" cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s)
{
    LOCK;
    need_device("cudaMemsetAsync", "the destination", p, n);
    if (n) enqueue(s, "cudaMemsetAsync", [=]() { memset(p, v, n); });
    return cudaSuccess;
}
extern "C" cudaError_t cudaMemset(void *p, int v, size_t n)
{
    LOCK;
    need_device("cudaMemset", "the destination", p, n);
    flush_legacy();
    device_now(p, NULL, v, n);
    return cudaSuccess;
}

/* ================================================================ kernels: fibers */

uint3 *emu_tid;
uint3 emu_block_idx, emu_grid_dim;
dim3 emu_block_dim;

/* ---- context switches ---- */
#if defined(__x86_64__)
/* Saves the callee-saved general registers on the current stack, stores the stack pointer in *save
 * and continues on the stack `to` (saved the same way). MXCSR and the x87 control word are not
 * switched: no kernel changes them. */
extern "C" void emu_ctx_switch(void **save, void *to);
asm(".text\n.globl emu_ctx_switch\n.type emu_ctx_switch,@function\nemu_ctx_switch:\n"
    "pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\n"
    "movq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
    "popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n"
    ".size emu_ctx_switch, .-emu_ctx_switch\n");
struct emu_ctx {
    void *sp;
};
static void ctx_switch(emu_ctx *save, emu_ctx *to) { emu_ctx_switch(&save->sp, to->sp); }
/* A fresh context that starts in entry() on the stack [stack, stack + size). */
static void ctx_make(emu_ctx *c, char *stack, size_t size, void (*entry)(void))
{
    uintptr_t top = ((uintptr_t)(stack + size) & ~(uintptr_t)15) - 16; /* entry then sees rsp ≡ 8 (mod 16), as after a call */
    uint64_t *sp = (uint64_t *)top;
    sp[1] = 0;                    /* entry never returns */
    sp[0] = (uint64_t)(uintptr_t)entry;
    sp -= 6;                      /* rbp rbx r12 r13 r14 r15 */
    memset(sp, 0, 6 * sizeof *sp);
    c->sp = sp;
}
#else
struct emu_ctx {
    ucontext_t uc;
};
static void ctx_switch(emu_ctx *save, emu_ctx *to) { swapcontext(&save->uc, &to->uc); }
static void ctx_make(emu_ctx *c, char *stack, size_t size, void (*entry)(void))
{
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = NULL;
    makecontext(&c->uc, entry, 0);
}
#endif

struct emu_barrier {
    int count;
    unsigned gen;
};
struct emu_fiber {
    emu_ctx ctx;
    uint3 tid;
    int done;
    emu_barrier *wbar; /* waiting in this barrier until its generation leaves wgen */
    unsigned wgen;
    char *stack;
};

static const size_t STACK = 256 * 1024;
static std::vector<emu_fiber> g_fib;
static emu_ctx g_sched;
static emu_fiber *g_cur;
static int g_plain;          /* the running kernel's threads are plain calls */
static unsigned g_nthreads;
static uint64_t g_waits; /* barrier waits that suspended a fiber (CUDA_EMU_STATS) */
static emu_barrier g_bar_block, g_bar_warp[32];
static uint64_t g_shfl[2][32][32];
static const std::function<void()> *g_body;
#if EMU_ASAN
static void *g_asan_fake;
static const void *g_sched_stack;
static size_t g_sched_stack_size;
#endif

static int g_order = -1;
static uint64_t g_rng = 1;
void emu_set_order(int mode)
{
    g_order = mode;
    g_rng = (uint64_t)mode;
}
static int order(void)
{
    if (g_order < 0) {
        const char *o = getenv("CUDA_EMU_ORDER");
        emu_set_order(o ? atoi(o) : 0);
    }
    return g_order;
}
static unsigned rnd(unsigned n)
{
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (unsigned)((g_rng >> 33) % n);
}

unsigned emu_flat_tid(void) { return emu_tid->x + emu_block_dim.x * (emu_tid->y + emu_block_dim.y * emu_tid->z); }

static int runnable(const emu_fiber &f) { return !f.done && (!f.wbar || f.wbar->gen != f.wgen); }

/* The running fiber is blocked or done: in the orders 0 and 1 (without ASan, whose fiber
 * annotations want the scheduler in between) straight on to the next runnable fiber in that
 * order — half the switches of going through the scheduler —, else back to the scheduler (which
 * also sees a block finish or deadlock). */
static void switch_to_sched(void)
{
#if !EMU_ASAN
    if (g_order < 2) {
        unsigned n = g_nthreads, j = (unsigned)(g_cur - g_fib.data());
        for (unsigned k = 1; k < n; k++) {
            j = g_order == 0 ? (j + 1 == n ? 0 : j + 1) : (j == 0 ? n - 1 : j - 1);
            if (runnable(g_fib[j])) {
                emu_fiber *from = g_cur;
                g_cur = &g_fib[j];
                emu_tid = &g_cur->tid;
                ctx_switch(&from->ctx, &g_cur->ctx);
                return;
            }
        }
    }
#endif
#if EMU_ASAN
    __sanitizer_start_switch_fiber(g_cur->done ? NULL : &g_asan_fake, g_sched_stack, g_sched_stack_size);
#endif
    ctx_switch(&g_cur->ctx, &g_sched);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(g_asan_fake, NULL, NULL);
#endif
}

static void bar_wait(emu_barrier &b, int n, const char *what)
{
    if (g_plain)
        emu_fail("%s: reached %s, but emu_build.py judged the kernel barrier-free (its threads ran as plain calls)",
                 g_kernel, what);
    unsigned gen = b.gen;
    if (++b.count == n) {
        b.count = 0;
        b.gen++;
        return;
    }
    g_waits++;
    g_cur->wbar = &b;
    g_cur->wgen = gen;
    while (b.gen == gen) switch_to_sched(); /* the scheduler resumes it once the barrier opens */
    g_cur->wbar = NULL;
}

static int warp_lanes(unsigned w) { return (int)(g_nthreads - w * 32 < 32 ? g_nthreads - w * 32 : 32); }

void __syncthreads(void) { bar_wait(g_bar_block, (int)g_nthreads, "__syncthreads"); }

void __syncwarp(unsigned mask)
{
    if (mask != 0xffffffffu) emu_fail("%s: __syncwarp with a partial mask is not emulated", g_kernel);
    unsigned w = emu_flat_tid() / 32;
    bar_wait(g_bar_warp[w], warp_lanes(w), "__syncwarp");
}

uint64_t emu_shfl_xor(unsigned mask, uint64_t v, int lane_mask)
{
    if (mask != 0xffffffffu) emu_fail("%s: a shuffle with a partial mask is not emulated", g_kernel);
    unsigned t = emu_flat_tid(), w = t / 32, l = t % 32, src = (l ^ (unsigned)lane_mask) & 31;
    if ((int)src >= warp_lanes(w)) emu_fail("%s: a shuffle reads lane %u of a %d-lane warp", g_kernel, src, warp_lanes(w));
    if (g_plain) bar_wait(g_bar_block, 0, "a shuffle");
    /* one warp barrier, two buffers by its generation's parity: a lane can write the next
     * shuffle's value only after every lane passed this barrier, and so read this one's */
    uint64_t(*buf)[32] = g_shfl[g_bar_warp[w].gen & 1];
    buf[w][l] = v;
    __syncwarp();
    return buf[w][src];
}

/* ---- shared memory ---- */
static unsigned char *g_dyn;
static size_t g_dyn_n, g_static_n;
static std::map<std::pair<const char *, int>, void *> g_static;

void *emu_dynamic_smem(void) { return g_dyn; }

void *emu_static_smem(size_t bytes, const char *file, int line)
{
    auto key = std::make_pair(file, line);
    auto it = g_static.find(key);
    if (it != g_static.end()) return it->second;
    g_static_n += bytes;
    if (g_static_n > (size_t)SMEM_DEFAULT) emu_fail("%s: more than 48 KiB of static shared memory", g_kernel);
    void *p = NULL;
    if (posix_memalign(&p, 16, bytes ? bytes : 1)) emu_fail("%s: out of host memory for shared memory", g_kernel);
    memset(p, 0xff, bytes);
    g_static[key] = p;
    return p;
}

static void end_block(void)
{
    for (auto &kv : g_static) free(kv.second);
    g_static.clear();
    g_static_n = 0;
}

static void fiber_main(void)
{
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(NULL, &g_sched_stack, &g_sched_stack_size);
#endif
    (*g_body)();
    g_cur->done = 1;
    switch_to_sched();
}

static void resume(emu_fiber &f)
{
    g_cur = &f;
    emu_tid = &f.tid;
#if EMU_ASAN
    void *fake = NULL;
    __sanitizer_start_switch_fiber(&fake, f.stack, STACK);
#endif
    ctx_switch(&g_sched, &f.ctx);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
}

static uint3 tid_of(unsigned i, const dim3 &b) { return {i % b.x, (i / b.x) % b.y, i / (b.x * b.y)}; }

static void run_block_fibers(unsigned n)
{
    if (g_fib.size() < n) g_fib.resize(n);
    for (unsigned i = 0; i < n; i++) {
        emu_fiber &f = g_fib[i];
        if (!f.stack) {
            void *s = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (s == MAP_FAILED) emu_fail("%s: no memory for a fiber stack", g_kernel);
            f.stack = (char *)s;
        }
        f.tid = tid_of(i, emu_block_dim);
        f.done = 0;
        f.wbar = NULL;
        /* the stacks' tops staggered: at one per 256 KiB they would all fall in the same cache sets */
        ctx_make(&f.ctx, f.stack, STACK - (i * 1088) % (64 * 1024), fiber_main);
    }
    g_bar_block = {0, 0};
    for (auto &b : g_bar_warp) b = {0, 0};
    unsigned nwarps = (n + 31) / 32;
    std::vector<unsigned> warps;
    int mode = order();
    for (;;) {
        int live = 0, ran = 0;
        for (unsigned i = 0; i < n; i++) live += !g_fib[i].done;
        if (!live) break;
        if (mode < 2) {
            for (unsigned k = 0; k < n; k++) {
                emu_fiber &f = g_fib[mode ? n - 1 - k : k];
                if (runnable(f)) {
                    resume(f);
                    ran = 1;
                }
            }
        } else { /* a random warp at a time, each of its runnable lanes to its next barrier */
            warps.clear();
            for (unsigned w = 0; w < nwarps; w++)
                for (unsigned l = w * 32; l < n && l < w * 32 + 32; l++)
                    if (runnable(g_fib[l])) {
                        warps.push_back(w);
                        break;
                    }
            if (!warps.empty()) {
                unsigned w = warps[rnd((unsigned)warps.size())];
                for (unsigned l = w * 32; l < n && l < w * 32 + 32; l++)
                    if (runnable(g_fib[l])) {
                        resume(g_fib[l]);
                        ran = 1;
                    }
            }
        }
        if (!ran)
            emu_fail("%s: deadlock in block (%u, %u, %u): a barrier that not every thread of the block (or warp) reaches",
                     g_kernel, emu_block_idx.x, emu_block_idx.y, emu_block_idx.z);
    }
}

static void run_block_plain(unsigned n)
{
    static uint3 tid;
    emu_tid = &tid;
    int mode = order();
    std::vector<unsigned> perm;
    if (mode >= 2) {
        perm.resize(n);
        for (unsigned i = 0; i < n; i++) perm[i] = i;
        for (unsigned i = n; i > 1; i--) std::swap(perm[i - 1], perm[rnd(i)]);
    }
    for (unsigned k = 0; k < n; k++) {
        unsigned i = mode == 0 ? k : mode == 1 ? n - 1 - k : perm[k];
        tid = tid_of(i, emu_block_dim);
        (*g_body)();
    }
}

/* CUDA_EMU_STATS=1: at exit, per kernel the launches, blocks, threads and barrier waits (where the
 * emulation spends its time). */
struct kstat {
    uint64_t launches, blocks, threads, waits;
};
static std::map<std::string, kstat> g_stats;
static void print_stats(void)
{
    for (auto &kv : g_stats)
        fprintf(stderr, "# cuda_emu: %-32s %8llu launches %10llu blocks %12llu threads %12llu barrier waits\n",
                kv.first.c_str(), (unsigned long long)kv.second.launches, (unsigned long long)kv.second.blocks,
                (unsigned long long)kv.second.threads, (unsigned long long)kv.second.waits);
}

static void run_grid(const char *name, emu_config c, int barriers, const std::function<void()> &body)
{
    static int stats = -1;
    if (stats < 0 && (stats = getenv("CUDA_EMU_STATS") != NULL)) atexit(print_stats);
    uint64_t waits0 = g_waits;
    g_kernel = name;
    g_body = &body;
    g_plain = !barriers;
    g_nthreads = c.block.x * c.block.y * c.block.z;
    emu_block_dim = c.block;
    emu_grid_dim = {c.grid.x, c.grid.y, c.grid.z};
    void *buf = NULL;
    if (c.smem && posix_memalign(&buf, 128, c.smem)) emu_fail("%s: out of host memory for shared memory", name);
    g_dyn = (unsigned char *)buf;
    g_dyn_n = c.smem;
    uint64_t nb = (uint64_t)c.grid.x * c.grid.y * c.grid.z;
    int mode = order();
    std::vector<uint64_t> perm;
    if (mode >= 2) {
        perm.resize(nb);
        for (uint64_t i = 0; i < nb; i++) perm[i] = i;
        for (uint64_t i = nb; i > 1; i--) std::swap(perm[i - 1], perm[rnd((unsigned)(i < 0xffffffffu ? i : 0xffffffffu))]);
    }
    for (uint64_t k = 0; k < nb; k++) {
        uint64_t b = mode == 0 ? k : mode == 1 ? nb - 1 - k : perm[k];
        emu_block_idx = {(unsigned)(b % c.grid.x), (unsigned)(b / c.grid.x % c.grid.y), (unsigned)(b / ((uint64_t)c.grid.x * c.grid.y))};
        if (c.smem) memset(g_dyn, 0xff, c.smem);
        if (g_plain) run_block_plain(g_nthreads);
        else run_block_fibers(g_nthreads);
        end_block();
    }
    free(buf);
    g_dyn = NULL;
    g_kernel = "(host)";
    if (stats) {
        kstat &k = g_stats[name];
        k.launches++;
        k.blocks += nb;
        k.threads += nb * g_nthreads;
        k.waits += g_waits - waits0;
    }
}

/* ---- launches ---- */
static std::map<const void *, int> g_smem_optin;

extern "C" cudaError_t cudaFuncSetAttribute(const void *fn, enum cudaFuncAttribute a, int v)
{
    LOCK;
    if (a != cudaFuncAttributeMaxDynamicSharedMemorySize) emu_fail("cudaFuncSetAttribute: attribute %d is not emulated", (int)a);
    if (v < 0 || v > SMEM_OPTIN_MAX) return set_err(cudaErrorInvalidValue);
    g_smem_optin[fn] = v;
    return cudaSuccess;
}

int emu_launch_check(const char *name, const void *fn, const emu_config &c)
{
    LOCK;
    unsigned nthreads = c.block.x * c.block.y * c.block.z;
    auto it = g_smem_optin.find(fn);
    size_t allowed = it != g_smem_optin.end() && it->second > SMEM_DEFAULT ? (size_t)it->second : (size_t)SMEM_DEFAULT;
    cudaError_t e = cudaSuccess;
    if (c.smem > allowed) e = cudaErrorInvalidValue;
    else if (nthreads == 0 || nthreads > 1024 || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64 || c.grid.x == 0 ||
             c.grid.y == 0 || c.grid.z == 0 || c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535)
        e = cudaErrorInvalidConfiguration;
    if (e) {
        printf("# cuda_emu: launch of %s refused: grid (%u,%u,%u) block (%u,%u,%u) smem %zu (allowed %zu): %s\n", name,
               c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z, c.smem, allowed, cudaGetErrorString(e));
        set_err(e);
        return -1;
    }
    stream_of(c.stream, name);
    return 0;
}

void emu_check_kernel_ptr(const char *name, int arg, const void *p)
{
    LOCK;
    if (!find_alloc(p, 0))
        emu_fail("%s: pointer argument %d (%p) is not device or managed memory (an illegal address on a GPU)", name, arg, p);
}

void emu_enqueue_grid(const char *name, const emu_config &c, int barriers, std::function<void()> body)
{
    LOCK;
    enqueue(c.stream, name, [name, c, barriers, body]() { run_grid(name, c, barriers, body); });
}

/* ================================================================ cuBLAS */

/* cuBLAS and cuSOLVER handles: a stream each, checked at every use. */
template <class H> struct handles {
    std::set<H *> live;
    const char *lib;
    H *of(H *h, const char *what)
    {
        if (!live.count(h)) emu_fail("%s: %s handle %p was never created or is destroyed", what, lib, (void *)h);
        return h;
    }
    void create(H **h)
    {
        LOCK;
        *h = new H{0};
        live.insert(*h);
    }
    int destroy(H *h) /* 0, or −1 for a handle that is not live */
    {
        LOCK;
        if (!live.count(h)) return -1;
        live.erase(h);
        delete h;
        return 0;
    }
    void set_stream(H *h, cudaStream_t s, const char *what)
    {
        LOCK;
        of(h, what)->stream = s;
        stream_of(s, what);
    }
};
struct emu_blas {
    cudaStream_t stream;
};
struct emu_solver {
    cudaStream_t stream;
};
static handles<emu_blas> g_blas = {{}, "cuBLAS"};
static handles<emu_solver> g_solvers = {{}, "cuSOLVER"};
static emu_blas *blas_of(cublasHandle_t h, const char *what) { return g_blas.of(h, what); }
static emu_solver *solver_of(cusolverDnHandle_t h, const char *what) { return g_solvers.of(h, what); }

extern "C" cublasStatus_t cublasCreate(cublasHandle_t *h)
{
    g_blas.create(h);
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasDestroy(cublasHandle_t h)
{
    return g_blas.destroy(h) ? CUBLAS_STATUS_NOT_INITIALIZED : CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s)
{
    g_blas.set_stream(h, s, "cublasSetStream");
    return CUBLAS_STATUS_SUCCESS;
}
extern "C" cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m)
{
    LOCK;
    blas_of(h, "cublasSetMathMode");
    if (m != CUBLAS_DEFAULT_MATH && m != CUBLAS_PEDANTIC_MATH)
        emu_fail("cublasSetMathMode: math mode %d is not emulated (only the default and pedantic ones)", (int)m);
    return CUBLAS_STATUS_SUCCESS;
}

static size_t type_size(cudaDataType t) { return t == CUDA_R_64F ? 8 : t == CUDA_R_32F ? 4 : 2; }

/* rounding of an fp32 operand as the tensor cores take it: 1 bf16, 2 tf32 */
static float round_operand(float f, int how)
{
    if (!how || !isfinite(f)) return f;
    uint32_t u;
    memcpy(&u, &f, 4);
    int drop = how == 1 ? 16 : 13; /* bf16 keeps 7 mantissa bits, tf32 10 */
    uint32_t half = 1u << (drop - 1), lsb = (u >> drop) & 1u;
    u = (u + half - 1 + lsb) & ~((1u << drop) - 1);
    memcpy(&f, &u, 4);
    return f;
}

static double load_elt(const void *p, cudaDataType t, size_t i)
{
    switch (t) {
    case CUDA_R_32F: return ((const float *)p)[i];
    case CUDA_R_64F: return ((const double *)p)[i];
    case CUDA_R_16BF: return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    default: emu_fail("cuBLAS: data type %d is not emulated", (int)t);
    }
}
static void store_elt(void *p, cudaDataType t, size_t i, double v)
{
    switch (t) {
    case CUDA_R_32F: ((float *)p)[i] = (float)v; break;
    case CUDA_R_64F: ((double *)p)[i] = v; break;
    case CUDA_R_16BF: ((__nv_bfloat16 *)p)[i] = __float2bfloat16((float)v); break;
    default: emu_fail("cuBLAS: data type %d is not emulated", (int)t);
    }
}

/* Elements a column-major rows × cols operand at leading dimension ld spans. */
static size_t span(int rows, int cols, int ld) { return rows && cols ? (size_t)(cols - 1) * ld + rows : 0; }

struct gemm_args {
    cublasOperation_t ta, tb;
    int m, n, k;
    const void *A, *B;
    void *C;
    cudaDataType at, bt, ct;
    int lda, ldb, ldc;
    long long sA, sB, sC;
    int batch;
    int round;  /* fp32 operands as the compute type takes them */
    int fp64;   /* accumulate in fp64 (COMPUTE_64F) */
    double alpha, beta;
};

static void gemm_run(const gemm_args &g)
{
    std::vector<double> a((size_t)g.m * g.k), bt((size_t)g.n * g.k);
    for (int p = 0; p < g.batch; p++) {
        const char *A = (const char *)g.A + (size_t)p * g.sA * type_size(g.at);
        const char *B = (const char *)g.B + (size_t)p * g.sB * type_size(g.bt);
        char *C = (char *)g.C + (size_t)p * g.sC * type_size(g.ct);
        for (int i = 0; i < g.m; i++)
            for (int l = 0; l < g.k; l++) {
                double v = load_elt(A, g.at, g.ta == CUBLAS_OP_N ? i + (size_t)l * g.lda : l + (size_t)i * g.lda);
                a[(size_t)i * g.k + l] = g.at == CUDA_R_32F ? round_operand((float)v, g.round) : v;
            }
        for (int j = 0; j < g.n; j++)
            for (int l = 0; l < g.k; l++) {
                double v = load_elt(B, g.bt, g.tb == CUBLAS_OP_N ? l + (size_t)j * g.ldb : j + (size_t)l * g.ldb);
                bt[(size_t)j * g.k + l] = g.bt == CUDA_R_32F ? round_operand((float)v, g.round) : v;
            }
        for (int j = 0; j < g.n; j++)
            for (int i = 0; i < g.m; i++) {
                const double *x = &a[(size_t)i * g.k], *y = &bt[(size_t)j * g.k];
                /* eight interleaved partial sums (the hardware's order is not known either) */
                double s = 0;
                if (g.fp64) {
                    double p8[8] = {0};
                    for (int l = 0; l < g.k; l++) p8[l & 7] = fma(x[l], y[l], p8[l & 7]);
                    for (int q = 0; q < 8; q++) s += p8[q];
                } else { /* fp32 accumulation, as the hardware's */
                    float p8[8] = {0}, f = 0;
                    for (int l = 0; l < g.k; l++) p8[l & 7] = fmaf((float)x[l], (float)y[l], p8[l & 7]);
                    for (int q = 0; q < 8; q++) f += p8[q];
                    s = f;
                }
                size_t ci = i + (size_t)j * g.ldc;
                double r = g.alpha * s + (g.beta == 0.0 ? 0.0 : g.beta * load_elt(C, g.ct, ci)); /* β = 0: C is not read */
                store_elt(C, g.ct, ci, g.fp64 ? r : (double)(float)r);
            }
    }
}

static cublasStatus_t gemm_common(const char *what, cublasHandle_t h, gemm_args g, const void *alpha, const void *beta,
                                  cublasComputeType_t compute)
{
    LOCK;
    emu_blas *hb = blas_of(h, what);
    if ((g.ta != CUBLAS_OP_N && g.ta != CUBLAS_OP_T) || (g.tb != CUBLAS_OP_N && g.tb != CUBLAS_OP_T))
        return g.ta == CUBLAS_OP_C || g.tb == CUBLAS_OP_C ? CUBLAS_STATUS_NOT_SUPPORTED : CUBLAS_STATUS_INVALID_VALUE;
    int arows = g.ta == CUBLAS_OP_N ? g.m : g.k, acols = g.ta == CUBLAS_OP_N ? g.k : g.m;
    int brows = g.tb == CUBLAS_OP_N ? g.k : g.n, bcols = g.tb == CUBLAS_OP_N ? g.n : g.k;
    if (g.m < 0 || g.n < 0 || g.k < 0 || g.batch < 0 || g.lda < (arows > 1 ? arows : 1) ||
        g.ldb < (brows > 1 ? brows : 1) || g.ldc < (g.m > 1 ? g.m : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    /* the type / compute type pairs cublasGemmEx supports (of those emulated) */
    int ok = 0;
    g.round = 0;
    g.fp64 = 0;
    if (g.at == CUDA_R_32F && g.bt == CUDA_R_32F && g.ct == CUDA_R_32F) {
        ok = compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC ||
             compute == CUBLAS_COMPUTE_32F_FAST_16BF || compute == CUBLAS_COMPUTE_32F_FAST_TF32;
        g.round = compute == CUBLAS_COMPUTE_32F_FAST_16BF ? 1 : compute == CUBLAS_COMPUTE_32F_FAST_TF32 ? 2 : 0;
    } else if (g.at == CUDA_R_16BF && g.bt == CUDA_R_16BF && (g.ct == CUDA_R_16BF || g.ct == CUDA_R_32F)) {
        ok = compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC;
    } else if (g.at == CUDA_R_64F && g.bt == CUDA_R_64F && g.ct == CUDA_R_64F) {
        ok = compute == CUBLAS_COMPUTE_64F;
        g.fp64 = 1;
    }
    if (!ok) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (g.m == 0 || g.n == 0 || g.batch == 0) return CUBLAS_STATUS_SUCCESS;
    /* α, β are read now (host pointer mode) */
    g.alpha = g.fp64 ? *(const double *)alpha : *(const float *)alpha;
    g.beta = g.fp64 ? *(const double *)beta : *(const float *)beta;
    size_t last = (size_t)(g.batch - 1);
    need_device(what, "A", g.A, (span(arows, acols, g.lda) + last * g.sA) * type_size(g.at) * (g.k > 0));
    need_device(what, "B", g.B, (span(brows, bcols, g.ldb) + last * g.sB) * type_size(g.bt) * (g.k > 0));
    need_device(what, "C", g.C, (span(g.m, g.n, g.ldc) + last * g.sC) * type_size(g.ct));
    enqueue(hb->stream, what, [g]() { gemm_run(g); });
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                       const void *alpha, const void *A, cudaDataType at, int lda, const void *B,
                                       cudaDataType bt, int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
                                       cublasComputeType_t compute, cublasGemmAlgo_t algo)
{
    if (algo != CUBLAS_GEMM_DEFAULT) emu_fail("cublasGemmEx: algorithm %d is not emulated", (int)algo);
    gemm_args g = {ta, tb, m, n, k, A, B, C, at, bt, ct, lda, ldb, ldc, 0, 0, 0, 1, 0, 0, 0, 0};
    return gemm_common("cublasGemmEx", h, g, alpha, beta, compute);
}

extern "C" cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                     int n, int k, const void *alpha, const void *A, cudaDataType at,
                                                     int lda, long long sA, const void *B, cudaDataType bt, int ldb,
                                                     long long sB, const void *beta, void *C, cudaDataType ct, int ldc,
                                                     long long sC, int batch, cublasComputeType_t compute,
                                                     cublasGemmAlgo_t algo)
{
    if (algo != CUBLAS_GEMM_DEFAULT) emu_fail("cublasGemmStridedBatchedEx: algorithm %d is not emulated", (int)algo);
    if (sA < 0 || sB < 0 || sC < 0) emu_fail("cublasGemmStridedBatchedEx: negative strides are not emulated");
    gemm_args g = {ta, tb, m, n, k, A, B, C, at, bt, ct, lda, ldb, ldc, sA, sB, sC, batch, 0, 0, 0, 0};
    return gemm_common("cublasGemmStridedBatchedEx", h, g, alpha, beta, compute);
}

extern "C" cublasStatus_t cublasDgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                      const double *alpha, const double *A, int lda, const double *B, int ldb,
                                      const double *beta, double *C, int ldc)
{
    gemm_args g = {ta, tb, m, n, k, A, B, C, CUDA_R_64F, CUDA_R_64F, CUDA_R_64F, lda, ldb, ldc, 0, 0, 0, 1, 0, 0, 0, 0};
    return gemm_common("cublasDgemm", h, g, alpha, beta, CUBLAS_COMPUTE_64F);
}

extern "C" cublasStatus_t cublasDsyrk(cublasHandle_t h, cublasFillMode_t uplo, cublasOperation_t trans, int n, int k,
                                      const double *alpha, const double *A, int lda, const double *beta, double *C,
                                      int ldc)
{
    LOCK;
    emu_blas *hb = blas_of(h, "cublasDsyrk");
    if ((uplo != CUBLAS_FILL_MODE_LOWER && uplo != CUBLAS_FILL_MODE_UPPER) || (trans != CUBLAS_OP_N && trans != CUBLAS_OP_T))
        return CUBLAS_STATUS_INVALID_VALUE;
    int arows = trans == CUBLAS_OP_N ? n : k, acols = trans == CUBLAS_OP_N ? k : n;
    if (n < 0 || k < 0 || lda < (arows > 1 ? arows : 1) || ldc < (n > 1 ? n : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    if (n == 0) return CUBLAS_STATUS_SUCCESS;
    need_device("cublasDsyrk", "A", A, span(arows, acols, lda) * 8 * (k > 0));
    need_device("cublasDsyrk", "C", C, span(n, n, ldc) * 8);
    double al = *alpha, be = *beta;
    enqueue(hb->stream, "cublasDsyrk", [=]() {
        for (int j = 0; j < n; j++)
            for (int i = uplo == CUBLAS_FILL_MODE_UPPER ? 0 : j; i < (uplo == CUBLAS_FILL_MODE_UPPER ? j + 1 : n); i++) {
                double s = 0;
                for (int l = 0; l < k; l++)
                    s = fma(trans == CUBLAS_OP_N ? A[i + (size_t)l * lda] : A[l + (size_t)i * lda],
                            trans == CUBLAS_OP_N ? A[j + (size_t)l * lda] : A[l + (size_t)j * lda], s);
                double *c = C + i + (size_t)j * ldc;
                *c = al * s + (be == 0.0 ? 0.0 : be * *c); /* only the uplo triangle is written */
            }
    });
    return CUBLAS_STATUS_SUCCESS;
}

/* ================================================================ cuSOLVER */

extern "C" cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t *h)
{
    g_solvers.create(h);
    return CUSOLVER_STATUS_SUCCESS;
}
extern "C" cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t h)
{
    return g_solvers.destroy(h) ? CUSOLVER_STATUS_NOT_INITIALIZED : CUSOLVER_STATUS_SUCCESS;
}
extern "C" cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t h, cudaStream_t s)
{
    g_solvers.set_stream(h, s, "cusolverDnSetStream");
    return CUSOLVER_STATUS_SUCCESS;
}

static int syevdx_lwork(int n) { return n * n + 26 * n + 1; }
static int gesvd_lwork(int m, int n) { return 5 * (m > n ? m : n) + m * n + 1; }

static cusolverStatus_t syevdx_args(cusolverEigMode_t jobz, cusolverEigRange_t range, cublasFillMode_t uplo, int n,
                                    int lda, int il, int iu)
{
    if (jobz != CUSOLVER_EIG_MODE_VECTOR && jobz != CUSOLVER_EIG_MODE_NOVECTOR) return CUSOLVER_STATUS_INVALID_VALUE;
    if (uplo != CUBLAS_FILL_MODE_LOWER && uplo != CUBLAS_FILL_MODE_UPPER) return CUSOLVER_STATUS_INVALID_VALUE;
    if (range != CUSOLVER_EIG_RANGE_I) emu_fail("cusolverDnDsyevdx: only CUSOLVER_EIG_RANGE_I is emulated");
    if (n < 0 || lda < (n > 1 ? n : 1)) return CUSOLVER_STATUS_INVALID_VALUE;
    if (n > 0 && (il < 1 || il > iu || iu > n)) return CUSOLVER_STATUS_INVALID_VALUE;
    return CUSOLVER_STATUS_SUCCESS;
}

extern "C" cusolverStatus_t cusolverDnDsyevdx_bufferSize(cusolverDnHandle_t h, cusolverEigMode_t jobz,
                                                         cusolverEigRange_t range, cublasFillMode_t uplo, int n,
                                                         const double *A, int lda, double vl, double vu, int il, int iu,
                                                         int *meig, const double *W, int *lwork)
{
    LOCK;
    (void)A, (void)W, (void)vl, (void)vu, (void)meig;
    solver_of(h, "cusolverDnDsyevdx_bufferSize");
    cusolverStatus_t st = syevdx_args(jobz, range, uplo, n, lda, il, iu);
    if (st) return st;
    *lwork = syevdx_lwork(n);
    return CUSOLVER_STATUS_SUCCESS;
}

extern "C" cusolverStatus_t cusolverDnDsyevdx(cusolverDnHandle_t h, cusolverEigMode_t jobz, cusolverEigRange_t range,
                                              cublasFillMode_t uplo, int n, double *A, int lda, double vl, double vu,
                                              int il, int iu, int *meig, double *W, double *work, int lwork, int *info)
{
    LOCK;
    (void)vl, (void)vu;
    const char *what = "cusolverDnDsyevdx";
    emu_solver *hs = solver_of(h, what);
    cusolverStatus_t st = syevdx_args(jobz, range, uplo, n, lda, il, iu);
    if (st) return st;
    if (lwork < syevdx_lwork(n)) emu_fail("%s: lwork %d is less than the bufferSize query's %d", what, lwork, syevdx_lwork(n));
    need_device(what, "A", A, span(n, n, lda) * 8);
    need_device(what, "W", W, (size_t)n * 8);
    need_device(what, "work", work, (size_t)lwork * 8);
    need_device(what, "info", info, sizeof(int));
    /* it returns the count on the host, so it waits for the stream (and for itself) */
    enqueue(hs->stream, what, [=]() {
        std::vector<double> a((size_t)n * n), z((size_t)n * (iu - il + 1 > 0 ? iu - il + 1 : 1)), w((size_t)n + 1);
        std::vector<lapack_int> supp(2 * (size_t)n + 2);
        for (int j = 0; j < n; j++)
            for (int i = 0; i < n; i++) a[i + (size_t)j * n] = A[i + (size_t)j * lda];
        lapack_int m = 0;
        char jz = jobz == CUSOLVER_EIG_MODE_VECTOR ? 'V' : 'N', ul = uplo == CUBLAS_FILL_MODE_UPPER ? 'U' : 'L';
        lapack_int r = n ? LAPACKE_dsyevr(LAPACK_COL_MAJOR, jz, 'I', ul, n, a.data(), n, 0.0, 0.0, il, iu, 0.0, &m, w.data(),
                                          z.data(), n, supp.data())
                         : 0;
        /* A is overwritten: the first m columns by the eigenvectors, the rest undefined (NaN here) */
        for (int j = 0; j < n; j++)
            for (int i = 0; i < n; i++)
                A[i + (size_t)j * lda] = jz == 'V' && j < m && r == 0 ? z[i + (size_t)j * n] : NAN;
        for (int i = 0; i < m && r == 0; i++) W[i] = w[i];
        memset(work, 0xff, (size_t)lwork * 8);
        *meig = r == 0 ? (int)m : 0;
        *info = (int)r;
    });
    flush(stream_of(hs->stream, what));
    return CUSOLVER_STATUS_SUCCESS;
}

extern "C" cusolverStatus_t cusolverDnDgesvd_bufferSize(cusolverDnHandle_t h, int m, int n, int *lwork)
{
    LOCK;
    solver_of(h, "cusolverDnDgesvd_bufferSize");
    if (m < 0 || n < 0) return CUSOLVER_STATUS_INVALID_VALUE;
    *lwork = gesvd_lwork(m, n);
    return CUSOLVER_STATUS_SUCCESS;
}

extern "C" cusolverStatus_t cusolverDnDgesvd(cusolverDnHandle_t h, signed char jobu, signed char jobvt, int m, int n,
                                             double *A, int lda, double *S, double *U, int ldu, double *VT, int ldvt,
                                             double *work, int lwork, double *rwork, int *info)
{
    LOCK;
    const char *what = "cusolverDnDgesvd";
    emu_solver *hs = solver_of(h, what);
    (void)rwork;
    if (m < n) return CUSOLVER_STATUS_INVALID_VALUE; /* cuSOLVER's gesvd supports m ≥ n only */
    if (jobu != 'A' && jobu != 'S' && jobu != 'N' && jobu != 'O') return CUSOLVER_STATUS_INVALID_VALUE;
    if (jobvt != 'A' && jobvt != 'S' && jobvt != 'N' && jobvt != 'O') return CUSOLVER_STATUS_INVALID_VALUE;
    if (jobu == 'O' || jobvt == 'O') emu_fail("%s: jobu/jobvt 'O' is not emulated", what);
    int ucols = jobu == 'A' ? m : n;
    if (n < 0 || lda < (m > 1 ? m : 1) || (jobu != 'N' && ldu < (m > 1 ? m : 1)) || (jobvt != 'N' && ldvt < (n > 1 ? n : 1)))
        return CUSOLVER_STATUS_INVALID_VALUE;
    if (lwork < gesvd_lwork(m, n)) emu_fail("%s: lwork %d is less than the bufferSize query's %d", what, lwork, gesvd_lwork(m, n));
    need_device(what, "A", A, span(m, n, lda) * 8);
    need_device(what, "S", S, (size_t)n * 8);
    if (jobu != 'N') need_device(what, "U", U, span(m, ucols, ldu) * 8);
    if (jobvt != 'N') need_device(what, "VT", VT, span(n, n, ldvt) * 8);
    need_device(what, "work", work, (size_t)lwork * 8);
    need_device(what, "info", info, sizeof(int));
    enqueue(hs->stream, what, [=]() {
        std::vector<double> a((size_t)m * n), superb((size_t)(n > 1 ? n : 2));
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) a[i + (size_t)j * m] = A[i + (size_t)j * lda];
        double dummy = 0;
        lapack_int r = m && n ? LAPACKE_dgesvd(LAPACK_COL_MAJOR, (char)jobu, (char)jobvt, m, n, a.data(), m, S,
                                               jobu == 'N' ? &dummy : U, jobu == 'N' ? 1 : ldu,
                                               jobvt == 'N' ? &dummy : VT, jobvt == 'N' ? 1 : ldvt, superb.data())
                              : 0;
        for (int j = 0; j < n; j++) /* A is destroyed */
            for (int i = 0; i < m; i++) A[i + (size_t)j * lda] = NAN;
        memset(work, 0xff, (size_t)lwork * 8);
        *info = (int)r;
    });
    return CUSOLVER_STATUS_SUCCESS;
}
