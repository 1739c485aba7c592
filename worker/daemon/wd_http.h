/* wd_http.h — the worker daemon's HTTP client: libcurl's multi interface driven by a libuv loop.
 *
 * curl tells us which sockets to watch (CURLMOPT_SOCKETFUNCTION → one uv_poll_t per socket) and
 * when it next needs a timeout (CURLMOPT_TIMERFUNCTION → one uv_timer_t); libuv tells curl when a
 * socket is ready (curl_multi_socket_action). Nothing blocks the loop, so a long-poll for a lease,
 * heartbeats, event batches and uploads all run at the same time on one thread.
 *
 * Contracts (libuv's): a function that takes a callback returns 0 and calls it exactly once, later,
 * from the loop — or returns -1 and never calls it. Every request carries the worker token
 * (Authorization: Bearer) and a timeout. All calls are made on the loop's thread.
 * Ownership: wd_http owns its requests; a wd_resp lives only during its callback. */
#ifndef WD_HTTP_H
#define WD_HTTP_H

#include <stddef.h>

#include <jansson.h>
#include <uv.h>

#include "common/err.h"

typedef struct wd_http wd_http;

typedef struct wd_resp {
    long status;            /* HTTP status; 0 when the server was not reached (see error) */
    const char *body;       /* response body, NUL-terminated ("" when none; error text of a download) */
    size_t len;
    const char *error;      /* curl's reason when status is 0, else "" */
    double elapsed_s;
} wd_resp;

typedef void (*wd_http_cb)(const wd_resp *r, void *ctx);

/* base_url like "http://127.0.0.1:8080" (no trailing slash needed). */
wd_http *wd_http_new(uv_loop_t *loop, const char *base_url, const char *token, ln_err *e);
/* Aborts every request in flight (their callbacks are NOT called) and closes the handles; the
 * memory is released once the loop has run the close callbacks. */
void wd_http_free(wd_http *h);
/* Requests in flight. */
int wd_http_pending(const wd_http *h);
/* Aborts every request in flight whose ctx is ctx (callbacks not called). */
void wd_http_abort_ctx(wd_http *h, void *ctx);

/* method "GET"/"POST"/"PUT" on path (e.g. "/internal/v1/lease"); body (may be NULL) is a JSON
 * value the call takes over (steals the reference). */
int wd_http_json(wd_http *h, const char *method, const char *path, json_t *body, double timeout_s, wd_http_cb cb,
                 void *ctx);
/* GET path into the file dest (written to dest.part, renamed on a 200). */
int wd_http_download(wd_http *h, const char *path, const char *dest, double timeout_s, wd_http_cb cb, void *ctx);
/* POST the file src as the raw body (application/octet-stream). */
int wd_http_upload(wd_http *h, const char *path, const char *src, double timeout_s, wd_http_cb cb, void *ctx);

/* The sentence that explains a failed response: the server's error.message, or curl's reason. */
void wd_resp_message(const wd_resp *r, char *out, size_t n);
/* The server's error.code ("lease_lost", ...) of a failed response, or "". */
void wd_resp_code(const wd_resp *r, char *out, size_t n);

#endif
