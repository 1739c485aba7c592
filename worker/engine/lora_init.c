/* lora_init.c — each method's initial factors for one linear layer (see lora_init.h). */
#include "worker/engine/lora_init.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/engine/nullspace.h"

/* ---------------------------------------------------------------- method table */

static const struct {
    const char *name;
    unsigned adapter : 1, calib : 1, residual : 1, train_a : 1;
} METHODS[LN_METHOD_COUNT] = {
    [LN_METHOD_LORA] = {"lora", 1, 0, 0, 1},
    [LN_METHOD_PISSA] = {"pissa", 1, 0, 1, 1},
    [LN_METHOD_MILORA] = {"milora", 1, 0, 1, 1},
    [LN_METHOD_CORDA] = {"corda", 1, 1, 1, 1},
    [LN_METHOD_LORA_FA] = {"lora_fa", 1, 0, 0, 0},
    [LN_METHOD_LORA_NULL_V1] = {"lora_null_v1", 1, 1, 1, 1},
    [LN_METHOD_LORA_NULL_V2] = {"lora_null_v2", 1, 1, 1, 0},
    [LN_METHOD_FULL] = {"full", 0, 0, 0, 0},
};

const char *ln_method_name(ln_method m) {
    return (unsigned)m < LN_METHOD_COUNT ? METHODS[m].name : "?";
}

int ln_method_parse(const char *s, ln_method *out, ln_err *e) {
    for (int m = 0; m < LN_METHOD_COUNT; m++) {
        if (s && strcmp(s, METHODS[m].name) == 0) {
            *out = (ln_method)m;
            return 0;
        }
    }
    return ln_errf(e, "unknown method '%s': expected one of lora, pissa, milora, corda, lora_fa, "
                      "lora_null_v1, lora_null_v2, full", s ? s : "(null)");
}

int ln_method_is_adapter(ln_method m) { return METHODS[m].adapter; }
int ln_method_needs_calibration(ln_method m) { return METHODS[m].calib; }
int ln_method_has_residual(ln_method m) { return METHODS[m].residual; }
int ln_method_trains_a(ln_method m) { return METHODS[m].train_a; }
int ln_method_trains_b(ln_method m) { return METHODS[m].adapter; }

/* ---------------------------------------------------------------- helpers */

/* splitmix64: a small, seedable generator, so lora's A is reproducible from the job's seed. */
static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Thin SVD of W (d_out × d_in, fp32) in fp64: U d_out × k, s k, Vt k × d_in, k = min. */
static int svd_thin(const float *W, int d_out, int d_in, double *U, double *s, double *Vt, ln_err *e) {
    size_t n = (size_t)d_out * d_in;
    double *a = ln_try_alloc(n * sizeof(double), "SVD: fp64 copy of W", e);
    if (!a) return -1;
    for (size_t i = 0; i < n; i++) a[i] = W[i];
    int k = d_out < d_in ? d_out : d_in;
    lapack_int info = LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', d_out, d_in, a, d_in, s, U, k, Vt, d_in);
    free(a);
    if (info != 0) return ln_lapack_fail(e, (int)info, "SVD of a %d x %d matrix (dgesdd)", d_out, d_in);
    return 0;
}

/* Factors from r chosen SVD triplets (columns j0..j0+r−1 of U, rows of Vt):
 *   B = U_r √(s_r/scale),  A = √(s_r/scale) Vt_r. */
static void factors_from_svd(const double *U, const double *s, const double *Vt, int d_out, int d_in,
                             int k, int j0, int r, double scale, float *A, float *B) {
    for (int j = 0; j < r; j++) {
        double g = sqrt(s[j0 + j] / scale);
        for (int i = 0; i < d_out; i++) B[(size_t)i * r + j] = (float)(U[(size_t)i * k + j0 + j] * g);
        for (int c = 0; c < d_in; c++) A[(size_t)j * d_in + c] = (float)(g * Vt[(size_t)(j0 + j) * d_in + c]);
    }
}

/* pissa (top) and milora (bottom): r triplets of W's SVD. */
static int init_svd_of_w(const ln_layer_init *li, int bottom, const float *W, float *A, float *B, ln_err *e) {
    const int d_out = li->d_out, d_in = li->d_in, r = li->r, k = d_out < d_in ? d_out : d_in;
    int rc = -1;
    double *U = ln_try_alloc((size_t)d_out * k * sizeof(double), "SVD: U", e);
    double *s = ln_try_alloc((size_t)k * sizeof(double), "SVD: singular values", e);
    double *Vt = ln_try_alloc((size_t)k * d_in * sizeof(double), "SVD: Vt", e);
    if (U && s && Vt && svd_thin(W, d_out, d_in, U, s, Vt, e) == 0) {
        factors_from_svd(U, s, Vt, d_out, d_in, k, bottom ? k - r : 0, r, li->scale, A, B);
        rc = 0;
    }
    free(U);
    free(s);
    free(Vt);
    return rc;
}

static double diag_mean(const double *C, int d) {
    double m = 0.0;
    for (int i = 0; i < d; i++) m += C[(size_t)i * d + i];
    return m / d;
}

/* PEFT's CorDA damping loop, mirrored in fp32 (torch computes it on the fp32 covariance):
 * C' = C + mean(diag C)·damp·I, damp = 0.01, doubled until ‖C' inv(C') − I‖_F < 0.05. */
double ln_corda_damp(const double *C, int d, ln_err *e) {
    size_t n = (size_t)d * d;
    float *c = ln_try_alloc(n * sizeof(float), "CorDA: damped covariance", e);
    float *inv = ln_try_alloc(n * sizeof(float), "CorDA: inverse", e);
    float *prod = ln_try_alloc(n * sizeof(float), "CorDA: check", e);
    lapack_int *ipiv = ln_try_alloc((size_t)d * sizeof(lapack_int), "CorDA: pivots", e);
    double damp = -1.0;
    if (!c || !inv || !prod || !ipiv) goto out;
    double mean = diag_mean(C, d);
    for (double dmp = 0.01; dmp < 0.01 * 1048576.0; dmp *= 2) {
        for (size_t i = 0; i < n; i++) c[i] = (float)C[i];
        for (int i = 0; i < d; i++) c[(size_t)i * d + i] += (float)(mean * dmp);
        memcpy(inv, c, n * sizeof(float));
        if (LAPACKE_sgetrf(LAPACK_ROW_MAJOR, d, d, inv, d, ipiv) != 0) continue;
        if (LAPACKE_sgetri(LAPACK_ROW_MAJOR, d, inv, d, ipiv) != 0) continue;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d, d, d, 1.0f, c, d, inv, d, 0.0f, prod, d);
        double err2 = 0.0;
        for (int i = 0; i < d; i++)
            for (int j = 0; j < d; j++) {
                double v = prod[(size_t)i * d + j] - (i == j ? 1.0 : 0.0);
                err2 += v * v;
            }
        if (isfinite(err2) && sqrt(err2) < 0.05) {
            damp = dmp;
            break;
        }
    }
    if (damp < 0) ln_errf(e, "CorDA: the %d x %d covariance stays singular even with damping %g x mean(diag)",
                          d, d, 0.01 * 1048576.0);
out:
    free(c);
    free(inv);
    free(prod);
    free(ipiv);
    return damp;
}

/* corda, knowledge-preserved mode (PEFT's collect_eigens_for_layer + crop 'kpm' + corda_init). */
static int init_corda(const ln_layer_init *li, const float *W, float *A, float *B, ln_err *e) {
    const int d_out = li->d_out, d_in = li->d_in, r = li->r, k = d_out < d_in ? d_out : d_in;
    double damp = ln_corda_damp(li->C, d_in, e);
    if (damp < 0) return -1;
    int rc = -1;
    size_t nw = (size_t)d_out * d_in, nc = (size_t)d_in * d_in;
    double *cf = ln_try_alloc(nc * sizeof(double), "CorDA: C'", e);
    double *wd = ln_try_alloc(nw * sizeof(double), "CorDA: fp64 W", e);
    double *wc = ln_try_alloc(nw * sizeof(double), "CorDA: W C'", e);
    double *U = ln_try_alloc((size_t)d_out * k * sizeof(double), "CorDA: U", e);
    double *s = ln_try_alloc((size_t)k * sizeof(double), "CorDA: S", e);
    double *Vt = ln_try_alloc((size_t)k * d_in * sizeof(double), "CorDA: Vt", e);
    double *X = ln_try_alloc((size_t)d_in * r * sizeof(double), "CorDA: C'^-1 V", e);
    if (!cf || !wd || !wc || !U || !s || !Vt || !X) goto out;
    double mean = diag_mean(li->C, d_in);
    memcpy(cf, li->C, nc * sizeof(double));
    for (int i = 0; i < d_in; i++) cf[(size_t)i * d_in + i] += mean * damp;
    for (size_t i = 0; i < nw; i++) wd[i] = W[i];
    cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, d_out, d_in, 1.0, cf, d_in, wd, d_in, 0.0, wc, d_in);
    lapack_int info = LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', d_out, d_in, wc, d_in, s, U, k, Vt, d_in);
    if (info != 0) {
        ln_lapack_fail(e, (int)info, "CorDA: SVD of W C' (%d x %d, dgesdd)", d_out, d_in);
        goto out;
    }
    /* The last r triplets; A's rows are V_rᵀ C'⁻¹, i.e. X = C'⁻¹ V_r solved by Cholesky (C' is SPD). */
    const int j0 = k - r;
    for (int c = 0; c < d_in; c++)
        for (int j = 0; j < r; j++) X[(size_t)c * r + j] = Vt[(size_t)(j0 + j) * d_in + c];
    info = LAPACKE_dposv(LAPACK_ROW_MAJOR, 'U', d_in, r, cf, d_in, X, r);
    if (info < 0) {
        ln_lapack_fail(e, (int)info, "CorDA: Cholesky solve with the damped covariance (%d x %d, dposv)", d_in, d_in);
        goto out;
    }
    if (info != 0) {
        ln_errf(e, "CorDA: damped covariance is not positive definite (LAPACK dposv info %d)", (int)info);
        goto out;
    }
    for (int j = 0; j < r; j++) {
        double g = sqrt(s[j0 + j] / li->scale);
        for (int i = 0; i < d_out; i++) B[(size_t)i * r + j] = (float)(U[(size_t)i * k + j0 + j] * g);
        for (int c = 0; c < d_in; c++) A[(size_t)j * d_in + c] = (float)(g * X[(size_t)c * r + j]);
    }
    rc = 0;
out:
    free(cf);
    free(wd);
    free(wc);
    free(U);
    free(s);
    free(Vt);
    free(X);
    return rc;
}

/* ---------------------------------------------------------------- shared bases */

typedef struct basis_entry {
    const double *C;
    int d, r;          /* r = 0: registered, no basis yet for any rank */
    double *U;         /* d × r, owned */
    struct basis_entry *next;
} basis_entry;

static pthread_mutex_t basis_mu = PTHREAD_MUTEX_INITIALIZER;
static basis_entry *basis_list;
static long eigensolves;

void ln_init_share_basis(const double *C, int d) {
    basis_entry *b = ln_xcalloc(1, sizeof *b);
    b->C = C;
    b->d = d;
    pthread_mutex_lock(&basis_mu);
    b->next = basis_list;
    basis_list = b;
    pthread_mutex_unlock(&basis_mu);
}

void ln_init_forget_basis(const double *C) {
    pthread_mutex_lock(&basis_mu);
    for (basis_entry **pp = &basis_list; *pp;) {
        basis_entry *b = *pp;
        if (b->C == C) {
            *pp = b->next;
            free(b->U);
            free(b);
        } else {
            pp = &b->next;
        }
    }
    pthread_mutex_unlock(&basis_mu);
}

long ln_init_eigensolves(void) {
    pthread_mutex_lock(&basis_mu);
    long n = eigensolves;
    pthread_mutex_unlock(&basis_mu);
    return n;
}

static int compute_basis(const double *C, int d, int r, double **out, ln_err *e) {
    double *U = ln_try_alloc((size_t)d * r * sizeof(double), "LoRA-Null: basis", e);
    if (!U || ln_nullspace_basis(C, d, r, U, NULL, e) != 0) {
        free(U);
        return -1;
    }
    pthread_mutex_lock(&basis_mu);
    eigensolves++;
    pthread_mutex_unlock(&basis_mu);
    *out = U;
    return 0;
}

int ln_init_concurrent_solves(int threads, int jobs, double per_solve, double available) {
    int n = threads < jobs ? threads : jobs;
    if (available >= 0 && per_solve > 0) {
        double fit = 0.75 * available / per_solve;
        if (fit < n) n = (int)fit;
    }
    return n > 1 ? n : 1;
}

/* Solves every registered covariance that has no rank-r basis yet, several at once (one OpenBLAS
 * thread each, spread over OpenMP threads): a layer's q,k,v / o / gate,up / down inputs, and every
 * layer's, are independent, and one tridiagonal reduction uses threads poorly. Called with the lock
 * held. Each solve is single-threaded, so the bits do not depend on the thread count. */
static int prefetch_bases(int r, ln_err *e) {
    int n = 0;
    for (basis_entry *b = basis_list; b; b = b->next) n++;
    basis_entry **todo = ln_xcalloc((size_t)n + 1, sizeof *todo);
    int k = 0;
    for (basis_entry *b = basis_list; b; b = b->next) {
        if (b->d < r) continue;
        int have = 0, dup = 0;
        for (basis_entry *c = basis_list; c; c = c->next)
            if (c->C == b->C && c->r == r && c->U) have = 1;
        for (int j = 0; j < k; j++)
            if (todo[j]->C == b->C) dup = 1;
        if (!have && !dup) todo[k++] = b;
    }
    double **U = ln_xcalloc((size_t)k + 1, sizeof *U);
    int failed = 0;
    ln_err first = {{0}};
    /* as many at once as their scratch fits in the memory available now (a 14336² input is
     * 1.5 GiB per solve: 16 threads at once would want 25 GiB) */
    int dmax = 0;
    for (int j = 0; j < k; j++)
        if (todo[j]->d > dmax) dmax = todo[j]->d;
    double avail = -1;
    char from[96];
    if (ln_mem_available("", &avail, from, sizeof from, NULL) != 0) avail = -1;
    int nt = ln_init_concurrent_solves(omp_get_max_threads(), k,
                                       ln_nullspace_basis_scratch(dmax, r) + 8.0 * dmax * r, avail);
    ln_blas_threads_end();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int j = 0; j < k; j++) {
        ln_err le;
        double *u = ln_try_allocf((size_t)todo[j]->d * r, sizeof(double), &le, "LoRA-Null",
                                  "the %d x %d null-space basis of a layer input", todo[j]->d, r);
        if (!u || ln_nullspace_basis_1t(todo[j]->C, todo[j]->d, r, u, NULL, &le) != 0) {
            free(u);
            u = NULL;
#pragma omp critical
            {
                if (!failed) first = le;
                failed = 1;
            }
        }
        U[j] = u;
    }
    ln_blas_threads_begin(); /* back to how ln_init_layer runs the rest */
    for (int j = 0; j < k; j++) {
        if (!U[j]) continue;
        eigensolves++;
        basis_entry *b = todo[j];
        if (b->U) { /* this C already has a basis of another rank: add an entry for this one */
            b = ln_xcalloc(1, sizeof *b);
            b->C = todo[j]->C;
            b->d = todo[j]->d;
            b->next = basis_list;
            basis_list = b;
        }
        b->r = r;
        b->U = U[j];
    }
    free(U);
    free(todo);
    if (failed) {
        if (e) *e = first;
        return -1;
    }
    return 0;
}

/* The basis of a registered C for rank r (solving every registered covariance's on first use), or
 * NULL with *registered = 0 when C was not registered. */
static const double *shared_basis(const double *C, int d, int r, int *registered, ln_err *e) {
    const double *res = NULL;
    *registered = 0;
    pthread_mutex_lock(&basis_mu);
    for (int pass = 0; pass < 2 && !res; pass++) {
        int reg = 0;
        for (basis_entry *b = basis_list; b; b = b->next) {
            if (b->C != C || b->d != d) continue;
            reg = 1;
            if (b->r == r && b->U) {
                res = b->U;
                break;
            }
        }
        *registered = reg;
        if (!reg || res || pass == 1) break;
        if (prefetch_bases(r, e) != 0) break;
    }
    pthread_mutex_unlock(&basis_mu);
    return res;
}

static int init_lora_null(const ln_layer_init *li, const float *W, float *A, float *B, ln_err *e) {
    const double *U = li->U_null;
    double *own = NULL;
    if (!U) {
        int registered;
        U = shared_basis(li->C, li->d_in, li->r, &registered, e);
        if (registered && !U) return -1;
        if (!registered) {
            if (compute_basis(li->C, li->d_in, li->r, &own, e) != 0) return -1;
            U = own;
        }
    }
    int rc = ln_nullspace_factor(W, li->d_out, li->d_in, U, li->r, li->scale, A, B, e);
    free(own);
    return rc;
}

/* ---------------------------------------------------------------- dispatch */

static int init_layer(ln_method m, const ln_layer_init *li, float *W, float *A, float *B, ln_err *e) {
    if ((unsigned)m >= LN_METHOD_COUNT) return ln_errf(e, "init: invalid method %d", (int)m);
    const char *name = METHODS[m].name;
    if (m == LN_METHOD_FULL) return 0;
    const int d_out = li->d_out, d_in = li->d_in, r = li->r;
    if (d_out <= 0 || d_in <= 0) return ln_errf(e, "%s init: bad layer shape %d x %d", name, d_out, d_in);
    if (r <= 0 || r > (d_out < d_in ? d_out : d_in))
        return ln_errf(e, "%s init: rank %d must be in 1..min(d_out, d_in) = %d for a %d x %d layer", name, r,
                       d_out < d_in ? d_out : d_in, d_out, d_in);
    if (!(li->scale > 0.0) || !isfinite(li->scale))
        return ln_errf(e, "%s init: scale alpha/r must be positive, got %g", name, li->scale);
    if (METHODS[m].calib && !li->C)
        return ln_errf(e, "%s init: needs a calibration covariance (--calibration FILE)", name);
    int rc = 0;
    switch (m) {
    case LN_METHOD_LORA:
    case LN_METHOD_LORA_FA: {
        /* PEFT: nn.init.kaiming_uniform_(A, a=√5) ⇒ bound = √(6/((1+5)·d_in)) = 1/√d_in; B = 0. */
        uint64_t st = li->seed ^ 0x6C6F72615F696E69ull;
        double bound = 1.0 / sqrt((double)d_in);
        for (size_t i = 0; i < (size_t)r * d_in; i++) {
            double u = (double)(splitmix64(&st) >> 11) * 0x1.0p-53; /* [0,1) */
            A[i] = (float)((2.0 * u - 1.0) * bound);
        }
        memset(B, 0, (size_t)d_out * r * sizeof(float));
        return 0;
    }
    case LN_METHOD_PISSA: rc = init_svd_of_w(li, 0, W, A, B, e); break;
    case LN_METHOD_MILORA: rc = init_svd_of_w(li, 1, W, A, B, e); break;
    case LN_METHOD_CORDA: rc = init_corda(li, W, A, B, e); break;
    case LN_METHOD_LORA_NULL_V1:
    case LN_METHOD_LORA_NULL_V2: rc = init_lora_null(li, W, A, B, e); break;
    default: return ln_errf(e, "init: method %s has no initialiser", name);
    }
    if (rc != 0) return ln_err_prefix(e, "%s init (%d x %d, rank %d)", name, d_out, d_in, r);
    if (ln_residual_apply(W, d_out, d_in, B, A, r, li->scale, e) != 0)
        return ln_err_prefix(e, "%s init (%d x %d, rank %d)", name, d_out, d_in, r);
    return 0;
}

int ln_init_layer(ln_method m, const ln_layer_init *li, float *W, float *A, float *B, ln_err *e) {
    ln_blas_threads_begin(); /* every solve with OpenMP's thread count, whatever ran before */
    int rc = init_layer(m, li, W, A, B, e);
    ln_blas_threads_end();
    return rc;
}
