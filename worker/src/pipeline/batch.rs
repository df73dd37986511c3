//! Batching logic, free of I/O so it can be unit-tested: the poll loop's pending buffer and the
//! writer's per-partition offset plan.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::handlers::{RawMessage, TopicPartition};

/// A message with the epoch of its partition's assignment when it was fetched.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The message.
    pub msg: RawMessage,
    /// Assignment epoch of its partition (see `Ownership`).
    pub epoch: u64,
    /// Its W3C trace context, when trace export is on and it carries one
    /// ([`crate::telemetry::extract`]).
    pub trace: Option<crate::telemetry::MessageTrace>,
}

/// A batch handed from the poll loop to the writer.
#[derive(Debug)]
pub struct Batch {
    /// Messages in fetch order (offset order within each partition).
    pub messages: Vec<Fetched>,
    /// When the first message was received.
    pub started: Instant,
}

/// Messages received but not yet handed to the writer.
#[derive(Debug, Default)]
pub struct Pending {
    msgs: VecDeque<Fetched>,
    first_at: Option<Instant>,
}

impl Pending {
    /// Adds a message.
    pub fn push(&mut self, f: Fetched, now: Instant) {
        if self.msgs.is_empty() {
            self.first_at = Some(now);
        }
        self.msgs.push_back(f);
    }

    /// Messages buffered.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// When the batch being formed must be sent at the latest.
    pub fn deadline(&self, max_wait: Duration) -> Option<Instant> {
        self.first_at.map(|t| t + max_wait)
    }

    /// Whether a batch should be sent now: it is full, or its time is up.
    pub fn due(&self, max_messages: usize, max_wait: Duration, now: Instant) -> bool {
        self.msgs.len() >= max_messages || self.deadline(max_wait).is_some_and(|d| now >= d)
    }

    /// Takes up to `max_messages` messages as a batch.
    pub fn take(&mut self, max_messages: usize) -> Option<Batch> {
        if self.msgs.is_empty() {
            return None;
        }
        let n = self.msgs.len().min(max_messages.max(1));
        let messages: Vec<Fetched> = self.msgs.drain(..n).collect();
        let started = self.first_at.unwrap_or_else(Instant::now);
        // What stays behind starts a new batch now.
        self.first_at = if self.msgs.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        Some(Batch { messages, started })
    }

    /// Drops buffered messages of `partitions` (revoked: their next owner re-reads them from the
    /// offsets stored in PostgreSQL). Returns how many were dropped.
    pub fn drop_partitions(&mut self, partitions: &[TopicPartition]) -> usize {
        let before = self.msgs.len();
        self.msgs.retain(|f| {
            !partitions
                .iter()
                .any(|tp| tp.partition == f.msg.partition && tp.topic == f.msg.topic)
        });
        if self.msgs.is_empty() {
            self.first_at = None;
        }
        before - self.msgs.len()
    }
}

/// A stable hash of a topic name (FNV-1a), for [`lane_for`].
pub fn topic_hash(topic: &str) -> u64 {
    topic.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The writer lane of a partition: consecutive partitions of a topic go to consecutive lanes.
pub fn lane_for(topic_hash: u64, partition: i32, lanes: usize) -> usize {
    if lanes <= 1 {
        return 0;
    }
    ((topic_hash % lanes as u64) as usize + partition.max(0) as usize) % lanes
}

/// [`lane_for`] from a topic name.
pub fn lane_of(topic: &str, partition: i32, lanes: usize) -> usize {
    lane_for(topic_hash(topic), partition, lanes)
}

/// Where a partition's messages in a batch end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionPlan {
    /// Assignment epoch the messages were fetched under.
    pub epoch: u64,
    /// The next offset after the batch: last offset + 1.
    pub next_offset: i64,
    /// Messages of the partition in the batch.
    pub count: usize,
}

/// Keeps the messages that still need applying: their partition is owned under the epoch they
/// were fetched with, and their offset is at or past the stored `next_offset`. `owned` returns
/// `(epoch, next_offset)` of an owned partition.
pub fn retain_applicable(
    messages: &mut Vec<Fetched>,
    owned: impl FnMut(&TopicPartition) -> Option<(u64, Option<i64>)>,
) -> usize {
    let mask = applicable_mask(messages, owned);
    let before = messages.len();
    let mut keep = mask.iter();
    messages.retain(|_| keep.next().copied().unwrap_or(false));
    before - messages.len()
}

/// Which messages [`retain_applicable`] keeps, as a mask.
///
/// Within one assignment a partition's offsets only go up, so a message at or below an offset
/// already kept for its partition in this batch is a second delivery (the client rewound its
/// fetch position while earlier messages were still buffered): it is dropped, so a batch never
/// holds the same message twice (its rows would collide with themselves on the handler's key,
/// a failure no retry can fix).
pub fn applicable_mask(
    messages: &[Fetched],
    mut owned: impl FnMut(&TopicPartition) -> Option<(u64, Option<i64>)>,
) -> Vec<bool> {
    let mut cache: HashMap<TopicPartition, Option<(u64, Option<i64>)>> = HashMap::new();
    let mut last_kept: HashMap<TopicPartition, i64> = HashMap::new();
    messages
        .iter()
        .map(|f| {
            let tp = TopicPartition {
                topic: f.msg.topic.clone(),
                partition: f.msg.partition,
            };
            let state = *cache.entry(tp.clone()).or_insert_with_key(|tp| owned(tp));
            let applicable = match state {
                Some((epoch, next)) => epoch == f.epoch && next.is_none_or(|n| f.msg.offset >= n),
                None => false,
            };
            if !applicable {
                return false;
            }
            match last_kept.get_mut(&tp) {
                Some(last) if f.msg.offset <= *last => false,
                Some(last) => {
                    *last = f.msg.offset;
                    true
                }
                None => {
                    last_kept.insert(tp, f.msg.offset);
                    true
                }
            }
        })
        .collect()
}

/// Keeps the elements of `v` whose `mask` entry is true.
pub fn retain_by_mask<T>(v: &mut Vec<T>, mask: &[bool]) {
    let mut keep = mask.iter();
    v.retain(|_| keep.next().copied().unwrap_or(false));
}

/// The offset update of each partition in a batch.
pub fn plan_offsets(messages: &[Fetched]) -> BTreeMap<TopicPartition, PartitionPlan> {
    let mut plan: BTreeMap<TopicPartition, PartitionPlan> = BTreeMap::new();
    for f in messages {
        let tp = TopicPartition {
            topic: f.msg.topic.clone(),
            partition: f.msg.partition,
        };
        let e = plan.entry(tp).or_insert(PartitionPlan {
            epoch: f.epoch,
            next_offset: f.msg.offset + 1,
            count: 0,
        });
        e.next_offset = e.next_offset.max(f.msg.offset + 1);
        e.count += 1;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn f(p: i32, offset: i64, epoch: u64) -> Fetched {
        Fetched {
            msg: RawMessage {
                topic: Arc::from("t"),
                partition: p,
                offset,
                key: None,
                payload: Some(b"{}".to_vec()),
                timestamp_ms: None,
            },
            epoch,
            trace: None,
        }
    }

    fn tp(p: i32) -> TopicPartition {
        TopicPartition {
            topic: Arc::from("t"),
            partition: p,
        }
    }

    #[test]
    fn a_batch_is_due_when_full_or_when_its_time_is_up() {
        let t0 = Instant::now();
        let wait = Duration::from_millis(100);
        let mut p = Pending::default();
        assert!(!p.due(2, wait, t0));
        p.push(f(0, 0, 1), t0);
        assert!(!p.due(2, wait, t0));
        assert!(p.due(2, wait, t0 + wait));
        p.push(f(0, 1, 1), t0);
        assert!(p.due(2, wait, t0));
    }

    #[test]
    fn take_splits_at_max_messages_and_keeps_the_rest_in_order() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        for o in 0..5 {
            p.push(f(0, o, 1), t0);
        }
        let b = p.take(3).unwrap();
        assert_eq!(
            b.messages.iter().map(|m| m.msg.offset).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(p.len(), 2);
        assert_eq!(p.take(3).unwrap().messages[0].msg.offset, 3);
        assert!(p.take(3).is_none());
    }

    #[test]
    fn revoked_partitions_are_dropped_from_the_buffer() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        p.push(f(0, 0, 1), t0);
        p.push(f(1, 0, 1), t0);
        p.push(f(0, 1, 1), t0);
        assert_eq!(p.drop_partitions(&[tp(0)]), 2);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn applied_offsets_stale_epochs_and_foreign_partitions_are_skipped() {
        let mut msgs = vec![f(0, 4, 1), f(0, 5, 1), f(0, 6, 2), f(1, 0, 1), f(2, 0, 7)];
        let dropped = retain_applicable(&mut msgs, |tp| match tp.partition {
            0 => Some((1, Some(5))),
            1 => Some((1, None)),
            _ => None,
        });
        assert_eq!(dropped, 3);
        let kept: Vec<_> = msgs
            .iter()
            .map(|m| (m.msg.partition, m.msg.offset))
            .collect();
        assert_eq!(kept, vec![(0, 5), (1, 0)]);
    }

    #[test]
    fn a_partition_delivered_again_within_a_batch_keeps_each_offset_once() {
        // The client rewound partition 0 to 5 after delivering 5..=7 (same assignment).
        let mut msgs = vec![
            f(0, 5, 1),
            f(0, 6, 1),
            f(1, 0, 1),
            f(0, 7, 1),
            f(0, 5, 1),
            f(0, 6, 1),
            f(0, 7, 1),
            f(0, 8, 1),
            f(1, 0, 1),
        ];
        let dropped = retain_applicable(&mut msgs, |tp| match tp.partition {
            0 => Some((1, Some(5))),
            _ => Some((1, None)),
        });
        assert_eq!(dropped, 4);
        let kept: Vec<_> = msgs
            .iter()
            .map(|m| (m.msg.partition, m.msg.offset))
            .collect();
        assert_eq!(kept, vec![(0, 5), (0, 6), (1, 0), (0, 7), (0, 8)]);
        let plan = plan_offsets(&msgs);
        assert_eq!(plan[&tp(0)].count, 4);
        assert_eq!(plan[&tp(0)].next_offset, 9);
    }

    #[test]
    fn partitions_spread_evenly_over_lanes_and_always_to_the_same_one() {
        let lanes: Vec<_> = (0..4).map(|p| lane_of("prices", p, 2)).collect();
        assert_eq!(lanes.iter().filter(|l| **l == 0).count(), 2);
        assert_eq!(
            lanes,
            (0..4).map(|p| lane_of("prices", p, 2)).collect::<Vec<_>>()
        );
        assert!((0..10).all(|p| lane_of("t", p, 1) == 0));
    }

    #[test]
    fn the_plan_moves_each_partition_past_its_last_offset_even_with_gaps() {
        let msgs = vec![f(0, 10, 1), f(1, 3, 1), f(0, 12, 1), f(0, 15, 1)];
        let plan = plan_offsets(&msgs);
        assert_eq!(plan[&tp(0)].next_offset, 16);
        assert_eq!(plan[&tp(0)].count, 3);
        assert_eq!(plan[&tp(1)].next_offset, 4);
    }
}
