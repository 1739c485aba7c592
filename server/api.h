/* api.h — route registration of each API module, and the helpers they share. */
#ifndef LN_API_H
#define LN_API_H

#include <jansson.h>
#include <sqlite3.h>

#include "server/http.h"

void api_files_register(void);     /* /v1/files… */
void api_jobs_register(void);      /* /v1/fine_tuning/jobs…, /v1/models */
void api_internal_register(void);  /* /internal/v1/… (workers) */
void api_ops_register(void);       /* /healthz, /readyz, /metrics, /, /static/…, /vendor/chart.js */
void api_workers_register(void);   /* /v1/workers (the dashboard's Workers page) */

/* 1 if id is prefix followed by 1..64 of [A-Za-z0-9_-] (ids from URLs are checked before use). */
int api_valid_id(const char *id, const char *prefix);

/* The OpenAI file object of a row selected with API_FILE_COLS. */
#define API_FILE_COLS "id, bytes, created_at, filename, purpose, sha256"
json_t *api_file_row(sqlite3_stmt *st);

/* Stores a finished upload (r->up) as a file of project; writes the new id. Replies on failure
 * and returns -1. */
int api_store_upload(http_req *r, const char *project_id, const char *filename, const char *purpose,
                     const char *job_id, char file_id[40]);

/* Pagination: reads ?limit= (1..100, default def) and validates ?after= with prefix.
 * Returns -1 after replying 400. */
int api_page_params(http_req *r, int def, int64_t *limit, const char **after, const char *prefix);

/* Steps st (bound with LIMIT limit + 1) into an OpenAI list object {"object":"list","data",
 * "has_more"}, one row(st) per row, resetting st; with_ids adds "first_id"/"last_id". */
json_t *api_page_collect(sqlite3_stmt *st, int64_t limit, json_t *(*row)(sqlite3_stmt *), int with_ids);

#endif
