//! Prometheus metrics of the operator, served on `/metrics`.

use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::Error;

/// The operator's collectors.
#[derive(Clone)]
pub struct Metrics {
    /// `streamops_operator_reconciliations_total`: reconciliations started.
    pub reconciliations: IntCounter,
    /// `streamops_operator_reconcile_failures_total{error}`: failed reconciliations, by
    /// [`Error::kind`].
    pub failures: IntCounterVec,
    /// `streamops_operator_reconcile_duration_seconds`: reconciliation duration.
    pub duration: Histogram,
    /// `streamops_operator_malformed_objects_total`: StreamConsumers skipped because they cannot be
    /// parsed.
    pub malformed_objects: IntCounter,
    /// `streamops_operator_consumer_group_cleanups_total{outcome}`: consumer-group cleanups on
    /// delete: deleted, not_found, retained, skipped, abandoned.
    pub group_cleanups: IntCounterVec,
    /// `streamops_operator_leader`: 1 while this replica holds the leader Lease (or runs without
    /// leader election).
    pub leader: IntGauge,
    /// `streamops_operator_consumer_lag{namespace,name}`: total consumer-group lag of each
    /// StreamConsumer, in messages, at the latest successful reading.
    pub consumer_lag: IntGaugeVec,
    /// `streamops_operator_consumer_max_partition_lag{namespace,name}`: largest lag of one
    /// partition.
    pub consumer_max_partition_lag: IntGaugeVec,
    /// `streamops_operator_consumer_members{namespace,name}`: members of the consumer group.
    pub consumer_members: IntGaugeVec,
    /// `streamops_operator_consumer_lag_read_timestamp_seconds{namespace,name}`: Unix time of the
    /// latest successful lag reading (alert on its age).
    pub consumer_lag_read_timestamp: IntGaugeVec,
    /// `streamops_operator_lag_read_failures_total{reason}`: lag readings that failed, by reason
    /// (snake case of the `LagAvailable=False` reason).
    pub lag_read_failures: IntCounterVec,
    /// `streamops_operator_autoscaler_replicas{namespace,name}`: replicas the autoscaler decided,
    /// for StreamConsumers with `spec.autoscaling`.
    pub autoscaler_replicas: IntGaugeVec,
    /// `streamops_operator_scale_decisions_total{reason}`: autoscaler decisions that changed the
    /// replica count: ScaleUp, ScaleDown, Activate, ScaleToZero.
    pub scale_decisions: IntCounterVec,
}

/// Labels of the per-StreamConsumer gauges.
const CONSUMER_LABELS: &[&str] = &["namespace", "name"];

impl Metrics {
    /// Creates the collectors and registers them.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            reconciliations: IntCounter::new(
                "streamops_operator_reconciliations_total",
                "Reconciliations started",
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "streamops_operator_reconcile_failures_total",
                    "Failed reconciliations, by error kind",
                ),
                &["error"],
            )?,
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "streamops_operator_reconcile_duration_seconds",
                    "Duration of one reconciliation",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
            )?,
            malformed_objects: IntCounter::new(
                "streamops_operator_malformed_objects_total",
                "StreamConsumers skipped because they cannot be parsed",
            )?,
            group_cleanups: IntCounterVec::new(
                Opts::new(
                    "streamops_operator_consumer_group_cleanups_total",
                    "Consumer-group cleanups on delete, by outcome",
                ),
                &["outcome"],
            )?,
            leader: IntGauge::new(
                "streamops_operator_leader",
                "1 while this replica runs the controller",
            )?,
            consumer_lag: IntGaugeVec::new(
                Opts::new(
                    "streamops_operator_consumer_lag",
                    "Total consumer-group lag of a StreamConsumer, in messages",
                ),
                CONSUMER_LABELS,
            )?,
            consumer_max_partition_lag: IntGaugeVec::new(
                Opts::new(
                    "streamops_operator_consumer_max_partition_lag",
                    "Largest lag of one partition of a StreamConsumer's topics, in messages",
                ),
                CONSUMER_LABELS,
            )?,
            consumer_members: IntGaugeVec::new(
                Opts::new(
                    "streamops_operator_consumer_members",
                    "Members of a StreamConsumer's consumer group",
                ),
                CONSUMER_LABELS,
            )?,
            consumer_lag_read_timestamp: IntGaugeVec::new(
                Opts::new(
                    "streamops_operator_consumer_lag_read_timestamp_seconds",
                    "Unix time of the latest successful lag reading of a StreamConsumer",
                ),
                CONSUMER_LABELS,
            )?,
            lag_read_failures: IntCounterVec::new(
                Opts::new(
                    "streamops_operator_lag_read_failures_total",
                    "Failed consumer-group lag readings, by reason",
                ),
                &["reason"],
            )?,
            autoscaler_replicas: IntGaugeVec::new(
                Opts::new(
                    "streamops_operator_autoscaler_replicas",
                    "Replicas decided by the lag autoscaler for a StreamConsumer",
                ),
                CONSUMER_LABELS,
            )?,
            scale_decisions: IntCounterVec::new(
                Opts::new(
                    "streamops_operator_scale_decisions_total",
                    "Autoscaler decisions that changed the replica count, by reason",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.reconciliations.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.malformed_objects.clone()))?;
        registry.register(Box::new(m.group_cleanups.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        registry.register(Box::new(m.consumer_lag.clone()))?;
        registry.register(Box::new(m.consumer_max_partition_lag.clone()))?;
        registry.register(Box::new(m.consumer_members.clone()))?;
        registry.register(Box::new(m.consumer_lag_read_timestamp.clone()))?;
        registry.register(Box::new(m.lag_read_failures.clone()))?;
        registry.register(Box::new(m.autoscaler_replicas.clone()))?;
        registry.register(Box::new(m.scale_decisions.clone()))?;
        Ok(m)
    }

    /// Removes the per-StreamConsumer series of an object that is gone (or no longer read).
    pub fn forget_consumer(&self, namespace: &str, name: &str) {
        let labels = [namespace, name];
        for gauge in [
            &self.consumer_lag,
            &self.consumer_max_partition_lag,
            &self.consumer_members,
            &self.consumer_lag_read_timestamp,
            &self.autoscaler_replicas,
        ] {
            // Absent series are fine: the object may never have been read.
            let _ = gauge.remove_label_values(&labels);
        }
    }

    /// Counts a reconciliation and times it until the guard is dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciliations.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.clone(),
        }
    }

    /// Counts a failed reconciliation.
    pub fn reconcile_failed(&self, error: &Error) {
        self.failures
            .with_label_values(&[error.kind().as_str()])
            .inc();
    }
}

/// Records the reconciliation's duration when dropped, whichever way the reconciliation ends
/// (success, error, or cancellation).
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_records_one_observation_when_dropped() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        {
            let _t = m.reconcile_started();
        }
        assert_eq!(m.duration.get_sample_count(), 1);
        assert_eq!(m.reconciliations.get(), 1);
    }

    #[test]
    fn failures_are_labelled_by_error_kind() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        m.reconcile_failed(&Error::MissingMetadata("uid"));
        assert_eq!(m.failures.with_label_values(&["missing_metadata"]).get(), 1);
    }

    #[test]
    fn every_metric_is_in_the_streamops_operator_family() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        m.reconcile_failed(&Error::MissingMetadata("uid"));
        m.group_cleanups.with_label_values(&["deleted"]).inc();
        m.consumer_lag.with_label_values(&["ns", "a"]).set(1);
        m.lag_read_failures
            .with_label_values(&["kafka_error"])
            .inc();
        m.scale_decisions.with_label_values(&["ScaleUp"]).inc();
        for family in registry.gather() {
            assert!(
                family.name().starts_with("streamops_operator_"),
                "{}",
                family.name()
            );
        }
    }

    #[test]
    fn forgetting_a_consumer_removes_its_series_only() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        m.consumer_lag.with_label_values(&["ns", "a"]).set(5);
        m.consumer_lag.with_label_values(&["ns", "b"]).set(7);
        m.consumer_members.with_label_values(&["ns", "a"]).set(2);
        m.forget_consumer("ns", "a");
        m.forget_consumer("ns", "never-read");
        let lag = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "streamops_operator_consumer_lag")
            .unwrap();
        assert_eq!(lag.get_metric().len(), 1);
        assert_eq!(m.consumer_lag.with_label_values(&["ns", "b"]).get(), 7);
    }
}
