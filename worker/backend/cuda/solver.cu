/* solver.cu — calibration and LoRA-Null init on the device (cuBLAS DSYRK/DGEMM, cuSOLVER
 * syevdx/gesvd, all fp64 like the CPU path in worker/engine/nullspace.c), the memory plan, and
 * the bf16 GEMM peak measurement the benchmark reports MFU against. */
#include <cuda_bf16.h>
#include <math.h>
#include <mutex>
#include <stdlib.h>
#include <string.h>

#include "worker/backend/cuda/cuda_check.h"

extern "C" {
#include "worker/backend/cuda/cuda.h"
#include "worker/engine/memplan.h"
}

#define ST lnb_cuda_g.stream

/* A device buffer freed at scope exit: keeps every error path of the routines below short. */
struct dbuf {
    void *p = nullptr;
    ~dbuf() { if (p) cudaFree(p); }
    template <typename T> T *as() { return (T *)p; }
};

static int dalloc(dbuf &b, size_t bytes, const char *what, ln_err *e)
{
    cudaError_t st = cudaMalloc(&b.p, bytes ? bytes : 16);
    if (st != cudaSuccess) {
        b.p = nullptr;
        cudaGetLastError();
        return ln_errf(e, "CUDA backend: out of device memory allocating %s (%.1f MiB): %s", what,
                       (double)bytes / (1 << 20), cudaGetErrorString(st));
    }
    return 0;
}

/* One cuSOLVER handle, stream and set of workspaces serve the process: the engine may call the
 * routines below from several threads at once (bases solved from an OpenMP loop), so they take turns. */
static std::mutex g_solver_mu;

/* ================================================================ covariance */

/* A sample's scale 1/|max X| without a host round trip (the calibration forward is not stalled):
 * k_max_partial reduces X to one (max, non-finite flag) per block; k_sample_scale combines the
 * partials in a fixed order, writes the scale for k_to_f64_scaled, and records the first failing
 * sample (non-finite entry, or maximum 0 where the reference's scaling is undefined) in flags,
 * which finish reports. A failing sample's scale is 0: it adds nothing to the sum. */
#define COV_PARTS 256

__global__ void k_max_partial(const float *x, int64_t n, float *pmax, int *pbad)
{
    __shared__ float sm[32];
    __shared__ int sb[32];
    float m = -INFINITY;
    int bad = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v = x[i];
        if (!isfinite(v)) bad = 1;
        else m = fmaxf(m, v);
    }
    for (int o = 16; o > 0; o >>= 1) {
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    }
    if ((threadIdx.x & 31) == 0) { sm[threadIdx.x >> 5] = m; sb[threadIdx.x >> 5] = bad; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) { sm[0] = fmaxf(sm[0], sm[w]); sb[0] |= sb[w]; }
        pmax[blockIdx.x] = sm[0];
        pbad[blockIdx.x] = sb[0];
    }
}

/* flags[0] = 1 + the first failing sample's index (0: none), flags[1] = 1 non-finite, 2 max 0. */
__global__ void k_sample_scale(const float *pmax, const int *pbad, int parts, int64_t sample, int *flags, double *scale)
{
    float m = -INFINITY;
    int bad = 0;
    for (int i = 0; i < parts; i++) { m = fmaxf(m, pmax[i]); bad |= pbad[i]; }
    int why = bad ? 1 : m == 0.0f ? 2 : 0;
    if (why && flags[0] == 0) { flags[0] = (int)sample + 1; flags[1] = why; }
    *scale = why ? 0.0 : 1.0 / fabs((double)m);
}

__global__ void k_to_f64_scaled(double *dst, const float *src, int64_t n, const double *scale)
{
    double s = *scale;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = (double)src[i] * s;
}

/* Row-major full C = sum / samples from the column-major upper triangle DSYRK keeps (entry (r, c),
 * r ≤ c, at sum[r + c·d]); C is symmetric, so C[i][j] is that entry for (min, max). */
__global__ void k_cov_full(double *C, const double *sum, int d, double inv)
{
    int64_t n = (int64_t)d * d;
    for (int64_t x = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; x < n; x += (int64_t)gridDim.x * blockDim.x) {
        int64_t i = x / d, j = x % d, lo = i < j ? i : j, hi = i < j ? j : i;
        C[x] = sum[lo + hi * d] * inv;
    }
}

extern "C" int lnb_cuda_cov_init(lnb_cuda_cov *c, int d, ln_err *e)
{
    memset(c, 0, sizeof *c);
    if (d <= 0) return ln_errf(e, "GPU covariance: input dimension must be positive, got %d", d);
    lnb_cuda_bind_thread();
    c->d = d;
    cudaError_t st = cudaMalloc((void **)&c->sum, (size_t)d * d * sizeof(double));
    if (st == cudaSuccess) st = cudaMalloc((void **)&c->flags, 2 * sizeof(int));
    if (st != cudaSuccess) {
        cudaGetLastError();
        lnb_cuda_cov_free(c);
        return ln_errf(e, "GPU covariance: out of device memory for a %d x %d fp64 sum (%.1f MiB): %s", d, d,
                       (double)d * d * 8 / (1 << 20), cudaGetErrorString(st));
    }
    st = cudaMemsetAsync(c->sum, 0, (size_t)d * d * sizeof(double), ST);
    if (st == cudaSuccess) st = cudaMemsetAsync(c->flags, 0, 2 * sizeof(int), ST);
    if (st != cudaSuccess) { /* the caller frees only what opened */
        lnb_cuda_cov_free(c);
        return ln_errf(e, "GPU covariance: zeroing a %d x %d sum failed: %s", d, d, cudaGetErrorString(st));
    }
    return 0;
}

extern "C" void lnb_cuda_cov_free(lnb_cuda_cov *c)
{
    if (!c) return;
    lnb_cuda_bind_thread();
    if (c->sum) cudaFree(c->sum);
    if (c->flags) cudaFree(c->flags);
    c->sum = NULL;
    c->flags = NULL;
}

/* One sample: the scale, the fp64 scaled copy and the DSYRK, all queued on the stream (no wait,
 * no allocation: a whole-model calibration makes tens of thousands of these calls). They reuse
 * workspace slots, so calls take turns with each other and the solvers (g_solver_mu). */
extern "C" int lnb_cuda_cov_add_sample(lnb_cuda_cov *c, const float *X, int tokens, ln_err *e)
{
    std::lock_guard<std::mutex> lock(g_solver_mu);
    lnb_cuda_bind_thread();
    const int d = c->d;
    if (tokens <= 0) return ln_errf(e, "GPU covariance: sample %lld has no tokens", (long long)c->samples);
    size_t n = (size_t)tokens * d;
    const float *dx = (const float *)lnb_cuda_device_view(X, n * sizeof(float), WS_SOLVER);
    char *part = (char *)lnb_cuda_workspace(WS_COV_FLAGS, COV_PARTS * (sizeof(float) + sizeof(int)) + sizeof(double));
    double *xd = (double *)lnb_cuda_workspace(WS_COV_X, n * sizeof(double));
    if (!dx || !part || !xd) {
        if (lnb_cuda_check(e)) return ln_err_prefix(e, "GPU covariance: %d x %d sample", tokens, d);
        return ln_errf(e, "GPU covariance: no device memory for a %d x %d sample", tokens, d);
    }
    double *scale = (double *)part;
    float *pmax = (float *)(part + sizeof(double));
    int *pbad = (int *)(pmax + COV_PARTS);
    k_max_partial<<<COV_PARTS, 256, 0, ST>>>(dx, (int64_t)n, pmax, pbad);
    k_sample_scale<<<1, 1, 0, ST>>>(pmax, pbad, COV_PARTS, c->samples, c->flags, scale);
    k_to_f64_scaled<<<1024, 256, 0, ST>>>(xd, dx, (int64_t)n, scale);
    CUDA_TRY(cudaGetLastError(), e);
    /* Row-major X (tokens × d) is column-major Xc (d × tokens): Xᵀ X = Xc Xcᵀ, a DSYRK with no
     * transpose, into the column-major upper triangle. */
    const double one = 1.0;
    CUBLAS_TRY(cublasDsyrk(lnb_cuda_g.blas, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, d, tokens, &one, xd, d, &one, c->sum,
                           d), e);
    c->samples++;
    c->tokens += tokens;
    return 0;
}

extern "C" int lnb_cuda_cov_finish(const lnb_cuda_cov *c, double *C, ln_err *e)
{
    std::lock_guard<std::mutex> lock(g_solver_mu);
    lnb_cuda_bind_thread();
    if (c->samples <= 0) return ln_errf(e, "GPU covariance: no calibration samples were accumulated");
    const int d = c->d;
    int flags[2] = {0, 0};
    CUDA_TRY(cudaMemcpyAsync(flags, c->flags, sizeof flags, cudaMemcpyDeviceToHost, ST), e);
    CUDA_TRY(cudaStreamSynchronize(ST), e);
    if (flags[0] > 0) {
        if (flags[1] == 1) return ln_errf(e, "GPU covariance: sample %d has a non-finite activation", flags[0] - 1);
        return ln_errf(e, "GPU covariance: sample %d has maximum activation 0, so the reference scaling 1/|max X| is "
                          "undefined", flags[0] - 1);
    }
    /* symmetrised and divided on the device (a host loop over a 14336² matrix strides through memory) */
    double *full = (double *)lnb_cuda_workspace(WS_COV_X, (size_t)d * d * sizeof(double));
    if (!full) {
        if (lnb_cuda_check(e)) return ln_err_prefix(e, "GPU covariance: finishing a %d x %d sum", d, d);
        return ln_errf(e, "GPU covariance: no device memory to finish a %d x %d sum", d, d);
    }
    k_cov_full<<<2048, 256, 0, ST>>>(full, c->sum, d, 1.0 / (double)c->samples);
    CUDA_TRY(cudaGetLastError(), e);
    CUDA_TRY(cudaMemcpyAsync(C, full, (size_t)d * d * sizeof(double), cudaMemcpyDeviceToHost, ST), e);
    CUDA_TRY(cudaStreamSynchronize(ST), e);
    return 0;
}

/* ================================================================ null space */

extern "C" int lnb_cuda_nullspace_basis(const double *C, int d, int r, double *U, double *evals, ln_err *e)
{
    std::lock_guard<std::mutex> lock(g_solver_mu);
    lnb_cuda_bind_thread();
    if (r <= 0 || r > d) return ln_errf(e, "GPU null space: rank %d must be in 1..%d (d_in)", r, d);
    dbuf A, W, info, work;
    if (dalloc(A, (size_t)d * d * sizeof(double), "the covariance", e) ||
        dalloc(W, (size_t)d * sizeof(double), "the eigenvalues", e) || dalloc(info, sizeof(int), "info", e))
        return -1;
    CUDA_TRY(cudaMemcpyAsync(A.p, C, (size_t)d * d * sizeof(double), cudaMemcpyHostToDevice, ST), e);
    int lwork = 0, meig = 0;
    /* C is symmetric, so its row-major and column-major readings are the same matrix. */
    CUSOLVER_TRY(cusolverDnDsyevdx_bufferSize(lnb_cuda_g.solver, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I,
                                              CUBLAS_FILL_MODE_UPPER, d, A.as<double>(), d, 0.0, 0.0, 1, r, &meig,
                                              W.as<double>(), &lwork), e);
    if (dalloc(work, (size_t)lwork * sizeof(double), "the eigensolver workspace", e)) return -1;
    CUSOLVER_TRY(cusolverDnDsyevdx(lnb_cuda_g.solver, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I,
                                   CUBLAS_FILL_MODE_UPPER, d, A.as<double>(), d, 0.0, 0.0, 1, r, &meig, W.as<double>(),
                                   work.as<double>(), lwork, info.as<int>()), e);
    int hinfo = 0;
    CUDA_TRY(cudaMemcpyAsync(&hinfo, info.p, sizeof hinfo, cudaMemcpyDeviceToHost, ST), e);
    CUDA_TRY(cudaStreamSynchronize(ST), e);
    if (hinfo != 0) return ln_errf(e, "GPU null space: cusolverDnDsyevdx failed (info %d) on a %d x %d covariance", hinfo, d, d);
    if (meig != r) return ln_errf(e, "GPU null space: syevdx returned %d eigenpairs, expected %d", meig, r);
    /* Eigenvectors are the first r columns of A (column-major): U[k][j] = A[k + j·d]. */
    double *h = (double *)malloc((size_t)d * r * sizeof(double));
    if (!h) return ln_errf(e, "GPU null space: out of host memory for %d x %d eigenvectors", d, r);
    cudaError_t st = cudaMemcpyAsync(h, A.p, (size_t)d * r * sizeof(double), cudaMemcpyDeviceToHost, ST);
    if (st == cudaSuccess) st = cudaStreamSynchronize(ST);
    if (st == cudaSuccess && evals) st = cudaMemcpy(evals, W.p, (size_t)r * sizeof(double), cudaMemcpyDeviceToHost);
    if (st != cudaSuccess) {
        free(h);
        return ln_errf(e, "CUDA copy of the eigenvectors failed: %s", cudaGetErrorString(st));
    }
    for (int j = 0; j < r; j++)
        for (int k = 0; k < d; k++) U[(size_t)k * r + j] = h[(size_t)j * d + k];
    free(h);
    return 0;
}

__global__ void k_f32_to_f64(double *dst, const float *src, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

extern "C" int lnb_cuda_nullspace_factor(const float *W0, int d_out, int d_in, const double *U, int r, double scale,
                                         float *A, float *B, ln_err *e)
{
    std::lock_guard<std::mutex> lock(g_solver_mu);
    lnb_cuda_bind_thread();
    if (r <= 0 || r > d_in || r > d_out)
        return ln_errf(e, "GPU LoRA-Null factor: rank %d exceeds the layer's %d x %d shape", r, d_out, d_in);
    if (!(scale > 0.0)) return ln_errf(e, "GPU LoRA-Null factor: scale (alpha/r) must be positive, got %g", scale);
    size_t nw = (size_t)d_out * d_in;
    dbuf w64, u64, M, S, P, VT, UQt, info, work;
    const float *dw = (const float *)lnb_cuda_device_view(W0, nw * sizeof(float), WS_SOLVER);
    if (!dw) return lnb_cuda_check(e);
    if (dalloc(w64, nw * sizeof(double), "fp64 W0", e) || dalloc(u64, (size_t)d_in * r * sizeof(double), "U", e) ||
        dalloc(M, (size_t)d_out * r * sizeof(double), "W0 U", e) || dalloc(S, (size_t)r * sizeof(double), "S", e) ||
        dalloc(P, (size_t)d_out * r * sizeof(double), "P", e) || dalloc(VT, (size_t)r * r * sizeof(double), "Qᵀ", e) ||
        dalloc(UQt, (size_t)d_in * r * sizeof(double), "U Q", e) || dalloc(info, sizeof(int), "info", e))
        return -1;
    k_f32_to_f64<<<1024, 256, 0, ST>>>(w64.as<double>(), dw, (int64_t)nw);
    CUDA_TRY(cudaGetLastError(), e);
    CUDA_TRY(cudaMemcpyAsync(u64.p, U, (size_t)d_in * r * sizeof(double), cudaMemcpyHostToDevice, ST), e);
    /* Row-major W0 (d_out × d_in) is column-major W0ᵀ (ld d_in); row-major U (d_in × r) is
     * column-major Uᵀ (ld r). Column-major M (d_out × r, ld d_out) = W0 U = (W0ᵀ)ᵀ (Uᵀ)ᵀ. */
    const double one = 1.0, zero = 0.0;
    CUBLAS_TRY(cublasDgemm(lnb_cuda_g.blas, CUBLAS_OP_T, CUBLAS_OP_T, d_out, r, d_in, &one, w64.as<double>(), d_in,
                           u64.as<double>(), r, &zero, M.as<double>(), d_out), e);
    /* Thin SVD of the tall d_out × r matrix: M = P diag(S) Vᵀ (gesvd needs m ≥ n: d_out ≥ r). */
    int lwork = 0;
    CUSOLVER_TRY(cusolverDnDgesvd_bufferSize(lnb_cuda_g.solver, d_out, r, &lwork), e);
    if (dalloc(work, (size_t)lwork * sizeof(double), "the SVD workspace", e)) return -1;
    CUSOLVER_TRY(cusolverDnDgesvd(lnb_cuda_g.solver, 'S', 'S', d_out, r, M.as<double>(), d_out, S.as<double>(),
                                  P.as<double>(), d_out, VT.as<double>(), r, work.as<double>(), lwork, NULL,
                                  info.as<int>()), e);
    /* (U Q)ᵀ = Qᵀ Uᵀ = Vᵀ · (column-major Uᵀ): r × d_in, column-major. */
    CUBLAS_TRY(cublasDgemm(lnb_cuda_g.blas, CUBLAS_OP_N, CUBLAS_OP_N, r, d_in, r, &one, VT.as<double>(), r,
                           u64.as<double>(), r, &zero, UQt.as<double>(), r), e);
    int hinfo = 0;
    CUDA_TRY(cudaMemcpyAsync(&hinfo, info.p, sizeof hinfo, cudaMemcpyDeviceToHost, ST), e);
    double *hs = (double *)malloc((size_t)r * sizeof(double));
    double *hp = (double *)malloc((size_t)d_out * r * sizeof(double));
    double *hq = (double *)malloc((size_t)d_in * r * sizeof(double));
    int rc = -1;
    if (!hs || !hp || !hq) {
        ln_errf(e, "GPU LoRA-Null factor: out of host memory");
        goto out;
    }
    if (cudaMemcpyAsync(hs, S.p, (size_t)r * sizeof(double), cudaMemcpyDeviceToHost, ST) != cudaSuccess ||
        cudaMemcpyAsync(hp, P.p, (size_t)d_out * r * sizeof(double), cudaMemcpyDeviceToHost, ST) != cudaSuccess ||
        cudaMemcpyAsync(hq, UQt.p, (size_t)d_in * r * sizeof(double), cudaMemcpyDeviceToHost, ST) != cudaSuccess ||
        cudaStreamSynchronize(ST) != cudaSuccess) {
        ln_errf(e, "GPU LoRA-Null factor: copying the SVD back failed: %s", cudaGetErrorString(cudaGetLastError()));
        goto out;
    }
    if (hinfo != 0) {
        ln_errf(e, "GPU LoRA-Null factor: SVD of W0 U (%d x %d) failed (cusolverDnDgesvd info %d)", d_out, r, hinfo);
        goto out;
    }
    /* B = P √(S/scale), A = √(S/scale) (U Q)ᵀ — as nullspace.c. Column-major P[i + j·d_out],
     * (UQ)ᵀ[j + k·r]. A, B may be managed memory: written from the host after the sync above. */
    for (int j = 0; j < r; j++) {
        double g = sqrt(hs[j] / scale);
        for (int k = 0; k < d_in; k++) A[(size_t)j * d_in + k] = (float)(g * hq[(size_t)k * r + j]);
        for (int i = 0; i < d_out; i++) B[(size_t)i * r + j] = (float)(hp[(size_t)j * d_out + i] * g);
    }
    rc = 0;
out:
    free(hs);
    free(hp);
    free(hq);
    return rc;
}

/* ================================================================ memory plan */

/* The arithmetic is host code (ln_memplan_gpu, worker/engine/memplan.c: tested without a GPU);
 * this asks the device what is free. */
extern "C" int lnb_cuda_plan_check(const lnb_cuda_plan_req *q, lnb_cuda_plan *p, ln_err *e)
{
    memset(p, 0, sizeof *p);
    lnb_cuda_bind_thread();
    size_t fr = 0, tot = 0;
    CUDA_TRY(cudaMemGetInfo(&fr, &tot), e);
    return ln_memplan_gpu(q, (double)fr, (double)tot, lnb_cuda_device_name(), p, e);
}

/* ================================================================ bf16 GEMM peak */

__global__ void k_fill_bf16(__nv_bfloat16 *x, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        x[i] = __float2bfloat16(((float)((i * 2654435761ull) % 1000) - 500.0f) * 1e-3f);
}

extern "C" int lnb_cuda_bf16_gemm_peak(int n, int iters, double *tflops, ln_err *e)
{
    dbuf a, b, c;
    size_t nn = (size_t)n * n;
    if (dalloc(a, nn * 2, "GEMM A", e) || dalloc(b, nn * 2, "GEMM B", e) || dalloc(c, nn * 2, "GEMM C", e)) return -1;
    k_fill_bf16<<<1024, 256, 0, ST>>>((__nv_bfloat16 *)a.p, (int64_t)nn);
    k_fill_bf16<<<1024, 256, 0, ST>>>((__nv_bfloat16 *)b.p, (int64_t)nn);
    CUDA_TRY(cudaGetLastError(), e);
    float alpha = 1.0f, beta = 0.0f;
    cudaEvent_t t0, t1;
    CUDA_TRY(cudaEventCreate(&t0), e);
    CUDA_TRY(cudaEventCreate(&t1), e);
    for (int i = 0; i < iters + 3; i++) {
        if (i == 3) CUDA_TRY(cudaEventRecord(t0, ST), e);
        CUBLAS_TRY(cublasGemmEx(lnb_cuda_g.blas, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.p, CUDA_R_16BF, n, b.p,
                                CUDA_R_16BF, n, &beta, c.p, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), e);
    }
    CUDA_TRY(cudaEventRecord(t1, ST), e);
    CUDA_TRY(cudaEventSynchronize(t1), e);
    float ms = 0;
    CUDA_TRY(cudaEventElapsedTime(&ms, t0, t1), e);
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
    *tflops = 2.0 * (double)n * n * n * iters / (ms * 1e-3) / 1e12;
    return 0;
}
