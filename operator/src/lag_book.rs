//! What the operator knows about each StreamConsumer's consumer-group lag: the latest reading,
//! whether the latest attempt failed, and for `spec.autoscaling` the [`ScaleHistory`] and the
//! replica count [`decide`] settled on.
//!
//! The [lag poller](crate::lag_poller) writes it after every reading ([`LagBook::record`]); the
//! reconciler reads it through [`ReplicaDecider`], which [`LagBook`] implements: the replicas to
//! apply, the lag for the status, and the decision to announce in an event. Nothing here talks to
//! Kafka or to the API server, and the reconciler never waits for a reading.
//!
//! Ownership of the replica count under `spec.autoscaling`: the decided count, bounded by
//! `minReplicas` (0 with `scaleToZero`) and `maxReplicas`. Before the first reading (a new object,
//! or an operator restart, which loses the history) the current count is `spec.replicas`, which
//! the reconciler keeps equal to the decided count; so a restart resumes where it left off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use streamops_crds::v1alpha1::{LagStatus, StreamConsumer};

use crate::autoscale::{decide, Decision, LagSample, Observation, ScaleHistory, ScalePolicy};
use crate::lag::{GroupLag, LagError, LagSource, LagTarget, PartitionGap};
use crate::ReplicaDecider;

/// Why a lag reading failed, as the `LagAvailable=False` condition shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LagFailure {
    /// CamelCase reason (see [`LagError::reason`]), or `Timeout`.
    pub reason: &'static str,
    /// What went wrong.
    pub message: String,
}

impl From<&LagError> for LagFailure {
    fn from(e: &LagError) -> Self {
        Self {
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

impl LagFailure {
    /// A reading that did not finish in time.
    pub fn timeout(after: Duration) -> Self {
        Self {
            reason: "Timeout",
            message: format!("no answer from the brokers within {}s", after.as_secs()),
        }
    }
}

/// The four figures a reading publishes (the status's `lag` without its time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagFigures {
    /// Total lag.
    pub total: i64,
    /// Partitions of the consumed topics.
    pub partitions: i32,
    /// Members of the group.
    pub members: i32,
    /// Largest lag of one partition.
    pub max_partition_lag: i64,
}

impl From<&GroupLag> for LagFigures {
    fn from(g: &GroupLag) -> Self {
        Self {
            total: g.total,
            partitions: g.partitions,
            members: g.members,
            max_partition_lag: g.max_partition_lag,
        }
    }
}

/// What the reconciler publishes about a StreamConsumer's lag.
#[derive(Debug, Clone, PartialEq)]
pub struct LagView {
    /// The latest successful reading, as `status.lag`.
    pub last: Option<LagStatus>,
    /// Why the latest attempt failed; `None` when it succeeded.
    pub failure: Option<LagFailure>,
    /// Offset gaps the workers reported in the latest successful reading.
    pub gaps: Vec<PartitionGap>,
    /// Where the latest successful reading came from.
    pub source: LagSource,
}

/// What one reading changed, for the poller: whether to trigger a reconciliation, and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The figures read; `None` when the reading failed.
    pub figures: Option<LagFigures>,
    /// Whether the attempt before this one succeeded (`None`: this is the first attempt).
    pub was_available: Option<bool>,
    /// The autoscaler's decision on this reading (only with `spec.autoscaling`).
    pub decision: Option<Decision>,
    /// Replicas the reconciler applied before this reading, when the decision changes them.
    pub replicas_changed_from: Option<i32>,
}

impl Recorded {
    /// Whether this reading succeeded.
    pub fn available(&self) -> bool {
        self.figures.is_some()
    }

    /// Whether availability flipped (or this is the first attempt).
    pub fn availability_changed(&self) -> bool {
        self.was_available != Some(self.available())
    }
}

#[derive(Debug)]
struct Entry {
    uid: String,
    target: LagTarget,
    last: Option<LagStatus>,
    failure: Option<LagFailure>,
    gaps: Vec<PartitionGap>,
    source: LagSource,
    attempted: bool,
    history: ScaleHistory,
    /// The autoscaler's count (unbounded by later policy changes; see [`bounded`]).
    decided: Option<i32>,
    /// The latest decision that changed the count and has not been announced in an event.
    unannounced: Option<Decision>,
}

impl Entry {
    fn new(uid: &str, target: &LagTarget) -> Self {
        Self {
            uid: uid.to_string(),
            target: target.clone(),
            last: None,
            failure: None,
            gaps: Vec::new(),
            source: LagSource::Brokers,
            attempted: false,
            history: ScaleHistory::default(),
            decided: None,
            unannounced: None,
        }
    }
}

/// The operator's per-StreamConsumer lag state, shared by the poller and the reconciler.
#[derive(Debug)]
pub struct LagBook {
    origin: Instant,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Default for LagBook {
    fn default() -> Self {
        Self::new()
    }
}

/// `namespace/name`: the key of an object in the book.
pub fn key_of(sc: &StreamConsumer) -> Option<String> {
    Some(format!(
        "{}/{}",
        sc.metadata.namespace.as_deref()?,
        sc.metadata.name.as_deref()?
    ))
}

/// Keeps a count inside the policy's hard bounds: `maxReplicas`, and `minReplicas` (0 with
/// `scaleToZero`). Applied to the count handed to [`decide`] and to the count applied, so lowering
/// `maxReplicas` takes effect at once rather than after the scale-down window.
pub fn bounded(policy: &ScalePolicy, replicas: i32) -> i32 {
    let low = if policy.scale_to_zero {
        0
    } else {
        policy.min_replicas
    };
    replicas.max(low).min(policy.max_replicas)
}

impl LagBook {
    /// An empty book; its clock (for the autoscaler's windows) starts now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            entries: Mutex::default(),
        }
    }

    /// Monotonic time since the book was made: the clock of [`decide`].
    pub fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a reading of `target`, taken for `sc` as it is now, at monotonic time `now` and wall
    /// time `at`, and runs the autoscaler on it. A reading of a target the object no longer has (the
    /// spec changed while reading) is dropped: `None`. A new target or a new object under the same
    /// name starts from a fresh entry.
    pub fn record(
        &self,
        sc: &StreamConsumer,
        target: &LagTarget,
        result: Result<&GroupLag, LagFailure>,
        now: Duration,
        at: Timestamp,
    ) -> Option<Recorded> {
        let key = key_of(sc)?;
        let uid = sc.metadata.uid.as_deref()?;
        if LagTarget::from_resource(sc) != *target {
            return None;
        }
        let mut entries = self.lock();
        let entry = entries
            .entry(key)
            .or_insert_with(|| Entry::new(uid, target));
        if entry.uid != uid || entry.target != *target {
            *entry = Entry::new(uid, target);
        }
        let was_available = entry.attempted.then_some(entry.failure.is_none());
        entry.attempted = true;

        let (figures, observation) = match result {
            Ok(lag) => {
                let figures = LagFigures::from(lag);
                entry.last = Some(LagStatus {
                    total: figures.total,
                    partitions: figures.partitions,
                    members: figures.members,
                    max_partition_lag: figures.max_partition_lag,
                    observed_at: Some(
                        Timestamp::from_second(at.as_second())
                            .unwrap_or(at)
                            .to_string(),
                    ),
                });
                entry.failure = None;
                entry.gaps = lag.gaps.clone();
                entry.source = lag.source;
                (
                    Some(figures),
                    Observation::Lag(LagSample {
                        total_lag: figures.total,
                        partitions: figures.partitions,
                        uncommitted: lag.uncommitted,
                    }),
                )
            }
            Err(failure) => {
                let observation = Observation::Unavailable(failure.message.clone());
                entry.failure = Some(failure);
                (None, observation)
            }
        };

        let (decision, replicas_changed_from) = match &sc.spec.autoscaling {
            Some(autoscaling) => {
                let policy = ScalePolicy::from(autoscaling);
                let current = bounded(&policy, entry.decided.unwrap_or(sc.spec.replicas));
                let decision = decide(&policy, &observation, current, now, &mut entry.history);
                let changed = decision.changes(current).then_some(current);
                entry.decided = Some(decision.replicas);
                if changed.is_some() {
                    entry.unannounced = Some(decision.clone());
                }
                (Some(decision), changed)
            }
            None => {
                entry.history = ScaleHistory::default();
                entry.decided = None;
                entry.unannounced = None;
                (None, None)
            }
        };
        Some(Recorded {
            figures,
            was_available,
            decision,
            replicas_changed_from,
        })
    }

    /// Forgets an object (deleted, or no longer read).
    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Keys of every object in the book.
    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn with_entry<T>(&self, sc: &StreamConsumer, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let key = key_of(sc)?;
        let uid = sc.metadata.uid.as_deref()?;
        let mut entries = self.lock();
        entries.get_mut(&key).filter(|e| e.uid == uid).map(f)
    }
}

impl ReplicaDecider for LagBook {
    fn desired_replicas(&self, sc: &StreamConsumer) -> i32 {
        let Some(autoscaling) = &sc.spec.autoscaling else {
            return sc.spec.replicas;
        };
        let policy = ScalePolicy::from(autoscaling);
        let decided = self.with_entry(sc, |e| e.decided).flatten();
        bounded(&policy, decided.unwrap_or(sc.spec.replicas))
    }

    fn lag(&self, sc: &StreamConsumer) -> Option<LagView> {
        self.with_entry(sc, |e| {
            e.attempted.then(|| LagView {
                last: e.last.clone(),
                failure: e.failure.clone(),
                gaps: e.gaps.clone(),
                source: e.source,
            })
        })
        .flatten()
    }

    fn announce(&self, sc: &StreamConsumer, replicas: i32) -> Option<Decision> {
        self.with_entry(sc, |e| {
            if e.unannounced
                .as_ref()
                .is_some_and(|d| d.replicas == replicas)
            {
                e.unannounced.take()
            } else {
                None
            }
        })
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::DecisionReason;
    use crate::lag::summarize;
    use crate::lag::PartitionLag;
    use streamops_crds::v1alpha1::AutoscalingSpec;

    fn autoscaling() -> AutoscalingSpec {
        AutoscalingSpec {
            min_replicas: 1,
            max_replicas: 6,
            lag_threshold: 100,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 60,
            scale_to_zero: false,
            activation_lag: 1,
            allow_idle_consumers: false,
            poll_interval_seconds: 5,
        }
    }

    fn autoscaled() -> StreamConsumer {
        StreamConsumer::test().with_spec(|s| s.autoscaling = Some(autoscaling()))
    }

    /// A group lag of `total` spread over `partitions` partitions, with 1 member.
    fn lag(total: i64, partitions: i32) -> GroupLag {
        let per = (0..partitions)
            .map(|p| PartitionLag {
                topic: "t".into(),
                partition: p,
                committed: Some(0),
                high_watermark: 0,
                lag: if p == 0 { total } else { 0 },
                gap: None,
            })
            .collect();
        summarize(per, 1)
    }

    fn at(sec: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + sec).unwrap()
    }

    fn record(
        book: &LagBook,
        sc: &StreamConsumer,
        r: Result<&GroupLag, LagFailure>,
        t: u64,
    ) -> Recorded {
        book.record(
            sc,
            &LagTarget::from_resource(sc),
            r,
            Duration::from_secs(t),
            at(t as i64),
        )
        .unwrap()
    }

    fn down() -> LagFailure {
        LagFailure {
            reason: "KafkaError",
            message: "broker down".into(),
        }
    }

    #[test]
    fn without_autoscaling_the_replicas_are_the_specs_and_lag_is_still_kept() {
        let book = LagBook::new();
        let sc = StreamConsumer::test().with_replicas(3);
        let r = record(&book, &sc, Ok(&lag(5000, 6)), 0);
        assert_eq!(r.decision, None);
        assert_eq!(book.desired_replicas(&sc), 3);
        let view = book.lag(&sc).unwrap();
        assert_eq!(view.last.unwrap().total, 5000);
        assert_eq!(view.failure, None);
    }

    #[test]
    fn an_object_never_read_has_no_lag_view_and_keeps_its_spec_replicas() {
        let book = LagBook::new();
        let sc = autoscaled().with_replicas(2);
        assert_eq!(book.lag(&sc), None);
        assert_eq!(book.desired_replicas(&sc), 2);
    }

    #[test]
    fn a_decision_that_changes_the_count_is_applied_and_announced_once() {
        let book = LagBook::new();
        let sc = autoscaled();
        let r = record(&book, &sc, Ok(&lag(350, 6)), 0);
        assert_eq!(r.replicas_changed_from, Some(1));
        assert_eq!(r.decision.as_ref().unwrap().reason, DecisionReason::ScaleUp);
        assert_eq!(book.desired_replicas(&sc), 4);
        let d = book.announce(&sc, 4).unwrap();
        assert!(d.message.contains("lag 350"), "{}", d.message);
        assert_eq!(book.announce(&sc, 4), None, "announced once");
        // Stable afterwards: nothing to announce, no change.
        let r = record(&book, &sc.clone().with_replicas(4), Ok(&lag(350, 6)), 5);
        assert_eq!(r.replicas_changed_from, None);
        assert_eq!(book.announce(&sc, 4), None);
    }

    #[test]
    fn an_unreadable_lag_holds_the_decided_count_and_keeps_the_last_reading() {
        let book = LagBook::new();
        let sc = autoscaled();
        record(&book, &sc, Ok(&lag(250, 6)), 0);
        assert_eq!(book.desired_replicas(&sc), 3);
        let r = record(&book, &sc, Err(down()), 5);
        assert_eq!(r.was_available, Some(true));
        assert!(r.availability_changed());
        assert_eq!(r.replicas_changed_from, None);
        assert_eq!(r.decision.unwrap().reason, DecisionReason::LagUnavailable);
        assert_eq!(book.desired_replicas(&sc), 3);
        let view = book.lag(&sc).unwrap();
        assert_eq!(view.failure.unwrap().reason, "KafkaError");
        assert_eq!(view.last.unwrap().total, 250, "the last reading is kept");
    }

    #[test]
    fn scale_to_zero_never_happens_on_missing_data() {
        let book = LagBook::new();
        let sc = autoscaled().with_spec(|s| {
            let a = s.autoscaling.as_mut().unwrap();
            a.scale_to_zero = true;
            a.scale_down_stabilization_seconds = 0;
        });
        for t in 0..10 {
            record(&book, &sc, Err(down()), t * 5);
        }
        assert_eq!(book.desired_replicas(&sc), 1);
    }

    #[test]
    fn lowering_max_replicas_caps_the_count_at_once() {
        let book = LagBook::new();
        let sc = autoscaled();
        record(&book, &sc, Ok(&lag(600, 6)), 0);
        assert_eq!(book.desired_replicas(&sc), 6);
        let lowered = sc.with_spec(|s| s.autoscaling.as_mut().unwrap().max_replicas = 2);
        assert_eq!(book.desired_replicas(&lowered), 2);
    }

    #[test]
    fn a_new_object_under_the_same_name_does_not_inherit_the_decision() {
        let book = LagBook::new();
        let sc = autoscaled();
        record(&book, &sc, Ok(&lag(600, 6)), 0);
        let mut reborn = autoscaled();
        reborn.metadata.uid = Some("another-uid".into());
        assert_eq!(book.desired_replicas(&reborn), 1);
        assert_eq!(book.lag(&reborn), None);
    }

    #[test]
    fn a_reading_of_a_target_the_spec_left_is_dropped() {
        let book = LagBook::new();
        let sc = autoscaled();
        let old_target = LagTarget::from_resource(&sc);
        let moved = sc.with_spec(|s| s.kafka.group_id = "other-group".into());
        let r = book.record(&moved, &old_target, Ok(&lag(600, 6)), Duration::ZERO, at(0));
        assert_eq!(r, None);
        assert_eq!(book.lag(&moved), None);
    }

    #[test]
    fn removing_autoscaling_gives_the_replicas_back_to_the_spec() {
        let book = LagBook::new();
        let sc = autoscaled();
        record(&book, &sc, Ok(&lag(600, 6)), 0);
        let manual = sc.with_spec(|s| s.autoscaling = None).with_replicas(2);
        assert_eq!(book.desired_replicas(&manual), 2);
        record(&book, &manual, Ok(&lag(600, 6)), 5);
        assert_eq!(book.announce(&manual, 6), None);
    }

    #[test]
    fn observed_at_is_rfc3339_in_whole_seconds() {
        let book = LagBook::new();
        let sc = StreamConsumer::test();
        book.record(
            &sc,
            &LagTarget::from_resource(&sc),
            Ok(&lag(1, 1)),
            Duration::ZERO,
            Timestamp::from_second(1_700_000_000).unwrap() + Duration::from_millis(750),
        );
        let last = book.lag(&sc).unwrap().last.unwrap();
        assert_eq!(last.observed_at.as_deref(), Some("2023-11-14T22:13:20Z"));
    }
}
