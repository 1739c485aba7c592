-- 002_jobs_queue_index.sql — the scheduler looks for queued jobs model by model (the models the
-- waiting workers hold), oldest first; without this index a long queue of jobs for models no
-- worker has would be scanned at every lease call.
CREATE INDEX jobs_queue ON jobs(status, model, seq);
