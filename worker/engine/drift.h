/* drift.h — knowledge drift of one linear layer, exact from its calibration covariance.
 *
 * With X the (scaled) calibration activations stacked as rows and C = XᵀX / n (nullspace.h),
 *   ‖X ΔWᵀ‖²_F / ‖X W0ᵀ‖²_F = tr(ΔW C ΔWᵀ) / tr(W0 C W0ᵀ),
 * so drift needs only C, never the activations again. ΔW = W* − W0 against the ORIGINAL W0.
 * Layouts as nullspace.h (row-major; W d_out × d_in, A r × d_in, B d_out × r, C d_in × d_in). */
#ifndef LN_DRIFT_H
#define LN_DRIFT_H

#include <jansson.h>

#include "common/err.h"
#include "worker/engine/adapter.h"

/* *out = tr(W C Wᵀ) for a dense W, in fp64 a block of rows at a time, from one triangular product
 * W·triu(C) (w C wᵀ = 2·w triu(C) wᵀ − Σ_j C_jj w_j²): d_out·d_in²/2 multiply-adds.
 * Used for the denominator (W = W0, once per layer) and for full fine-tuning's ΔW.
 * Fails (out of memory, with the size) only when its 2 × 256 × d_in fp64 scratch cannot be had. */
int ln_drift_quad_dense(const float *W, int d_out, int d_in, const double *C, double *out, ln_err *e);

/* tr(ΔW C ΔWᵀ) for a low-rank update ΔW = scale · (B1 A1 − B0 A0) without forming ΔW:
 * with B̃ = [B1, −B0] (d_out × k) and Ã = [A1; A0] (k × d_in), k = r1 + r0,
 *   tr(B̃ Ã C Ãᵀ B̃ᵀ) = tr((B̃ᵀ B̃)(Ã C Ãᵀ)) — O(k·d_in² + k²·d_out) instead of O(d_out·d_in²).
 * B0/A0 may be NULL (r0 = 0) for methods whose initial product is zero (lora, lora_fa).
 * Fails (out of memory, with the size) only when its fp64 scratch cannot be had. */
int ln_drift_quad_lowrank(const float *B1, const float *A1, int r1, const float *B0, const float *A0, int r0,
                          int d_out, int d_in, double scale, const double *C, double *out, ln_err *e);

/* The drift ratio num / den, 0 when den is 0 (a layer whose input never reached it). */
double ln_drift_ratio(double num, double den);

/* ---- per-layer drift of a model during training ----
 * A tracker holds, for every targeted layer (every layer for full fine-tuning), its covariance
 * (borrowed from the calibration) and the denominator tr(W0 C W0ᵀ) of the ORIGINAL W0 (for a
 * residual adapter W0 = W0' + s·B0 A0, rebuilt in fp64; for full fine-tuning it keeps a copy of
 * W0). Implemented in drift_tracker.c. Start-up costs one W0·triu(C) per layer (d_out·d_in²/2
 * multiply-adds, the least an exact tr(W0 C W0ᵀ) from C needs); measuring O(k·d_in²) per adapter
 * layer (low-rank form), d_out·d_in²/2 for full. Every buffer is fallible: out of memory is an
 * error naming the layer and the size, never an abort. */
typedef struct ln_drift_tracker ln_drift_tracker;

/* cov(cov_ctx, layer, input) gives each layer input's C (calibrate.h: ln_calibration_covariance).
 * Call right after the adapter is initialised (or restored from a checkpoint). */
int ln_drift_tracker_new(ln_model *m, const ln_adapter *ad, ln_covariance_fn cov, void *cov_ctx,
                         ln_drift_tracker **out, ln_err *e);
/* Adds to row: "knowledge_drift": {"model.layers.0.self_attn.q_proj": ratio, ...},
 * "knowledge_drift_mean" and "knowledge_drift_max" (over the layers). */
int ln_drift_tracker_measure(ln_drift_tracker *t, ln_model *m, const ln_adapter *ad, json_t *row, ln_err *e);
void ln_drift_tracker_free(ln_drift_tracker *t);
/* The denominator tr(W0 C W0ᵀ) the tracker holds for a layer's target; −1 when it tracks none. */
int ln_drift_tracker_denominator(const ln_drift_tracker *t, int layer, ln_target target, double *den);

#endif
