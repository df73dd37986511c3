//! When to replace a wedged producer.
//!
//! An idempotent librdkafka producer can stay wedged after a broker stall: every send ends in
//! `MessageTimedOut` while the broker already serves every other client again (see
//! DEVELOPERS.md, "Wedged producers"). Waiting does not help; a fresh producer (a new producer
//! id, new connections) delivers at once. [`ProducerHealth`] decides when to build one: after
//! [`ProducerHealth::threshold`] consecutive timed-out attempts with no delivery in between, or
//! at once when librdkafka reports a fatal error (the producer is unusable for good).
//!
//! The callers keep their ordering guarantees: the error-topic sink still acknowledges every
//! record before the batch's offsets are committed, and resends only what was not acknowledged.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Consecutive timed-out delivery rounds after which the error-topic producer is replaced. A
/// round that delivered nothing lasted `message.timeout.ms` (30 s) already; a fresh producer is
/// cheap (one connection, one `InitProducerId`), so the first such round replaces it.
pub const ERROR_TOPIC_REBUILD_AFTER: u32 = 1;

/// What one delivery attempt (a message, or a round of messages) came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged by the broker.
    Delivered,
    /// `MessageTimedOut`: not acknowledged within `message.timeout.ms`.
    TimedOut,
    /// librdkafka raised a fatal error: the producer can never deliver again.
    Fatal,
    /// Any other failure (refused as too large, unknown topic, ...): says nothing about the
    /// producer's health.
    Failed,
}

impl Outcome {
    /// The outcome of a delivery error.
    pub fn of_error(e: &KafkaError) -> Self {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageTimedOut) => Self::TimedOut,
            Some(RDKafkaErrorCode::Fatal) => Self::Fatal,
            _ => Self::Failed,
        }
    }

    /// The outcome of a round of attempts: delivered when anything was delivered (the producer
    /// works), else fatal or timed out when any attempt was, else failed.
    pub fn of_round(outcomes: impl IntoIterator<Item = Outcome>) -> Self {
        let (mut delivered, mut fatal, mut timed_out) = (false, false, false);
        for o in outcomes {
            match o {
                Self::Delivered => delivered = true,
                Self::Fatal => fatal = true,
                Self::TimedOut => timed_out = true,
                Self::Failed => {}
            }
        }
        if delivered {
            Self::Delivered
        } else if fatal {
            Self::Fatal
        } else if timed_out {
            Self::TimedOut
        } else {
            Self::Failed
        }
    }
}

/// Why a producer is replaced (the `reason` of the WARN log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildReason {
    /// That many consecutive timed-out attempts, nothing delivered in between.
    ConsecutiveTimeouts(u32),
    /// librdkafka's fatal error.
    Fatal(String),
}

impl std::fmt::Display for RebuildReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConsecutiveTimeouts(n) => {
                write!(
                    f,
                    "{n} consecutive delivery attempts timed out with nothing delivered"
                )
            }
            Self::Fatal(e) => write!(f, "fatal producer error: {e}"),
        }
    }
}

/// Counts consecutive timed-out attempts of one producer.
#[derive(Debug, Clone)]
pub struct ProducerHealth {
    threshold: u32,
    consecutive_timeouts: u32,
}

impl ProducerHealth {
    /// Rebuild after `threshold` (at least 1) consecutive timed-out attempts.
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold.max(1),
            consecutive_timeouts: 0,
        }
    }

    /// The number of consecutive timed-out attempts that triggers a rebuild.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Records an attempt; returns why the producer must be replaced, if it must. `fatal` is
    /// librdkafka's fatal error (`client().fatal_error()`), checked by the caller after a failure:
    /// a fatal producer is replaced whatever the outcome says. After a verdict the count starts
    /// again, for the new producer.
    pub fn observe(&mut self, outcome: Outcome, fatal: Option<String>) -> Option<RebuildReason> {
        if let Some(e) = fatal {
            self.consecutive_timeouts = 0;
            return Some(RebuildReason::Fatal(e));
        }
        match outcome {
            Outcome::Delivered => {
                self.consecutive_timeouts = 0;
                None
            }
            Outcome::Fatal => {
                self.consecutive_timeouts = 0;
                Some(RebuildReason::Fatal(
                    "fatal error reported on delivery".into(),
                ))
            }
            Outcome::TimedOut => {
                self.consecutive_timeouts += 1;
                if self.consecutive_timeouts >= self.threshold {
                    let n = self.consecutive_timeouts;
                    self.consecutive_timeouts = 0;
                    Some(RebuildReason::ConsecutiveTimeouts(n))
                } else {
                    None
                }
            }
            Outcome::Failed => None,
        }
    }
}

/// `fatal_error()` of a producer's client, as text.
pub fn fatal_error<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
) -> Option<String> {
    client
        .fatal_error()
        .map(|(code, reason)| format!("{code:?}: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed_out() -> KafkaError {
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
    }

    #[test]
    fn errors_are_classified_by_what_they_say_about_the_producer() {
        assert_eq!(Outcome::of_error(&timed_out()), Outcome::TimedOut);
        assert_eq!(
            Outcome::of_error(&KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)),
            Outcome::Fatal
        );
        assert_eq!(
            Outcome::of_error(&KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge
            )),
            Outcome::Failed
        );
        assert_eq!(Outcome::of_error(&KafkaError::Canceled), Outcome::Failed);
    }

    #[test]
    fn a_round_with_any_delivery_shows_a_working_producer() {
        use Outcome::*;
        assert_eq!(Outcome::of_round([TimedOut, Delivered, Failed]), Delivered);
        assert_eq!(Outcome::of_round([TimedOut, Fatal]), Fatal);
        assert_eq!(Outcome::of_round([TimedOut, Failed, TimedOut]), TimedOut);
        assert_eq!(Outcome::of_round([Failed]), Failed);
        assert_eq!(Outcome::of_round([]), Failed);
    }

    #[test]
    fn consecutive_timeouts_up_to_the_threshold_trigger_one_rebuild() {
        let mut h = ProducerHealth::new(3);
        assert_eq!(h.observe(Outcome::TimedOut, None), None);
        assert_eq!(h.observe(Outcome::TimedOut, None), None);
        assert_eq!(
            h.observe(Outcome::TimedOut, None),
            Some(RebuildReason::ConsecutiveTimeouts(3))
        );
        // The count starts again for the new producer.
        assert_eq!(h.observe(Outcome::TimedOut, None), None);
    }

    #[test]
    fn a_delivery_resets_the_count_and_other_failures_leave_it_alone() {
        let mut h = ProducerHealth::new(2);
        assert_eq!(h.observe(Outcome::TimedOut, None), None);
        assert_eq!(h.observe(Outcome::Delivered, None), None);
        assert_eq!(h.observe(Outcome::TimedOut, None), None);
        // A record refused as too large neither proves nor disproves a wedge.
        assert_eq!(h.observe(Outcome::Failed, None), None);
        assert_eq!(
            h.observe(Outcome::TimedOut, None),
            Some(RebuildReason::ConsecutiveTimeouts(2))
        );
    }

    #[test]
    fn a_fatal_error_rebuilds_at_once() {
        let mut h = ProducerHealth::new(5);
        assert_eq!(
            h.observe(Outcome::Failed, Some("boom".into())),
            Some(RebuildReason::Fatal("boom".into()))
        );
        assert!(matches!(
            h.observe(Outcome::Fatal, None),
            Some(RebuildReason::Fatal(_))
        ));
        // Even a round that delivered something: a fatal producer delivers nothing more.
        assert!(h.observe(Outcome::Delivered, Some("x".into())).is_some());
    }

    #[test]
    fn a_zero_threshold_means_the_first_timeout() {
        let mut h = ProducerHealth::new(0);
        assert_eq!(h.threshold(), 1);
        assert_eq!(
            h.observe(Outcome::TimedOut, None),
            Some(RebuildReason::ConsecutiveTimeouts(1))
        );
    }
}
