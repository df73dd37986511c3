-- Offsets of every consumer group, stored in the same transaction as the results they cover.
-- next_offset is the offset of the next message to apply: every message below it has its effect
-- committed. Updates are compare-and-set against the value the writer last knew (fencing).
CREATE TABLE IF NOT EXISTS streamops_offsets (
    consumer_group TEXT        NOT NULL,
    topic          TEXT        NOT NULL,
    partition      INTEGER     NOT NULL,
    next_offset    BIGINT      NOT NULL CHECK (next_offset >= 0),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Every message routed to the error topic, recorded in the transaction of its batch, so that
-- consumed input = handler rows + rejections can be reconciled exactly.
CREATE TABLE IF NOT EXISTS streamops_rejections (
    consumer_group TEXT        NOT NULL,
    topic          TEXT        NOT NULL,
    partition      INTEGER     NOT NULL,
    "offset"       BIGINT      NOT NULL,
    reason         TEXT        NOT NULL,
    detail         TEXT        NOT NULL,
    payload_bytes  INTEGER     NOT NULL,
    error_topic    TEXT        NOT NULL,
    rejected_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition, "offset")
);
