/* drift.c — tr(ΔW C ΔWᵀ) / tr(W0 C W0ᵀ), dense and low-rank (see drift.h). */
#include "worker/engine/drift.h"

#include "worker/engine/nullspace.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

/* Rows of a dense W converted to fp64 per block: bounds scratch to 2 × 128 × d_in doubles. */
#define DRIFT_BLOCK_ROWS 128

double ln_drift_quad_dense(const float *W, int d_out, int d_in, const double *C) {
    size_t blk = (size_t)(d_out < DRIFT_BLOCK_ROWS ? d_out : DRIFT_BLOCK_ROWS) * d_in;
    double *wb = malloc(blk * sizeof(double)), *t = malloc(blk * sizeof(double));
    if (!wb || !t) {
        free(wb);
        free(t);
        return -1.0;
    }
    double acc = 0.0;
    ln_blas_threads_begin();
    for (int i0 = 0; i0 < d_out; i0 += DRIFT_BLOCK_ROWS) {
        int rows = d_out - i0 < DRIFT_BLOCK_ROWS ? d_out - i0 : DRIFT_BLOCK_ROWS;
        const float *w = W + (size_t)i0 * d_in;
        for (size_t k = 0; k < (size_t)rows * d_in; k++) wb[k] = w[k];
        /* t = wb C (C symmetric) */
        cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, rows, d_in, 1.0, C, d_in, wb, d_in, 0.0, t, d_in);
        for (size_t k = 0; k < (size_t)rows * d_in; k++) acc += t[k] * wb[k];
    }
    ln_blas_threads_end();
    free(wb);
    free(t);
    return acc;
}

double ln_drift_quad_lowrank(const float *B1, const float *A1, int r1, const float *B0, const float *A0,
                             int r0, int d_out, int d_in, double scale, const double *C) {
    if (!B0 || !A0) r0 = 0;
    const int k = r1 + r0;
    double *Bt = malloc((size_t)d_out * k * sizeof(double));
    double *At = malloc((size_t)k * d_in * sizeof(double));
    double *T = malloc((size_t)k * d_in * sizeof(double));
    double *G = malloc((size_t)k * k * sizeof(double));
    double *H = malloc((size_t)k * k * sizeof(double));
    double out = -1.0;
    if (!Bt || !At || !T || !G || !H) goto done;
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
    for (size_t x = 0; x < (size_t)k * k; x++) acc += G[x] * H[x];
    out = scale * scale * (acc > 0.0 ? acc : 0.0); /* ≥ 0 exactly; rounding of a ~0 update may dip below */
done:
    free(Bt);
    free(At);
    free(T);
    free(G);
    free(H);
    return out;
}

double ln_drift_ratio(double num, double den) { return den > 0.0 ? num / den : 0.0; }

