//! Prometheus metrics of the operator, served on `/metrics`.

use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
}

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
        };
        registry.register(Box::new(m.reconciliations.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.malformed_objects.clone()))?;
        registry.register(Box::new(m.group_cleanups.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        Ok(m)
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
    fn every_metric_has_the_streamops_prefix() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        m.reconcile_failed(&Error::MissingMetadata("uid"));
        m.group_cleanups.with_label_values(&["deleted"]).inc();
        for family in registry.gather() {
            assert!(family.name().starts_with("streamops_"), "{}", family.name());
        }
    }
}
