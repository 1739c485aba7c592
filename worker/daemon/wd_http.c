/* wd_http.c — libcurl multi on libuv (see wd_http.h). */
#include "worker/daemon/wd_http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <curl/curl.h>

#include "common/util.h"

/* ---------------------------------------------------------------- types */

typedef struct wd_req {
    wd_http *h;
    CURL *easy;
    struct curl_slist *headers;
    char *send;                 /* JSON body (owned) */
    FILE *up;                   /* upload source (owned) */
    FILE *down;                 /* download sink: dest.part (owned) */
    char *dest, *part;          /* download paths (owned) */
    char *buf;                  /* response body (owned) */
    size_t len, cap;
    wd_http_cb cb;
    void *ctx;
    double t0;
    char errbuf[CURL_ERROR_SIZE];
    struct wd_req *prev, *next; /* h->reqs */
} wd_req;

/* One per socket curl asks us to watch; closed when curl says CURL_POLL_REMOVE. */
typedef struct wd_sock {
    uv_poll_t poll;
    curl_socket_t fd;
    wd_http *h;
} wd_sock;

struct wd_http {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    char *base;
    char *auth;                 /* "Authorization: Bearer …" */
    wd_req *reqs;
    int n;
    int closing;
};

/* ---------------------------------------------------------------- requests */

static void req_unlink(wd_req *r) {
    wd_http *h = r->h;
    if (r->prev) r->prev->next = r->next;
    else h->reqs = r->next;
    if (r->next) r->next->prev = r->prev;
    h->n--;
}

/* Frees a request that is no longer attached to the multi handle. */
static void req_free(wd_req *r) {
    if (r->easy) curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->headers);
    if (r->up) fclose(r->up);
    if (r->down) fclose(r->down);
    if (r->part) unlink(r->part);
    free(r->send);
    free(r->dest);
    free(r->part);
    free(r->buf);
    free(r);
}

static void buf_append(wd_req *r, const char *p, size_t n) {
    if (r->len + n + 1 > r->cap) {
        r->cap = (r->len + n + 1) * 2;
        r->buf = ln_xrealloc(r->buf, r->cap);
    }
    memcpy(r->buf + r->len, p, n);
    r->len += n;
    r->buf[r->len] = 0;
}

static size_t on_write(char *p, size_t size, size_t nmemb, void *ud) {
    wd_req *r = ud;
    size_t n = size * nmemb;
    if (r->down) return fwrite(p, 1, n, r->down);
    /* Bodies the daemon reads are small JSON objects; refuse to buffer an absurd one. */
    if (r->len + n > (64u << 20)) return 0;
    buf_append(r, p, n);
    return n;
}

/* Called when curl reports the transfer done: builds the response and calls back. */
static void req_finish(wd_req *r, CURLcode code) {
    wd_http *h = r->h;
    long status = 0;
    if (code == CURLE_OK) curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_multi_remove_handle(h->multi, r->easy);
    req_unlink(r);
    if (r->down) {
        fclose(r->down);
        r->down = NULL;
        if (status == 200) {
            if (rename(r->part, r->dest) != 0) {
                status = 0;
                snprintf(r->errbuf, sizeof r->errbuf, "cannot rename %s to %s", r->part, r->dest);
            } else {
                free(r->part);
                r->part = NULL;
            }
        } else if (r->part) {
            /* Not the file: the body is an error object; read it back for the message. */
            char *txt = NULL;
            size_t n = 0;
            if (ln_read_file(r->part, &txt, &n, NULL) == 0 && n < (1u << 20)) buf_append(r, txt, n);
            free(txt);
        }
    }
    if (code != CURLE_OK && !r->errbuf[0]) snprintf(r->errbuf, sizeof r->errbuf, "%s", curl_easy_strerror(code));
    wd_resp resp = {.status = status, .body = r->buf ? r->buf : "", .len = r->len,
                    .error = status ? "" : r->errbuf, .elapsed_s = ln_now_s() - r->t0};
    wd_http_cb cb = r->cb;
    void *ctx = r->ctx;
    /* The callback may start new requests or even free h; call it last, with r already gone. */
    char *body = r->buf;
    r->buf = NULL;
    char err[CURL_ERROR_SIZE];
    snprintf(err, sizeof err, "%s", resp.error);
    resp.error = err;
    resp.body = body ? body : "";
    req_free(r);
    cb(&resp, ctx);
    free(body);
}

static void check_done(wd_http *h) {
    CURLMsg *m;
    int left;
    while (!h->closing && (m = curl_multi_info_read(h->multi, &left))) {
        if (m->msg != CURLMSG_DONE) continue;
        wd_req *r = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        req_finish(r, m->data.result);
    }
}

/* ---------------------------------------------------------------- curl ↔ libuv glue */

static void on_poll(uv_poll_t *p, int status, int events) {
    wd_sock *s = p->data;
    wd_http *h = s->h;
    int flags = 0, running;
    if (status < 0) flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
    curl_multi_socket_action(h->multi, s->fd, flags, &running);
    check_done(h);
}

static void on_sock_closed(uv_handle_t *hd) { free(hd->data); }

static int on_socket(CURL *easy, curl_socket_t fd, int action, void *userp, void *socketp) {
    wd_http *h = userp;
    wd_sock *s = socketp;
    if (action == CURL_POLL_REMOVE) {
        if (s) {
            uv_poll_stop(&s->poll);
            uv_close((uv_handle_t *)&s->poll, on_sock_closed);
            curl_multi_assign(h->multi, fd, NULL);
        }
        return 0;
    }
    if (!s) {
        s = ln_xcalloc(1, sizeof *s);
        s->fd = fd;
        s->h = h;
        s->poll.data = s;
        if (uv_poll_init_socket(h->loop, &s->poll, fd) != 0) {
            free(s);
            return -1;
        }
        curl_multi_assign(h->multi, fd, s);
    }
    int ev = 0;
    if (action == CURL_POLL_IN || action == CURL_POLL_INOUT) ev |= UV_READABLE;
    if (action == CURL_POLL_OUT || action == CURL_POLL_INOUT) ev |= UV_WRITABLE;
    uv_poll_start(&s->poll, ev, on_poll);
    return 0;
}

static void on_timeout(uv_timer_t *t) {
    wd_http *h = t->data;
    int running;
    curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(h);
}

/* curl asks for a timeout: −1 = none; 0 = as soon as possible (next loop turn, never from here). */
static int on_timer(CURLM *multi, long ms, void *userp) {
    wd_http *h = userp;
    if (ms < 0) uv_timer_stop(&h->timer);
    else uv_timer_start(&h->timer, on_timeout, (uint64_t)ms, 0);
    return 0;
}

/* ---------------------------------------------------------------- API */

wd_http *wd_http_new(uv_loop_t *loop, const char *base_url, const char *token, ln_err *e) {
    static int global_done;
    if (!global_done) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
            ln_errf(e, "libcurl could not be initialised");
            return NULL;
        }
        global_done = 1;
    }
    if (strncmp(base_url, "http://", 7) && strncmp(base_url, "https://", 8)) {
        ln_errf(e, "--server '%s': expected a URL starting with http:// or https://", base_url);
        return NULL;
    }
    wd_http *h = ln_xcalloc(1, sizeof *h);
    h->loop = loop;
    h->multi = curl_multi_init();
    h->base = ln_xstrdup(base_url);
    size_t bl = strlen(h->base);
    while (bl > 0 && h->base[bl - 1] == '/') h->base[--bl] = 0;
    size_t n = strlen(token) + 32;
    h->auth = ln_xmalloc(n);
    snprintf(h->auth, n, "Authorization: Bearer %s", token);
    uv_timer_init(loop, &h->timer);
    h->timer.data = h;
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
    return h;
}

static void on_timer_closed(uv_handle_t *hd) {
    wd_http *h = hd->data;
    free(h->base);
    free(h->auth);
    free(h);
}

void wd_http_free(wd_http *h) {
    if (!h) return;
    h->closing = 1;
    while (h->reqs) {
        wd_req *r = h->reqs;
        curl_multi_remove_handle(h->multi, r->easy);
        req_unlink(r);
        req_free(r);
    }
    curl_multi_cleanup(h->multi); /* removes its sockets through on_socket */
    uv_timer_stop(&h->timer);
    uv_close((uv_handle_t *)&h->timer, on_timer_closed);
}

int wd_http_pending(const wd_http *h) { return h->n; }

void wd_http_abort_ctx(wd_http *h, void *ctx) {
    for (wd_req *r = h->reqs, *next; r; r = next) {
        next = r->next;
        if (r->ctx != ctx) continue;
        curl_multi_remove_handle(h->multi, r->easy);
        req_unlink(r);
        req_free(r);
    }
}

static wd_req *req_new(wd_http *h, const char *path, double timeout_s, wd_http_cb cb, void *ctx) {
    wd_req *r = ln_xcalloc(1, sizeof *r);
    r->h = h;
    r->cb = cb;
    r->ctx = ctx;
    r->t0 = ln_now_s();
    r->easy = curl_easy_init();
    size_t n = strlen(h->base) + strlen(path) + 1;
    char *url = ln_xmalloc(n);
    snprintf(url, n, "%s%s", h->base, path);
    curl_easy_setopt(r->easy, CURLOPT_URL, url); /* curl copies it */
    free(url);
    r->headers = curl_slist_append(r->headers, h->auth);
    r->headers = curl_slist_append(r->headers, "Expect:"); /* no 100-continue round trip on uploads */
    curl_easy_setopt(r->easy, CURLOPT_PRIVATE, r);
    curl_easy_setopt(r->easy, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(r->easy, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(r->easy, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(r->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(r->easy, CURLOPT_TIMEOUT_MS, (long)(timeout_s * 1000));
    curl_easy_setopt(r->easy, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
    curl_easy_setopt(r->easy, CURLOPT_USERAGENT, "loranull-worker");
    return r;
}

static int req_start(wd_http *h, wd_req *r) {
    curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->headers);
    if (curl_multi_add_handle(h->multi, r->easy) != CURLM_OK) {
        req_free(r);
        return -1;
    }
    r->next = h->reqs;
    if (h->reqs) h->reqs->prev = r;
    h->reqs = r;
    h->n++;
    return 0;
}

int wd_http_json(wd_http *h, const char *method, const char *path, json_t *body, double timeout_s, wd_http_cb cb,
                 void *ctx) {
    wd_req *r = req_new(h, path, timeout_s, cb, ctx);
    if (body) {
        r->send = json_dumps(body, JSON_COMPACT);
        json_decref(body);
        r->headers = curl_slist_append(r->headers, "Content-Type: application/json");
        curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, r->send);
        curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(r->send));
    }
    if (strcmp(method, "GET") == 0) curl_easy_setopt(r->easy, CURLOPT_HTTPGET, 1L);
    else if (!body) {
        curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)0);
    }
    if (strcmp(method, "GET") && strcmp(method, "POST")) curl_easy_setopt(r->easy, CURLOPT_CUSTOMREQUEST, method);
    return req_start(h, r);
}

int wd_http_download(wd_http *h, const char *path, const char *dest, double timeout_s, wd_http_cb cb, void *ctx) {
    wd_req *r = req_new(h, path, timeout_s, cb, ctx);
    r->dest = ln_xstrdup(dest);
    size_t n = strlen(dest) + 8;
    r->part = ln_xmalloc(n);
    snprintf(r->part, n, "%s.part", dest);
    r->down = fopen(r->part, "wb");
    if (!r->down) {
        free(r->part);
        r->part = NULL;
        req_free(r);
        return -1;
    }
    curl_easy_setopt(r->easy, CURLOPT_HTTPGET, 1L);
    return req_start(h, r);
}

int wd_http_upload(wd_http *h, const char *path, const char *src, double timeout_s, wd_http_cb cb, void *ctx) {
    struct stat st;
    if (stat(src, &st) != 0) return -1;
    wd_req *r = req_new(h, path, timeout_s, cb, ctx);
    r->up = fopen(src, "rb");
    if (!r->up) {
        req_free(r);
        return -1;
    }
    r->headers = curl_slist_append(r->headers, "Content-Type: application/octet-stream");
    curl_easy_setopt(r->easy, CURLOPT_POST, 1L);
    curl_easy_setopt(r->easy, CURLOPT_READDATA, r->up); /* curl's default read function fread()s it */
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)st.st_size);
    return req_start(h, r);
}

/* ---------------------------------------------------------------- responses */

void wd_resp_message(const wd_resp *r, char *out, size_t n) {
    if (r->status == 0) {
        snprintf(out, n, "the server could not be reached (%s)", r->error[0] ? r->error : "no response");
        return;
    }
    json_t *j = json_loads(r->body, 0, NULL);
    const char *msg = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    if (msg) snprintf(out, n, "HTTP %ld: %s", r->status, msg);
    else snprintf(out, n, "HTTP %ld: %.200s", r->status, r->body);
    json_decref(j);
}

void wd_resp_code(const wd_resp *r, char *out, size_t n) {
    out[0] = 0;
    json_t *j = json_loads(r->body, 0, NULL);
    const char *c = json_string_value(json_object_get(json_object_get(j, "error"), "code"));
    if (c) snprintf(out, n, "%s", c);
    json_decref(j);
}
