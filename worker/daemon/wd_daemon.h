/* wd_daemon.h — loranull-worker's protocol loop (proto: server/api_internal.c, /internal/v1).
 *
 *   register ─▶ lease (long-poll) ─▶ download files ─▶ run the job (wd_run thread) ─▶ upload results ─▶ complete
 *                 ▲                                        │ heartbeats, event/metric batches,          │
 *                 └────────────────────────────────────────┴ checkpoint uploads, all concurrently ──────┘
 *
 * One libuv loop drives everything: a 100 ms tick and an async wake-up (the job thread) call
 * pump(), which starts whatever is due; each HTTP callback updates the state and pumps again.
 * Rules:
 *  - A 409 on any report means the lease is gone: " is cancelled" → cancel, " is paused" → pause,
 *    otherwise lost (expired, superseded). The job thread stops within one step; nothing more is
 *    sent for that lease. A paused job's last checkpoint stays in the work dir, so this worker
 *    continues from it when the job is resumed here.
 *  - The server unreachable (status 0): training goes on, reports stay in the bounded outbox and
 *    are retried with backoff (1 s doubling to 15 s); heartbeats keep trying; when the server
 *    answers again, either the lease is still ours and the backlog is sent, or it is gone and the
 *    job stops.
 *  - SIGTERM/SIGINT: idle → exit 0 at once. Running → the job stops at the next step with a
 *    checkpoint, which is uploaded, the outbox is flushed, the lease is released (POST
 *    jobs/{id}/release: the job is queued again without using an attempt and resumes from that
 *    checkpoint elsewhere) and the process exits 0 — or, past --grace-s, exits 1. A second signal
 *    exits at once.
 *  - A gang split over workers (the lease lists one rank of world_size here): the ranks first
 *    meet through the server's rendezvous (wd_gang.h) and join one group — comm_tcp between CPU
 *    workers, NCCL between GPU workers (one GPU each: a GPU worker refuses --ranks > 1 at start;
 *    a build without NCCL fails such a lease with unsupported_resources) — before the downloads, so a slow download on one worker cannot run out the others'
 *    rendezvous time — and the run trains only this rank (wd_run.comm). Every rank heart-beats
 *    with its worker_id; only rank 0 uploads checkpoints and results and completes. A rank ≠ 0
 *    whose run is over goes on heart-beating (the server requeues a gang whose worker falls
 *    silent, e.g. during rank 0's upload) until rank 0's report ends the lease, and ends without
 *    a report of its own. A run that fails because a peer's connection ended (TCP: the peer named;
 *    NCCL: its remote error, no rank named) reports, retryable
 *    (rank_lost), PEER_FAIL_GRACE_S later, so the rank with the real cause reports first (the
 *    later report is refused and ignored). Cancel or a lost lease on any rank aborts its comm,
 *    so the others' collectives fail at once. A pause or SIGTERM on any rank stops every rank
 *    after the same step (the trainer agrees on a stop any rank sees); rank 0 uploads that
 *    step's checkpoint and, for SIGTERM, releases the job.
 *  - The worker id the server gave is kept in <work-dir>/worker_id: a restarted daemon registers
 *    again under the same id (one work dir per worker), with a new random `instance` (one per
 *    process start), so the server ends the leases the old process held at once (their jobs are
 *    requeued and resume from their last checkpoint) rather than after the lease TTL. */
#ifndef WD_DAEMON_H
#define WD_DAEMON_H

#include "common/err.h"

typedef struct wd_config {
    const char *server;        /* base URL */
    const char *token;         /* worker token (read from --token-file) */
    const char *models_dir;
    const char *device;        /* "cpu" or "cuda:N" */
    const char *work_dir;
    const char *name;          /* shown in the server's logs; default: host name */
    int ranks;                 /* devices offered (default 1) */
    double grace_s;            /* SIGTERM grace (default 25 s, inside Kubernetes' 30 s) */
    double lease_wait_s;       /* long-poll length asked for (default 20 s) */
    double heartbeat_max_s;    /* heartbeat at least this often (default 2 s) */
    double flush_interval_s;   /* event/metric batches at most this often (default 0.5 s) */
    int once;                  /* exit after one job (tests) */
    const char *advertise_host; /* where the other ranks of a gang reach this worker (default 127.0.0.1) */
    int comm_port_lo, comm_port_hi; /* rank 0's listener port range (0, 0 = any free port) */
    double rendezvous_timeout_s;    /* a gang's ranks must find each other within this (default 120 s) */
} wd_config;

/* Runs the worker until a signal (or, with once, one job) ends it. Returns the exit code. */
int wd_daemon_run(const wd_config *cfg, ln_err *e);

#endif
