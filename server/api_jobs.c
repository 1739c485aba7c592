/* api_jobs.c — /v1/fine_tuning/jobs…: create, list, retrieve, cancel, pause, resume, events (and
 * their SSE stream), checkpoints, metrics; and /v1/models. Shapes: OpenAI's fine-tuning API. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "proto/jobspec.h"
#include "server/api.h"
#include "server/jobq.h"
#include "server/jobs.h"
#include "server/sched.h"
#include "server/server.h"
#include "server/sse.h"
#include "server/store.h"

/* ---------------------------------------------------------------- create */

static enum MHD_Result jobs_create(http_req *r) {
    jobq_item *done = r->ctx;
    if (done) {
        /* Resumed by the committer (jobq.c): the batch holding this job has been committed. */
        if (done->status == 201) return http_json(r, 201, jobs_object(done->id, NULL));
        if (done->status == 400)
            return http_error(r, 400, "invalid_request_error", "file_not_found", done->err_param,
                              "%s: the file was deleted while the job was being created.", done->err_param);
        return http_error(r, 503, "server_error", "busy", NULL, "The job could not be stored; retry.");
    }
    json_t *body = http_body_object(r);
    if (!body) return r->result;
    ln_jobspec spec;
    char param[LN_JOBSPEC_PARAM_MAX];
    ln_err e;
    if (ln_jobspec_parse(body, &spec, param, &e) != 0) {
        json_decref(body);
        return http_error(r, 400, "invalid_request_error", "invalid_value", param, "%s", e.msg);
    }
    json_decref(body);
    const char *check[3][2] = {{"training_file", spec.training_file},
                               {"validation_file", spec.validation_file},
                               {"adapter.calibration.file", spec.adapter.calibration_file}};
    for (int i = 0; i < 3; i++) {
        if (jobq_file_of_project(r->project_id, check[i][1])) continue;
        enum MHD_Result res = http_error(r, 400, "invalid_request_error", "file_not_found", check[i][0],
                                         "%s: file %s does not exist.", check[i][0], check[i][1]);
        ln_jobspec_free(&spec);
        return res;
    }
    if (spec.seed < 0) {
        uint32_t s;
        store_random(&s, sizeof s);
        spec.seed = s & 0x7fffffff;
    }
    jobq_item *it = ln_xcalloc(1, sizeof *it);
    json_t *norm = ln_jobspec_to_json(&spec);
    it->spec_text = json_dumps(norm, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(norm);
    store_new_id("ftjob-", it->id, sizeof it->id);
    snprintf(it->project_id, sizeof it->project_id, "%s", r->project_id);
    snprintf(it->model, sizeof it->model, "%s", spec.model);
    snprintf(it->training_file, sizeof it->training_file, "%s", spec.training_file);
    snprintf(it->validation_file, sizeof it->validation_file, "%s", spec.validation_file);
    snprintf(it->calibration_file, sizeof it->calibration_file, "%s", spec.adapter.calibration_file);
    snprintf(it->device, sizeof it->device, "%s", ln_device_kind_name(spec.device));
    it->ranks = spec.ranks;
    ln_jobspec_free(&spec);
    r->ctx = it;
    r->ctx_free = jobq_item_free;
    return jobq_submit(r, it);
}

/* ---------------------------------------------------------------- list / retrieve */

/* The list's metadata filter, from the query: metadata[KEY]=VALUE (every pair must be in the job's
 * metadata; OpenAI's syntax and limits: at most 16 pairs, keys 1..64 characters, values at most
 * 512) and metadata=null (jobs without metadata). */
typedef struct metadata_filter {
    json_t *pairs;      /* [[key, value], …]; owned */
    int want_none;      /* metadata=null */
    char bad[80];       /* the offending parameter, when one is malformed */
    const char *why;
} metadata_filter;

static enum MHD_Result collect_metadata_arg(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    metadata_filter *mf = cls;
    if (mf->bad[0] || strncmp(key, "metadata", 8) != 0) return MHD_YES;
    const char *rest = key + 8;
    if (*rest == 0) {
        if (!value || strcmp(value, "null") != 0) {
            snprintf(mf->bad, sizeof mf->bad, "metadata");
            mf->why = "Query parameter 'metadata' may only be null (jobs without metadata); filter by a key with "
                      "metadata[key]=value.";
        }
        mf->want_none = 1;
        return MHD_YES;
    }
    if (*rest != '[') return MHD_YES; /* another parameter that happens to start with "metadata" */
    size_t n = strlen(rest);
    snprintf(mf->bad, sizeof mf->bad, "%.79s", key);
    if (rest[n - 1] != ']' || n < 3 || n - 2 > 64 || memchr(rest + 1, ']', n - 2))
        mf->why = "Query parameter '%s': the key between the brackets must be 1..64 characters.";
    else if (!value || strlen(value) > 512)
        mf->why = "Query parameter '%s' must have a value of at most 512 characters.";
    else if (json_array_size(mf->pairs) == 16)
        mf->why = "Query parameter '%s': at most 16 metadata pairs can be matched (a job holds at most 16).";
    else {
        mf->bad[0] = 0;
        json_array_append_new(mf->pairs, json_pack("[s#, s]", rest + 1, (int)(n - 2), value));
    }
    return MHD_YES;
}

static enum MHD_Result jobs_list(http_req *r) {
    int64_t limit;
    const char *after;
    if (api_page_params(r, 20, &limit, &after, "ftjob-") != 0) return r->result;
    int64_t after_seq = INT64_MAX;
    if (after) {
        sqlite3_stmt *s = store_stmt("SELECT seq FROM jobs WHERE id=? AND project_id=?");
        sqlite3_bind_text(s, 1, after, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 2, r->project_id, -1, SQLITE_STATIC);
        int found = sqlite3_step(s) == SQLITE_ROW;
        if (found) after_seq = sqlite3_column_int64(s, 0);
        sqlite3_reset(s);
        if (!found)
            return http_error(r, 400, "invalid_request_error", "invalid_parameter", "after",
                              "Query parameter 'after' names no job of this project.");
    }
    const char *status = http_query(r, "status");
    static const char *const known[] = {"validating_files", "queued", "running", "paused", "succeeded", "failed",
                                        "cancelled"};
    int status_ok = !status;
    for (size_t i = 0; status && i < sizeof known / sizeof known[0]; i++) status_ok |= strcmp(status, known[i]) == 0;
    if (!status_ok)
        return http_error(r, 400, "invalid_request_error", "invalid_parameter", "status",
                          "Query parameter 'status' must be one of validating_files, queued, running, paused, "
                          "succeeded, failed, cancelled.");
    metadata_filter mf = {.pairs = json_array()};
    MHD_get_connection_values(r->conn, MHD_GET_ARGUMENT_KIND, collect_metadata_arg, &mf);
    if (mf.bad[0]) {
        json_decref(mf.pairs);
        return http_error(r, 400, "invalid_request_error", "invalid_parameter", mf.bad, mf.why, mf.bad);
    }
    /* ?5: every [key, value] pair is in the job's metadata; ?6: the job has no metadata. The cursor
     * (seq < after's) pages the filtered list as it pages the whole one. */
    sqlite3_stmt *st = store_stmt(
        "SELECT id FROM jobs WHERE project_id=?1 AND seq<?2 AND (?3 IS NULL OR status=?3) AND (?5 IS NULL OR NOT "
        "EXISTS (SELECT 1 FROM json_each(?5) f WHERE NOT EXISTS (SELECT 1 FROM json_each(jobs.spec, '$.metadata') m "
        "WHERE json_type(jobs.spec, '$.metadata')='object' AND m.key=json_extract(f.value, '$[0]') AND "
        "m.type='text' AND m.value=json_extract(f.value, '$[1]')))) AND (?6 IS NULL OR json_type(jobs.spec, "
        "'$.metadata') IS NOT 'object' OR NOT EXISTS (SELECT 1 FROM json_each(jobs.spec, '$.metadata'))) "
        "ORDER BY seq DESC LIMIT ?4");
    sqlite3_bind_text(st, 1, r->project_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, after_seq);
    if (status) sqlite3_bind_text(st, 3, status, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, limit + 1);
    if (json_array_size(mf.pairs)) sqlite3_bind_text(st, 5, json_dumps(mf.pairs, JSON_COMPACT), -1, free);
    if (mf.want_none) sqlite3_bind_int(st, 6, 1);
    json_decref(mf.pairs);
    char (*ids)[40] = ln_xmalloc((size_t)(limit + 1) * 40);
    int n = 0;
    while (n <= limit && sqlite3_step(st) == SQLITE_ROW) snprintf(ids[n++], 40, "%s", store_col_text(st, 0));
    sqlite3_reset(st);
    int more = n > limit;
    if (more) n = (int)limit;
    char *text = jobs_render_list(ids, n, r->project_id, more);
    free(ids);
    enum MHD_Result res = http_text(r, 200, "application/json", text, strlen(text));
    free(text);
    return res;
}

/* Looks up the job of the URL in the caller's project; replies 404 and returns 0 when absent. */
static int own_job(http_req *r, char status[32]) {
    const char *id = r->params[0];
    if (!api_valid_id(id, "ftjob-")) {
        http_not_found(r, "fine-tuning job", id);
        return 0;
    }
    sqlite3_stmt *st = store_stmt("SELECT status FROM jobs WHERE id=? AND project_id=?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, r->project_id, -1, SQLITE_STATIC);
    int found = sqlite3_step(st) == SQLITE_ROW;
    if (found && status) snprintf(status, 32, "%s", store_col_text(st, 0));
    sqlite3_reset(st);
    if (!found) http_not_found(r, "fine-tuning job", id);
    return found;
}

/* Where a running job runs: {"world_size", "lease_generation", "ranks": [{"rank", "worker_id",
 * "worker_name"}]} from its ranks under the current lease generation; null when it is not running
 * (a queued job's reason to wait is in its events). */
static json_t *job_placement(const char *job_id) {
    sqlite3_stmt *st = store_stmt("SELECT r.rank, r.worker_id, w.name, j.ranks, j.lease_gen FROM jobs j "
                                  "JOIN job_ranks r ON r.job_id=j.id AND r.lease_gen=j.lease_gen "
                                  "LEFT JOIN workers w ON w.id=r.worker_id "
                                  "WHERE j.id=? AND j.status='running' ORDER BY r.rank");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    json_t *p = NULL, *ranks = NULL;
    while (sqlite3_step(st) == SQLITE_ROW) {
        if (!p) {
            ranks = json_array();
            p = json_pack("{s:I, s:I, s:o}", "world_size", (json_int_t)sqlite3_column_int64(st, 3),
                          "lease_generation", (json_int_t)sqlite3_column_int64(st, 4), "ranks", ranks);
        }
        json_array_append_new(ranks, json_pack("{s:I, s:s, s:s?}", "rank", (json_int_t)sqlite3_column_int64(st, 0),
                                               "worker_id", store_col_text(st, 1), "worker_name",
                                               sqlite3_column_type(st, 2) == SQLITE_NULL ? NULL : store_col_text(st, 2)));
    }
    sqlite3_reset(st);
    return p ? p : json_null();
}

static enum MHD_Result jobs_get(http_req *r) {
    if (!api_valid_id(r->params[0], "ftjob-")) return http_not_found(r, "fine-tuning job", r->params[0]);
    char *job = jobs_render(r->params[0], r->project_id);
    if (!job) return http_not_found(r, "fine-tuning job", r->params[0]);
    /* The rendered object ends in '}': the placement is spliced in before it. */
    json_t *placement = job_placement(r->params[0]);
    char *ptext = json_dumps(placement, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(placement);
    size_t n = strlen(job);
    char *text = ln_xmalloc(n + strlen(ptext) + 16);
    snprintf(text, n + strlen(ptext) + 16, "%.*s,\"placement\":%s}", (int)(n - 1), job, ptext);
    free(job);
    free(ptext);
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(resp, "Content-Type", "application/json");
    return http_queue(r, 200, resp);
}

/* ---------------------------------------------------------------- cancel / pause / resume */

/* Applies one user action. Each action lists the states it may start from, in order of preference. */
static enum MHD_Result job_action(http_req *r, const char *to, const char *const *froms, const char *verb,
                                  const char *event_msg) {
    char status[32];
    if (!own_job(r, status)) return r->result;
    const char *id = r->params[0];
    if (store_begin() != 0) return http_error(r, 503, "server_error", "busy", NULL, "The database is busy; retry.");
    int changed = 0;
    char from[32] = "";
    for (int i = 0; froms[i] && !changed; i++) {
        changed = jobs_set_status(id, froms[i], to);
        if (changed) snprintf(from, sizeof from, "%s", froms[i]);
    }
    if (!changed) {
        store_rollback();
        /* Re-read: the state may have moved since own_job. */
        own_job(r, status);
        if (r->replied) return r->result;
        return http_error(r, 409, "invalid_request_error", "invalid_job_state", NULL,
                          "Job %s cannot be %s: it is %s.", id, verb, status);
    }
    if (strcmp(to, "paused") == 0 && strcmp(from, "running") == 0) {
        /* Its worker may still save a last checkpoint for pause_grace_s (sched_check_lease). */
        sqlite3_stmt *st = store_stmt("UPDATE jobs SET paused_at_f=? WHERE id=?");
        sqlite3_bind_double(st, 1, sched_wall_now());
        sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
        sqlite3_step(st);
        sqlite3_reset(st);
    }
    if (strcmp(to, "queued") == 0) {
        /* A resumed job is leased at once (no backoff), restarts from its last checkpoint, and gets a
         * fresh retry budget: leases a user paused were not failures. */
        sqlite3_stmt *st = store_stmt("UPDATE jobs SET not_before_f=0, attempts=0, paused_at_f=NULL WHERE id=?");
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        sqlite3_step(st);
        sqlite3_reset(st);
    }
    jobs_event(id, "info", "message", NULL, "%s (was %s)", event_msg, from);
    if (store_commit() != 0) return http_error(r, 503, "server_error", "busy", NULL, "The database is busy; retry.");
    jobs_notify(id);
    return http_json(r, 200, jobs_object(id, NULL));
}

static enum MHD_Result jobs_cancel(http_req *r) {
    static const char *const froms[] = {"running", "queued", "paused", "validating_files", NULL};
    return job_action(r, "cancelled", froms, "cancelled", "Job cancelled");
}
static enum MHD_Result jobs_pause(http_req *r) {
    static const char *const froms[] = {"running", "queued", NULL};
    return job_action(r, "paused", froms, "paused", "Job paused");
}
static enum MHD_Result jobs_resume(http_req *r) {
    static const char *const froms[] = {"paused", NULL};
    return job_action(r, "queued", froms, "resumed", "Job resumed");
}

/* ---------------------------------------------------------------- events, checkpoints, metrics */

/* "ftevent-<n>" or "<n>" → n; -1 when malformed. */
static int64_t event_seq(const char *s) {
    if (!s) return -1;
    if (strncmp(s, "ftevent-", 8) == 0) s += 8;
    char *end;
    long long v = strtoll(s, &end, 10);
    return (end == s || *end || v < 0) ? -1 : v;
}

static enum MHD_Result jobs_events(http_req *r) {
    if (!own_job(r, NULL)) return r->result;
    const char *id = r->params[0];
    const char *stream = http_query(r, "stream");
    const char *after = http_query(r, "after");
    int64_t limit;
    if (http_query_int(r, "limit", 1, 1000, 20, &limit) != 0) return r->result; /* checked in both modes */
    const char *last = http_header(r, "Last-Event-ID");
    if (last && event_seq(last) < 0)
        return http_error(r, 400, "invalid_request_error", "invalid_parameter", "Last-Event-ID",
                          "'%.60s' is not an event id (ftevent-<n>).", last);
    if (stream && strcmp(stream, "true") == 0) {
        const char *from = last ? last : after;
        int64_t seq = from ? event_seq(from) : 0;
        if (seq < 0)
            return http_error(r, 400, "invalid_request_error", "invalid_parameter", last ? "Last-Event-ID" : "after",
                              "'%.60s' is not an event id (ftevent-<n>).", from);
        return sse_start(r, id, seq);
    }
    if (stream && strcmp(stream, "false") != 0)
        return http_error(r, 400, "invalid_request_error", "invalid_parameter", "stream",
                          "Query parameter 'stream' must be true or false.");
    int64_t before = INT64_MAX;
    if (after) {
        before = event_seq(after);
        if (before < 0)
            return http_error(r, 400, "invalid_request_error", "invalid_parameter", "after",
                              "'%.60s' is not an event id (ftevent-<n>).", after);
    }
    /* Newest first, as OpenAI lists them; `after` is the cursor of the previous page's last event. */
    sqlite3_stmt *st = store_stmt("SELECT " JOBS_EVENT_COLS " FROM events WHERE job_id=? AND seq<? "
                                  "ORDER BY seq DESC LIMIT ?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, before);
    sqlite3_bind_int64(st, 3, limit + 1);
    return http_json(r, 200, api_page_collect(st, limit, jobs_event_row, 0));
}

static enum MHD_Result jobs_checkpoints(http_req *r) {
    if (!own_job(r, NULL)) return r->result;
    int64_t limit;
    const char *after;
    if (api_page_params(r, 10, &limit, &after, "ftckpt-") != 0) return r->result;
    int64_t before = INT64_MAX;
    if (after) {
        sqlite3_stmt *s = store_stmt("SELECT seq FROM checkpoints WHERE id=? AND job_id=?");
        sqlite3_bind_text(s, 1, after, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 2, r->params[0], -1, SQLITE_STATIC);
        int found = sqlite3_step(s) == SQLITE_ROW;
        if (found) before = sqlite3_column_int64(s, 0);
        sqlite3_reset(s);
        if (!found)
            return http_error(r, 400, "invalid_request_error", "invalid_parameter", "after",
                              "Query parameter 'after' names no checkpoint of this job.");
    }
    sqlite3_stmt *st = store_stmt("SELECT " JOBS_CKPT_COLS " FROM checkpoints c JOIN jobs j ON j.id=c.job_id "
                                  "WHERE c.job_id=? AND c.seq<? ORDER BY c.seq DESC LIMIT ?");
    sqlite3_bind_text(st, 1, r->params[0], -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, before);
    sqlite3_bind_int64(st, 3, limit + 1);
    return http_json(r, 200, api_page_collect(st, limit, jobs_checkpoint_row, 1));
}

/* Time series for charts: one entry per metric name, steps ascending. */
static enum MHD_Result jobs_metrics(http_req *r) {
    if (!own_job(r, NULL)) return r->result;
    const char *name = http_query(r, "name");
    int64_t after_step;
    if (http_query_int(r, "after_step", -1, INT64_MAX, -1, &after_step) != 0) return r->result;
    sqlite3_stmt *st = store_stmt("SELECT name, step, value FROM metrics WHERE job_id=? AND step>? "
                                  "AND (?3 IS NULL OR name=?3) ORDER BY name, step LIMIT 200000");
    sqlite3_bind_text(st, 1, r->params[0], -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, after_step);
    if (name) sqlite3_bind_text(st, 3, name, -1, SQLITE_STATIC);
    json_t *data = json_array(), *cur = NULL;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *nm = store_col_text(st, 0);
        if (!cur || strcmp(json_string_value(json_object_get(cur, "name")), nm) != 0) {
            cur = json_pack("{s:s, s:s, s:[], s:[]}", "object", "fine_tuning.job.metric_series", "name", nm, "steps",
                            "values");
            json_array_append_new(data, cur);
        }
        json_array_append_new(json_object_get(cur, "steps"), json_integer(sqlite3_column_int64(st, 1)));
        json_array_append_new(json_object_get(cur, "values"), json_real(sqlite3_column_double(st, 2)));
    }
    sqlite3_reset(st);
    return http_json(r, 200, json_pack("{s:s, s:o, s:b}", "object", "list", "data", data, "has_more", 0));
}

/* ---------------------------------------------------------------- models */

/* Base models that live workers hold, and this project's fine-tuned models. */
static enum MHD_Result models_list(http_req *r) {
    json_t *data = json_array();
    sqlite3_stmt *st = store_stmt("SELECT m.model, MIN(w.registered_at), COUNT(*) FROM worker_models m "
                                  "JOIN workers w ON w.id=m.worker_id WHERE w.last_seen_f>=? GROUP BY m.model "
                                  "ORDER BY m.model");
    sqlite3_bind_double(st, 1, (double)ln_unix_time() - g_cfg.worker_timeout_s);
    while (sqlite3_step(st) == SQLITE_ROW)
        json_array_append_new(data, json_pack("{s:s, s:s, s:I, s:s, s:I}", "id", store_col_text(st, 0), "object",
                                              "model", "created", (json_int_t)sqlite3_column_int64(st, 1), "owned_by",
                                              "loranull", "workers", (json_int_t)sqlite3_column_int64(st, 2)));
    sqlite3_reset(st);
    st = store_stmt("SELECT fine_tuned_model, finished_at FROM jobs WHERE project_id=? AND status='succeeded' "
                    "AND fine_tuned_model IS NOT NULL ORDER BY seq");
    sqlite3_bind_text(st, 1, r->project_id, -1, SQLITE_STATIC);
    while (sqlite3_step(st) == SQLITE_ROW)
        json_array_append_new(data, json_pack("{s:s, s:s, s:I, s:s}", "id", store_col_text(st, 0), "object", "model",
                                              "created", (json_int_t)sqlite3_column_int64(st, 1), "owned_by",
                                              r->project_id));
    sqlite3_reset(st);
    return http_json(r, 200, json_pack("{s:s, s:o}", "object", "list", "data", data));
}

void api_jobs_register(void) {
    http_route("POST", "/v1/fine_tuning/jobs", HTTP_AUTH_KEY, HTTP_BODY_JSON, jobs_create, "jobs_create");
    http_route("GET", "/v1/fine_tuning/jobs", HTTP_AUTH_KEY, HTTP_BODY_NONE, jobs_list, "jobs_list");
    http_route("GET", "/v1/fine_tuning/jobs/{}", HTTP_AUTH_KEY, HTTP_BODY_NONE, jobs_get, "jobs_get");
    http_route("POST", "/v1/fine_tuning/jobs/{}/cancel", HTTP_AUTH_KEY, HTTP_BODY_JSON, jobs_cancel, "jobs_cancel");
    http_route("POST", "/v1/fine_tuning/jobs/{}/pause", HTTP_AUTH_KEY, HTTP_BODY_JSON, jobs_pause, "jobs_pause");
    http_route("POST", "/v1/fine_tuning/jobs/{}/resume", HTTP_AUTH_KEY, HTTP_BODY_JSON, jobs_resume, "jobs_resume");
    http_route("GET", "/v1/fine_tuning/jobs/{}/events", HTTP_AUTH_KEY, HTTP_BODY_NONE, jobs_events, "jobs_events");
    http_route("GET", "/v1/fine_tuning/jobs/{}/checkpoints", HTTP_AUTH_KEY, HTTP_BODY_NONE, jobs_checkpoints,
               "jobs_checkpoints");
    http_route("GET", "/v1/fine_tuning/jobs/{}/metrics", HTTP_AUTH_KEY, HTTP_BODY_NONE, jobs_metrics, "jobs_metrics");
    http_route("GET", "/v1/models", HTTP_AUTH_KEY, HTTP_BODY_NONE, models_list, "models_list");
}
