-- Replay (issue 17): a reset of the offsets of record to earlier positions, with the handlers'
-- derived rows at and after those positions deleted so that processing them again gives the
-- tables of an uninterrupted run.

-- One row per replay request, written in the transaction that performs it, so a request runs
-- once however often it is submitted (operator retries, a re-run Job, the command run twice).
CREATE TABLE IF NOT EXISTS streamops_replays (
    consumer_group TEXT        NOT NULL,
    request_id     TEXT        NOT NULL,
    -- `earliest`, `timestamp:<ms>` or `offsets`.
    target         TEXT        NOT NULL,
    -- The positions written: [{"topic", "partition", "offset"}], in topic/partition order.
    positions      JSONB       NOT NULL,
    -- Per table, rows deleted.
    deleted        JSONB       NOT NULL,
    applied_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- When the positions were committed to Kafka (advisory); NULL until then, so a run interrupted
    -- between the transaction and the commit completes the commit when the request comes again.
    kafka_committed_at TIMESTAMPTZ,
    PRIMARY KEY (consumer_group, request_id)
);

-- pipeline-trigger keeps no row per event (it counts in Redis), so a replay could not tell how
-- many events lie before a reset point. Each committed batch records, per partition, the offsets
-- of the valid events it counted, in the batch's own transaction: the number of events before any
-- position is then known exactly, and with it the trigger sequence and window to restore.
CREATE TABLE IF NOT EXISTS pipeline_trigger_counted (
    consumer_id  TEXT     NOT NULL,
    topic        TEXT     NOT NULL,
    partition    INTEGER  NOT NULL,
    first_offset BIGINT   NOT NULL,
    offsets      BIGINT[] NOT NULL,
    PRIMARY KEY (consumer_id, topic, partition, first_offset)
);
