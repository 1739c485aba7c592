/* api_internal.c — /internal/v1: the worker protocol (documented in proto/worker-protocol.md).
 * Every route needs a worker token. Reports about a job carry the lease generation the worker was
 * given; a report for a job that is not running under that generation gets 409 lease_lost. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "server/api.h"
#include "server/jobs.h"
#include "server/sched.h"
#include "server/server.h"
#include "server/store.h"

/* ---------------------------------------------------------------- helpers */

static enum MHD_Result bad(http_req *r, const char *param, const char *msg) {
    return http_error(r, 400, "invalid_request_error", "invalid_value", param, "%s: %s", param, msg);
}

/* A rendezvous key or a worker instance: 1..64 of [A-Za-z0-9_-]. */
static int valid_key(const char *k) {
    size_t n = strlen(k);
    if (n == 0 || n > 64) return 0;
    for (; *k; k++)
        if (!((*k >= 'a' && *k <= 'z') || (*k >= 'A' && *k <= 'Z') || (*k >= '0' && *k <= '9') || *k == '_' || *k == '-'))
            return 0;
    return 1;
}

/* Reads a required integer member. Replies 400 and returns -1 when absent or not an integer. */
static int get_int_member(http_req *r, json_t *o, const char *key, long long lo, long long hi, long long *out) {
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        http_error(r, 400, "invalid_request_error", "invalid_value", key, "%s: must be an integer in %lld..%lld", key,
                   lo, hi);
        return -1;
    }
    *out = json_integer_value(v);
    return 0;
}

/* Opens a write transaction for a report on the URL's job under the lease generation `gen`.
 * On failure replies (404 unknown job, 409 lease lost) and returns -1 with no transaction open. */
static int lease_begin(http_req *r, long long gen, int pause_grace) {
    const char *job = r->params[0];
    if (!api_valid_id(job, "ftjob-")) {
        http_not_found(r, "fine-tuning job", job);
        return -1;
    }
    if (store_begin() != 0) {
        http_error(r, 503, "server_error", "busy", NULL, "The database is busy; retry.");
        return -1;
    }
    ln_err e;
    int rc = sched_check_lease(job, gen, pause_grace, &e);
    if (rc == SCHED_LEASE_EXPIRED) {
        /* Requeue now rather than at the next sweep, so the job's state says what the reply says. */
        int requeued = sched_expire_lease(job);
        if (store_commit() == 0 && requeued) jobs_notify(job);
        http_error(r, 409, "invalid_request_error", "lease_lost", "lease_generation", "%s.", e.msg);
        return -1;
    }
    if (rc != 0) {
        store_rollback();
        if (strstr(e.msg, "does not exist")) http_not_found(r, "fine-tuning job", job);
        else http_error(r, 409, "invalid_request_error", "lease_lost", "lease_generation", "%s.", e.msg);
        return -1;
    }
    return 0;
}

static enum MHD_Result commit_reply(http_req *r, unsigned status, json_t *body) {
    if (store_commit() != 0) {
        json_decref(body);
        return http_error(r, 503, "server_error", "busy", NULL, "The database is busy; retry.");
    }
    jobs_notify(r->params[0]);
    return http_json(r, status, body);
}

/* Lease generation from a JSON body. */
static json_t *body_with_gen(http_req *r, long long *gen) {
    json_t *b = http_body_object(r);
    if (!b) return NULL;
    if (get_int_member(r, b, "lease_generation", 1, INT64_MAX, gen) != 0) {
        json_decref(b);
        return NULL;
    }
    return b;
}

/* The optional "worker_id" of a job report: which worker of the job's gang speaks (wid = "" when
 * absent: the report speaks for every rank, as before gangs were spread over workers). Replies 400
 * and returns -1 when it is not a worker id. */
static int report_worker(http_req *r, json_t *b, char wid[40]) {
    json_t *w = json_object_get(b, "worker_id");
    wid[0] = 0;
    if (!w || json_is_null(w)) return 0;
    if (!json_is_string(w) || !api_valid_id(json_string_value(w), "wrk_")) {
        bad(r, "worker_id", "must be the id register returned (wrk_…) of the worker holding ranks of this job");
        return -1;
    }
    snprintf(wid, 40, "%s", json_string_value(w));
    return 0;
}

/* Inside lease_begin's transaction: the named worker must hold a rank of the job under gen, or the
 * report is refused (409 lease_lost, transaction rolled back, -1). *rank0: it holds rank 0. */
static int gang_member(http_req *r, long long gen, const char *wid, int *rank0) {
    if (sched_gang_ranks(r->params[0], gen, wid, rank0) > 0) return 0;
    store_rollback();
    http_error(r, 409, "invalid_request_error", "lease_lost", "worker_id",
               "Worker %s holds no rank of job %s under lease generation %lld.", wid, r->params[0], gen);
    return -1;
}

/* lease_begin for a heartbeat, complete, fail or release, which may name its worker: on 0 the
 * transaction is open, wid is the named worker ("" for none) and *rank0 says whether it holds rank 0
 * (1 for none: such a report speaks for the whole gang); on -1 the reply is sent. */
static int report_begin(http_req *r, json_t *b, long long gen, char wid[40], int *rank0) {
    *rank0 = 1;
    if (report_worker(r, b, wid) != 0 || lease_begin(r, gen, 0) != 0) return -1;
    return wid[0] ? gang_member(r, gen, wid, rank0) : 0;
}

/* ---------------------------------------------------------------- workers */

/* The optional "instance" of a registration: a random id of the worker daemon's process, new at each
 * start ([A-Za-z0-9_-], 1..64). *out = NULL when absent or null (daemons that send none). Replies 400
 * and returns -1 when malformed. */
static int register_instance(http_req *r, json_t *b, const char **out) {
    json_t *v = json_object_get(b, "instance");
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v) || !valid_key(json_string_value(v))) {
        bad(r, "instance", "must be a string of 1..64 characters [A-Za-z0-9_-] (the daemon process's random id)");
        return -1;
    }
    *out = json_string_value(v);
    return 0;
}

/* Inside the register transaction: whether worker id is known and was registered last by another
 * process than `instance` — another instance, or none (a daemon that sends none is not this one). */
static int restarted(const char *id, const char *instance) {
    sqlite3_stmt *st = store_stmt("SELECT instance FROM workers WHERE id=?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    int other = sqlite3_step(st) == SQLITE_ROW && (sqlite3_column_type(st, 0) == SQLITE_NULL ||
                                                   strcmp(store_col_text(st, 0), instance) != 0);
    sqlite3_reset(st);
    return other;
}

static enum MHD_Result workers_register(http_req *r) {
    json_t *b = http_body_object(r);
    if (!b) return r->result;
    enum MHD_Result res;
    const char *name = json_string_value(json_object_get(b, "name"));
    const char *kind = json_string_value(json_object_get(b, "device_kind"));
    json_t *models = json_object_get(b, "models");
    json_t *mem = json_object_get(b, "memory_bytes");
    long long devices;
    if (!name || strlen(name) == 0 || strlen(name) > 128) { res = bad(r, "name", "must be a string of 1..128 characters"); goto out; }
    if (!kind || (strcmp(kind, "cpu") && strcmp(kind, "cuda"))) { res = bad(r, "device_kind", "must be \"cpu\" or \"cuda\""); goto out; }
    if (get_int_member(r, b, "devices", 1, 1024, &devices) != 0) { res = r->result; goto out; }
    if (mem && !json_is_null(mem) && (!json_is_integer(mem) || json_integer_value(mem) < 0)) { res = bad(r, "memory_bytes", "must be a non-negative integer"); goto out; }
    if (!json_is_array(models) || json_array_size(models) > 64) { res = bad(r, "models", "must be an array of at most 64 model names"); goto out; }
    size_t i;
    json_t *m;
    json_array_foreach(models, i, m) if (!json_is_string(m) || strlen(json_string_value(m)) == 0 ||
                                         strlen(json_string_value(m)) > 256) {
        res = bad(r, "models", "every model must be a string of 1..256 characters");
        goto out;
    }
    /* Re-registration keeps the id (a restarted worker daemon gives its old id). */
    char id[40];
    json_t *given = json_object_get(b, "worker_id");
    if (given && !json_is_null(given) && !(json_is_string(given) && api_valid_id(json_string_value(given), "wrk_"))) {
        res = bad(r, "worker_id", "must be an id register returned before (wrk_…)");
        goto out;
    }
    const char *instance = NULL;
    if (register_instance(r, b, &instance) != 0) { res = r->result; goto out; }
    if (given && json_is_string(given)) snprintf(id, sizeof id, "%s", json_string_value(given));
    else store_new_id("wrk_", id, sizeof id);
    if (store_begin() != 0) { res = http_error(r, 503, "server_error", "busy", NULL, "The database is busy; retry."); goto out; }
    json_t *ended = instance && restarted(id, instance) ? sched_end_worker_leases(id) : NULL;
    char *info = json_dumps(b, JSON_COMPACT);
    sqlite3_stmt *st = store_stmt(
        "INSERT INTO workers(id,name,token_id,device_kind,devices,memory_bytes,info,registered_at,last_seen_f,"
        "instance) VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10) ON CONFLICT(id) DO UPDATE SET name=?2, token_id=?3, "
        "device_kind=?4, devices=?5, memory_bytes=?6, info=?7, last_seen_f=?9, instance=?10");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, r->worker_token_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, kind, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, devices);
    sqlite3_bind_int64(st, 6, mem && json_is_integer(mem) ? json_integer_value(mem) : 0);
    sqlite3_bind_text(st, 7, info, -1, free);
    sqlite3_bind_int64(st, 8, ln_unix_time());
    sqlite3_bind_double(st, 9, sched_wall_now());
    if (instance) sqlite3_bind_text(st, 10, instance, -1, SQLITE_STATIC);
    int ok = sqlite3_step(st) == SQLITE_DONE;
    sqlite3_reset(st);
    st = store_stmt("DELETE FROM worker_models WHERE worker_id=?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);
    json_array_foreach(models, i, m) {
        st = store_stmt("INSERT OR IGNORE INTO worker_models(worker_id,model) VALUES(?,?)");
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, json_string_value(m), -1, SQLITE_STATIC);
        ok = ok && sqlite3_step(st) == SQLITE_DONE;
        sqlite3_reset(st);
    }
    if (!ok || store_commit() != 0) {
        store_rollback();
        json_decref(ended);
        res = http_error(r, 503, "server_error", "busy", NULL, "The worker could not be registered; retry.");
        goto out;
    }
    ln_log(LN_LOG_INFO, "sched", "worker %s (%s) registered: %lld %s device(s), %zu model(s)", id, name, devices, kind,
           json_array_size(models));
    json_t *job;
    json_array_foreach(ended, i, job) jobs_notify(json_string_value(job));
    if (json_array_size(ended) > 0)
        ln_log(LN_LOG_WARN, "sched", "worker %s restarted (new process %s): %zu lease(s) of its old process ended now",
               id, instance, json_array_size(ended));
    json_decref(ended);
    res = http_json(r, 201, json_pack("{s:s, s:s, s:f, s:f, s:f}", "object", "worker", "worker_id", id, "lease_ttl_s",
                                      g_cfg.lease_ttl_s, "heartbeat_interval_s", g_cfg.lease_ttl_s / 3,
                                      "lease_wait_max_s", g_cfg.lease_wait_max_s));
out:
    json_decref(b);
    return res;
}

static enum MHD_Result workers_heartbeat(http_req *r) {
    sqlite3_stmt *st = store_stmt("UPDATE workers SET last_seen_f=? WHERE id=?");
    sqlite3_bind_double(st, 1, sched_wall_now());
    sqlite3_bind_text(st, 2, r->params[0], -1, SQLITE_STATIC);
    sqlite3_step(st);
    int found = sqlite3_changes(store_db()) == 1;
    sqlite3_reset(st);
    if (!found) return http_not_found(r, "worker", r->params[0]);
    return http_json(r, 200, json_pack("{s:s, s:s}", "object", "worker.heartbeat", "worker_id", r->params[0]));
}

/* ---------------------------------------------------------------- lease (long-poll) */

static enum MHD_Result lease(http_req *r) {
    json_t *b = http_body_object(r);
    if (!b) return r->result;
    const char *wid = json_string_value(json_object_get(b, "worker_id"));
    json_t *fd = json_object_get(b, "free_devices"), *ws = json_object_get(b, "wait_s");
    enum MHD_Result res;
    if (!wid || !api_valid_id(wid, "wrk_")) { res = bad(r, "worker_id", "must be the id register returned"); goto out; }
    if (fd && !json_is_integer(fd)) { res = bad(r, "free_devices", "must be an integer"); goto out; }
    if (ws && (!json_is_number(ws) || json_number_value(ws) < 0)) { res = bad(r, "wait_s", "must be a number >= 0"); goto out; }
    int status;
    ln_err e;
    json_t *l = sched_lease(wid, fd ? (int)json_integer_value(fd) : -1, &status, &e);
    if (l) { res = http_json(r, 200, l); goto out; }
    if (status == 404) { res = http_error(r, 404, "invalid_request_error", "unknown_worker", "worker_id", "%s.", e.msg); goto out; }
    double now = ln_now_s();
    if (r->deadline == 0) {
        double wait = ws ? json_number_value(ws) : g_cfg.lease_wait_max_s;
        if (wait > g_cfg.lease_wait_max_s) wait = g_cfg.lease_wait_max_s;
        r->deadline = now + wait;
    }
    if (now >= r->deadline || http_stopping()) { res = http_empty(r, 204); goto out; }
    res = http_wait(r, r->deadline);
out:
    json_decref(b);
    return res;
}

/* ---------------------------------------------------------------- job reports */

static enum MHD_Result job_heartbeat(http_req *r) {
    long long gen;
    char wid[40];
    int rank0;
    json_t *b = body_with_gen(r, &gen);
    if (!b) return r->result;
    int rc = report_begin(r, b, gen, wid, &rank0);
    json_decref(b);
    if (rc != 0) return r->result;
    double exp = sched_heartbeat(r->params[0], gen, wid[0] ? wid : NULL);
    if (store_commit() != 0) return http_error(r, 503, "server_error", "busy", NULL, "The database is busy; retry.");
    return http_json(r, 200, json_pack("{s:s, s:s, s:I, s:f}", "object", "lease", "job_id", r->params[0],
                                       "lease_generation", (json_int_t)gen, "expires_at", exp));
}

static int valid_metric_name(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 128) return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '_' ||
              *s == '.' || *s == '/' || *s == '-'))
            return 0;
    return 1;
}

/* {"lease_generation", "events": [{"level","message","type"?,"data"?}], "metrics": [{"step", "values": {name: x}}]} */
static enum MHD_Result job_events(http_req *r) {
    long long gen;
    json_t *b = body_with_gen(r, &gen);
    if (!b) return r->result;
    json_t *events = json_object_get(b, "events"), *metrics = json_object_get(b, "metrics");
    enum MHD_Result res;
    if (events && (!json_is_array(events) || json_array_size(events) > 1000)) { res = bad(r, "events", "must be an array of at most 1000 events"); goto out; }
    if (metrics && (!json_is_array(metrics) || json_array_size(metrics) > 10000)) { res = bad(r, "metrics", "must be an array of at most 10000 points"); goto out; }
    size_t i;
    json_t *ev;
    json_array_foreach(events, i, ev) {
        const char *lvl = json_string_value(json_object_get(ev, "level"));
        const char *msg = json_string_value(json_object_get(ev, "message"));
        const char *type = json_string_value(json_object_get(ev, "type"));
        json_t *data = json_object_get(ev, "data");
        char p[64];
        snprintf(p, sizeof p, "events[%zu]", i);
        if (!json_is_object(ev) || !msg || strlen(msg) > 4096) { res = bad(r, p, "needs a 'message' string of at most 4096 characters"); goto out; }
        if (lvl && strcmp(lvl, "info") && strcmp(lvl, "warn") && strcmp(lvl, "error")) { res = bad(r, p, "'level' must be info, warn or error"); goto out; }
        if (type && strcmp(type, "message") && strcmp(type, "metrics")) { res = bad(r, p, "'type' must be message or metrics"); goto out; }
        if (data && !json_is_null(data) && !json_is_object(data)) { res = bad(r, p, "'data' must be an object"); goto out; }
    }
    json_t *pt;
    json_array_foreach(metrics, i, pt) {
        char p[64];
        snprintf(p, sizeof p, "metrics[%zu]", i);
        json_t *step = json_object_get(pt, "step"), *vals = json_object_get(pt, "values");
        if (!json_is_integer(step) || json_integer_value(step) < 0 || !json_is_object(vals)) { res = bad(r, p, "needs an integer 'step' >= 0 and an object 'values'"); goto out; }
        const char *k;
        json_t *v;
        json_object_foreach(vals, k, v) if (!valid_metric_name(k) || !json_is_number(v) || !isfinite(json_number_value(v))) {
            res = bad(r, p, "'values' maps names ([A-Za-z0-9_./-], 1..128) to finite numbers");
            goto out;
        }
    }
    if (lease_begin(r, gen, 1) != 0) { res = r->result; goto out; }
    json_array_foreach(events, i, ev) {
        const char *lvl = json_string_value(json_object_get(ev, "level"));
        const char *type = json_string_value(json_object_get(ev, "type"));
        json_t *data = json_object_get(ev, "data");
        jobs_event(r->params[0], lvl ? lvl : "info", type ? type : "message", json_is_object(data) ? data : NULL, "%s",
                   json_string_value(json_object_get(ev, "message")));
    }
    size_t npoints = 0;
    json_array_foreach(metrics, i, pt) {
        const char *k;
        json_t *v;
        json_object_foreach(json_object_get(pt, "values"), k, v) {
            sqlite3_stmt *st = store_stmt("INSERT OR REPLACE INTO metrics(job_id,name,step,value,created_at) VALUES(?,?,?,?,?)");
            sqlite3_bind_text(st, 1, r->params[0], -1, SQLITE_STATIC);
            sqlite3_bind_text(st, 2, k, -1, SQLITE_STATIC);
            sqlite3_bind_int64(st, 3, json_integer_value(json_object_get(pt, "step")));
            sqlite3_bind_double(st, 4, json_number_value(v));
            sqlite3_bind_int64(st, 5, ln_unix_time());
            sqlite3_step(st);
            sqlite3_reset(st);
            npoints++;
        }
    }
    res = commit_reply(r, 200, json_pack("{s:s, s:i, s:i}", "object", "events.accepted", "events",
                                         (int)json_array_size(events), "metric_points", (int)npoints));
out:
    json_decref(b);
    return res;
}

/* Raw body upload: ?lease_generation=N&filename=NAME&kind=checkpoint|result. */
static enum MHD_Result job_files(http_req *r) {
    int64_t gen;
    if (http_query_int(r, "lease_generation", 1, INT64_MAX, 0, &gen) != 0) return r->result;
    if (gen == 0) return bad(r, "lease_generation", "query parameter is required");
    const char *name = http_query(r, "filename"), *kind = http_query(r, "kind");
    int ok_name = name && strlen(name) > 0 && strlen(name) <= 128 && name[0] != '.';
    for (const char *p = name; ok_name && *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_' ||
              *p == '.' || *p == '-'))
            ok_name = 0;
    if (!ok_name) return bad(r, "filename", "query parameter must be 1..128 of [A-Za-z0-9._-], not starting with '.'");
    if (!kind || (strcmp(kind, "checkpoint") && strcmp(kind, "result")))
        return bad(r, "kind", "query parameter must be checkpoint or result");
    if (lease_begin(r, gen, 1) != 0) return r->result;
    sqlite3_stmt *st = store_stmt("SELECT project_id FROM jobs WHERE id=?");
    sqlite3_bind_text(st, 1, r->params[0], -1, SQLITE_STATIC);
    sqlite3_step(st);
    char project[40];
    snprintf(project, sizeof project, "%s", store_col_text(st, 0));
    sqlite3_reset(st);
    char fid[40];
    int result = strcmp(kind, "result") == 0;
    if (api_store_upload(r, project, name, result ? "fine-tune-results" : "fine-tune-checkpoint", r->params[0], fid)) {
        store_rollback();
        return r->result;
    }
    if (result) {
        st = store_stmt("INSERT OR IGNORE INTO result_files(job_id,file_id) VALUES(?,?)");
        sqlite3_bind_text(st, 1, r->params[0], -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, fid, -1, SQLITE_STATIC);
        sqlite3_step(st);
        sqlite3_reset(st);
    }
    st = store_stmt("SELECT " API_FILE_COLS " FROM files WHERE id=?");
    sqlite3_bind_text(st, 1, fid, -1, SQLITE_STATIC);
    sqlite3_step(st);
    json_t *j = api_file_row(st);
    sqlite3_reset(st);
    return commit_reply(r, 201, j);
}

/* Checks that every id in `files` is a file this job produced. */
static int job_owns_files(const char *job, json_t *files) {
    size_t i;
    json_t *f;
    json_array_foreach(files, i, f) {
        if (!json_is_string(f)) return 0;
        sqlite3_stmt *st = store_stmt("SELECT 1 FROM files WHERE id=? AND job_id=?");
        sqlite3_bind_text(st, 1, json_string_value(f), -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, job, -1, SQLITE_STATIC);
        int ok = sqlite3_step(st) == SQLITE_ROW;
        sqlite3_reset(st);
        if (!ok) return 0;
    }
    return 1;
}

static enum MHD_Result job_checkpoint(http_req *r) {
    long long gen, step;
    json_t *b = body_with_gen(r, &gen);
    if (!b) return r->result;
    enum MHD_Result res;
    json_t *files = json_object_get(b, "files"), *metrics = json_object_get(b, "metrics");
    if (get_int_member(r, b, "step", 0, INT64_MAX, &step) != 0) { res = r->result; goto out; }
    if (!json_is_array(files) || json_array_size(files) == 0 || json_array_size(files) > 64) { res = bad(r, "files", "must be a non-empty array of the job's uploaded file ids"); goto out; }
    if (metrics && !json_is_null(metrics) && !json_is_object(metrics)) { res = bad(r, "metrics", "must be an object"); goto out; }
    if (lease_begin(r, gen, 1) != 0) { res = r->result; goto out; }
    if (!job_owns_files(r->params[0], files)) {
        store_rollback();
        res = bad(r, "files", "every id must be a file uploaded for this job");
        goto out;
    }
    char id[40];
    store_new_id("ftckpt-", id, sizeof id);
    sqlite3_stmt *st = store_stmt("INSERT INTO checkpoints(id,job_id,step,files,metrics,created_at) VALUES(?,?,?,?,?,?)");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, r->params[0], -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, step);
    sqlite3_bind_text(st, 4, json_dumps(files, JSON_COMPACT), -1, free);
    if (json_is_object(metrics)) sqlite3_bind_text(st, 5, json_dumps(metrics, JSON_COMPACT), -1, free);
    sqlite3_bind_int64(st, 6, ln_unix_time());
    sqlite3_step(st);
    sqlite3_reset(st);
    jobs_event(r->params[0], "info", "message", NULL, "Checkpoint %s saved at step %lld", id, step);
    st = store_stmt("SELECT " JOBS_CKPT_COLS " FROM checkpoints c JOIN jobs j ON j.id=c.job_id WHERE c.id=?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    json_t *j = jobs_checkpoint_row(st);
    sqlite3_reset(st);
    res = commit_reply(r, 201, j);
out:
    json_decref(b);
    return res;
}

static enum MHD_Result job_complete(http_req *r) {
    long long gen, tokens = 0;
    json_t *b = body_with_gen(r, &gen);
    if (!b) return r->result;
    enum MHD_Result res;
    char wid[40];
    int rank0;
    if (json_object_get(b, "trained_tokens") && get_int_member(r, b, "trained_tokens", 0, INT64_MAX, &tokens) != 0) { res = r->result; goto out; }
    if (report_begin(r, b, gen, wid, &rank0) != 0) { res = r->result; goto out; }
    const char *job = r->params[0];
    if (!rank0) {
        /* Rank 0 holds the trained adapter and completes for the gang; the other ranks just end. */
        char owner[40];
        sched_gang_workers(job, gen, owner);
        store_rollback();
        res = http_error(r, 409, "invalid_request_error", "not_rank_zero", "worker_id",
                         "Worker %s holds no rank 0 of job %s (lease generation %lld): only rank 0's worker %s "
                         "completes the job; the other ranks end without calling complete.", wid, job, gen, owner);
        goto out;
    }
    /* OpenAI's naming: ft:<base model>:<project>:<suffix>:<job id>. */
    sqlite3_stmt *st = store_stmt("SELECT j.model, p.name, j.spec FROM jobs j JOIN projects p ON p.id=j.project_id WHERE j.id=?");
    sqlite3_bind_text(st, 1, job, -1, SQLITE_STATIC);
    sqlite3_step(st);
    json_t *spec = json_loads(store_col_text(st, 2), 0, NULL);
    const char *suffix = json_string_value(json_object_get(spec, "suffix"));
    char name[600];
    snprintf(name, sizeof name, "ft:%s:%s:%s:%s", store_col_text(st, 0), store_col_text(st, 1), suffix ? suffix : "",
             job + 6);
    sqlite3_reset(st);
    json_decref(spec);
    jobs_set_status(job, "running", "succeeded");
    st = store_stmt("UPDATE jobs SET fine_tuned_model=?, trained_tokens=? WHERE id=?");
    sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, tokens);
    sqlite3_bind_text(st, 3, job, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);
    jobs_event(job, "info", "message", NULL, "The job has successfully completed");
    res = commit_reply(r, 200, jobs_object(job, NULL));
out:
    json_decref(b);
    return res;
}

static enum MHD_Result job_fail(http_req *r) {
    long long gen;
    json_t *b = body_with_gen(r, &gen);
    if (!b) return r->result;
    enum MHD_Result res;
    json_t *err = json_object_get(b, "error");
    const char *code = json_string_value(json_object_get(err, "code"));
    const char *msg = json_string_value(json_object_get(err, "message"));
    json_t *retry = json_object_get(b, "retryable");
    if (!json_is_object(err) || !code || !msg || strlen(code) > 64 || strlen(msg) > 4096) { res = bad(r, "error", "must be {\"code\": string, \"message\": string}"); goto out; }
    if (retry && !json_is_boolean(retry)) { res = bad(r, "retryable", "must be a boolean"); goto out; }
    char wid[40];
    int rank0;
    if (report_begin(r, b, gen, wid, &rank0) != 0) { res = r->result; goto out; }
    const char *job = r->params[0];
    if (json_is_true(retry)) {
        char reason[4300];
        snprintf(reason, sizeof reason, "Worker%s%s reported a retryable failure (%s): %s", wid[0] ? " " : "", wid,
                 code, msg);
        sched_requeue(job, code, reason);
    } else {
        jobs_set_status(job, "running", "failed");
        json_t *e = json_pack("{s:s, s:s, s:o}", "code", code, "message", msg, "param",
                              json_object_get(err, "param") ? json_incref(json_object_get(err, "param")) : json_null());
        sqlite3_stmt *st = store_stmt("UPDATE jobs SET error=? WHERE id=?");
        sqlite3_bind_text(st, 1, json_dumps(e, JSON_COMPACT), -1, free);
        sqlite3_bind_text(st, 2, job, -1, SQLITE_STATIC);
        sqlite3_step(st);
        sqlite3_reset(st);
        json_decref(e);
        if (wid[0]) jobs_event(job, "error", "message", NULL, "Job failed (%s, reported by worker %s): %s", code, wid, msg);
        else jobs_event(job, "error", "message", NULL, "Job failed (%s): %s", code, msg);
    }
    res = commit_reply(r, 200, jobs_object(job, NULL));
out:
    json_decref(b);
    return res;
}

/* {"lease_generation", "reason"?}: the worker hands a running job back (it is shutting down). The job
 * goes back to the queue at once, without backoff, and the attempt the lease counted is given back:
 * an eviction is not the job's failure, so a job survives any number of them. */
static enum MHD_Result job_release(http_req *r) {
    long long gen;
    json_t *b = body_with_gen(r, &gen);
    if (!b) return r->result;
    enum MHD_Result res;
    json_t *reason_j = json_object_get(b, "reason");
    if (reason_j && !json_is_null(reason_j) && (!json_is_string(reason_j) || strlen(json_string_value(reason_j)) > 1024)) {
        res = bad(r, "reason", "must be a string of at most 1024 characters");
        goto out;
    }
    const char *reason = json_is_string(reason_j) && json_string_value(reason_j)[0] ? json_string_value(reason_j)
                                                                                      : "shutting down";
    char wid[40];
    int rank0;
    if (report_begin(r, b, gen, wid, &rank0) != 0) { res = r->result; goto out; }
    const char *job = r->params[0];
    char worker[40] = "?";
    sqlite3_stmt *st = store_stmt("SELECT lease_worker FROM jobs WHERE id=?");
    sqlite3_bind_text(st, 1, job, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW && store_col_text(st, 0)) snprintf(worker, sizeof worker, "%s", store_col_text(st, 0));
    sqlite3_reset(st);
    if (wid[0]) snprintf(worker, sizeof worker, "%s", wid);
    jobs_set_status(job, "running", "queued");
    st = store_stmt("UPDATE jobs SET attempts=MAX(attempts-1, 0), not_before_f=0, lease_worker=NULL WHERE id=?");
    sqlite3_bind_text(st, 1, job, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);
    jobs_event(job, "warn", "message", NULL, "Worker %s released the job (%s); requeued without using an attempt",
               worker, reason);
    ln_log(LN_LOG_INFO, "sched", "job %s released by worker %s (%s)", job, worker, reason);
    res = commit_reply(r, 200, jobs_object(job, NULL));
out:
    json_decref(b);
    return res;
}

/* ---------------------------------------------------------------- rendezvous */

static enum MHD_Result rdv_put(http_req *r) {
    long long gen;
    if (!valid_key(r->params[1])) return bad(r, "key", "must be 1..64 of [A-Za-z0-9_-]");
    json_t *b = body_with_gen(r, &gen);
    if (!b) return r->result;
    enum MHD_Result res;
    const char *value = json_string_value(json_object_get(b, "value"));
    if (!value || strlen(value) > 65536) { res = bad(r, "value", "must be a string of at most 65536 characters"); goto out; }
    if (lease_begin(r, gen, 0) != 0) { res = r->result; goto out; }
    sqlite3_stmt *st = store_stmt("INSERT OR REPLACE INTO rendezvous(job_id,lease_gen,key,value) VALUES(?,?,?,?)");
    sqlite3_bind_text(st, 1, r->params[0], -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, gen);
    sqlite3_bind_text(st, 3, r->params[1], -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, value, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);
    res = commit_reply(r, 200, json_pack("{s:s, s:s, s:I}", "object", "rendezvous", "key", r->params[1],
                                         "lease_generation", (json_int_t)gen));
out:
    json_decref(b);
    return res;
}

/* GET …/rendezvous/{key}?lease_generation=N&wait_s=S: the value, long-polling up to S seconds. */
static enum MHD_Result rdv_get(http_req *r) {
    int64_t gen, wait;
    if (!valid_key(r->params[1])) return bad(r, "key", "must be 1..64 of [A-Za-z0-9_-]");
    if (http_query_int(r, "lease_generation", 1, INT64_MAX, 0, &gen) != 0) return r->result;
    if (gen == 0) return bad(r, "lease_generation", "query parameter is required");
    if (http_query_int(r, "wait_s", 0, 600, 0, &wait) != 0) return r->result;
    if (!api_valid_id(r->params[0], "ftjob-")) return http_not_found(r, "fine-tuning job", r->params[0]);
    ln_err e;
    if (sched_check_lease(r->params[0], gen, 0, &e) != 0)
        return strstr(e.msg, "does not exist") ? http_not_found(r, "fine-tuning job", r->params[0])
                                                : http_error(r, 409, "invalid_request_error", "lease_lost",
                                                             "lease_generation", "%s.", e.msg);
    sqlite3_stmt *st = store_stmt("SELECT value FROM rendezvous WHERE job_id=? AND lease_gen=? AND key=?");
    sqlite3_bind_text(st, 1, r->params[0], -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, gen);
    sqlite3_bind_text(st, 3, r->params[1], -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
        json_t *j = json_pack("{s:s, s:s, s:s, s:I}", "object", "rendezvous", "key", r->params[1], "value",
                              store_col_text(st, 0), "lease_generation", (json_int_t)gen);
        sqlite3_reset(st);
        return http_json(r, 200, j);
    }
    sqlite3_reset(st);
    double now = ln_now_s();
    if (r->deadline == 0) r->deadline = now + ((double)wait < g_cfg.lease_wait_max_s ? (double)wait : g_cfg.lease_wait_max_s);
    if (now >= r->deadline || http_stopping())
        return http_error(r, 404, "invalid_request_error", "not_ready", "key", "Rendezvous key '%s' is not set yet.",
                          r->params[1]);
    return http_wait(r, r->deadline);
}

/* ---------------------------------------------------------------- files for workers */

static enum MHD_Result file_content(http_req *r) {
    if (!api_valid_id(r->params[0], "file-")) return http_not_found(r, "file", r->params[0]);
    sqlite3_stmt *st = store_stmt("SELECT sha256, filename FROM files WHERE id=?");
    sqlite3_bind_text(st, 1, r->params[0], -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_reset(st);
        return http_not_found(r, "file", r->params[0]);
    }
    char *path = store_blob_path(store_col_text(st, 0));
    char name[256];
    snprintf(name, sizeof name, "%s", store_col_text(st, 1));
    sqlite3_reset(st);
    enum MHD_Result res = http_file(r, path, "application/octet-stream", name);
    free(path);
    return res;
}

void api_internal_register(void) {
    http_route("POST", "/internal/v1/workers/register", HTTP_AUTH_WORKER, HTTP_BODY_JSON, workers_register, "int_register");
    http_route("POST", "/internal/v1/workers/{}/heartbeat", HTTP_AUTH_WORKER, HTTP_BODY_JSON, workers_heartbeat, "int_worker_heartbeat");
    http_route("POST", "/internal/v1/lease", HTTP_AUTH_WORKER, HTTP_BODY_JSON, lease, "int_lease");
    http_route("POST", "/internal/v1/jobs/{}/heartbeat", HTTP_AUTH_WORKER, HTTP_BODY_JSON, job_heartbeat, "int_job_heartbeat");
    http_route("POST", "/internal/v1/jobs/{}/events", HTTP_AUTH_WORKER, HTTP_BODY_JSON, job_events, "int_events");
    http_route("POST", "/internal/v1/jobs/{}/files", HTTP_AUTH_WORKER, HTTP_BODY_RAW, job_files, "int_files");
    http_route("POST", "/internal/v1/jobs/{}/checkpoints", HTTP_AUTH_WORKER, HTTP_BODY_JSON, job_checkpoint, "int_checkpoint");
    http_route("POST", "/internal/v1/jobs/{}/complete", HTTP_AUTH_WORKER, HTTP_BODY_JSON, job_complete, "int_complete");
    http_route("POST", "/internal/v1/jobs/{}/fail", HTTP_AUTH_WORKER, HTTP_BODY_JSON, job_fail, "int_fail");
    http_route("POST", "/internal/v1/jobs/{}/release", HTTP_AUTH_WORKER, HTTP_BODY_JSON, job_release, "int_release");
    http_route("PUT", "/internal/v1/jobs/{}/rendezvous/{}", HTTP_AUTH_WORKER, HTTP_BODY_JSON, rdv_put, "int_rdv_put");
    http_route("GET", "/internal/v1/jobs/{}/rendezvous/{}", HTTP_AUTH_WORKER, HTTP_BODY_NONE, rdv_get, "int_rdv_get");
    http_route("GET", "/internal/v1/files/{}/content", HTTP_AUTH_WORKER, HTTP_BODY_NONE, file_content, "int_file_content");
}
