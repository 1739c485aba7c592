/* select.h — the backend a command runs on, by name, without the CPU build linking CUDA.
 *
 *   lnb_select("cpu" | "cuda" | "cuda:N" | NULL, &e)
 *
 * NULL or "" reads $LORANULL_DEVICE, and falls back to "cpu". The CUDA entry points are weak
 * references: in the default (CPU) build they stay NULL and "cuda" is a clear error; the CUDA
 * variant of the programs (make cuda-bin → build/cuda/bin/) links libloranull_cuda.a, which
 * defines them. "cuda" picks the GPU with the most free memory, "cuda:N" device N; GEMMs run on
 * bf16 tensor cores with fp32 accumulation (worker/backend/cuda/cuda.h). */
#ifndef LN_BACKEND_SELECT_H
#define LN_BACKEND_SELECT_H

#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "worker/backend/backend.h"
#include "worker/backend/cuda/cuda.h"

#pragma weak lnb_cuda_open
#pragma weak lnb_cuda
#pragma weak lnb_cuda_plan_check
#pragma weak lnb_cuda_nullspace_basis

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
        return lnb_cuda();
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
