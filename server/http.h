/* http.h — the HTTP layer of loranull-server on libmicrohttpd.
 *
 * One MHD daemon, internal epoll polling with a small thread pool; no thread per connection.
 * Long requests (a worker's lease long-poll, SSE streams) suspend their connection and are
 * resumed by an event or a timer, so thousands of them cost memory only.
 *
 * Routes are registered at start (http_route) with the auth they need and the body they take.
 * A handler runs once the whole body has arrived (or, for uploads, has been streamed to a temp
 * file and hashed) and answers with one of the reply helpers, which all return the
 * MHD_Result the handler returns. Errors are OpenAI-shaped:
 *   {"error": {"message": "...", "type": "invalid_request_error", "param": "x"|null, "code": "..."|null}} */
#ifndef LN_HTTP_H
#define LN_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <microhttpd.h>

#include "common/err.h"
#include "common/sha256.h"

typedef enum { HTTP_AUTH_NONE, HTTP_AUTH_KEY, HTTP_AUTH_WORKER } http_auth;
typedef enum { HTTP_BODY_NONE, HTTP_BODY_JSON, HTTP_BODY_MULTIPART, HTTP_BODY_RAW } http_body_kind;

/* An upload streamed to a temp file while it is hashed. Owned by its request. */
typedef struct http_upload {
    char *tmp_path;              /* NULL until the first byte */
    int fd;
    sha256_ctx sha;
    uint64_t bytes;
    char filename[256];          /* multipart: the file part's filename */
    char purpose[64];            /* multipart: the purpose field */
    int have_file;
    char blob_sha[65];           /* set once linked into the blob store: cleanup settles it */
    int too_big, io_error;
    struct MHD_PostProcessor *pp;
} http_upload;

typedef struct http_req http_req;
typedef enum MHD_Result (*http_handler)(http_req *r);

struct http_req {
    struct MHD_Connection *conn;
    int route;                   /* index in the route table, -1 when none matched */
    char method[8];
    char path[512];
    char params[3][160];         /* {} segments of the route pattern, in order */
    char request_id[40];
    double t0;
    char *body;                  /* HTTP_BODY_JSON: the raw body, NUL-terminated */
    size_t body_len, body_cap;
    int body_too_big;
    http_upload up;
    int on_internal;             /* arrived on the --internal-listen listener */
    char project_id[40];         /* HTTP_AUTH_KEY: the key's project */
    char worker_token_id[40];    /* HTTP_AUTH_WORKER */
    int status;                  /* status queued, for logs and metrics */
    enum MHD_Result result;      /* what the reply helpers returned */
    int replied;
    /* Long-poll state, kept across suspend/resume. */
    int waiting;
    double deadline;
    void *ctx;
    void (*ctx_free)(void *);
};

/* Registers a route. pattern: "/v1/files/{}" ({} = one path segment, copied to params);
 * a trailing star matches the non-empty rest of the path ("/static/" + star). */
void http_route(const char *method, const char *pattern, http_auth auth, http_body_kind body, http_handler fn,
                const char *metric_name);

/* Starts the daemon on host:port (port 0 = any); returns the bound port or -1. */
int http_start(const char *host, int port, int threads, ln_err *e);
/* Starts the internal listener (--internal-listen) before http_start; returns its bound port or
 * -1. Once started, routes are split by listener: /internal/… only on this one; /v1, the
 * dashboard and /metrics only on the public one (a 404 elsewhere); /healthz and /readyz on both. */
int http_start_internal(const char *host, int port, int threads, ln_err *e);
/* Stops accepting connections; http_stopping() becomes true. */
void http_begin_stop(void);
/* Wakes every suspended request (and, through wake_others, e.g. SSE streams) until none is in
 * progress (they see http_stopping() and finish), then stops the daemon. */
void http_stop(void (*wake_others)(void));
int http_stopping(void);

/* ---- replies (each returns the MHD_Result for the handler to return) */
enum MHD_Result http_json(http_req *r, unsigned status, json_t *body); /* steals body */
enum MHD_Result http_error(http_req *r, unsigned status, const char *type, const char *code, const char *param,
                           const char *fmt, ...) __attribute__((format(printf, 6, 7)));
enum MHD_Result http_not_found(http_req *r, const char *what, const char *id);
enum MHD_Result http_text(http_req *r, unsigned status, const char *content_type, const char *text, size_t len);
/* Sends a file; download_name (if not NULL) becomes a Content-Disposition attachment. */
enum MHD_Result http_file(http_req *r, const char *path, const char *content_type, const char *download_name);
enum MHD_Result http_empty(http_req *r, unsigned status);
/* Queues a response built elsewhere (SSE); takes ownership of resp. */
enum MHD_Result http_queue(http_req *r, unsigned status, struct MHD_Response *resp);

/* ---- request data */
const char *http_query(http_req *r, const char *key);
const char *http_header(http_req *r, const char *key);
/* The body as a JSON object; on failure replies 400 and returns NULL (handler returns r->result).
 * The caller owns the returned reference. */
json_t *http_body_object(http_req *r);
/* Integer query parameter in [lo, hi] (def when absent); replies 400 naming it and returns -1 on
 * a bad value. */
int http_query_int(http_req *r, const char *key, int64_t lo, int64_t hi, int64_t def, int64_t *out);

/* Finishes a streamed upload (fsync, SHA-256 hex); the temp file is r->up.tmp_path. 0 or -1. */
int http_upload_finish(http_req *r, char sha_hex[65]);

/* ---- long-poll */
/* Suspends the request until http_wake_all() or its deadline (absolute, ln_now_s clock);
 * the handler is then called again. Returns MHD_YES for the handler to return. */
enum MHD_Result http_wait(http_req *r, double deadline);
void http_wake_all(void);
/* Resumes waiters whose deadline passed; called by the scheduler's ticker. */
void http_wake_expired(double now);

/* ---- Prometheus text of the request counters and latency histogram (appended to buf). */
void http_metrics_render(char **buf, size_t *len, size_t *cap);
int http_active_connections(void);

/* Appends to a growable string (for metrics text). */
void http_buf_printf(char **buf, size_t *len, size_t *cap, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

#endif
