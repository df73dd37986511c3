//! The workers' lag report: the contract between a worker's `GET /consumer/lag` and the operator.
//!
//! A StreamConsumer whose brokers are not on the operator admin's allow-list gets its lag from its
//! own workers, which hold their own credentials: each worker reports, for every partition it owns,
//! the next offset it will apply (the `streamops_offsets` row it last committed) and the
//! partition's high watermark as its consumer last saw it in fetch responses (librdkafka
//! statistics, at most a few seconds old). The operator sums the reports of the ready workers.
//!
//! The user who writes the StreamConsumer controls what runs in its worker pods, so a report is
//! untrusted input. [`parse`] reads it strictly: at most [`MAX_REPORT_BYTES`] bytes, no unknown
//! field, at most [`MAX_REPORTED_PARTITIONS`] partitions, only the StreamConsumer's own group and
//! topics, no negative offset or partition, no partition twice. What a report can change is the
//! replica count of that same StreamConsumer, within its own `minReplicas`..`maxReplicas`.

use serde::{Deserialize, Serialize};

/// The worker's route.
pub const LAG_REPORT_PATH: &str = "/consumer/lag";

/// Largest report body the operator reads; a longer body is refused unread.
pub const MAX_REPORT_BYTES: usize = 1024 * 1024;

/// Most partitions one report may name.
pub const MAX_REPORTED_PARTITIONS: usize = 4096;

/// Largest partition number accepted.
pub const MAX_PARTITION: i32 = 1_000_000;

/// One worker's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LagReport {
    /// The consumer group the worker is a member of.
    pub group_id: String,
    /// The partitions it owns, sorted by topic and partition.
    pub partitions: Vec<PartitionPosition>,
}

/// Where a worker is in one partition it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartitionPosition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The next offset the worker will apply (its stored offset); `None` before its first commit.
    pub next_offset: Option<i64>,
    /// The partition's high watermark as the worker's consumer last saw it; `None` before the
    /// first fetch answer.
    pub high_watermark: Option<i64>,
}

impl PartitionPosition {
    /// Messages behind the high watermark; `None` when either offset is unknown.
    pub fn lag(&self) -> Option<i64> {
        Some(
            self.high_watermark?
                .saturating_sub(self.next_offset?)
                .max(0),
        )
    }
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Longer than [`MAX_REPORT_BYTES`].
    #[error("the report is longer than {MAX_REPORT_BYTES} bytes")]
    TooLarge,
    /// Not JSON of the report's form.
    #[error("malformed report: {0}")]
    Malformed(String),
    /// More than [`MAX_REPORTED_PARTITIONS`] partitions.
    #[error("the report names {0} partitions, more than {MAX_REPORTED_PARTITIONS}")]
    TooManyPartitions(usize),
    /// Another consumer group.
    #[error("the report is for another consumer group")]
    WrongGroup,
    /// A topic the StreamConsumer does not consume.
    #[error("the report names a topic the StreamConsumer does not consume")]
    ForeignTopic,
    /// A negative or absurd offset or partition number.
    #[error("the report has an out-of-range value for partition {0}")]
    OutOfRange(i32),
    /// The same partition twice.
    #[error("the report names partition {0} of a topic twice")]
    Duplicate(i32),
}

/// Parses and checks a report for consumer group `group` over `topics`. Messages never quote the
/// body (it is untrusted and may be anything).
pub fn parse(body: &[u8], group: &str, topics: &[String]) -> Result<LagReport, ReportError> {
    if body.len() > MAX_REPORT_BYTES {
        return Err(ReportError::TooLarge);
    }
    let report: LagReport = serde_json::from_slice(body).map_err(|e| {
        ReportError::Malformed(format!(
            "{} at line {} column {}",
            classify(&e),
            e.line(),
            e.column()
        ))
    })?;
    if report.partitions.len() > MAX_REPORTED_PARTITIONS {
        return Err(ReportError::TooManyPartitions(report.partitions.len()));
    }
    if report.group_id != group {
        return Err(ReportError::WrongGroup);
    }
    let mut seen = std::collections::HashSet::new();
    for p in &report.partitions {
        if !topics.contains(&p.topic) {
            return Err(ReportError::ForeignTopic);
        }
        let negative = |o: Option<i64>| o.is_some_and(|o| o < 0);
        if !(0..=MAX_PARTITION).contains(&p.partition)
            || negative(p.next_offset)
            || negative(p.high_watermark)
        {
            return Err(ReportError::OutOfRange(p.partition));
        }
        if !seen.insert((p.topic.as_str(), p.partition)) {
            return Err(ReportError::Duplicate(p.partition));
        }
    }
    Ok(report)
}

fn classify(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "not JSON",
        Category::Data => "unexpected content",
        Category::Eof => "truncated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Vec<String> {
        vec!["orders".into()]
    }

    fn body(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    fn part(partition: i32, next: i64, high: i64) -> serde_json::Value {
        serde_json::json!({"topic": "orders", "partition": partition, "nextOffset": next, "highWatermark": high})
    }

    #[test]
    fn a_well_formed_report_parses_and_its_lag_is_high_watermark_minus_next_offset() {
        let r = parse(
            &body(serde_json::json!({"groupId": "g", "partitions": [part(0, 40, 100), part(1, 120, 100)]})),
            "g",
            &topics(),
        )
        .unwrap();
        let lags: Vec<_> = r.partitions.iter().map(PartitionPosition::lag).collect();
        assert_eq!(lags, [Some(60), Some(0)]);
        let unknown = PartitionPosition {
            topic: "orders".into(),
            partition: 2,
            next_offset: None,
            high_watermark: Some(5),
        };
        assert_eq!(unknown.lag(), None);
    }

    #[test]
    fn a_hostile_report_is_refused_without_quoting_it() {
        let secret = "hunter2-in-the-body";
        let cases: Vec<(Vec<u8>, ReportError)> = vec![
            (vec![b' '; MAX_REPORT_BYTES + 1], ReportError::TooLarge),
            (
                body(serde_json::json!({"groupId": "g", "partitions": [], "extra": secret})),
                ReportError::Malformed(String::new()),
            ),
            (
                secret.as_bytes().to_vec(),
                ReportError::Malformed(String::new()),
            ),
            (
                body(serde_json::json!({"groupId": "other", "partitions": []})),
                ReportError::WrongGroup,
            ),
            (
                body(
                    serde_json::json!({"groupId": "g", "partitions": [{"topic": "payroll", "partition": 0, "nextOffset": 0, "highWatermark": 1}]}),
                ),
                ReportError::ForeignTopic,
            ),
            (
                body(serde_json::json!({"groupId": "g", "partitions": [part(0, -5, 100)]})),
                ReportError::OutOfRange(0),
            ),
            (
                body(serde_json::json!({"groupId": "g", "partitions": [part(-1, 0, 100)]})),
                ReportError::OutOfRange(-1),
            ),
            (
                body(
                    serde_json::json!({"groupId": "g", "partitions": [part(3, 0, 1), part(3, 0, 1)]}),
                ),
                ReportError::Duplicate(3),
            ),
            (
                body(serde_json::json!({"groupId": "g", "partitions":
                    (0..=MAX_REPORTED_PARTITIONS as i32).map(|p| part(p, 0, 0)).collect::<Vec<_>>()})),
                ReportError::TooManyPartitions(MAX_REPORTED_PARTITIONS + 1),
            ),
            (
                body(
                    serde_json::json!({"groupId": "g", "partitions": [{"topic": "orders", "partition": 0, "nextOffset": 1e30, "highWatermark": 1}]}),
                ),
                ReportError::Malformed(String::new()),
            ),
        ];
        for (input, expected) in cases {
            let err = parse(&input, "g", &topics()).unwrap_err();
            match (&err, &expected) {
                (ReportError::Malformed(m), ReportError::Malformed(_)) => {
                    assert!(!m.contains(secret), "{m}")
                }
                _ => assert_eq!(err, expected),
            }
            assert!(!err.to_string().contains(secret));
        }
    }
}
