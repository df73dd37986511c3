//! Capped exponential backoff with full jitter, used for every retry loop of the worker
//! (database, broker, error topic, offset reads during a rebalance).

use std::time::Duration;

/// Capped exponential backoff with "full jitter": the n-th delay is drawn uniformly from
/// `[base * 2^n / 2, base * 2^n]`, capped at `max`. Half of the delay is kept deterministic so a
/// retry never fires immediately in a tight loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The worker's default: 100 ms doubling up to 30 s.
    pub fn default_worker() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// Failed attempts since the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u64.checked_shl(self.attempt.min(32)).unwrap_or(u64::MAX);
        let nanos = (self.base.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.max)
    }

    /// The next delay, given a uniform random number in `[0, 1)`; advances the attempt count.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let half = ceiling / 2;
        half + half.mul_f64(unit)
    }

    /// The next delay with random jitter; advances the attempt count.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    /// Sleeps for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_until_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<_> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                b.next_with(0.5);
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_between_half_and_full_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(b.next_with(0.0), Duration::from_millis(50));
        let near_top = b.next_with(0.999_999);
        assert!(
            near_top > Duration::from_millis(199) && near_top <= Duration::from_millis(200),
            "{near_top:?}"
        );
        assert_eq!(b.next_with(f64::NAN), Duration::from_millis(200));
    }

    #[test]
    fn reset_starts_over_and_huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        for _ in 0..200 {
            b.next_with(1.0);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        assert_eq!(b.attempts(), 200);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
