-- Pipeline-trigger handler (seed 004): one row per trigger, whichever replica claimed or delivered
-- it. The trigger id (`<consumer_id>:<seq>`) is derived from the sequence number claimed atomically
-- in Redis, so a trigger is recorded once however often it is retried.

CREATE TABLE IF NOT EXISTS pipeline_runs (
    trigger_id     TEXT PRIMARY KEY,
    consumer_id    TEXT NOT NULL,
    pipeline_name  TEXT NOT NULL,
    seq            BIGINT NOT NULL CHECK (seq >= 1),
    -- `count`: maxEvents events were counted; `time`: maxTimeSeconds passed since the last trigger.
    reason         TEXT NOT NULL CHECK (reason IN ('count', 'time')),
    event_count    BIGINT NOT NULL CHECK (event_count >= 0),
    window_start   TIMESTAMPTZ NOT NULL,
    window_end     TIMESTAMPTZ NOT NULL,
    -- `webhook` or `job`.
    target         TEXT NOT NULL CHECK (target IN ('webhook', 'job')),
    -- `pending` until delivered (`delivered`) or given up after the retries (`failed`).
    status         TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    -- Name of the Job created (job target).
    job_name       TEXT,
    claimed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at   TIMESTAMPTZ,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (consumer_id, seq)
);

CREATE INDEX IF NOT EXISTS pipeline_runs_pending ON pipeline_runs (consumer_id) WHERE status = 'pending';
