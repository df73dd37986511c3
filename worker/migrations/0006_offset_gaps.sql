-- Gaps in the offsets of a partition: messages the worker never saw because Kafka no longer has
-- them. Recorded in the same transaction as the batch that moved past the gap (onOffsetGap: skip),
-- or in a transaction of its own before the worker stops (onOffsetGap: fail).
--   from_offset..to_offset (to exclusive) is the range that was skipped or would be skipped:
--   - retention: the stored next_offset lies below the log start; the range is
--     [stored next_offset, log start offset);
--   - reset: the stored next_offset lies beyond the log end (topic recreated, cluster restored or
--     mirrored); the range is [stored next_offset, stored next_offset) shifted to where reading
--     resumes, i.e. from_offset = stored next_offset, to_offset = the offset reading resumes at
--     (lower than from_offset), and kind tells them apart.
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
