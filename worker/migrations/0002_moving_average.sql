-- moving-average handler.
-- Key text columns use the "C" collation: byte order is all a key needs, and it keeps index
-- maintenance cheap whatever the database's default collation is.
-- One row per valid price event. The primary key serves the window rebuild query (last N-1
-- points of a symbol in a partition, newest first) and rejects a second write of a message.
CREATE TABLE IF NOT EXISTS price_points (
    topic           TEXT COLLATE "C" NOT NULL,
    partition       INTEGER          NOT NULL,
    symbol          TEXT COLLATE "C" NOT NULL,
    "offset"        BIGINT           NOT NULL,
    price           DOUBLE PRECISION NOT NULL,
    event_time      TIMESTAMPTZ      NOT NULL,
    source          TEXT,
    raw_response_id TEXT,
    PRIMARY KEY (topic, partition, symbol, "offset")
);

-- One row per price event whose symbol window holds N points (the event and the N-1 before it,
-- in offset order within the partition).
CREATE TABLE IF NOT EXISTS moving_averages (
    topic          TEXT COLLATE "C" NOT NULL,
    partition      INTEGER          NOT NULL,
    "offset"       BIGINT           NOT NULL,
    symbol         TEXT             NOT NULL,
    window_size    INTEGER          NOT NULL,
    average        DOUBLE PRECISION NOT NULL,
    event_time     TIMESTAMPTZ      NOT NULL,
    PRIMARY KEY (topic, partition, "offset")
);
