/* nullspace.h — the calibration covariance of a linear layer's input, its approximate null
 * space, and the LoRA-Null factorisation (DESIGN.md §2, the paper §3.3).
 *
 * Layouts: every matrix is row-major. W0 is d_out × d_in (HF's nn.Linear weight), X is
 * tokens × d_in, C is d_in × d_in, U_null is d_in × r (column j = j-th eigenvector, eigenvalues
 * ascending), A is r × d_in, B is d_out × r. Covariances and eigenvectors are fp64; weights and
 * factors fp32.
 *
 * Ownership: an ln_cov owns its sum; every other buffer belongs to the caller. */
#ifndef LN_NULLSPACE_H
#define LN_NULLSPACE_H

#include <stdint.h>

#include "common/err.h"

/* BLAS threading. The engine runs OpenBLAS single-threaded and parallelises with OpenMP (the cpu
 * backend sets this on its first GEMM). The O(d³) solves of init get OpenMP's thread count for
 * their duration, then OpenBLAS goes back to one thread: so the same thread count gives the same
 * bits whether or not a forward pass ran before (a fresh calibration vs a cache hit). */
void ln_blas_threads_begin(void);
void ln_blas_threads_end(void);

/* Running sum of one layer input's scaled second moments:
 *   sum = Σ_s (X_s/|max X_s|)ᵀ (X_s/|max X_s|),   C = sum / samples.
 * The scale is the absolute value of the (signed) maximum entry of the sample, exactly as the
 * CorDA / LoRA-Null reference code does (`input / torch.max(input).abs()`). */
typedef struct ln_cov {
    int d;            /* input dimension d_in */
    int64_t samples;  /* n: samples accumulated */
    int64_t tokens;   /* rows accumulated over all samples */
    double *sum;      /* d × d; only the upper triangle is kept up to date (dsyrk) */
} ln_cov;

int ln_cov_init(ln_cov *c, int d, ln_err *e);
void ln_cov_free(ln_cov *c);
/* Adds one sample X (tokens × d, fp32). Fails (naming the sample's max) when X holds a NaN/Inf
 * or its maximum is 0, since the reference scaling is then undefined. */
int ln_cov_add_sample(ln_cov *c, const float *X, int tokens, ln_err *e);
/* The same, faster: the sample's product in fp32 (ssyrk straight on X with alpha = 1/max², into
 * scratch), only the sum across samples in fp64. Half the cost of the fp64 product; each sample's
 * sum over its tokens carries fp32 rounding (~1e-7 relative; the reference accumulates everything in
 * fp32). scratch: at least d × d floats, owned by the caller (one buffer can serve covariances
 * added one after another). */
int ln_cov_add_sample_f32(ln_cov *c, const float *X, int tokens, float *scratch, ln_err *e);
/* Adds another partial sum of the same input (e.g. from another thread or rank). */
int ln_cov_merge(ln_cov *into, const ln_cov *from, ln_err *e);
/* Writes C = sum / samples as a full symmetric d × d matrix. */
int ln_cov_finish(const ln_cov *c, double *C, ln_err *e);

/* Eigenvectors of the r smallest eigenvalues of the symmetric d × d matrix C, by LAPACK's
 * subset solver dsyevr (range 'I', indices 1..r): C is reduced to tridiagonal form once and only r
 * eigenvectors are computed — never a full SVD of C. U (d × r) gets the vectors in ascending
 * eigenvalue order; evals (r, may be NULL) the eigenvalues. C is not modified. */
int ln_nullspace_basis(const double *C, int d, int r, double *U, double *evals, ln_err *e);
/* Host bytes one basis solve allocates besides U (a copy of C, the eigenvectors, dsyevr's work
 * space), or 0 when an accelerator's solver is installed (its memory is the device's). */
double ln_nullspace_basis_scratch(int d, int r);
/* The same on the caller's thread with OpenBLAS left as it is (one thread in the engine): for
 * solving several covariances at once from an OpenMP loop. Its bits do not depend on the thread
 * count. */
int ln_nullspace_basis_1t(const double *C, int d, int r, double *U, double *evals, ln_err *e);

/* The sentence for a LAPACKE call that returned info ≠ 0: "<call>: out of memory in LAPACK's work
 * space or row-major copy" when LAPACKE could not allocate (LAPACKE's row-major interface copies
 * the matrix), else "<call> failed (LAPACK info N)". call is printf-style. Returns −1. */
int ln_lapack_fail(ln_err *e, int info, const char *call_fmt, ...) __attribute__((format(printf, 3, 4)));

/* An accelerator can take over the subset eigensolve of both functions above: the CUDA build
 * installs cuSOLVER's syevdx (lnb_cuda_nullspace_basis, worker/backend/cuda/cuda.h) when a job
 * runs on a GPU. Same contract (U d × r ascending, evals may be NULL); it must be thread-safe,
 * since bases are solved from an OpenMP loop. NULL restores LAPACK. Process-wide. */
typedef int (*ln_basis_solver)(const double *C, int d, int r, double *U, double *evals, ln_err *e);
void ln_nullspace_set_basis_solver(ln_basis_solver fn);

/* The LoRA-Null factors of W0 on the basis U (d_in × r, orthonormal columns):
 *   M = W0 U (d_out × r),  thin SVD M = P S Qᵀ,
 *   W0 U Uᵀ = P S (U Q)ᵀ  ⇒  B = P √S / √scale,  A = √S (U Q)ᵀ / √scale,
 * so that scale · B A = W0 U Uᵀ. scale is PEFT's alpha / r (1 in the paper). Only an r × r-sized
 * SVD is done; no d_out × d_in SVD. */
int ln_nullspace_factor(const float *W0, int d_out, int d_in, const double *U, int r, double scale,
                        float *A, float *B, ln_err *e);

/* W ← W − scale · B A in place (the residual W0' of every residual-based method), computed with
 * the fp32 factors as they will be used, so that W0' + scale·B A reproduces W0 to fp32 rounding.
 * A negative scale adds the product back (W0 rebuilt from W0', as the drift tracker does).
 * Fails, leaving W untouched, when its fp64 scratch ((d_out + min(d_out, 256))·d_in-sized: the
 * factors and a block of rows) cannot be had: "residual: out of memory allocating …". */
int ln_residual_apply(float *W, int d_out, int d_in, const float *B, const float *A, int r, double scale, ln_err *e);

/* The same for callers that cannot fail (tensor_parallel.c until it takes the error): when the
 * scratch cannot be had it falls back to a row-at-a-time fp64 product that needs none (the same
 * W0' up to fp64 rounding before the one fp32 rounding), instead of aborting the worker. */
void ln_residual_subtract(float *W, int d_out, int d_in, const float *B, const float *A, int r, double scale);

#endif
