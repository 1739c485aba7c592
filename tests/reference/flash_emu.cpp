/* flash_emu.cpp — runs the CUDA source of worker/backend/cuda/attention.cu on the host, kernel for
 * kernel, so that what no GPU has run yet is at least executed as written: the WMMA fragment
 * layouts and leading dimensions, the shared-memory carving, the lane ↔ row mapping, the
 * barriers and shuffles, the launch configuration (grid, block, dynamic shared memory and its
 * opt-in), and the cuBLAS calls of the chunked path.
 *
 * How: attention.cu is built for the host emulation of tests/reference/cuda_emu/ (emu_build.py:
 * launches → emu_launch, shared arrays → the block's buffers; cuda_emu.h and cuda_emu.cpp say what is
 * emulated) and linked with this driver, which stands in for the rest of the backend (the context,
 * the workspaces, the error notes of kernels.cu). Every CUDA thread of a block is a fiber with its
 * own stack; fibers run one at a time and switch only inside __syncthreads / __syncwarp / shuffles /
 * WMMA, so a missing barrier shows as a wrong (or NaN) result deterministically, and a barrier not
 * every thread reaches is reported as a deadlock. Blocks run one after another. Shared memory
 * starts as NaN bytes (0xFF) in every block, like the garbage of a real GPU, so a read before a
 * write poisons the result; it, the device buffers and every workspace are allocated at their
 * exact size, so the address sanitizer sees any overrun. WMMA fragments hold the whole 16 × 16
 * tile in every lane (the kernels never touch fragment elements, only load/store/fill/mma, whose
 * results do not depend on the hardware's element placement); loads and stores check the pointer
 * alignment (256 bits) and leading dimensions (multiples of 16 bytes) that the hardware needs.
 * What it cannot show: speed, occupancy, and races that only real concurrency reveals (the fibers
 * run in program order; the driver runs every case in up to four orders of blocks, warps and
 * lanes, and demands the same bits).
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

#include <vector>

#include "worker/backend/cuda/cuda_check.h" /* through the emulation's CUDA headers (cuda_emu/include) */

extern "C" {
#include "worker/backend/cuda/cuda.h"
}

void lnb_cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
                                int nh, int nkv, int hd);
void lnb_cuda_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout, const float *lse,
                                 const float *q, const float *k, const float *v, int B, int T, int nh, int nkv, int hd);

/* ================================================================ the backend's context */

struct lnb_cuda_ctx lnb_cuda_g;

const char *lnb_cublas_status_name(cublasStatus_t s) { return s ? "cuBLAS error" : "OK"; }

static int g_noted;
void lnb_cuda_note_error(const char *what, const char *detail, const char *file, int line)
{
    printf("FAIL noted CUDA error: %s: %s at %s:%d\n", what, detail, file, line);
    g_noted++;
}

static void *g_ws[WS_NSLOTS];
static size_t g_ws_size[WS_NSLOTS];
/* Exactly `bytes` of device memory (the real one rounds up: an overrun here is one there too). */
void *lnb_cuda_workspace(int slot, size_t bytes)
{
    if (bytes <= g_ws_size[slot]) return g_ws[slot];
    cudaFree(g_ws[slot]);
    g_ws[slot] = NULL;
    if (cudaMalloc(&g_ws[slot], bytes ? bytes : 1) != cudaSuccess) {
        printf("FAIL cudaMalloc of a %zu-byte workspace\n", bytes);
        exit(1);
    }
    g_ws_size[slot] = bytes;
    return g_ws[slot];
}
cublasComputeType_t lnb_cuda_compute_type(void) { return CUBLAS_COMPUTE_32F; }

/* ================================================================ the checks */

static float *alloc_filled(int64_t n, uint64_t seed, float scale)
{
    float *p = NULL; /* managed: the host writes it, the kernels read it */
    if (cudaMallocManaged(&p, (size_t)n * sizeof(float)) != cudaSuccess) exit(1);
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
    /* outputs in managed memory start as NaN (the emulation's fill): whatever a path leaves unwritten shows */
    float *o[5];
    int64_t n[5] = {nq, nl, nq, nk, nk};
    for (int i = 0; i < 5; i++)
        if (cudaMallocManaged(&o[i], (size_t)n[i] * sizeof(float)) != cudaSuccess) exit(1);
    take_path(fwd, hd);
    lnb_cuda_attention_forward(o[0], o[1], q, k, v, B, T, nh, nkv, hd);
    take_path(bwd, hd);
    lnb_cuda_attention_backward(o[2], o[3], o[4], NULL, go, o[1], q, k, v, B, T, nh, nkv, hd);
    unsetenv("LORANULL_CUDA_ATTN");
    cudaDeviceSynchronize(); /* the queued kernels run */
    std::vector<float> *dst[5] = {&r.out, &r.lse, &r.dq, &r.dk, &r.dv};
    for (int i = 0; i < 5; i++) {
        dst[i]->assign(o[i], o[i] + n[i]);
        cudaFree(o[i]);
    }
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
    lnb_cuda_g.smem_optin = 227 * 1024; /* H100/H200 */
    if (cublasCreate(&lnb_cuda_g.blas) != CUBLAS_STATUS_SUCCESS) return 1;
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
        emu_set_order(0);
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
        static const char *order[4] = {"", "blocks and lanes in reverse order", "warps at random, blocks shuffled (seed 2)",
                                      "warps at random, blocks shuffled (seed 3)"};
        const char *orders = getenv("FLASH_EMU_ORDERS"); /* 1: the first order only (the ASan run) */
        int norders = orders && atoi(orders) >= 1 && atoi(orders) <= 4 ? atoi(orders) : 4;
        for (int mode = 1; mode < norders; mode++) {
            emu_set_order(mode);
            run(fwd, bwd, B, T, nh, nkv, hd, q, k, v, go, rr);
            int same = memcmp(r.out.data(), rr.out.data(), nq * 4) == 0 &&
                       memcmp(r.lse.data(), rr.lse.data(), nl * 4) == 0 && memcmp(r.dq.data(), rr.dq.data(), nq * 4) == 0 &&
                       memcmp(r.dk.data(), rr.dk.data(), nk * 4) == 0 && memcmp(r.dv.data(), rr.dv.data(), nk * 4) == 0;
            printf("%s %s: same bits with the %s\n", same ? "ok  " : "FAIL", paths[p], order[mode]);
            if (!same) g_fail++;
        }
    }
    if (g_noted) g_fail++;
    cudaFree(q);
    cudaFree(k);
    cudaFree(v);
    cudaFree(go);
    for (int i = 0; i < WS_NSLOTS; i++) cudaFree(g_ws[i]);
    cublasDestroy(lnb_cuda_g.blas);
    printf("%s flash_emu B%d T%d nh%d nkv%d hd%d\n", g_fail ? "FAIL" : "PASS", B, T, nh, nkv, hd);
    return g_fail ? 1 : 0;
}
