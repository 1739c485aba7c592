/* sched.c — leases, gangs, expiry and retries; the ticker thread (see sched.h). */
#include "server/sched.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "common/log.h"
#include "common/util.h"
#include "server/http.h"
#include "server/jobs.h"
#include "server/server.h"
#include "server/sse.h"
#include "server/store.h"

double sched_wall_now(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + (double)tv.tv_usec * 1e-6;
}

/* ---------------------------------------------------------------- the pool of waiting workers */

#define POOL_MAX 1024
#define MAX_MODELS 64

typedef struct pool_worker {
    char id[40];
    char kind[8];
    int free_devices;
    double last_poll;                 /* wall time of its latest lease call */
    double last_seen_written;         /* when workers.last_seen_f was last written for it */
    int held;                         /* in this scheduling pass: kept for an older gang (strict FIFO) */
    int n_models;
    char models[MAX_MODELS][257];
} pool_worker;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER; /* pool and every lease decision */
static atomic_ulong g_granted, g_expired; /* for /metrics */
static pool_worker *g_pool[POOL_MAX];
static int g_npool;

/* A worker stays in the pool while it keeps polling (its long-poll is at most lease_wait_max_s). */
static void pool_prune(double now) {
    for (int i = 0; i < g_npool;) {
        if (now - g_pool[i]->last_poll > g_cfg.lease_wait_max_s + 5) {
            free(g_pool[i]);
            g_pool[i] = g_pool[--g_npool];
        } else {
            i++;
        }
    }
}

static pool_worker *pool_find(const char *id) {
    for (int i = 0; i < g_npool; i++)
        if (strcmp(g_pool[i]->id, id) == 0) return g_pool[i];
    return NULL;
}

static void pool_remove(const char *id) {
    for (int i = 0; i < g_npool; i++)
        if (strcmp(g_pool[i]->id, id) == 0) {
            free(g_pool[i]);
            g_pool[i] = g_pool[--g_npool];
            return;
        }
}

/* Loads the worker's registration into the pool (refreshing free devices and poll time). */
static pool_worker *pool_enter(const char *worker_id, int free_devices, double now) {
    sqlite3_stmt *st = store_stmt("SELECT device_kind, devices FROM workers WHERE id=?");
    sqlite3_bind_text(st, 1, worker_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_reset(st);
        return NULL;
    }
    char kind[8];
    snprintf(kind, sizeof kind, "%s", store_col_text(st, 0));
    int devices = sqlite3_column_int(st, 1);
    sqlite3_reset(st);
    /* Devices that ranks of running jobs hold stay busy whatever the worker says: a rank of a gang
     * that has finished its part belongs to the gang until rank 0 completes (or the lease ends). */
    st = store_stmt("SELECT COUNT(*) FROM job_ranks r JOIN jobs j ON j.id=r.job_id WHERE r.worker_id=? "
                    "AND j.status='running' AND r.lease_gen=j.lease_gen");
    sqlite3_bind_text(st, 1, worker_id, -1, SQLITE_STATIC);
    int busy = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
    sqlite3_reset(st);
    int avail = devices > busy ? devices - busy : 0;
    pool_worker *w = pool_find(worker_id);
    if (!w) {
        if (g_npool == POOL_MAX) return NULL;
        w = ln_xcalloc(1, sizeof *w);
        snprintf(w->id, sizeof w->id, "%s", worker_id);
        g_pool[g_npool++] = w;
    }
    snprintf(w->kind, sizeof w->kind, "%s", kind);
    w->free_devices = free_devices < 0 || free_devices > avail ? avail : free_devices;
    w->last_poll = now;
    w->n_models = 0;
    st = store_stmt("SELECT model FROM worker_models WHERE worker_id=? LIMIT 64");
    sqlite3_bind_text(st, 1, worker_id, -1, SQLITE_STATIC);
    while (sqlite3_step(st) == SQLITE_ROW && w->n_models < MAX_MODELS)
        snprintf(w->models[w->n_models++], sizeof w->models[0], "%s", store_col_text(st, 0));
    sqlite3_reset(st);
    /* Liveness on disk every few seconds is enough (each write is an fsync; waiting workers poll
     * once a second). */
    if (now - w->last_seen_written >= 5.0) {
        st = store_stmt("UPDATE workers SET last_seen_f=? WHERE id=?");
        sqlite3_bind_double(st, 1, now);
        sqlite3_bind_text(st, 2, worker_id, -1, SQLITE_STATIC);
        sqlite3_step(st);
        sqlite3_reset(st);
        w->last_seen_written = now;
    }
    return w;
}

static int worker_fits(const pool_worker *w, const char *model, const char *device) {
    if (w->free_devices <= 0 || w->held) return 0;
    if (strcmp(device, "any") != 0 && strcmp(device, w->kind) != 0) return 0;
    for (int i = 0; i < w->n_models; i++)
        if (strcmp(w->models[i], model) == 0) return 1;
    return 0;
}

/* ---------------------------------------------------------------- granting */

/* Grants job to the chosen workers (rank order = order of `who`, each taking `take[i]` ranks).
 * In a transaction; the job must still be queued. */
static int grant(const char *job_id, int ranks, pool_worker **who, const int *take, int nwho, double now) {
    if (store_begin() != 0) return -1;
    sqlite3_stmt *st = store_stmt(
        "UPDATE jobs SET status='running', attempts=attempts+1, lease_gen=lease_gen+1, lease_expires_f=?, "
        "started_at=COALESCE(started_at, ?), lease_worker=?, gang_wait=NULL WHERE id=? AND status='queued'");
    sqlite3_bind_double(st, 1, now + g_cfg.lease_ttl_s);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)now);
    sqlite3_bind_text(st, 3, who[0]->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, job_id, -1, SQLITE_STATIC);
    int changed = sqlite3_step(st) == SQLITE_DONE && sqlite3_changes(store_db()) == 1;
    sqlite3_reset(st);
    if (!changed) {
        store_rollback();
        return -1;
    }
    st = store_stmt("SELECT lease_gen, attempts FROM jobs WHERE id=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    long long gen = sqlite3_column_int64(st, 0), attempt = sqlite3_column_int64(st, 1);
    sqlite3_reset(st);
    st = store_stmt("DELETE FROM job_ranks WHERE job_id=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);
    char names[512] = "";
    int rank = 0;
    for (int i = 0; i < nwho; i++) {
        for (int k = 0; k < take[i]; k++, rank++) {
            st = store_stmt("INSERT INTO job_ranks(job_id,rank,worker_id,lease_gen,delivered,expires_f) "
                            "VALUES(?,?,?,?,0,?)");
            sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
            sqlite3_bind_int(st, 2, rank);
            sqlite3_bind_text(st, 3, who[i]->id, -1, SQLITE_STATIC);
            sqlite3_bind_int64(st, 4, gen);
            sqlite3_bind_double(st, 5, now + g_cfg.lease_ttl_s);
            sqlite3_step(st);
            sqlite3_reset(st);
        }
        size_t l = strlen(names);
        snprintf(names + l, sizeof names - l, "%s%s x%d", i ? ", " : "", who[i]->id, take[i]);
    }
    jobs_event(job_id, "info", "message", NULL, "Job leased (attempt %lld of %d, lease generation %lld, %d rank%s): %s",
               attempt, g_cfg.max_attempts, gen, ranks, ranks > 1 ? "s" : "", names);
    if (store_commit() != 0) return -1;
    atomic_fetch_add(&g_granted, 1);
    for (int i = 0; i < nwho; i++) who[i]->free_devices -= take[i];
    return 0;
}

typedef struct candidate {
    int64_t seq;
    char id[40];
    char model[257];
    char device[8];
    int ranks;
} candidate;

static int cmp_candidate(const void *a, const void *b) {
    int64_t x = ((const candidate *)a)->seq, y = ((const candidate *)b)->seq;
    return x < y ? -1 : x > y;
}

#define CAND_MAX 1024

/* Queued jobs past their backoff whose model some pool worker holds, oldest first. Looking model
 * by model (index jobs_queue) keeps a long queue of jobs nobody can run from hiding the others. */
static int collect_candidates(double now, candidate *out) {
    const char *models[POOL_MAX * 4];
    int nm = 0, n = 0;
    for (int i = 0; i < g_npool; i++)
        for (int k = 0; k < g_pool[i]->n_models && nm < POOL_MAX * 4; k++) {
            int seen = 0;
            for (int j = 0; j < nm && !seen; j++) seen = strcmp(models[j], g_pool[i]->models[k]) == 0;
            if (!seen) models[nm++] = g_pool[i]->models[k];
        }
    for (int m = 0; m < nm && n < CAND_MAX; m++) {
        sqlite3_stmt *st = store_stmt("SELECT seq, id, ranks, device FROM jobs WHERE status='queued' AND model=? "
                                      "AND not_before_f<=? ORDER BY seq LIMIT 50");
        sqlite3_bind_text(st, 1, models[m], -1, SQLITE_STATIC);
        sqlite3_bind_double(st, 2, now);
        while (n < CAND_MAX && sqlite3_step(st) == SQLITE_ROW) {
            candidate *c = &out[n++];
            c->seq = sqlite3_column_int64(st, 0);
            snprintf(c->id, sizeof c->id, "%s", store_col_text(st, 1));
            snprintf(c->model, sizeof c->model, "%s", models[m]);
            c->ranks = sqlite3_column_int(st, 2);
            snprintf(c->device, sizeof c->device, "%s", store_col_text(st, 3));
        }
        sqlite3_reset(st);
    }
    qsort(out, (size_t)n, sizeof *out, cmp_candidate);
    return n;
}

/* Devices of the live workers (seen within worker_timeout_s) that could run a job of model on
 * device ("any", "cpu", "cuda"), busy or not: what a gang may ever get without a new worker. */
static int live_capacity(const char *model, const char *device, double now) {
    sqlite3_stmt *st = store_stmt("SELECT COALESCE(SUM(w.devices), 0) FROM workers w JOIN worker_models m ON "
                                  "m.worker_id=w.id WHERE m.model=?1 AND w.last_seen_f>=?2 AND "
                                  "(?3='any' OR w.device_kind=?3)");
    sqlite3_bind_text(st, 1, model, -1, SQLITE_STATIC);
    sqlite3_bind_double(st, 2, now - g_cfg.worker_timeout_s);
    sqlite3_bind_text(st, 3, device, -1, SQLITE_STATIC);
    int cap = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
    sqlite3_reset(st);
    return cap;
}

/* Records (jobs.gang_wait) and tells the user (one event) why a queued job waits, when that changed. */
static void note_wait(const char *job_id, const char *state, const char *msg) {
    sqlite3_stmt *st = store_stmt("SELECT gang_wait FROM jobs WHERE id=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    int same = sqlite3_step(st) == SQLITE_ROW && store_col_text(st, 0) && strcmp(store_col_text(st, 0), state) == 0;
    sqlite3_reset(st);
    if (same || store_begin() != 0) return;
    st = store_stmt("UPDATE jobs SET gang_wait=? WHERE id=? AND status='queued'");
    sqlite3_bind_text(st, 1, state, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, job_id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);
    jobs_event(job_id, "info", "message", NULL, "%s", msg);
    if (store_commit() == 0) jobs_notify(job_id);
}

/* The oldest job of its pool does not fit in the free devices `fit` offer (`total` < its ranks).
 * When the live workers could hold it at all, those devices are kept for it — no younger job may
 * take them in this pass — so it is leased as soon as enough of them are free at once (strict FIFO
 * per pool: its wait is bounded by the jobs already running there). When they could not (fewer
 * live devices than ranks), nothing is kept: the pool is not blocked by a job that cannot run. */
static void hold_for(const candidate *c, pool_worker **fit, int nfit, int total, double now) {
    char msg[1024], names[300] = "";
    int cap = live_capacity(c->model, c->device, now);
    if (cap < c->ranks) {
        snprintf(msg, sizeof msg,
                 "Cannot be placed yet: the live workers with model %s (device %s) have %d device%s in all and the "
                 "job needs %d; no devices are held for it and younger jobs run meanwhile",
                 c->model, c->device, cap, cap == 1 ? "" : "s", c->ranks);
        note_wait(c->id, "capacity", msg);
        return;
    }
    for (int i = 0; i < nfit; i++) {
        fit[i]->held = 1;
        size_t l = strlen(names);
        snprintf(names + l, sizeof names - l, "%s%s x%d", i ? ", " : "", fit[i]->id, fit[i]->free_devices);
    }
    snprintf(msg, sizeof msg,
             "Waiting for %d devices at once (model %s, device %s): %d free now (%s); they are held for this job, "
             "so younger jobs that could use them wait until it is leased (first in, first out)",
             c->ranks, c->model, c->device, total, names);
    note_wait(c->id, "holding", msg);
}

/* A gang spread over workers talks over one comm: TCP between CPU workers, NCCL between GPU
 * workers. So a job with device "any" that no single worker can hold keeps, of the fitting
 * workers, those of one kind: the kind with enough free devices (the first worker's kind first),
 * else the kind with the most. Keeps fit's order; returns the new count. */
static int one_kind(pool_worker **fit, int nfit, int ranks) {
    for (int i = 0; i < nfit; i++)
        if (fit[i]->free_devices >= ranks) return nfit; /* one worker holds every rank */
    const char *kind = NULL;
    int best = -1;
    for (int i = 0; i < nfit; i++) {
        int total = 0;
        for (int k = 0; k < nfit; k++)
            if (strcmp(fit[k]->kind, fit[i]->kind) == 0) total += fit[k]->free_devices;
        if (total >= ranks) { kind = fit[i]->kind; break; }
        if (total > best) { best = total; kind = fit[i]->kind; }
    }
    int n = 0;
    for (int i = 0; i < nfit; i++)
        if (strcmp(fit[i]->kind, kind) == 0) fit[n++] = fit[i];
    return n;
}

/* One pass over the queue with the current pool, oldest job first. */
static void schedule(const char *asking, double now) {
    candidate *cand = ln_xmalloc(CAND_MAX * sizeof *cand);
    int n = collect_candidates(now, cand);
    int granted = 0;
    for (int i = 0; i < g_npool; i++) g_pool[i]->held = 0;
    for (int j = 0; j < n; j++) {
        const char *model = cand[j].model, *dev = cand[j].device, *job_id = cand[j].id;
        int ranks = cand[j].ranks;
        pool_worker *fit[POOL_MAX];
        int nfit = 0, total = 0, single = -1;
        /* The asking worker first, then the others in pool order. */
        pool_worker *me = asking ? pool_find(asking) : NULL;
        if (me && worker_fits(me, model, dev)) fit[nfit++] = me;
        for (int i = 0; i < g_npool; i++)
            if (g_pool[i] != me && worker_fits(g_pool[i], model, dev)) fit[nfit++] = g_pool[i];
        if (ranks > 1 && nfit > 0 && strcmp(dev, "any") == 0) nfit = one_kind(fit, nfit, ranks);
        for (int i = 0; i < nfit; i++) {
            total += fit[i]->free_devices;
            if (single < 0 && fit[i]->free_devices >= ranks) single = i;
        }
        if (total < ranks) {
            if (total > 0) hold_for(&cand[j], fit, nfit, total, now);
            continue;
        }
        pool_worker *who[POOL_MAX];
        int take[POOL_MAX], nwho = 0;
        if (single >= 0) {
            who[0] = fit[single];
            take[0] = ranks;
            nwho = 1;
        } else {
            int left = ranks;
            for (int i = 0; i < nfit && left > 0; i++) {
                int t = fit[i]->free_devices < left ? fit[i]->free_devices : left;
                who[nwho] = fit[i];
                take[nwho++] = t;
                left -= t;
            }
        }
        if (grant(job_id, ranks, who, take, nwho, now) == 0) {
            granted = 1;
            jobs_notify(job_id);
        }
    }
    free(cand);
    if (granted) http_wake_all(); /* other gang members pick their ranks up */
}

/* The lease object for worker_id's undelivered ranks of one running job, marked delivered. */
static json_t *deliver(const char *worker_id) {
    sqlite3_stmt *st = store_stmt(
        "SELECT r.job_id, j.lease_gen, j.ranks, j.attempts, j.spec, j.project_id FROM job_ranks r "
        "JOIN jobs j ON j.id=r.job_id WHERE r.worker_id=? AND r.delivered=0 AND j.status='running' "
        "AND r.lease_gen=j.lease_gen ORDER BY r.rank LIMIT 1");
    sqlite3_bind_text(st, 1, worker_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_reset(st);
        return NULL;
    }
    char job_id[40];
    snprintf(job_id, sizeof job_id, "%s", store_col_text(st, 0));
    long long gen = sqlite3_column_int64(st, 1);
    int world = sqlite3_column_int(st, 2);
    long long attempt = sqlite3_column_int64(st, 3);
    json_t *spec = json_loads(store_col_text(st, 4), 0, NULL);
    char project[40];
    snprintf(project, sizeof project, "%s", store_col_text(st, 5));
    sqlite3_reset(st);

    json_t *my_ranks = json_array(), *peers = json_array();
    st = store_stmt("SELECT rank, worker_id FROM job_ranks WHERE job_id=? ORDER BY rank");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    while (sqlite3_step(st) == SQLITE_ROW) {
        if (strcmp(store_col_text(st, 1), worker_id) == 0) json_array_append_new(my_ranks, json_integer(sqlite3_column_int(st, 0)));
        json_array_append_new(peers, json_pack("{s:i, s:s}", "rank", sqlite3_column_int(st, 0), "worker_id",
                                               store_col_text(st, 1)));
    }
    sqlite3_reset(st);
    st = store_stmt("UPDATE job_ranks SET delivered=1 WHERE job_id=? AND worker_id=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, worker_id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);

    /* Resume point: the newest checkpoint of any earlier attempt. */
    json_t *resume = json_null();
    st = store_stmt("SELECT " JOBS_CKPT_COLS " FROM checkpoints c JOIN jobs j ON j.id=c.job_id WHERE c.job_id=? "
                    "ORDER BY c.seq DESC LIMIT 1");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) resume = jobs_checkpoint_row(st);
    sqlite3_reset(st);

    return json_pack("{s:s, s:s, s:I, s:I, s:f, s:f, s:o, s:i, s:o, s:I, s:o, s:o}", "object", "lease", "job_id",
                     job_id, "lease_generation", (json_int_t)gen, "attempt", (json_int_t)attempt, "ttl_s",
                     g_cfg.lease_ttl_s, "heartbeat_interval_s", g_cfg.lease_ttl_s / 3, "ranks", my_ranks,
                     "world_size", world, "peers", peers, "max_attempts", (json_int_t)g_cfg.max_attempts, "spec",
                     spec ? spec : json_object(), "resume_from", resume);
}

json_t *sched_lease(const char *worker_id, int free_devices, int *err_status, ln_err *e) {
    double now = sched_wall_now();
    *err_status = 0;
    pthread_mutex_lock(&g_mu);
    json_t *lease = deliver(worker_id);
    if (!lease) {
        pool_prune(now);
        if (!pool_enter(worker_id, free_devices, now)) {
            pthread_mutex_unlock(&g_mu);
            *err_status = 404;
            ln_errf(e, "worker %s is not registered (register again)", worker_id);
            return NULL;
        }
        schedule(worker_id, now);
        lease = deliver(worker_id);
    }
    if (lease) {
        /* Leaving the pool until it asks again with what it has left. */
        pool_remove(worker_id);
        jobs_notify(json_string_value(json_object_get(lease, "job_id")));
    }
    pthread_mutex_unlock(&g_mu);
    return lease;
}

int sched_check_lease(const char *job_id, long long gen, int pause_grace, ln_err *e) {
    sqlite3_stmt *st = store_stmt("SELECT status, lease_gen, paused_at_f, lease_expires_f FROM jobs WHERE id=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_ROW) {
        sqlite3_reset(st);
        return ln_errf(e, "job %s does not exist", job_id);
    }
    char status[32];
    snprintf(status, sizeof status, "%s", store_col_text(st, 0));
    long long cur = sqlite3_column_int64(st, 1);
    double paused_at = sqlite3_column_type(st, 2) == SQLITE_NULL ? 0 : sqlite3_column_double(st, 2);
    double expires = sqlite3_column_type(st, 3) == SQLITE_NULL ? 0 : sqlite3_column_double(st, 3);
    sqlite3_reset(st);
    double now = sched_wall_now();
    double grace_left = paused_at + g_cfg.pause_grace_s - now;
    if (strcmp(status, "paused") == 0 && cur == gen && paused_at > 0 && grace_left > 0) {
        if (pause_grace) return 0;
        return ln_errf(e, "job %s is paused: stop; files, checkpoints and events of lease generation %lld are "
                          "still accepted for %.0f s to save a last checkpoint", job_id, gen, grace_left);
    }
    if (strcmp(status, "running") != 0)
        return ln_errf(e, "job %s is %s: its lease (generation %lld) is no longer valid", job_id, status, gen);
    if (cur != gen)
        return ln_errf(e, "lease generation %lld of job %s is stale (current generation is %lld)", gen, job_id, cur);
    /* Expired is expired when it is checked, not only when the once-a-second sweep gets to it: a
     * heartbeat or report that arrives late must not revive a lease another worker may get next. */
    if (expires < now) {
        ln_errf(e, "lease generation %lld of job %s expired %.1f s ago (no heartbeat within %.0f s)", gen, job_id,
                now - expires, g_cfg.lease_ttl_s);
        return -2;
    }
    return 0;
}

int sched_gang_ranks(const char *job_id, long long gen, const char *worker_id, int *holds_rank0) {
    sqlite3_stmt *st = store_stmt("SELECT COUNT(*), MIN(rank) FROM job_ranks WHERE job_id=? AND lease_gen=? AND worker_id=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, gen);
    sqlite3_bind_text(st, 3, worker_id, -1, SQLITE_STATIC);
    int n = 0;
    *holds_rank0 = 0;
    if (sqlite3_step(st) == SQLITE_ROW) {
        n = sqlite3_column_int(st, 0);
        *holds_rank0 = n > 0 && sqlite3_column_int(st, 1) == 0;
    }
    sqlite3_reset(st);
    return n;
}

int sched_gang_workers(const char *job_id, long long gen, char rank0_worker[40]) {
    sqlite3_stmt *st = store_stmt("SELECT COUNT(DISTINCT worker_id), MAX(CASE WHEN rank=0 THEN worker_id END) "
                                  "FROM job_ranks WHERE job_id=? AND lease_gen=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, gen);
    int n = 0;
    rank0_worker[0] = 0;
    if (sqlite3_step(st) == SQLITE_ROW) {
        n = sqlite3_column_int(st, 0);
        if (store_col_text(st, 1)) snprintf(rank0_worker, 40, "%s", store_col_text(st, 1));
    }
    sqlite3_reset(st);
    return n;
}

double sched_heartbeat(const char *job_id, long long gen, const char *worker_id) {
    double now = sched_wall_now(), exp = now + g_cfg.lease_ttl_s;
    sqlite3_stmt *st = store_stmt("UPDATE job_ranks SET expires_f=?1 WHERE job_id=?2 AND lease_gen=?3 AND "
                                  "(?4 IS NULL OR worker_id=?4)");
    sqlite3_bind_double(st, 1, exp);
    sqlite3_bind_text(st, 2, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, gen);
    if (worker_id) sqlite3_bind_text(st, 4, worker_id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);
    /* The lease lives while every worker of the gang does: it ends at the earliest of theirs. */
    st = store_stmt("UPDATE jobs SET lease_expires_f=COALESCE((SELECT MIN(expires_f) FROM job_ranks WHERE "
                    "job_id=?1 AND lease_gen=?2), ?3) WHERE id=?1");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, gen);
    sqlite3_bind_double(st, 3, exp);
    sqlite3_step(st);
    sqlite3_reset(st);
    if (worker_id) {
        st = store_stmt("UPDATE workers SET last_seen_f=? WHERE id=?");
        sqlite3_bind_double(st, 1, now);
        sqlite3_bind_text(st, 2, worker_id, -1, SQLITE_STATIC);
        sqlite3_step(st);
        sqlite3_reset(st);
    }
    st = store_stmt("SELECT lease_expires_f FROM jobs WHERE id=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) exp = sqlite3_column_double(st, 0);
    sqlite3_reset(st);
    return exp;
}

/* The ranks worker holds of job_id's current lease, for a reason ("rank 1", "ranks 0,1"), with the
 * job's rank count in *world; returns how many workers the gang spans (0: worker holds none). */
static int ranks_held(const char *job_id, const char *worker, char *out, size_t cap, int *world) {
    sqlite3_stmt *st = store_stmt(
        "SELECT GROUP_CONCAT(r.rank, ','), j.ranks, "
        "(SELECT COUNT(DISTINCT worker_id) FROM job_ranks WHERE job_id=?1 AND lease_gen=j.lease_gen) "
        "FROM job_ranks r JOIN jobs j ON j.id=r.job_id WHERE r.job_id=?1 AND r.lease_gen=j.lease_gen "
        "AND r.worker_id=?2 GROUP BY j.id");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, worker, -1, SQLITE_STATIC);
    int nworkers = 0;
    if (sqlite3_step(st) == SQLITE_ROW) {
        const char *ranks = store_col_text(st, 0);
        snprintf(out, cap, "rank%s %s", strchr(ranks, ',') ? "s" : "", ranks);
        *world = sqlite3_column_int(st, 1);
        nworkers = sqlite3_column_int(st, 2);
    }
    sqlite3_reset(st);
    return nworkers;
}

/* Why a lease expired: the worker whose heartbeats stopped first (rank 0's when no rank says), with
 * its ranks when the gang is spread over several workers. */
static void expiry_reason(const char *job_id, const char *worker, char *out, size_t cap) {
    sqlite3_stmt *st = store_stmt("SELECT r.worker_id FROM job_ranks r JOIN jobs j ON j.id=r.job_id WHERE "
                                  "r.job_id=? AND r.lease_gen=j.lease_gen ORDER BY r.expires_f LIMIT 1");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    char silent[40] = "", ranks[200];
    if (sqlite3_step(st) == SQLITE_ROW) snprintf(silent, sizeof silent, "%s", store_col_text(st, 0));
    sqlite3_reset(st);
    int world = 0, nworkers = silent[0] ? ranks_held(job_id, silent, ranks, sizeof ranks, &world) : 0;
    if (nworkers > 1)
        snprintf(out, cap,
                 "Lease expired: worker %s (%s of %d) sent no heartbeat for %.0f s; every rank of the gang "
                 "(%d workers) is released", silent, ranks, world, g_cfg.lease_ttl_s, nworkers);
    else
        snprintf(out, cap, "Lease expired: worker %s sent no heartbeat for %.0f s", worker, g_cfg.lease_ttl_s);
}

/* Ends job_id's running lease now, inside the caller's transaction: the path of every expiry (the
 * attempt it used counts; requeued with backoff, or failed once out of attempts). */
static void end_lease(const char *job_id, const char *reason) {
    sched_requeue(job_id, "lease_expired", reason);
    atomic_fetch_add(&g_expired, 1);
    ln_log(LN_LOG_WARN, "sched", "lease of %s ended (%s)", job_id, reason);
}

/* Requeues one expired lease inside the caller's transaction (re-checked there: a heartbeat may
 * have just extended it); 1 when it did. */
static int expire_one(const char *job_id, const char *worker, double now) {
    sqlite3_stmt *st = store_stmt("SELECT 1 FROM jobs WHERE id=? AND status='running' AND lease_expires_f<?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_bind_double(st, 2, now);
    int still = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_reset(st);
    if (!still) return 0;
    char reason[600];
    expiry_reason(job_id, worker, reason, sizeof reason);
    end_lease(job_id, reason);
    return 1;
}

int sched_expire_lease(const char *job_id) {
    sqlite3_stmt *st = store_stmt("SELECT lease_worker FROM jobs WHERE id=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    char worker[40] = "?";
    if (sqlite3_step(st) == SQLITE_ROW && store_col_text(st, 0)) snprintf(worker, sizeof worker, "%s", store_col_text(st, 0));
    sqlite3_reset(st);
    return expire_one(job_id, worker, sched_wall_now());
}

json_t *sched_end_worker_leases(const char *worker_id) {
    json_t *jobs = json_array();
    sqlite3_stmt *st = store_stmt("SELECT DISTINCT j.id FROM job_ranks r JOIN jobs j ON j.id=r.job_id WHERE "
                                  "r.worker_id=? AND j.status='running' AND r.lease_gen=j.lease_gen ORDER BY j.seq");
    sqlite3_bind_text(st, 1, worker_id, -1, SQLITE_STATIC);
    while (sqlite3_step(st) == SQLITE_ROW) json_array_append_new(jobs, json_string(store_col_text(st, 0)));
    sqlite3_reset(st);
    size_t i;
    json_t *job;
    json_array_foreach(jobs, i, job) {
        const char *id = json_string_value(job);
        char ranks[200] = "its ranks", reason[600];
        int world = 0, nworkers = ranks_held(id, worker_id, ranks, sizeof ranks, &world);
        if (nworkers > 1)
            snprintf(reason, sizeof reason, "Worker %s restarted (new process): its lease of %s of %d ended; every "
                     "rank of the gang (%d workers) is released", worker_id, ranks, world, nworkers);
        else
            snprintf(reason, sizeof reason, "Worker %s restarted (new process): its lease of %s ended", worker_id,
                     ranks);
        end_lease(id, reason);
    }
    return jobs;
}

void sched_requeue(const char *job_id, const char *code, const char *reason) {
    sqlite3_stmt *st = store_stmt("SELECT attempts FROM jobs WHERE id=?");
    sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    int attempts = sqlite3_column_int(st, 0);
    sqlite3_reset(st);
    if (attempts >= g_cfg.max_attempts) {
        char msg[900];
        snprintf(msg, sizeof msg, "%s; gave up after %d attempt%s", reason, attempts, attempts == 1 ? "" : "s");
        json_t *err = json_pack("{s:s, s:s, s:n}", "code", code, "message", msg, "param");
        char *es = json_dumps(err, JSON_COMPACT);
        json_decref(err);
        jobs_set_status(job_id, "running", "failed");
        st = store_stmt("UPDATE jobs SET error=? WHERE id=?");
        sqlite3_bind_text(st, 1, es, -1, free);
        sqlite3_bind_text(st, 2, job_id, -1, SQLITE_STATIC);
        sqlite3_step(st);
        sqlite3_reset(st);
        jobs_event(job_id, "error", "message", NULL, "Job failed: %s", msg);
        return;
    }
    /* Exponential backoff: base * 2^(attempts-1), capped. */
    double backoff = g_cfg.retry_backoff_s * pow(2.0, attempts > 0 ? attempts - 1 : 0);
    if (backoff > g_cfg.retry_backoff_max_s) backoff = g_cfg.retry_backoff_max_s;
    jobs_set_status(job_id, "running", "queued");
    st = store_stmt("UPDATE jobs SET not_before_f=?, lease_worker=NULL WHERE id=?");
    sqlite3_bind_double(st, 1, sched_wall_now() + backoff);
    sqlite3_bind_text(st, 2, job_id, -1, SQLITE_STATIC);
    sqlite3_step(st);
    sqlite3_reset(st);
    jobs_event(job_id, "warn", "message", NULL, "%s; requeued (attempt %d of %d used, retry in %.1f s)", reason,
               attempts, g_cfg.max_attempts, backoff);
}

/* ---------------------------------------------------------------- ticker */

/* Two background threads: the ticker (timers: lease expiry, long-poll deadlines, SSE keep-alives)
 * and the validator (reads new jobs' training files, which may take seconds for a large file —
 * so it must not hold up the timers). Both wait on g_tick_cv; sched_kick wakes them. */
static pthread_t g_thread, g_validator;
static pthread_mutex_t g_tick_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_tick_cv = PTHREAD_COND_INITIALIZER;
static int g_stop, g_kicked, g_validate_kicked;

void sched_kick(void) {
    pthread_mutex_lock(&g_tick_mu);
    g_kicked = 1;
    g_validate_kicked = 1;
    pthread_cond_broadcast(&g_tick_cv);
    pthread_mutex_unlock(&g_tick_mu);
}

/* Waits until kicked (flag), stopped, or timeout_ms passed. Returns 1 when stopping. */
static int wait_kick(int *flag, int timeout_ms) {
    pthread_mutex_lock(&g_tick_mu);
    if (!g_stop && !*flag) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += (long)timeout_ms * 1000 * 1000;
        while (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&g_tick_cv, &g_tick_mu, &ts);
    }
    int stop = g_stop;
    *flag = 0;
    pthread_mutex_unlock(&g_tick_mu);
    return stop;
}

static void expire_leases(void) {
    double now = sched_wall_now();
    sqlite3_stmt *st = store_stmt("SELECT id, lease_worker FROM jobs WHERE status='running' AND lease_expires_f<? LIMIT 100");
    sqlite3_bind_double(st, 1, now);
    char ids[100][40], workers[100][40];
    int n = 0;
    while (n < 100 && sqlite3_step(st) == SQLITE_ROW) {
        snprintf(ids[n], 40, "%s", store_col_text(st, 0));
        snprintf(workers[n], 40, "%s", store_col_text(st, 1));
        n++;
    }
    sqlite3_reset(st);
    for (int i = 0; i < n; i++) {
        if (store_begin() != 0) return;
        int still = expire_one(ids[i], workers[i], now);
        if (store_commit() == 0 && still) jobs_notify(ids[i]);
    }
}

static void validate_new_jobs(void) {
    sqlite3_stmt *st = store_stmt("SELECT j.id, f.sha256, f.id, j.validation_file FROM jobs j JOIN files f "
                                  "ON f.id=j.training_file WHERE j.status='validating_files' ORDER BY j.seq LIMIT 50");
    char ids[50][40], shas[50][65], fids[50][80], vids[50][80];
    int n = 0;
    while (n < 50 && sqlite3_step(st) == SQLITE_ROW) {
        snprintf(ids[n], 40, "%s", store_col_text(st, 0));
        snprintf(shas[n], 65, "%s", store_col_text(st, 1));
        snprintf(fids[n], 80, "%s", store_col_text(st, 2));
        snprintf(vids[n], 80, "%s", store_col_text(st, 3));
        n++;
    }
    sqlite3_reset(st);
    for (int i = 0; i < n; i++) {
        ln_err e;
        char *path = store_blob_path(shas[i]);
        int bad = jobs_validate_jsonl(path, fids[i], &e);
        free(path);
        if (!bad && vids[i][0]) {
            sqlite3_stmt *v = store_stmt("SELECT sha256 FROM files WHERE id=?");
            sqlite3_bind_text(v, 1, vids[i], -1, SQLITE_STATIC);
            char vsha[65] = "";
            if (sqlite3_step(v) == SQLITE_ROW) snprintf(vsha, sizeof vsha, "%s", store_col_text(v, 0));
            sqlite3_reset(v);
            path = store_blob_path(vsha);
            bad = jobs_validate_jsonl(path, vids[i], &e);
            free(path);
        }
        if (store_begin() != 0) return;
        if (bad) {
            if (jobs_set_status(ids[i], "validating_files", "failed")) {
                json_t *err = json_pack("{s:s, s:s, s:s}", "code", "invalid_training_file", "message", e.msg, "param",
                                        "training_file");
                char *es = json_dumps(err, JSON_COMPACT);
                json_decref(err);
                st = store_stmt("UPDATE jobs SET error=? WHERE id=?");
                sqlite3_bind_text(st, 1, es, -1, free);
                sqlite3_bind_text(st, 2, ids[i], -1, SQLITE_STATIC);
                sqlite3_step(st);
                sqlite3_reset(st);
                jobs_event(ids[i], "error", "message", NULL, "File validation failed: %s", e.msg);
            }
        } else if (jobs_set_status(ids[i], "validating_files", "queued")) {
            jobs_event(ids[i], "info", "message", NULL, "Files validated; job queued");
        }
        if (store_commit() == 0) jobs_notify(ids[i]);
    }
}

static void *ticker(void *arg) {
    double last_second = 0;
    while (!wait_kick(&g_kicked, 100)) {
        double now = ln_now_s();
        http_wake_expired(now);
        if (now - last_second >= 1.0) {
            last_second = now;
            expire_leases();
            sse_tick(now);
            /* Retry backoffs end without any event: let waiting workers look at the queue again. */
            http_wake_all();
        }
    }
    store_close();
    return NULL;
}

static void *validator(void *arg) {
    while (!wait_kick(&g_validate_kicked, 500)) validate_new_jobs();
    store_close();
    return NULL;
}

int sched_start(ln_err *e) {
    if (pthread_create(&g_thread, NULL, ticker, NULL) != 0 || pthread_create(&g_validator, NULL, validator, NULL) != 0)
        return ln_errf(e, "cannot start the scheduler threads");
    return 0;
}

void sched_stop(void) {
    pthread_mutex_lock(&g_tick_mu);
    g_stop = 1;
    pthread_cond_broadcast(&g_tick_cv);
    pthread_mutex_unlock(&g_tick_mu);
    pthread_join(g_thread, NULL);
    pthread_join(g_validator, NULL);
}

void sched_metrics_render(char **b, size_t *l, size_t *c) {
    http_buf_printf(b, l, c,
                    "# HELP loranull_leases_granted_total Jobs leased (all ranks of a gang count once).\n"
                    "# TYPE loranull_leases_granted_total counter\nloranull_leases_granted_total %lu\n"
                    "# HELP loranull_lease_expirations_total Leases that expired without heartbeats, or that ended at "
                    "once because their worker restarted.\n"
                    "# TYPE loranull_lease_expirations_total counter\nloranull_lease_expirations_total %lu\n",
                    atomic_load(&g_granted), atomic_load(&g_expired));
    sqlite3_stmt *st = store_stmt("SELECT COUNT(*) FROM jobs WHERE status='queued' AND gang_wait=?");
    http_buf_printf(b, l, c,
                    "# HELP loranull_gang_waits Queued jobs the scheduler cannot place yet, by reason: holding (free "
                    "devices are held for them, the oldest of their pool) or capacity (they need more devices than "
                    "the live workers have; nothing is held).\n# TYPE loranull_gang_waits gauge\n");
    static const char *const reasons[] = {"holding", "capacity"};
    for (int i = 0; i < 2; i++) {
        sqlite3_bind_text(st, 1, reasons[i], -1, SQLITE_STATIC);
        long long n = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
        sqlite3_reset(st);
        http_buf_printf(b, l, c, "loranull_gang_waits{reason=\"%s\"} %lld\n", reasons[i], n);
    }
}
