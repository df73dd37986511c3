//! Lag-based autoscaling: a pure decision function.
//!
//! Every `pollIntervalSeconds` the operator reads the group's lag and calls [`decide`] with the
//! current replica count and the history kept for that StreamConsumer. The algorithm follows the
//! HorizontalPodAutoscaler's stabilization, tuned for consumer groups:
//!
//! 1. The raw recommendation is `ceil(totalLag / lagThreshold)`, raised to `minReplicas` and
//!    capped at `maxReplicas` and, unless `allowIdleConsumers`, at the partition count (a member
//!    beyond the partition count only sits idle and adds a rebalance).
//! 2. Scale-to-zero: with `scaleToZero`, a group with no lag wants 0 replicas, and a group at 0
//!    replicas stays there until the lag reaches `activationLag`.
//! 3. Stabilization: a scale-up goes to the *lowest* recommendation seen during the last
//!    `scaleUpStabilizationSeconds`, a scale-down to the *highest* seen during the last
//!    `scaleDownStabilizationSeconds`. Noisy lag therefore never flaps the replica count. A
//!    scale-down also waits until the history covers the whole window, so an operator restart
//!    (which loses the history) cannot cause an immediate scale-down.
//! 4. Missing data (the broker is unreachable) holds the current replicas and records nothing: the
//!    operator never scales, and never scales to zero, on data it does not have.
//! 5. Missing offsets are not "no lag": while a partition has no committed offset (a group that
//!    never committed, or whose offsets Kafka expired), a lag of 0 may only mean that the lag is
//!    counted from the log end (`autoOffsetReset: latest`). Such a group never scales to zero and
//!    wakes from zero: it holds at least one replica until a commit exists (as KEDA does).
//! 6. Samples after a gap: when no sample arrived for longer than [`ScalePolicy::max_sample_gap`]
//!    (failed readings, an operator that was not leading), the scale-down window starts over: it
//!    acts only once a full window of new samples agrees.

use std::collections::VecDeque;
use std::time::Duration;

use streamops_crds::v1alpha1::AutoscalingSpec;

/// The autoscaling policy of one StreamConsumer.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePolicy {
    /// Fewest replicas while there is lag.
    pub min_replicas: i32,
    /// Most replicas.
    pub max_replicas: i32,
    /// Target lag per replica.
    pub lag_threshold: u64,
    /// Scale-up stabilization window.
    pub up_window: Duration,
    /// Scale-down stabilization window.
    pub down_window: Duration,
    /// Whether no lag means no replicas.
    pub scale_to_zero: bool,
    /// Lag that wakes a consumer at zero replicas.
    pub activation_lag: u64,
    /// Whether replicas may exceed the partition count.
    pub allow_idle_consumers: bool,
    /// Longest time between two samples that still counts as one unbroken series; after a longer
    /// silence the scale-down window needs a full window of new samples.
    pub max_sample_gap: Duration,
}

/// [`ScalePolicy::max_sample_gap`] for a poll interval: three intervals, at least 30 s (a reading
/// may take up to the poller's 20 s timeout).
pub fn max_sample_gap(poll_interval: Duration) -> Duration {
    (poll_interval * 3).max(Duration::from_secs(30))
}

impl From<&AutoscalingSpec> for ScalePolicy {
    fn from(a: &AutoscalingSpec) -> Self {
        Self {
            min_replicas: a.min_replicas.max(0),
            max_replicas: a.max_replicas.max(1),
            lag_threshold: a.lag_threshold.max(1),
            up_window: Duration::from_secs(a.scale_up_stabilization_seconds.into()),
            down_window: Duration::from_secs(a.scale_down_stabilization_seconds.into()),
            scale_to_zero: a.scale_to_zero,
            activation_lag: a.activation_lag.max(1),
            allow_idle_consumers: a.allow_idle_consumers,
            max_sample_gap: max_sample_gap(Duration::from_secs(
                a.poll_interval_seconds.max(1).into(),
            )),
        }
    }
}

/// One reading of the group's lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagSample {
    /// Total lag over all partitions.
    pub total_lag: i64,
    /// Partitions of the consumed topics.
    pub partitions: i32,
    /// Partitions without a committed offset (never committed, or expired).
    pub uncommitted: i32,
}

/// What the operator observed this interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The lag was read.
    Lag(LagSample),
    /// The lag could not be read; the reason goes into the status condition.
    Unavailable(String),
}

/// Recommendations seen recently, oldest first. Time is measured from an arbitrary origin that
/// only has to be monotonic (the operator uses the seconds since it started).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScaleHistory {
    recommendations: VecDeque<(Duration, i32)>,
    /// Start of the current unbroken series of samples.
    first_seen: Option<Duration>,
    /// Time of the latest sample.
    last_seen: Option<Duration>,
}

/// Why the decision is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionReason {
    /// Scaling up.
    ScaleUp,
    /// Scaling down.
    ScaleDown,
    /// Waking from zero replicas.
    Activate,
    /// Scaling to zero replicas.
    ScaleToZero,
    /// Holding: the recommendation equals the current count, or stabilization holds it.
    Stable,
    /// Holding: the lag could not be read.
    LagUnavailable,
}

impl DecisionReason {
    /// Stable name, used in events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaleUp => "ScaleUp",
            Self::ScaleDown => "ScaleDown",
            Self::Activate => "Activate",
            Self::ScaleToZero => "ScaleToZero",
            Self::Stable => "Stable",
            Self::LagUnavailable => "LagUnavailable",
        }
    }
}

/// The replica count to apply and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to apply.
    pub replicas: i32,
    /// Why.
    pub reason: DecisionReason,
    /// A sentence for the event: names the lag behind the decision.
    pub message: String,
}

impl Decision {
    /// Whether the decision changes the replica count.
    pub fn changes(&self, current: i32) -> bool {
        self.replicas != current
    }
}

/// The unstabilized replica count that the lag asks for.
pub fn recommend(policy: &ScalePolicy, sample: LagSample, current: i32) -> i32 {
    let lag = u64::try_from(sample.total_lag.max(0)).unwrap_or(0);
    // Without a committed offset a zero lag proves nothing: hold (or wake) one replica.
    if policy.scale_to_zero && sample.uncommitted == 0 {
        if lag == 0 {
            return 0;
        }
        if current == 0 && lag < policy.activation_lag {
            return 0;
        }
    }
    let wanted = lag.div_ceil(policy.lag_threshold);
    let wanted = i32::try_from(wanted).unwrap_or(i32::MAX);
    // Zero replicas only come from the scale-to-zero rule above.
    let floor = policy.min_replicas.max(1);
    let mut cap = policy.max_replicas;
    if !policy.allow_idle_consumers && sample.partitions > 0 {
        cap = cap.min(sample.partitions);
    }
    wanted.max(floor).min(cap.max(1))
}

/// Decides the replica count for this interval and records the recommendation in `history`.
pub fn decide(
    policy: &ScalePolicy,
    observation: &Observation,
    current: i32,
    now: Duration,
    history: &mut ScaleHistory,
) -> Decision {
    let sample = match observation {
        Observation::Unavailable(why) => {
            // The series is broken: scale-down needs a full window of new samples.
            history.first_seen = None;
            return Decision {
                replicas: current,
                reason: DecisionReason::LagUnavailable,
                message: format!("holding {current} replicas: lag unavailable ({why})"),
            };
        }
        Observation::Lag(s) => *s,
    };
    let raw = recommend(policy, sample, current);
    if history
        .last_seen
        .is_some_and(|last| now.saturating_sub(last) > policy.max_sample_gap)
    {
        history.first_seen = None;
    }
    history.last_seen = Some(now);
    let first_seen = *history.first_seen.get_or_insert(now);
    history.recommendations.push_back((now, raw));
    let keep = policy.up_window.max(policy.down_window);
    while let Some(&(t, _)) = history.recommendations.front() {
        if now.saturating_sub(t) > keep {
            history.recommendations.pop_front();
        } else {
            break;
        }
    }
    let within = |window: Duration| {
        history
            .recommendations
            .iter()
            .filter(move |(t, _)| now.saturating_sub(*t) <= window)
            .map(|(_, r)| *r)
    };
    let up_target = within(policy.up_window).min().unwrap_or(raw);
    let down_target = within(policy.down_window).max().unwrap_or(raw);
    let down_window_covered = now.saturating_sub(first_seen) >= policy.down_window;
    let lag = sample.total_lag;
    if up_target > current {
        let reason = if current == 0 {
            DecisionReason::Activate
        } else {
            DecisionReason::ScaleUp
        };
        Decision {
            replicas: up_target,
            reason,
            message: format!(
                "scaling from {current} to {up_target} replicas: lag {lag} over {} partitions, threshold {} per replica",
                sample.partitions, policy.lag_threshold
            ),
        }
    } else if down_target < current && down_window_covered {
        let reason = if down_target == 0 {
            DecisionReason::ScaleToZero
        } else {
            DecisionReason::ScaleDown
        };
        Decision {
            replicas: down_target,
            reason,
            message: format!(
                "scaling from {current} to {down_target} replicas: lag {lag} over {} partitions, threshold {} per replica, stable for {}s",
                sample.partitions,
                policy.lag_threshold,
                policy.down_window.as_secs()
            ),
        }
    } else {
        Decision {
            replicas: current,
            reason: DecisionReason::Stable,
            message: format!("holding {current} replicas: lag {lag}, recommendation {raw}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ScalePolicy {
        ScalePolicy {
            min_replicas: 1,
            max_replicas: 10,
            lag_threshold: 100,
            up_window: Duration::ZERO,
            down_window: Duration::from_secs(60),
            scale_to_zero: false,
            activation_lag: 1,
            allow_idle_consumers: false,
            max_sample_gap: secs(30),
        }
    }

    fn lag(total: i64, partitions: i32) -> Observation {
        Observation::Lag(LagSample {
            total_lag: total,
            partitions,
            uncommitted: 0,
        })
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn recommendation_is_lag_over_threshold_rounded_up() {
        let cases = [
            (0, 1),
            (1, 1),
            (100, 1),
            (101, 2),
            (450, 5),
            (999, 10),
            (5000, 10),
        ];
        for (total, want) in cases {
            let got = recommend(
                &policy(),
                LagSample {
                    total_lag: total,
                    partitions: 12,
                    uncommitted: 0,
                },
                1,
            );
            assert_eq!(got, want, "lag {total}");
        }
    }

    #[test]
    fn replicas_are_capped_at_partitions_unless_idle_consumers_are_allowed() {
        let s = LagSample {
            total_lag: 10_000,
            partitions: 3,
            uncommitted: 0,
        };
        assert_eq!(recommend(&policy(), s, 1), 3);
        let idle = ScalePolicy {
            allow_idle_consumers: true,
            ..policy()
        };
        assert_eq!(recommend(&idle, s, 1), 10);
    }

    #[test]
    fn min_replicas_is_a_floor_without_scale_to_zero() {
        let p = ScalePolicy {
            min_replicas: 2,
            ..policy()
        };
        assert_eq!(
            recommend(
                &p,
                LagSample {
                    total_lag: 0,
                    partitions: 6,
                    uncommitted: 0,
                },
                4
            ),
            2
        );
    }

    #[test]
    fn scale_to_zero_needs_activation_lag_to_wake_up() {
        let p = ScalePolicy {
            scale_to_zero: true,
            activation_lag: 50,
            ..policy()
        };
        assert_eq!(
            recommend(
                &p,
                LagSample {
                    total_lag: 0,
                    partitions: 6,
                    uncommitted: 0,
                },
                2
            ),
            0
        );
        assert_eq!(
            recommend(
                &p,
                LagSample {
                    total_lag: 49,
                    partitions: 6,
                    uncommitted: 0,
                },
                0
            ),
            0
        );
        assert_eq!(
            recommend(
                &p,
                LagSample {
                    total_lag: 50,
                    partitions: 6,
                    uncommitted: 0,
                },
                0
            ),
            1
        );
        // A running consumer with a little lag keeps running.
        assert_eq!(
            recommend(
                &p,
                LagSample {
                    total_lag: 10,
                    partitions: 6,
                    uncommitted: 0,
                },
                1
            ),
            1
        );
    }

    #[test]
    fn lag_crossing_the_threshold_scales_up_at_once_with_default_windows() {
        let mut h = ScaleHistory::default();
        let d = decide(&policy(), &lag(50, 6), 1, secs(0), &mut h);
        assert_eq!((d.replicas, d.reason), (1, DecisionReason::Stable));
        let d = decide(&policy(), &lag(350, 6), 1, secs(5), &mut h);
        assert_eq!((d.replicas, d.reason), (4, DecisionReason::ScaleUp));
        assert!(d.message.contains("lag 350"), "{}", d.message);
    }

    #[test]
    fn noisy_lag_does_not_flap_the_replica_count() {
        let mut h = ScaleHistory::default();
        let mut current = 1;
        let mut changes = 0;
        // Lag oscillating between 250 and 50 every 5 seconds for 10 minutes.
        for i in 0..120u64 {
            let total = if i % 2 == 0 { 250 } else { 50 };
            let d = decide(&policy(), &lag(total, 6), current, secs(i * 5), &mut h);
            if d.replicas != current {
                changes += 1;
                current = d.replicas;
            }
        }
        assert_eq!(current, 3, "settles at the peak's need");
        assert_eq!(changes, 1, "one scale-up, then no flapping");
    }

    #[test]
    fn scale_up_waits_for_the_up_window_to_agree() {
        let p = ScalePolicy {
            up_window: secs(20),
            ..policy()
        };
        let mut h = ScaleHistory::default();
        let d = decide(&p, &lag(50, 6), 1, secs(0), &mut h);
        assert_eq!(d.replicas, 1);
        // A spike: the window still holds the low recommendation.
        let d = decide(&p, &lag(500, 6), 1, secs(5), &mut h);
        assert_eq!(d.replicas, 1);
        let d = decide(&p, &lag(500, 6), 1, secs(20), &mut h);
        assert_eq!(d.replicas, 1);
        // Sustained for the whole window: scale up.
        let d = decide(&p, &lag(500, 6), 1, secs(26), &mut h);
        assert_eq!((d.replicas, d.reason), (5, DecisionReason::ScaleUp));
    }

    #[test]
    fn scale_down_waits_for_the_down_window_and_goes_to_its_highest_recommendation() {
        let mut h = ScaleHistory::default();
        let d = decide(&policy(), &lag(400, 6), 1, secs(0), &mut h);
        assert_eq!(d.replicas, 4);
        let mut current = d.replicas;
        for t in (5..=60).step_by(5) {
            let total = if t == 30 { 200 } else { 0 };
            let d = decide(&policy(), &lag(total, 6), current, secs(t), &mut h);
            assert_eq!(d.replicas, 4, "held during the window at t={t}");
            current = d.replicas;
        }
        // The 400-lag sample left the window; the highest left is t=30's 2 replicas.
        let d = decide(&policy(), &lag(0, 6), current, secs(65), &mut h);
        assert_eq!((d.replicas, d.reason), (2, DecisionReason::ScaleDown));
        let d = decide(&policy(), &lag(0, 6), 2, secs(95), &mut h);
        assert_eq!((d.replicas, d.reason), (1, DecisionReason::ScaleDown));
    }

    #[test]
    fn a_fresh_history_never_scales_down_before_a_full_window() {
        // An operator restart loses the history: it must not scale down right away.
        let mut h = ScaleHistory::default();
        for t in (1000..1060).step_by(5) {
            let d = decide(&policy(), &lag(0, 6), 5, secs(t), &mut h);
            assert_eq!((d.replicas, d.reason), (5, DecisionReason::Stable), "t={t}");
        }
        let d = decide(&policy(), &lag(0, 6), 5, secs(1060), &mut h);
        assert_eq!((d.replicas, d.reason), (1, DecisionReason::ScaleDown));
    }

    #[test]
    fn missing_lag_holds_the_current_replicas_and_never_scales_to_zero() {
        let p = ScalePolicy {
            scale_to_zero: true,
            down_window: Duration::ZERO,
            ..policy()
        };
        let mut h = ScaleHistory::default();
        let d = decide(
            &p,
            &Observation::Unavailable("broker down".into()),
            3,
            secs(0),
            &mut h,
        );
        assert_eq!((d.replicas, d.reason), (3, DecisionReason::LagUnavailable));
        assert!(d.message.contains("broker down"));
        assert_eq!(
            h,
            ScaleHistory::default(),
            "nothing recorded on missing data"
        );
    }

    #[test]
    fn scale_to_zero_and_activation_round_trip() {
        let p = ScalePolicy {
            scale_to_zero: true,
            activation_lag: 10,
            down_window: secs(30),
            ..policy()
        };
        let mut h = ScaleHistory::default();
        let mut current = 2;
        for t in (0..=30).step_by(5) {
            current = decide(&p, &lag(0, 6), current, secs(t), &mut h).replicas;
        }
        assert_eq!(current, 0);
        let d = decide(&p, &lag(5, 6), 0, secs(35), &mut h);
        assert_eq!(d.replicas, 0, "below activation lag");
        let d = decide(&p, &lag(150, 6), 0, secs(40), &mut h);
        assert_eq!((d.replicas, d.reason), (2, DecisionReason::Activate));
    }

    #[test]
    fn a_policy_from_the_spec_never_divides_by_zero_or_caps_below_one() {
        let spec = AutoscalingSpec {
            min_replicas: -3,
            max_replicas: 0,
            lag_threshold: 0,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 60,
            scale_to_zero: false,
            activation_lag: 0,
            allow_idle_consumers: false,
            poll_interval_seconds: 5,
        };
        let p = ScalePolicy::from(&spec);
        assert_eq!(
            (
                p.min_replicas,
                p.max_replicas,
                p.lag_threshold,
                p.activation_lag
            ),
            (0, 1, 1, 1)
        );
        assert_eq!(p.down_window, Duration::from_secs(60));
        assert_eq!(
            recommend(
                &p,
                LagSample {
                    total_lag: 1_000,
                    partitions: 4,
                    uncommitted: 0,
                },
                1
            ),
            1
        );
    }

    #[test]
    fn a_count_above_the_partition_cap_comes_down_only_after_the_down_window() {
        // 7 replicas (set by hand before the first reading) on 3 partitions: 4 sit idle, but
        // removing them is still a scale-down and waits for the window like any other.
        let mut h = ScaleHistory::default();
        for t in (0..60).step_by(5) {
            let d = decide(&policy(), &lag(5_000, 3), 7, secs(t), &mut h);
            assert_eq!((d.replicas, d.reason), (7, DecisionReason::Stable), "t={t}");
        }
        let d = decide(&policy(), &lag(5_000, 3), 7, secs(60), &mut h);
        assert_eq!((d.replicas, d.reason), (3, DecisionReason::ScaleDown));
        assert!(
            d.message.contains("lag 5000 over 3 partitions"),
            "{}",
            d.message
        );
    }

    #[test]
    fn lag_that_falls_and_rises_within_the_down_window_never_scales_down() {
        let mut h = ScaleHistory::default();
        let mut current = decide(&policy(), &lag(500, 12), 1, secs(0), &mut h).replicas;
        assert_eq!(current, 5);
        // A quiet spell shorter than the window, then the load is back.
        for t in (5..=50).step_by(5) {
            current = decide(&policy(), &lag(0, 12), current, secs(t), &mut h).replicas;
        }
        let d = decide(&policy(), &lag(480, 12), current, secs(55), &mut h);
        assert_eq!((d.replicas, d.reason), (5, DecisionReason::Stable));
    }

    #[test]
    fn a_group_without_committed_offsets_never_scales_to_zero_on_a_zero_lag() {
        let p = ScalePolicy {
            scale_to_zero: true,
            down_window: Duration::ZERO,
            ..policy()
        };
        let uncommitted = |total| LagSample {
            total_lag: total,
            partitions: 6,
            uncommitted: 6,
        };
        // Running: held at one replica, not scaled to zero.
        assert_eq!(recommend(&p, uncommitted(0), 2), 1);
        let mut h = ScaleHistory::default();
        let d = decide(&p, &Observation::Lag(uncommitted(0)), 1, secs(0), &mut h);
        assert_eq!((d.replicas, d.reason), (1, DecisionReason::Stable));
        // At zero (offsets expired while scaled to zero): woken, whatever the activation lag.
        let d = decide(&p, &Observation::Lag(uncommitted(0)), 0, secs(5), &mut h);
        assert_eq!((d.replicas, d.reason), (1, DecisionReason::Activate));
        // Once every partition has a commit, zero lag means zero replicas again.
        let d = decide(&p, &lag(0, 6), 1, secs(10), &mut h);
        assert_eq!((d.replicas, d.reason), (0, DecisionReason::ScaleToZero));
    }

    #[test]
    fn after_a_gap_in_samples_scale_down_waits_for_a_full_window_of_new_ones() {
        let mut h = ScaleHistory::default();
        let mut current = decide(&policy(), &lag(400, 6), 1, secs(0), &mut h).replicas;
        assert_eq!(current, 4);
        for t in (5..=60).step_by(5) {
            current = decide(&policy(), &lag(400, 6), current, secs(t), &mut h).replicas;
        }
        // No samples for ten minutes, then one saying "no lag": the old samples left the window,
        // but one new sample is not a window.
        let d = decide(&policy(), &lag(0, 6), current, secs(660), &mut h);
        assert_eq!((d.replicas, d.reason), (4, DecisionReason::Stable));
        let d = decide(&policy(), &lag(0, 6), current, secs(690), &mut h);
        assert_eq!((d.replicas, d.reason), (4, DecisionReason::Stable));
        let d = decide(&policy(), &lag(0, 6), current, secs(720), &mut h);
        assert_eq!((d.replicas, d.reason), (1, DecisionReason::ScaleDown));
    }

    #[test]
    fn failed_readings_restart_the_scale_down_window() {
        let mut h = ScaleHistory::default();
        let mut current = decide(&policy(), &lag(400, 6), 1, secs(0), &mut h).replicas;
        for t in (5..=55).step_by(5) {
            current = decide(&policy(), &lag(400, 6), current, secs(t), &mut h).replicas;
        }
        let down = Observation::Unavailable("broker down".into());
        assert_eq!(
            decide(&policy(), &down, current, secs(60), &mut h).replicas,
            4
        );
        // Back within the gap limit, but the failure broke the series.
        for t in (65..=120).step_by(5) {
            let d = decide(&policy(), &lag(0, 6), current, secs(t), &mut h);
            assert_eq!(d.replicas, 4, "held at t={t}");
        }
        let d = decide(&policy(), &lag(0, 6), current, secs(125), &mut h);
        assert_eq!((d.replicas, d.reason), (1, DecisionReason::ScaleDown));
    }

    #[test]
    fn the_sample_gap_limit_is_three_poll_intervals_and_at_least_30_seconds() {
        assert_eq!(max_sample_gap(secs(5)), secs(30));
        assert_eq!(max_sample_gap(secs(60)), secs(180));
    }

    #[test]
    fn caps_apply_after_stabilization_too() {
        let mut h = ScaleHistory::default();
        let d = decide(&policy(), &lag(1_000_000, 4), 1, secs(0), &mut h);
        assert_eq!(d.replicas, 4, "capped at 4 partitions");
        let p = ScalePolicy {
            allow_idle_consumers: true,
            max_replicas: 7,
            ..policy()
        };
        let mut h = ScaleHistory::default();
        let d = decide(&p, &lag(1_000_000, 4), 1, secs(0), &mut h);
        assert_eq!(d.replicas, 7, "capped at maxReplicas");
    }
}
