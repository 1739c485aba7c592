/* wd_outbox.c — see wd_outbox.h. */
#include "worker/daemon/wd_outbox.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void wd_outbox_init(wd_outbox *o, uv_async_t *wake, size_t max_events, size_t max_points) {
    memset(o, 0, sizeof *o);
    pthread_mutex_init(&o->mu, NULL);
    o->wake = wake;
    o->events = json_array();
    o->metrics = json_array();
    o->max_events = max_events;
    o->max_points = max_points;
}

void wd_outbox_destroy(wd_outbox *o) {
    json_decref(o->events);
    json_decref(o->metrics);
    pthread_mutex_destroy(&o->mu);
}

/* Keeps the queue within its bounds (lock held): points first, then the oldest info events —
 * warnings and errors are what a user needs to see after an outage. */
static void enforce_bounds(wd_outbox *o) {
    while (json_array_size(o->metrics) > o->max_points) {
        json_array_remove(o->metrics, 0);
        o->dropped_points++;
    }
    while (json_array_size(o->events) > o->max_events) {
        size_t victim = 0, n = json_array_size(o->events);
        for (size_t i = 0; i < n; i++) {
            const char *lvl = json_string_value(json_object_get(json_array_get(o->events, i), "level"));
            if (lvl && strcmp(lvl, "info") == 0) {
                victim = i;
                break;
            }
        }
        json_array_remove(o->events, victim);
        o->dropped_events++;
    }
}

static void wake(wd_outbox *o) {
    if (o->wake) uv_async_send(o->wake);
}

static void event_append(wd_outbox *o, const char *level, json_t *data, const char *type, const char *fmt, va_list ap) {
    char msg[4096];
    vsnprintf(msg, sizeof msg, fmt, ap);
    json_t *ev = json_pack("{s:s, s:s}", "level", level, "message", msg);
    if (type) json_object_set_new(ev, "type", json_string(type));
    if (data) json_object_set_new(ev, "data", data);
    pthread_mutex_lock(&o->mu);
    json_array_append_new(o->events, ev);
    o->appended++;
    enforce_bounds(o);
    pthread_mutex_unlock(&o->mu);
    wake(o);
}

void wd_outbox_event(wd_outbox *o, const char *level, json_t *data, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    event_append(o, level, data, data ? "metrics" : NULL, fmt, ap);
    va_end(ap);
}

void wd_outbox_stage_event(wd_outbox *o, const char *stage, json_t *data, const char *fmt, ...) {
    const char *type = data ? "metrics" : NULL;
    if (!data) data = json_object();
    json_object_set_new(data, "stage", json_string(stage));
    va_list ap;
    va_start(ap, fmt);
    event_append(o, "info", data, type, fmt, ap);
    va_end(ap);
}

void wd_outbox_metrics(wd_outbox *o, int64_t step, json_t *values) {
    /* The server takes finite numbers only; drop anything else here rather than fail a batch. */
    const char *k;
    json_t *v;
    void *tmp;
    json_object_foreach_safe(values, tmp, k, v) if (!json_is_number(v) || !isfinite(json_number_value(v)))
        json_object_del(values, k);
    if (json_object_size(values) == 0) {
        json_decref(values);
        return;
    }
    json_t *pt = json_pack("{s:I, s:o}", "step", (json_int_t)step, "values", values);
    pthread_mutex_lock(&o->mu);
    json_array_append_new(o->metrics, pt);
    o->appended++;
    enforce_bounds(o);
    pthread_mutex_unlock(&o->mu);
    wake(o);
}

/* Moves the first n items of *from into a new array; *from keeps the rest (one pass, no
 * front-removal per item). */
static json_t *take_front(json_t **from, size_t n) {
    json_t *out = json_array(), *rest = json_array();
    size_t have = json_array_size(*from);
    for (size_t i = 0; i < have; i++) json_array_append(i < n ? out : rest, json_array_get(*from, i));
    json_decref(*from);
    *from = rest;
    return out;
}

void wd_outbox_take(wd_outbox *o, size_t max_events, size_t max_points, json_t **events, json_t **metrics) {
    pthread_mutex_lock(&o->mu);
    if (o->dropped_events || o->dropped_points) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "The worker could not reach the server for a while and its report buffer filled up: %lld "
                 "event(s) and %lld metric point(s) were dropped",
                 (long long)o->dropped_events, (long long)o->dropped_points);
        json_array_insert_new(o->events, 0, json_pack("{s:s, s:s}", "level", "warn", "message", msg));
        o->dropped_events = o->dropped_points = 0;
    }
    *events = take_front(&o->events, max_events);
    *metrics = take_front(&o->metrics, max_points);
    pthread_mutex_unlock(&o->mu);
}

void wd_outbox_putback(wd_outbox *o, json_t *events, json_t *metrics) {
    pthread_mutex_lock(&o->mu);
    json_array_extend(events, o->events);
    json_array_extend(metrics, o->metrics);
    json_decref(o->events);
    json_decref(o->metrics);
    o->events = events;
    o->metrics = metrics;
    enforce_bounds(o);
    pthread_mutex_unlock(&o->mu);
}

uint64_t wd_outbox_appended(wd_outbox *o) {
    pthread_mutex_lock(&o->mu);
    uint64_t n = o->appended;
    pthread_mutex_unlock(&o->mu);
    return n;
}

void wd_outbox_size(wd_outbox *o, size_t *events, size_t *points) {
    pthread_mutex_lock(&o->mu);
    *events = json_array_size(o->events);
    *points = json_array_size(o->metrics);
    pthread_mutex_unlock(&o->mu);
}

void wd_outbox_clear(wd_outbox *o) {
    pthread_mutex_lock(&o->mu);
    json_array_clear(o->events);
    json_array_clear(o->metrics);
    o->dropped_events = o->dropped_points = 0;
    pthread_mutex_unlock(&o->mu);
}
