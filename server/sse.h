/* sse.h — Server-Sent Events streams of job events (GET …/events?stream=true).
 *
 * Each stream is an MHD response whose content callback reads new events from the store; when
 * there are none it suspends its connection, and sse_notify (an event was committed) or the
 * keep-alive timer resumes it. No thread per client: 1,000 streams are 1,000 small structs.
 *
 * Wire format: for every event
 *     id: ftevent-<n>\n data: <event object JSON>\n\n
 * ": keep-alive" comments on idle streams every sse_keepalive_s, and "data: [DONE]" once the job
 * has reached a terminal state and every event has been sent. A client resumes with the
 * Last-Event-ID header (or ?after=ftevent-<n>): the stream continues after that event. */
#ifndef LN_SSE_H
#define LN_SSE_H

#include <stdint.h>

#include "server/http.h"

/* Starts a stream of job_id's events with sequence > after_seq. */
enum MHD_Result sse_start(http_req *r, const char *job_id, int64_t after_seq);
void sse_notify(const char *job_id);
/* Resumes idle streams whose keep-alive is due; called by the scheduler's ticker. */
void sse_tick(double now);
/* Resumes every stream so that it ends (server stopping). */
void sse_shutdown(void);
int sse_client_count(void);

#endif
