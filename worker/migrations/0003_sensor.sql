-- Sensor handler (seed 002): machines, their readings, and failure episodes.
-- Every key is derived from the source topic/partition/offset, never from a sequence, so a replay,
-- a restart or a rebalance produces exactly the same rows as an uninterrupted run.

CREATE TABLE IF NOT EXISTS machines (
    machine_id  TEXT PRIMARY KEY,
    -- Earliest and latest reading timestamps received (late readings included in first_seen).
    first_seen  TIMESTAMPTZ NOT NULL,
    last_seen   TIMESTAMPTZ NOT NULL,
    -- Source position of the last reading applied: a replayed reading at or below it is skipped.
    applied_topic      TEXT NOT NULL,
    applied_partition  INTEGER NOT NULL,
    applied_offset     BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS failures (
    -- `topic:partition:offset` of the reading that opened the episode.
    failure_id         TEXT PRIMARY KEY,
    machine_id         TEXT NOT NULL REFERENCES machines (machine_id),
    started_at         TIMESTAMPTZ NOT NULL,
    -- NULL while the episode is open; the timestamp of the first healthy reading after it.
    ended_at           TIMESTAMPTZ,
    active             BOOLEAN NOT NULL,
    opened_topic       TEXT NOT NULL,
    opened_partition   INTEGER NOT NULL,
    opened_offset      BIGINT NOT NULL,
    closed_topic       TEXT,
    closed_partition   INTEGER,
    closed_offset      BIGINT,
    CONSTRAINT failures_active_iff_open CHECK (active = (ended_at IS NULL)),
    -- A machine has at most one open episode (checked at commit).
    CONSTRAINT failures_one_open_per_machine
        EXCLUDE USING btree (machine_id WITH =) WHERE (active) DEFERRABLE INITIALLY DEFERRED
);

CREATE INDEX IF NOT EXISTS failures_machine_started ON failures (machine_id, started_at);

-- One row per reading. machine_id and failure_id are maintained by the handler in the same
-- transaction as the machines and failures rows; they carry no foreign keys, whose per-row checks
-- would nearly double the cost of ingesting readings.
CREATE TABLE IF NOT EXISTS sensor_readings (
    source_topic      TEXT NOT NULL,
    source_partition  INTEGER NOT NULL,
    source_offset     BIGINT NOT NULL,
    machine_id        TEXT NOT NULL,
    reading_time      TIMESTAMPTZ NOT NULL,
    -- The message's `readings` object: sensor name -> number.
    sensor_values     JSONB NOT NULL,
    failure           BOOLEAN NOT NULL,
    -- The episode the reading belongs to, if any.
    failure_id        TEXT,
    -- Older than the machine's latest reading when it arrived (see the sensor module docs).
    late              BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (source_topic, source_partition, source_offset)
);

CREATE INDEX IF NOT EXISTS sensor_readings_machine_time ON sensor_readings (machine_id, reading_time);
CREATE INDEX IF NOT EXISTS sensor_readings_failure ON sensor_readings (failure_id) WHERE failure_id IS NOT NULL;
