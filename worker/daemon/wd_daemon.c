/* wd_daemon.c — the worker's protocol loop (see wd_daemon.h). */
#include "worker/daemon/wd_daemon.h"

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "common/log.h"
#include "common/util.h"
#include "proto/jobspec.h"
#include "worker/backend/comm/comm.h"
#include "worker/backend/select.h"
#include "worker/daemon/wd_gang.h"
#include "worker/daemon/wd_http.h"
#include "worker/daemon/wd_models.h"
#include "worker/daemon/wd_outbox.h"
#include "worker/daemon/wd_run.h"

#define TICK_MS 100
#define BACKOFF_MIN_S 1.0
#define BACKOFF_MAX_S 15.0
#define WORKER_HEARTBEAT_S 10.0
#define MAX_DOWNLOADS 4
#define OUTBOX_MAX_EVENTS 2000
#define OUTBOX_MAX_POINTS 20000
/* The index of the GPU in use (the CUDA build; NULL in the CPU build, where no GPU worker starts). */
#pragma weak lnb_cuda_device

#define PEER_FAIL_GRACE_S 3.0   /* a run failed by a lost peer reports this much later (wd_daemon.h) */

typedef enum { PHASE_DOWNLOADING, PHASE_RENDEZVOUS, PHASE_RUNNING, PHASE_UPLOADING, PHASE_REPORTING } job_phase;
/* FINAL_NONE: a rank ≠ 0 of a split gang; rank 0 reports for the job. */
typedef enum { FINAL_COMPLETE, FINAL_FAIL, FINAL_RELEASE, FINAL_NONE } final_kind;

typedef struct wd_daemon wd_daemon;

/* A leased job, from the lease to its last report. Owned by the daemon (d->job). */
typedef struct wd_job {
    wd_daemon *d;
    char id[64];
    long long gen;
    int attempt;
    double hb_interval;
    job_phase phase;
    wd_outbox out;
    wd_run run;
    int run_started;
    int split, rank;                       /* a gang spread over workers: this worker's one rank */
    wd_gang *gang;                         /* the rendezvous in progress (PHASE_RENDEZVOUS) */
    ln_comm *comm;                         /* the group, once joined; freed after the run thread */
    wd_stop lost;                          /* the lease is gone (cancel, pause, lost) */
    int pausing;                           /* paused: the run stops, its last checkpoint and the
                                            * reports before it still go up (the server's grace) */
    double pause_deadline;                 /* once the run ended: give up on those uploads after this */

    int ndl, idl, dl_busy;                 /* downloads, one at a time */
    char dl_path[MAX_DOWNLOADS][WD_PATH_MAX];
    char dl_url[MAX_DOWNLOADS][160];

    int hb_busy, unreachable;
    double next_hb, next_worker_hb;

    int flush_busy;
    double next_flush, flush_backoff, last_flush;
    json_t *fl_events, *fl_metrics;        /* the batch in flight (given back on failure) */
    uint64_t fl_mark, flushed_mark;        /* outbox marks: of the batch in flight, of the last one sent */
    size_t cap_events, cap_points;         /* batch size limits (shrunk when a batch is too big) */
    uint64_t ck_mark;                      /* the outbox mark when the checkpoint was written: its
                                            * record waits for the reports before it (event order) */

    int ck_busy, ck_have;                  /* checkpoint upload: file, then its record */
    int64_t ck_step;
    double ck_loss;
    char ck_dir[WD_PATH_MAX];
    double ck_next, ck_backoff;

    char **results;                        /* result files to upload, in order */
    int nres, ires, res_busy;
    double res_next, res_backoff;

    final_kind final;
    int final_busy;
    double final_next, final_backoff;
} wd_job;

struct wd_daemon {
    wd_config cfg;
    uv_loop_t *loop;
    wd_http *http;
    uv_timer_t tick;
    uv_signal_t sigterm, sigint;
    uv_async_t wake;
    char worker_id[64];
    char instance[17];                     /* random per process start: tells the server of a restart */
    json_t *models;
    char device_kind[8];
    const lnb_backend *be;
    int registered, busy;                  /* busy: register or lease in flight */
    double next_try, backoff;
    wd_job *job;
    int signals;                           /* SIGTERM/SIGINT received */
    double deadline;
    int closing, exit_code;
};

static void pump(wd_daemon *d);

/* ---------------------------------------------------------------- helpers */

static double backoff_next(double *b) {
    *b = *b <= 0 ? BACKOFF_MIN_S : fmin(*b * 2, BACKOFF_MAX_S);
    return *b;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    return remove(path);
}

static void rm_rf(const char *dir) { nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

static void on_closed(uv_handle_t *h) {}

static void daemon_close(wd_daemon *d, int code) {
    if (d->closing) return;
    d->closing = 1;
    d->exit_code = code;
    uv_timer_stop(&d->tick);
    uv_close((uv_handle_t *)&d->tick, on_closed);
    uv_close((uv_handle_t *)&d->sigterm, on_closed);
    uv_close((uv_handle_t *)&d->sigint, on_closed);
    uv_close((uv_handle_t *)&d->wake, on_closed);
    wd_http_free(d->http);
    d->http = NULL;
}

static char *job_path(const wd_job *j, const char *sub) {
    char rel[WD_PATH_MAX];
    snprintf(rel, sizeof rel, "jobs/%s%s%s", j->id, sub ? "/" : "", sub ? sub : "");
    return ln_path_join(j->d->cfg.work_dir, rel);
}

/* ---------------------------------------------------------------- job end */

static void job_free(wd_job *j) {
    for (int i = 0; i < j->nres; i++) free(j->results[i]);
    free(j->results);
    json_decref(j->fl_events);
    json_decref(j->fl_metrics);
    wd_outbox_destroy(&j->out);
    free(j);
}

/* The job is over for this worker (reported, or its lease is gone). The run thread has ended. */
static void job_end(wd_job *j, const char *how) {
    wd_daemon *d = j->d;
    if (d->http) wd_http_abort_ctx(d->http, j);
    int keep = j->lost == WD_STOP_PAUSE || j->lost == WD_STOP_LEASE_LOST || j->final == FINAL_RELEASE;
    if (j->final == FINAL_NONE && j->run_started && j->run.status == WD_RUN_OK) keep = 0; /* rank 0 has it all */
    int device_lost = j->run_started && wd_run_device_lost(&j->run);
    if (j->run_started) wd_run_finish(&j->run);
    else ln_jobspec_free(&j->run.spec);
    wd_gang_cancel(j->gang);
    comm_free(j->comm); /* after the run thread, its last user */
    ln_log(LN_LOG_INFO, "worker", "job %s: %s", j->id, how);
    if (!keep) {
        /* Done with for good: its files, checkpoints and export are on the server. */
        char *dir = job_path(j, NULL);
        rm_rf(dir);
        free(dir);
    }
    d->job = NULL;
    job_free(j);
    if (device_lost) {
        /* A CUDA error can leave the process's context unusable (errors are sticky): another job
         * here would fail the same way and spend its attempts. The failure is reported; a fresh
         * process (its supervisor restarts it) gets a fresh context. */
        ln_log(LN_LOG_ERROR, "worker", "the job failed with a device error: exiting with status %d so that a "
               "fresh process (a new CUDA context) takes the next job", WD_EXIT_DEVICE_LOST);
        daemon_close(d, WD_EXIT_DEVICE_LOST);
        return;
    }
    if (d->cfg.once || d->signals) daemon_close(d, 0);
}

/* The lease is gone: stop the run within a step, send nothing more. */
#define PAUSE_DRAIN_MAX_S 120.0

static void job_lost(wd_job *j, wd_stop why, const char *msg) {
    if (j->lost) return;
    /* Rank 0 of a split gang may have stopped already, at another rank's pause (the trainer stops
     * every rank after the same step), and be uploading that stop's checkpoint when its own
     * heartbeat hears of the pause: it drains the same way. */
    int stopped_run = j->phase == PHASE_REPORTING && j->run_started && atomic_load(&j->run.done) &&
                      j->run.status == WD_RUN_STOPPED;
    if (why == WD_STOP_PAUSE && !j->pausing && j->run_started && (j->phase == PHASE_RUNNING || stopped_run) &&
        j->rank == 0) {
        /* The server still takes this generation's events, files and checkpoints for its pause
         * grace: stop within a step and upload the checkpoint the stop writes, so a resume (on any
         * worker) continues from the pause step. A second refusal (grace over) ends it for good. */
        j->pausing = 1;
        atomic_store(&j->run.stop, why);
        ln_log(LN_LOG_WARN, "worker", "job %s paused: %s; stopping and uploading a last checkpoint", j->id, msg);
        return;
    }
    j->lost = why;
    if (j->run_started) atomic_store(&j->run.stop, why);
    wd_gang_cancel(j->gang);
    j->gang = NULL;
    /* A split gang: cancel or a lost lease ends the group now (the other ranks' collectives fail
     * instead of waiting on this one); a pause is rank 0's to carry out in step, with a checkpoint. */
    if (j->comm && why != WD_STOP_PAUSE) comm_abort(j->comm);
    wd_http_abort_ctx(j->d->http, j);
    j->hb_busy = j->flush_busy = j->ck_busy = j->res_busy = j->final_busy = j->dl_busy = 0;
    wd_outbox_clear(&j->out);
    const char *what = why == WD_STOP_CANCEL ? "cancelled" : why == WD_STOP_PAUSE ? "paused" : "lost its lease";
    if (j->final == FINAL_NONE && j->phase == PHASE_REPORTING) /* the expected end of a rank ≠ 0 */
        ln_log(LN_LOG_INFO, "worker", "job %s: rank 0's report ended the lease (%s)", j->id, msg);
    else
        ln_log(LN_LOG_WARN, "worker", "job %s %s: %s; stopping", j->id, what, msg);
}

/* A 409/404 on a report: which way the lease went. */
static void job_refused(wd_job *j, const wd_resp *r) {
    char msg[1024];
    wd_resp_message(r, msg, sizeof msg);
    wd_stop why = strstr(msg, " is cancelled") ? WD_STOP_CANCEL : strstr(msg, " is paused") ? WD_STOP_PAUSE : WD_STOP_LEASE_LOST;
    job_lost(j, why, msg);
}

static int refused(const wd_resp *r) { return r->status == 409 || r->status == 404; }

/* ---------------------------------------------------------------- heartbeats */

static void on_job_heartbeat(const wd_resp *r, void *ctx) {
    wd_job *j = ctx;
    j->hb_busy = 0;
    if (r->status == 200) {
        if (j->unreachable) {
            /* Back, and the lease is still ours: send the backlog now rather than after the backoffs. */
            ln_log(LN_LOG_INFO, "worker", "job %s: the server answers again; the lease is still ours", j->id);
            j->next_flush = j->ck_next = j->res_next = j->final_next = 0;
            j->flush_backoff = j->ck_backoff = j->res_backoff = j->final_backoff = 0;
        }
        j->unreachable = 0;
    } else if (refused(r)) {
        job_refused(j, r);
    } else if (!j->unreachable) {
        char msg[1024];
        wd_resp_message(r, msg, sizeof msg);
        ln_log(LN_LOG_WARN, "worker", "job %s: heartbeat failed (%s); training goes on and reports are kept", j->id, msg);
        j->unreachable = 1;
    }
    pump(j->d);
}

static void on_worker_heartbeat(const wd_resp *r, void *ctx) {
    wd_job *j = ctx;
    /* A server that no longer knows us (a new database): register again once the job is over. */
    if (r->status == 404) j->d->registered = 0;
}

/* A split gang's worker names itself in its job reports: its heartbeat keeps its own ranks alive
 * (the server requeues the gang when one worker goes silent), and the server refuses complete
 * from a worker without rank 0. Takes b over and returns it. */
static json_t *as_gang_member(wd_job *j, json_t *b) {
    if (j->split) json_object_set_new(b, "worker_id", json_string(j->d->worker_id));
    return b;
}

static void send_heartbeats(wd_job *j, double now) {
    wd_daemon *d = j->d;
    if (!j->hb_busy && now >= j->next_hb) {
        char path[160];
        snprintf(path, sizeof path, "/internal/v1/jobs/%s/heartbeat", j->id);
        json_t *b = as_gang_member(j, json_pack("{s:I}", "lease_generation", (json_int_t)j->gen));
        if (wd_http_json(d->http, "POST", path, b, fmax(j->hb_interval, 2.0), on_job_heartbeat, j) == 0) j->hb_busy = 1;
        j->next_hb = now + j->hb_interval;
    }
    if (now >= j->next_worker_hb) {
        char path[160];
        snprintf(path, sizeof path, "/internal/v1/workers/%s/heartbeat", d->worker_id);
        wd_http_json(d->http, "POST", path, json_object(), 5.0, on_worker_heartbeat, j);
        j->next_worker_hb = now + WORKER_HEARTBEAT_S;
    }
}

/* ---------------------------------------------------------------- events and metrics */

static void on_flush(const wd_resp *r, void *ctx) {
    wd_job *j = ctx;
    j->flush_busy = 0;
    double now = ln_now_s();
    if (r->status == 200 || r->status == 400) {
        if (r->status == 400) {
            /* Our bug, not the server's state: retrying would loop forever. */
            char msg[1024];
            wd_resp_message(r, msg, sizeof msg);
            ln_log(LN_LOG_ERROR, "worker", "job %s: the server refused a report batch: %s", j->id, msg);
        }
        json_decref(j->fl_events);
        json_decref(j->fl_metrics);
        j->fl_events = j->fl_metrics = NULL;
        j->flushed_mark = j->fl_mark;
        j->flush_backoff = 0;
        j->next_flush = now + j->d->cfg.flush_interval_s;
    } else if (refused(r)) {
        json_decref(j->fl_events);
        json_decref(j->fl_metrics);
        j->fl_events = j->fl_metrics = NULL;
        job_refused(j, r);
    } else if (r->status == 413) {
        /* The server's body limit is lower than ours: smaller batches, at once. */
        size_t ne = json_array_size(j->fl_events), np = json_array_size(j->fl_metrics);
        j->cap_events = ne > 1 ? (ne + 1) / 2 : 1;
        j->cap_points = np > 1 ? (np + 1) / 2 : 1;
        if (ne + np > 1) {
            wd_outbox_putback(&j->out, j->fl_events, j->fl_metrics);
        } else {
            ln_log(LN_LOG_ERROR, "worker", "job %s: one report is larger than the server accepts; dropped", j->id);
            json_decref(j->fl_events);
            json_decref(j->fl_metrics);
        }
        j->fl_events = j->fl_metrics = NULL;
        j->next_flush = now;
    } else {
        wd_outbox_putback(&j->out, j->fl_events, j->fl_metrics);
        j->fl_events = j->fl_metrics = NULL;
        j->next_flush = now + backoff_next(&j->flush_backoff);
    }
    pump(j->d);
}

/* A batch stays well under the server's body limit (1 MiB by default): bigger ones are split. */
#define FLUSH_MAX_BYTES (512 * 1024)
/* At most 4 report posts a second, whatever asks for one (a checkpoint waiting on its steps). */
#define FLUSH_MIN_GAP_S 0.25

static void flush(wd_job *j, double now) {
    if (j->flush_busy || now < j->next_flush || now - j->last_flush < FLUSH_MIN_GAP_S) return;
    if (j->cap_events == 0) j->cap_events = 1000;
    if (j->cap_points == 0) j->cap_points = 5000;
    json_t *ev, *mt;
    uint64_t mark = wd_outbox_appended(&j->out);
    wd_outbox_take(&j->out, j->cap_events, j->cap_points, &ev, &mt);
    size_t ne = json_array_size(ev), np = json_array_size(mt);
    if (ne == 0 && np == 0) {
        json_decref(ev);
        json_decref(mt);
        j->flushed_mark = mark;
        return;
    }
    json_t *b = json_pack("{s:I, s:O, s:O}", "lease_generation", (json_int_t)j->gen, "events", ev, "metrics", mt);
    char *text = json_dumps(b, JSON_COMPACT);
    size_t len = text ? strlen(text) : 0;
    free(text);
    if (len > FLUSH_MAX_BYTES && ne + np > 1) {
        /* Too big (per-layer drift of a large model): halve the caps and send a smaller batch now. */
        json_decref(b);
        wd_outbox_putback(&j->out, ev, mt);
        j->cap_events = ne > 1 ? (ne + 1) / 2 : 1;
        j->cap_points = np > 1 ? (np + 1) / 2 : 1;
        j->next_flush = now;
        return;
    }
    char path[160];
    snprintf(path, sizeof path, "/internal/v1/jobs/%s/events", j->id);
    j->fl_events = ev;
    j->fl_metrics = mt;
    /* Everything appended up to `mark` is in this batch, unless the caps left some behind. */
    j->fl_mark = ne < j->cap_events && np < j->cap_points ? mark : j->flushed_mark;
    if (wd_http_json(j->d->http, "POST", path, b, 30.0, on_flush, j) == 0) {
        j->flush_busy = 1;
        j->last_flush = now;
    } else {
        wd_outbox_putback(&j->out, ev, mt);
        j->fl_events = j->fl_metrics = NULL;
    }
}

static int outbox_empty(wd_job *j) {
    size_t ne, np;
    wd_outbox_size(&j->out, &ne, &np);
    return ne == 0 && np == 0 && !j->flush_busy;
}

/* ---------------------------------------------------------------- checkpoints */

static void ck_retry(wd_job *j, const wd_resp *r) {
    char msg[1024];
    wd_resp_message(r, msg, sizeof msg);
    ln_log(LN_LOG_WARN, "worker", "job %s: checkpoint step %lld upload failed (%s); will retry", j->id,
           (long long)j->ck_step, msg);
    j->ck_next = ln_now_s() + backoff_next(&j->ck_backoff);
}

static void on_ck_record(const wd_resp *r, void *ctx) {
    wd_job *j = ctx;
    j->ck_busy = 0;
    if (r->status == 201) {
        j->ck_have = 0;
        j->ck_backoff = 0;
        ln_log(LN_LOG_INFO, "worker", "job %s: checkpoint at step %lld uploaded", j->id, (long long)j->ck_step);
    } else if (refused(r)) job_refused(j, r);
    else ck_retry(j, r);
    pump(j->d);
}

static void on_ck_file(const wd_resp *r, void *ctx) {
    wd_job *j = ctx;
    j->ck_busy = 0;
    if (r->status == 201) {
        json_t *f = json_loads(r->body, 0, NULL);
        const char *fid = json_string_value(json_object_get(f, "id"));
        char path[160];
        snprintf(path, sizeof path, "/internal/v1/jobs/%s/checkpoints", j->id);
        json_t *b = json_pack("{s:I, s:I, s:[s], s:{}}", "lease_generation", (json_int_t)j->gen, "step",
                              (json_int_t)j->ck_step, "files", fid ? fid : "", "metrics");
        if (isfinite(j->ck_loss))
            json_object_set_new(json_object_get(b, "metrics"), "train_loss", json_real(j->ck_loss));
        json_decref(f);
        if (wd_http_json(j->d->http, "POST", path, b, 30.0, on_ck_record, j) == 0) j->ck_busy = 1;
    } else if (refused(r)) job_refused(j, r);
    else ck_retry(j, r);
    pump(j->d);
}

static void upload_checkpoint(wd_job *j, double now) {
    if (j->ck_busy || j->rank != 0) return;
    if (!j->ck_have && j->run_started && wd_run_take_checkpoint(&j->run, &j->ck_step, &j->ck_loss, j->ck_dir)) {
        j->ck_have = 1;
        j->ck_mark = wd_outbox_appended(&j->out);
    }
    if (!j->ck_have || now < j->ck_next) return;
    if (j->flushed_mark < j->ck_mark) {
        /* The steps before the checkpoint go first (the server logs the checkpoint as an event). */
        if (!j->flush_busy) j->next_flush = now;
        return;
    }
    char path[256], file[WD_PATH_MAX + 32];
    snprintf(path, sizeof path, "/internal/v1/jobs/%s/files?lease_generation=%lld&kind=checkpoint&filename=ckpt-step-%lld.safetensors",
             j->id, j->gen, (long long)j->ck_step);
    snprintf(file, sizeof file, "%s/state.safetensors", j->ck_dir);
    if (wd_http_upload(j->d->http, path, file, 600.0, on_ck_file, j) == 0) j->ck_busy = 1;
    else {
        ln_log(LN_LOG_ERROR, "worker", "job %s: checkpoint %s cannot be read; skipped", j->id, file);
        j->ck_have = 0;
    }
}

static int checkpoints_idle(wd_job *j) {
    if (j->rank != 0) return 1;
    if (!j->ck_busy && !j->ck_have && wd_run_take_checkpoint(&j->run, &j->ck_step, &j->ck_loss, j->ck_dir)) {
        j->ck_have = 1;
        j->ck_mark = wd_outbox_appended(&j->out);
    }
    return !j->ck_busy && !j->ck_have;
}

/* ---------------------------------------------------------------- results and the final report */

static void on_result(const wd_resp *r, void *ctx) {
    wd_job *j = ctx;
    j->res_busy = 0;
    if (r->status == 201) {
        j->ires++;
        j->res_backoff = 0;
    } else if (refused(r)) job_refused(j, r);
    else {
        char msg[1024];
        wd_resp_message(r, msg, sizeof msg);
        ln_log(LN_LOG_WARN, "worker", "job %s: result upload failed (%s); will retry", j->id, msg);
        j->res_next = ln_now_s() + backoff_next(&j->res_backoff);
    }
    pump(j->d);
}

static void upload_results(wd_job *j, double now) {
    if (j->res_busy || j->ires >= j->nres || now < j->res_next) return;
    const char *f = j->results[j->ires];
    const char *name = strrchr(f, '/');
    name = name ? name + 1 : f;
    char path[400];
    snprintf(path, sizeof path, "/internal/v1/jobs/%s/files?lease_generation=%lld&kind=result&filename=%s", j->id,
             j->gen, name);
    if (wd_http_upload(j->d->http, path, f, 600.0, on_result, j) == 0) j->res_busy = 1;
    else {
        ln_log(LN_LOG_ERROR, "worker", "job %s: result file %s cannot be read; skipped", j->id, f);
        j->ires++;
    }
}

static void on_final(const wd_resp *r, void *ctx) {
    wd_job *j = ctx;
    wd_daemon *d = j->d; /* job_end frees j */
    j->final_busy = 0;
    if (r->status == 200) {
        job_end(j, j->final == FINAL_COMPLETE ? "succeeded" : j->final == FINAL_FAIL ? "failed (reported)"
                                                                                      : "released (worker shutting down)");
    } else if (refused(r)) {
        job_refused(j, r);
        job_end(j, "ended without its lease");
    } else {
        char msg[1024];
        wd_resp_message(r, msg, sizeof msg);
        ln_log(LN_LOG_WARN, "worker", "job %s: final report failed (%s); will retry", j->id, msg);
        j->final_next = ln_now_s() + backoff_next(&j->final_backoff);
    }
    if (!d->closing) pump(d);
}

static void send_final(wd_job *j, double now) {
    if (j->final_busy || now < j->final_next) return;
    /* A rank ≠ 0 sends no report: it goes on heart-beating (the server requeues a gang one of whose
     * workers falls silent) until rank 0's complete, fail or release ends the lease (job_lost). */
    if (j->final == FINAL_NONE) return;
    char path[160];
    json_t *b;
    if (j->final == FINAL_COMPLETE) {
        snprintf(path, sizeof path, "/internal/v1/jobs/%s/complete", j->id);
        b = json_pack("{s:I, s:I}", "lease_generation", (json_int_t)j->gen, "trained_tokens",
                      (json_int_t)j->run.trained_tokens);
    } else if (j->final == FINAL_RELEASE) {
        /* Shutting down after the last checkpoint: release hands the job back without using an
         * attempt (an eviction is not the job's failure); the next worker resumes from it. */
        snprintf(path, sizeof path, "/internal/v1/jobs/%s/release", j->id);
        /* Rank 0 of a split gang stops without a signal of its own when another rank's worker shuts
         * down (the trainer stops every rank after the same step): it releases with its checkpoint. */
        b = json_pack("{s:I, s:s}", "lease_generation", (json_int_t)j->gen, "reason",
                      j->split && !j->d->signals ? "another rank's worker is shutting down" : "shutting down");
    } else {
        snprintf(path, sizeof path, "/internal/v1/jobs/%s/fail", j->id);
        b = json_pack("{s:I, s:b, s:{s:s, s:s}}", "lease_generation", (json_int_t)j->gen, "retryable",
                      j->run.retryable, "error", "code", j->run.err_code, "message", j->run.err_msg);
    }
    if (wd_http_json(j->d->http, "POST", path, as_gang_member(j, b), 30.0, on_final, j) == 0) j->final_busy = 1;
}

/* Collects the export directory's files as results (sorted, so uploads are in a stable order). */
static void collect_results(wd_job *j) {
    uv_fs_t req;
    int n = uv_fs_scandir(NULL, &req, j->run.export_dir, 0, NULL);
    uv_dirent_t ent;
    j->results = ln_xcalloc((size_t)(n > 0 ? n : 1), sizeof *j->results);
    while (n > 0 && uv_fs_scandir_next(&req, &ent) != UV_EOF)
        if (ent.type == UV_DIRENT_FILE) j->results[j->nres++] = ln_path_join(j->run.export_dir, ent.name);
    uv_fs_req_cleanup(&req);
    for (int a = 0; a < j->nres; a++)
        for (int b = a + 1; b < j->nres; b++)
            if (strcmp(j->results[a], j->results[b]) > 0) {
                char *t = j->results[a];
                j->results[a] = j->results[b];
                j->results[b] = t;
            }
}

/* ---------------------------------------------------------------- downloads and start */

static void on_download(const wd_resp *r, void *ctx) {
    wd_job *j = ctx;
    j->dl_busy = 0;
    if (r->status == 200) j->idl++;
    else if (refused(r) && r->status == 409) job_refused(j, r);
    else {
        char msg[1024];
        wd_resp_message(r, msg, sizeof msg);
        /* A missing file is the job's problem; anything else may be the network's: retry later. */
        if (r->status == 404) {
            snprintf(j->run.err_code, sizeof j->run.err_code, "file_not_found");
            snprintf(j->run.err_msg, sizeof j->run.err_msg, "A file of the job could not be downloaded: %s", msg);
            j->run.retryable = 0;
            j->final = FINAL_FAIL;
            j->phase = PHASE_REPORTING;
        } else {
            ln_log(LN_LOG_WARN, "worker", "job %s: download failed (%s); will retry", j->id, msg);
            j->res_next = ln_now_s() + backoff_next(&j->res_backoff);
        }
    }
    pump(j->d);
}

static void start_run(wd_job *j) {
    wd_run *r = &j->run;
    r->out = &j->out;
    r->wake = &j->d->wake;
    wd_run_init(r);
    if (wd_run_start(r) != 0) {
        snprintf(r->err_code, sizeof r->err_code, "worker_error");
        snprintf(r->err_msg, sizeof r->err_msg, "The worker could not start a thread for the job");
        r->retryable = 1;
        j->final = FINAL_FAIL;
        j->phase = PHASE_REPORTING;
        return;
    }
    j->run_started = 1;
    j->phase = PHASE_RUNNING;
}

/* ---------------------------------------------------------------- a gang spread over workers */

static void on_gang(void *ctx, wd_gang_result res, ln_comm *c, const wd_resp *r, const char *msg) {
    wd_job *j = ctx;
    j->gang = NULL;
    if (res == WD_GANG_OK) {
        j->comm = c;
        j->run.comm = c;
        j->run.rank = j->rank;
        /* Rank 0's event says the whole gang met (the others' may be refused once rank 0 has
         * completed a short job: the server ends their reports with the job). */
        const char *how = strcmp(comm_backend_name(c), "nccl") == 0 ? "NCCL (one GPU per worker)" : "TCP";
        if (j->rank == 0)
            wd_outbox_event(&j->out, "info", NULL, "All %d ranks of the gang met over %s (rank 0: worker %s)",
                            j->run.world, how, j->d->worker_id);
        else
            wd_outbox_event(&j->out, "info", NULL, "Rank %d of %d (worker %s) joined the gang over %s", j->rank,
                            j->run.world, j->d->worker_id, how);
        j->next_flush = 0;
        j->phase = PHASE_DOWNLOADING; /* then the run, on this comm */
    } else if (res == WD_GANG_REFUSED) {
        job_refused(j, r);
    } else if (res == WD_GANG_UNSUPPORTED) {
        snprintf(j->run.err_code, sizeof j->run.err_code, "unsupported_resources");
        snprintf(j->run.err_msg, sizeof j->run.err_msg, "resources.ranks=%d: %s", j->run.world, msg);
        j->final = FINAL_FAIL;
        j->phase = PHASE_REPORTING;
    } else {
        snprintf(j->run.err_code, sizeof j->run.err_code, "rendezvous_failed");
        snprintf(j->run.err_msg, sizeof j->run.err_msg, "The ranks of the job could not meet: %s", msg);
        j->run.retryable = 1;
        j->final = FINAL_FAIL;
        j->phase = PHASE_REPORTING;
    }
    pump(j->d);
}

static void start_rendezvous(wd_job *j) {
    const wd_config *cfg = &j->d->cfg;
    wd_gang_opts o = {.job_id = j->id, .gen = j->gen, .rank = j->rank, .world = j->run.world,
                      .host = cfg->advertise_host, .port_lo = cfg->comm_port_lo, .port_hi = cfg->comm_port_hi,
                      .timeout_s = cfg->rendezvous_timeout_s > 0 ? cfg->rendezvous_timeout_s : 120,
                      .nccl_device = -1};
    if (strcmp(j->d->device_kind, "cuda") == 0) o.nccl_device = lnb_cuda_device ? lnb_cuda_device() : 0;
    j->gang = wd_gang_start(j->d->loop, j->d->http, &o, on_gang, j);
}

/* The run of a split gang's rank ended: which report, if any, this worker owes. */
static void gang_run_ended(wd_job *j, double now) {
    wd_run *r = &j->run;
    if (r->status != WD_RUN_OK) comm_abort(j->comm); /* the others stop waiting for this rank */
    int peer = comm_tcp_lost_peer(j->comm);
    /* NCCL does not say which rank: its remote error ("remote process exited…") names the cause. */
    int nccl_lost = peer < 0 && strcmp(comm_backend_name(j->comm), "nccl") == 0 &&
                    (strstr(r->err_msg, "remote process") || strstr(r->err_msg, "a peer rank may have failed"));
    if (r->status == WD_RUN_FAILED && (peer >= 0 || nccl_lost) && !j->d->signals) {
        /* Not this rank's fault: retryable, and late enough for the rank with the cause to report first. */
        char msg[sizeof r->err_msg], who[32] = "A rank";
        snprintf(msg, sizeof msg, "%s", r->err_msg);
        if (peer >= 0) snprintf(who, sizeof who, "Rank %d", peer);
        snprintf(r->err_msg, sizeof r->err_msg, "%s of the gang was lost (its worker stopped, failed or was "
                 "killed); rank %d: %.1900s", who, j->rank, msg);
        snprintf(r->err_code, sizeof r->err_code, "rank_lost");
        r->retryable = 1;
        j->final_next = now + PEER_FAIL_GRACE_S;
    }
    if (r->status == WD_RUN_FAILED)
        ln_log(LN_LOG_WARN, "worker", "job %s: rank %d of %d failed: %s", j->id, j->rank, r->world, r->err_msg);
    if (j->rank == 0) return; /* rank 0 goes on as a whole job does */
    /* Stopped (any rank's stop stops every rank after the same step): rank 0 checkpoints and
     * releases or reports. Failed during a shutdown: release, so no attempt is used. */
    if (r->status == WD_RUN_FAILED) j->final = j->d->signals ? FINAL_RELEASE : FINAL_FAIL;
    else j->final = FINAL_NONE;
    j->phase = PHASE_REPORTING;
}

static void job_pump(wd_job *j, double now) {
    wd_daemon *d = j->d;
    if (j->lost && j->final == FINAL_NONE && j->phase == PHASE_REPORTING) {
        char how[128];
        if (j->run.status == WD_RUN_STOPPED)
            snprintf(how, sizeof how, "stopped with the gang at the same step (rank 0 checkpoints and reports)");
        else
            snprintf(how, sizeof how, "rank %d's part ended (rank 0 reports for the job)", j->rank);
        job_end(j, how);
        return;
    }
    if (j->lost) {
        if (!j->run_started || atomic_load(&j->run.done)) job_end(j, "stopped: its lease is gone");
        return;
    }
    if (j->pausing) {
        /* No heartbeats (they would be refused); the reports, then the stop's checkpoint. */
        flush(j, now);
        upload_checkpoint(j, now);
        if (j->lost) return;
        /* The run thread ends within a step (or when a stage before training ends). */
        if (!atomic_load(&j->run.done)) return;
        if (j->pause_deadline == 0) j->pause_deadline = now + PAUSE_DRAIN_MAX_S;
        int drained = outbox_empty(j) && checkpoints_idle(j);
        if (drained || now >= j->pause_deadline) {
            j->lost = WD_STOP_PAUSE;
            job_end(j, drained ? "stopped: paused, its last checkpoint uploaded"
                               : "stopped: paused, the last checkpoint could not be uploaded in time");
        }
        return;
    }
    send_heartbeats(j, now);
    if (j->lost) return; /* a synchronous failure cannot happen, but keep the rule in one place */
    switch (j->phase) {
    case PHASE_DOWNLOADING:
        if (d->signals) {
            j->final = FINAL_RELEASE;
            j->phase = PHASE_REPORTING;
            break;
        }
        if (j->dl_busy || now < j->res_next) break;
        if (j->idl < j->ndl) {
            char part[WD_PATH_MAX];
            snprintf(part, sizeof part, "%s", j->dl_path[j->idl]);
            char *slash = strrchr(part, '/');
            ln_err e;
            if (slash) *slash = 0;
            if (ln_mkdir_p(part, &e) == 0 &&
                wd_http_download(d->http, j->dl_url[j->idl], j->dl_path[j->idl], 600.0, on_download, j) == 0)
                j->dl_busy = 1;
        } else {
            start_run(j);
        }
        break;
    case PHASE_RENDEZVOUS:
        /* Before the downloads: the ranks meet as soon as their leases arrive, so a slow download
         * on one worker never runs out the others' rendezvous time (the first collective waits). */
        flush(j, now);
        if (d->signals) {
            wd_gang_cancel(j->gang);
            j->gang = NULL;
            j->final = FINAL_RELEASE;
            j->phase = PHASE_REPORTING;
        } else if (!j->gang) {
            start_rendezvous(j);
        }
        break;
    case PHASE_RUNNING:
        flush(j, now);
        upload_checkpoint(j, now);
        if (!atomic_load(&j->run.done)) break;
        if (j->split) {
            gang_run_ended(j, now);
            if (j->phase == PHASE_REPORTING) break;
        }
        if (j->run.status == WD_RUN_OK) {
            collect_results(j);
            j->phase = PHASE_UPLOADING;
        } else if (j->run.status == WD_RUN_FAILED) {
            j->final = FINAL_FAIL;
            j->phase = PHASE_REPORTING;
        } else {
            /* Stopped: only SIGTERM stops a run while the lease is ours. */
            j->final = FINAL_RELEASE;
            j->phase = PHASE_REPORTING;
        }
        break;
    case PHASE_UPLOADING:
        flush(j, now);
        upload_checkpoint(j, now);
        if (!outbox_empty(j) || !checkpoints_idle(j)) break;
        if (j->ires < j->nres) upload_results(j, now);
        else {
            j->final = FINAL_COMPLETE;
            j->phase = PHASE_REPORTING;
        }
        break;
    case PHASE_REPORTING:
        flush(j, now);
        upload_checkpoint(j, now);
        if (outbox_empty(j) && checkpoints_idle(j)) send_final(j, now);
        break;
    }
}

/* Makes d->job from a lease object. A lease the worker cannot run (bad spec, a gang split over
 * workers) goes straight to PHASE_REPORTING with a non-retryable failure to report. */
static void job_begin(wd_daemon *d, json_t *lease) {
    wd_job *j = ln_xcalloc(1, sizeof *j);
    j->d = d;
    wd_outbox_init(&j->out, &d->wake, OUTBOX_MAX_EVENTS, OUTBOX_MAX_POINTS);
    snprintf(j->id, sizeof j->id, "%s", json_string_value(json_object_get(lease, "job_id")));
    j->gen = json_integer_value(json_object_get(lease, "lease_generation"));
    j->attempt = (int)json_integer_value(json_object_get(lease, "attempt"));
    double hb = json_number_value(json_object_get(lease, "heartbeat_interval_s"));
    j->hb_interval = hb > 0 ? fmin(hb, d->cfg.heartbeat_max_s) : d->cfg.heartbeat_max_s;
    j->phase = PHASE_DOWNLOADING;
    d->job = j;
    wd_run *r = &j->run;
    snprintf(r->job_id, sizeof r->job_id, "%s", j->id);
    char *dir = job_path(j, NULL), *files = job_path(j, "files");
    snprintf(r->dir, sizeof r->dir, "%s", dir);
    snprintf(r->files_dir, sizeof r->files_dir, "%s", files);
    free(dir);
    free(files);
    char *cache = ln_path_join(d->cfg.work_dir, "calibration-cache");
    snprintf(r->cache_dir, sizeof r->cache_dir, "%s", cache);
    free(cache);

    char param[LN_JOBSPEC_PARAM_MAX];
    ln_err e = {{0}};
    int world = (int)json_integer_value(json_object_get(lease, "world_size"));
    ln_log(LN_LOG_INFO, "worker", "leased job %s (generation %lld, attempt %d)", j->id, j->gen, j->attempt);
    if (ln_jobspec_parse(json_object_get(lease, "spec"), &r->spec, param, &e) != 0) {
        snprintf(r->err_code, sizeof r->err_code, "invalid_spec");
        snprintf(r->err_msg, sizeof r->err_msg, "The job spec the worker received is invalid (%s): %s", param, e.msg);
        j->final = FINAL_FAIL;
        j->phase = PHASE_REPORTING;
        return;
    }
    if (r->spec.seed < 0) r->spec.seed = 42;
    snprintf(r->model_name, sizeof r->model_name, "%s", r->spec.model);
    char *md = ln_path_join(d->cfg.models_dir, r->spec.model);
    snprintf(r->model_dir, sizeof r->model_dir, "%s", md);
    free(md);
    int mine = (int)json_array_size(json_object_get(lease, "ranks"));
    r->world = world > 1 ? world : 1;
    r->be = d->be;
    if (world > 1 && mine != 1 && strcmp(d->device_kind, "cpu") != 0) {
        snprintf(r->err_code, sizeof r->err_code, "unsupported_resources");
        snprintf(r->err_msg, sizeof r->err_msg,
                 "resources.ranks=%d with %d ranks on this GPU worker: a GPU worker runs one rank (one GPU); the "
                 "ranks of a GPU job are spread over workers started one per GPU (--device cuda:0, cuda:1, …)",
                 world, mine);
        j->final = FINAL_FAIL;
        j->phase = PHASE_REPORTING;
        return;
    }
    if (world > 1 && mine == 1) {
        /* Split over workers, one rank here: the ranks meet first, then download (wd_gang.h). */
        j->split = 1;
        j->rank = (int)json_integer_value(json_array_get(json_object_get(lease, "ranks"), 0));
    } else if (world > 1 && mine != world) {
        snprintf(r->err_code, sizeof r->err_code, "unsupported_resources");
        snprintf(r->err_msg, sizeof r->err_msg,
                 "resources.ranks=%d was split over several workers with %d ranks on this one; a CPU worker runs "
                 "either every rank of a job (threads) or exactly one (TCP between workers)", world, mine);
        j->final = FINAL_FAIL;
        j->phase = PHASE_REPORTING;
        return;
    }
    /* Downloads: training, validation and calibration files, then the checkpoint to resume from. */
    const char *ids[3] = {r->spec.training_file, r->spec.validation_file, r->spec.adapter.calibration_file};
    char *paths[3] = {r->train_path, r->val_path, r->calib_path};
    for (int i = 0; i < 3; i++) {
        if (!ids[i][0]) continue;
        if (snprintf(paths[i], WD_PATH_MAX, "%s/%s", r->files_dir, ids[i]) >= WD_PATH_MAX) continue;
        if (ln_file_exists(paths[i])) continue; /* files are immutable: a copy from an earlier lease is good */
        int dup = 0;
        for (int k = 0; k < j->ndl; k++) dup |= strcmp(j->dl_path[k], paths[i]) == 0;
        if (dup) continue;
        snprintf(j->dl_path[j->ndl], WD_PATH_MAX, "%s", paths[i]);
        snprintf(j->dl_url[j->ndl], sizeof j->dl_url[0], "/internal/v1/files/%s/content", ids[i]);
        j->ndl++;
    }
    json_t *rf = json_object_get(lease, "resume_from");
    long long server_step = json_is_object(rf) ? json_integer_value(json_object_get(rf, "step_number")) : -1;
    char local[WD_PATH_MAX];
    int64_t local_step = wd_run_local_checkpoint(r->dir, local);
    if (local_step > 0 && local_step >= server_step) {
        snprintf(r->resume, sizeof r->resume, "%s", local);
        wd_outbox_event(&j->out, "info", NULL, "Resuming from step %lld with this worker's own checkpoint",
                        (long long)local_step);
    } else if (server_step >= 0) {
        const char *fid = json_string_value(json_array_get(json_object_get(rf, "files"), 0));
        if (fid) {
            char sub[96];
            snprintf(sub, sizeof sub, "resume/step-%06lld", server_step);
            char *rd = job_path(j, sub);
            snprintf(r->resume, sizeof r->resume, "%s", rd);
            snprintf(j->dl_path[j->ndl], WD_PATH_MAX, "%s/state.safetensors", rd);
            snprintf(j->dl_url[j->ndl], sizeof j->dl_url[0], "/internal/v1/files/%s/content", fid);
            j->ndl++;
            free(rd);
            wd_outbox_event(&j->out, "info", NULL, "Resuming from the checkpoint at step %lld (%s)", server_step,
                            json_string_value(json_object_get(rf, "id")));
        }
    }
    char host[128] = "";
    gethostname(host, sizeof host - 1);
    if (j->split) {
        j->phase = PHASE_RENDEZVOUS;
        wd_outbox_event(&j->out, "info", NULL, "Worker %s (%s, %s) started rank %d of %d, attempt %d: meeting the "
                        "other ranks, then downloading %d file(s)", d->cfg.name ? d->cfg.name : host, d->worker_id,
                        d->cfg.device, j->rank, world, j->attempt, j->ndl);
    } else
        wd_outbox_event(&j->out, "info", NULL, "Worker %s (%s, %s) started attempt %d: downloading %d file(s)",
                        d->cfg.name ? d->cfg.name : host, d->worker_id, d->cfg.device, j->attempt, j->ndl);
}

/* ---------------------------------------------------------------- register and lease */

static void on_register(const wd_resp *r, void *ctx) {
    wd_daemon *d = ctx;
    d->busy = 0;
    if (r->status == 201) {
        json_t *b = json_loads(r->body, 0, NULL);
        snprintf(d->worker_id, sizeof d->worker_id, "%s", json_string_value(json_object_get(b, "worker_id")));
        json_decref(b);
        d->registered = 1;
        d->backoff = 0;
        d->next_try = 0;
        /* Kept in the work dir so that a restarted daemon comes back as the same worker. */
        char *idf = ln_path_join(d->cfg.work_dir, "worker_id");
        ln_err e;
        if (ln_write_file_atomic(idf, d->worker_id, strlen(d->worker_id), &e) != 0)
            ln_log(LN_LOG_WARN, "worker", "cannot keep the worker id: %s", e.msg);
        free(idf);
        ln_log(LN_LOG_INFO, "worker", "registered as %s with %zu model(s) (instance %s)", d->worker_id,
               json_array_size(d->models), d->instance);
    } else {
        char msg[1024];
        wd_resp_message(r, msg, sizeof msg);
        if (r->status == 401 || r->status == 403) {
            ln_log(LN_LOG_ERROR, "worker", "registration refused: %s (check --token-file)", msg);
            daemon_close(d, 1);
            return;
        }
        d->next_try = ln_now_s() + backoff_next(&d->backoff);
        ln_log(LN_LOG_WARN, "worker", "registration failed (%s); retrying in %.0f s", msg, d->backoff);
    }
    pump(d);
}

static void send_register(wd_daemon *d) {
    char host[128] = "";
    gethostname(host, sizeof host - 1);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    json_t *b = json_pack("{s:s, s:s, s:i, s:I, s:O}", "name", d->cfg.name ? d->cfg.name : host, "device_kind",
                          d->device_kind, "devices", d->cfg.ranks, "memory_bytes",
                          (json_int_t)(pages > 0 && psz > 0 ? (long long)pages * psz : 0), "models", d->models);
    if (d->worker_id[0]) json_object_set_new(b, "worker_id", json_string(d->worker_id));
    json_object_set_new(b, "instance", json_string(d->instance));
    if (wd_http_json(d->http, "POST", "/internal/v1/workers/register", b, 15.0, on_register, d) == 0) d->busy = 1;
}

static void on_lease(const wd_resp *r, void *ctx) {
    wd_daemon *d = ctx;
    d->busy = 0;
    if (r->status == 200) {
        json_t *lease = json_loads(r->body, 0, NULL);
        if (json_is_object(lease)) job_begin(d, lease);
        json_decref(lease);
        d->backoff = 0;
    } else if (r->status == 204) {
        d->backoff = 0;
    } else if (r->status == 404) {
        d->registered = 0; /* the server forgot us */
    } else {
        char msg[1024];
        wd_resp_message(r, msg, sizeof msg);
        d->next_try = ln_now_s() + backoff_next(&d->backoff);
        ln_log(LN_LOG_WARN, "worker", "lease request failed (%s); retrying in %.0f s", msg, d->backoff);
    }
    pump(d);
}

static void send_lease(wd_daemon *d) {
    json_t *b = json_pack("{s:s, s:f, s:i}", "worker_id", d->worker_id, "wait_s", d->cfg.lease_wait_s, "free_devices",
                          d->cfg.ranks);
    if (wd_http_json(d->http, "POST", "/internal/v1/lease", b, d->cfg.lease_wait_s + 15, on_lease, d) == 0) d->busy = 1;
}

/* ---------------------------------------------------------------- the pump */

static void pump(wd_daemon *d) {
    if (d->closing) return;
    double now = ln_now_s();
    if (d->signals && now > d->deadline) {
        ln_log(LN_LOG_ERROR, "worker", "shutdown grace of %.0f s is over; exiting without a final report", d->cfg.grace_s);
        daemon_close(d, 1);
        return;
    }
    if (d->job) {
        job_pump(d->job, now);
        return;
    }
    if (d->signals) {
        daemon_close(d, 0);
        return;
    }
    if (d->busy || now < d->next_try) return;
    if (!d->registered) send_register(d);
    else send_lease(d);
}

static void on_tick(uv_timer_t *t) { pump(t->data); }
static void on_wake(uv_async_t *a) { pump(a->data); }

static void on_signal(uv_signal_t *s, int signum) {
    wd_daemon *d = s->data;
    d->signals++;
    if (d->signals > 1) {
        ln_log(LN_LOG_WARN, "worker", "second signal: exiting now");
        fflush(stderr);
        _exit(1);
    }
    d->deadline = ln_now_s() + d->cfg.grace_s;
    ln_log(LN_LOG_INFO, "worker", "signal %d: %s", signum,
           d->job ? "stopping the job at the next step, checkpointing and releasing it" : "exiting");
    if (d->job) {
        if (d->job->run_started) atomic_store(&d->job->run.stop, WD_STOP_SHUTDOWN);
    } else if (d->http) {
        wd_http_abort_ctx(d->http, d); /* the lease long-poll */
        d->busy = 0;
    }
    pump(d);
}

/* ---------------------------------------------------------------- entry */

/* 16 hex characters, new at each start of the daemon. Registering under the kept worker id with a
 * new instance tells the server that the process which held that id's leases is gone, so it requeues
 * them at once instead of after the lease TTL (a pod restarted after a crash or an OOM kill). */
static void new_instance(char out[17]) {
    unsigned char raw[8];
    if (uv_random(NULL, NULL, raw, sizeof raw, 0, NULL) != 0) {
        /* No entropy source: the pid and the clock still differ from the previous process's. */
        unsigned long long x = (unsigned long long)getpid() * 0x9E3779B97F4A7C15ull ^ (unsigned long long)(ln_now_s() * 1e6);
        for (size_t i = 0; i < sizeof raw; i++) raw[i] = (unsigned char)(x >> (8 * i));
    }
    for (size_t i = 0; i < sizeof raw; i++) snprintf(out + 2 * i, 3, "%02x", raw[i]);
}

int wd_daemon_run(const wd_config *cfg, ln_err *e) {
    if (cfg->device && strncmp(cfg->device, "cuda", 4) == 0 && cfg->ranks > 1)
        return ln_errf(e, "--ranks %d with --device %s: a GPU worker offers one GPU (one rank); run one worker per "
                          "GPU (--device cuda:0, --device cuda:1, …) and the server spreads a multi-rank job over "
                          "them (NCCL between the workers)", cfg->ranks, cfg->device);
    wd_daemon *d = ln_xcalloc(1, sizeof *d);
    d->cfg = *cfg;
    d->be = lnb_select(cfg->device, e);
    if (!d->be) {
        free(d);
        return ln_err_prefix(e, "--device");
    }
    snprintf(d->device_kind, sizeof d->device_kind, "%s", strncmp(cfg->device, "cuda", 4) == 0 ? "cuda" : "cpu");
    if (ln_mkdir_p(cfg->work_dir, e) != 0) {
        free(d);
        return ln_err_prefix(e, "--work-dir");
    }
    d->models = wd_models_scan(cfg->models_dir, e);
    if (!d->models) {
        free(d);
        return -1;
    }
    if (json_array_size(d->models) == 0)
        ln_log(LN_LOG_WARN, "worker", "no models under %s (each needs config.json and model.safetensors)",
               cfg->models_dir);
    char *idf = ln_path_join(cfg->work_dir, "worker_id"), *saved = NULL;
    size_t idn;
    if (ln_file_exists(idf) && ln_read_file(idf, &saved, &idn, NULL) == 0 && idn > 4 && idn < sizeof d->worker_id &&
        strncmp(saved, "wrk_", 4) == 0)
        snprintf(d->worker_id, sizeof d->worker_id, "%s", saved);
    free(saved);
    free(idf);
    new_instance(d->instance);
    d->loop = ln_xcalloc(1, sizeof *d->loop);
    uv_loop_init(d->loop);
    d->http = wd_http_new(d->loop, cfg->server, cfg->token, e);
    if (!d->http) {
        uv_loop_close(d->loop);
        free(d->loop);
        json_decref(d->models);
        free(d);
        return -1;
    }
    uv_timer_init(d->loop, &d->tick);
    d->tick.data = d;
    uv_timer_start(&d->tick, on_tick, 0, TICK_MS);
    uv_async_init(d->loop, &d->wake, on_wake);
    d->wake.data = d;
    uv_signal_init(d->loop, &d->sigterm);
    uv_signal_init(d->loop, &d->sigint);
    d->sigterm.data = d->sigint.data = d;
    uv_signal_start(&d->sigterm, on_signal, SIGTERM);
    uv_signal_start(&d->sigint, on_signal, SIGINT);
    ln_log(LN_LOG_INFO, "worker", "loranull-worker: server %s, device %s x%d, models %s, work dir %s", cfg->server,
           cfg->device, cfg->ranks, cfg->models_dir, cfg->work_dir);
    uv_run(d->loop, UV_RUN_DEFAULT);
    int code = d->exit_code;
    if (d->job && d->job->run_started && !atomic_load(&d->job->run.done)) {
        /* Past the grace period with the job thread still running: leave it to exit(). */
        return code;
    }
    if (uv_loop_close(d->loop) != 0) ln_log(LN_LOG_DEBUG, "worker", "the event loop still had handles at exit");
    free(d->loop);
    json_decref(d->models);
    free(d);
    return code;
}
