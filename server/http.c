/* http.c — libmicrohttpd glue: routing, bodies, uploads, auth, replies, long-poll, request metrics. */
#include "server/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "server/auth.h"
#include "server/server.h"
#include "server/store.h"

/* ---------------------------------------------------------------- routes */

#define MAX_ROUTES 64
#define N_BUCKETS 12

typedef struct http_route_def {
    const char *method;
    const char *pattern;
    http_auth auth;
    http_body_kind body;
    http_handler fn;
    const char *metric;
    /* Prometheus counters: requests by status class (1xx..5xx) and a latency histogram. */
    atomic_ulong by_class[6];
    atomic_ulong buckets[N_BUCKETS + 1];
    atomic_ulong latency_us_sum;
} http_route_def;

static const double bucket_le[N_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                            0.05,   0.1,   0.25,   0.5,   1.0,  5.0};
static http_route_def g_routes[MAX_ROUTES];
static int g_nroutes;
static http_route_def g_unrouted = {.metric = "unrouted"};
static struct MHD_Daemon *g_daemon, *g_internal; /* g_internal: --internal-listen, or NULL */
static int g_internal_cls;                         /* its access_cb cls: &g_internal_cls */
static atomic_int g_stopping;
static atomic_int g_active;

void http_route(const char *method, const char *pattern, http_auth auth, http_body_kind body, http_handler fn,
                const char *metric) {
    if (g_nroutes == MAX_ROUTES) abort();
    http_route_def *d = &g_routes[g_nroutes++];
    d->method = method;
    d->pattern = pattern;
    d->auth = auth;
    d->body = body;
    d->fn = fn;
    d->metric = metric;
}

/* Matches path against pattern segment by segment; {} captures one segment into params. */
static int route_match(const char *pattern, const char *path, char params[3][160]) {
    int np = 0;
    const char *p = pattern, *s = path;
    while (*p && *s) {
        if (p[0] == '*' && p[1] == 0) return 1; /* the rest of the path (non-empty) */
        if (p[0] == '{' && p[1] == '}') {
            const char *end = strchr(s, '/');
            size_t n = end ? (size_t)(end - s) : strlen(s);
            if (n == 0 || n >= 160 || np == 3) return 0;
            memcpy(params[np], s, n);
            params[np++][n] = 0;
            s += n;
            p += 2;
        } else if (*p == *s) {
            p++;
            s++;
        } else {
            return 0;
        }
    }
    return *p == 0 && *s == 0;
}

/* ---------------------------------------------------------------- replies */

static void add_common_headers(http_req *r, struct MHD_Response *resp) {
    MHD_add_response_header(resp, "X-Request-Id", r->request_id);
}

enum MHD_Result http_queue(http_req *r, unsigned status, struct MHD_Response *resp) {
    add_common_headers(r, resp);
    r->status = (int)status;
    r->replied = 1;
    r->result = MHD_queue_response(r->conn, status, resp);
    MHD_destroy_response(resp);
    return r->result;
}

enum MHD_Result http_text(http_req *r, unsigned status, const char *ctype, const char *text, size_t len) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, (void *)text, MHD_RESPMEM_MUST_COPY);
    MHD_add_response_header(resp, "Content-Type", ctype);
    return http_queue(r, status, resp);
}

enum MHD_Result http_json(http_req *r, unsigned status, json_t *body) {
    if (!body) {
        /* json_pack refused its input (a bug, e.g. invalid UTF-8 reached it): say so, do not crash. */
        static const char fallback[] = "{\"error\":{\"message\":\"The server could not encode its reply.\","
                                       "\"type\":\"server_error\",\"param\":null,\"code\":\"encoding_error\"}}";
        ln_log(LN_LOG_ERROR, "http", "%s %s: reply could not be encoded", r->method, r->path);
        return http_text(r, 500, "application/json", fallback, sizeof fallback - 1);
    }
    char *s = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(resp, "Content-Type", "application/json");
    return http_queue(r, status, resp);
}

enum MHD_Result http_empty(http_req *r, unsigned status) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, "", MHD_RESPMEM_PERSISTENT);
    return http_queue(r, status, resp);
}

enum MHD_Result http_error(http_req *r, unsigned status, const char *type, const char *code, const char *param,
                           const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* Messages may quote request data (ids from URLs, field values): keep them printable ASCII,
     * so the JSON encoder never sees invalid UTF-8 or control bytes. */
    for (char *p = msg; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f) *p = '?';
    json_t *err = json_pack("{s:{s:s, s:s, s:o, s:o}}", "error", "message", msg, "type", type, "param",
                            param && *param ? json_string(param) : json_null(), "code",
                            code ? json_string(code) : json_null());
    return http_json(r, status, err);
}

enum MHD_Result http_not_found(http_req *r, const char *what, const char *id) {
    /* The id comes from the URL: print at most a safe prefix of it. */
    return http_error(r, 404, "invalid_request_error", "not_found", "id", "No %s found with id '%.80s'.", what, id);
}

enum MHD_Result http_file(http_req *r, const char *path, const char *ctype, const char *download_name) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        if (fd >= 0) close(fd);
        ln_log(LN_LOG_ERROR, "http", "%s: cannot open for sending: %s", path, strerror(errno));
        return http_error(r, 500, "server_error", "storage_error", NULL, "The stored content is not readable.");
    }
    struct MHD_Response *resp = MHD_create_response_from_fd((uint64_t)st.st_size, fd);
    MHD_add_response_header(resp, "Content-Type", ctype);
    if (download_name) {
        char cd[400];
        snprintf(cd, sizeof cd, "attachment; filename=\"%s\"", download_name);
        MHD_add_response_header(resp, "Content-Disposition", cd);
    }
    return http_queue(r, 200, resp);
}

/* ---------------------------------------------------------------- request data */

const char *http_query(http_req *r, const char *key) {
    return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, key);
}

const char *http_header(http_req *r, const char *key) {
    return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, key);
}

json_t *http_body_object(http_req *r) {
    if (r->body_len == 0) {
        http_error(r, 400, "invalid_request_error", "invalid_json", NULL, "The request body is empty; a JSON object is expected.");
        return NULL;
    }
    json_error_t je;
    json_t *j = json_loadb(r->body, r->body_len, JSON_REJECT_DUPLICATES, &je);
    if (!j) {
        http_error(r, 400, "invalid_request_error", "invalid_json", NULL,
                   "The request body is not valid JSON: %s (line %d, column %d).", je.text, je.line, je.column);
        return NULL;
    }
    if (!json_is_object(j)) {
        json_decref(j);
        http_error(r, 400, "invalid_request_error", "invalid_json", NULL, "The request body must be a JSON object.");
        return NULL;
    }
    return j;
}

int http_query_int(http_req *r, const char *key, int64_t lo, int64_t hi, int64_t def, int64_t *out) {
    const char *v = http_query(r, key);
    if (!v) {
        *out = def;
        return 0;
    }
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        http_error(r, 400, "invalid_request_error", "invalid_parameter", key,
                   "Query parameter '%s' must be an integer in %lld..%lld.", key, (long long)lo, (long long)hi);
        return -1;
    }
    *out = x;
    return 0;
}

/* ---------------------------------------------------------------- long-poll waiters */

typedef struct waiter {
    http_req *r;
    struct waiter *next;
} waiter;

static pthread_mutex_t g_wait_mu = PTHREAD_MUTEX_INITIALIZER;
static waiter *g_waiters;

enum MHD_Result http_wait(http_req *r, double deadline) {
    waiter *w = ln_xmalloc(sizeof *w);
    w->r = r;
    r->deadline = deadline;
    pthread_mutex_lock(&g_wait_mu);
    w->next = g_waiters;
    g_waiters = w;
    r->waiting = 1;
    MHD_suspend_connection(r->conn);
    pthread_mutex_unlock(&g_wait_mu);
    return MHD_YES;
}

/* Resumes the waiters for which pick() says so (all when now < 0). */
static void wake(double now) {
    pthread_mutex_lock(&g_wait_mu);
    waiter **pp = &g_waiters;
    while (*pp) {
        waiter *w = *pp;
        if (now < 0 || w->r->deadline <= now) {
            *pp = w->next;
            w->r->waiting = 0;
            MHD_resume_connection(w->r->conn);
            free(w);
        } else {
            pp = &w->next;
        }
    }
    pthread_mutex_unlock(&g_wait_mu);
}

void http_wake_all(void) { wake(-1); }
void http_wake_expired(double now) { wake(now); }

/* ---------------------------------------------------------------- uploads */

static int upload_write(http_req *r, const char *data, size_t n) {
    http_upload *u = &r->up;
    if (u->too_big || u->io_error) return 0;
    if (u->bytes + n > g_cfg.max_upload_bytes) {
        u->too_big = 1;
        return 0;
    }
    if (!u->tmp_path) {
        u->tmp_path = store_tmp_path();
        u->fd = open(u->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (u->fd < 0) {
            ln_log(LN_LOG_ERROR, "http", "%s: cannot create upload file: %s", u->tmp_path, strerror(errno));
            u->io_error = 1;
            return 0;
        }
        sha256_init(&u->sha);
    }
    sha256_update(&u->sha, data, n);
    while (n > 0) {
        ssize_t w = write(u->fd, data, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            ln_log(LN_LOG_ERROR, "http", "%s: write failed: %s", u->tmp_path, strerror(errno));
            u->io_error = 1;
            return 0;
        }
        data += w;
        n -= (size_t)w;
        u->bytes += (uint64_t)w;
    }
    return 0;
}

static enum MHD_Result post_iter(void *cls, enum MHD_ValueKind kind, const char *key, const char *filename,
                                 const char *content_type, const char *transfer_encoding, const char *data,
                                 uint64_t off, size_t size) {
    http_req *r = cls;
    if (!key) return MHD_YES; /* libmicrohttpd 0.9.75 passes NULL for some malformed parts */
    if (strcmp(key, "file") == 0 && filename) {
        if (!r->up.have_file) {
            r->up.have_file = 1;
            snprintf(r->up.filename, sizeof r->up.filename, "%s", filename);
        }
        upload_write(r, data, size);
    } else if (strcmp(key, "purpose") == 0) {
        size_t cur = strlen(r->up.purpose);
        if (cur + size < sizeof r->up.purpose) {
            memcpy(r->up.purpose + cur, data, size);
            r->up.purpose[cur + size] = 0;
        }
    }
    return MHD_YES;
}

/* Finishes the temp file: fsync so the blob is durable before its row is committed. */
int http_upload_finish(http_req *r, char sha_hex[65]) {
    http_upload *u = &r->up;
    if (!u->tmp_path) {
        /* Empty upload: create an empty temp file so the blob path logic stays uniform. */
        upload_write(r, "", 0);
        if (!u->tmp_path) {
            u->tmp_path = store_tmp_path();
            u->fd = open(u->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
            sha256_init(&u->sha);
            if (u->fd < 0) return -1;
        }
    }
    if (fsync(u->fd) != 0) return -1;
    close(u->fd);
    u->fd = -1;
    uint8_t d[32];
    sha256_final(&u->sha, d);
    sha256_to_hex(d, sha_hex);
    return 0;
}

static void upload_cleanup(http_upload *u) {
    if (u->pp) MHD_destroy_post_processor(u->pp);
    if (u->fd > 0) close(u->fd);
    if (u->tmp_path) {
        if (u->blob_sha[0]) store_blob_settle(u->tmp_path, u->blob_sha); /* the row is committed (or abandoned) by now */
        else unlink(u->tmp_path);
        free(u->tmp_path);
    }
}

/* ---------------------------------------------------------------- access handler */

static void new_request_id(http_req *r) {
    const char *given = http_header(r, "X-Request-Id");
    if (given && strlen(given) < sizeof r->request_id && strlen(given) > 0) {
        int ok = 1;
        for (const char *p = given; *p; p++)
            if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
                  *p == '_' || *p == '.'))
                ok = 0;
        if (ok) {
            snprintf(r->request_id, sizeof r->request_id, "%s", given);
            return;
        }
    }
    /* Request ids need to be unique, not secret: a per-thread xorshift seeded from the kernel
     * (a getrandom call per request showed in profiles). */
    static __thread uint64_t x;
    while (!x) store_random(&x, sizeof x);
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    memcpy(r->request_id, "req_", 4);
    for (int i = 0; i < 24; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r->request_id[4 + i] = alphabet[(x >> 32) % 62];
    }
    r->request_id[28] = 0;
}

static const char *bearer(http_req *r) {
    const char *h = http_header(r, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return NULL;
    h += 7;
    while (*h == ' ') h++;
    return *h ? h : NULL;
}

/* With an internal listener, each route lives on one side: the workers' /internal/ routes there,
 * everything else on the public one, health checks on both (probes of either port). Without
 * one, every route is everywhere. A route not served on this listener answers as unknown (404). */
static int route_on_listener(const http_route_def *d, int on_internal) {
    if (!g_internal) return 1;
    if (strcmp(d->pattern, "/healthz") == 0 || strcmp(d->pattern, "/readyz") == 0) return 1;
    return (strncmp(d->pattern, "/internal/", 10) == 0) == (on_internal != 0);
}

/* Decides everything that can be decided before the body: route, auth, size limits.
 * Returns 1 when a reply was queued already. */
static int request_start(http_req *r) {
    int path_matched = 0;
    for (int i = 0; i < g_nroutes; i++) {
        char params[3][160];
        if (!route_on_listener(&g_routes[i], r->on_internal)) continue;
        if (!route_match(g_routes[i].pattern, r->path, params)) continue;
        path_matched = 1;
        if (strcmp(g_routes[i].method, r->method) != 0) continue;
        r->route = i;
        memcpy(r->params, params, sizeof params);
        break;
    }
    if (r->route < 0) {
        if (path_matched) {
            http_error(r, 405, "invalid_request_error", "method_not_allowed", NULL, "Method %s is not allowed on %s.",
                       r->method, r->path);
        } else {
            http_error(r, 404, "invalid_request_error", "unknown_url", NULL, "Unknown request URL: %s %.200s.",
                       r->method, r->path);
        }
        return 1;
    }
    http_route_def *d = &g_routes[r->route];
    if (d->auth != HTTP_AUTH_NONE) {
        const char *tok = bearer(r);
        int ok = 0;
        if (tok && d->auth == HTTP_AUTH_KEY) ok = auth_check_key(tok, r->project_id) == 0;
        if (tok && d->auth == HTTP_AUTH_WORKER) ok = auth_check_worker_token(tok, r->worker_token_id) == 0;
        if (!ok) {
            http_error(r, 401, "invalid_request_error", tok ? "invalid_api_key" : "missing_api_key", NULL,
                       tok ? "Incorrect %s provided." : "You didn't provide %s: use 'Authorization: Bearer <key>'.",
                       d->auth == HTTP_AUTH_KEY ? "an API key" : "a worker token");
            return 1;
        }
    }
    const char *cl = http_header(r, "Content-Length");
    uint64_t limit = d->body == HTTP_BODY_JSON ? g_cfg.max_body_bytes
                   : d->body == HTTP_BODY_NONE ? g_cfg.max_body_bytes
                                               : g_cfg.max_upload_bytes + 65536;
    if (cl && strtoull(cl, NULL, 10) > limit) {
        http_error(r, 413, "invalid_request_error", "request_too_large", NULL,
                   "The request body is %s bytes; the limit here is %llu bytes.", cl, (unsigned long long)limit);
        return 1;
    }
    if (d->body == HTTP_BODY_MULTIPART) {
        const char *ct = http_header(r, "Content-Type");
        if (!ct || strncasecmp(ct, "multipart/form-data", 19) != 0 ||
            !(r->up.pp = MHD_create_post_processor(r->conn, 64 * 1024, post_iter, r))) {
            http_error(r, 400, "invalid_request_error", "invalid_content_type", NULL,
                       "This endpoint takes multipart/form-data with a 'file' and a 'purpose' field.");
            return 1;
        }
    }
    return 0;
}

static void request_body(http_req *r, const char *data, size_t n) {
    http_route_def *d = &g_routes[r->route];
    switch (d->body) {
    case HTTP_BODY_MULTIPART:
        /* After a parse failure the post processor is not fed again. */
        if (!r->up.io_error && MHD_post_process(r->up.pp, data, n) != MHD_YES) r->up.io_error = 2;
        break;
    case HTTP_BODY_RAW:
        upload_write(r, data, n);
        break;
    default:
        if (r->body_too_big) return;
        if (r->body_len + n > g_cfg.max_body_bytes) {
            r->body_too_big = 1;
            return;
        }
        if (r->body_len + n + 1 > r->body_cap) {
            r->body_cap = (r->body_len + n + 1) * 2;
            r->body = ln_xrealloc(r->body, r->body_cap);
        }
        memcpy(r->body + r->body_len, data, n);
        r->body_len += n;
        r->body[r->body_len] = 0;
    }
}

static enum MHD_Result access_cb(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                 const char *version, const char *upload_data, size_t *upload_size, void **con_cls) {
    http_req *r = *con_cls;
    if (!r) {
        r = ln_xcalloc(1, sizeof *r);
        *con_cls = r;
        r->conn = conn;
        r->on_internal = cls == &g_internal_cls;
        r->route = -1;
        r->up.fd = -1;
        r->t0 = ln_now_s();
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->path, sizeof r->path, "%s", url);
        new_request_id(r);
        atomic_fetch_add(&g_active, 1);
        if (strlen(url) >= sizeof r->path) {
            return http_error(r, 414, "invalid_request_error", "uri_too_long", NULL, "The request URL is too long.");
        }
        if (request_start(r)) return r->result;
        return MHD_YES;
    }
    if (r->replied) {
        /* Reply queued early (413, 401...): drop whatever body is still arriving. */
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size > 0) {
        request_body(r, upload_data, *upload_size);
        *upload_size = 0;
        return MHD_YES;
    }
    http_route_def *d = &g_routes[r->route];
    if (r->body_too_big || r->up.too_big)
        return http_error(r, 413, "invalid_request_error", "request_too_large", NULL,
                          "The request body is larger than the limit of %llu bytes.",
                          (unsigned long long)(r->body_too_big ? g_cfg.max_body_bytes : g_cfg.max_upload_bytes));
    if (r->up.io_error == 2)
        return http_error(r, 400, "invalid_request_error", "invalid_multipart", NULL,
                          "The multipart/form-data body could not be parsed.");
    if (r->up.io_error)
        return http_error(r, 500, "server_error", "storage_error", NULL, "The upload could not be stored.");
    /* A read-only request runs its queries in one read transaction: one snapshot, and one set of
     * WAL lock operations instead of one per statement. */
    int read_txn = 0;
    if (strcmp(r->method, "GET") == 0 && d->auth != HTTP_AUTH_NONE) {
        sqlite3_stmt *b = store_stmt("BEGIN");
        read_txn = sqlite3_step(b) == SQLITE_DONE;
        sqlite3_reset(b);
    }
    enum MHD_Result res = d->fn(r);
    if (read_txn && !sqlite3_get_autocommit(store_db())) {
        sqlite3_stmt *c = store_stmt("COMMIT");
        sqlite3_step(c);
        sqlite3_reset(c);
    }
    return res;
}

static void completed_cb(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe) {
    http_req *r = *con_cls;
    if (!r) return;
    *con_cls = NULL;
    double dt = ln_now_s() - r->t0;
    http_route_def *d = r->route >= 0 ? &g_routes[r->route] : &g_unrouted;
    int cls_i = r->status >= 100 && r->status < 600 ? r->status / 100 : 0;
    atomic_fetch_add(&d->by_class[cls_i], 1);
    int b = 0;
    while (b < N_BUCKETS && dt > bucket_le[b]) b++;
    atomic_fetch_add(&d->buckets[b], 1);
    atomic_fetch_add(&d->latency_us_sum, (unsigned long)(dt * 1e6));
    if (g_cfg.log_requests || r->status >= 500) {
        char kv[700];
        snprintf(kv, sizeof kv,
                 "\"request_id\":\"%s\",\"method\":\"%s\",\"route\":\"%s\",\"status\":%d,\"duration_ms\":%.3f%s%s%s",
                 r->request_id, r->method, d->pattern ? d->pattern : "-", r->status, dt * 1e3,
                 r->project_id[0] ? ",\"project\":\"" : "", r->project_id, r->project_id[0] ? "\"" : "");
        ln_log_kv(r->status >= 500 ? LN_LOG_ERROR : LN_LOG_INFO, "http", kv, "%s request done", r->method);
    }
    if (r->ctx_free) r->ctx_free(r->ctx);
    upload_cleanup(&r->up);
    free(r->body);
    free(r);
    atomic_fetch_sub(&g_active, 1);
}

/* ---------------------------------------------------------------- daemon */

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) msg[--n] = 0;
    ln_log(LN_LOG_DEBUG, "mhd", "%s", msg);
}

static struct MHD_Daemon *start_daemon(const char *flag, const char *host, int port, int threads, void *cls,
                                       int *bound, ln_err *e) {
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int gai = getaddrinfo(host[0] ? host : NULL, ps, &hints, &ai);
    if (gai != 0) {
        ln_errf(e, "%s %s:%d: cannot resolve host: %s", flag, host, port, gai_strerror(gai));
        return NULL;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d =
        MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, access_cb, cls, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                                MHD_OPTION_THREAD_POOL_SIZE, (unsigned)threads, MHD_OPTION_CONNECTION_LIMIT,
                                (unsigned)16000, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)300,
                                MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)4096,
                                /* MHD clears a connection's pool at every request; 16 KiB (default 32)
                                 * holds our headers and halves that cost. */
                                MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(16 * 1024), MHD_OPTION_NOTIFY_COMPLETED,
                                completed_cb, NULL, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!d) {
        ln_errf(e, "%s %s:%d: cannot start the HTTP server (port in use?)", flag, host, port);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    *bound = info ? (int)info->port : port;
    return d;
}

int http_start(const char *host, int port, int threads, ln_err *e) {
    int bound;
    g_daemon = start_daemon("--listen", host, port, threads, NULL, &bound, e);
    return g_daemon ? bound : -1;
}

int http_start_internal(const char *host, int port, int threads, ln_err *e) {
    int bound;
    g_internal = start_daemon("--internal-listen", host, port, threads, &g_internal_cls, &bound, e);
    return g_internal ? bound : -1;
}

int http_stopping(void) { return atomic_load(&g_stopping); }

void http_begin_stop(void) {
    atomic_store(&g_stopping, 1);
    if (g_daemon) MHD_quiesce_daemon(g_daemon);
    if (g_internal) MHD_quiesce_daemon(g_internal);
}

void http_stop(void (*wake_others)(void)) {
    if (!g_daemon) return;
    http_begin_stop();
    /* MHD must not stop with suspended connections: wake every long-poll and stream (they see
     * http_stopping() and finish) until no request is in progress, for at most 5 s. */
    double until = ln_now_s() + 5.0;
    while (atomic_load(&g_active) > 0 && ln_now_s() < until) {
        http_wake_all();
        if (wake_others) wake_others();
        usleep(20 * 1000);
    }
    if (atomic_load(&g_active) > 0)
        ln_log(LN_LOG_WARN, "http", "stopping with %d request(s) still in progress", atomic_load(&g_active));
    MHD_stop_daemon(g_daemon);
    g_daemon = NULL;
    if (g_internal) MHD_stop_daemon(g_internal);
    /* g_internal stays set: route_on_listener may still be asked by a straggler. */
}

int http_active_connections(void) { return atomic_load(&g_active); }

/* ---------------------------------------------------------------- metrics */

void http_buf_printf(char **buf, size_t *len, size_t *cap, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(*buf + *len, *cap - *len, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < *cap - *len) {
            *len += (size_t)n;
            return;
        }
        *cap = *cap * 2 + (size_t)(n > 0 ? n : 256);
        *buf = ln_xrealloc(*buf, *cap);
    }
}

static void render_counts(char **b, size_t *l, size_t *c, http_route_def *d, const char *name) {
    static const char *classes[6] = {"other", "1xx", "2xx", "3xx", "4xx", "5xx"};
    for (int k = 0; k < 6; k++) {
        unsigned long v = atomic_load(&d->by_class[k]);
        if (v) http_buf_printf(b, l, c, "loranull_http_requests_total{route=\"%s\",code=\"%s\"} %lu\n", name, classes[k], v);
    }
}

static void render_hist(char **b, size_t *l, size_t *c, http_route_def *d, const char *name) {
    unsigned long cum = 0;
    for (int k = 0; k <= N_BUCKETS; k++) {
        cum += atomic_load(&d->buckets[k]);
        if (k < N_BUCKETS)
            http_buf_printf(b, l, c, "loranull_http_request_duration_seconds_bucket{route=\"%s\",le=\"%g\"} %lu\n", name,
                            bucket_le[k], cum);
        else
            http_buf_printf(b, l, c, "loranull_http_request_duration_seconds_bucket{route=\"%s\",le=\"+Inf\"} %lu\n",
                            name, cum);
    }
    http_buf_printf(b, l, c, "loranull_http_request_duration_seconds_sum{route=\"%s\"} %.6f\n", name,
                    (double)atomic_load(&d->latency_us_sum) * 1e-6);
    http_buf_printf(b, l, c, "loranull_http_request_duration_seconds_count{route=\"%s\"} %lu\n", name, cum);
}

void http_metrics_render(char **b, size_t *l, size_t *c) {
    http_buf_printf(b, l, c, "# HELP loranull_http_requests_total HTTP requests by route and status class.\n"
                             "# TYPE loranull_http_requests_total counter\n");
    for (int i = 0; i < g_nroutes; i++) render_counts(b, l, c, &g_routes[i], g_routes[i].metric);
    render_counts(b, l, c, &g_unrouted, "unrouted");
    http_buf_printf(b, l, c, "# HELP loranull_http_request_duration_seconds Time from request start to completion.\n"
                             "# TYPE loranull_http_request_duration_seconds histogram\n");
    for (int i = 0; i < g_nroutes; i++) render_hist(b, l, c, &g_routes[i], g_routes[i].metric);
    render_hist(b, l, c, &g_unrouted, "unrouted");
    http_buf_printf(b, l, c, "# HELP loranull_http_active_requests Requests in progress (including SSE streams).\n"
                             "# TYPE loranull_http_active_requests gauge\nloranull_http_active_requests %d\n",
                    atomic_load(&g_active));
}
