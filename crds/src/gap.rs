//! Offset gaps as workers report them to the operator.
//!
//! A worker that finds a gap in a partition's offsets (see `spec.kafka.onOffsetGap`) records it in
//! PostgreSQL (`streamops_offset_gaps`), which the operator cannot read (it reads no Secrets). So
//! the worker also attaches the partition's latest gap to the partition's advisory Kafka offset
//! commit, as the commit's metadata string. The operator's lag reader already fetches the group's
//! committed offsets; it parses that metadata with [`GapNote::parse`] and shows the gap as the
//! `OffsetGap` condition. The format is this crate's contract between the two:
//!
//! `streamops-gap/1 kind=retention from=120 to=480 action=skip at=1733060000`
//!
//! (`to` exclusive; `at` in seconds since the epoch). Anything else in the metadata is ignored.

use std::fmt;

/// Prefix and version of the metadata format.
pub const GAP_METADATA_PREFIX: &str = "streamops-gap/1";

/// How long a worker keeps reporting a gap after detecting it.
pub const GAP_REPORT_SECONDS: i64 = 7 * 24 * 3600;

/// Why messages are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GapKind {
    /// The stored offset lies below the log start: retention (or `DeleteRecords`) removed
    /// messages before they were processed. `[from, to)` is the range never processed.
    Retention,
    /// The stored offset lies beyond the log end: the topic was recreated, or the cluster
    /// restored or mirrored. `[from, to)` are the new log's offsets below the stored offset `to`,
    /// which are never applied (their source positions already have rows from the old log).
    Reset,
}

impl GapKind {
    /// Stable name, used in the table, the metric label and the metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retention => "retention",
            Self::Reset => "reset",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "retention" => Some(Self::Retention),
            "reset" => Some(Self::Reset),
            _ => None,
        }
    }
}

/// One gap of one partition, as carried in commit metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GapNote {
    /// Why.
    pub kind: GapKind,
    /// See [`GapKind`].
    pub from: i64,
    /// See [`GapKind`].
    pub to: i64,
    /// Whether the worker skipped the gap (`true`) or stopped at it (`onOffsetGap: fail`).
    pub skipped: bool,
    /// When it was detected, in seconds since the epoch.
    pub detected_at: i64,
}

impl GapNote {
    /// Parses commit metadata; `None` when it carries no gap.
    pub fn parse(metadata: &str) -> Option<Self> {
        let mut words = metadata.split_ascii_whitespace();
        if words.next()? != GAP_METADATA_PREFIX {
            return None;
        }
        let (mut kind, mut from, mut to, mut skipped, mut at) = (None, None, None, None, None);
        for w in words {
            let (k, v) = w.split_once('=')?;
            match k {
                "kind" => kind = GapKind::parse(v),
                "from" => from = v.parse().ok(),
                "to" => to = v.parse().ok(),
                "action" => {
                    skipped = match v {
                        "skip" => Some(true),
                        "fail" => Some(false),
                        _ => None,
                    }
                }
                "at" => at = v.parse().ok(),
                _ => {}
            }
        }
        Some(Self {
            kind: kind?,
            from: from?,
            to: to?,
            skipped: skipped?,
            detected_at: at?,
        })
    }

    /// A sentence for logs and the condition's message, naming `topic`/`partition`.
    pub fn describe(&self, topic: &str, partition: i32) -> String {
        let what = match self.kind {
            GapKind::Retention => format!(
                "offsets {}..{} of {topic}/{partition} were deleted before they were processed",
                self.from, self.to
            ),
            GapKind::Reset => format!(
                "the stored offset {} of {topic}/{partition} lay beyond the end of the log (topic recreated or restored); offsets {}..{} of the new log are not applied",
                self.to, self.from, self.to
            ),
        };
        let action = if self.skipped {
            "skipped"
        } else {
            "the worker stopped (onOffsetGap: fail)"
        };
        format!("{what}: {action}")
    }
}

impl fmt::Display for GapNote {
    /// The metadata string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{GAP_METADATA_PREFIX} kind={} from={} to={} action={} at={}",
            self.kind.as_str(),
            self.from,
            self.to,
            if self.skipped { "skip" } else { "fail" },
            self.detected_at
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_round_trips_through_its_metadata_string() {
        let n = GapNote {
            kind: GapKind::Retention,
            from: 120,
            to: 480,
            skipped: true,
            detected_at: 1_733_060_000,
        };
        let text = n.to_string();
        assert_eq!(
            text,
            "streamops-gap/1 kind=retention from=120 to=480 action=skip at=1733060000"
        );
        assert_eq!(GapNote::parse(&text), Some(n));
    }

    #[test]
    fn other_metadata_carries_no_gap() {
        assert_eq!(GapNote::parse(""), None);
        assert_eq!(GapNote::parse("something else"), None);
        assert_eq!(
            GapNote::parse("streamops-gap/1 kind=retention from=1"),
            None
        );
        assert_eq!(
            GapNote::parse("streamops-gap/1 kind=other from=1 to=2 action=skip at=0"),
            None
        );
    }
}
