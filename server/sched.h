/* sched.h — the scheduler: leases, gangs, expiry, retries, and the background ticker.
 *
 * Leasing. An idle worker long-polls POST /internal/v1/lease with how many devices it has free.
 * Workers waiting right now form the pool. For each queued job (oldest first, past its retry
 * backoff) the scheduler looks for pool workers that hold the job's model and a matching device
 * kind; a job of `ranks` ranks is granted only when they have `ranks` free devices in total —
 * all ranks are leased together, in one transaction, or none (gang scheduling). One worker with
 * enough devices takes every rank; otherwise ranks are spread, the asking worker first.
 * Every grant bumps the job's lease generation and its attempt count. A worker's devices that ranks
 * of running jobs hold are busy whatever free_devices it sends.
 *
 * Order. Strict first in, first out per pool: when the oldest job some waiting worker could run
 * does not fit in the free devices that fit it, those devices are held for it (no younger job gets
 * them), so a gang waits only for the jobs already running there, never for a stream of younger
 * single-rank jobs. Nothing is held for a job the live workers could not hold even all idle. The
 * job's events say which, once per change (jobs.gang_wait).
 *
 * Expiry. A lease lives lease_ttl_s past the last heartbeat. An expired job goes back to the queue
 * with a backoff of retry_backoff_s * 2^(attempts-1) (capped), and fails with the reason once it
 * has had max_attempts leases. A worker's report for a job that is not running under the
 * generation it carries, or whose lease is past its expiry time when the report arrives (the
 * sweep may not have run yet), is refused (409 lease_lost). */
#ifndef LN_SCHED_H
#define LN_SCHED_H

#include <jansson.h>

#include "common/err.h"

/* Wall clock in seconds with a fraction (leases survive a restart, so not the monotonic clock). */
double sched_wall_now(void);

/* Tries to lease work to worker_id (which has free_devices free now). Returns a new lease object
 * (job, generation, ranks…) or NULL when there is nothing for it; -1 in *err_status on a bad
 * worker (404 unknown). */
json_t *sched_lease(const char *worker_id, int free_devices, int *err_status, ln_err *e);

/* Validates a lease inside the caller's transaction: 0 when job is running under gen — or, with
 * pause_grace, when it was paused while running under gen less than pause_grace_s ago (so the
 * worker can save a last checkpoint) — else -1 with a reason in e (state or stale generation). */
int sched_check_lease(const char *job_id, long long gen, int pause_grace, ln_err *e);
/* sched_check_lease's answer for a running job under gen whose lease is past its expiry time (the
 * sweep has not run yet): the report is refused like a stale one, and the caller, inside its
 * transaction, requeues the job at once with sched_expire_lease. */
#define SCHED_LEASE_EXPIRED (-2)
/* Gangs. A heartbeat that names its worker keeps that worker's ranks alive; the lease lives while
 * every worker of the gang heartbeats (it ends at the earliest of their expiries), so one silent
 * worker requeues the whole gang. Inside the caller's transaction, after sched_check_lease. */
/* Records a heartbeat of worker_id (NULL: for every rank, the protocol before gangs spread over
 * workers) and returns the lease's new expiry (unix s). */
double sched_heartbeat(const char *job_id, long long gen, const char *worker_id);
/* How many ranks of job_id under gen worker_id holds (0: none); *holds_rank0 whether rank 0. */
int sched_gang_ranks(const char *job_id, long long gen, const char *worker_id, int *holds_rank0);
/* How many workers the gang of job_id under gen spans; rank0_worker gets rank 0's worker id. */
int sched_gang_workers(const char *job_id, long long gen, char rank0_worker[40]);

/* Requeues job_id if its lease is past expiry, inside the caller's transaction; 1 when it did. */
int sched_expire_lease(const char *job_id);

/* Restarts. A worker daemon re-registering under its old id from a new process (another `instance`)
 * left every lease the old process held behind: each running job of which worker_id holds a rank
 * under the current generation — the whole gang, as when a rank's worker falls silent — ends now,
 * exactly as if it had expired now (the attempt counts; backoff, or failed at max_attempts), with
 * an event naming the restart. Inside the caller's transaction; returns the ids of the jobs ended
 * (a new array, owned by the caller: notify them after the commit). */
json_t *sched_end_worker_leases(const char *worker_id);

/* Puts a running job back in the queue (or fails it when out of attempts), inside the caller's
 * transaction. reason is for the event and the final error. */
void sched_requeue(const char *job_id, const char *code, const char *reason);

/* Starts/stops the ticker thread (lease expiry, long-poll and SSE timers) and the validator thread
 * (new jobs' training files: validating_files → queued or failed). */
int sched_start(ln_err *e);
void sched_stop(void);
/* Prometheus counters of leases granted and expired (appended to buf). */
void sched_metrics_render(char **buf, size_t *len, size_t *cap);
/* Wakes both now (a job was created). */
void sched_kick(void);

#endif
