-- Pipeline-trigger: the W3C trace contexts of a window's first traced messages (JSON array of
-- {"traceparent", "tracestate"?}, at most 16), so a trigger restored from here after Redis lost
-- its data is still delivered within its messages' trace. Empty when no message was traced.
ALTER TABLE pipeline_runs ADD COLUMN IF NOT EXISTS traces JSONB NOT NULL DEFAULT '[]'::jsonb;
