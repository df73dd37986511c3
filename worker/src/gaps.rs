//! Gaps in a partition's offsets: messages Kafka no longer has when the worker reaches them.
//!
//! Where they come from:
//! - **retention**: the stored `next_offset` lies below the log start (retention or
//!   `DeleteRecords` removed messages before they were processed). librdkafka finds the fetch
//!   offset out of range and resets to the log start (or end): the first message of the partition
//!   arrives *above* the stored offset.
//! - **reset**: the stored `next_offset` lies beyond the log end (the topic was deleted and
//!   recreated with fewer messages, the cluster restored or mirrored). The first message arrives
//!   *below* the stored offset, and used to be dropped as "already applied" without a trace. The
//!   new log's offsets below the stored one are still not applied (their source positions have
//!   rows from the old log, which every handler keys on), but they are now the recorded gap:
//!   `[first offset of the new log, stored offset)`. Reading resumes once the log reaches the
//!   stored offset.
//!
//! Detection is cheap: only when a partition's first message in a batch is not at the known
//! `next_offset` does the writer ask the broker for the partition's watermarks ([`classify`]
//! decides). A jump over compacted-away messages or transaction markers is not a gap: the log
//! start is not past the stored offset. (A recreated topic that already grew past the stored
//! offset when the worker reads it again cannot be told apart from the old one without topic ids:
//! Kafka serves the new messages from the stored offset on.)
//!
//! What follows a detection (`spec.kafka.onOffsetGap`): the gap is logged with its range, counted
//! in `streamops_offset_gaps_total{topic,kind}`, recorded in `streamops_offset_gaps` (in the batch's
//! transaction under `skip`), and attached to the partition's advisory Kafka commit for the
//! operator's `OffsetGap` condition; then `skip` goes on with the next available message and
//! `fail` stops the worker with an error naming the gap.

use std::collections::HashMap;

use sqlx::PgConnection;
use streamops_crds::gap::{GapKind, GapNote, GAP_REPORT_SECONDS};
use streamops_crds::v1alpha1::OnOffsetGap;

use crate::handlers::TopicPartition;

/// A gap found in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The partition.
    pub tp: TopicPartition,
    /// Why, and the range.
    pub kind: GapKind,
    /// First offset never processed: retention, the stored `next_offset`; reset, the first
    /// offset of the new log.
    pub from: i64,
    /// End (exclusive) of the range never processed: retention, the first offset available;
    /// reset, the stored `next_offset` (reading resumes there once the new log reaches it).
    pub to: i64,
    /// What the spec says to do.
    pub action: OnOffsetGap,
}

impl Gap {
    /// The note reported with the partition's advisory commits.
    pub fn note(&self, detected_at: i64) -> GapNote {
        GapNote {
            kind: self.kind,
            from: self.from,
            to: self.to,
            skipped: self.action == OnOffsetGap::Skip,
            detected_at,
        }
    }

    /// A sentence for logs and errors.
    pub fn describe(&self) -> String {
        self.note(0).describe(&self.tp.topic, self.tp.partition)
    }
}

/// Whether the first message of a partition at offset `first`, when the stored offset is `next`
/// and the broker reports the watermarks `low..high`, reveals a gap; `None` when it does not
/// (compaction, transaction markers, or messages below `next` that were already applied).
pub fn classify(next: i64, first: i64, low: i64, high: i64) -> Option<(GapKind, i64, i64)> {
    if first > next && low > next {
        // Everything below the log start is gone; reading resumed at `first`.
        Some((GapKind::Retention, next, first))
    } else if first < next && high < next {
        // The new log's offsets below the stored one are never applied: their source positions
        // already have rows from the old log.
        Some((GapKind::Reset, first, next))
    } else {
        None
    }
}

/// Records `gap` (the same gap detected again is recorded once).
pub async fn record(conn: &mut PgConnection, group: &str, gap: &Gap) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO streamops_offset_gaps
            (consumer_group, topic, partition, from_offset, to_offset, kind, action)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(&*gap.tp.topic)
    .bind(gap.tp.partition)
    .bind(gap.from)
    .bind(gap.to)
    .bind(gap.kind.as_str())
    .bind(gap.action.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// The latest gap of each of `partitions` detected within [`GAP_REPORT_SECONDS`], to report
/// again after an assignment.
pub async fn load_recent(
    conn: &mut PgConnection,
    group: &str,
    partitions: &[TopicPartition],
) -> Result<HashMap<TopicPartition, GapNote>, sqlx::Error> {
    if partitions.is_empty() {
        return Ok(HashMap::new());
    }
    let topics: Vec<&str> = partitions.iter().map(|tp| &*tp.topic).collect();
    let parts: Vec<i32> = partitions.iter().map(|tp| tp.partition).collect();
    let rows: Vec<(String, i32, i64, i64, String, String, i64)> = sqlx::query_as(
        "SELECT DISTINCT ON (g.topic, g.partition)
                g.topic, g.partition, g.from_offset, g.to_offset, g.kind, g.action,
                extract(epoch FROM g.detected_at)::int8
           FROM streamops_offset_gaps g
           JOIN UNNEST($2::text[], $3::int4[]) AS w(topic, partition)
             ON g.topic = w.topic AND g.partition = w.partition
          WHERE g.consumer_group = $1
            AND g.detected_at > now() - make_interval(secs => $4)
          ORDER BY g.topic, g.partition, g.detected_at DESC",
    )
    .bind(group)
    .bind(&topics)
    .bind(&parts)
    .bind(GAP_REPORT_SECONDS as f64)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for (topic, partition, from, to, kind, action, at) in rows {
        let Some(tp) = partitions
            .iter()
            .find(|tp| *tp.topic == *topic && tp.partition == partition)
        else {
            continue;
        };
        let kind = match kind.as_str() {
            "retention" => GapKind::Retention,
            _ => GapKind::Reset,
        };
        out.insert(
            tp.clone(),
            GapNote {
                kind,
                from,
                to,
                skipped: action == "skip",
                detected_at: at,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_message_at_the_stored_offset_is_no_gap() {
        assert_eq!(classify(100, 100, 0, 500), None);
    }

    #[test]
    fn messages_deleted_below_the_log_start_are_a_retention_gap() {
        // Stored 100, log now starts at 400: 100..400 are gone.
        assert_eq!(
            classify(100, 400, 400, 500),
            Some((GapKind::Retention, 100, 400))
        );
        // With autoOffsetReset latest, reading resumes at the end: 100..500 never processed.
        assert_eq!(
            classify(100, 500, 400, 501),
            Some((GapKind::Retention, 100, 500))
        );
    }

    #[test]
    fn jumps_over_compaction_or_transaction_markers_are_no_gap() {
        // The log still starts below the stored offset: the skipped offsets hold no messages.
        assert_eq!(classify(100, 102, 0, 500), None);
        assert_eq!(classify(100, 300, 100, 500), None);
    }

    #[test]
    fn a_stored_offset_beyond_the_log_end_is_a_reset_gap() {
        // Topic recreated with 30 messages; the worker had stored 100 and reads from 0 again.
        assert_eq!(classify(100, 0, 0, 30), Some((GapKind::Reset, 0, 100)));
    }

    #[test]
    fn messages_below_the_stored_offset_of_a_longer_log_are_replays_not_gaps() {
        assert_eq!(classify(100, 40, 0, 500), None);
    }
}
