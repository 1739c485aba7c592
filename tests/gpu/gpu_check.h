/* gpu_check.h — the tiny harness of the GPU tests (tests/gpu/test_*.c): no cmocka, so that a
 * fresh GPU machine needs nothing beyond what `make` needs.
 *  - gpu_require(): prints "SKIP: <why>" and exits 77 (the skip code tests/gpu/run.sh and
 *    tests/gpu/test_gpu.py report as a skip, never as a pass) when there is no GPU and no NVIDIA
 *    driver; a loaded driver that CUDA cannot use (e.g. older than the runtime) is a FAIL.
 *  - CHECK_CLOSE(name, err, tol): one line "ok"/"FAIL" per comparison with the measured error.
 *  - gpu_done(): "PASS <test>" / "FAIL <test> (n failures)" and the exit code. */
#ifndef LN_GPU_CHECK_H
#define LN_GPU_CHECK_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cuda_runtime_api.h>

#include "worker/backend/cuda/cuda.h"

static int gpu_failures = 0, gpu_checks = 0;
static const char *gpu_test_name = "gpu test";

static inline void gpu_require(const char *test, lnb_cuda_math math)
{
    gpu_test_name = test;
    setvbuf(stdout, NULL, _IOLBF, 0);
    int ndev = 0;
    cudaError_t st = cudaGetDeviceCount(&ndev);
    if (st != cudaSuccess || ndev == 0) {
        /* No driver at all reads the same as a driver too old for this runtime
         * (cudaErrorInsufficientDriver): where the NVIDIA driver is loaded, the GPU is there and
         * unusable, which must fail the run rather than pass it as a skip. */
        const char *why = st != cudaSuccess ? cudaGetErrorString(st) : "0 devices";
        const char *vis = getenv("CUDA_VISIBLE_DEVICES");
        int hidden = vis && (st == cudaErrorNoDevice || (st == cudaSuccess && ndev == 0)); /* GPUs hidden on purpose */
        if (!hidden && (access("/proc/driver/nvidia/version", F_OK) == 0 || access("/dev/nvidiactl", F_OK) == 0)) {
            printf("FAIL %s: an NVIDIA driver is loaded but CUDA cannot use a GPU (cudaGetDeviceCount: %s)\n", test,
                   why);
            exit(1);
        }
        printf("SKIP: %s: no GPU (%s; cudaGetDeviceCount: %s)\n", test,
               hidden ? "CUDA_VISIBLE_DEVICES hides them" : "no NVIDIA driver", why);
        cudaGetLastError();
        exit(77);
    }
    ln_err e = {{0}};
    lnb_cuda_opts o = {.device = -1, .math = math};
    if (lnb_cuda_open(&o, &e)) {
        printf("FAIL %s: %s\n", test, e.msg);
        exit(1);
    }
    printf("# %s on %s\n", test, lnb_cuda_device_name());
}

/* Records one comparison; err is already relative (or absolute, as the name says). */
static inline void check_close(const char *what, double err, double tol)
{
    gpu_checks++;
    int ok = err <= tol && !isnan(err);
    if (!ok) gpu_failures++;
    printf("%s %-58s err %.3e  tol %.1e\n", ok ? "ok  " : "FAIL", what, err, tol);
}

static inline void check_true(const char *what, int cond)
{
    gpu_checks++;
    if (!cond) gpu_failures++;
    printf("%s %s\n", cond ? "ok  " : "FAIL", what);
}

/* A CUDA error noted by a kernel call fails the test with its message. */
static inline void check_cuda(const char *where)
{
    ln_err e = {{0}};
    if (lnb_cuda_sync(&e)) {
        gpu_failures++;
        printf("FAIL CUDA error after %s: %s\n", where, e.msg);
    }
}

static inline int gpu_done(void)
{
    if (gpu_failures) printf("FAIL %s (%d of %d checks failed)\n", gpu_test_name, gpu_failures, gpu_checks);
    else printf("PASS %s (%d checks)\n", gpu_test_name, gpu_checks);
    lnb_cuda_close();
    return gpu_failures ? 1 : 0;
}

/* max |a − b| / max(|b|, floor) over n elements. */
static inline double rel_err(const float *a, const float *b, long long n)
{
    double num = 0, den = 0;
    for (long long i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        num = d > num || isnan(d) ? d : num; /* a NaN anywhere makes the error NaN: no check passes */
        den = fabs(b[i]) > den ? fabs(b[i]) : den;
    }
    return num / (den > 1e-30 ? den : 1e-30);
}

#endif
