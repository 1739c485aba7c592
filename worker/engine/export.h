/* export.h — a trained adapter in PEFT's format, relative to the ORIGINAL base weights, and the
 * merged checkpoint (DESIGN.md §2, "Export").
 *
 * Training of a residual method ran on W0' = W0 − s·B0 A0 (s = alpha / r), so the update relative
 * to the original W0 is s·(B* A* − B0 A0). PEFT computes W0 x + (alpha'/r')·B' A' x, so:
 *   residual, A trained (lora_null_v1, pissa, milora, corda):  r' = 2r,  A' = [A*; A0] (2r × d_in),
 *       B' = [B*, −B0] (d_out × 2r),  alpha' = 2·alpha   (alpha' / r' = s)
 *   residual, A frozen (lora_null_v2):  r' = r,  A' = A0,  B' = B* − B0,  alpha' = alpha
 *   no residual (lora, lora_fa):  A' = A*,  B' = B*,  alpha' = alpha
 *   full: no adapter (export the merged model).
 * Files: DIR/adapter_config.json (peft_type LORA, r', lora_alpha', target_modules, init_lora_weights
 * true, ...) and DIR/adapter_model.safetensors with F32 tensors
 *   base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight  (r' × d_in)   / .lora_B.weight (d_out × r').
 *
 * Merged: W = W0 + s·(B* A* − B0 A0) for every targeted layer (accumulated in fp64 from the fp32
 * factors, one rounding), written as a full checkpoint (config.json + model.safetensors) in the
 * base model's dtype (config torch_dtype; f32 if absent). */
#ifndef LN_EXPORT_H
#define LN_EXPORT_H

#include "common/err.h"
#include "worker/engine/adapter.h"
#include "worker/engine/model.h"

/* The rank and alpha PEFT will see for ad (table above). */
void ln_export_peft_shape(const ln_adapter *ad, int *r_out, float *alpha_out);

/* Writes DIR/adapter_config.json + DIR/adapter_model.safetensors. m is the model ad belongs to
 * (its backend holds the factors); base_model (may be NULL) goes to base_model_name_or_path. */
int ln_export_peft(const ln_model *m, const ln_adapter *ad, const char *base_model, const char *dir, ln_err *e);

/* Adds ad's update relative to the original weights to `orig` (a model loaded from the ORIGINAL
 * base checkpoint, modified in place) and writes it to dir in dtype (an st_dtype code, or −1 for
 * the base's own dtype). For a full fine-tune, pass the trained model as orig and ad->full set:
 * it is written as is. */
int ln_export_merged(ln_model *orig, const ln_model *trained, const ln_adapter *ad, const char *dir, int dtype,
                     ln_err *e);

/* The st_dtype code of a config's torch_dtype ("bfloat16" → BF16, "float16" → F16, else F32). */
int ln_export_base_dtype(const ln_config *cfg);

#endif
