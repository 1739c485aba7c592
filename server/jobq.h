/* jobq.h — group commit of job creations.
 *
 * A 201 promises the job is on disk, and on this kind of disk an fsync costs milliseconds, so
 * one commit per job caps creation at ~1/fsync. Instead the handler queues the validated job and
 * suspends its connection; one committer thread inserts everything queued so far in a single
 * transaction (one fsync for the batch), then resumes every connection, whose handler replies
 * 201 (or 503/400). Under load batches grow by themselves; alone, a job waits for one commit. */
#ifndef LN_JOBQ_H
#define LN_JOBQ_H

#include "common/err.h"
#include "server/http.h"

/* One job to insert. Owned by its request (r->ctx); the committer only fills ok/err fields. */
typedef struct jobq_item {
    http_req *r;
    char id[40];
    char project_id[40];
    char model[257];
    char training_file[72], validation_file[72], calibration_file[72];
    char device[8];
    int ranks;
    char *spec_text;           /* owned */
    int done;                  /* set by the committer before it resumes the connection */
    int status;                /* 201, or the error status */
    char err_param[64];        /* for a 400: the file that vanished meanwhile */
    struct jobq_item *next;
} jobq_item;

int jobq_start(ln_err *e);
/* Drains what is queued, then stops the committer (after the HTTP server has stopped). */
void jobq_stop(void);
/* Queues it and suspends r's connection; the handler runs again once it->done. */
enum MHD_Result jobq_submit(http_req *r, jobq_item *it);
void jobq_item_free(void *it);
/* 1 if file_id ("" = none) is a file of the project that a job may read: checked by the create
 * handler, and again by the committer (a delete may have run in between). */
int jobq_file_of_project(const char *project_id, const char *file_id);
/* Jobs created (committed) since start. */
unsigned long jobq_created_total(void);

#endif
