-- 003_pause_grace.sql — when a running job is paused, its worker may still upload a last
-- checkpoint (files, checkpoints, events) under its lease generation for --pause-grace-s; this is
-- when the pause happened.
ALTER TABLE jobs ADD COLUMN paused_at_f REAL;
