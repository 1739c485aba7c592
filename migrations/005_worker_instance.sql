-- 005_worker_instance.sql — restarted worker daemons.
-- workers.instance: the random id the worker daemon process that registered last sent (a new one per
-- process start; NULL from daemons that send none). A re-registration under the same worker id with
-- another instance means the old process is gone: the leases it held end at once (sched.h, Restarts)
-- instead of after the lease TTL.
ALTER TABLE workers ADD COLUMN instance TEXT;
