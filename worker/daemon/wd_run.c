/* wd_run.c — a leased job in the engine, in its own thread (see wd_run.h). */
/* The engine's headers come before wd_run.h: uv.h pulls in <termios.h>, whose B0 macro (baud
 * rate 0) would rename the adapter's B0 factor. */
#include "worker/engine/adapter.h"
#include "worker/engine/drift.h"

#include "worker/daemon/wd_run.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/backend/backend.h"
#include "worker/backend/select.h"
#include "worker/engine/adapter.h"
#include "worker/engine/calibrate.h"
#include "worker/engine/data.h"
#include "worker/engine/drift.h"
#include "worker/engine/export.h"
#include "worker/engine/lora_init.h"
#include "worker/engine/memplan.h"
#include "worker/engine/model.h"
#include "worker/engine/tensor_parallel.h"
#include "worker/engine/tokenizer.h"
#include "worker/engine/train.h"

/* Examples evaluated for the before/after losses at most: enough to compare, cheap next to training. */
#define EVAL_MAX_EXAMPLES 256

typedef struct run_priv {
    ln_tokenizer *tok;
    ln_model *m;
    ln_adapter ad;
    int have_ad;
    ln_dataset *ds, *vds, *kds;   /* training, validation, knowledge (the calibration file) */
    ln_calibration *calib;
    ln_drift_tracker *drift;
    double drift_mean, drift_max;
    int have_drift;
    wd_outbox *out;               /* r->out on the reporting rank; `sink` (never sent) on the others */
    wd_outbox sink;
} run_priv;

/* ---------------------------------------------------------------- helpers */

/* Where this process's events and metrics go: the daemon's outbox, unless it holds a rank ≠ 0
 * of a gang spread over workers (rank 0 reports for the whole job; see wd_run.h). */
static wd_outbox *report_to(wd_run *r) { return ((run_priv *)r->priv)->out; }

/* Does this process hold rank 0 (or the whole job)? */
static int reporting(const wd_run *r) { return !r->comm || r->rank == 0; }

/* Does the job run on shards, every rank holding 1/world of each layer and never the whole model
 * (see wd_run.h)? Every multi-rank job does, full fine-tuning included. */
static int sharded(const wd_run *r) { return r->world > 1; }

/* "training file file-X: …" — unless the message already names the file (the loader's
 * "<path> line N: …", the path becoming the id once stripped): then "training file file-X line
 * N: …", the id said once. */
static void prefix_file(ln_err *e, const char *what, const char *path, const char *id) {
    if (!strstr(e->msg, path)) {
        ln_err_prefix(e, "%s %s", what, id);
        return;
    }
    char old[sizeof e->msg];
    memcpy(old, e->msg, sizeof old);
    snprintf(e->msg, sizeof e->msg, "%s %.*s", what, (int)(sizeof e->msg - strlen(what) - 2), old);
}

/* Removes every "<files_dir>/" from msg: the user knows the file by its id, not our path. */
static void strip_paths(char *msg, const char *files_dir) {
    char pre[WD_PATH_MAX + 2];
    snprintf(pre, sizeof pre, "%s/", files_dir);
    size_t pl = strlen(pre);
    char *p;
    while (pl > 1 && (p = strstr(msg, pre))) memmove(p, p + pl, strlen(p + pl) + 1);
}

static int fail(wd_run *r, const char *code, int retryable, const ln_err *e) {
    /* Whatever stage ran out (loading data, init, drift tracking), the user's remedy is the same. */
    if (strstr(e->msg, "out of memory")) {
        code = "out_of_memory";
    } else if (strstr(e->msg, " device error ")) {
        /* a kernel failed on the GPU (ln_model_check_device: "cuda device error at train step 12: …"),
         * whatever stage saw it: nothing of that step was saved, so another attempt resumes from the
         * last good checkpoint (on this GPU or another) */
        code = "device_error";
        retryable = 1;
    }
    r->status = WD_RUN_FAILED;
    snprintf(r->err_code, sizeof r->err_code, "%s", code);
    /* What the user can change, after what happened. */
    const char *hint = strcmp(code, "out_of_memory") == 0
                           ? ". Lower hyperparameters.batch_size (raise grad_accum to keep the effective batch) or "
                             "max_seq_len, or run on a worker with more memory"
                           : "";
    snprintf(r->err_msg, sizeof r->err_msg, "%s%s", e->msg, hint);
    strip_paths(r->err_msg, r->files_dir);
    r->retryable = retryable;
    return -1;
}

/* A view of the first n examples of ds (borrowed; never freed). */
static ln_dataset head_view(const ln_dataset *ds, int64_t n) {
    ln_dataset v = *ds;
    if (v.n > n) v.n = n;
    return v;
}

static const char *basename_of(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

static void note_checkpoint(wd_run *r, int64_t step, const char *dir) {
    if (step <= r->noted_step) return;
    r->noted_step = step;
    pthread_mutex_lock(&r->mu);
    r->ckpt_step = step;
    r->ckpt_loss = step == r->last_row_step ? r->last_row_loss : NAN;
    snprintf(r->ckpt_dir, sizeof r->ckpt_dir, "%s", dir);
    r->ckpt_new = 1;
    pthread_mutex_unlock(&r->mu);
    if (r->wake) uv_async_send(r->wake);
}

/* ---------------------------------------------------------------- training callbacks */

/* The eval points: the validation loss at the spec's eval_interval (and the last step), the
 * knowledge drift every drift_every steps (and the last) so the dashboard can plot it live. */
static int val_due(const wd_run *r, int64_t step) {
    int ei = r->spec.hp.eval_interval;
    return step == r->total_steps || (ei > 0 && step % ei == 0);
}

static int drift_due(const wd_run *r, int64_t step) { return step == r->total_steps || step % r->drift_every == 0; }

/* The drift a row got, kept for the summary. */
static void keep_drift(run_priv *p, json_t *row) {
    p->drift_mean = json_number_value(json_object_get(row, "knowledge_drift_mean"));
    p->drift_max = json_number_value(json_object_get(row, "knowledge_drift_max"));
    p->have_drift = 1;
}

/* One rank's eval callback (called every step; does what is due). */
static int on_eval(ln_model *m, ln_adapter *ad, int64_t step, json_t *row, void *ctx, ln_err *e) {
    wd_run *r = ctx;
    run_priv *p = r->priv;
    if (p->vds && val_due(r, step)) {
        double loss;
        ln_dataset v = head_view(p->vds, p->vds->n);
        if (ln_eval_loss(m, ad, &v, r->spec.hp.batch_size, &loss, e) != 0) return -1;
        json_object_set_new(row, "val_loss", json_real(loss));
    }
    if (p->drift && drift_due(r, step)) {
        if (ln_drift_tracker_measure(p->drift, m, ad, row, e) != 0) return -1;
        keep_drift(p, row);
    }
    return 0;
}

/* Flattens a metrics row into name → number ("knowledge_drift/<module>" per layer). */
static json_t *row_values(json_t *row) {
    json_t *vals = json_object();
    const char *k;
    json_t *v;
    json_object_foreach(row, k, v) {
        if (strcmp(k, "step") == 0) continue;
        if (json_is_number(v)) json_object_set(vals, k, v);
        else if (json_is_object(v)) {
            const char *k2;
            json_t *v2;
            json_object_foreach(v, k2, v2) if (json_is_number(v2)) {
                char name[160];
                snprintf(name, sizeof name, "%s/%s", k, k2);
                if (strlen(name) <= 128) json_object_set(vals, name, v2);
            }
        }
    }
    return vals;
}

static void on_row(json_t *row, void *ctx) {
    wd_run *r = ctx;
    int64_t step = json_integer_value(json_object_get(row, "step"));
    r->last_row_step = step;
    r->last_row_loss = json_number_value(json_object_get(row, "loss"));
    wd_outbox_metrics(report_to(r), step, row_values(row));
    if (step % r->progress_every == 0 || step == r->total_steps) {
        double loss = json_number_value(json_object_get(row, "loss"));
        json_t *data = json_pack("{s:I, s:f, s:I}", "step", (json_int_t)step, "train_loss", loss, "total_steps",
                                 (json_int_t)r->total_steps);
        json_t *vl = json_object_get(row, "val_loss"), *dm = json_object_get(row, "knowledge_drift_mean");
        char extra[160] = "";
        if (vl) {
            json_object_set(data, "valid_loss", vl);
            snprintf(extra, sizeof extra, ", validation loss=%.4f", json_number_value(vl));
        }
        if (dm) {
            json_object_set(data, "knowledge_drift_mean", dm);
            size_t l = strlen(extra);
            snprintf(extra + l, sizeof extra - l, ", knowledge drift=%.3e", json_number_value(dm));
        }
        wd_outbox_stage_event(report_to(r), "training", data, "Step %lld/%lld: training loss=%.4f%s", (long long)step,
                        (long long)r->total_steps, loss, extra);
    }
}

/* Polled before every step: a stop requested by the loop, and the checkpoint the previous step
 * wrote (checkpoints are written right after on_row). */
static int should_stop(void *ctx) {
    wd_run *r = ctx;
    if (r->save_every > 0 && r->last_row_step > 0 && r->last_row_step % r->save_every == 0 &&
        r->last_row_step > r->noted_step) {
        char sub[64];
        snprintf(sub, sizeof sub, "out/checkpoints/step-%06lld", (long long)r->last_row_step);
        char *d = ln_path_join(r->dir, sub);
        note_checkpoint(r, r->last_row_step, d);
        free(d);
    }
    return atomic_load(&r->stop) != WD_STOP_NONE;
}

/* ---------------------------------------------------------------- stages */

/* spec.data.chat_template for ln_data_opts / ln_calib_opts: NULL for "auto" (the tokenizer's own). */
static const char *data_chat_template(const ln_jobspec *s) {
    return s->data.chat_template[0] && strcmp(s->data.chat_template, "auto") != 0 ? s->data.chat_template : NULL;
}

static int stage_data(wd_run *r, run_priv *p) {
    ln_err e = {{0}};
    const ln_jobspec *s = &r->spec;
    wd_outbox_stage_event(report_to(r), "validating", NULL, "Validating the data of %s", s->training_file);
    char *tp = ln_path_join(r->model_dir, "tokenizer.json");
    int has_tok = ln_file_exists(tp);
    free(tp);
    if (has_tok && ln_tokenizer_load(r->model_dir, &p->tok, &e) != 0)
        return fail(r, "model_unavailable", 1, &e);
    /* spec.data (proto/worker-protocol.md): the same options as `loranull train`'s flags. */
    ln_data_opts dopts = {.max_seq_len = s->hp.max_seq_len,
                          .overlong = s->data.reject_overlong ? LN_OVERLONG_REJECT : LN_OVERLONG_TRUNCATE,
                          .chat_template = data_chat_template(s)};
    if (ln_dataset_load(r->train_path, p->tok, &dopts, &p->ds, &e) != 0) {
        prefix_file(&e, "training file", r->train_path, s->training_file);
        return fail(r, "invalid_training_file", 0, &e);
    }
    if (r->val_path[0] && ln_dataset_load(r->val_path, p->tok, &dopts, &p->vds, &e) != 0) {
        prefix_file(&e, "validation file", r->val_path, s->validation_file);
        return fail(r, "invalid_validation_file", 0, &e);
    }
    const ln_data_stats *st = &p->ds->stats;
    wd_outbox_stage_event(report_to(r), "validating", NULL,
                    "Training data validated: %lld examples, %lld tokens (%lld trained), %lld truncated to "
                    "max_seq_len %d",
                    (long long)st->examples, (long long)st->tokens, (long long)st->trained_tokens,
                    (long long)st->truncated, s->hp.max_seq_len);
    return 0;
}

/* Does the job calibrate (its method needs covariances, or a calibration file was given)? */
static int calibrated(const wd_run *r) {
    ln_method me;
    ln_err e = {{0}};
    if (ln_method_parse(ln_adapter_type_name(r->spec.adapter.type), &me, &e) != 0) return 0;
    return ln_method_needs_calibration(me) || r->calib_path[0];
}

/* The calibration file (the training file when none was given) and its id. */
static const char *calib_file(const wd_run *r, const char **id) {
    if (id) *id = r->calib_path[0] ? r->spec.adapter.calibration_file : r->spec.training_file;
    return r->calib_path[0] ? r->calib_path : r->train_path;
}

static ln_calib_opts calib_opts(const wd_run *r, unsigned targets) {
    const ln_jobspec *s = &r->spec;
    ln_calib_opts co = {.path = calib_file(r, NULL), .samples = s->adapter.calibration_samples,
                        .max_length = s->adapter.calibration_max_length, .seed = 0, .targets = targets,
                        .cache_dir = r->cache_dir, .chat_template = data_chat_template(s)};
    return co;
}

static void calibrating_event(wd_run *r) {
    const char *cid;
    calib_file(r, &cid);
    wd_outbox_stage_event(report_to(r), "calibrating", NULL, "Calibrating on up to %d samples of %s (max_length %d)",
                          r->spec.adapter.calibration_samples, cid, r->spec.adapter.calibration_max_length);
}

static void calibrated_event(wd_run *r, const ln_calibration *c, unsigned targets, double t0) {
    wd_outbox_stage_event(report_to(r), "calibrating", NULL,
                    "Calibrated%s: %lld samples, %lld tokens, %d covariance(s) per layer in %.1f s",
                    c->from_cache ? " (from the cache)" : "", (long long)c->samples,
                    (long long)c->tokens, (targets & 0x7 ? 1 : 0) + (targets & 0x8 ? 1 : 0) +
                    (targets & 0x30 ? 1 : 0) + (targets & 0x40 ? 1 : 0), ln_now_s() - t0);
}

/* "calibration file file-X: …" (see prefix_file). */
static void prefix_calib_file(const wd_run *r, ln_err *e) {
    const char *cid, *cpath = calib_file(r, &cid);
    prefix_file(e, "calibration file", cpath, cid);
}

static int calib_failed(wd_run *r, ln_err *e) {
    prefix_calib_file(r, e);
    return fail(r, "invalid_calibration_file", 0, e);
}

/* The knowledge set: the calibration file, scored before and after training. */
static int load_knowledge(wd_run *r, run_priv *p) {
    ln_err e = {{0}};
    const ln_jobspec *s = &r->spec;
    ln_data_opts dopts = {.max_seq_len = s->adapter.calibration_max_length, .overlong = LN_OVERLONG_TRUNCATE,
                          .chat_template = data_chat_template(s)};
    if (ln_dataset_load(calib_file(r, NULL), p->tok, &dopts, &p->kds, &e) != 0) return calib_failed(r, &e);
    return 0;
}

/* ln_calibrate with m's frozen weights in the backend's faster form for its forwards (bf16 copies on
 * a GPU), thawed after it: the init rewrites W0 next. */
static int calibrate_frozen(ln_model *m, const ln_tokenizer *tok, const ln_calib_opts *co, ln_calibration **out,
                            ln_err *e) {
    int rc = ln_model_freeze_frozen(m, NULL, e);
    if (rc == 0) rc = ln_calibrate(m, tok, co, out, e);
    ln_model_thaw(m);
    return rc;
}

static int stage_model_and_calibration(wd_run *r, run_priv *p, unsigned targets) {
    ln_err e = {{0}};
    const ln_jobspec *s = &r->spec;
    {
        /* On a GPU the memory plan comes first: a job that cannot fit fails now, with needed vs free. */
        ln_config mc;
        char *cp = ln_path_join(r->model_dir, "config.json");
        int rc = ln_config_load(cp, &mc, &e);
        free(cp);
        if (rc != 0) {
            ln_err_prefix(&e, "model %s", r->model_name);
            return fail(r, "model_unavailable", 1, &e);
        }
        /* a sharded job's split must divide; both plans take the whole config and the ranks: each
         * rank its shard, rank 0 the covariances and the gathered adapter (memplan.h, cuda.h) */
        ln_config shard;
        if (sharded(r) && ln_tp_shard_config(&mc, r->world, &shard, &e) != 0) {
            ln_err_prefix(&e, "model %s", r->model_name);
            return fail(r, "invalid_method", 0, &e);
        }
        const int ranks = sharded(r) ? r->world : 1, here = r->comm ? 1 : ranks, first = r->comm ? r->rank : 0;
        ln_adapter_type ty = s->adapter.type;
        const char *mname = ln_adapter_type_name(ty);
        ln_method mm = LN_METHOD_LORA;
        if (ln_method_parse(mname, &mm, &e) != 0) return fail(r, "invalid_method", 0, &e);
        const int calib = calibrated(r), rank = ty == LN_ADAPTER_FULL ? 0 : s->adapter.rank;
        const int seq = s->data.pack > s->hp.max_seq_len ? s->data.pack : s->hp.max_seq_len;
        const int train_a = ty != LN_ADAPTER_LORA_FA && ty != LN_ADAPTER_LORA_NULL_V2;
        lnb_cuda_plan_req pq = {.vocab = mc.vocab_size, .hidden = mc.hidden_size, .intermediate = mc.intermediate_size,
                                .layers = mc.num_layers, .heads = mc.num_heads, .kv_heads = mc.num_kv_heads,
                                .head_dim = mc.head_dim, .tied = mc.tie_word_embeddings, .batch = s->hp.batch_size,
                                .seq = seq, .rank = rank, .target_mask = targets ? targets : LN_TARGETS_ALL,
                                .train_a = train_a, .residual = ln_method_has_residual(mm), .method = mname,
                                .calibrate = calib, .calib_max_length = s->adapter.calibration_max_length,
                                .device_covariances = ln_calibrate_accumulator() != NULL, .eval_during_training = 1,
                                .ranks = ranks, .ranks_here = here, .first_rank = first,
                                /* the frozen weights' bf16 copies (ln_model_freeze_frozen): every job but full */
                                .bf16_copies = ty != LN_ADAPTER_FULL};
        if (lnb_select_plan_check(r->be, &pq, &e) != 0) return fail(r, "out_of_memory", 0, &e);
        if (strcmp(r->be->name, "cpu") == 0) { /* the same question for host memory (memplan.h) */
            ln_memplan_req mq = {.cfg = &mc, .batch = s->hp.batch_size, .seq = seq, .rank = rank, .targets = targets,
                                 .train_a = train_a, .residual = ln_method_has_residual(mm), .method = mname,
                                 .calibrate = calib, .calib_max_length = s->adapter.calibration_max_length,
                                 .eval_during_training = 1, .drift = calib,
                                 .data_tokens = p->ds->stats.tokens + (p->vds ? p->vds->stats.tokens : 0),
                                 .ranks = ranks, .ranks_here = here, .first_rank = first};
            if (ln_memplan_check(&mq, "", NULL, &e) != 0) return fail(r, "out_of_memory", 0, &e);
        }
    }
    if (sharded(r)) /* each rank loads its shard and calibrates on it (tp_rank_main) */
        return calibrated(r) ? load_knowledge(r, p) : 0;
    if (ln_model_load(r->model_dir, r->be, &p->m, &e) != 0) {
        ln_err_prefix(&e, "model %s", r->model_name);
        return fail(r, "model_unavailable", 1, &e);
    }
    ln_method me;
    if (ln_method_parse(ln_adapter_type_name(s->adapter.type), &me, &e) != 0) return fail(r, "invalid_method", 0, &e);
    if (!calibrated(r)) return 0;
    calibrating_event(r);
    double t0 = ln_now_s();
    ln_calib_opts co = calib_opts(r, targets);
    if (calibrate_frozen(p->m, p->tok, &co, &p->calib, &e) != 0) return calib_failed(r, &e);
    calibrated_event(r, p->calib, targets, t0);
    return load_knowledge(r, p);
}

/* After the init (or restore) wrote the final W0: the device checked, then the frozen weights in the
 * backend's faster form for the evaluations and the training (ln_model_free thaws them). */
static int freeze_for_training(wd_run *r, ln_model *m, ln_adapter *ad, ln_err *e) {
    if (ln_model_check_device(m, e, "after the adapter's %s", r->resume[0] ? "restore" : "init") != 0 ||
        ln_model_freeze_frozen(m, ad, e) != 0)
        return fail(r, "initialization_failed", 0, e);
    return 0;
}

static int stage_adapter(wd_run *r, run_priv *p, unsigned targets) {
    ln_err e = {{0}};
    const ln_jobspec *s = &r->spec;
    const char *method = ln_adapter_type_name(s->adapter.type);
    double t0 = ln_now_s();
    if (r->resume[0]) {
        if (ln_train_load_checkpoint(p->m, r->resume, &p->ad, &e) != 0) return fail(r, "checkpoint_unusable", 1, &e);
        p->have_ad = 1;
        wd_outbox_stage_event(report_to(r), "initialising", NULL, "Restored the %s adapter from checkpoint %s", method,
                        basename_of(r->resume));
    } else {
        ln_adapter_opts ao = {.method = method, .rank = s->adapter.rank, .alpha = (float)s->adapter.alpha,
                              .targets = targets, .seed = (uint64_t)s->seed,
                              .covariance = p->calib ? ln_calibration_covariance : NULL, .method_ctx = p->calib};
        if (ln_adapter_init(p->m, &p->ad, &ao, &e) != 0) return fail(r, "initialization_failed", 0, &e);
        p->have_ad = 1;
        if (p->ad.full)
            wd_outbox_stage_event(report_to(r), "initialising", NULL, "Full fine-tuning: every weight trains");
        else
            wd_outbox_stage_event(report_to(r), "initialising", NULL, "Initialised the %s adapter (rank %d, alpha %g) in %.2f s", method,
                            p->ad.rank, (double)p->ad.alpha, ln_now_s() - t0);
    }
    if (p->calib && reporting(r) && ln_drift_tracker_new(p->m, &p->ad, ln_calibration_covariance, p->calib, &p->drift, &e) != 0)
        return fail(r, "initialization_failed", 0, &e);
    return freeze_for_training(r, p->m, &p->ad, &e);
}

/* The task loss (validation file, else the training file) and the knowledge loss (calibration
 * file), each over at most EVAL_MAX_EXAMPLES examples. */
static int evaluate(wd_run *r, run_priv *p, double *task, double *know, ln_err *e) {
    const ln_dataset *t = p->vds ? p->vds : p->ds;
    ln_dataset tv = head_view(t, EVAL_MAX_EXAMPLES);
    if (ln_eval_loss(p->m, &p->ad, &tv, r->spec.hp.batch_size, task, e) != 0) return -1;
    *know = NAN;
    if (p->kds) {
        ln_dataset kv = head_view(p->kds, EVAL_MAX_EXAMPLES);
        if (ln_eval_loss(p->m, &p->ad, &kv, r->spec.hp.batch_size, know, e) != 0) return -1;
    }
    return 0;
}

static json_t *eval_values(double task, double know) {
    json_t *v = json_pack("{s:f}", "eval/task_loss", task);
    if (isfinite(know)) json_object_set_new(v, "eval/knowledge_loss", json_real(know));
    return v;
}

/* {"task_loss", "knowledge_loss" (null without a knowledge file)}. */
static json_t *losses(double task, double know) {
    return json_pack("{s:f, s:o}", "task_loss", task, "knowledge_loss", isfinite(know) ? json_real(know) : json_null());
}

/* The reporting rank before training: the step-0 metrics and event; returns the losses for the
 * summary. */
static json_t *report_before(wd_run *r, double task, double know) {
    wd_outbox_metrics(report_to(r), 0, eval_values(task, know));
    json_t *before = losses(task, know);
    wd_outbox_stage_event(report_to(r), "training", json_deep_copy(before), "Before training: task loss %.4f%s", task,
                          isfinite(know) ? "" : " (no knowledge file)");
    return before;
}

static int write_summary(wd_run *r, run_priv *p, json_t *before, double task, double know, ln_err *e) {
    json_t *o = json_pack("{s:s, s:s, s:s, s:I, s:o, s:o}", "job_id", r->job_id, "model", r->model_name,
                          "method", ln_adapter_type_name(r->spec.adapter.type), "steps", (json_int_t)r->steps,
                          "before", before ? json_incref(before) : json_null(), "after", losses(task, know));
    if (p->have_drift)
        json_object_set_new(o, "knowledge_drift", json_pack("{s:f, s:f}", "mean", p->drift_mean, "max", p->drift_max));
    char *txt = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS);
    char *path = ln_path_join(r->export_dir, "eval_summary.json");
    int rc = ln_write_file_atomic(path, txt, strlen(txt), e);
    free(path);
    free(txt);
    json_decref(o);
    return rc;
}

/* The step counts and intervals of the run (r->total_steps, save_every, drift_every, …). */
static void plan_steps(wd_run *r, const run_priv *p) {
    const ln_jobspec *s = &r->spec;
    const ln_hparams *hp = &s->hp;
    int per_step = hp->batch_size * hp->grad_accum;
    r->total_steps = ((int64_t)hp->n_epochs * p->ds->n + per_step - 1) / per_step;
    if (s->data.pack > 0) { /* as ln_train counts packed steps: rows of `pack` tokens over the epochs' tokens */
        int64_t per_step_tokens = (int64_t)per_step * s->data.pack;
        r->total_steps = ((int64_t)hp->n_epochs * p->ds->stats.tokens + per_step_tokens - 1) / per_step_tokens;
    }
    /* Checkpoints: the spec's interval, else about ten per run, so a lost worker costs little. */
    r->save_every = hp->save_interval > 0 ? hp->save_interval : (int)((r->total_steps + 9) / 10);
    r->drift_every = hp->eval_interval > 0 ? hp->eval_interval : (r->total_steps + 19) / 20;
    r->progress_every = (r->total_steps + 19) / 20;
    if (r->drift_every < 1) r->drift_every = 1;
    if (r->progress_every < 1) r->progress_every = 1;
    r->trained_tokens = p->ds->stats.trained_tokens * hp->n_epochs;
}

/* The training options of the job (the same on every rank); returns the out dir to free. */
static char *train_opts(wd_run *r, ln_train_opts *to) {
    const ln_jobspec *s = &r->spec;
    const ln_hparams *hp = &s->hp;
    char *out = ln_path_join(r->dir, "out");
    *to = ln_train_defaults();
    to->epochs = hp->n_epochs;
    to->batch_size = hp->batch_size;
    to->grad_accum = hp->grad_accum;
    to->optim.lr = (float)hp->learning_rate;
    to->optim.weight_decay = (float)hp->weight_decay;
    to->optim.max_grad_norm = (float)hp->max_grad_norm;
    to->warmup_ratio = hp->warmup_ratio;
    to->seed = (uint64_t)s->seed;
    to->shuffle = 1;
    to->save_every = r->save_every;
    to->out_dir = out;
    to->resume = r->resume[0] ? r->resume : NULL;
    to->pack = s->data.pack;
    to->eval_every = 1;
    to->eval = on_eval;
    to->eval_ctx = r;
    to->on_row = on_row;
    to->should_stop = should_stop;
    to->cb_ctx = r;
    return out;
}

static void training_event(wd_run *r) {
    const ln_jobspec *s = &r->spec;
    const ln_hparams *hp = &s->hp;
    int per_step = hp->batch_size * hp->grad_accum;
    char unit[96];
    if (s->data.pack > 0) snprintf(unit, sizeof unit, "%d packed rows of %d tokens", per_step, s->data.pack);
    else snprintf(unit, sizeof unit, "%d examples", per_step);
    wd_outbox_stage_event(report_to(r), "training", NULL, "Training: %lld steps of %s (%d epoch%s, learning rate %g)%s",
                    (long long)r->total_steps, unit, hp->n_epochs, hp->n_epochs == 1 ? "" : "s",
                    hp->learning_rate, r->world > 1 ? ", tensor-parallel" : "");
}

/* (An out-of-memory error becomes out_of_memory in fail(), whatever the stage.) */
static const char *train_code(const ln_err *e) {
    return strstr(e->msg, "not finite") ? "training_diverged" : "training_failed";
}

/* The reporting rank after training: the after-evaluation's metrics and event, the export (PEFT
 * adapter, or the merged model for full fine-tuning) and the summary. On failure *code says why. */
static int finish(wd_run *r, run_priv *p, ln_model *m, ln_adapter *ad, json_t *before, int64_t steps, double task,
                  double know, int exported, const char **code, ln_err *e) {
    wd_outbox_metrics(report_to(r), steps, eval_values(task, know));
    json_t *after = losses(task, know);
    if (p->have_drift) json_object_set_new(after, "knowledge_drift_mean", json_real(p->drift_mean));
    wd_outbox_stage_event(report_to(r), "evaluating", after, "After training: task loss %.4f%s", task,
                    p->have_drift ? ", knowledge drift measured" : "");

    char *ex = ln_path_join(r->dir, "export");
    snprintf(r->export_dir, sizeof r->export_dir, "%s", ex);
    free(ex);
    ln_model_thaw(m); /* a merge writes the weights */
    int rc = ln_mkdir_p(r->export_dir, e);
    if (rc == 0 && !exported) { /* (a sharded full fine-tune's ranks exported it together) */
        if (ad->full) rc = ln_export_merged(m, m, ad, r->export_dir, -1, e);
        else rc = ln_export_peft(m, ad, r->model_name, r->export_dir, e);
    }
    if (rc == 0) rc = write_summary(r, p, before, task, know, e);
    if (rc != 0) {
        *code = "export_failed";
        return -1;
    }
    if (!ad->full) {
        int pr;
        float pa;
        ln_export_peft_shape(ad, &pr, &pa);
        wd_outbox_stage_event(report_to(r), "exporting", NULL, "Exported a PEFT adapter (rank %d, lora_alpha %g) for the original %s",
                        pr, (double)pa, r->model_name);
    } else {
        wd_outbox_stage_event(report_to(r), "exporting", NULL, "Exported the fine-tuned model (full weights)");
    }
    r->status = WD_RUN_OK;
    return 0;
}

static int stage_train_and_export(wd_run *r, run_priv *p) {
    ln_err e = {{0}};
    plan_steps(r, p);
    json_t *before = NULL;
    if (!r->resume[0] && reporting(r)) {
        double task, know;
        if (evaluate(r, p, &task, &know, &e) != 0) return fail(r, "evaluation_failed", 0, &e);
        before = report_before(r, task, know);
    }
    ln_train_opts to;
    char *out = train_opts(r, &to);
    training_event(r);
    ln_train_result res;
    int rc;
    /* one rank (a multi-rank job runs on shards: run_sharded) */
    rc = ln_train(p->m, &p->ad, p->ds, &to, &res, &e);
    free(out);
    if (rc != 0) {
        json_decref(before);
        return fail(r, train_code(&e), 0, &e);
    }
    r->steps = res.steps;
    if (res.stopped) {
        json_decref(before);
        if (res.last_checkpoint[0]) note_checkpoint(r, res.steps, res.last_checkpoint);
        r->status = WD_RUN_STOPPED;
        return 0;
    }
    if (!reporting(r)) { /* rank 0 evaluates, exports and summarises */
        json_decref(before);
        r->status = WD_RUN_OK;
        return 0;
    }
    wd_outbox_stage_event(report_to(r), "evaluating", NULL, "Training finished: %lld steps, last loss %.4f", (long long)res.steps,
                    res.last_loss);

    double task, know;
    if (evaluate(r, p, &task, &know, &e) != 0) {
        json_decref(before);
        return fail(r, "evaluation_failed", 0, &e);
    }
    const char *code = NULL;
    rc = finish(r, p, p->m, &p->ad, before, res.steps, task, know, 0, &code, &e);
    json_decref(before);
    return rc != 0 ? fail(r, code, 1, &e) : 0;
}

/* ---------------------------------------------------------------- ranks on shards */

/* One rank of a sharded job (sharded(r)): a thread of this process (r->comm NULL: every rank of
 * the job here, rank 0 reporting through r) or this process's rank (r->comm). It holds only its
 * shard: loads it (ln_tp_load_shard), calibrates on it (collective; rank 0 gets the covariances),
 * initialises or restores the adapter on it, evaluates with collective forwards and trains it.
 * Rank 0 also holds the whole model's shape (no weights) and the whole adapter, gathered from the
 * shards, for checkpoints, the drift tracker and the export. */
typedef struct tp_rank {
    wd_run *r;
    ln_comm *c;
    unsigned targets;
    int threads;                  /* every rank a thread of this process: they share the covariances */
    ln_calibration **shared_calib; /* threads: rank 0's calibration, read by every rank for the init */
    ln_model *shard, *shape;
    ln_adapter sad, whole;
    ln_calibration *calib;        /* rank 0's */
    ln_tp_drift *drift;
    int eval_failed;              /* an eval at a step failed: the error is in eval_err */
    ln_err eval_err;
    const char *code;             /* what failed, as fail()'s code */
    int retryable;
    ln_err err;
} tp_rank;

static int rank_fail(tp_rank *k, const char *code, int retryable, ln_err *e) {
    k->code = code;
    k->retryable = retryable;
    k->err = *e;
    comm_abort(k->c); /* the other ranks fail instead of waiting for this one */
    return -1;
}

static int root_of(const tp_rank *k) { return k->c->rank == 0; }

/* Collective: mean loss of ds (its first n examples) on the shards; the same on every rank. */
static int shard_loss(tp_rank *k, const ln_dataset *ds, int64_t n, double *loss, ln_err *e) {
    ln_dataset v = head_view(ds, n);
    return ln_eval_loss(k->shard, &k->sad, &v, k->r->spec.hp.batch_size, loss, e);
}

/* evaluate() on the shards: every rank, collectively. */
static int shard_evaluate(tp_rank *k, double *task, double *know, ln_err *e) {
    run_priv *p = k->r->priv;
    if (shard_loss(k, p->vds ? p->vds : p->ds, EVAL_MAX_EXAMPLES, task, e) != 0) return -1;
    *know = NAN;
    return p->kds ? shard_loss(k, p->kds, EVAL_MAX_EXAMPLES, know, e) : 0;
}

/* Every rank's eval callback (ln_train_opts.eval_collective: ln_train calls it on every rank of
 * the shard, at every step): at the eval points on_eval would measure, the validation loss
 * (collective forwards on the shards) and the knowledge drift (the shards gathered into rank 0's
 * whole adapter, measured there), into rank 0's row — so the row rank 0 writes to out/metrics.jsonl
 * and reports has them, as on one rank. A failure is kept for the job (ln_train aborts the group,
 * so the step fails on every rank). */
static int tp_on_eval(ln_model *m, ln_adapter *ad, int64_t step, json_t *row, void *ctx, ln_err *e) {
    tp_rank *k = ctx;
    wd_run *r = k->r;
    run_priv *p = r->priv;
    int rc = 0; /* (m and ad are k's shard and adapter shard) */
    if (p->vds && val_due(r, step)) {
        double loss;
        rc = shard_loss(k, p->vds, p->vds->n, &loss, e);
        if (rc == 0 && root_of(k)) json_object_set_new(row, "val_loss", json_real(loss));
    }
    if (rc == 0 && k->drift && drift_due(r, step)) {
        /* full fine-tuning: ΔW gathered one weight at a time (collective); an adapter: gathered whole */
        if (k->sad.full) rc = ln_tp_drift_measure_full(k->drift, k->shard, row, e);
        else rc = ln_tp_gather(k->shard, &k->sad, NULL, root_of(k) ? &k->whole : NULL, e);
        if (rc == 0 && root_of(k)) {
            if (!k->sad.full) rc = ln_tp_drift_measure(k->drift, k->shape, &k->whole, row, e);
            if (rc == 0) keep_drift(p, row);
        }
    }
    if (rc != 0) {
        k->eval_failed = 1;
        k->eval_err = *e;
        ln_err_prefix(&k->eval_err, "train step %lld: evaluation", (long long)step);
    }
    return rc;
}

/* Rank 0 reports the row (the others' on_row does nothing). */
static void tp_on_row(json_t *row, void *ctx) {
    tp_rank *k = ctx;
    if (root_of(k)) on_row(row, k->r);
}

/* should_stop on the ranks that poll it: rank 0's thread, or every process rank. */
static int tp_should_stop(void *ctx) {
    tp_rank *k = ctx;
    return should_stop(k->r);
}

static int tp_load_and_init(tp_rank *k) {
    wd_run *r = k->r;
    run_priv *p = r->priv;
    const ln_jobspec *s = &r->spec;
    ln_err e = {{0}};
    int root = root_of(k);
    if (ln_tp_load_shard(r->model_dir, r->be, k->c, &k->shard, &e) != 0) {
        ln_err_prefix(&e, "model %s", r->model_name);
        return rank_fail(k, "model_unavailable", 1, &e);
    }
    k->shape = ln_tp_whole_shape(k->shard);
    if (calibrated(r)) {
        if (root) calibrating_event(r);
        double t0 = ln_now_s();
        ln_calib_opts co = calib_opts(r, k->targets);
        if (calibrate_frozen(k->shard, p->tok, &co, &k->calib, &e) != 0) {
            prefix_calib_file(r, &e);
            return rank_fail(k, "invalid_calibration_file", 0, &e);
        }
        if (root) calibrated_event(r, k->calib, k->targets, t0);
        if (k->threads) { /* the init's eigensolves spread over the threads, which read rank 0's covariances */
            if (root) *k->shared_calib = k->calib;
            if (comm_barrier(k->c, &e) != 0) return rank_fail(k, "initialization_failed", 0, &e);
        }
    }
    const ln_calibration *cal = k->threads && *k->shared_calib ? *k->shared_calib : k->calib;
    const char *method = ln_adapter_type_name(s->adapter.type);
    double t0 = ln_now_s();
    if (r->resume[0]) {
        if (ln_tp_load_checkpoint(k->shard, k->shape, r->resume, &k->sad, root ? &k->whole : NULL, &e) != 0)
            return rank_fail(k, "checkpoint_unusable", 1, &e);
        if (root)
            wd_outbox_stage_event(report_to(r), "initialising", NULL, "Restored the %s adapter from checkpoint %s",
                                  method, basename_of(r->resume));
    } else {
        ln_adapter_opts ao = {.method = method, .rank = s->adapter.rank, .alpha = (float)s->adapter.alpha,
                              .targets = k->targets, .seed = (uint64_t)s->seed,
                              .covariance = calibrated(r) ? ln_calibration_covariance : NULL,
                              .method_ctx = (void *)cal};
        if (ln_tp_adapter_init(k->shard, k->shape, &ao, k->threads, &k->sad, root ? &k->whole : NULL, NULL, &e) != 0)
            return rank_fail(k, "initialization_failed", 0, &e);
        if (root && k->sad.full)
            wd_outbox_stage_event(report_to(r), "initialising", NULL, "Full fine-tuning: every weight trains");
        else if (root)
            wd_outbox_stage_event(report_to(r), "initialising", NULL,
                                  "Initialised the %s adapter (rank %d, alpha %g) in %.2f s",
                                  method, k->sad.rank, (double)k->sad.alpha, ln_now_s() - t0);
    }
    if (calibrated(r) &&
        ln_tp_drift_new(k->shard, &k->sad, k->shape, root ? &k->whole : NULL, ln_calibration_covariance,
                        root ? (void *)k->calib : NULL, &k->drift, &e) != 0)
        return rank_fail(k, "initialization_failed", 0, &e);
    /* each rank its shard's frozen weights (as freeze_for_training) */
    if (ln_model_check_device(k->shard, &e, "after the adapter's %s on rank %d", r->resume[0] ? "restore" : "init",
                              k->c->rank) != 0 ||
        ln_model_freeze_frozen(k->shard, &k->sad, &e) != 0)
        return rank_fail(k, "initialization_failed", 0, &e);
    return 0;
}

static int tp_train_and_export(tp_rank *k) {
    wd_run *r = k->r;
    run_priv *p = r->priv;
    ln_err e = {{0}};
    int root = root_of(k);
    json_t *before = NULL;
    if (!r->resume[0]) {
        double task, know;
        if (shard_evaluate(k, &task, &know, &e) != 0) return rank_fail(k, "evaluation_failed", 0, &e);
        if (root) before = report_before(r, task, know);
    }
    if (root) training_event(r);
    ln_train_opts to;
    char *out = train_opts(r, &to);
    to.eval = tp_on_eval; /* on every rank, collectively: rank 0's metrics.jsonl rows get the eval fields */
    to.eval_ctx = k;
    to.eval_collective = 1;
    to.on_row = tp_on_row;
    to.should_stop = k->threads && !root ? NULL : tp_should_stop;
    to.cb_ctx = k;
    ln_train_result res;
    /* the ranks of a gang over workers validated the data on their own: they must agree */
    if (ln_tp_check_same(k->c, NULL, NULL, p->ds, &to, &e) != 0) {
        free(out);
        json_decref(before);
        return rank_fail(k, "training_failed", 0, &e);
    }
    int rc = ln_tp_train_shard(k->shard, &k->sad, root ? k->shape : NULL, root ? &k->whole : NULL, p->ds, &to, &res,
                               &e);
    free(out);
    if (rc != 0 && k->eval_failed) {
        json_decref(before);
        return rank_fail(k, "evaluation_failed", 0, &k->eval_err);
    }
    if (rc != 0) {
        json_decref(before);
        return rank_fail(k, train_code(&e), 0, &e);
    }
    if (root || !k->threads) r->steps = res.steps;
    if (res.stopped) {
        json_decref(before);
        if (root && res.last_checkpoint[0]) note_checkpoint(r, res.steps, res.last_checkpoint);
        if (root || !k->threads) r->status = WD_RUN_STOPPED;
        return 0;
    }
    if (root)
        wd_outbox_stage_event(report_to(r), "evaluating", NULL, "Training finished: %lld steps, last loss %.4f",
                              (long long)res.steps, res.last_loss);
    double task, know;
    if (shard_evaluate(k, &task, &know, &e) != 0) {
        json_decref(before);
        return rank_fail(k, "evaluation_failed", 0, &e);
    }
    if (k->sad.full) { /* the merged model: every rank's blocks, rank 0 writing one gathered tensor at a time */
        char *ex = ln_path_join(r->dir, "export");
        rc = ln_tp_save_model(k->shard, ex, (st_dtype)ln_export_base_dtype(&k->shard->cfg), &e);
        free(ex);
        if (rc != 0) {
            json_decref(before);
            return rank_fail(k, "export_failed", 1, &e);
        }
    }
    if (!root) { /* rank 0 exports and summarises */
        if (!k->threads) r->status = WD_RUN_OK;
        return 0;
    }
    const char *code = NULL;
    rc = finish(r, p, k->shape, &k->whole, before, res.steps, task, know, k->sad.full, &code, &e);
    json_decref(before);
    return rc != 0 ? rank_fail(k, code, 1, &e) : 0;
}

static int tp_rank_main(ln_comm *c, void *ctx, ln_err *e) {
    tp_rank *k = ctx;
    k->c = c;
    int rc = tp_load_and_init(k);
    if (rc == 0) rc = tp_train_and_export(k);
    if (rc != 0) *e = k->err;
    ln_tp_drift_free(k->drift);
    ln_adapter_free(&k->sad);
    if (root_of(k)) ln_adapter_free(&k->whole);
    ln_model_free(k->shape);
    ln_model_free(k->shard);
    if (k->threads && root_of(k)) *k->shared_calib = NULL;
    return rc;
}

/* Runs the sharded job: this process's rank (r->comm), or every rank on a thread. The job's
 * failure is the first rank's own (not one that only saw the group aborted). */
static void run_sharded(wd_run *r, unsigned targets) {
    int n = r->comm ? 1 : r->world;
    tp_rank *k = ln_xcalloc((size_t)n, sizeof *k);
    void **ctxs = ln_xcalloc((size_t)n, sizeof *ctxs);
    ln_calibration *shared = NULL;
    for (int i = 0; i < n; i++) {
        k[i] = (tp_rank){.r = r, .targets = targets, .threads = !r->comm, .shared_calib = &shared};
        ctxs[i] = &k[i];
    }
    ln_err e = {{0}};
    plan_steps(r, r->priv);
    int rc = r->comm ? tp_rank_main(r->comm, &k[0], &e) : comm_thread_run(n, tp_rank_main, ctxs, &e);
    if (rc != 0) {
        const tp_rank *w = NULL;
        for (int i = 0; i < n && !w; i++)
            if (k[i].code && !strstr(k[i].err.msg, "aborted")) w = &k[i];
        for (int i = 0; i < n && !w; i++)
            if (k[i].code) w = &k[i];
        if (w) {
            ln_err we = w->err;
            fail(r, w->code, w->retryable, &we);
        } else {
            fail(r, "training_failed", 0, &e);
        }
    }
    for (int i = 0; i < n; i++) ln_calibration_free(k[i].calib);
    free(ctxs);
    free(k);
}

/* ---------------------------------------------------------------- thread */

static void run_main(void *arg) {
    wd_run *r = arg;
    run_priv p;
    memset(&p, 0, sizeof p);
    p.out = r->out;
    if (!reporting(r)) {
        wd_outbox_init(&p.sink, NULL, 64, 64);
        p.out = &p.sink;
    }
    r->priv = &p;
    ln_err e = {{0}};
    unsigned targets = 0;
    char list[LN_JOBSPEC_MAX_TARGETS * 17] = "";
    for (int i = 0; i < r->spec.adapter.n_targets; i++) {
        size_t l = strlen(list);
        snprintf(list + l, sizeof list - l, "%s%s", i ? "," : "", r->spec.adapter.targets[i]);
    }
    if (list[0] && ln_targets_parse(list, &targets, &e) != 0) fail(r, "invalid_target_modules", 0, &e);
    else if (stage_data(r, &p) == 0 && stage_model_and_calibration(r, &p, targets) == 0) {
        if (sharded(r)) run_sharded(r, targets);
        else if (stage_adapter(r, &p, targets) == 0) stage_train_and_export(r, &p);
    }
    if (p.have_ad) ln_adapter_free(&p.ad);
    ln_drift_tracker_free(p.drift);
    ln_calibration_free(p.calib);
    ln_dataset_free(p.ds);
    ln_dataset_free(p.vds);
    ln_dataset_free(p.kds);
    ln_model_free(p.m);
    ln_tokenizer_free(p.tok);
    if (p.out == &p.sink) wd_outbox_destroy(&p.sink);
    r->priv = NULL;
    atomic_store(&r->done, 1);
    if (r->wake) uv_async_send(r->wake);
}

void wd_run_init(wd_run *r) {
    atomic_init(&r->stop, WD_STOP_NONE);
    atomic_init(&r->done, 0);
    pthread_mutex_init(&r->mu, NULL);
    r->ckpt_new = 0;
    r->noted_step = 0;
    r->last_row_step = 0;
    r->status = WD_RUN_FAILED;
}

int wd_run_start(wd_run *r) { return uv_thread_create(&r->thread, run_main, r) == 0 ? 0 : -1; }

void wd_run_finish(wd_run *r) {
    uv_thread_join(&r->thread);
    pthread_mutex_destroy(&r->mu);
    ln_jobspec_free(&r->spec);
}

int wd_run_take_checkpoint(wd_run *r, int64_t *step, double *loss, char dir[WD_PATH_MAX]) {
    pthread_mutex_lock(&r->mu);
    int got = r->ckpt_new;
    if (got) {
        *step = r->ckpt_step;
        *loss = r->ckpt_loss;
        snprintf(dir, WD_PATH_MAX, "%s", r->ckpt_dir);
        r->ckpt_new = 0;
    }
    pthread_mutex_unlock(&r->mu);
    return got;
}

int64_t wd_run_local_checkpoint(const char *job_dir, char out[WD_PATH_MAX]) {
    char *cd = ln_path_join(job_dir, "out/checkpoints");
    DIR *d = opendir(cd);
    int64_t best = -1;
    if (d) {
        struct dirent *de;
        while ((de = readdir(d))) {
            long long step;
            char tail;
            if (sscanf(de->d_name, "step-%lld%c", &step, &tail) != 1) continue;
            char sub[300];
            snprintf(sub, sizeof sub, "%s/state.safetensors", de->d_name);
            char *f = ln_path_join(cd, sub);
            if (ln_file_exists(f) && step > best) {
                best = step;
                snprintf(out, WD_PATH_MAX, "%s/%s", cd, de->d_name);
            }
            free(f);
        }
        closedir(d);
    }
    free(cd);
    return best;
}

int wd_run_device_lost(const wd_run *r) {
    return r->status == WD_RUN_FAILED && strcmp(r->err_code, "device_error") == 0;
}
