//! The writer's second line of defence and its offset-gap check.
//!
//! - [`data_error`]: whether a database error was caused by the data (SQLSTATE class 22 data
//!   exception, 23 integrity constraint violation, 54 program limit exceeded, such as an index row
//!   that is too large) rather than by the database being unavailable. A data error is not
//!   retried as it is: the writer splits the batch in halves until the offending message is alone,
//!   sends that message to the error topic with reason `database_refused` and the database's
//!   message, and commits the rest. Only infrastructure errors are retried with backoff.
//! - [`detect_gaps`]: the first message of each partition in a batch against the partition's
//!   known `next_offset`, confirmed by the broker's watermarks (see [`crate::gaps`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use streamops_crds::v1alpha1::OnOffsetGap;

use super::batch::Fetched;
use super::context::PipelineConsumerContext;
use super::state::Ownership;
use crate::gaps::{classify, Gap};
use crate::handlers::{HandlerError, TopicPartition};

/// SQLSTATE classes whose errors the data causes.
const DATA_CLASSES: [&str; 3] = ["22", "23", "54"];

/// The database's reason, when `e` is an error caused by the data.
pub fn data_error(e: &sqlx::Error) -> Option<String> {
    let db = e.as_database_error()?;
    let code = db.code()?;
    if !DATA_CLASSES.iter().any(|c| code.starts_with(c)) {
        return None;
    }
    let mut reason = format!("SQLSTATE {code}: {}", db.message());
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        if let Some(detail) = pg.detail() {
            reason.push_str(&format!(" ({detail})"));
        }
    }
    Some(reason)
}

/// [`data_error`] of a handler's failure.
pub fn handler_data_error(e: &HandlerError) -> Option<String> {
    match e {
        HandlerError::Database(db) => data_error(db),
        _ => None,
    }
}

/// How long a watermark query may take.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(10);

/// Partitions whose reset gap is known (detected under this epoch, below this stored offset):
/// their messages below the stored offset are dropped without asking the broker again.
pub type KnownResets = HashMap<TopicPartition, (u64, i64)>;

/// Finds the gaps revealed by the first message of each partition of `messages`. Asks the broker
/// only when a first message is not at the known `next_offset`. An error means the watermarks
/// could not be read: the caller retries (a gap must never be committed past unseen).
pub async fn detect_gaps(
    consumer: &Arc<StreamConsumer<PipelineConsumerContext>>,
    ownership: &Ownership,
    messages: &[Fetched],
    action: OnOffsetGap,
    known: &KnownResets,
) -> Result<Vec<Gap>, String> {
    let mut firsts: Vec<(TopicPartition, i64, i64)> = Vec::new();
    let mut seen: std::collections::HashSet<TopicPartition> = Default::default();
    for f in messages {
        let tp = TopicPartition {
            topic: f.msg.topic.clone(),
            partition: f.msg.partition,
        };
        if !seen.insert(tp.clone()) {
            continue;
        }
        let Some(owned) = ownership.get(&tp) else {
            continue;
        };
        let Some(next) = owned.next_offset else {
            continue;
        };
        if owned.epoch != f.epoch || f.msg.offset == next {
            continue;
        }
        if f.msg.offset < next && known.get(&tp) == Some(&(owned.epoch, next)) {
            continue;
        }
        firsts.push((tp, f.msg.offset, next));
    }
    let mut gaps = Vec::new();
    for (tp, first, next) in firsts {
        let consumer = consumer.clone();
        let (topic, partition) = (tp.topic.to_string(), tp.partition);
        let (low, high) = tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, partition, WATERMARK_TIMEOUT)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("watermarks of {}/{}: {e}", tp.topic, tp.partition))?;
        if let Some((kind, from, to)) = classify(next, first, low, high) {
            gaps.push(Gap {
                tp,
                kind,
                from,
                to,
                action,
            });
        }
    }
    Ok(gaps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_without_a_sqlstate_are_not_data_errors() {
        assert_eq!(data_error(&sqlx::Error::PoolTimedOut), None);
        assert_eq!(
            data_error(&sqlx::Error::Protocol("connection reset".into())),
            None
        );
        assert_eq!(handler_data_error(&HandlerError::Http("503".into())), None);
    }
}
