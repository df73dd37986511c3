//! Capped exponential backoff with jitter for every retry loop of the worker: the pipeline
//! (database, broker, error topic, offset reads during a rebalance), the database connection, the
//! fraud handler's scoring calls and the pipeline-trigger engine (ticks and deliveries).
//!
//! The delays come from the `backon` crate, which the operator uses for its reconcile backoff too:
//! one implementation for the whole project. This type only adds what a retry loop logs (the
//! attempt count) and a reset after success.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Capped exponential backoff with jitter: the n-th delay (n from 0) is drawn from
/// `[c/2, c)` where `c = min(base * 2^n, max)`, so a retry never fires at once in a tight loop and
/// replicas do not retry in lockstep.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    attempt: u32,
}

impl Clone for Backoff {
    /// A backoff with the same settings, started over.
    fn clone(&self) -> Self {
        Self {
            builder: self.builder,
            delays: self.builder.build(),
            attempt: 0,
        }
    }
}

/// The `backon` settings for delays in `[c/2, c)`, `c = min(base * 2^n, max)`: backon's jitter
/// adds up to 100% to each delay, so it starts from half the base and is capped at half the
/// maximum.
pub fn builder(base: Duration, max: Duration) -> ExponentialBuilder {
    builder_with_factor(base, max, 2.0)
}

/// As [`builder`], with the delay growing by `factor` (at least 1) instead of doubling.
pub fn builder_with_factor(base: Duration, max: Duration, factor: f64) -> ExponentialBuilder {
    let max = max.max(base);
    ExponentialBuilder::new()
        .with_min_delay(base / 2)
        .with_max_delay(max / 2)
        .with_factor(factor.max(1.0) as f32)
        .with_jitter()
        .without_max_times()
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        let builder = builder(base, max);
        Self {
            builder,
            delays: builder.build(),
            attempt: 0,
        }
    }

    /// A backoff starting at `base`, growing by `factor`, never exceeding `max`.
    pub fn with_factor(base: Duration, max: Duration, factor: f64) -> Self {
        let builder = builder_with_factor(base, max, factor);
        Self {
            builder,
            delays: builder.build(),
            attempt: 0,
        }
    }

    /// The backoff a spec's `retryBackoff` (base, factor, cap) describes.
    pub fn from_spec(b: &streamops_crds::v1alpha1::RetryBackoff) -> Self {
        Self::with_factor(
            Duration::from_millis(u64::from(b.base_ms)),
            Duration::from_millis(u64::from(b.cap_ms)),
            b.factor,
        )
    }

    /// The worker's default: 100 ms doubling up to 30 s.
    pub fn default_worker() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// Failed attempts since the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The next delay; advances the attempt count.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        // Without a maximum number of attempts the iterator never ends; rebuild defensively.
        match self.delays.next() {
            Some(d) => d,
            None => {
                self.delays = self.builder.build();
                self.delays.next().unwrap_or_default()
            }
        }
    }

    /// Sleeps for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delays_double_until_the_cap_with_jitter_between_half_and_full() {
        for _ in 0..50 {
            let mut b = Backoff::new(ms(100), Duration::from_secs(1));
            for ceiling in [100, 200, 400, 800, 1000, 1000, 1000] {
                let d = b.next_delay();
                assert!(
                    d >= ms(ceiling / 2) && d <= ms(ceiling),
                    "ceiling {ceiling} ms: {d:?}"
                );
            }
        }
    }

    #[test]
    fn reset_starts_over_and_huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(ms(100), Duration::from_secs(30));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        assert_eq!(b.attempts(), 200);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert!(b.next_delay() <= ms(100));
    }

    #[test]
    fn a_spec_backoff_grows_by_its_factor_from_its_base_up_to_its_cap() {
        let spec = streamops_crds::v1alpha1::RetryBackoff {
            base_ms: 50,
            factor: 3.0,
            cap_ms: 2_000,
        };
        for _ in 0..50 {
            let mut b = Backoff::from_spec(&spec);
            for retry in 1..=12u32 {
                let ceiling = spec.ceiling(retry);
                let d = b.next_delay();
                assert!(
                    d >= ceiling / 2 && d <= ceiling,
                    "retry {retry}: {d:?} vs ceiling {ceiling:?}"
                );
            }
        }
    }

    #[test]
    fn a_cap_below_the_base_is_raised_to_the_base() {
        let mut b = Backoff::new(ms(100), ms(10));
        for _ in 0..5 {
            let d = b.next_delay();
            assert!(d >= ms(50) && d <= ms(100), "{d:?}");
        }
    }
}
