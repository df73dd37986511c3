-- Gaps in the offsets of a partition: messages the worker never saw because Kafka no longer has
-- them. Recorded in the same transaction as the batch that moved past the gap (onOffsetGap: skip),
-- or in a transaction of its own before the worker stops (onOffsetGap: fail).
--   [from_offset, to_offset) is the range of offsets never processed:
--   - retention: the stored next_offset lies below the log start; the range is
--     [stored next_offset, first offset read);
--   - reset: the stored next_offset lies beyond the log end (topic recreated, cluster restored or
--     mirrored); the range is [first offset of the new log, stored next_offset): those offsets
--     of the new log are not applied, since their source positions already have rows.
CREATE TABLE IF NOT EXISTS streamops_offset_gaps (
    consumer_group TEXT        NOT NULL,
    topic          TEXT        NOT NULL,
    partition      INTEGER     NOT NULL,
    from_offset    BIGINT      NOT NULL,
    to_offset      BIGINT      NOT NULL,
    -- `retention`: messages deleted before they were processed; `reset`: the stored offset lies
    -- beyond the end of the log.
    kind           TEXT        NOT NULL CHECK (kind IN ('retention', 'reset')),
    -- `skip`: the worker moved on; `fail`: the worker stopped at the gap.
    action         TEXT        NOT NULL CHECK (action IN ('skip', 'fail')),
    detected_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition, from_offset, to_offset, kind)
);
