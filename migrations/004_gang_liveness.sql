-- 004_gang_liveness.sql — gangs spread over workers.
-- job_ranks.expires_f: when the lease of this rank's worker ends unless it heartbeats (a heartbeat
-- that names its worker_id extends only that worker's ranks); jobs.lease_expires_f is the earliest
-- of them, so one silent worker requeues the whole gang.
-- jobs.gang_wait: what the scheduler last said (as an event) about a queued job it cannot place yet:
-- 'holding' (free devices are held for it: strict FIFO) or 'capacity' (the live workers cannot hold
-- it at all, so nothing is held); NULL once leased. Only a change writes a new event.
ALTER TABLE job_ranks ADD COLUMN expires_f REAL;
ALTER TABLE jobs ADD COLUMN gang_wait TEXT;
