/* Unit tests for worker/engine/{nullspace,lora_init,drift}: covariance accumulation against a
 * naive sum, the subset eigensolver against a matrix of known spectrum, the LoRA-Null factor
 * properties (product, subspace, residual), every method's init invariants, and knowledge drift
 * from C against drift measured directly on the activations. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <omp.h>

#include "common/err.h"
#include "worker/engine/drift.h"
#include "worker/engine/lora_init.h"
#include "worker/engine/nullspace.h"

/* ---------------------------------------------------------------- helpers */

static uint64_t rng_state;
static double urand(void) { /* [0,1) */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}
static double nrand(void) {
    double u = urand() + 1e-300, v = urand();
    return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
}
static float *rand_f32(size_t n, double sd) {
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++) p[i] = (float)(nrand() * sd);
    return p;
}

/* Random orthogonal d × d matrix (QR of a Gaussian matrix), row-major. */
static double *rand_orthogonal(int d) {
    double *q = malloc((size_t)d * d * sizeof *q), *tau = malloc((size_t)d * sizeof *tau);
    for (size_t i = 0; i < (size_t)d * d; i++) q[i] = nrand();
    assert_int_equal(LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, d, d, q, d, tau), 0);
    assert_int_equal(LAPACKE_dorgqr(LAPACK_ROW_MAJOR, d, d, d, q, d, tau), 0);
    free(tau);
    return q;
}

/* C = Q diag(lam) Qᵀ */
static double *spd_with_spectrum(const double *Q, const double *lam, int d) {
    double *C = calloc((size_t)d * d, sizeof *C);
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) {
            double s = 0;
            for (int k = 0; k < d; k++) s += Q[(size_t)i * d + k] * lam[k] * Q[(size_t)j * d + k];
            C[(size_t)i * d + j] = s;
        }
    return C;
}

/* Naive C = Σ_s (X_s/|max X_s|)ᵀ(X_s/|max X_s|) / n for n samples of t tokens. */
static double *naive_cov(float *const *X, const int *t, int n, int d) {
    double *C = calloc((size_t)d * d, sizeof *C);
    for (int s = 0; s < n; s++) {
        float mx = -INFINITY;
        for (size_t i = 0; i < (size_t)t[s] * d; i++) mx = X[s][i] > mx ? X[s][i] : mx;
        double sc = 1.0 / fabs(mx);
        for (int a = 0; a < d; a++)
            for (int b = 0; b < d; b++) {
                double acc = 0;
                for (int k = 0; k < t[s]; k++)
                    acc += X[s][(size_t)k * d + a] * sc * X[s][(size_t)k * d + b] * sc;
                C[(size_t)a * d + b] += acc / n;
            }
    }
    return C;
}

static double max_abs_diff_d(const double *a, const double *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(a[i] - b[i]));
    return m;
}

/* P = scale · B A in fp64 (d_out × d_in). */
static double *product(const float *B, const float *A, int d_out, int d_in, int r, double scale) {
    double *P = calloc((size_t)d_out * d_in, sizeof *P);
    for (int i = 0; i < d_out; i++)
        for (int k = 0; k < r; k++) {
            double b = B[(size_t)i * r + k] * scale;
            for (int j = 0; j < d_in; j++) P[(size_t)i * d_in + j] += b * A[(size_t)k * d_in + j];
        }
    return P;
}

static double fro_d(const double *a, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * a[i];
    return sqrt(s);
}

/* ---------------------------------------------------------------- covariance */

static void test_cov_matches_naive_sum(void **state) {
    (void)state;
    rng_state = 1;
    const int d = 7, n = 3;
    int t[3] = {5, 300, 1}; /* 300 > one 256-row chunk */
    float *X[3];
    for (int s = 0; s < n; s++) X[s] = rand_f32((size_t)t[s] * d, 1.0 + s);
    X[1][5] = -50.0f; /* a large negative entry: the scale is |max X|, not max|X| */
    ln_cov c;
    ln_err e;
    assert_int_equal(ln_cov_init(&c, d, &e), 0);
    for (int s = 0; s < n; s++) assert_int_equal(ln_cov_add_sample(&c, X[s], t[s], &e), 0);
    assert_int_equal(c.samples, 3);
    assert_int_equal(c.tokens, 306);
    double *C = malloc((size_t)d * d * sizeof *C);
    assert_int_equal(ln_cov_finish(&c, C, &e), 0);
    double *ref = naive_cov(X, t, n, d);
    assert_true(max_abs_diff_d(C, ref, (size_t)d * d) < 1e-9 * fro_d(ref, (size_t)d * d));
    /* merge of two halves == one sum */
    ln_cov a, b;
    assert_int_equal(ln_cov_init(&a, d, &e), 0);
    assert_int_equal(ln_cov_init(&b, d, &e), 0);
    assert_int_equal(ln_cov_add_sample(&a, X[0], t[0], &e), 0);
    assert_int_equal(ln_cov_add_sample(&b, X[1], t[1], &e), 0);
    assert_int_equal(ln_cov_add_sample(&b, X[2], t[2], &e), 0);
    assert_int_equal(ln_cov_merge(&a, &b, &e), 0);
    double *C2 = malloc((size_t)d * d * sizeof *C2);
    assert_int_equal(ln_cov_finish(&a, C2, &e), 0);
    assert_true(max_abs_diff_d(C, C2, (size_t)d * d) < 1e-12);
    /* the fp32-product path: each sample's XᵀX rounded in fp32, so ~1e-6 of the fp64 result */
    ln_cov f;
    float *scratch = malloc((size_t)d * d * sizeof *scratch);
    assert_int_equal(ln_cov_init(&f, d, &e), 0);
    for (int s = 0; s < n; s++) assert_int_equal(ln_cov_add_sample_f32(&f, X[s], t[s], scratch, &e), 0);
    assert_int_equal(ln_cov_finish(&f, C2, &e), 0);
    assert_true(max_abs_diff_d(C, C2, (size_t)d * d) < 1e-6 * fro_d(ref, (size_t)d * d));
    assert_true(max_abs_diff_d(C, C2, (size_t)d * d) > 0.0); /* it did run in fp32 */
    free(scratch);
    ln_cov_free(&f);
    ln_cov_free(&a);
    ln_cov_free(&b);
    ln_cov_free(&c);
    for (int s = 0; s < n; s++) free(X[s]);
    free(C);
    free(C2);
    free(ref);
}

/* A width where the fp32 product is split over threads by column blocks: every upper entry is
 * still written once, and agrees with the fp64 route. */
static void test_cov_f32_split_matches_f64(void **state) {
    (void)state;
    rng_state = 11;
    const int d = 333, t = 70;
    float *X = rand_f32((size_t)t * d, 1.0), *scratch = malloc((size_t)d * d * sizeof(float));
    for (size_t i = 0; i < (size_t)d * d; i++) scratch[i] = NAN; /* unwritten entries would poison the sum */
    ln_cov a, b;
    ln_err e;
    assert_int_equal(ln_cov_init(&a, d, &e), 0);
    assert_int_equal(ln_cov_init(&b, d, &e), 0);
    assert_int_equal(ln_cov_add_sample(&a, X, t, &e), 0);
    assert_int_equal(ln_cov_add_sample_f32(&b, X, t, scratch, &e), 0);
    double *Ca = malloc((size_t)d * d * sizeof *Ca), *Cb = malloc((size_t)d * d * sizeof *Cb);
    assert_int_equal(ln_cov_finish(&a, Ca, &e), 0);
    assert_int_equal(ln_cov_finish(&b, Cb, &e), 0);
    assert_true(max_abs_diff_d(Ca, Cb, (size_t)d * d) < 1e-5 * fro_d(Ca, (size_t)d * d) / d);
    ln_cov_free(&a);
    ln_cov_free(&b);
    free(X);
    free(scratch);
    free(Ca);
    free(Cb);
}

static void test_cov_rejects_bad_samples(void **state) {
    (void)state;
    ln_cov c;
    ln_err e;
    assert_int_equal(ln_cov_init(&c, 2, &e), 0);
    float zeros[4] = {0, 0, -1, 0};
    assert_int_equal(ln_cov_add_sample(&c, zeros, 2, &e), -1);
    assert_non_null(strstr(e.msg, "maximum activation 0"));
    float bad[4] = {1, NAN, 0, 0};
    assert_int_equal(ln_cov_add_sample(&c, bad, 2, &e), -1);
    assert_non_null(strstr(e.msg, "token 0, dim 1"));
    double C[4];
    assert_int_equal(ln_cov_finish(&c, C, &e), -1);
    assert_non_null(strstr(e.msg, "no calibration samples"));
    ln_cov_free(&c);
    assert_int_equal(ln_cov_init(&c, 0, &e), -1);
}

/* ---------------------------------------------------------------- null space */

static void test_basis_known_spectrum(void **state) {
    (void)state;
    rng_state = 2;
    const int d = 24, r = 5;
    double *Q = rand_orthogonal(d), lam[24];
    /* eigenvalue of column k is (k+1)^2 shuffled: the r smallest are columns 3,7,11,15,19 */
    for (int k = 0; k < d; k++) lam[k] = 100.0 + k;
    const int small[5] = {3, 7, 11, 15, 19};
    for (int i = 0; i < r; i++) lam[small[i]] = 1e-3 * (i + 1);
    double *C = spd_with_spectrum(Q, lam, d);
    double *U = malloc((size_t)d * r * sizeof *U), ev[5];
    ln_err e;
    assert_int_equal(ln_nullspace_basis(C, d, r, U, ev, &e), 0);
    for (int i = 0; i < r; i++) assert_true(fabs(ev[i] - 1e-3 * (i + 1)) < 1e-10);
    /* each returned vector is ± the planted one */
    for (int i = 0; i < r; i++) {
        double dot = 0;
        for (int k = 0; k < d; k++) dot += U[(size_t)k * r + i] * Q[(size_t)k * d + small[i]];
        assert_true(fabs(fabs(dot) - 1.0) < 1e-8);
    }
    assert_int_equal(ln_nullspace_basis(C, d, d + 1, U, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "rank 25"));
    free(Q);
    free(C);
    free(U);
}

/* The basis is bit for bit what LAPACKE's row-major dsyevr (which copies C's upper triangle into a
 * column-major matrix) gives — for a C whose two halves differ in the last bits, too — with one
 * d² copy less: sizes that are one block, several, and the null space of a rank-deficient C. */
static void test_basis_bits_equal_row_major_lapacke(void **state) {
    (void)state;
    rng_state = 12;
    const int sizes[][2] = {{24, 5}, {130, 9}, {301, 17}};
    ln_err e;
    for (size_t c = 0; c < sizeof sizes / sizeof *sizes; c++) {
        const int d = sizes[c][0], r = sizes[c][1], tokens = d - r / 2;
        float *X = rand_f32((size_t)tokens * d, 1.0);
        double *C = calloc((size_t)d * d, sizeof *C);
        for (int i = 0; i < d; i++)
            for (int j = 0; j < d; j++) {
                double acc = 0;
                for (int k = 0; k < tokens; k++) acc += (double)X[(size_t)k * d + i] * X[(size_t)k * d + j];
                C[(size_t)i * d + j] = acc / tokens;
            }
        C[(size_t)(d - 1) * d + 0] *= 1.0 + 1e-15; /* the lower half must not matter */
        double *U = malloc((size_t)d * r * sizeof *U), *Uref = malloc((size_t)d * r * sizeof *Uref);
        double *a = malloc((size_t)d * d * sizeof *a), *w = malloc((size_t)d * sizeof *w), ev[17];
        lapack_int *isuppz = malloc((size_t)2 * r * sizeof *isuppz), m = 0;
        memcpy(a, C, (size_t)d * d * sizeof *a);
        ln_blas_threads_end(); /* one BLAS thread on both sides: the bits of a threaded BLAS vary */
        assert_int_equal(LAPACKE_dsyevr(LAPACK_ROW_MAJOR, 'V', 'I', 'U', d, a, d, 0.0, 0.0, 1, r, 0.0, &m, w, Uref, r,
                                        isuppz), 0);
        assert_int_equal(m, r);
        assert_int_equal(ln_nullspace_basis_1t(C, d, r, U, ev, &e), 0);
        assert_memory_equal(U, Uref, (size_t)d * r * sizeof *U);
        assert_memory_equal(ev, w, (size_t)r * sizeof *ev);
        free(X);
        free(C);
        free(U);
        free(Uref);
        free(a);
        free(w);
        free(isuppz);
    }
}

/* W0 U Uᵀ = scale·B A, rows of A span exactly the basis, residual restores W0, and for any B'
 * the update B' A leaves exact-null-space activations unchanged (v2's guarantee). */
static void test_factor_properties(void **state) {
    (void)state;
    rng_state = 3;
    const int d_in = 32, d_out = 20, r = 6, tokens = 200;
    /* Activations of rank d_in − r: X = Z G with G (d_in−r) × d_in, so C has an exact r-dim null space. */
    double *G = malloc((size_t)(d_in - r) * d_in * sizeof *G);
    for (size_t i = 0; i < (size_t)(d_in - r) * d_in; i++) G[i] = nrand();
    float *X = malloc((size_t)tokens * d_in * sizeof *X);
    double z[32];
    for (int t = 0; t < tokens; t++) {
        for (int k = 0; k < d_in - r; k++) z[k] = nrand() * 0.3;
        for (int j = 0; j < d_in; j++) {
            double s = 0;
            for (int k = 0; k < d_in - r; k++) s += z[k] * G[(size_t)k * d_in + j];
            X[(size_t)t * d_in + j] = (float)s;
        }
    }
    ln_cov cov;
    ln_err e;
    assert_int_equal(ln_cov_init(&cov, d_in, &e), 0);
    assert_int_equal(ln_cov_add_sample(&cov, X, 120, &e), 0);
    assert_int_equal(ln_cov_add_sample(&cov, X + (size_t)120 * d_in, tokens - 120, &e), 0);
    double *C = malloc((size_t)d_in * d_in * sizeof *C);
    assert_int_equal(ln_cov_finish(&cov, C, &e), 0);
    double *U = malloc((size_t)d_in * r * sizeof *U), ev[6];
    assert_int_equal(ln_nullspace_basis(C, d_in, r, U, ev, &e), 0);
    for (int i = 0; i < r; i++) assert_true(fabs(ev[i]) < 1e-10);

    float *W0 = rand_f32((size_t)d_out * d_in, 0.2);
    for (int si = 0; si < 2; si++) {
        double scale = si == 0 ? 1.0 : 2.5; /* alpha = r and alpha = 2.5 r: same product */
        float *A = malloc((size_t)r * d_in * sizeof *A), *B = malloc((size_t)d_out * r * sizeof *B);
        assert_int_equal(ln_nullspace_factor(W0, d_out, d_in, U, r, scale, A, B, &e), 0);
        double *P = product(B, A, d_out, d_in, r, scale);
        /* reference: W0 U Uᵀ */
        double maxdiff = 0, maxref = 0;
        for (int i = 0; i < d_out; i++)
            for (int j = 0; j < d_in; j++) {
                double s = 0;
                for (int k = 0; k < r; k++) {
                    double wu = 0;
                    for (int c = 0; c < d_in; c++) wu += W0[(size_t)i * d_in + c] * U[(size_t)c * r + k];
                    s += wu * U[(size_t)j * r + k];
                }
                maxdiff = fmax(maxdiff, fabs(s - P[(size_t)i * d_in + j]));
                maxref = fmax(maxref, fabs(s));
            }
        assert_true(maxdiff < 1e-6 * maxref + 1e-7);
        /* rows of A span exactly span(U): A (I − U Uᵀ) = 0 and A U (r × r) is nonsingular */
        double *AU = calloc((size_t)r * r, sizeof *AU), outside = 0, amax = 0;
        for (int a = 0; a < r; a++) {
            for (int k = 0; k < r; k++)
                for (int c = 0; c < d_in; c++) AU[a * r + k] += A[(size_t)a * d_in + c] * U[(size_t)c * r + k];
            for (int c = 0; c < d_in; c++) {
                double proj = 0;
                for (int k = 0; k < r; k++) proj += AU[a * r + k] * U[(size_t)c * r + k];
                outside = fmax(outside, fabs(A[(size_t)a * d_in + c] - proj));
                amax = fmax(amax, fabs(A[(size_t)a * d_in + c]));
            }
        }
        assert_true(outside < 1e-6 * amax);
        double sv[6], *au = malloc((size_t)r * r * sizeof *au), *tmp = malloc((size_t)r * r * sizeof *tmp);
        memcpy(au, AU, (size_t)r * r * sizeof *au);
        assert_int_equal(LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'N', r, r, au, r, sv, NULL, r, NULL, r), 0);
        assert_true(sv[r - 1] > 1e-3 * sv[0]);
        free(au);
        free(tmp);
        /* residual: W0' + scale·BA = W0 to fp32 rounding */
        float *W = malloc((size_t)d_out * d_in * sizeof *W);
        memcpy(W, W0, (size_t)d_out * d_in * sizeof *W);
        ln_residual_subtract(W, d_out, d_in, B, A, r, scale);
        for (size_t i = 0; i < (size_t)d_out * d_in; i++) {
            double back = (double)W[i] + P[i];
            assert_true(fabs(back - W0[i]) <= 0x1.0p-24 * fabs(W[i]) * 1.0001 + 1e-15); /* half an ulp of W0' */
        }
        /* v2: any B' gives B' A x ≈ 0 on every activation */
        float *Bp = rand_f32((size_t)d_out * r, 1.0);
        double num, den;
        assert_int_equal(ln_drift_quad_lowrank(Bp, A, r, NULL, NULL, 0, d_out, d_in, scale, C, &num, &e), 0);
        assert_int_equal(ln_drift_quad_dense(W0, d_out, d_in, C, &den, &e), 0);
        assert_true(den > 0);
        assert_true(ln_drift_ratio(num, den) < 1e-8);
        free(Bp);
        free(W);
        free(AU);
        free(P);
        free(A);
        free(B);
    }
    ln_cov_free(&cov);
    free(G);
    free(X);
    free(C);
    free(U);
    free(W0);
}

/* ---------------------------------------------------------------- methods */

static void test_method_names(void **state) {
    (void)state;
    ln_method m;
    ln_err e;
    for (int i = 0; i < LN_METHOD_COUNT; i++) {
        assert_int_equal(ln_method_parse(ln_method_name((ln_method)i), &m, &e), 0);
        assert_int_equal(m, i);
    }
    assert_int_equal(ln_method_parse("lora-null", &m, &e), -1);
    assert_non_null(strstr(e.msg, "unknown method 'lora-null'"));
    assert_non_null(strstr(e.msg, "lora_null_v2"));
    assert_false(ln_method_trains_a(LN_METHOD_LORA_NULL_V2));
    assert_true(ln_method_trains_a(LN_METHOD_LORA_NULL_V1));
    assert_false(ln_method_trains_a(LN_METHOD_LORA_FA));
    assert_true(ln_method_needs_calibration(LN_METHOD_CORDA));
    assert_false(ln_method_needs_calibration(LN_METHOD_PISSA));
    assert_true(ln_method_has_residual(LN_METHOD_MILORA));
    assert_false(ln_method_has_residual(LN_METHOD_LORA));
    assert_false(ln_method_is_adapter(LN_METHOD_FULL));
}

/* Singular values of W (descending) by an independent route: eigenvalues of W Wᵀ. */
static void singular_values(const float *W, int d_out, int d_in, double *sv) {
    double *g = calloc((size_t)d_out * d_out, sizeof *g), *w = malloc((size_t)d_out * sizeof *w);
    for (int i = 0; i < d_out; i++)
        for (int j = 0; j < d_out; j++)
            for (int k = 0; k < d_in; k++) g[i * d_out + j] += (double)W[(size_t)i * d_in + k] * W[(size_t)j * d_in + k];
    assert_int_equal(LAPACKE_dsyev(LAPACK_ROW_MAJOR, 'N', 'U', d_out, g, d_out, w), 0);
    for (int i = 0; i < d_out; i++) sv[i] = sqrt(fmax(w[d_out - 1 - i], 0));
    free(g);
    free(w);
}

/* Every residual method: W' + scale·BA = W0; pissa/milora take exactly the top/bottom r singular
 * values' energy; corda's product reproduces its definition; lora has B = 0 and a bounded A. */
static void test_every_method_init(void **state) {
    (void)state;
    rng_state = 4;
    const int d_out = 12, d_in = 16, r = 3;
    const double scale = 0.5;
    float *W0 = rand_f32((size_t)d_out * d_in, 0.3);
    double *Q = rand_orthogonal(d_in), lam[16];
    for (int k = 0; k < d_in; k++) lam[k] = 0.01 + k * k * 0.1;
    double *C = spd_with_spectrum(Q, lam, d_in);
    double sv[12];
    singular_values(W0, d_out, d_in, sv);
    ln_err e;
    for (int m = 0; m < LN_METHOD_COUNT; m++) {
        float *W = malloc((size_t)d_out * d_in * sizeof *W), *A = calloc((size_t)r * d_in, sizeof *A),
              *B = calloc((size_t)d_out * r, sizeof *B);
        memcpy(W, W0, (size_t)d_out * d_in * sizeof *W);
        ln_layer_init li = {.d_out = d_out, .d_in = d_in, .r = r, .scale = scale, .C = C, .seed = 9};
        assert_int_equal(ln_init_layer((ln_method)m, &li, W, A, B, &e), 0);
        double *P = product(B, A, d_out, d_in, r, scale);
        for (size_t i = 0; i < (size_t)d_out * d_in; i++)
            assert_true(fabs(W[i] + P[i] - W0[i]) <= 1e-6 * (fabs(W0[i]) + fabs(P[i])) + 1e-7);
        double e2 = 0;
        for (size_t i = 0; i < (size_t)d_out * d_in; i++) e2 += P[i] * P[i];
        if (m == LN_METHOD_PISSA || m == LN_METHOD_MILORA) {
            double want = 0;
            for (int i = 0; i < r; i++) want += pow(sv[m == LN_METHOD_PISSA ? i : d_out - 1 - i], 2);
            assert_true(fabs(e2 - want) < 1e-5 * want);
        }
        if (m == LN_METHOD_LORA || m == LN_METHOD_LORA_FA) {
            assert_true(e2 == 0.0);
            double amax = 0;
            for (size_t i = 0; i < (size_t)r * d_in; i++) amax = fmax(amax, fabs(A[i]));
            assert_true(amax > 0 && amax <= 1.0 / sqrt(d_in));
        }
        if (m == LN_METHOD_CORDA) {
            /* definition: scale·BA = (last r components of W C') C'⁻¹, i.e. (scale·BA) C' is the
             * rank-r part of W C' with the smallest singular values: its energy is their sum. */
            double damp = ln_corda_damp(C, d_in, &e);
            assert_true(damp == 0.01); /* well conditioned: no doubling */
            double *Cf = malloc((size_t)d_in * d_in * sizeof *Cf), mean = 0;
            memcpy(Cf, C, (size_t)d_in * d_in * sizeof *Cf);
            for (int i = 0; i < d_in; i++) mean += C[i * d_in + i] / d_in;
            for (int i = 0; i < d_in; i++) Cf[i * d_in + i] += mean * damp;
            double *PC = calloc((size_t)d_out * d_in, sizeof *PC);
            float *WC = malloc((size_t)d_out * d_in * sizeof *WC);
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d_out, d_in, d_in, 1.0, P, d_in, Cf, d_in, 0, PC, d_in);
            for (int i = 0; i < d_out; i++)
                for (int j = 0; j < d_in; j++) {
                    double s = 0;
                    for (int k = 0; k < d_in; k++) s += W0[(size_t)i * d_in + k] * Cf[k * d_in + j];
                    WC[(size_t)i * d_in + j] = (float)s;
                }
            double svc[12], got = 0, want = 0;
            singular_values(WC, d_out, d_in, svc);
            for (size_t i = 0; i < (size_t)d_out * d_in; i++) got += PC[i] * PC[i];
            for (int i = 0; i < r; i++) want += svc[d_out - 1 - i] * svc[d_out - 1 - i];
            assert_true(fabs(got - want) < 1e-4 * want);
            free(Cf);
            free(PC);
            free(WC);
        }
        free(P);
        free(W);
        free(A);
        free(B);
    }
    /* errors name the method and the cause */
    float A[1], B[1];
    ln_layer_init bad = {.d_out = d_out, .d_in = d_in, .r = 13, .scale = 1.0, .C = C};
    assert_int_equal(ln_init_layer(LN_METHOD_PISSA, &bad, W0, A, B, &e), -1);
    assert_non_null(strstr(e.msg, "pissa init: rank 13"));
    ln_layer_init nocal = {.d_out = d_out, .d_in = d_in, .r = 2, .scale = 1.0};
    assert_int_equal(ln_init_layer(LN_METHOD_LORA_NULL_V2, &nocal, W0, A, B, &e), -1);
    assert_non_null(strstr(e.msg, "lora_null_v2 init: needs a calibration covariance"));
    free(W0);
    free(Q);
    free(C);
}

static void test_corda_damp_doubles_on_singular(void **state) {
    (void)state;
    rng_state = 5;
    const int d = 40;
    double *Q = rand_orthogonal(d), lam[40];
    for (int k = 0; k < d; k++) lam[k] = k < 30 ? 1.0 : 0.0; /* singular */
    lam[0] = 1e6;                                          /* mean(diag) large vs the rest */
    double *C = spd_with_spectrum(Q, lam, d);
    ln_err e;
    double damp = ln_corda_damp(C, d, &e);
    assert_true(damp >= 0.01);
    free(Q);
    free(C);
}

/* q,k,v share one C: a registered C is decomposed once per rank; an unregistered one every time;
 * the shared and the private path give bit-identical factors. */
static void test_basis_shared_between_layers(void **state) {
    (void)state;
    rng_state = 7;
    const int d = 20, d_out = 8, r = 3;
    double *Q = rand_orthogonal(d), lam[20];
    for (int k = 0; k < d; k++) lam[k] = 0.5 + k;
    double *C = spd_with_spectrum(Q, lam, d);
    float *W0 = rand_f32((size_t)d_out * d, 0.3);
    float W[8 * 20], A[3][3 * 20], B[3][8 * 3], Ap[3 * 20], Bp[8 * 3];
    ln_layer_init li = {.d_out = d_out, .d_in = d, .r = r, .scale = 1.0, .C = C};
    ln_err e;
    long before = ln_init_eigensolves();
    ln_init_share_basis(C, d);
    for (int t = 0; t < 3; t++) {
        memcpy(W, W0, sizeof W);
        assert_int_equal(ln_init_layer(LN_METHOD_LORA_NULL_V2, &li, W, A[t], B[t], &e), 0);
    }
    assert_int_equal(ln_init_eigensolves() - before, 1);
    li.r = 2; /* another rank: one more solve */
    assert_int_equal(ln_init_layer(LN_METHOD_LORA_NULL_V1, &li, W, Ap, Bp, &e), 0);
    assert_int_equal(ln_init_eigensolves() - before, 2);
    ln_init_forget_basis(C);
    li.r = r;
    for (int t = 0; t < 2; t++) {
        memcpy(W, W0, sizeof W);
        assert_int_equal(ln_init_layer(LN_METHOD_LORA_NULL_V1, &li, W, Ap, Bp, &e), 0);
    }
    assert_int_equal(ln_init_eigensolves() - before, 4);
    assert_memory_equal(Ap, A[0], sizeof Ap);
    assert_memory_equal(Bp, B[0], sizeof Bp);
    free(Q);
    free(C);
    free(W0);
}

/* The shared bases are solved as many at once as their scratch fits in 3/4 of the memory
 * available, at least one; with every count of solves at once the bases are the same bits. */
static void test_concurrent_solves_fit_memory(void **state) {
    (void)state;
    assert_int_equal(ln_init_concurrent_solves(16, 128, 1.5e9, -1), 16);   /* unknown: the threads */
    assert_int_equal(ln_init_concurrent_solves(16, 3, 1.5e9, -1), 3);      /* no more than the jobs */
    assert_int_equal(ln_init_concurrent_solves(16, 128, 1.5e9, 24e9), 12); /* 0.75 · 24 / 1.5 */
    assert_int_equal(ln_init_concurrent_solves(16, 128, 1.5e9, 1e9), 1);   /* at least one */
    assert_int_equal(ln_init_concurrent_solves(16, 0, 1.5e9, 1e9), 1);
    /* d = 120: scratch about d² fp64 */
    assert_true(ln_nullspace_basis_scratch(120, 4) >= 8.0 * 120 * 120);

    rng_state = 13;
    const int d = 90, r = 5, n = 6;
    double *C[6];
    ln_err e;
    const int threads = omp_get_max_threads();
    for (int i = 0; i < n; i++) {
        double *Q = rand_orthogonal(d), lam[90];
        for (int k = 0; k < d; k++) lam[k] = 0.1 + k + i;
        C[i] = spd_with_spectrum(Q, lam, d);
        free(Q);
    }
    /* the first time with every thread, then again one at a time (OMP_NUM_THREADS 1) */
    float W0[7 * 90], W[7 * 90], A[5 * 90], B[7 * 5], A1[6][5 * 90];
    for (int k = 0; k < 7 * d; k++) W0[k] = (float)(0.01 * ((k * 37) % 101 - 50));
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) omp_set_num_threads(1);
        for (int i = 0; i < n; i++) ln_init_share_basis(C[i], d);
        for (int i = 0; i < n; i++) {
            ln_layer_init li = {.d_out = 7, .d_in = d, .r = r, .scale = 1.0, .C = C[i]};
            memcpy(W, W0, sizeof W);
            assert_int_equal(ln_init_layer(LN_METHOD_LORA_NULL_V2, &li, W, A, B, &e), 0);
            if (pass == 0) memcpy(A1[i], A, sizeof A);
            else assert_memory_equal(A1[i], A, sizeof A);
        }
        for (int i = 0; i < n; i++) ln_init_forget_basis(C[i]);
    }
    omp_set_num_threads(threads);
    for (int i = 0; i < n; i++) free(C[i]);
}

/* ---------------------------------------------------------------- drift */

/* Drift from C equals ‖X ΔWᵀ‖²/‖X W0ᵀ‖² measured on the scaled activations; low-rank == dense. */
static void test_drift_from_cov_equals_direct(void **state) {
    (void)state;
    rng_state = 6;
    const int d_in = 18, d_out = 10, r = 4, n = 3, t = 40;
    float *X[3];
    int ts[3] = {t, t, t};
    ln_cov cov;
    ln_err e;
    assert_int_equal(ln_cov_init(&cov, d_in, &e), 0);
    for (int s = 0; s < n; s++) {
        X[s] = rand_f32((size_t)t * d_in, 1.0 + s);
        assert_int_equal(ln_cov_add_sample(&cov, X[s], t, &e), 0);
    }
    double *C = malloc((size_t)d_in * d_in * sizeof *C);
    assert_int_equal(ln_cov_finish(&cov, C, &e), 0);
    float *W0 = rand_f32((size_t)d_out * d_in, 0.5);
    float *B1 = rand_f32((size_t)d_out * r, 0.1), *A1 = rand_f32((size_t)r * d_in, 0.1);
    float *B0 = rand_f32((size_t)d_out * r, 0.1), *A0 = rand_f32((size_t)r * d_in, 0.1);
    const double scale = 1.7;
    double *dW = product(B1, A1, d_out, d_in, r, scale), *P0 = product(B0, A0, d_out, d_in, r, scale);
    float *dWf = malloc((size_t)d_out * d_in * sizeof *dWf);
    for (size_t i = 0; i < (size_t)d_out * d_in; i++) {
        dW[i] -= P0[i];
        dWf[i] = (float)dW[i];
    }
    double num_c, num_dense, den_c;
    assert_int_equal(ln_drift_quad_lowrank(B1, A1, r, B0, A0, r, d_out, d_in, scale, C, &num_c, &e), 0);
    assert_int_equal(ln_drift_quad_dense(dWf, d_out, d_in, C, &num_dense, &e), 0);
    assert_true(fabs(num_c - num_dense) < 1e-5 * num_c);
    assert_int_equal(ln_drift_quad_dense(W0, d_out, d_in, C, &den_c, &e), 0);
    /* direct: Σ_s ‖(X_s/|max|) ΔWᵀ‖² / Σ_s ‖(X_s/|max|) W0ᵀ‖² (the 1/n cancels) */
    double num = 0, den = 0;
    for (int s = 0; s < n; s++) {
        float mx = -INFINITY;
        for (size_t i = 0; i < (size_t)t * d_in; i++) mx = fmaxf(mx, X[s][i]);
        for (int k = 0; k < t; k++)
            for (int o = 0; o < d_out; o++) {
                double y = 0, y0 = 0;
                for (int j = 0; j < d_in; j++) {
                    double x = X[s][(size_t)k * d_in + j] / fabs(mx);
                    y += dW[(size_t)o * d_in + j] * x;
                    y0 += W0[(size_t)o * d_in + j] * x;
                }
                num += y * y;
                den += y0 * y0;
            }
    }
    assert_true(fabs(ln_drift_ratio(num_c, den_c) - num / den) < 1e-9 * (num / den) + 1e-15);
    assert_true(ln_drift_ratio(1.0, 0.0) == 0.0);
    (void)ts;
    for (int s = 0; s < n; s++) free(X[s]);
    ln_cov_free(&cov);
    free(C);
    free(W0);
    free(B1);
    free(A1);
    free(B0);
    free(A0);
    free(dW);
    free(P0);
    free(dWf);
}

/* tr(W C Wᵀ) as the tracker computed it before (a dense W·C by dsymm, then Σ (W C)∘W), the
 * reference the one-triangular-product form must equal to 1e-10. */
static double quad_by_symm(const float *W, int d_out, int d_in, const double *C) {
    double *wb = malloc((size_t)d_out * d_in * sizeof *wb), *t = malloc((size_t)d_out * d_in * sizeof *t);
    for (size_t k = 0; k < (size_t)d_out * d_in; k++) wb[k] = W[k];
    cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, d_out, d_in, 1.0, C, d_in, wb, d_in, 0.0, t, d_in);
    double acc = 0;
    for (size_t k = 0; k < (size_t)d_out * d_in; k++) acc += t[k] * wb[k];
    free(wb);
    free(t);
    return acc;
}

/* The drift denominator from W·triu(C) equals the dense W·C form within 1e-10 (relative), for
 * shapes below, at and across the 256-row block, a covariance with an outlier feature (as LLM
 * activations have) and a rank-deficient one (fewer tokens than features). */
static void test_drift_dense_triangular_equals_symm(void **state) {
    (void)state;
    rng_state = 11;
    const int shapes[][3] = {{10, 18, 40}, {256, 40, 200}, {300, 64, 500}, {700, 96, 30}};
    ln_err e;
    for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
        const int d_out = shapes[c][0], d_in = shapes[c][1], tokens = shapes[c][2];
        float *X = rand_f32((size_t)tokens * d_in, 1.0);
        for (int k = 0; k < tokens; k++) {
            X[(size_t)k * d_in + 3] *= 40.0f;                          /* an outlier feature */
            X[(size_t)k * d_in + 5] = X[(size_t)k * d_in + 4] + 0.01f * X[(size_t)k * d_in + 5]; /* correlated */
        }
        ln_cov cov;
        assert_int_equal(ln_cov_init(&cov, d_in, &e), 0);
        assert_int_equal(ln_cov_add_sample(&cov, X, tokens, &e), 0);
        double *C = malloc((size_t)d_in * d_in * sizeof *C);
        assert_int_equal(ln_cov_finish(&cov, C, &e), 0);
        float *W = rand_f32((size_t)d_out * d_in, 0.02);
        double got, want = quad_by_symm(W, d_out, d_in, C);
        assert_int_equal(ln_drift_quad_dense(W, d_out, d_in, C, &got, &e), 0);
        if (!(fabs(got - want) <= 1e-10 * want))
            fail_msg("%d x %d, %d tokens: triangular %.17g vs dsymm %.17g (rel %.2e)", d_out, d_in, tokens, got, want,
                     fabs(got - want) / want);
        free(W);
        free(C);
        free(X);
        ln_cov_free(&cov);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cov_matches_naive_sum),
        cmocka_unit_test(test_cov_f32_split_matches_f64),
        cmocka_unit_test(test_cov_rejects_bad_samples),
        cmocka_unit_test(test_basis_known_spectrum),
        cmocka_unit_test(test_basis_bits_equal_row_major_lapacke),
        cmocka_unit_test(test_factor_properties),
        cmocka_unit_test(test_method_names),
        cmocka_unit_test(test_every_method_init),
        cmocka_unit_test(test_corda_damp_doubles_on_singular),
        cmocka_unit_test(test_basis_shared_between_layers),
        cmocka_unit_test(test_concurrent_solves_fit_memory),
        cmocka_unit_test(test_drift_from_cov_equals_direct),
        cmocka_unit_test(test_drift_dense_triangular_equals_symm),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
