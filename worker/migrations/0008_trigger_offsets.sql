-- Pipeline-trigger: what a triggered pipeline reads for exactly its window. One JSON object per
-- partition: {"topic", "partition", "first_offset", "last_offset", "events"}, the window's first
-- and last counted event in that partition (both included) and their number.
ALTER TABLE pipeline_runs ADD COLUMN IF NOT EXISTS offsets JSONB NOT NULL DEFAULT '[]'::jsonb;
