/* jobs.h — the job state machine, job objects and job events, shared by the public API, the
 * internal (worker) API and the scheduler.
 *
 * States and the only transitions allowed (jobs_transition_ok; asserted on every change):
 *
 *   validating_files ──▶ queued ──lease──▶ running ──▶ succeeded
 *          │               │  ▲              │  │──▶ failed      (worker reported a final failure,
 *          │               │  └──requeue─────┘  │                 or attempts exhausted)
 *          │               ▼                    ▼
 *          │             paused ◀──────────── (pause)      paused ──resume──▶ queued
 *          └──▶ failed (bad file)
 *   every non-terminal state ──cancel──▶ cancelled.   succeeded, failed, cancelled are terminal.
 *
 * A worker's report is accepted only while the job is running under the lease generation the
 * worker was given; every lease bumps the generation, so a late report of a lost lease is refused. */
#ifndef LN_JOBS_H
#define LN_JOBS_H

#include <jansson.h>
#include <sqlite3.h>

#include "common/err.h"

int jobs_transition_ok(const char *from, const char *to);
int jobs_is_terminal(const char *status);

/* Moves job from `from` to `to` inside the caller's transaction (asserts the transition is
 * allowed). Returns 1 if the row changed, 0 if the job was not in `from`. */
int jobs_set_status(const char *job_id, const char *from, const char *to);

/* Appends an event (inside or outside a transaction). data may be NULL (borrowed).
 * Call jobs_notify(job_id) after the commit so that SSE readers see it. */
int jobs_event(const char *job_id, const char *level, const char *type, json_t *data, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
/* Wakes SSE streams of the job and waiting workers. */
void jobs_notify(const char *job_id);

/* The OpenAI fine_tuning.job object of a job id (NULL when it does not exist or, with
 * project_id != NULL, belongs to another project). */
json_t *jobs_object(const char *job_id, const char *project_id);
/* The same object as JSON text (the fast path of GET job); caller frees. NULL when absent. */
char *jobs_render(const char *job_id, const char *project_id);
/* {"object":"list","data":[jobs…],"has_more":…} for the given ids (skipping vanished ones). */
char *jobs_render_list(char (*ids)[40], int n, const char *project_id, int has_more);
/* The event object of a row selected with JOBS_EVENT_COLS. */
#define JOBS_EVENT_COLS "seq, created_at, level, type, message, data"
json_t *jobs_event_row(sqlite3_stmt *st);
/* The checkpoint object of a row selected with JOBS_CKPT_COLS. */
#define JOBS_CKPT_COLS "c.id, c.job_id, c.step, c.files, c.metrics, c.created_at, j.fine_tuned_model, j.model"
json_t *jobs_checkpoint_row(sqlite3_stmt *st);

/* Checks that a JSONL training file has one JSON object per non-empty line in a format the
 * engine reads (messages | prompt+completion | text | input_ids). The error names the line. */
int jobs_validate_jsonl(const char *path, const char *file_id, ln_err *e);

#endif
