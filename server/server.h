/* server.h — loranull-server's configuration, shared by its modules.
 * Set once by main.c (defaults, then --config FILE, then flags) before the daemon starts;
 * read-only afterwards. */
#ifndef LN_SERVER_H
#define LN_SERVER_H

#include <stddef.h>
#include <stdint.h>

typedef struct srv_config {
    char listen_host[256];
    int port;
    /* --internal-listen: when set, /internal/v1 is served only there (and not on --listen), so a
     * NetworkPolicy — L3/L4 only — can keep workers' routes away from users. "" = unset: one
     * listener serves everything. */
    char internal_host[256];
    int internal_port;
    char data_dir[4096];
    char migrations_dir[4096];   /* default: <exe>/../migrations, then /usr/share/loranull/migrations */
    char static_dir[4096];       /* dashboard files, served at / and /static/ */
    char chartjs_dir[4096];      /* Debian libjs-chart.js, served at /vendor/chart.js */
    size_t max_body_bytes;       /* JSON request bodies (default 1 MiB) */
    uint64_t max_upload_bytes;   /* file uploads and artifacts (default 1 GiB) */
    double lease_ttl_s;          /* a lease expires this long after the last heartbeat (default 30) */
    int max_attempts;            /* leases per job before it fails (default 3) */
    double retry_backoff_s;      /* backoff after attempt k: retry_backoff_s * 2^(k-1) (default 1) */
    double retry_backoff_max_s;  /* cap of that backoff (default 60) */
    double lease_wait_max_s;     /* longest long-poll a worker may ask for (default 30) */
    double worker_timeout_s;     /* a worker unseen this long is not alive (default 60) */
    double sse_keepalive_s;      /* keep-alive comment period on idle streams (default 15) */
    double pause_grace_s;        /* a paused job's worker may still save a checkpoint this long (default 60) */
    int threads;                 /* HTTP thread pool size (default 4) */
    int log_requests;            /* one log line per request (default on) */
} srv_config;

extern srv_config g_cfg;

#endif
