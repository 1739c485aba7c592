/* jobs.c — job state machine, objects and events (see jobs.h). */
#include "server/jobs.h"

#include <assert.h>
#include <pthread.h>
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

/* ---------------------------------------------------------------- rendering
 * GET job and list jobs are the hot paths (dashboards poll them), so a job is rendered straight to
 * text: the immutable part that comes from the spec is rendered once per job and cached per thread;
 * the columns that change are printed around it. jobs_object parses that text, so both agree. */

typedef struct { char id[40]; char *frag; } spec_slot;
#define SPEC_CACHE 1024
/* Per thread (no locking on the hot path); freed when the thread ends. */
static pthread_key_t g_spec_key;
static pthread_once_t g_spec_once = PTHREAD_ONCE_INIT;

static void spec_cache_free(void *p) {
    spec_slot *c = p;
    for (int i = 0; i < SPEC_CACHE; i++) free(c[i].frag);
    free(c);
}
static void spec_key_init(void) { pthread_key_create(&g_spec_key, spec_cache_free); }

static unsigned hash_id(const char *s) {
    unsigned h = 2166136261u; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

/* `"seed":…,"metadata":…,"method":…,"hyperparameters":…,"adapter":…,"resources":…,"data":…,"user_provided_suffix":…`
 * from the normalised spec text. The returned string belongs to the cache. */
static const char *spec_fragment(const char *job_id, const char *spec_text) {
    pthread_once(&g_spec_once, spec_key_init);
    spec_slot *cache = pthread_getspecific(g_spec_key);
    if (!cache) {
        cache = ln_xcalloc(SPEC_CACHE, sizeof *cache);
        pthread_setspecific(g_spec_key, cache);
    }
    spec_slot *slot = &cache[hash_id(job_id) % SPEC_CACHE];
    if (slot->frag && strcmp(slot->id, job_id) == 0) return slot->frag;
    json_t *spec = json_loads(spec_text, 0, NULL);
    if (!spec) spec = json_object();
    json_t *o = json_object();
    static const char *const copy[] = {"seed", "metadata", "method", "hyperparameters", "adapter", "resources",
                                       "data"};
    for (size_t i = 0; i < sizeof copy / sizeof copy[0]; i++) {
        json_t *v = json_object_get(spec, copy[i]);
        json_object_set(o, copy[i], v ? v : json_null());
    }
    json_t *suffix = json_object_get(spec, "suffix");
    json_object_set(o, "user_provided_suffix", suffix ? suffix : json_null());
    char *text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    json_decref(spec);
    size_t n = strlen(text);
    memmove(text, text + 1, n - 2); /* drop the braces: a fragment to splice */
    text[n - 2] = 0;
    free(slot->frag);
    slot->frag = text;
    snprintf(slot->id, sizeof slot->id, "%s", job_id);
    return slot->frag;
}

typedef struct { char *p; size_t len, cap; } sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->p = ln_xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}
static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

/* A JSON string literal (escaped), or null when isnull. */
static void sb_json_str(sbuf *b, const char *s, int isnull) {
    if (isnull) {
        sb_str(b, "null");
        return;
    }
    sb_put(b, "\"", 1);
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            sb_put(b, esc, 2);
        } else if (c < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", c);
            sb_str(b, esc);
        } else {
            sb_put(b, (const char *)p, 1);
        }
    }
    sb_put(b, "\"", 1);
}

static void sb_col_int(sbuf *b, sqlite3_stmt *st, int i) {
    char num[32];
    if (sqlite3_column_type(st, i) == SQLITE_NULL) sb_str(b, "null");
    else {
        snprintf(num, sizeof num, "%lld", (long long)sqlite3_column_int64(st, i));
        sb_str(b, num);
    }
}

static void sb_col_str(sbuf *b, sqlite3_stmt *st, int i) {
    sb_json_str(b, store_col_text(st, i), sqlite3_column_type(st, i) == SQLITE_NULL);
}

/* Appends the job object; 0, or -1 when there is no such job (in that project). */
static int render_into(sbuf *b, const char *job_id, const char *project_id) {
    sqlite3_stmt *st = store_stmt(
        "SELECT id, project_id, status, model, spec, training_file, validation_file, created_at, started_at, "
        "finished_at, fine_tuned_model, trained_tokens, error, attempts FROM jobs "
        "WHERE id=?1 AND (?2 IS NULL OR project_id=?2)");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    if (project_id) sqlite3_bind_text(st, 2, project_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_reset(st);
        return -1;
    }
    sb_str(b, "{\"object\":\"fine_tuning.job\",\"id\":");
    sb_col_str(b, st, 0);
    sb_str(b, ",\"created_at\":");
    sb_col_int(b, st, 7);
    /* error is stored as a JSON object written by the server itself */
    sb_str(b, ",\"error\":");
    sb_str(b, sqlite3_column_type(st, 12) == SQLITE_NULL ? "null" : store_col_text(st, 12));
    sb_str(b, ",\"fine_tuned_model\":");
    sb_col_str(b, st, 10);
    sb_str(b, ",\"finished_at\":");
    sb_col_int(b, st, 9);
    sb_str(b, ",\"model\":");
    sb_col_str(b, st, 3);
    sb_str(b, ",\"organization_id\":");
    sb_col_str(b, st, 1);
    sb_str(b, ",\"status\":");
    sb_col_str(b, st, 2);
    sb_str(b, ",\"trained_tokens\":");
    sb_col_int(b, st, 11);
    sb_str(b, ",\"training_file\":");
    sb_col_str(b, st, 5);
    sb_str(b, ",\"validation_file\":");
    sb_col_str(b, st, 6);
    sb_str(b, ",\"started_at\":");
    sb_col_int(b, st, 8);
    sb_str(b, ",\"estimated_finish\":null,\"integrations\":[],\"attempts\":");
    sb_col_int(b, st, 13);
    sb_str(b, ",");
    sb_str(b, spec_fragment(job_id, store_col_text(st, 4)));
    sqlite3_reset(st);
    sb_str(b, ",\"result_files\":[");
    st = store_stmt("SELECT file_id FROM result_files r JOIN files f ON f.id=r.file_id WHERE r.job_id=? ORDER BY f.seq");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    for (int k = 0; sqlite3_step(st) == SQLITE_ROW; k++) {
        if (k) sb_str(b, ",");
        sb_col_str(b, st, 0);
    }
    sqlite3_reset(st);
    sb_str(b, "]}");
    return 0;
}

char *jobs_render(const char *job_id, const char *project_id) {
    sbuf b = {0};
    if (render_into(&b, job_id, project_id) != 0) {
        free(b.p);
        return NULL;
    }
    return b.p;
}

char *jobs_render_list(char (*ids)[40], int n, const char *project_id, int has_more) {
    sbuf b = {0};
    sb_str(&b, "{\"object\":\"list\",\"data\":[");
    int k = 0;
    for (int i = 0; i < n; i++) {
        size_t mark = b.len;
        if (k) sb_str(&b, ",");
        if (render_into(&b, ids[i], project_id) != 0) {
            b.len = mark; /* vanished meanwhile */
            b.p[b.len] = 0;
        } else {
            k++;
        }
    }
    sb_str(&b, has_more ? "],\"has_more\":true}" : "],\"has_more\":false}");
    return b.p;
}

json_t *jobs_object(const char *job_id, const char *project_id) {
    char *text = jobs_render(job_id, project_id);
    if (!text) return NULL;
    json_t *j = json_loads(text, 0, NULL);
    free(text);
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
