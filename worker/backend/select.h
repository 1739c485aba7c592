/* select.h — the backend a command runs on, by name, without the CPU build linking CUDA.
 *
 *   lnb_select("cpu" | "cuda" | "cuda:N" | NULL, &e)
 *
 * NULL or "" reads $LORANULL_DEVICE, and falls back to "cpu". The CUDA entry points are weak
 * references: in the default (CPU) build they stay NULL and "cuda" is a clear error; the CUDA
 * variant of the programs (make cuda-bin → build/cuda/bin/) links libloranull_cuda.a, which
 * defines them. "cuda" picks the GPU with the most free memory, "cuda:N" device N; GEMMs run on
 * bf16 tensor cores with fp32 accumulation (worker/backend/cuda/cuda.h), the frozen weights from
 * bf16 copies the engine makes through the table's freeze hook, and the engine reads the device's
 * kept errors through its check hook (backend.h).
 *
 * Selecting "cuda" also routes the engine's process-wide accelerator hooks to the device, so every
 * program that selects it (loranull train --device cuda, a GPU worker) gets them: the LoRA-Null
 * bases by cuSOLVER (ln_nullspace_set_basis_solver) and the calibration covariances by DSYRK on the
 * device (ln_calibrate_set_accumulator). The CUDA programs must link those entry points (the
 * Makefile's CUDA_PULL): a weak reference the link left undefined would silently keep the host path. */
#ifndef LN_BACKEND_SELECT_H
#define LN_BACKEND_SELECT_H

#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "worker/backend/backend.h"
#include "worker/backend/cuda/cuda.h"
#include "worker/engine/calibrate.h"
#include "worker/engine/nullspace.h"

#pragma weak lnb_cuda_open
#pragma weak lnb_cuda
#pragma weak lnb_cuda_plan_check
#pragma weak lnb_cuda_nullspace_basis
#pragma weak lnb_cuda_cov_init
#pragma weak lnb_cuda_cov_add_sample
#pragma weak lnb_cuda_cov_finish
#pragma weak lnb_cuda_cov_free

/* ln_cov_accumulator (calibrate.h) over lnb_cuda_cov: one heap-held device sum per covariance. */
static inline void *lnb_cuda_acc_open(int d, ln_err *e)
{
    lnb_cuda_cov *c = (lnb_cuda_cov *)calloc(1, sizeof *c);
    if (!c) {
        ln_errf(e, "GPU covariance: out of host memory for its handle");
        return NULL;
    }
    if (lnb_cuda_cov_init(c, d, e)) {
        free(c);
        return NULL;
    }
    return c;
}
static inline int lnb_cuda_acc_add(void *c, const float *X, int tokens, ln_err *e)
{
    return lnb_cuda_cov_add_sample((lnb_cuda_cov *)c, X, tokens, e);
}
static inline int lnb_cuda_acc_finish(void *c, double *C, ln_err *e)
{
    return lnb_cuda_cov_finish((const lnb_cuda_cov *)c, C, e);
}
static inline void lnb_cuda_acc_close(void *c)
{
    lnb_cuda_cov_free((lnb_cuda_cov *)c);
    free(c);
}

/* The backend's covariance accumulator for calibration (DSYRK on the CUDA backend), to pass to
 * ln_calibrate_set_accumulator; NULL = the host's. */
static inline const ln_cov_accumulator *lnb_select_cov_accumulator(const lnb_backend *be)
{
    static const ln_cov_accumulator cuda_acc = {"cuda", lnb_cuda_acc_open, lnb_cuda_acc_add, lnb_cuda_acc_finish,
                                                lnb_cuda_acc_close};
    if (!be || strcmp(be->name, "cuda") != 0 || !lnb_cuda_cov_init || !lnb_cuda_cov_add_sample ||
        !lnb_cuda_cov_finish || !lnb_cuda_cov_free)
        return NULL;
    return &cuda_acc;
}

static inline const lnb_backend *lnb_select(const char *device, ln_err *e)
{
    if (!device || !*device) device = getenv("LORANULL_DEVICE");
    if (!device || !*device || strcmp(device, "cpu") == 0) return lnb_cpu();
    if (strcmp(device, "cuda") == 0 || strncmp(device, "cuda:", 5) == 0) {
        if (!lnb_cuda_open || !lnb_cuda) {
            ln_errf(e, "device \"%s\": this build of loranull has no CUDA backend (make cuda-bin builds one in "
                       "build/cuda/bin/)", device);
            return NULL;
        }
        char *end = NULL;
        long dev = device[4] == ':' ? strtol(device + 5, &end, 10) : -1;
        if (device[4] == ':' && (end == device + 5 || *end || dev < 0)) {
            ln_errf(e, "device \"%s\": expected cuda:N with N a GPU index", device);
            return NULL;
        }
        lnb_cuda_opts o = {.device = (int)dev, .math = LNB_CUDA_MATH_BF16};
        if (lnb_cuda_open(&o, e)) return NULL;
        const lnb_backend *be = lnb_cuda();
        ln_nullspace_set_basis_solver(lnb_cuda_nullspace_basis); /* NULL (LAPACK) if not linked */
        ln_calibrate_set_accumulator(lnb_select_cov_accumulator(be));
        return be;
    }
    ln_errf(e, "device \"%s\": expected cpu, cuda or cuda:N", device);
    return NULL;
}

/* Before a job allocates anything on a GPU backend: does it fit? q describes the model, the
 * micro-batch and the adapter (cuda.h). Returns −1 with needed vs free (and the parts) when it
 * does not; 0 on the CPU backend (host memory is the operating system's business). */
static inline int lnb_select_plan_check(const lnb_backend *be, const lnb_cuda_plan_req *q, ln_err *e)
{
    if (!be || strcmp(be->name, "cuda") != 0 || !lnb_cuda_plan_check) return 0;
    lnb_cuda_plan p;
    return lnb_cuda_plan_check(q, &p, e);
}

/* The backend's own subset eigensolver for the LoRA-Null bases (cuSOLVER syevdx on the CUDA
 * backend), to pass to ln_nullspace_set_basis_solver (worker/engine/nullspace.h); NULL = LAPACK. */
typedef int (*lnb_basis_solver_fn)(const double *C, int d, int r, double *U, double *evals, ln_err *e);
static inline lnb_basis_solver_fn lnb_select_basis_solver(const lnb_backend *be)
{
    if (!be || strcmp(be->name, "cuda") != 0 || !lnb_cuda_nullspace_basis) return NULL;
    return lnb_cuda_nullspace_basis;
}

#endif
