//! The StreamConsumer's status: conditions `Ready`, `Progressing` and `Degraded`, computed from
//! the worker Deployment, and `LagAvailable` with `status.lag`, from the operator's latest lag
//! reading.
//!
//! `LagAvailable` is its own condition rather than a `Degraded` reason: brokers that cannot be
//! reached say nothing about the workers' rollout, and a rollout problem must not hide them. When
//! it is `False`, `status.lag` keeps the last successful reading (its `observedAt` tells its age)
//! and an autoscaled StreamConsumer holds its replicas.
//!
//! `OffsetGap` shows the offset gaps the workers reported (they attach each partition's latest gap
//! to its advisory Kafka commit, which the lag reading fetches; see [`streamops_crds::gap`]). It
//! appears with the first reported gap (`True`, reason `OffsetGap`, the gaps in the message) and
//! turns `False` once no partition reports one. It is carried over while the lag cannot be read.
//!
//! `Ready` reflects the workers, not the apply: it is true only once the Deployment controller has
//! observed the current Deployment generation and every desired replica is updated and ready.
//! `lastTransitionTime` moves only when a condition's status changes, so an unchanged world yields
//! an identical status and the reconciler skips the patch.
//!
//! Progress may wait a little ([`only_progress`], [`PROGRESS_HOLD`]): a status that differs from
//! the stored one only in how far the workers got (the counts, and the reasons and messages of
//! conditions whose status stays as it was) is written at most [`PROGRESS_HOLD`] after the
//! previous write, or, for a new object's first status, after its creation; the progress reached
//! by then goes out in one write. Everything else is written at once: a new generation, any
//! condition turning `True` or `False`, the lag, the configuration, the phase and a replay. A new
//! StreamConsumer whose workers come up within the hold gets a single status write instead of
//! three (its creation, the Deployment's first report, the workers ready), each of which costs
//! the API server a custom resource's decoding, validation and managed-fields update.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use streamops_crds::v1alpha1::{StreamConsumer, StreamConsumerStatus};

use crate::lag::LagSource;
use crate::lag_book::LagView;
use crate::names::selector_string;
use crate::validation::InvalidSpec;

/// Condition type: the workers run the current configuration and all are ready.
pub const READY: &str = "Ready";
/// Condition type: a rollout or scale is under way.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something needs a human: an invalid spec, a failing reconciliation, a stuck
/// rollout.
pub const DEGRADED: &str = "Degraded";

/// Condition type: the operator's latest attempt to read the consumer group's lag succeeded.
/// Absent until the first attempt.
pub const LAG_AVAILABLE: &str = "LagAvailable";

/// Condition type: the workers reported a gap in a partition's offsets (messages Kafka no
/// longer had). Absent until the first gap.
pub const OFFSET_GAP: &str = "OffsetGap";
/// Reason of `OffsetGap=True`.
pub const REASON_OFFSET_GAP: &str = "OffsetGap";
/// Most gaps named in the `OffsetGap` message.
const MAX_GAPS_IN_MESSAGE: usize = 5;

/// Reason of `Degraded=True` for an invalid spec.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Reason of `LagAvailable=True` when the lag is read from the brokers.
pub const REASON_LAG_READ: &str = "LagRead";
/// Reason of `LagAvailable=True` when the lag is what the workers report (the brokers are not on
/// the operator's allow-list; see [`crate::lag_workers`]).
pub const REASON_LAG_REPORTED_BY_WORKERS: &str = "LagReportedByWorkers";
/// Reason of the warning event when the lag stops being readable. (The condition's reason says
/// why: `KafkaError`, `TopicUnavailable`, `MissingCredentials`, `Timeout`, `ReaderFailed`.)
pub const REASON_LAG_UNAVAILABLE: &str = "LagUnavailable";

/// How long progress may wait before it is written (see the module notes).
pub const PROGRESS_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `new` only reports progress over `old` (the stored status; `None`: the object has
/// none yet), so its write may wait: the same generation, selector, configuration hash, lag,
/// phase and replay, and the same conditions with the same status each (`True`/`False`), only
/// their reasons and messages and the replica counts moved. A first status is progress unless a
/// condition in it is already settled: `Ready` or `Degraded` true.
pub fn only_progress(old: Option<&StreamConsumerStatus>, new: &StreamConsumerStatus) -> bool {
    let Some(old) = old else {
        return !new
            .conditions
            .iter()
            .any(|c| (c.type_ == READY || c.type_ == DEGRADED) && c.status == "True");
    };
    let statuses = |s: &StreamConsumerStatus| {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone()))
            .collect::<Vec<_>>()
    };
    old.observed_generation == new.observed_generation
        && old.selector == new.selector
        && old.config_hash == new.config_hash
        && old.lag == new.lag
        && old.phase == new.phase
        && old.replay == new.replay
        && statuses(old) == statuses(new)
}

/// The current time, truncated to whole seconds as the API server stores condition times.
pub fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// What the worker Deployment says about the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// Replicas the StreamConsumer wants.
    pub desired: i32,
    /// Pods that exist (`status.replicas`).
    pub replicas: i32,
    /// Pods that are ready.
    pub ready: i32,
    /// Pods running the current pod template.
    pub updated: i32,
    /// Whether the Deployment controller has seen the current Deployment generation.
    pub observed_current: bool,
    /// The Deployment's message when its rollout exceeded its progress deadline.
    pub stalled: Option<String>,
}

impl Rollout {
    /// Reads the Deployment's status.
    pub fn of(deployment: &Deployment, desired: i32) -> Self {
        let status = deployment.status.clone().unwrap_or_default();
        let generation = deployment.metadata.generation.unwrap_or(0);
        let stalled = status
            .conditions
            .iter()
            .flatten()
            .find(|c| {
                c.type_ == "Progressing"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
            .map(|c| {
                c.message
                    .clone()
                    .unwrap_or_else(|| "the rollout exceeded its progress deadline".into())
            });
        Self {
            desired,
            replicas: status.replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            observed_current: status.observed_generation.unwrap_or(0) >= generation,
            stalled,
        }
    }

    /// Every desired worker runs the current template and is ready, and no old one is left.
    pub fn complete(&self) -> bool {
        self.observed_current
            && self.updated == self.desired
            && self.replicas == self.desired
            && self.ready == self.desired
    }
}

/// Builds conditions, keeping `lastTransitionTime` of those whose status did not change.
struct Conditions<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Time,
    out: Vec<Condition>,
}

impl<'a> Conditions<'a> {
    fn new(sc: &'a StreamConsumer, now: Time) -> Self {
        Self {
            previous: sc
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default(),
            generation: sc.metadata.generation,
            now,
            out: Vec::with_capacity(3),
        }
    }

    fn set(&mut self, type_: &str, status: bool, reason: &str, message: impl Into<String>) {
        let status = if status { "True" } else { "False" };
        let last_transition_time = self
            .previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| self.now.clone());
        self.out.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: self.generation,
            last_transition_time,
        });
    }

    /// Carries a previous condition over unchanged, or sets a default when there is none.
    fn keep_or(&mut self, type_: &str, status: bool, reason: &str, message: &str) {
        match self.previous.iter().find(|c| c.type_ == type_) {
            Some(c) => self.out.push(c.clone()),
            None => self.set(type_, status, reason, message),
        }
    }

    /// Carries a previous condition over unchanged, if there is one.
    fn carry(&mut self, type_: &str) {
        if let Some(c) = self.previous.iter().find(|c| c.type_ == type_) {
            self.out.push(c.clone());
        }
    }

    /// `LagAvailable` from the latest reading; carried over when there is none yet.
    fn lag_available(&mut self, sc: &StreamConsumer, lag: Option<&LagView>, desired: i32) {
        match lag {
            None => self.carry(LAG_AVAILABLE),
            Some(LagView {
                failure: None,
                source: LagSource::Brokers,
                ..
            }) => self.set(
                LAG_AVAILABLE,
                true,
                REASON_LAG_READ,
                "the consumer-group lag is read from the brokers",
            ),
            Some(LagView {
                failure: None,
                source: LagSource::Workers { reported },
                ..
            }) => self.set(
                LAG_AVAILABLE,
                true,
                REASON_LAG_REPORTED_BY_WORKERS,
                format!(
                    "the brokers are not on the operator's allow-list: the consumer-group lag is \
                     the sum of what the {reported} ready worker(s) report, which acts only on \
                     this StreamConsumer's replicas, within its own bounds"
                ),
            ),
            Some(LagView {
                failure: Some(f), ..
            }) => {
                let message = if sc.spec.autoscaling.is_some() {
                    format!("{}; autoscaling holds {desired} replicas", f.message)
                } else {
                    f.message.clone()
                };
                self.set(LAG_AVAILABLE, false, f.reason, message)
            }
        }
    }
}

impl Conditions<'_> {
    /// `OffsetGap` from the latest successful reading; carried over otherwise.
    fn offset_gap(&mut self, lag: Option<&LagView>) {
        let Some(view) = lag.filter(|l| l.failure.is_none()) else {
            self.carry(OFFSET_GAP);
            return;
        };
        if view.gaps.is_empty() {
            if self.previous.iter().any(|c| c.type_ == OFFSET_GAP) {
                self.set(
                    OFFSET_GAP,
                    false,
                    "NoOffsetGap",
                    "no partition reports an offset gap",
                );
            }
            return;
        }
        let mut parts: Vec<String> = view
            .gaps
            .iter()
            .take(MAX_GAPS_IN_MESSAGE)
            .map(|g| g.note.describe(&g.topic, g.partition))
            .collect();
        if view.gaps.len() > MAX_GAPS_IN_MESSAGE {
            parts.push(format!(
                "and {} more (see streamops_offset_gaps)",
                view.gaps.len() - MAX_GAPS_IN_MESSAGE
            ));
        }
        self.set(OFFSET_GAP, true, REASON_OFFSET_GAP, parts.join("; "));
    }
}

/// The status after a successful reconciliation, from the applied Deployment and the latest lag
/// reading (`None`: nothing read yet, the lag and its condition are carried over).
pub fn observed(
    sc: &StreamConsumer,
    deployment: &Deployment,
    desired: i32,
    config_hash: &str,
    lag: Option<&LagView>,
    now: Time,
) -> StreamConsumerStatus {
    let rollout = Rollout::of(deployment, desired);
    let name = sc.metadata.name.as_deref().unwrap_or_default();
    let mut c = Conditions::new(sc, now);
    let ready_msg = format!("{}/{} workers ready", rollout.ready, rollout.desired);

    // Some pods still run an older template, or the Deployment controller has not seen the
    // latest one yet.
    let rolling = !rollout.observed_current || rollout.updated < rollout.replicas;
    if rollout.complete() {
        if desired == 0 && crate::replay::holds_workers(sc) {
            let (reason, msg) = if crate::replay::pending_request(sc).is_some() {
                ("Replaying", "no workers run while the replay runs")
            } else {
                (
                    "Suspended",
                    "suspended (spec.suspend): no workers run; lag is still reported",
                )
            };
            c.set(READY, true, reason, msg);
        } else if desired == 0 {
            c.set(READY, true, "ScaledToZero", "scaled to zero workers");
        } else {
            c.set(READY, true, "WorkersReady", ready_msg);
        }
    } else if rolling {
        c.set(
            READY,
            false,
            "RollingOut",
            format!(
                "{ready_msg}; {}/{} run the current configuration",
                rollout.updated, desired
            ),
        );
    } else {
        c.set(READY, false, "WorkersNotReady", ready_msg);
    }

    match (&rollout.stalled, rollout.complete()) {
        (Some(msg), _) => c.set(PROGRESSING, false, "ProgressDeadlineExceeded", msg.clone()),
        (None, true) => c.set(
            PROGRESSING,
            false,
            "RolloutComplete",
            "the workers are up to date",
        ),
        (None, false) => {
            let reason = if rolling {
                "RollingOut"
            } else if rollout.replicas != desired {
                "Scaling"
            } else {
                "WaitingForReadiness"
            };
            c.set(
                PROGRESSING,
                true,
                reason,
                format!(
                    "{}/{} workers updated, {} ready, {} running",
                    rollout.updated, desired, rollout.ready, rollout.replicas
                ),
            )
        }
    }

    match &rollout.stalled {
        Some(msg) => c.set(DEGRADED, true, "ProgressDeadlineExceeded", msg.clone()),
        None => c.set(DEGRADED, false, "AsExpected", ""),
    }
    c.lag_available(sc, lag, desired);
    c.offset_gap(lag);

    let previous_lag = sc.status.as_ref().and_then(|s| s.lag.clone());
    StreamConsumerStatus {
        conditions: c.out,
        observed_generation: sc.metadata.generation,
        replicas: rollout.replicas,
        ready_replicas: rollout.ready,
        selector: Some(selector_string(name)),
        lag: lag.and_then(|l| l.last.clone()).or(previous_lag),
        config_hash: Some(config_hash.to_string()),
        phase: Some(crate::replay::phase(sc).to_string()),
        replay: sc.status.as_ref().and_then(|s| s.replay.clone()),
    }
}

/// The message of `LagAvailable` when it turned `False` between `old` and `new` (absent counts as
/// available): the reconciler announces it in a warning event.
pub fn lag_lost(old: Option<&StreamConsumerStatus>, new: &StreamConsumerStatus) -> Option<String> {
    let now = condition(new, LAG_AVAILABLE).filter(|c| c.status == "False")?;
    let before = old.and_then(|s| condition(s, LAG_AVAILABLE));
    if before.is_some_and(|c| c.status == "False") {
        return None;
    }
    Some(format!(
        "cannot read the consumer-group lag: {}",
        now.message
    ))
}

/// The status of an invalid spec: `Degraded` names the fields; the workers keep running whatever
/// they ran, so `Ready` and the counts are carried over.
pub fn invalid_spec(sc: &StreamConsumer, invalid: &InvalidSpec, now: Time) -> StreamConsumerStatus {
    let mut status = carried_over(sc);
    let mut c = Conditions::new(sc, now);
    c.keep_or(
        READY,
        false,
        REASON_INVALID_SPEC,
        "no workers were configured: the spec is invalid",
    );
    c.set(
        PROGRESSING,
        false,
        REASON_INVALID_SPEC,
        "nothing is rolled out until the spec is fixed",
    );
    c.set(DEGRADED, true, REASON_INVALID_SPEC, invalid.to_string());
    c.carry(LAG_AVAILABLE);
    c.carry(OFFSET_GAP);
    status.conditions = c.out;
    status.observed_generation = sc.metadata.generation;
    status
}

/// The status after a failed reconciliation: `Degraded` with the error; the rest carried over.
pub fn failed(sc: &StreamConsumer, reason: &str, message: &str, now: Time) -> StreamConsumerStatus {
    let mut status = carried_over(sc);
    let mut c = Conditions::new(sc, now);
    c.keep_or(READY, false, reason, "the workers could not be configured");
    c.keep_or(PROGRESSING, false, reason, "the reconciliation failed");
    c.set(DEGRADED, true, reason, message);
    c.carry(LAG_AVAILABLE);
    c.carry(OFFSET_GAP);
    status.conditions = c.out;
    status
}

fn carried_over(sc: &StreamConsumer) -> StreamConsumerStatus {
    sc.status.clone().unwrap_or_default()
}

/// The condition of a type.
pub fn condition<'a>(status: &'a StreamConsumerStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
    use streamops_crds::v1alpha1::LagStatus;
    use streamops_crds::validate::FieldError;

    fn t(sec: i64) -> Time {
        Time(Timestamp::from_second(sec).unwrap())
    }

    fn deployment(generation: i64, status: DeploymentStatus) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(generation);
        d.status = Some(status);
        d
    }

    fn settled(generation: i64, n: i32) -> Deployment {
        deployment(
            generation,
            DeploymentStatus {
                observed_generation: Some(generation),
                replicas: Some(n),
                ready_replicas: Some(n),
                updated_replicas: Some(n),
                available_replicas: Some(n),
                ..DeploymentStatus::default()
            },
        )
    }

    fn is(status: &StreamConsumerStatus, type_: &str) -> (String, String) {
        let c = condition(status, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    /// The Deployment's reports on a new StreamConsumer's way up, in order: just created (not yet
    /// observed), observed with no pod, one pod not ready, the pod ready.
    fn way_up() -> Vec<Deployment> {
        let report = |observed: Option<i64>, replicas, ready| {
            deployment(
                1,
                DeploymentStatus {
                    observed_generation: observed,
                    replicas: Some(replicas),
                    ready_replicas: Some(ready),
                    updated_replicas: Some(replicas),
                    available_replicas: Some(ready),
                    ..DeploymentStatus::default()
                },
            )
        };
        vec![
            deployment(1, DeploymentStatus::default()),
            report(Some(1), 0, 0),
            report(Some(1), 1, 0),
            report(Some(1), 1, 1),
        ]
    }

    #[test]
    fn on_the_way_up_only_progress_may_wait_and_the_workers_ready_may_not() {
        let sc = StreamConsumer::test();
        let statuses: Vec<StreamConsumerStatus> = way_up()
            .iter()
            .map(|d| observed(&sc, d, 1, "abc", None, t(10)))
            .collect();
        // A first status that is not settled may wait; one that is already Ready may not.
        assert!(only_progress(None, &statuses[0]));
        assert!(!only_progress(None, &statuses[3]));
        // Each step before the workers are ready only moves the counts and the reasons.
        for (old, new) in statuses.iter().zip(&statuses[1..3]) {
            assert_ne!(old, new);
            assert!(only_progress(Some(old), new), "{old:?} -> {new:?}");
        }
        // Ready turning true is written at once, from any earlier step.
        for old in &statuses[..3] {
            assert!(!only_progress(Some(old), &statuses[3]));
        }
    }

    #[test]
    fn a_new_generation_the_lag_a_degraded_rollout_or_a_replay_cannot_wait() {
        let sc = StreamConsumer::test();
        let old = observed(&sc, &way_up()[1], 1, "abc", None, t(10));
        let progress = observed(&sc, &way_up()[2], 1, "abc", None, t(20));
        assert!(only_progress(Some(&old), &progress));

        let newer = observed(
            &sc.clone().with_generation(2),
            &way_up()[2],
            1,
            "abc",
            None,
            t(20),
        );
        assert!(!only_progress(Some(&old), &newer), "a new generation");
        let mut lag = progress.clone();
        lag.lag = Some(LagStatus {
            total: 5,
            ..LagStatus::default()
        });
        assert!(!only_progress(Some(&old), &lag), "the lag");
        let mut config = progress.clone();
        config.config_hash = Some("def".into());
        assert!(!only_progress(Some(&old), &config), "the configuration");
        let mut degraded = progress.clone();
        for c in degraded
            .conditions
            .iter_mut()
            .filter(|c| c.type_ == DEGRADED)
        {
            c.status = "True".into();
            c.reason = "ProgressDeadlineExceeded".into();
        }
        assert!(
            !only_progress(Some(&old), &degraded),
            "Degraded turning true"
        );
        let mut phase = progress.clone();
        phase.phase = Some("Suspended".into());
        assert!(!only_progress(Some(&old), &phase), "the phase");
    }

    #[test]
    fn ready_when_every_worker_runs_the_current_generation_and_is_ready() {
        let sc = StreamConsumer::test().with_replicas(3);
        let s = observed(&sc, &settled(4, 3), 3, "abc", None, t(10));
        assert_eq!(is(&s, READY), ("True".into(), "WorkersReady".into()));
        assert_eq!(
            is(&s, PROGRESSING),
            ("False".into(), "RolloutComplete".into())
        );
        assert_eq!(is(&s, DEGRADED), ("False".into(), "AsExpected".into()));
        assert_eq!((s.replicas, s.ready_replicas), (3, 3));
        assert_eq!(s.config_hash.as_deref(), Some("abc"));
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(
            s.selector.as_deref(),
            Some("app.kubernetes.io/instance=test,app.kubernetes.io/name=streamops-worker")
        );
    }

    #[test]
    fn not_ready_while_the_deployment_controller_has_not_seen_the_new_generation() {
        // The status still shows 3 ready pods, but of the previous template.
        let mut d = settled(4, 3);
        d.metadata.generation = Some(5);
        let s = observed(
            &StreamConsumer::test().with_replicas(3),
            &d,
            3,
            "abc",
            None,
            t(10),
        );
        assert_eq!(is(&s, READY), ("False".into(), "RollingOut".into()));
        assert_eq!(is(&s, PROGRESSING), ("True".into(), "RollingOut".into()));
    }

    #[test]
    fn not_ready_while_fewer_workers_are_ready_than_desired() {
        let d = deployment(
            2,
            DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(3),
                ready_replicas: Some(1),
                updated_replicas: Some(3),
                ..DeploymentStatus::default()
            },
        );
        let s = observed(
            &StreamConsumer::test().with_replicas(3),
            &d,
            3,
            "abc",
            None,
            t(10),
        );
        assert_eq!(is(&s, READY), ("False".into(), "WorkersNotReady".into()));
        assert_eq!(condition(&s, READY).unwrap().message, "1/3 workers ready");
        assert_eq!(
            is(&s, PROGRESSING),
            ("True".into(), "WaitingForReadiness".into())
        );
        assert_eq!(s.ready_replicas, 1);
    }

    #[test]
    fn not_ready_while_old_pods_remain_after_a_scale_down() {
        let d = deployment(
            2,
            DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(3),
                ready_replicas: Some(1),
                updated_replicas: Some(1),
                ..DeploymentStatus::default()
            },
        );
        let s = observed(&StreamConsumer::test(), &d, 1, "abc", None, t(10));
        assert_eq!(is(&s, READY).0, "False");
        assert_eq!(is(&s, PROGRESSING), ("True".into(), "RollingOut".into()));
        // All pods current, two extra still terminating.
        let mut d = d;
        d.status.as_mut().unwrap().updated_replicas = Some(3);
        let s = observed(&StreamConsumer::test(), &d, 1, "abc", None, t(10));
        assert_eq!(is(&s, PROGRESSING), ("True".into(), "Scaling".into()));
    }

    #[test]
    fn stuck_rollout_is_degraded() {
        let mut d = deployment(
            2,
            DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(2),
                updated_replicas: Some(1),
                ready_replicas: Some(1),
                ..DeploymentStatus::default()
            },
        );
        d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet \"test-1\" has timed out progressing.".into()),
            ..DeploymentCondition::default()
        }]);
        let s = observed(&StreamConsumer::test(), &d, 1, "abc", None, t(10));
        assert_eq!(
            is(&s, DEGRADED),
            ("True".into(), "ProgressDeadlineExceeded".into())
        );
        assert_eq!(
            is(&s, PROGRESSING),
            ("False".into(), "ProgressDeadlineExceeded".into())
        );
    }

    #[test]
    fn zero_replicas_is_ready_once_scaled_down() {
        let s = observed(
            &StreamConsumer::test().with_replicas(0),
            &settled(3, 0),
            0,
            "h",
            None,
            t(1),
        );
        assert_eq!(is(&s, READY), ("True".into(), "ScaledToZero".into()));
    }

    #[test]
    fn transition_time_moves_only_when_a_condition_flips() {
        let sc = StreamConsumer::test();
        let first = observed(&sc, &settled(1, 1), 1, "h", None, t(100));
        let sc = sc.with_status(first.clone());
        let again = observed(&sc, &settled(1, 1), 1, "h", None, t(200));
        assert_eq!(first, again, "an unchanged world gives an identical status");

        let mut rolling = settled(2, 1);
        rolling.status.as_mut().unwrap().observed_generation = Some(1);
        let flipped = observed(&sc, &rolling, 1, "h2", None, t(300));
        assert_eq!(
            condition(&flipped, READY).unwrap().last_transition_time,
            t(300)
        );
        // Degraded stayed False: its time is kept.
        assert_eq!(
            condition(&flipped, DEGRADED).unwrap().last_transition_time,
            t(100)
        );
    }

    #[test]
    fn invalid_spec_is_degraded_naming_the_field_and_keeps_the_counts() {
        let prev = observed(&StreamConsumer::test(), &settled(1, 1), 1, "h", None, t(1));
        let sc = StreamConsumer::test().with_generation(2).with_status(prev);
        let invalid = InvalidSpec {
            errors: vec![FieldError {
                field: "spec.kafka.groupId".into(),
                message: "must be 1-255 characters".into(),
            }],
        };
        let s = invalid_spec(&sc, &invalid, t(5));
        let d = condition(&s, DEGRADED).unwrap();
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert!(d.message.contains("spec.kafka.groupId"), "{}", d.message);
        assert_eq!(is(&s, READY), ("True".into(), "WorkersReady".into()));
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.config_hash.as_deref(), Some("h"));
        assert_eq!(s.ready_replicas, 1);
    }

    fn read(total: i64) -> LagView {
        LagView {
            last: Some(streamops_crds::v1alpha1::LagStatus {
                total,
                partitions: 6,
                members: 2,
                max_partition_lag: total / 2,
                observed_at: Some("2025-01-01T00:00:00Z".into()),
            }),
            failure: None,
            gaps: Vec::new(),
            source: LagSource::Brokers,
        }
    }

    fn unreadable(last: Option<i64>) -> LagView {
        LagView {
            last: last.and_then(|t| read(t).last),
            failure: Some(crate::lag_book::LagFailure {
                reason: "KafkaError",
                message: "kafka: all brokers down".into(),
            }),
            gaps: Vec::new(),
            source: LagSource::Brokers,
        }
    }

    fn with_gap(mut view: LagView) -> LagView {
        view.gaps = vec![crate::lag::PartitionGap {
            topic: "prices".into(),
            partition: 2,
            note: streamops_crds::gap::GapNote {
                kind: streamops_crds::gap::GapKind::Retention,
                from: 100,
                to: 250,
                skipped: true,
                detected_at: 1_733_000_000,
            },
        }];
        view
    }

    #[test]
    fn a_reported_gap_is_the_offset_gap_condition_until_none_is_reported() {
        let sc = StreamConsumer::test();
        let s = observed(&sc, &settled(1, 1), 1, "h", Some(&read(0)), t(1));
        assert!(condition(&s, OFFSET_GAP).is_none(), "absent until a gap");
        let s = observed(&sc, &settled(1, 1), 1, "h", Some(&with_gap(read(0))), t(2));
        let c = condition(&s, OFFSET_GAP).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", REASON_OFFSET_GAP)
        );
        assert!(
            c.message.contains("offsets 100..250 of prices/2") && c.message.contains("skipped"),
            "{}",
            c.message
        );
        // An unreadable lag says nothing about gaps: carried over.
        let with_status = StreamConsumer::test().with_status(s.clone());
        let s2 = observed(
            &with_status,
            &settled(1, 1),
            1,
            "h",
            Some(&unreadable(Some(0))),
            t(3),
        );
        assert_eq!(condition(&s2, OFFSET_GAP), condition(&s, OFFSET_GAP));
        let s3 = observed(&with_status, &settled(1, 1), 1, "h", Some(&read(0)), t(4));
        let c = condition(&s3, OFFSET_GAP).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NoOffsetGap")
        );
    }

    #[test]
    fn a_lag_reading_fills_status_lag_and_makes_lag_available() {
        let sc = StreamConsumer::test();
        let s = observed(&sc, &settled(1, 1), 1, "h", Some(&read(420)), t(1));
        let lag = s.lag.as_ref().unwrap();
        assert_eq!(
            (
                lag.total,
                lag.partitions,
                lag.members,
                lag.max_partition_lag
            ),
            (420, 6, 2, 210)
        );
        assert_eq!(is(&s, LAG_AVAILABLE), ("True".into(), "LagRead".into()));
        assert_eq!(s.conditions.len(), 4);
    }

    #[test]
    fn without_a_reading_the_lag_and_its_condition_are_carried_over() {
        let first = observed(
            &StreamConsumer::test(),
            &settled(1, 1),
            1,
            "h",
            Some(&read(7)),
            t(1),
        );
        let sc = StreamConsumer::test().with_status(first.clone());
        let again = observed(&sc, &settled(1, 1), 1, "h", None, t(50));
        assert_eq!(again, first);
        // Never read, never had a condition: none is invented.
        let fresh = observed(&StreamConsumer::test(), &settled(1, 1), 1, "h", None, t(1));
        assert!(condition(&fresh, LAG_AVAILABLE).is_none());
        assert!(fresh.lag.is_none());
    }

    #[test]
    fn unreadable_lag_keeps_the_last_reading_and_says_why_and_what_autoscaling_holds() {
        let sc = StreamConsumer::test().with_spec(|s| {
            s.autoscaling = Some(streamops_crds::v1alpha1::AutoscalingSpec {
                min_replicas: 1,
                max_replicas: 5,
                lag_threshold: 100,
                scale_up_stabilization_seconds: 0,
                scale_down_stabilization_seconds: 300,
                scale_to_zero: false,
                activation_lag: 1,
                allow_idle_consumers: false,
                poll_interval_seconds: 5,
            })
        });
        let s = observed(
            &sc,
            &settled(1, 3),
            3,
            "h",
            Some(&unreadable(Some(250))),
            t(1),
        );
        assert_eq!(is(&s, LAG_AVAILABLE), ("False".into(), "KafkaError".into()));
        let message = &condition(&s, LAG_AVAILABLE).unwrap().message;
        assert!(message.contains("all brokers down"), "{message}");
        assert!(message.contains("holds 3 replicas"), "{message}");
        assert_eq!(s.lag.as_ref().unwrap().total, 250);
        assert_eq!(is(&s, DEGRADED).0, "False", "the workers are fine");
    }

    #[test]
    fn losing_the_lag_is_reported_once() {
        let sc = StreamConsumer::test();
        let ok = observed(&sc, &settled(1, 1), 1, "h", Some(&read(1)), t(1));
        let lost = observed(
            &sc.clone().with_status(ok.clone()),
            &settled(1, 1),
            1,
            "h",
            Some(&unreadable(Some(1))),
            t(2),
        );
        let message = lag_lost(Some(&ok), &lost).unwrap();
        assert!(message.contains("all brokers down"), "{message}");
        let still = observed(
            &sc.clone().with_status(lost.clone()),
            &settled(1, 1),
            1,
            "h",
            Some(&unreadable(Some(1))),
            t(3),
        );
        assert_eq!(lag_lost(Some(&lost), &still), None);
        assert!(
            lag_lost(None, &lost).is_some(),
            "unreadable from the first attempt"
        );
        assert_eq!(lag_lost(Some(&lost), &ok), None);
    }

    #[test]
    fn a_failed_or_invalid_pass_keeps_lag_available() {
        let ok = observed(
            &StreamConsumer::test(),
            &settled(1, 1),
            1,
            "h",
            Some(&read(1)),
            t(1),
        );
        let sc = StreamConsumer::test().with_status(ok);
        let s = failed(&sc, "ApplyFailed", "boom", t(2));
        assert_eq!(is(&s, LAG_AVAILABLE).0, "True");
        let invalid = InvalidSpec {
            errors: vec![FieldError {
                field: "spec.kafka.groupId".into(),
                message: "must not be empty".into(),
            }],
        };
        let s = invalid_spec(&sc, &invalid, t(2));
        assert_eq!(is(&s, LAG_AVAILABLE).0, "True");
    }

    #[test]
    fn failure_is_degraded_with_the_error_reason() {
        let s = failed(&StreamConsumer::test(), "ApplyFailed", "cannot apply", t(5));
        assert_eq!(is(&s, DEGRADED), ("True".into(), "ApplyFailed".into()));
        assert_eq!(is(&s, READY).0, "False");
    }
}
