-- Fraud handler (seed 003): validated transactions and their predictions.
-- transaction_id is the idempotency key: a transaction is stored once, with the position of the
-- first message that carried it.

CREATE TABLE IF NOT EXISTS transactions (
    transaction_id     TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL,
    merchant           TEXT NOT NULL,
    merchant_category  TEXT,
    amount             NUMERIC(20, 4) NOT NULL CHECK (amount > 0),
    currency           CHAR(3) NOT NULL,
    country            CHAR(2),
    card_present       BOOLEAN,
    transaction_time   TIMESTAMPTZ NOT NULL,
    source_topic       TEXT NOT NULL,
    source_partition   INTEGER NOT NULL,
    source_offset      BIGINT NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS transactions_created_at ON transactions (created_at);
CREATE INDEX IF NOT EXISTS transactions_account_time ON transactions (account_id, transaction_time);

-- One prediction per stored transaction, written by the handler in the same transaction as it.
-- No foreign key: its per-row check would triple the cost of storing predictions.
CREATE TABLE IF NOT EXISTS predictions (
    transaction_id  TEXT PRIMARY KEY,
    fraud_score     DOUBLE PRECISION NOT NULL CHECK (fraud_score >= 0 AND fraud_score <= 1),
    -- fraud_score >= threshold
    is_fraud        BOOLEAN NOT NULL,
    -- The handler's fraudThreshold when the prediction was stored.
    threshold       DOUBLE PRECISION NOT NULL,
    -- seed 003 groups by this column.
    prediction      TEXT GENERATED ALWAYS AS (CASE WHEN is_fraud THEN 'fraud' ELSE 'legitimate' END) STORED,
    model_version   TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS predictions_created_at ON predictions (created_at);
