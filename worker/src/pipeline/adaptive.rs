//! Adaptive batch size: large while the consumer is behind, small once it has caught up.
//!
//! `batch.maxMessages` is the ceiling and `batch.maxWaitMs` the longest a message waits for its
//! batch to fill; inside those bounds each writer lane works as a group commit:
//!
//! - A lane whose writer is idle (no batch in flight: none queued, none being written) gets its
//!   batch at once. Caught up, that is when the first message arrives, or when the writer
//!   finishes its previous batch: a message waits for at most the transaction in progress and
//!   its own, never for `maxWaitMs`.
//! - While the writer is busy, the next batch is prepared (decoded, queued for the writer) once
//!   the lane has buffered the current size limit, or once its first message has waited
//!   `maxWaitMs`. Behind, librdkafka hands a backlog over at memory speed, so the limit fills
//!   while the writer works and the next batch is ready when it finishes.
//! - A batch takes everything the lane has buffered, up to the ceiling: what waits in the buffer
//!   would otherwise wait for one more transaction.
//! - The size limit of a lane grows (doubling) while batches fill it, i.e. while there is a
//!   backlog, up to the ceiling; it shrinks (halving, down to [`FLOOR`]) while batches go out
//!   well under it with nothing left behind. The poll loop's buffer per lane (the fetch budget)
//!   is a few batches of the current limit, so a caught-up worker also holds little in memory.
//!
//! Pure logic, no I/O: the poll loop (its `Buffers`) asks [`AdaptiveBatch::due`], takes
//! [`AdaptiveBatch::batch_len`] messages from the lane's [`Pending`] buffer, and reports with
//! [`AdaptiveBatch::taken`].

use std::time::{Duration, Instant};

use super::batch::Pending;

/// Smallest size limit (or the ceiling, when that is smaller).
pub const FLOOR: usize = 64;

/// The size limit of one writer lane's batches.
#[derive(Debug, Clone)]
pub struct AdaptiveBatch {
    ceiling: usize,
    floor: usize,
    max_wait: Duration,
    limit: usize,
}

impl AdaptiveBatch {
    /// A lane with `ceiling` (`batch.maxMessages`) and `max_wait` (`batch.maxWaitMs`). The limit
    /// starts at the floor: a worker that starts behind reaches the ceiling after a few batches
    /// (log2(ceiling / floor)).
    pub fn new(ceiling: usize, max_wait: Duration) -> Self {
        let ceiling = ceiling.max(1);
        let floor = FLOOR.min(ceiling);
        Self {
            ceiling,
            floor,
            max_wait,
            limit: floor,
        }
    }

    /// Most messages in the next batch.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The ceiling (`batch.maxMessages`).
    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    /// Longest a message waits for its batch (`batch.maxWaitMs`).
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Messages the poll loop may buffer for this lane before fetching stops: `batches` batches
    /// of the current limit.
    pub fn fetch_budget(&self, batches: usize) -> usize {
        self.limit.saturating_mul(batches.max(1))
    }

    /// Whether the lane's batch should go now: `pending` is what the lane has buffered, and
    /// `writer_idle` tells whether its writer has no batch in flight. A full batch (at the
    /// current limit) or one whose time is up is due even when the writer is busy (it is queued
    /// for the writer, which takes it when it finishes the batch in progress).
    pub fn due(&self, pending: &Pending, writer_idle: bool, now: Instant) -> bool {
        !pending.is_empty() && (writer_idle || pending.due(self.limit, self.max_wait, now))
    }

    /// How many of `buffered` messages the next batch takes: all of them, up to the ceiling.
    pub fn batch_len(&self, buffered: usize) -> usize {
        buffered.min(self.ceiling)
    }

    /// Records that a batch of `taken` messages went to the writer with `left` messages still
    /// buffered behind it, and adapts the limit: a batch that fills the limit (a backlog)
    /// doubles it (up to the ceiling), a batch under a quarter of the limit with nothing left
    /// behind halves it (down to the floor).
    pub fn taken(&mut self, taken: usize, left: usize) {
        if taken >= self.limit {
            self.limit = self.limit.saturating_mul(2).min(self.ceiling);
        } else if left == 0 && taken < self.limit / 4 {
            self.limit = (self.limit / 2).max(self.floor);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::handlers::RawMessage;
    use crate::pipeline::batch::Fetched;

    const WAIT: Duration = Duration::from_millis(100);

    /// A lane's buffer with `n` messages, the first received at `at`.
    fn pending(n: i64, at: Instant) -> Pending {
        let mut p = Pending::default();
        for offset in 0..n {
            let msg = RawMessage {
                topic: Arc::from("t"),
                partition: 0,
                offset,
                key: None,
                payload: Some(b"{}".to_vec()),
                timestamp_ms: None,
            };
            p.push(
                Fetched {
                    msg,
                    epoch: 1,
                    trace: None,
                },
                at,
            );
        }
        p
    }

    #[test]
    fn nothing_buffered_is_never_due() {
        let a = AdaptiveBatch::new(1000, WAIT);
        let t0 = Instant::now();
        assert!(!a.due(&pending(0, t0), true, t0));
        assert!(!a.due(&pending(0, t0), false, t0 + 10 * WAIT));
    }

    #[test]
    fn an_idle_writer_takes_whatever_is_buffered_at_once() {
        let a = AdaptiveBatch::new(1000, WAIT);
        let t0 = Instant::now();
        assert!(a.due(&pending(1, t0), true, t0));
    }

    #[test]
    fn a_batch_takes_everything_buffered_up_to_the_ceiling_not_only_the_limit() {
        let a = AdaptiveBatch::new(1000, WAIT);
        assert_eq!(a.limit(), FLOOR);
        assert_eq!(a.batch_len(3 * FLOOR), 3 * FLOOR);
        assert_eq!(a.batch_len(5000), 1000);
        assert_eq!(a.batch_len(0), 0);
    }

    #[test]
    fn a_batch_that_fills_the_limit_doubles_it_even_with_nothing_behind() {
        let mut a = AdaptiveBatch::new(5000, WAIT);
        a.taken(FLOOR, 0);
        assert_eq!(a.limit(), 2 * FLOOR);
        a.taken(3 * 2 * FLOOR, 0);
        assert_eq!(a.limit(), 4 * FLOOR);
    }

    #[test]
    fn a_busy_writer_gets_a_batch_when_it_is_full_or_its_time_is_up() {
        let a = AdaptiveBatch::new(1000, WAIT);
        let t0 = Instant::now();
        let limit = a.limit() as i64;
        assert!(!a.due(&pending(limit - 1, t0), false, t0));
        assert!(a.due(&pending(limit, t0), false, t0));
        let one = pending(1, t0);
        assert!(!a.due(&one, false, t0 + WAIT - Duration::from_millis(1)));
        assert!(a.due(&one, false, t0 + WAIT));
    }

    #[test]
    fn the_limit_doubles_while_behind_up_to_the_ceiling() {
        let mut a = AdaptiveBatch::new(5000, WAIT);
        assert_eq!(a.limit(), FLOOR);
        let mut seen = vec![a.limit()];
        for _ in 0..10 {
            let n = a.limit();
            a.taken(n, 10 * n);
            seen.push(a.limit());
        }
        assert_eq!(
            seen,
            vec![64, 128, 256, 512, 1024, 2048, 4096, 5000, 5000, 5000, 5000]
        );
    }

    #[test]
    fn the_limit_halves_once_caught_up_down_to_the_floor() {
        let mut a = AdaptiveBatch::new(4096, WAIT);
        while a.limit() < 4096 {
            let n = a.limit();
            a.taken(n, n);
        }
        // Caught up: small batches, nothing left behind.
        let mut seen = Vec::new();
        for _ in 0..8 {
            a.taken(3, 0);
            seen.push(a.limit());
        }
        assert_eq!(seen, vec![2048, 1024, 512, 256, 128, 64, 64, 64]);
    }

    #[test]
    fn a_batch_near_the_limit_with_nothing_behind_keeps_the_limit() {
        let mut a = AdaptiveBatch::new(4096, WAIT);
        a.taken(64, 64);
        assert_eq!(a.limit(), 128);
        // A batch of half the limit: neither a backlog nor clearly caught up.
        a.taken(64, 0);
        assert_eq!(a.limit(), 128);
        // A partial batch with messages behind (the time ran out): no backlog signal either.
        a.taken(10, 5);
        assert_eq!(a.limit(), 128);
    }

    #[test]
    fn an_explicit_ceiling_below_the_floor_is_the_limit() {
        let mut a = AdaptiveBatch::new(10, WAIT);
        assert_eq!(a.limit(), 10);
        a.taken(10, 100);
        assert_eq!(a.limit(), 10);
        a.taken(1, 0);
        assert_eq!(a.limit(), 10);
        assert_eq!(AdaptiveBatch::new(0, WAIT).limit(), 1);
    }

    #[test]
    fn the_fetch_budget_follows_the_limit() {
        let mut a = AdaptiveBatch::new(1000, WAIT);
        assert_eq!(a.fetch_budget(3), 3 * FLOOR);
        a.taken(FLOOR, 1000);
        assert_eq!(a.fetch_budget(3), 6 * FLOOR);
    }
}
