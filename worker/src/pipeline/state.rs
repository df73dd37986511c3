//! State shared between the rebalance callback, the poll loop, the writer and the HTTP server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::handlers::TopicPartition;
use crate::pipeline::fetchability::Unfetchable;

/// A partition this worker owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    /// Changes on every assignment, so messages fetched under an earlier assignment of the same
    /// partition are recognised and dropped.
    pub epoch: u64,
    /// The `next_offset` stored in PostgreSQL as this worker last knew it (None: no row).
    pub next_offset: Option<i64>,
    /// The partition's latest offset gap, reported with every advisory Kafka commit of the
    /// partition (see [`streamops_crds::gap`]).
    pub gap: Option<streamops_crds::gap::GapNote>,
    /// The partition's high watermark as the consumer last saw it (librdkafka statistics, from
    /// fetch answers); for the lag report.
    pub high_watermark: Option<i64>,
    /// The partition's committed offset in Kafka as the consumer last saw it (librdkafka
    /// statistics: moved by each commit the coordinator acknowledged; None: unknown, e.g. just
    /// assigned). The advisory commits are sent again until it equals `next_offset` (see the poll
    /// loop's commit check).
    pub kafka_committed: Option<i64>,
    /// Why librdkafka cannot fetch the partition and since when, from the latest statistics
    /// (None: fetchable, or not reported yet). See [`crate::pipeline::fetchability`].
    pub unfetchable: Option<(Unfetchable, Instant)>,
}

impl Owned {
    /// The applied offset Kafka has not acknowledged yet, if any: what the group's committed
    /// offset must still be moved to.
    pub fn unacknowledged(&self) -> Option<i64> {
        self.next_offset
            .filter(|next| self.kafka_committed != Some(*next))
    }
}

/// The partitions this worker owns, with the offset each resumes from.
#[derive(Debug, Default)]
pub struct Ownership {
    inner: Mutex<OwnershipInner>,
}

#[derive(Debug, Default)]
struct OwnershipInner {
    parts: HashMap<TopicPartition, Owned>,
    next_epoch: u64,
}

impl Ownership {
    fn lock(&self) -> std::sync::MutexGuard<'_, OwnershipInner> {
        // A poisoned lock only means a panic elsewhere; the map itself is always consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an assignment; returns the partition's new epoch.
    pub fn assign(&self, tp: TopicPartition, stored: Option<i64>) -> u64 {
        let mut g = self.lock();
        g.next_epoch += 1;
        let epoch = g.next_epoch;
        g.parts.insert(
            tp,
            Owned {
                epoch,
                next_offset: stored,
                gap: None,
                high_watermark: None,
                kafka_committed: None,
                unfetchable: None,
            },
        );
        epoch
    }

    /// Records a revocation.
    pub fn revoke(&self, tp: &TopicPartition) {
        self.lock().parts.remove(tp);
    }

    /// The partition's state, if owned.
    pub fn get(&self, tp: &TopicPartition) -> Option<Owned> {
        self.lock().parts.get(tp).copied()
    }

    /// Sets the known `next_offset` if `tp` is still owned under `epoch`.
    pub fn set_next_offset(&self, tp: &TopicPartition, epoch: u64, next: i64) -> bool {
        match self.lock().parts.get_mut(tp) {
            Some(o) if o.epoch == epoch => {
                o.next_offset = Some(next);
                true
            }
            _ => false,
        }
    }

    /// Sets the partition's latest gap if `tp` is still owned under `epoch`.
    pub fn set_gap(&self, tp: &TopicPartition, epoch: u64, gap: streamops_crds::gap::GapNote) {
        if let Some(o) = self.lock().parts.get_mut(tp) {
            if o.epoch == epoch {
                o.gap = Some(gap);
            }
        }
    }

    /// Records the committed offset in Kafka last seen for `tp`, if owned (None: unknown).
    pub fn set_kafka_committed(&self, tp: &TopicPartition, offset: Option<i64>) {
        if let Some(o) = self.lock().parts.get_mut(tp) {
            o.kafka_committed = offset;
        }
    }

    /// Records whether librdkafka can fetch `tp` (None: it can) as statistics reported it at
    /// `now`, if owned. The time it became unfetchable is kept while it stays so, whatever the
    /// reason; a fetchable report, a revocation or a new assignment clears it.
    pub fn set_unfetchable(&self, tp: &TopicPartition, why: Option<Unfetchable>, now: Instant) {
        if let Some(o) = self.lock().parts.get_mut(tp) {
            o.unfetchable = match (why, o.unfetchable) {
                (None, _) => None,
                (Some(w), Some((_, since))) => Some((w, since)),
                (Some(w), None) => Some((w, now)),
            };
        }
    }

    /// The owned partition that has been unfetchable the longest as of `now`, if any.
    pub fn longest_unfetchable(&self, now: Instant) -> Option<UnfetchablePartition> {
        self.lock()
            .parts
            .iter()
            .filter_map(|(tp, o)| {
                o.unfetchable.map(|(why, since)| UnfetchablePartition {
                    tp: tp.clone(),
                    why,
                    for_: now.saturating_duration_since(since),
                })
            })
            .max_by(|a, b| a.for_.cmp(&b.for_).then_with(|| b.tp.cmp(&a.tp)))
    }

    /// Owned partitions whose applied offset Kafka has not acknowledged: each with its state.
    pub fn unacknowledged(&self) -> Vec<(TopicPartition, Owned)> {
        let mut v: Vec<_> = self
            .lock()
            .parts
            .iter()
            .filter(|(_, o)| o.unacknowledged().is_some())
            .map(|(tp, o)| (tp.clone(), *o))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Sets the high watermark last seen for `tp`, if owned (a negative value means unknown).
    pub fn set_high_watermark(&self, tp: &TopicPartition, high: i64) {
        if let (Some(o), true) = (self.lock().parts.get_mut(tp), high >= 0) {
            o.high_watermark = Some(high);
        }
    }

    /// This worker's lag report for consumer group `group` (see [`streamops_crds::lag_report`]).
    pub fn lag_report(&self, group: &str) -> streamops_crds::lag_report::LagReport {
        let mut partitions: Vec<_> = self
            .lock()
            .parts
            .iter()
            .map(|(tp, o)| streamops_crds::lag_report::PartitionPosition {
                topic: tp.topic.to_string(),
                partition: tp.partition,
                next_offset: o.next_offset,
                high_watermark: o.high_watermark,
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        streamops_crds::lag_report::LagReport {
            group_id: group.to_string(),
            partitions,
        }
    }

    /// Every owned partition.
    pub fn partitions(&self) -> Vec<TopicPartition> {
        let mut v: Vec<_> = self.lock().parts.keys().cloned().collect();
        v.sort();
        v
    }

    /// Number of owned partitions.
    pub fn len(&self) -> usize {
        self.lock().parts.len()
    }

    /// Whether no partition is owned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An owned partition librdkafka cannot fetch (see [`Ownership::longest_unfetchable`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfetchablePartition {
    /// The partition.
    pub tp: TopicPartition,
    /// Why, as of the latest statistics.
    pub why: Unfetchable,
    /// For how long (since the first statistics that reported it so).
    pub for_: Duration,
}

/// Locks `m`, recovering the value if a holder panicked (every value guarded here is valid
/// after any partial update).
fn lock_or_recover<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Health flags behind `/healthz` and `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    joined: AtomicBool,
    db_ok: AtomicBool,
    outage: AtomicBool,
    kafka_down: AtomicBool,
    /// When the consumer last went from reachable to `kafka_down` (None while up).
    kafka_down_since: Mutex<Option<Instant>>,
    /// Why the consumer is judged wedged (see [`crate::consumer_liveness`]); None while live.
    wedged: Mutex<Option<String>>,
    stopping: AtomicBool,
    stalled: AtomicBool,
}

impl Health {
    /// The worker has received its (possibly empty) assignment from the group.
    pub fn set_joined(&self) {
        self.joined.store(true, Ordering::Relaxed);
    }
    /// Whether the worker has received its assignment.
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Relaxed)
    }
    /// Result of the last database probe.
    pub fn set_db_ok(&self, ok: bool) {
        self.db_ok.store(ok, Ordering::Relaxed);
    }
    /// Whether the database answered the last probe.
    pub fn db_ok(&self) -> bool {
        self.db_ok.load(Ordering::Relaxed)
    }
    /// Enters or leaves outage backoff.
    pub fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::Relaxed);
    }
    /// Whether the worker is in outage backoff.
    pub fn outage(&self) -> bool {
        self.outage.load(Ordering::Relaxed)
    }
    /// Every broker is unreachable (set from librdkafka errors, cleared by statistics showing a
    /// broker up or by a received message).
    pub fn set_kafka_down(&self, down: bool) {
        self.kafka_down.store(down, Ordering::Relaxed);
        let mut since = lock_or_recover(&self.kafka_down_since);
        if down {
            since.get_or_insert_with(Instant::now);
        } else {
            *since = None;
        }
    }
    /// How long the consumer has reported every broker unreachable, as of `now` (None while it
    /// does not).
    pub fn kafka_down_for(&self, now: Instant) -> Option<Duration> {
        if !self.kafka_down() {
            return None;
        }
        lock_or_recover(&self.kafka_down_since).map(|t| now.saturating_duration_since(t))
    }
    /// Marks the consumer wedged, with the reason `/healthz` reports, or live again (None).
    pub fn set_wedged(&self, reason: Option<String>) {
        *lock_or_recover(&self.wedged) = reason;
    }
    /// Live (`/healthz`): `Err` with the reason while the consumer is judged wedged.
    pub fn live(&self) -> Result<(), String> {
        match &*lock_or_recover(&self.wedged) {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }
    /// Whether every broker is unreachable.
    pub fn kafka_down(&self) -> bool {
        self.kafka_down.load(Ordering::Relaxed)
    }
    /// The worker is shutting down.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
    /// Some owned partition has lag but fetched nothing for the stall window (see the poll
    /// loop's stall check), or none any more.
    pub fn set_stalled(&self, on: bool) {
        self.stalled.store(on, Ordering::Relaxed);
    }
    /// Whether some owned partition is stalled.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
    /// Ready: joined, database and brokers reachable, not in outage, no owned partition
    /// stalled, not stopping.
    pub fn ready(&self) -> bool {
        !self.stalled()
            && self.joined()
            && self.db_ok()
            && !self.outage()
            && !self.kafka_down()
            && !self.stopping.load(Ordering::Relaxed)
    }
    /// Why the worker is not ready, for the `/readyz` body.
    pub fn reason(&self) -> &'static str {
        if self.stopping.load(Ordering::Relaxed) {
            "shutting down"
        } else if !self.joined() {
            "waiting for a partition assignment"
        } else if !self.db_ok() {
            "database unreachable"
        } else if self.kafka_down() {
            "kafka brokers unreachable"
        } else if self.outage() {
            "in outage backoff"
        } else if self.stalled() {
            "an owned partition with lag is not being fetched"
        } else {
            "ready"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition {
            topic: Arc::from("t"),
            partition: p,
        }
    }

    #[test]
    fn a_reassigned_partition_gets_a_new_epoch_and_stale_updates_are_ignored() {
        let o = Ownership::default();
        let e1 = o.assign(tp(0), Some(10));
        o.revoke(&tp(0));
        let e2 = o.assign(tp(0), Some(20));
        assert_ne!(e1, e2);
        assert!(!o.set_next_offset(&tp(0), e1, 15));
        assert_eq!(o.get(&tp(0)).unwrap().next_offset, Some(20));
        assert!(o.set_next_offset(&tp(0), e2, 25));
        assert_eq!(o.get(&tp(0)).unwrap().next_offset, Some(25));
    }

    #[test]
    fn a_partition_is_unacknowledged_until_kafka_acknowledges_its_applied_offset() {
        let o = Ownership::default();
        let e = o.assign(tp(0), Some(10));
        o.assign(tp(1), None);
        // Just assigned: Kafka's committed offset is unknown, the stored one must be committed.
        assert_eq!(o.unacknowledged().len(), 1);
        o.set_kafka_committed(&tp(0), Some(10));
        assert!(o.unacknowledged().is_empty());
        assert!(o.set_next_offset(&tp(0), e, 20));
        assert_eq!(o.unacknowledged()[0].1.unacknowledged(), Some(20));
        // An older committed offset does not count for the newer applied one.
        o.set_kafka_committed(&tp(0), Some(15));
        assert_eq!(o.unacknowledged().len(), 1);
        o.set_kafka_committed(&tp(0), Some(20));
        assert!(o.unacknowledged().is_empty());
        // Revoked partitions are never reported (never committed again).
        assert!(o.set_next_offset(&tp(0), e, 30));
        o.revoke(&tp(0));
        o.set_kafka_committed(&tp(0), Some(30));
        assert!(o.unacknowledged().is_empty());
        assert!(o.get(&tp(0)).is_none());
    }

    #[test]
    fn an_unfetchable_partition_keeps_its_start_until_fetchable_revoked_or_reassigned() {
        let o = Ownership::default();
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let no_broker = Unfetchable::NoBroker { leader: -1 };
        let not_up = Unfetchable::BrokerNotUp { broker: 1 };
        // Not owned: nothing is recorded.
        o.set_unfetchable(&tp(0), Some(no_broker), t0);
        assert_eq!(o.longest_unfetchable(s(100)), None);
        o.assign(tp(0), None);
        o.assign(tp(1), None);
        o.set_unfetchable(&tp(0), Some(not_up), t0);
        // A later report, with another reason, keeps the start.
        o.set_unfetchable(&tp(0), Some(no_broker), s(30));
        o.set_unfetchable(&tp(1), Some(no_broker), s(20));
        let longest = o.longest_unfetchable(s(70)).expect("one is unfetchable");
        assert_eq!(longest.tp, tp(0));
        assert_eq!(longest.why, no_broker);
        assert_eq!(longest.for_, Duration::from_secs(70));
        // Fetchable again: cleared, the other one is reported.
        o.set_unfetchable(&tp(0), None, s(75));
        let longest = o.longest_unfetchable(s(80)).expect("tp 1 still is");
        assert_eq!((longest.tp, longest.for_), (tp(1), Duration::from_secs(60)));
        // Revoked: cleared, and a new assignment starts clean.
        o.revoke(&tp(1));
        assert_eq!(o.longest_unfetchable(s(90)), None);
        o.assign(tp(1), None);
        assert_eq!(o.longest_unfetchable(s(90)), None);
    }

    #[test]
    fn readiness_needs_assignment_database_and_no_outage() {
        let h = Health::default();
        assert!(!h.ready());
        h.set_joined();
        h.set_db_ok(true);
        assert!(h.ready());
        h.set_outage(true);
        assert_eq!(h.reason(), "in outage backoff");
        assert!(!h.ready());
        h.set_outage(false);
        h.set_stalled(true);
        assert_eq!(
            h.reason(),
            "an owned partition with lag is not being fetched"
        );
        assert!(!h.ready());
    }
}
