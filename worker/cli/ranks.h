/* ranks.h — `--ranks N` for `loranull train`, `init` and `covariance`: the command's work as N
 * tensor-parallel ranks (worker/engine/tensor_parallel.h, Megatron's split) on N threads of this
 * process, with the thread comm backend (worker/backend/comm/comm.h), which adds in rank order —
 * so N ranks give the 1-rank results up to the rounding of the partial sums.
 *
 *   calibration    every rank runs the calibration forwards on its shard; ln_calibrate (on a shard)
 *                  hands rank 0 the whole layer inputs (ln_tp_calibration_hook), so rank 0's
 *                  covariances are the unsharded ones.
 *   init           lora_null_v1 / lora_null_v2 initialise on the shards (ln_tp_init_lora_null: the
 *                  4 eigensolves of each layer spread over the ranks); the factors are gathered back
 *                  onto the whole model. The other methods have nothing to spread and initialise on
 *                  the whole model.
 *   train          ln_tp_train (the ranks shard the model and adapter, train, and gather).
 *
 * GPUs: N > 1 is CPU only. The CUDA backend (worker/backend/cuda) is one context per process — one
 * device, one stream, one cuBLAS/cuSOLVER handle and one set of workspaces, bound to every calling
 * thread — so several ranks (devices) in one process would share and race on them. */
#ifndef LN_CLI_RANKS_H
#define LN_CLI_RANKS_H

#include "common/err.h"
#include "worker/backend/backend.h"
#include "worker/cli/calib_opts.h"
#include "worker/engine/adapter.h"
#include "worker/engine/calibrate.h"
#include "worker/engine/config.h"
#include "worker/engine/model.h"

#define CLI_RANKS_MAX 1024

#define CLI_RANKS_OPT(r)                                                                                        \
    {"ranks", CLI_INT, &(r), "tensor-parallel ranks: N threads, each holding 1/N of every layer (default 1; CPU)"}

/* Is --ranks N usable: 1..CLI_RANKS_MAX, the CPU backend when N > 1 (be may be NULL: CPU), and a
 * model whose attention heads, kv heads and intermediate size divide by N (cfg may be NULL)? The
 * error names the option and what does not fit. */
int cli_ranks_check(int ranks, const lnb_backend *be, const ln_config *cfg, ln_err *e);

/* Does LoRA rank r fit the block of every targeted module that one of `ranks` ranks holds (the
 * engine's factors are at most as wide as their block)? */
int cli_ranks_check_lora(int ranks, const ln_config *cfg, int r, unsigned targets, ln_err *e);

/* cli_calibrate (calib_opts.h) on `ranks` shards of m; the same covariances. ranks 1 is
 * cli_calibrate itself. */
int cli_calibrate_ranks(ln_model *m, const char *model_dir, const cli_calib *c, unsigned targets, int ranks,
                        ln_calibration **out, ln_err *e);

/* ln_adapter_init(m, ad, o) with lora_null_v1 / lora_null_v2 initialised on `ranks` shards (see
 * above): leaves m and *ad as ln_adapter_init does (factors, A frozen for v2, A0/B0, the residual
 * subtracted from m). solves (NULL, or `ranks` ints) gets each rank's eigensolve count (all 0 when
 * the init did not run on shards). */
int cli_adapter_init_ranks(ln_model *m, ln_adapter *ad, const ln_adapter_opts *o, int ranks, int *solves,
                           ln_err *e);

#endif
