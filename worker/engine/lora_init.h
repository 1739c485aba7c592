/* lora_init.h — the adapter methods by name, and each method's initial factors for one linear
 * layer, as matrix functions (DESIGN.md §2).
 *
 * Convention (PEFT's): the layer computes  y = W x + scale · B A x,  scale = alpha / r.
 * Every residual method stores factors whose scaled product is the part of W0 it takes out, and
 * replaces W0 by W0 − scale · B A, so the output at step 0 equals the base model's whatever
 * alpha is (PEFT divides the singular values by scale at init; so do we).
 *
 *   lora          A ~ U(−1/√d_in, 1/√d_in) (PEFT's kaiming_uniform(a=√5)), B = 0, W unchanged
 *   lora_fa       as lora, A frozen
 *   pissa         top-r SVD of W:   B = U_r √(S_r/scale),  A = √(S_r/scale) V_rᵀ,  W ← W − scale·BA
 *   milora        the same with the bottom r of the min(d_out, d_in) singular triplets
 *   corda         knowledge-preserved mode, as PEFT's corda: C' = C + damp·mean(diag C)·I with damp
 *                 0.01 doubled until ‖C' C'⁻¹ − I‖_F < 0.05 (checked in fp32, as PEFT does);
 *                 SVD W C' = U S Vᵀ, last r triplets; B = U_r √(S_r/scale), A = √(S_r/scale) V_rᵀ C'⁻¹
 *   lora_null_v1  null-space init (nullspace.h): scale·BA = W0 U_null U_nullᵀ, train A and B
 *   lora_null_v2  the same init, A frozen
 *   full          no factors: every weight trains
 *
 * Layouts as nullspace.h: W d_out × d_in, A r × d_in, B d_out × r, C d_in × d_in, all row-major. */
#ifndef LN_LORA_INIT_H
#define LN_LORA_INIT_H

#include <stdint.h>

#include "common/err.h"

typedef enum {
    LN_METHOD_LORA,
    LN_METHOD_PISSA,
    LN_METHOD_MILORA,
    LN_METHOD_CORDA,
    LN_METHOD_LORA_FA,
    LN_METHOD_LORA_NULL_V1,
    LN_METHOD_LORA_NULL_V2,
    LN_METHOD_FULL,
    LN_METHOD_COUNT
} ln_method;

const char *ln_method_name(ln_method m);
/* Parses a method name ("lora_null_v2", ...); the error lists the accepted names. */
int ln_method_parse(const char *s, ln_method *out, ln_err *e);

int ln_method_is_adapter(ln_method m);        /* every method but full */
int ln_method_needs_calibration(ln_method m); /* corda, lora_null_v1, lora_null_v2 */
int ln_method_has_residual(ln_method m);      /* W0 is replaced by W0 − scale·B0 A0 */
int ln_method_trains_a(ln_method m);          /* 0 for lora_fa and lora_null_v2 */
int ln_method_trains_b(ln_method m);

typedef struct ln_layer_init {
    int d_out, d_in, r;
    double scale;          /* alpha / r; 1 when alpha = r */
    const double *C;       /* d_in × d_in calibration covariance (corda, lora_null_*), else NULL */
    const double *U_null;  /* optional d_in × r basis from ln_nullspace_basis(C) — lets q,k,v
                            * (and gate,up) that share one C share one eigensolve; NULL = compute */
    uint64_t seed;         /* lora / lora_fa: A's random draw */
} ln_layer_init;

/* Fills A (r × d_in) and B (d_out × r) for method m, and for residual methods turns W (in: W0)
 * into W0 − scale·B A in place. full: nothing to do (returns 0, A/B untouched, may be NULL).
 * Errors name the method and the shapes. */
int ln_init_layer(ln_method m, const ln_layer_init *li, float *W, float *A, float *B, ln_err *e);

/* Bases shared between layers that read one covariance. q,k,v (and gate,up) read the same input,
 * so the same C and the same r-dimensional null-space basis: a covariance's owner (the
 * calibration) opts C in with ln_init_share_basis; ln_init_layer then computes its basis once per
 * rank and reuses it, until ln_init_forget_basis(C) (which the owner calls before freeing C).
 * Only registered matrices are cached: an unregistered C is decomposed on every call. Thread-safe. */
void ln_init_share_basis(const double *C, int d);
void ln_init_forget_basis(const double *C);
/* How many eigensolves ln_init_layer has run in this process (the tests check the sharing). */
long ln_init_eigensolves(void);
/* How many of `jobs` basis solves run at once: `threads`, fewer when their scratch (per_solve bytes
 * each) would not fit in 3/4 of `available` bytes (< 0: unknown), at least one. The bits do not
 * depend on it (each solve is single-threaded). */
int ln_init_concurrent_solves(int threads, int jobs, double per_solve, double available);

/* CorDA's damping search alone (exposed for tests): returns the damp factor that PEFT's loop
 * settles on for C, or a negative value with e filled if none below 2^20 · 0.01 works. */
double ln_corda_damp(const double *C, int d, ln_err *e);

#endif
