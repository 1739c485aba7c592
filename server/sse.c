/* sse.c — job event streams over suspended MHD connections (see sse.h). */
#include "server/sse.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "server/jobs.h"
#include "server/server.h"
#include "server/store.h"

/* One stream. Owned by its MHD response (freed in sse_free when the connection ends);
 * linked in the hub while alive. */
typedef struct sse_client {
    struct MHD_Connection *conn;
    char job_id[80];
    int64_t last_seq;
    char *buf;
    size_t len, off, cap;
    int suspended;    /* guarded by g_mu */
    int dirty;        /* guarded by g_mu: something may have changed since the last read */
    int ended;        /* [DONE] written */
    double last_write;
    struct sse_client *prev, *next;
} sse_client;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static sse_client *g_clients;
static int g_count;

static void buf_append(sse_client *c, const char *s, size_t n) {
    if (c->len + n > c->cap) {
        c->cap = (c->len + n) * 2;
        c->buf = ln_xrealloc(c->buf, c->cap);
    }
    memcpy(c->buf + c->len, s, n);
    c->len += n;
}

/* Reads the job's state first, then its new events: an event committed together with a terminal
 * status is then always seen before [DONE] is written. */
static void fill(sse_client *c) {
    sqlite3_stmt *st = store_stmt("SELECT status FROM jobs WHERE id=?");
    sqlite3_bind_text(st, 1, c->job_id, -1, SQLITE_STATIC);
    int terminal = sqlite3_step(st) != SQLITE_ROW || jobs_is_terminal(store_col_text(st, 0));
    sqlite3_reset(st);
    st = store_stmt("SELECT " JOBS_EVENT_COLS " FROM events WHERE job_id=? AND seq>? ORDER BY seq LIMIT 200");
    sqlite3_bind_text(st, 1, c->job_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, c->last_seq);
    int n = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        json_t *ev = jobs_event_row(st);
        c->last_seq = sqlite3_column_int64(st, 0);
        char *s = json_dumps(ev, JSON_COMPACT);
        char head[64];
        int hl = snprintf(head, sizeof head, "id: ftevent-%lld\ndata: ", (long long)c->last_seq);
        buf_append(c, head, (size_t)hl);
        buf_append(c, s, strlen(s));
        buf_append(c, "\n\n", 2);
        free(s);
        json_decref(ev);
        n++;
    }
    sqlite3_reset(st);
    if (n == 0 && terminal) {
        buf_append(c, "data: [DONE]\n\n", 14);
        c->ended = 1;
    }
}

static ssize_t sse_read(void *cls, uint64_t pos, char *out, size_t max) {
    sse_client *c = cls;
    if (c->off == c->len) {
        c->off = c->len = 0;
        if (c->ended || http_stopping()) return MHD_CONTENT_READER_END_OF_STREAM;
        pthread_mutex_lock(&g_mu);
        c->dirty = 0;
        pthread_mutex_unlock(&g_mu);
        fill(c);
        double now = ln_now_s();
        if (c->len == 0 && now - c->last_write >= g_cfg.sse_keepalive_s) buf_append(c, ": keep-alive\n\n", 14);
        if (c->len == 0) {
            pthread_mutex_lock(&g_mu);
            if (!c->dirty && !http_stopping()) {
                c->suspended = 1;
                MHD_suspend_connection(c->conn);
            }
            pthread_mutex_unlock(&g_mu);
            return 0; /* MHD calls again once resumed */
        }
        c->last_write = now;
    }
    size_t n = c->len - c->off < max ? c->len - c->off : max;
    memcpy(out, c->buf + c->off, n);
    c->off += n;
    return (ssize_t)n;
}

static void sse_free(void *cls) {
    sse_client *c = cls;
    pthread_mutex_lock(&g_mu);
    if (c->prev) c->prev->next = c->next;
    else g_clients = c->next;
    if (c->next) c->next->prev = c->prev;
    g_count--;
    pthread_mutex_unlock(&g_mu);
    free(c->buf);
    free(c);
}

enum MHD_Result sse_start(http_req *r, const char *job_id, int64_t after_seq) {
    sse_client *c = ln_xcalloc(1, sizeof *c);
    c->conn = r->conn;
    snprintf(c->job_id, sizeof c->job_id, "%s", job_id);
    c->last_seq = after_seq;
    c->last_write = ln_now_s();
    c->dirty = 1;
    /* Tell the client at once that the stream is open (and how long to wait before reconnecting). */
    buf_append(c, "retry: 2000\n\n", 13);
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 8 * 1024, sse_read, c, sse_free);
    MHD_add_response_header(resp, "Content-Type", "text/event-stream");
    MHD_add_response_header(resp, "Cache-Control", "no-cache");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no");
    pthread_mutex_lock(&g_mu);
    c->next = g_clients;
    if (g_clients) g_clients->prev = c;
    g_clients = c;
    g_count++;
    pthread_mutex_unlock(&g_mu);
    return http_queue(r, 200, resp);
}

static void resume_where(const char *job_id, double keepalive_before) {
    pthread_mutex_lock(&g_mu);
    for (sse_client *c = g_clients; c; c = c->next) {
        int match = job_id ? strcmp(c->job_id, job_id) == 0 : c->last_write <= keepalive_before;
        if (!match) continue;
        c->dirty = 1;
        if (c->suspended) {
            c->suspended = 0;
            MHD_resume_connection(c->conn);
        }
    }
    pthread_mutex_unlock(&g_mu);
}

void sse_notify(const char *job_id) { resume_where(job_id, 0); }
void sse_tick(double now) { resume_where(NULL, now - g_cfg.sse_keepalive_s); }
void sse_shutdown(void) { resume_where(NULL, 1e300); }

int sse_client_count(void) {
    pthread_mutex_lock(&g_mu);
    int n = g_count;
    pthread_mutex_unlock(&g_mu);
    return n;
}
