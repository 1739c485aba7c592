/* jobq.c — group commit of job creations (see jobq.h). */
#include "server/jobq.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "server/jobs.h"
#include "server/sched.h"
#include "server/store.h"

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static jobq_item *g_head, *g_tail;
static int g_stop;
static pthread_t g_thread;
static int g_started;
static atomic_ulong g_created; /* jobs committed (201), for /metrics */

unsigned long jobq_created_total(void) { return atomic_load(&g_created); }

void jobq_item_free(void *p) {
    jobq_item *it = p;
    if (!it) return;
    free(it->spec_text);
    free(it);
}

enum MHD_Result jobq_submit(http_req *r, jobq_item *it) {
    it->r = r;
    it->next = NULL;
    pthread_mutex_lock(&g_mu);
    if (g_tail) g_tail->next = it;
    else g_head = it;
    g_tail = it;
    /* Suspended under the lock, so the committer cannot resume it before it is suspended. */
    MHD_suspend_connection(r->conn);
    pthread_cond_signal(&g_cv);
    pthread_mutex_unlock(&g_mu);
    return MHD_YES;
}

int jobq_file_of_project(const char *project_id, const char *file_id) {
    if (!file_id[0]) return 1;
    sqlite3_stmt *st = store_stmt("SELECT 1 FROM files WHERE id=? AND project_id=?");
    sqlite3_bind_text(st, 1, file_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, project_id, -1, SQLITE_STATIC);
    int ok = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_reset(st);
    return ok;
}

/* Inserts one job inside the batch's transaction; sets it->status. */
static void insert_one(jobq_item *it) {
    /* The files were checked by the handler; re-checked here because a delete may have run since. */
    const char *files[3][2] = {{"training_file", it->training_file},
                               {"validation_file", it->validation_file},
                               {"adapter.calibration.file", it->calibration_file}};
    for (int i = 0; i < 3; i++)
        if (!jobq_file_of_project(it->project_id, files[i][1])) {
            it->status = 400;
            snprintf(it->err_param, sizeof it->err_param, "%s", files[i][0]);
            return;
        }
    sqlite3_stmt *st = store_stmt(
        "INSERT INTO jobs(id,project_id,status,model,spec,training_file,validation_file,calibration_file,ranks,device,"
        "created_at) VALUES(?,?,'validating_files',?,?,?,?,?,?,?,?)");
    sqlite3_bind_text(st, 1, it->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, it->project_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, it->model, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, it->spec_text, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, it->training_file, -1, SQLITE_STATIC);
    if (it->validation_file[0]) sqlite3_bind_text(st, 6, it->validation_file, -1, SQLITE_STATIC);
    if (it->calibration_file[0]) sqlite3_bind_text(st, 7, it->calibration_file, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 8, it->ranks);
    sqlite3_bind_text(st, 9, it->device, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 10, ln_unix_time());
    int ok = sqlite3_step(st) == SQLITE_DONE;
    sqlite3_reset(st);
    ok = ok && jobs_event(it->id, "info", "message", NULL, "Created fine-tuning job: %s", it->id) == 0;
    it->status = ok ? 201 : 503;
}

static void commit_batch(jobq_item *batch) {
    int n = 0;
    if (store_begin() != 0) {
        for (jobq_item *it = batch; it; it = it->next) it->status = 503;
    } else {
        for (jobq_item *it = batch; it; it = it->next, n++) insert_one(it);
        if (store_commit() != 0) {
            ln_log(LN_LOG_ERROR, "jobq", "commit of %d job(s) failed: %s", n, sqlite3_errmsg(store_db()));
            for (jobq_item *it = batch; it; it = it->next) it->status = 503;
        }
    }
    /* Resume only after the commit returned: every 201 below is on disk. */
    for (jobq_item *it = batch, *next; it; it = next) {
        next = it->next;
        if (it->status == 201) atomic_fetch_add(&g_created, 1);
        it->done = 1;
        MHD_resume_connection(it->r->conn);
    }
    sched_kick();
}

static void *committer(void *arg) {
    for (;;) {
        pthread_mutex_lock(&g_mu);
        while (!g_head && !g_stop) pthread_cond_wait(&g_cv, &g_mu);
        jobq_item *batch = g_head;
        g_head = g_tail = NULL;
        int stop = g_stop;
        pthread_mutex_unlock(&g_mu);
        if (batch) commit_batch(batch);
        else if (stop) break;
    }
    store_close();
    return NULL;
}

int jobq_start(ln_err *e) {
    if (pthread_create(&g_thread, NULL, committer, NULL) != 0) return ln_errf(e, "cannot start the job committer thread");
    g_started = 1;
    return 0;
}

void jobq_stop(void) {
    if (!g_started) return;
    pthread_mutex_lock(&g_mu);
    g_stop = 1;
    pthread_cond_signal(&g_cv);
    pthread_mutex_unlock(&g_mu);
    pthread_join(g_thread, NULL);
    g_started = 0;
}
