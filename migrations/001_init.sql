-- 001_init.sql — the first schema of loranull-server.
-- Applied once, in a transaction, and recorded in schema_migrations (created by the server).
-- Times are unix seconds (INTEGER) unless named *_at_f (REAL, sub-second, for leases).

CREATE TABLE projects (
    id          TEXT PRIMARY KEY,            -- proj_<24 alnum>
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

-- API keys: only the SHA-256 of the key is kept; the key is printed once at creation.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,            -- key_<24 alnum>
    project_id  TEXT NOT NULL REFERENCES projects(id),
    key_hash    TEXT NOT NULL UNIQUE,        -- hex sha256 of the whole key
    prefix      TEXT NOT NULL,               -- first characters, to recognise a key in listings
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

-- Worker tokens reach only /internal/v1.
CREATE TABLE worker_tokens (
    id          TEXT PRIMARY KEY,            -- wtok_<24 alnum>
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

-- Uploaded files and job artifacts. Bytes live content-addressed in <data>/blobs/<sha[0:2]>/<sha>.
CREATE TABLE files (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,        -- file-<24 alnum>
    project_id  TEXT NOT NULL REFERENCES projects(id),
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,               -- fine-tune | fine-tune-results | fine-tune-checkpoint
    bytes       INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    job_id      TEXT,                        -- set for artifacts a job produced
    created_at  INTEGER NOT NULL
);
CREATE INDEX files_by_project ON files(project_id, seq);
CREATE INDEX files_by_sha ON files(sha256);

-- Jobs. spec is the normalised job spec (proto/jobspec.c), the one source of truth for the worker.
CREATE TABLE jobs (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,    -- ftjob-<24 alnum>
    project_id      TEXT NOT NULL REFERENCES projects(id),
    status          TEXT NOT NULL CHECK (status IN
                      ('validating_files','queued','running','paused','succeeded','failed','cancelled')),
    model           TEXT NOT NULL,
    spec            TEXT NOT NULL,
    training_file   TEXT NOT NULL,
    validation_file TEXT,
    calibration_file TEXT,
    ranks           INTEGER NOT NULL DEFAULT 1,
    device          TEXT NOT NULL DEFAULT 'any',
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    fine_tuned_model TEXT,
    trained_tokens  INTEGER,
    error           TEXT,                    -- JSON {"code","message","param"} when failed
    attempts        INTEGER NOT NULL DEFAULT 0,  -- leases handed out so far
    not_before_f    REAL NOT NULL DEFAULT 0,     -- retry backoff: not leased before this time
    lease_gen       INTEGER NOT NULL DEFAULT 0,  -- bumped at every lease and every revocation
    lease_expires_f REAL,
    lease_worker    TEXT                     -- worker holding rank 0
);
CREATE INDEX jobs_by_project ON jobs(project_id, seq);
CREATE INDEX jobs_by_status ON jobs(status, seq);

-- Which worker holds which rank of a running job, for the lease generation it was given.
CREATE TABLE job_ranks (
    job_id      TEXT NOT NULL,
    rank        INTEGER NOT NULL,
    worker_id   TEXT NOT NULL,
    lease_gen   INTEGER NOT NULL,
    delivered   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, rank)
);
CREATE INDEX job_ranks_by_worker ON job_ranks(worker_id, delivered);

CREATE TABLE result_files (
    job_id      TEXT NOT NULL,
    file_id     TEXT NOT NULL,
    PRIMARY KEY (job_id, file_id)
);

CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,   -- event id is "ftevent-<seq>"
    job_id      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    level       TEXT NOT NULL CHECK (level IN ('info','warn','error')),
    type        TEXT NOT NULL DEFAULT 'message',     -- message | metrics
    message     TEXT NOT NULL,
    data        TEXT                                  -- JSON object or NULL
);
CREATE INDEX events_by_job ON events(job_id, seq);

CREATE TABLE checkpoints (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,                 -- ftckpt-<24 alnum>
    job_id      TEXT NOT NULL,
    step        INTEGER NOT NULL,
    files       TEXT NOT NULL,                        -- JSON array of file ids
    metrics     TEXT,                                 -- JSON object
    created_at  INTEGER NOT NULL
);
CREATE INDEX checkpoints_by_job ON checkpoints(job_id, seq);

-- Metric time series: one row per (job, name, step).
CREATE TABLE metrics (
    job_id      TEXT NOT NULL,
    name        TEXT NOT NULL,
    step        INTEGER NOT NULL,
    value       REAL NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (job_id, name, step)
);

CREATE TABLE workers (
    id              TEXT PRIMARY KEY,                 -- wrk_<24 alnum>
    name            TEXT NOT NULL,
    token_id        TEXT NOT NULL,
    device_kind     TEXT NOT NULL,                    -- cpu | cuda
    devices         INTEGER NOT NULL,
    memory_bytes    INTEGER NOT NULL DEFAULT 0,
    info            TEXT,                             -- JSON as registered
    registered_at   INTEGER NOT NULL,
    last_seen_f     REAL NOT NULL
);

CREATE TABLE worker_models (
    worker_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    PRIMARY KEY (worker_id, model)
);

-- Rendezvous key/values of multi-rank jobs (rank 0 posts the NCCL unique id), per lease generation.
CREATE TABLE rendezvous (
    job_id      TEXT NOT NULL,
    lease_gen   INTEGER NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (job_id, lease_gen, key)
);

-- /readyz proves the database is writable by inserting and deleting a row here.
CREATE TABLE readiness_probe (at INTEGER);
