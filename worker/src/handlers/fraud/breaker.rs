//! A circuit breaker for the scoring service. Time is passed in, so the state machine is tested
//! without sleeping.
//!
//! - **Closed**: calls go through; `failures` consecutive failed calls open it.
//! - **Open** for `reset`: calls fail fast without touching the network.
//! - **Half-open** after that: one trial call goes through; success closes the breaker, failure
//!   opens it again for another `reset`.

use std::time::{Duration, Instant};

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed {
        /// Consecutive failures so far.
        failures: u32,
    },
    /// Calls fail fast until `until`.
    Open {
        /// When a trial call is allowed.
        until: Instant,
    },
    /// One trial call is allowed.
    HalfOpen,
}

impl BreakerState {
    /// Value of the `streamops_fraud_circuit_state` gauge: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed { .. } => 0,
            Self::Open { .. } => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// A consecutive-failure circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    threshold: u32,
    reset: Duration,
    state: BreakerState,
}

impl CircuitBreaker {
    /// A closed breaker that opens after `threshold` consecutive failures (at least 1) and stays
    /// open for `reset`.
    pub fn new(threshold: u32, reset: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            reset,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    /// The state, after moving from open to half-open if the reset time has passed.
    pub fn state(&mut self, now: Instant) -> BreakerState {
        if let BreakerState::Open { until } = self.state {
            if now >= until {
                self.state = BreakerState::HalfOpen;
            }
        }
        self.state
    }

    /// Whether a call may go through now. When it may not, returns how long the breaker stays
    /// open.
    pub fn allow(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state(now) {
            BreakerState::Closed { .. } | BreakerState::HalfOpen => Ok(()),
            BreakerState::Open { until } => Err(until.saturating_duration_since(now)),
        }
    }

    /// Records a successful call: the breaker closes.
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// Records a failed call. Returns true when this failure opened the breaker.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.threshold {
                    self.state = BreakerState::Open {
                        until: now + self.reset,
                    };
                    true
                } else {
                    self.state = BreakerState::Closed { failures };
                    false
                }
            }
            BreakerState::HalfOpen => {
                self.state = BreakerState::Open {
                    until: now + self.reset,
                };
                true
            }
            BreakerState::Open { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESET: Duration = Duration::from_secs(30);

    #[test]
    fn breaker_opens_after_the_configured_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(3, RESET);
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        assert!(b.allow(t0).is_ok());
        assert!(b.on_failure(t0));
        assert_eq!(b.allow(t0), Err(RESET));
    }

    #[test]
    fn success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(2, RESET);
        b.on_failure(t0);
        b.on_success();
        assert!(!b.on_failure(t0));
        assert!(b.allow(t0).is_ok());
    }

    #[test]
    fn open_breaker_lets_one_trial_through_after_the_reset_time() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(1, RESET);
        b.on_failure(t0);
        assert!(b.allow(t0 + RESET - Duration::from_millis(1)).is_err());
        assert!(b.allow(t0 + RESET).is_ok());
        assert_eq!(b.state(t0 + RESET), BreakerState::HalfOpen);
    }

    #[test]
    fn failed_trial_reopens_and_successful_trial_closes() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(1, RESET);
        b.on_failure(t0);
        let t1 = t0 + RESET;
        assert!(b.allow(t1).is_ok());
        assert!(b.on_failure(t1));
        assert_eq!(b.allow(t1), Err(RESET));
        let t2 = t1 + RESET;
        assert!(b.allow(t2).is_ok());
        b.on_success();
        assert_eq!(b.state(t2), BreakerState::Closed { failures: 0 });
    }
}
