/* nullspace.c — covariance accumulation, the subset eigensolver and the LoRA-Null factors. */
#include "worker/engine/nullspace.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

/* Rows of a sample converted to fp64 at a time: bounds the scratch to 256 × d doubles. */
#define COV_CHUNK_ROWS 256
/* Rows of W0 converted to fp64 at a time when projecting onto the basis. */
#define FACTOR_BLOCK_ROWS 256

/* ---------------------------------------------------------------- threads */

void ln_blas_threads_begin(void) { openblas_set_num_threads(omp_get_max_threads()); }
void ln_blas_threads_end(void) { openblas_set_num_threads(1); }

/* out(upper) = alpha XᵀX for X (T × d), fp32, split over OpenMP threads by column blocks of equal
 * area of the upper triangle: block [j0, j1) is an ssyrk on its diagonal square plus an sgemm for
 * rows 0..j0. Each entry is computed by one single-threaded BLAS call, so for a given thread count
 * the result does not depend on scheduling. */
static void syrk_upper_f32(int d, int T, float alpha, const float *X, float *out) {
    ln_blas_threads_end();
    int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
    if (nt > d / 64) nt = d / 64 > 1 ? d / 64 : 1;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        /* column j costs ~j: block t ends where the triangle's area reaches (t+1)/n */
        int j0 = (int)(d * sqrt((double)t / n)), j1 = t == n - 1 ? d : (int)(d * sqrt((double)(t + 1) / n));
        j0 = j0 / 16 * 16;
        j1 = t == n - 1 ? d : j1 / 16 * 16;
        if (j1 > j0) {
            cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, j1 - j0, T, alpha, X + j0, d, 0.0f,
                        out + (size_t)j0 * d + j0, d);
            if (j0 > 0)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, j0, j1 - j0, T, alpha, X, d, X + j0, d, 0.0f,
                            out + j0, d);
        }
    }
}

/* ---------------------------------------------------------------- covariance */

int ln_cov_init(ln_cov *c, int d, ln_err *e) {
    memset(c, 0, sizeof *c);
    if (d <= 0) return ln_errf(e, "covariance: input dimension must be positive, got %d", d);
    c->d = d;
    c->sum = ln_try_alloc((size_t)d * d * sizeof(double), "covariance d_in x d_in (fp64)", e);
    if (!c->sum) return -1;
    memset(c->sum, 0, (size_t)d * d * sizeof(double));
    return 0;
}

void ln_cov_free(ln_cov *c) {
    if (!c) return;
    free(c->sum);
    c->sum = NULL;
}

/* The scale 1/|max X| of a sample, after checking every value is finite. */
static int sample_scale(const ln_cov *c, const float *X, int tokens, double *inv, ln_err *e) {
    const int d = c->d;
    if (tokens <= 0) return ln_errf(e, "covariance: sample %lld has no tokens", (long long)c->samples);
    size_t n = (size_t)tokens * d;
    float mx = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(X[i]))
            return ln_errf(e, "covariance: sample %lld has a non-finite activation at token %zu, dim %zu",
                           (long long)c->samples, i / d, i % d);
        if (X[i] > mx) mx = X[i];
    }
    /* The reference divides by |max(X)| (the signed maximum), not by max|X|. */
    if (mx == 0.0f)
        return ln_errf(e, "covariance: sample %lld has maximum activation 0, so the reference scaling "
                          "1/|max X| is undefined", (long long)c->samples);
    *inv = 1.0 / fabs((double)mx);
    return 0;
}

int ln_cov_add_sample(ln_cov *c, const float *X, int tokens, ln_err *e) {
    const int d = c->d;
    double inv;
    if (sample_scale(c, X, tokens, &inv, e) != 0) return -1;
    int chunk = tokens < COV_CHUNK_ROWS ? tokens : COV_CHUNK_ROWS;
    double *xd = ln_try_alloc((size_t)chunk * d * sizeof(double), "covariance scratch", e);
    if (!xd) return -1;
    for (int t0 = 0; t0 < tokens; t0 += chunk) {
        int rows = tokens - t0 < chunk ? tokens - t0 : chunk;
        const float *src = X + (size_t)t0 * d;
        for (size_t i = 0; i < (size_t)rows * d; i++) xd[i] = (double)src[i] * inv;
        /* sum(upper) += xdᵀ xd */
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, d, rows, 1.0, xd, d, 1.0, c->sum, d);
    }
    free(xd);
    c->samples++;
    c->tokens += tokens;
    return 0;
}

int ln_cov_add_sample_f32(ln_cov *c, const float *X, int tokens, float *scratch, ln_err *e) {
    const int d = c->d;
    double inv;
    if (sample_scale(c, X, tokens, &inv, e) != 0) return -1;
    /* alpha = 1/max² must stay a normal fp32 number, else take the fp64 route */
    if (!(inv * inv > 1e-30 && inv * inv < 1e30)) return ln_cov_add_sample(c, X, tokens, e);
    /* scratch(upper) = (1/max²) Xᵀ X, then sum += scratch in fp64 */
    syrk_upper_f32(d, tokens, (float)(inv * inv), X, scratch);
    for (int i = 0; i < d; i++) {
        double *srow = c->sum + (size_t)i * d;
        const float *prow = scratch + (size_t)i * d;
        for (int j = i; j < d; j++) srow[j] += prow[j];
    }
    c->samples++;
    c->tokens += tokens;
    return 0;
}

int ln_cov_merge(ln_cov *into, const ln_cov *from, ln_err *e) {
    if (into->d != from->d)
        return ln_errf(e, "covariance merge: dimensions differ (%d vs %d)", into->d, from->d);
    size_t n = (size_t)into->d * into->d;
    for (size_t i = 0; i < n; i++) into->sum[i] += from->sum[i];
    into->samples += from->samples;
    into->tokens += from->tokens;
    return 0;
}

int ln_cov_finish(const ln_cov *c, double *C, ln_err *e) {
    if (c->samples <= 0) return ln_errf(e, "covariance: no calibration samples were accumulated");
    const int d = c->d;
    double inv = 1.0 / (double)c->samples;
    for (int i = 0; i < d; i++) {
        for (int j = i; j < d; j++) {
            double v = c->sum[(size_t)i * d + j] * inv;
            C[(size_t)i * d + j] = v;
            C[(size_t)j * d + i] = v;
        }
    }
    return 0;
}

int ln_lapack_fail(ln_err *e, int info, const char *call_fmt, ...) {
    char call[512];
    va_list ap;
    va_start(ap, call_fmt);
    vsnprintf(call, sizeof call, call_fmt, ap);
    va_end(ap);
    if (info == LAPACK_WORK_MEMORY_ERROR || info == LAPACK_TRANSPOSE_MEMORY_ERROR)
        return ln_errf(e, "%s: out of memory in LAPACK's work space or row-major copy", call);
    return ln_errf(e, "%s failed (LAPACK info %d)", call, info);
}

/* ---------------------------------------------------------------- null space */

static ln_basis_solver basis_solver; /* an accelerator's eigensolver, or NULL for LAPACK */

void ln_nullspace_set_basis_solver(ln_basis_solver fn) { basis_solver = fn; }

static int basis_impl(const double *C, int d, int r, double *U, double *evals, int all_threads, ln_err *e) {
    if (r <= 0 || r > d) return ln_errf(e, "null space: rank %d must be in 1..%d (d_in)", r, d);
    if (basis_solver) return basis_solver(C, d, r, U, evals, e);
    /* LAPACK works in column-major order. Called with LAPACK_ROW_MAJOR, LAPACKE would copy C's
     * upper triangle into a column-major d × d matrix and Z back — a second d² fp64 copy per solve,
     * and bases are solved several at once (lora_init.c). Instead `a` is that column-major matrix
     * already: row-major C's upper triangle mirrored into both halves (so LAPACK reads exactly
     * what LAPACKE's copy held, whatever C's lower half says), and z (d × r, column-major) is
     * transposed into U here: the same call, the same bits, one copy less. */
    double *a = ln_try_alloc((size_t)d * d * sizeof(double), "null space: copy of C", e);
    double *w = ln_try_alloc((size_t)d * sizeof(double), "null space: eigenvalues", e);
    double *z = ln_try_alloc((size_t)d * r * sizeof(double), "null space: eigenvectors", e);
    lapack_int *isuppz = ln_try_alloc((size_t)2 * r * sizeof(lapack_int), "null space: support", e);
    int rc = -1;
    if (!a || !w || !z || !isuppz) goto out;
    for (int i = 0; i < d; i++)
        for (int j = i; j < d; j++) a[(size_t)i * d + j] = a[(size_t)j * d + i] = C[(size_t)i * d + j];
    lapack_int m = 0;
    if (all_threads) ln_blas_threads_begin();
    /* Range 'I', il=1..iu=r: LAPACK returns the r smallest eigenpairs, ascending. abstol 0 lets
     * dsyevr pick its default (accurate) tolerance. */
    lapack_int info = LAPACKE_dsyevr(LAPACK_COL_MAJOR, 'V', 'I', 'U', d, a, d, 0.0, 0.0, 1, r, 0.0,
                                     &m, w, z, d, isuppz);
    if (all_threads) ln_blas_threads_end();
    if (info == 0 && m == r)
        for (int i = 0; i < d; i++)
            for (int j = 0; j < r; j++) U[(size_t)i * r + j] = z[(size_t)j * d + i];
    if (info != 0) {
        ln_lapack_fail(e, (int)info, "null space: dsyevr on a %d x %d covariance", d, d);
        goto out;
    }
    if (m != r) {
        ln_errf(e, "null space: dsyevr returned %d eigenpairs, expected %d", (int)m, r);
        goto out;
    }
    if (evals) memcpy(evals, w, (size_t)r * sizeof(double));
    rc = 0;
out:
    free(a);
    free(w);
    free(z);
    free(isuppz);
    return rc;
}

double ln_nullspace_basis_scratch(int d, int r) {
    if (basis_solver) return 0.0;
    /* a, w, z, isuppz as basis_impl allocates them + dsyevr's work (26 d doubles, 10 d ints) */
    return 8.0 * ((double)d * d + d + (double)d * r + 26.0 * d) + 4.0 * (2.0 * r + 10.0 * d);
}

int ln_nullspace_basis(const double *C, int d, int r, double *U, double *evals, ln_err *e) {
    return basis_impl(C, d, r, U, evals, 1, e);
}

int ln_nullspace_basis_1t(const double *C, int d, int r, double *U, double *evals, ln_err *e) {
    return basis_impl(C, d, r, U, evals, 0, e);
}

int ln_nullspace_factor(const float *W0, int d_out, int d_in, const double *U, int r, double scale,
                        float *A, float *B, ln_err *e) {
    if (r <= 0 || r > d_in || r > d_out)
        return ln_errf(e, "LoRA-Null factor: rank %d exceeds the layer's %d x %d shape", r, d_out, d_in);
    if (!(scale > 0.0)) return ln_errf(e, "LoRA-Null factor: scale (alpha/r) must be positive, got %g", scale);
    int rc = -1;
    double *M = NULL, *s = NULL, *P = NULL, *Qt = NULL, *UQ = NULL, *rowd = NULL;
    M = ln_try_alloc((size_t)d_out * r * sizeof(double), "LoRA-Null: W0 U", e);
    s = ln_try_alloc((size_t)r * sizeof(double), "LoRA-Null: singular values", e);
    P = ln_try_alloc((size_t)d_out * r * sizeof(double), "LoRA-Null: left vectors", e);
    Qt = ln_try_alloc((size_t)r * r * sizeof(double), "LoRA-Null: right vectors", e);
    UQ = ln_try_alloc((size_t)d_in * r * sizeof(double), "LoRA-Null: U Q", e);
    if (!M || !s || !P || !Qt || !UQ) goto out;

    /* M = W0 U, a block of W0's rows at a time in fp64 (no d_out × d_in fp64 copy of W0). */
    rowd = ln_try_alloc((size_t)FACTOR_BLOCK_ROWS * d_in * sizeof(double), "LoRA-Null: row block", e);
    if (!rowd) goto out;
    for (int i0 = 0; i0 < d_out; i0 += FACTOR_BLOCK_ROWS) {
        int rows = d_out - i0 < FACTOR_BLOCK_ROWS ? d_out - i0 : FACTOR_BLOCK_ROWS;
        const float *w = W0 + (size_t)i0 * d_in;
        for (size_t k = 0; k < (size_t)rows * d_in; k++) rowd[k] = w[k];
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, r, d_in, 1.0, rowd, d_in, U, r,
                    0.0, M + (size_t)i0 * r, r);
    }
    /* Thin SVD of the d_out × r matrix M = P diag(s) Qᵀ (dgesdd overwrites M). */
    lapack_int info = LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', d_out, r, M, r, s, P, r, Qt, r);
    if (info != 0) {
        ln_lapack_fail(e, (int)info, "LoRA-Null factor: SVD of W0 U (%d x %d)", d_out, r);
        goto out;
    }
    /* UQ = U Q (d_in × r): column j is the direction of A's row j. */
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, d_in, r, r, 1.0, U, r, Qt, r, 0.0, UQ, r);
    for (int j = 0; j < r; j++) {
        double g = sqrt(s[j] / scale);
        for (int k = 0; k < d_in; k++) A[(size_t)j * d_in + k] = (float)(g * UQ[(size_t)k * r + j]);
        for (int i = 0; i < d_out; i++) B[(size_t)i * r + j] = (float)(P[(size_t)i * r + j] * g);
    }
    rc = 0;
out:
    free(M);
    free(s);
    free(P);
    free(Qt);
    free(UQ);
    free(rowd);
    return rc;
}

int ln_residual_apply(float *W, int d_out, int d_in, const float *B, const float *A, int r, double scale, ln_err *e) {
    /* scale·B A from the fp32 factors, accumulated in fp64, then one rounding of W0 − scale·BA to
     * fp32: so W0' + scale·BA = W0 up to half an ulp of W0'. Row blocks bound the scratch. */
    const int blk = d_out < FACTOR_BLOCK_ROWS ? d_out : FACTOR_BLOCK_ROWS;
    const size_t nb = (size_t)d_out * r, na = (size_t)r * d_in, np = (size_t)blk * d_in;
    double *bd = ln_try_allocf(nb + na + np, sizeof(double), e, "residual",
                               "the fp64 factors and row block of a %d x %d weight at rank %d", d_out, d_in, r);
    if (!bd) return -1;
    double *ad = bd + nb, *pd = ad + na;
    for (size_t k = 0; k < nb; k++) bd[k] = B[k];
    for (size_t k = 0; k < na; k++) ad[k] = A[k];
    ln_blas_threads_begin(); /* the same threads at init and when a resume re-applies it */
    for (int i0 = 0; i0 < d_out; i0 += blk) {
        int rows = d_out - i0 < blk ? d_out - i0 : blk;
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d_in, r, scale, bd + (size_t)i0 * r, r, ad,
                    d_in, 0.0, pd, d_in);
        float *w = W + (size_t)i0 * d_in;
        for (size_t k = 0; k < (size_t)rows * d_in; k++) w[k] = (float)((double)w[k] - pd[k]);
    }
    ln_blas_threads_end();
    free(bd);
    return 0;
}

void ln_residual_subtract(float *W, int d_out, int d_in, const float *B, const float *A, int r, double scale) {
    if (ln_residual_apply(W, d_out, d_in, B, A, r, scale, NULL) == 0) return;
    for (int o = 0; o < d_out; o++) {
        float *w = W + (size_t)o * d_in;
        for (int c = 0; c < d_in; c++) {
            double acc = 0.0;
            for (int k = 0; k < r; k++) acc += (double)B[(size_t)o * r + k] * (double)A[(size_t)k * d_in + c];
            w[c] = (float)((double)w[c] - scale * acc);
        }
    }
}
