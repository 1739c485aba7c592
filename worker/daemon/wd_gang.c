/* wd_gang.c — rendezvous of a gang spread over workers (see wd_gang.h). */
#include "worker/daemon/wd_gang.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"

#define RETRY_S 1.0        /* after a network error or a 5xx */
#define POLL_MAX_S 20.0    /* one long-poll for the address */
#define LINK_MIN_S 5.0     /* accept/connect get at least this, even late in the rendezvous */

/* NCCL is in the CUDA build only: weak references, NULL in the CPU build (see select.h). */
#pragma weak comm_nccl_unique_id
#pragma weak comm_nccl_join

int wd_gang_nccl_linked(void) { return comm_nccl_unique_id && comm_nccl_join; }

struct wd_gang {
    uv_loop_t *loop;
    wd_http *http;
    char job_id[64];
    long long gen;
    int rank, world;
    char host[256];
    int port_lo, port_hi;
    double timeout_s, deadline;
    int nccl_device;               /* ≥ 0: NCCL on this device; −1: TCP */
    unsigned char nid[COMM_NCCL_ID_BYTES]; /* the NCCL unique id (rank 0 makes it) */
    wd_gang_cb cb;
    void *ctx;

    comm_tcp_listener *l;          /* rank 0 */
    char token[COMM_TCP_TOKEN_LEN + 1];
    char addr[COMM_TCP_ADDR_MAX];  /* rank 0's, as published */
    uv_timer_t timer;              /* retries, and delivering an early failure from the loop */
    int http_busy;
    uv_work_t work;                /* accept / connect */
    int work_busy;
    atomic_int stop;               /* cancelled: the work item gives up within ~100 ms */
    int cancelled, closing;
    int link_rc;
    ln_err link_err;
    ln_comm *comm;
    char fail_msg[1200];           /* an early failure waiting for the timer */
    wd_gang_result fail_res;
};

static void on_timer(uv_timer_t *t);

static void on_closed(uv_handle_t *h) {
    wd_gang *g = h->data;
    comm_tcp_listener_free(g->l);
    /* Only when cancelled (otherwise handed over: NULL here). Aborted first: freeing must not wait
     * for peers that may never come. */
    if (g->comm) comm_abort(g->comm);
    comm_free(g->comm);
    free(g);
}

/* Frees the gang once no work item and no request refers to it any more. */
static void gang_close(wd_gang *g) {
    if (g->closing || g->work_busy) return;
    g->closing = 1;
    if (g->http_busy && g->http) wd_http_abort_ctx(g->http, g);
    uv_timer_stop(&g->timer);
    uv_close((uv_handle_t *)&g->timer, on_closed);
}

static void finish(wd_gang *g, wd_gang_result res, const wd_resp *r, const char *msg) {
    ln_comm *c = g->comm;
    g->comm = NULL;
    if (res != WD_GANG_OK) {
        comm_free(c);
        c = NULL;
    }
    g->cb(g->ctx, res, c, r, msg);
    gang_close(g);
}

/* Fails from the loop, later (the contract: never from wd_gang_start itself). */
static void fail_later(wd_gang *g, wd_gang_result res, const char *msg) {
    g->fail_res = res;
    snprintf(g->fail_msg, sizeof g->fail_msg, "%s", msg);
    uv_timer_start(&g->timer, on_timer, 0, 0);
}

/* ---------------------------------------------------------------- base64 (the NCCL id in JSON) */

#define B64_LEN(n) (((n) + 2) / 3 * 4 + 1)
static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void b64_encode(const unsigned char *in, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)in[i] << 16 | (i + 1 < n ? (unsigned)in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = B64[v >> 18 & 63];
        out[o++] = B64[v >> 12 & 63];
        out[o++] = i + 1 < n ? B64[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? B64[v & 63] : '=';
    }
    out[o] = 0;
}

/* Exactly n bytes from standard base64 (padded), else −1. */
static int b64_decode(const char *in, unsigned char *out, size_t n) {
    size_t len = strlen(in), o = 0;
    if (len != B64_LEN(n) - 1) return -1;
    for (size_t i = 0; i < len; i += 4) {
        unsigned v = 0;
        for (int k = 0; k < 4; k++) {
            const char *p = in[i + k] == '=' ? NULL : strchr(B64, in[i + k]);
            if (!p && (in[i + k] != '=' || i + 4 < len || k < 2)) return -1;
            v = v << 6 | (p ? (unsigned)(p - B64) : 0);
        }
        unsigned char b[3] = {(unsigned char)(v >> 16), (unsigned char)(v >> 8), (unsigned char)v};
        for (int k = 0; k < 3 && o < n; k++) out[o++] = b[k];
    }
    return 0;
}

/* ---------------------------------------------------------------- the link (work item) */

static void link_work(uv_work_t *w) {
    wd_gang *g = w->data;
    double left = g->deadline - ln_now_s();
    if (left < LINK_MIN_S) left = LINK_MIN_S;
    if (g->nccl_device >= 0)
        g->link_rc = comm_nccl_join(g->rank, g->world, g->nid, g->nccl_device, left, &g->stop, &g->comm, &g->link_err);
    else g->link_rc = g->rank == 0
                     ? comm_tcp_accept(g->l, g->world, g->token, left, &g->stop, &g->comm, &g->link_err)
                     : comm_tcp_connect(g->addr, g->rank, g->world, g->token, left, &g->stop, &g->comm, &g->link_err);
}

static void link_done(uv_work_t *w, int status) {
    wd_gang *g = w->data;
    g->work_busy = 0;
    if (g->cancelled) {
        gang_close(g);
        return;
    }
    if (status != 0 || g->link_rc != 0) {
        char msg[1400];
        snprintf(msg, sizeof msg, "rank %d of %d could not join the gang: %s%s", g->rank, g->world,
                 status ? uv_strerror(status) : g->link_err.msg,
                 g->rank != 0 && strstr(g->link_err.msg, "cannot reach")
                     ? " (rank 0's worker publishes its --advertise-host: it must be reachable from this worker, "
                       "within its --comm-ports)"
                     : "");
        finish(g, WD_GANG_FAILED, NULL, msg);
        return;
    }
    if (g->nccl_device >= 0)
        ln_log(LN_LOG_INFO, "worker", "job %s: rank %d of %d joined the gang over NCCL on CUDA device %d", g->job_id,
               g->rank, g->world, g->nccl_device);
    else
        ln_log(LN_LOG_INFO, "worker", "job %s: rank %d of %d joined the gang (rank 0 at %s)", g->job_id, g->rank,
               g->world, g->addr);
    finish(g, WD_GANG_OK, NULL, NULL);
}

static void start_link(wd_gang *g) {
    g->work.data = g;
    if (uv_queue_work(g->loop, &g->work, link_work, link_done) != 0) {
        fail_later(g, WD_GANG_FAILED, "the worker could not start the gang's connection thread");
        return;
    }
    g->work_busy = 1;
}

/* ---------------------------------------------------------------- the rendezvous calls */

static void send_call(wd_gang *g);

/* A response that is not the answer: the lease is gone (409, 404 but not_ready), or retry. */
static int handle_other(wd_gang *g, const wd_resp *r, const char *what) {
    char msg[1024];
    wd_resp_message(r, msg, sizeof msg);
    if (r->status == 409 || r->status == 404) {
        finish(g, WD_GANG_REFUSED, r, msg);
        return 1;
    }
    if (r->status >= 400 && r->status < 500 && r->status != 429) {
        char m[1200];
        snprintf(m, sizeof m, "the server refused the rendezvous %s: %s", what, msg);
        finish(g, WD_GANG_FAILED, NULL, m);
        return 1;
    }
    if (ln_now_s() >= g->deadline) {
        char m[1200];
        snprintf(m, sizeof m, "the rendezvous %s kept failing until the %.0f s limit: %s", what, g->timeout_s, msg);
        finish(g, WD_GANG_FAILED, NULL, m);
        return 1;
    }
    ln_log(LN_LOG_WARN, "worker", "job %s: rendezvous %s failed (%s); retrying", g->job_id, what, msg);
    uv_timer_start(&g->timer, on_timer, (uint64_t)(RETRY_S * 1000), 0);
    return 0;
}

static void on_put(const wd_resp *r, void *ctx) {
    wd_gang *g = ctx;
    g->http_busy = 0;
    if (r->status == 200) start_link(g);
    else handle_other(g, r, "publish");
}

static void on_get(const wd_resp *r, void *ctx) {
    wd_gang *g = ctx;
    g->http_busy = 0;
    if (r->status == 200) {
        json_t *b = json_loads(r->body, 0, NULL);
        const char *text = json_string_value(json_object_get(b, "value"));
        json_t *v = text ? json_loads(text, 0, NULL) : NULL;
        if (g->nccl_device >= 0) {
            const char *id = json_string_value(json_object_get(v, "id"));
            int world = (int)json_integer_value(json_object_get(v, "world_size"));
            int ok = id && world == g->world && b64_decode(id, g->nid, sizeof g->nid) == 0;
            json_decref(v);
            json_decref(b);
            if (ok) start_link(g);
            else finish(g, WD_GANG_FAILED, NULL, "rank 0's rendezvous value is not {\"id\": base64 of a 128-byte NCCL "
                                                 "unique id, \"world_size\"} of this gang");
            return;
        }
        const char *addr = json_string_value(json_object_get(v, "addr")), *tok = json_string_value(json_object_get(v, "token"));
        int world = (int)json_integer_value(json_object_get(v, "world_size"));
        int ok = addr && tok && strlen(addr) < sizeof g->addr && strlen(tok) <= COMM_TCP_TOKEN_LEN && world == g->world;
        if (ok) {
            snprintf(g->addr, sizeof g->addr, "%s", addr);
            snprintf(g->token, sizeof g->token, "%s", tok);
        }
        json_decref(v);
        json_decref(b);
        if (ok) start_link(g);
        else finish(g, WD_GANG_FAILED, NULL, "rank 0's rendezvous value is not {\"addr\", \"token\", \"world_size\"} of this gang");
        return;
    }
    char code[64];
    wd_resp_code(r, code, sizeof code);
    if (r->status == 404 && strcmp(code, "not_ready") == 0) {
        if (ln_now_s() < g->deadline) {
            send_call(g); /* rank 0 has not published yet: ask again */
            return;
        }
        char m[200];
        snprintf(m, sizeof m, "rank 0 did not publish its %s within %.0f s (its worker may have stopped%s)",
                 g->nccl_device >= 0 ? "NCCL unique id" : "address", g->timeout_s,
                 g->nccl_device >= 0 ? ", or be a CPU worker: a gang of GPU and CPU workers cannot meet" : "");
        finish(g, WD_GANG_FAILED, NULL, m);
        return;
    }
    handle_other(g, r, "lookup");
}

static void send_call(wd_gang *g) {
    char path[256];
    int rc;
    const char *key = g->nccl_device >= 0 ? WD_GANG_KEY_NCCL : WD_GANG_KEY;
    if (g->rank == 0) {
        snprintf(path, sizeof path, "/internal/v1/jobs/%s/rendezvous/%s", g->job_id, key);
        json_t *v;
        if (g->nccl_device >= 0) {
            char id[B64_LEN(COMM_NCCL_ID_BYTES)];
            b64_encode(g->nid, sizeof g->nid, id);
            v = json_pack("{s:s, s:i}", "id", id, "world_size", g->world);
        } else {
            v = json_pack("{s:s, s:s, s:i}", "addr", g->addr, "token", g->token, "world_size", g->world);
        }
        char *text = json_dumps(v, JSON_COMPACT);
        json_decref(v);
        rc = wd_http_json(g->http, "PUT", path, json_pack("{s:I, s:s}", "lease_generation", (json_int_t)g->gen, "value", text),
                          30.0, on_put, g);
        free(text);
    } else {
        double left = g->deadline - ln_now_s();
        int wait = (int)(left < POLL_MAX_S ? (left > 1 ? left : 1) : POLL_MAX_S);
        snprintf(path, sizeof path, "/internal/v1/jobs/%s/rendezvous/%s?lease_generation=%lld&wait_s=%d", g->job_id,
                 key, g->gen, wait);
        rc = wd_http_json(g->http, "GET", path, NULL, wait + 15.0, on_get, g);
    }
    if (rc == 0) g->http_busy = 1;
    else fail_later(g, WD_GANG_FAILED, "the worker could not send the rendezvous request");
}

static void on_timer(uv_timer_t *t) {
    wd_gang *g = t->data;
    if (g->fail_msg[0]) finish(g, g->fail_res, NULL, g->fail_msg);
    else send_call(g);
}

/* ---------------------------------------------------------------- API */

wd_gang *wd_gang_start(uv_loop_t *loop, wd_http *http, const wd_gang_opts *o, wd_gang_cb cb, void *ctx) {
    wd_gang *g = ln_xcalloc(1, sizeof *g);
    g->loop = loop;
    g->http = http;
    snprintf(g->job_id, sizeof g->job_id, "%s", o->job_id);
    g->gen = o->gen;
    g->rank = o->rank;
    g->world = o->world;
    snprintf(g->host, sizeof g->host, "%s", o->host ? o->host : "127.0.0.1");
    g->port_lo = o->port_lo;
    g->port_hi = o->port_hi;
    g->timeout_s = o->timeout_s;
    g->deadline = ln_now_s() + o->timeout_s;
    g->cb = cb;
    g->ctx = ctx;
    atomic_init(&g->stop, 0);
    uv_timer_init(loop, &g->timer);
    g->timer.data = g;
    g->nccl_device = o->nccl_device;
    if (g->nccl_device >= 0) {
        ln_err e = {{0}};
        if (!wd_gang_nccl_linked()) {
            fail_later(g, WD_GANG_UNSUPPORTED, "this build of loranull-worker has no NCCL, so a GPU worker cannot join a "
                                               "gang split over workers (make cuda-bin builds one that has: "
                                               "build/cuda/bin/loranull-worker)");
            return g;
        }
        if (g->rank == 0 && comm_nccl_unique_id(g->nid, &e) != 0) {
            char msg[sizeof g->fail_msg];
            snprintf(msg, sizeof msg, "rank 0 cannot make the gang's NCCL id: %s", e.msg);
            fail_later(g, WD_GANG_FAILED, msg);
            return g;
        }
        send_call(g);
        return g;
    }
    if (g->rank == 0) {
        ln_err e = {{0}};
        if (comm_tcp_listen(g->host, g->port_lo, g->port_hi, &g->l, &e) != 0 || comm_tcp_token_new(g->token, &e) != 0) {
            char msg[sizeof g->fail_msg];
            snprintf(msg, sizeof msg, "rank 0 cannot open the gang's listener (--advertise-host, --comm-ports): %s", e.msg);
            fail_later(g, WD_GANG_FAILED, msg);
            return g;
        }
        /* Published as the advertise host (what the others can reach), with the port bound. */
        snprintf(g->addr, sizeof g->addr, strchr(g->host, ':') ? "[%s]:%d" : "%s:%d", g->host,
                 comm_tcp_listener_port(g->l));
        ln_log(LN_LOG_INFO, "worker", "job %s: rank 0 of %d listens at %s for the gang", g->job_id, g->world, g->addr);
    }
    send_call(g);
    return g;
}

void wd_gang_cancel(wd_gang *g) {
    if (!g) return;
    g->cancelled = 1;
    atomic_store(&g->stop, 1);
    gang_close(g); /* now, or when the work item returns */
}
