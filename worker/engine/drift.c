/* drift.c — tr(ΔW C ΔWᵀ) / tr(W0 C W0ᵀ), dense and low-rank (see drift.h). */
#include "worker/engine/drift.h"

#include "worker/engine/nullspace.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"

/* Rows of a dense W converted to fp64 per block: bounds scratch to 2 × 256 × d_in doubles. */
#define DRIFT_BLOCK_ROWS 256

/* tr(W C Wᵀ) = Σ_i w_i C w_iᵀ, and for a symmetric C
 *   w C wᵀ = 2 · w triu(C) wᵀ − Σ_j C_jj w_j²,
 * so one triangular product (dtrmm, half the multiply-adds of the dense W C) gives it. */
int ln_drift_quad_dense(const float *W, int d_out, int d_in, const double *C, double *out, ln_err *e) {
    const int blk = d_out < DRIFT_BLOCK_ROWS ? d_out : DRIFT_BLOCK_ROWS;
    double *wb = ln_try_allocf((size_t)blk * d_in, 2 * sizeof(double), e, "drift trace",
                               "fp64 row blocks of a %d x %d weight", d_out, d_in);
    if (!wb) return -1;
    double *t = wb + (size_t)blk * d_in;
    double acc = 0.0, diag = 0.0;
    ln_blas_threads_begin();
    for (int i0 = 0; i0 < d_out; i0 += blk) {
        const int rows = d_out - i0 < blk ? d_out - i0 : blk;
        const float *w = W + (size_t)i0 * d_in;
        const size_t n = (size_t)rows * d_in;
        for (size_t k = 0; k < n; k++) t[k] = wb[k] = w[k];
        /* t = wb triu(C) */
        cblas_dtrmm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, rows, d_in, 1.0, C, d_in, t,
                    d_in);
        for (size_t k = 0; k < n; k++) acc += t[k] * wb[k];
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < d_in; j++) {
                double x = wb[(size_t)i * d_in + j];
                diag += C[(size_t)j * d_in + j] * x * x;
            }
    }
    ln_blas_threads_end();
    free(wb);
    *out = 2.0 * acc - diag;
    return 0;
}

int ln_drift_quad_lowrank(const float *B1, const float *A1, int r1, const float *B0, const float *A0, int r0,
                          int d_out, int d_in, double scale, const double *C, double *out, ln_err *e) {
    if (!B0 || !A0) r0 = 0;
    const int k = r1 + r0;
    /* one buffer: B̃ (d_out × k), Ã (k × d_in), T (k × d_in), G and H (k × k) */
    size_t nb = (size_t)d_out * k, na = (size_t)k * d_in, nk = (size_t)k * k;
    double *Bt = ln_try_allocf(nb + 2 * na + 2 * nk, sizeof(double), e, "drift trace",
                               "the low-rank trace of a %d x %d layer at rank %d", d_out, d_in, k);
    if (!Bt) return -1;
    double *At = Bt + nb, *T = At + na, *G = T + na, *H = G + nk;
    for (int i = 0; i < d_out; i++) {
        for (int j = 0; j < r1; j++) Bt[(size_t)i * k + j] = B1[(size_t)i * r1 + j];
        for (int j = 0; j < r0; j++) Bt[(size_t)i * k + r1 + j] = -(double)B0[(size_t)i * r0 + j];
    }
    for (size_t x = 0; x < (size_t)r1 * d_in; x++) At[x] = A1[x];
    for (size_t x = 0; x < (size_t)r0 * d_in; x++) At[(size_t)r1 * d_in + x] = A0[x];
    /* G = B̃ᵀ B̃,  H = Ã C Ãᵀ; tr(G H) = Σ G∘H since both are symmetric. */
    ln_blas_threads_begin();
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, k, d_out, 1.0, Bt, k, Bt, k, 0.0, G, k);
    cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, k, d_in, 1.0, C, d_in, At, d_in, 0.0, T, d_in);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, k, k, d_in, 1.0, T, d_in, At, d_in, 0.0, H, k);
    ln_blas_threads_end();
    double acc = 0.0;
    for (size_t x = 0; x < nk; x++) acc += G[x] * H[x];
    *out = scale * scale * (acc > 0.0 ? acc : 0.0); /* ≥ 0 exactly; rounding of a ~0 update may dip below */
    free(Bt);
    return 0;
}

double ln_drift_ratio(double num, double den) { return den > 0.0 ? num / den : 0.0; }

