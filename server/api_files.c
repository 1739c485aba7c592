/* api_files.c — /v1/files: multipart upload (content-addressed), list, retrieve, content, delete. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "server/api.h"
#include "server/server.h"
#include "server/store.h"

int api_valid_id(const char *id, const char *prefix) {
    size_t pl = strlen(prefix);
    if (strncmp(id, prefix, pl) != 0) return 0;
    size_t n = strlen(id + pl);
    if (n < 1 || n > 64) return 0;
    for (const char *p = id + pl; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_' ||
              *p == '-'))
            return 0;
    return 1;
}

json_t *api_file_row(sqlite3_stmt *st) {
    return json_pack("{s:s, s:s, s:I, s:I, s:s, s:s, s:s, s:n, s:n, s:s}", "object", "file", "id",
                     store_col_text(st, 0), "bytes", (json_int_t)sqlite3_column_int64(st, 1), "created_at",
                     (json_int_t)sqlite3_column_int64(st, 2), "filename", store_col_text(st, 3), "purpose",
                     store_col_text(st, 4), "status", "processed", "status_details", "expires_at", "sha256",
                     store_col_text(st, 5));
}

int api_page_params(http_req *r, int def, int64_t *limit, const char **after, const char *prefix) {
    if (http_query_int(r, "limit", 1, 100, def, limit) != 0) return -1;
    *after = http_query(r, "after");
    if (*after && !api_valid_id(*after, prefix)) {
        http_error(r, 400, "invalid_request_error", "invalid_parameter", "after",
                   "Query parameter 'after' must be an id of the form %s….", prefix);
        return -1;
    }
    return 0;
}

json_t *api_page_collect(sqlite3_stmt *st, int64_t limit, json_t *(*row)(sqlite3_stmt *), int with_ids) {
    json_t *data = json_array();
    int64_t n = 0;
    int more = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        if (n++ == limit) { /* the extra row only says there is another page */
            more = 1;
            break;
        }
        json_array_append_new(data, row(st));
    }
    sqlite3_reset(st);
    json_t *j = json_pack("{s:s, s:o, s:b}", "object", "list", "data", data, "has_more", more);
    if (with_ids) {
        size_t sz = json_array_size(data);
        json_object_set_new(j, "first_id", sz ? json_incref(json_object_get(json_array_get(data, 0), "id")) : json_null());
        json_object_set_new(j, "last_id", sz ? json_incref(json_object_get(json_array_get(data, sz - 1), "id")) : json_null());
    }
    return j;
}

/* A filename as given by the client, made safe to show and to echo in a header:
 * the last path component, printable ASCII without quotes or backslashes. */
static void clean_filename(const char *in, char *out, size_t cap) {
    const char *base = strrchr(in, '/');
    base = base ? base + 1 : in;
    const char *b2 = strrchr(base, '\\');
    base = b2 ? b2 + 1 : base;
    size_t k = 0;
    for (const char *p = base; *p && k + 1 < cap; p++) out[k++] = (*p >= 0x20 && *p < 0x7f && *p != '"' && *p != '\\') ? *p : '_';
    out[k] = 0;
    if (k == 0) snprintf(out, cap, "upload");
}

int api_store_upload(http_req *r, const char *project_id, const char *filename, const char *purpose,
                     const char *job_id, char file_id[40]) {
    char sha[65];
    ln_err e;
    if (http_upload_finish(r, sha) != 0 || store_blob_commit(r->up.tmp_path, sha, &e) != 0) {
        http_error(r, 500, "server_error", "storage_error", NULL, "The upload could not be stored.");
        return -1;
    }
    /* The request's cleanup settles the blob after the row's commit (store.h). */
    snprintf(r->up.blob_sha, sizeof r->up.blob_sha, "%s", sha);
    store_new_id("file-", file_id, 40);
    sqlite3_stmt *st = store_stmt(
        "INSERT INTO files(id,project_id,filename,purpose,bytes,sha256,job_id,created_at) VALUES(?,?,?,?,?,?,?,?)");
    sqlite3_bind_text(st, 1, file_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, project_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, filename, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, purpose, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, (sqlite3_int64)r->up.bytes);
    sqlite3_bind_text(st, 6, sha, -1, SQLITE_STATIC);
    if (job_id) sqlite3_bind_text(st, 7, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 8, ln_unix_time());
    if (sqlite3_step(st) != SQLITE_DONE) {
        ln_log(LN_LOG_ERROR, "files", "cannot record file: %s", sqlite3_errmsg(store_db()));
        sqlite3_reset(st);
        http_error(r, 500, "server_error", "storage_error", NULL, "The file could not be recorded.");
        return -1;
    }
    sqlite3_reset(st);
    return 0;
}

static enum MHD_Result files_create(http_req *r) {
    if (!r->up.purpose[0])
        return http_error(r, 400, "invalid_request_error", "missing_required_parameter", "purpose",
                          "Missing required parameter: 'purpose'.");
    if (strcmp(r->up.purpose, "fine-tune") != 0)
        return http_error(r, 400, "invalid_request_error", "invalid_value", "purpose",
                          "'%.40s' is not a supported purpose; use 'fine-tune'.", r->up.purpose);
    if (!r->up.have_file)
        return http_error(r, 400, "invalid_request_error", "missing_required_parameter", "file",
                          "Missing required parameter: 'file' (a multipart file part).");
    char name[256], id[40];
    clean_filename(r->up.filename, name, sizeof name);
    if (api_store_upload(r, r->project_id, name, "fine-tune", NULL, id) != 0) return r->result;
    sqlite3_stmt *st = store_stmt("SELECT " API_FILE_COLS " FROM files WHERE id=?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    json_t *j = api_file_row(st);
    sqlite3_reset(st);
    return http_json(r, 200, j);
}

static enum MHD_Result files_list(http_req *r) {
    int64_t limit;
    const char *after;
    if (api_page_params(r, 100, &limit, &after, "file-") != 0) return r->result;
    const char *purpose = http_query(r, "purpose");
    const char *order = http_query(r, "order");
    if (order && strcmp(order, "asc") != 0 && strcmp(order, "desc") != 0)
        return http_error(r, 400, "invalid_request_error", "invalid_parameter", "order",
                          "Query parameter 'order' must be 'asc' or 'desc'.");
    int asc = order && strcmp(order, "asc") == 0;
    int64_t after_seq = asc ? 0 : INT64_MAX;
    if (after) {
        sqlite3_stmt *s = store_stmt("SELECT seq FROM files WHERE id=? AND project_id=?");
        sqlite3_bind_text(s, 1, after, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 2, r->project_id, -1, SQLITE_STATIC);
        if (sqlite3_step(s) != SQLITE_ROW) {
            sqlite3_reset(s);
            return http_error(r, 400, "invalid_request_error", "invalid_parameter", "after",
                              "Query parameter 'after' names no file of this project.");
        }
        after_seq = sqlite3_column_int64(s, 0);
        sqlite3_reset(s);
    }
    sqlite3_stmt *st = store_stmt(asc ? "SELECT " API_FILE_COLS " FROM files WHERE project_id=? AND seq>? "
                                        "AND (?3 IS NULL OR purpose=?3) ORDER BY seq ASC LIMIT ?"
                                      : "SELECT " API_FILE_COLS " FROM files WHERE project_id=? AND seq<? "
                                        "AND (?3 IS NULL OR purpose=?3) ORDER BY seq DESC LIMIT ?");
    sqlite3_bind_text(st, 1, r->project_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, after_seq);
    if (purpose) sqlite3_bind_text(st, 3, purpose, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, limit + 1);
    return http_json(r, 200, api_page_collect(st, limit, api_file_row, 1));
}

static enum MHD_Result files_get(http_req *r) {
    const char *id = r->params[0];
    if (!api_valid_id(id, "file-")) return http_not_found(r, "file", id);
    sqlite3_stmt *st = store_stmt("SELECT " API_FILE_COLS " FROM files WHERE id=? AND project_id=?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, r->project_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_reset(st);
        return http_not_found(r, "file", id);
    }
    json_t *j = api_file_row(st);
    sqlite3_reset(st);
    return http_json(r, 200, j);
}

static enum MHD_Result files_content(http_req *r) {
    const char *id = r->params[0];
    if (!api_valid_id(id, "file-")) return http_not_found(r, "file", id);
    sqlite3_stmt *st = store_stmt("SELECT sha256, filename FROM files WHERE id=? AND project_id=?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, r->project_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_reset(st);
        return http_not_found(r, "file", id);
    }
    char *path = store_blob_path(store_col_text(st, 0));
    char name[256];
    snprintf(name, sizeof name, "%s", store_col_text(st, 1));
    sqlite3_reset(st);
    enum MHD_Result res = http_file(r, path, "application/octet-stream", name);
    free(path);
    return res;
}

static enum MHD_Result files_delete(http_req *r) {
    const char *id = r->params[0];
    if (!api_valid_id(id, "file-")) return http_not_found(r, "file", id);
    if (store_begin() != 0) return http_error(r, 503, "server_error", "busy", NULL, "The database is busy; retry.");
    sqlite3_stmt *st = store_stmt("SELECT sha256 FROM files WHERE id=? AND project_id=?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, r->project_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_reset(st);
        store_rollback();
        return http_not_found(r, "file", id);
    }
    char sha[65];
    snprintf(sha, sizeof sha, "%s", store_col_text(st, 0));
    sqlite3_reset(st);
    /* A file a live job reads cannot go away under it. */
    st = store_stmt("SELECT id FROM jobs WHERE project_id=? AND status IN "
                    "('validating_files','queued','running','paused') AND "
                    "(training_file=?2 OR validation_file=?2 OR calibration_file=?2) LIMIT 1");
    sqlite3_bind_text(st, 1, r->project_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
        char job[80];
        snprintf(job, sizeof job, "%s", store_col_text(st, 0));
        sqlite3_reset(st);
        store_rollback();
        return http_error(r, 409, "invalid_request_error", "file_in_use", "id",
                          "File %s is used by job %s, which has not finished; cancel it first.", id, job);
    }
    sqlite3_reset(st);
    st = store_stmt("DELETE FROM files WHERE id=?");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);
    if (store_commit() != 0) return http_error(r, 503, "server_error", "busy", NULL, "The database is busy; retry.");
    /* The blob goes once no file row points at it (after the commit: a crash leaves only garbage). */
    store_blob_release(sha);
    return http_json(r, 200, json_pack("{s:s, s:s, s:b}", "object", "file", "id", id, "deleted", 1));
}

void api_files_register(void) {
    http_route("POST", "/v1/files", HTTP_AUTH_KEY, HTTP_BODY_MULTIPART, files_create, "files_create");
    http_route("GET", "/v1/files", HTTP_AUTH_KEY, HTTP_BODY_NONE, files_list, "files_list");
    http_route("GET", "/v1/files/{}", HTTP_AUTH_KEY, HTTP_BODY_NONE, files_get, "files_get");
    http_route("GET", "/v1/files/{}/content", HTTP_AUTH_KEY, HTTP_BODY_NONE, files_content, "files_content");
    http_route("DELETE", "/v1/files/{}", HTTP_AUTH_KEY, HTTP_BODY_NONE, files_delete, "files_delete");
}
