/* wd_outbox.h — the bounded queue between the job's training thread and the daemon's loop.
 *
 * The training thread must never wait on the network: it only appends here (a mutex held for a
 * few pointer moves) and wakes the loop (uv_async_send). The loop takes batches out and posts them
 * (events + metric points in one /events call, at most a few per second). If the server is away
 * the queue keeps filling up to its bounds; then the oldest metric points go first, then the
 * oldest info events, and the number dropped is reported in a warning once the server is back —
 * so an outage never grows memory without bound and never blocks a training step.
 *
 * Ownership: appended JSON values move into the outbox; wd_outbox_take moves them out to the
 * caller, who either gives them back (wd_outbox_putback, after a failed post) or frees them. */
#ifndef WD_OUTBOX_H
#define WD_OUTBOX_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <uv.h>

typedef struct wd_outbox {
    pthread_mutex_t mu;
    uv_async_t *wake;          /* sent after every append (may be NULL in tests) */
    json_t *events;            /* [{"level","message","type"?,"data"?}] */
    json_t *metrics;           /* [{"step","values"}] */
    size_t max_events, max_points;
    int64_t dropped_events, dropped_points;
    uint64_t appended;         /* items ever appended: a mark that orders reports with checkpoints */
} wd_outbox;

void wd_outbox_init(wd_outbox *o, uv_async_t *wake, size_t max_events, size_t max_points);
void wd_outbox_destroy(wd_outbox *o);

/* An event; data (may be NULL) is stolen. Thread-safe. */
void wd_outbox_event(wd_outbox *o, const char *level, json_t *data, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* An info event that enters one of the job's stages (validating, calibrating, initialising,
 * training, evaluating, exporting): data.stage says which, for the dashboard's timeline. data
 * (may be NULL) is stolen; the event is of type "metrics" only when the caller gave data. */
void wd_outbox_stage_event(wd_outbox *o, const char *stage, json_t *data, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* A metric point: values is an object name → finite number (stolen). Thread-safe. */
void wd_outbox_metrics(wd_outbox *o, int64_t step, json_t *values);

/* Moves out up to max_events events and max_points points (new arrays, caller-owned; both may be
 * empty). A drop count since the last take becomes a warning event at the front. */
void wd_outbox_take(wd_outbox *o, size_t max_events, size_t max_points, json_t **events, json_t **metrics);
/* Gives back what a failed post took, in front of anything appended since. Steals both. */
void wd_outbox_putback(wd_outbox *o, json_t *events, json_t *metrics);
/* Items ever appended (events + points). */
uint64_t wd_outbox_appended(wd_outbox *o);
/* Number of queued events and points. */
void wd_outbox_size(wd_outbox *o, size_t *events, size_t *points);
/* Empties the queue (a job that ends without its lease). */
void wd_outbox_clear(wd_outbox *o);

#endif
