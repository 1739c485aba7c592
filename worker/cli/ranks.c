/* ranks.c — `--ranks N`: calibration and LoRA-Null init on tensor-parallel shards (see ranks.h). */
#include "worker/cli/ranks.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/backend/comm/comm.h"
#include "worker/engine/lora_init.h"
#include "worker/engine/tensor_parallel.h"

int cli_ranks_check(int ranks, const lnb_backend *be, const ln_config *cfg, ln_err *e) {
    if (ranks < 1 || ranks > CLI_RANKS_MAX)
        return ln_errf(e, "option --ranks: %d is out of range (1..%d)", ranks, CLI_RANKS_MAX);
    if (ranks == 1) return 0;
    if (be && strcmp(be->name, "cpu") != 0)
        return ln_errf(e, "option --ranks %d: tensor-parallel ranks run on --device cpu only (the %s backend drives "
                          "one GPU per process, with one stream and one cuBLAS handle for every thread)",
                       ranks, be->name);
    ln_config shard;
    if (cfg && ln_tp_shard_config(cfg, ranks, &shard, e)) return ln_err_prefix(e, "option --ranks %d", ranks);
    return 0;
}

int cli_ranks_check_lora(int ranks, const ln_config *cfg, int r, unsigned targets, ln_err *e) {
    ln_config shard;
    if (ranks <= 1) return 0;
    if (ln_tp_shard_config(cfg, ranks, &shard, e)) return ln_err_prefix(e, "option --ranks %d", ranks);
    for (int t = 0; t < LN_NTARGET; t++) {
        int d_out, d_in, whole_out, whole_in;
        if (!(targets & (1u << t))) continue;
        ln_model_target_dims(&shard, (ln_target)t, &d_out, &d_in);
        ln_model_target_dims(cfg, (ln_target)t, &whole_out, &whole_in);
        if (r > d_out || r > d_in)
            return ln_errf(e, "option --ranks %d: LoRA rank %d exceeds the %d × %d block of %s (%d × %d) that one "
                              "rank holds",
                           ranks, r, d_out, d_in, ln_target_module((ln_target)t), whole_out, whole_in);
    }
    return 0;
}

/* What the ranks do, shared by their threads (each rank writes only its own slots, and rank 0
 * alone the results). */
typedef struct tp_job {
    ln_model *full;
    /* calibration (cal != NULL): rank 0's covariances into calib */
    const char *model_dir;
    const cli_calib *cal;
    unsigned targets;
    ln_calibration *calib;
    /* LoRA-Null init (ao != NULL): rank 0 gathers the factors into ad (allocated on full) */
    const ln_adapter_opts *ao;
    ln_adapter *ad;
    int *solves;
} tp_job;

static int tp_rank(ln_comm *c, void *ctx, ln_err *e) {
    tp_job *j = ctx;
    ln_model *shard = NULL;
    ln_calibration *calib = NULL;
    ln_adapter sad;
    memset(&sad, 0, sizeof sad);
    int rc = ln_tp_shard_model(j->full, c, &shard, e);
    if (rc == 0 && j->cal) {
        rc = cli_calibrate(shard, j->model_dir, j->cal, j->targets, &calib, e);
        if (rc == 0 && c->rank == 0) {
            j->calib = calib; /* the whole covariances; the other ranks' calibration holds none */
            calib = NULL;
        }
    }
    if (rc == 0 && j->ao) {
        /* the engine's shard init (as the worker's ranks run it); the threads share the covariances */
        ln_model *shape = ln_tp_whole_shape(shard);
        rc = ln_tp_adapter_init(shard, shape, j->ao, 1, &sad, c->rank == 0 ? j->ad : NULL,
                                j->solves ? &j->solves[c->rank] : NULL, e);
        ln_model_free(shape); /* owns no weights: the whole adapter's memory is the backend's */
    }
    ln_calibration_free(calib);
    ln_adapter_free(&sad);
    ln_model_free(shard);
    return rc;
}

static int run_ranks(tp_job *j, int ranks, ln_err *e) {
    void **ctxs = ln_xcalloc((size_t)ranks, sizeof *ctxs);
    for (int r = 0; r < ranks; r++) ctxs[r] = j;
    int rc = comm_thread_run(ranks, tp_rank, ctxs, e);
    free(ctxs);
    return rc;
}

int cli_calibrate_ranks(ln_model *m, const char *model_dir, const cli_calib *c, unsigned targets, int ranks,
                        ln_calibration **out, ln_err *e) {
    if (ranks <= 1) return cli_calibrate(m, model_dir, c, targets, out, e);
    if (cli_ranks_check(ranks, m->be, &m->cfg, e)) return -1;
    tp_job j = {.full = m, .model_dir = model_dir, .cal = c, .targets = targets};
    if (run_ranks(&j, ranks, e)) {
        ln_calibration_free(j.calib);
        return -1;
    }
    *out = j.calib;
    return 0;
}

int cli_adapter_init_ranks(ln_model *m, ln_adapter *ad, const ln_adapter_opts *o, int ranks, int *solves,
                           ln_err *e) {
    if (solves) memset(solves, 0, (size_t)(ranks > 0 ? ranks : 0) * sizeof *solves);
    ln_method me;
    const char *method = o->method ? o->method : "lora";
    if (ranks <= 1 || ln_method_parse(method, &me, e) ||
        (me != LN_METHOD_LORA_NULL_V1 && me != LN_METHOD_LORA_NULL_V2))
        return ln_adapter_init(m, ad, o, e); /* nothing to spread (an unknown method: its error) */
    if (cli_ranks_check(ranks, m->be, &m->cfg, e)) return -1;
    if (!o->covariance)
        return ln_errf(e, "adapter method \"%s\" needs calibration covariances and none were given", method);
    unsigned targets = o->targets ? o->targets : LN_TARGETS_ALL;
    for (int l = 0; l < m->cfg.num_layers; l++) /* every covariance the owning ranks will read, as one rank says it */
        for (int t = 0; t < LN_NTARGET; t++)
            if ((targets & (1u << t)) && !o->covariance(o->method_ctx, l, ln_target_input((ln_target)t)))
                return ln_errf(e, "adapter method \"%s\": no covariance for layer %d input of %s", method, l,
                               ln_target_module((ln_target)t));
    tp_job j = {.full = m, .ao = o, .ad = ad, .solves = solves};
    memset(ad, 0, sizeof *ad);
    if (run_ranks(&j, ranks, e)) goto fail;
    /* as ln_adapter_init leaves a residual method: W0 − scale·B0 A0 in m (the same fp64 subtraction
     * the shards made), A0/B0 kept */
    for (int i = 0; i < ad->num_layers * LN_NTARGET; i++) {
        ad->be->free(ad->lora[i].A0);
        ad->be->free(ad->lora[i].B0);
        ad->lora[i].A0 = ad->lora[i].B0 = NULL;
    }
    ad->residual = 0;
    if (ln_adapter_make_residual(m, ad, e)) goto fail;
    return 0;
fail:
    ln_adapter_free(ad);
    memset(ad, 0, sizeof *ad);
    return -1;
}
