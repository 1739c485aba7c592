/* jobs.c — job state machine, objects and events (see jobs.h). */
#include "server/jobs.h"

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "server/http.h"
#include "server/sse.h"
#include "server/store.h"

static const char *const transitions[][2] = {
    {"validating_files", "queued"}, {"validating_files", "failed"}, {"validating_files", "cancelled"},
    {"queued", "running"},          {"queued", "paused"},           {"queued", "cancelled"},
    {"running", "succeeded"},       {"running", "failed"},          {"running", "queued"},
    {"running", "paused"},          {"running", "cancelled"},       {"paused", "queued"},
    {"paused", "cancelled"},
};

int jobs_transition_ok(const char *from, const char *to) {
    for (size_t i = 0; i < sizeof transitions / sizeof transitions[0]; i++)
        if (strcmp(transitions[i][0], from) == 0 && strcmp(transitions[i][1], to) == 0) return 1;
    return 0;
}

int jobs_is_terminal(const char *s) {
    return strcmp(s, "succeeded") == 0 || strcmp(s, "failed") == 0 || strcmp(s, "cancelled") == 0;
}

int jobs_set_status(const char *job_id, const char *from, const char *to) {
    assert(jobs_transition_ok(from, to));
    int terminal = jobs_is_terminal(to);
    sqlite3_stmt *st = store_stmt(
        "UPDATE jobs SET status=?3, finished_at=CASE WHEN ?4 THEN ?5 ELSE finished_at END, "
        "lease_expires_f=CASE WHEN ?3='running' THEN lease_expires_f ELSE NULL END WHERE id=?1 AND status=?2");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, from, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, to, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, terminal);
    sqlite3_bind_int64(st, 5, ln_unix_time());
    int rc = sqlite3_step(st) == SQLITE_DONE ? sqlite3_changes(store_db()) : 0;
    sqlite3_reset(st);
    return rc;
}

int jobs_event(const char *job_id, const char *level, const char *type, json_t *data, const char *fmt, ...) {
    char msg[4200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sqlite3_stmt *st = store_stmt("INSERT INTO events(job_id,created_at,level,type,message,data) VALUES(?,?,?,?,?,?)");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, ln_unix_time());
    sqlite3_bind_text(st, 3, level, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, type, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, msg, -1, SQLITE_TRANSIENT);
    char *d = data ? json_dumps(data, JSON_COMPACT) : NULL;
    if (d) sqlite3_bind_text(st, 6, d, -1, free);
    int rc = sqlite3_step(st) == SQLITE_DONE ? 0 : -1;
    if (rc) ln_log(LN_LOG_ERROR, "jobs", "cannot record event of %s: %s", job_id, sqlite3_errmsg(store_db()));
    sqlite3_reset(st);
    return rc;
}

void jobs_notify(const char *job_id) {
    sse_notify(job_id);
    http_wake_all();
}

json_t *jobs_event_row(sqlite3_stmt *st) {
    char id[40];
    snprintf(id, sizeof id, "ftevent-%lld", (long long)sqlite3_column_int64(st, 0));
    json_t *data = NULL;
    if (sqlite3_column_type(st, 5) != SQLITE_NULL) data = json_loads(store_col_text(st, 5), 0, NULL);
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:s, s:o}", "object", "fine_tuning.job.event", "id", id, "created_at",
                     (json_int_t)sqlite3_column_int64(st, 1), "level", store_col_text(st, 2), "type",
                     store_col_text(st, 3), "message", store_col_text(st, 4), "data", data ? data : json_object());
}

json_t *jobs_checkpoint_row(sqlite3_stmt *st) {
    json_t *files = json_loads(store_col_text(st, 3), 0, NULL);
    json_t *metrics = sqlite3_column_type(st, 4) == SQLITE_NULL ? NULL : json_loads(store_col_text(st, 4), 0, NULL);
    if (!metrics) metrics = json_object();
    json_object_set_new(metrics, "step", json_integer(sqlite3_column_int64(st, 2)));
    char name[400];
    snprintf(name, sizeof name, "ft:%s:ckpt-step-%lld:%s", store_col_text(st, 7), (long long)sqlite3_column_int64(st, 2),
             store_col_text(st, 1));
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:I, s:o, s:o}", "object", "fine_tuning.job.checkpoint", "id",
                     store_col_text(st, 0), "created_at", (json_int_t)sqlite3_column_int64(st, 5),
                     "fine_tuned_model_checkpoint", name, "fine_tuning_job_id", store_col_text(st, 1), "step_number",
                     (json_int_t)sqlite3_column_int64(st, 2), "metrics", metrics, "files",
                     files ? files : json_array());
}

static json_t *int_or_null(sqlite3_stmt *st, int i) {
    return sqlite3_column_type(st, i) == SQLITE_NULL ? json_null() : json_integer(sqlite3_column_int64(st, i));
}
static json_t *text_or_null(sqlite3_stmt *st, int i) {
    return sqlite3_column_type(st, i) == SQLITE_NULL ? json_null() : json_string(store_col_text(st, i));
}

json_t *jobs_object(const char *job_id, const char *project_id) {
    sqlite3_stmt *st = store_stmt(
        "SELECT id, project_id, status, model, spec, training_file, validation_file, created_at, started_at, "
        "finished_at, fine_tuned_model, trained_tokens, error, attempts, lease_gen FROM jobs "
        "WHERE id=?1 AND (?2 IS NULL OR project_id=?2)");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    if (project_id) sqlite3_bind_text(st, 2, project_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_reset(st);
        return NULL;
    }
    json_t *spec = json_loads(store_col_text(st, 4), 0, NULL);
    if (!spec) spec = json_object();
    json_t *err = sqlite3_column_type(st, 12) == SQLITE_NULL ? json_null() : json_loads(store_col_text(st, 12), 0, NULL);
    json_t *j = json_pack("{s:s, s:s, s:I, s:o, s:o, s:o, s:s, s:s, s:s, s:o, s:s, s:o, s:o, s:o, s:o, s:I, s:o}",
                          "object", "fine_tuning.job", "id", store_col_text(st, 0), "created_at",
                          (json_int_t)sqlite3_column_int64(st, 7), "error", err ? err : json_null(),
                          "fine_tuned_model", text_or_null(st, 10), "finished_at", int_or_null(st, 9), "model",
                          store_col_text(st, 3), "organization_id", store_col_text(st, 1), "status",
                          store_col_text(st, 2), "trained_tokens", int_or_null(st, 11), "training_file",
                          store_col_text(st, 5), "validation_file", text_or_null(st, 6), "started_at",
                          int_or_null(st, 8), "estimated_finish", json_null(), "integrations", json_array(),
                          "attempts", (json_int_t)sqlite3_column_int64(st, 13), "result_files", json_array());
    sqlite3_reset(st);
    /* Spec fields ride along as they were normalised at creation. */
    const char *copy[] = {"seed", "metadata", "method", "hyperparameters", "adapter", "resources"};
    for (size_t i = 0; i < sizeof copy / sizeof copy[0]; i++) {
        json_t *v = json_object_get(spec, copy[i]);
        json_object_set(j, copy[i], v ? v : json_null());
    }
    json_object_set(j, "user_provided_suffix", json_object_get(spec, "suffix") ? json_object_get(spec, "suffix") : json_null());
    json_decref(spec);
    st = store_stmt("SELECT file_id FROM result_files r JOIN files f ON f.id=r.file_id WHERE r.job_id=? ORDER BY f.seq");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    json_t *rf = json_object_get(j, "result_files");
    while (sqlite3_step(st) == SQLITE_ROW) json_array_append_new(rf, json_string(store_col_text(st, 0)));
    sqlite3_reset(st);
    return j;
}

/* ---------------------------------------------------------------- training file validation */

static const char *line_problem(json_t *o) {
    if (!json_is_object(o)) return "is not a JSON object";
    json_t *m = json_object_get(o, "messages");
    if (m) {
        if (!json_is_array(m) || json_array_size(m) == 0) return "'messages' must be a non-empty array";
        size_t i;
        json_t *x;
        json_array_foreach(m, i, x) {
            if (!json_is_object(x) || !json_is_string(json_object_get(x, "role")))
                return "every message needs a string 'role'";
            const char *role = json_string_value(json_object_get(x, "role"));
            if (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant"))
                return "a message 'role' must be system, user or assistant";
            if (!json_is_string(json_object_get(x, "content"))) return "every message needs a string 'content'";
        }
        return NULL;
    }
    if (json_object_get(o, "prompt") || json_object_get(o, "completion")) {
        if (!json_is_string(json_object_get(o, "prompt")) || !json_is_string(json_object_get(o, "completion")))
            return "'prompt' and 'completion' must both be strings";
        return NULL;
    }
    if (json_object_get(o, "text")) return json_is_string(json_object_get(o, "text")) ? NULL : "'text' must be a string";
    json_t *ids = json_object_get(o, "input_ids");
    if (ids) {
        if (!json_is_array(ids) || json_array_size(ids) == 0) return "'input_ids' must be a non-empty array";
        size_t i;
        json_t *x;
        json_array_foreach(ids, i, x) if (!json_is_integer(x)) return "'input_ids' must hold integers";
        return NULL;
    }
    return "has none of 'messages', 'prompt'+'completion', 'text', 'input_ids'";
}

int jobs_validate_jsonl(const char *path, const char *file_id, ln_err *e) {
    FILE *f = fopen(path, "rb");
    if (!f) return ln_errf(e, "%s: the stored file cannot be read", file_id);
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    long lineno = 0, examples = 0;
    int rc = 0;
    while ((n = getline(&line, &cap, f)) >= 0) {
        lineno++;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (n == 0) continue;
        json_error_t je;
        json_t *o = json_loadb(line, (size_t)n, 0, &je);
        const char *why = o ? line_problem(o) : NULL;
        if (!o) rc = ln_errf(e, "%s line %ld: not valid JSON: %s", file_id, lineno, je.text);
        else if (why) rc = ln_errf(e, "%s line %ld: %s", file_id, lineno, why);
        json_decref(o);
        if (rc) break;
        examples++;
    }
    free(line);
    fclose(f);
    if (rc == 0 && examples == 0) rc = ln_errf(e, "%s: the file holds no examples", file_id);
    return rc;
}
