//! Prometheus metrics of the worker. Every name carries the `streamops_` prefix.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The worker's collectors, registered in one registry that `/metrics` serves. Handlers register
/// their own collectors in the same registry (see `HandlerContext::registry`).
#[derive(Clone)]
pub struct Metrics {
    /// The registry served on `/metrics`.
    pub registry: Registry,
    /// Messages received from Kafka.
    pub consumed: IntCounterVec,
    /// Messages whose effect was committed to PostgreSQL.
    pub processed: IntCounterVec,
    /// Messages routed to the error topic, by reason.
    pub failed: IntCounterVec,
    /// Messages per committed batch.
    pub batch_size: Histogram,
    /// Time from a batch's first message to its commit.
    pub batch_duration: Histogram,
    /// Time of the PostgreSQL transaction of a batch.
    pub db_write_duration: Histogram,
    /// Consumer lag per partition, from librdkafka statistics.
    pub partition_lag: IntGaugeVec,
    /// Retries, by what failed (`database`, `error_topic`, `offsets_read`, ...).
    pub retries: IntCounterVec,
    /// Transitions into outage backoff.
    pub outages: IntCounter,
    /// 1 while the worker is in outage backoff.
    pub in_outage: IntGauge,
    /// Offset compare-and-set conflicts (another member wrote the partition).
    pub fencing_conflicts: IntCounter,
    /// Rebalance events, by type (`assign`, `revoke`, `error`).
    pub rebalances: IntCounterVec,
    /// Partitions currently assigned to this worker.
    pub assigned_partitions: IntGauge,
    /// Owned partitions with lag that fetched nothing for the stall window.
    pub stalled_partitions: IntGauge,
    /// Stalled partitions whose fetcher was restarted.
    pub stall_restarts: IntCounter,
    /// Failed advisory Kafka commits.
    pub kafka_commit_failures: IntCounter,
    /// Partitions whose applied offset was committed to Kafka again because Kafka had not
    /// acknowledged it (a failed commit, a new assignment).
    pub kafka_commit_retries: IntCounter,
    /// 1 when `/readyz` answers 200 (set at every scrape).
    pub ready: IntGauge,
    /// Gaps found in partitions' offsets (messages Kafka no longer had), by topic and kind
    /// (`retention`, `reset`).
    pub offset_gaps: IntCounterVec,
    /// Producers replaced by a fresh one because they stayed wedged (consecutive
    /// `MessageTimedOut`) or hit a fatal error, by purpose (`error_topic`).
    pub producer_rebuilds: IntCounterVec,
    /// 1 while the consumer reports every broker down but a fresh client reaches one (the
    /// consumer is wedged and `/healthz` fails; see `consumer_liveness`).
    pub kafka_client_wedged: IntGauge,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} has a valid definition: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registers once: {e}"));
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("metric {name} has a valid definition: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registers once: {e}"));
    h
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help)
        .unwrap_or_else(|e| panic!("metric {name} has a valid definition: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registers once: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help)
        .unwrap_or_else(|e| panic!("metric {name} has a valid definition: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name} registers once: {e}"));
    g
}

impl Metrics {
    /// Creates and registers every collector in a fresh registry. The definitions are
    /// constants, so a failure here is a programming error.
    pub fn new() -> Self {
        let r = Registry::new();
        let seconds = prometheus::exponential_buckets(0.0005, 2.0, 16)
            .unwrap_or_else(|e| panic!("valid buckets: {e}"));
        let sizes = prometheus::exponential_buckets(1.0, 4.0, 10)
            .unwrap_or_else(|e| panic!("valid buckets: {e}"));
        let partition_lag = IntGaugeVec::new(
            Opts::new(
                "streamops_partition_lag",
                "Consumer lag of an assigned partition, in messages (librdkafka statistics)",
            ),
            &["topic", "partition"],
        )
        .unwrap_or_else(|e| panic!("valid metric: {e}"));
        r.register(Box::new(partition_lag.clone()))
            .unwrap_or_else(|e| panic!("metric registers once: {e}"));
        Self {
            consumed: counter_vec(
                &r,
                "streamops_messages_consumed_total",
                "Messages received from Kafka",
                &["handler"],
            ),
            processed: counter_vec(
                &r,
                "streamops_messages_processed_total",
                "Messages whose effect was committed to PostgreSQL",
                &["handler"],
            ),
            failed: counter_vec(
                &r,
                "streamops_messages_failed_total",
                "Messages routed to the error topic",
                &["handler", "reason"],
            ),
            batch_size: histogram(
                &r,
                "streamops_batch_size",
                "Messages per committed batch",
                sizes,
            ),
            batch_duration: histogram(
                &r,
                "streamops_batch_duration_seconds",
                "Time from a batch's first message to its commit",
                seconds.clone(),
            ),
            db_write_duration: histogram(
                &r,
                "streamops_db_write_duration_seconds",
                "Duration of a batch's PostgreSQL transaction",
                seconds,
            ),
            partition_lag,
            retries: counter_vec(
                &r,
                "streamops_retries_total",
                "Retried operations, by what failed",
                &["operation"],
            ),
            outages: counter(
                &r,
                "streamops_outages_total",
                "Times the worker entered outage backoff",
            ),
            ready: gauge(
                &r,
                "streamops_ready",
                "1 when the worker is ready (what /readyz answers), at the time of the scrape",
            ),
            in_outage: gauge(
                &r,
                "streamops_outage",
                "1 while the worker is in outage backoff",
            ),
            fencing_conflicts: counter(
                &r,
                "streamops_offset_conflicts_total",
                "Offset compare-and-set conflicts (partition written by another member)",
            ),
            rebalances: counter_vec(
                &r,
                "streamops_rebalances_total",
                "Rebalance events, by type",
                &["event"],
            ),
            assigned_partitions: gauge(
                &r,
                "streamops_assigned_partitions",
                "Partitions assigned to this worker",
            ),
            stalled_partitions: gauge(
                &r,
                "streamops_stalled_partitions",
                "Owned partitions with lag that fetched nothing for the stall window",
            ),
            stall_restarts: counter(
                &r,
                "streamops_stalled_partition_restarts_total",
                "Stalled partitions whose fetcher was restarted (incremental unassign + assign)",
            ),
            kafka_commit_failures: counter(
                &r,
                "streamops_kafka_commit_failures_total",
                "Failed advisory offset commits to Kafka",
            ),
            kafka_commit_retries: counter(
                &r,
                "streamops_kafka_commit_retries_total",
                "Owned partitions whose applied offset was committed to Kafka again because Kafka \
                 had not acknowledged it (failed commit during a rebalance, new assignment)",
            ),
            offset_gaps: counter_vec(
                &r,
                "streamops_offset_gaps_total",
                "Gaps found in partitions' offsets (messages Kafka no longer had), by kind",
                &["topic", "kind"],
            ),
            producer_rebuilds: counter_vec(
                &r,
                "streamops_producer_rebuilds_total",
                "Kafka producers replaced by a fresh one after consecutive delivery timeouts or a \
                 fatal error, by purpose",
                &["purpose"],
            ),
            kafka_client_wedged: gauge(
                &r,
                "streamops_kafka_client_wedged",
                "1 while the Kafka consumer reports every broker down but a fresh client reaches \
                 one (wedged: /healthz fails so the container is restarted)",
            ),
            registry: r,
        }
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps `HistogramVec` in the public API for handlers that want labelled histograms.
pub type LabelledHistogram = HistogramVec;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_has_the_streamops_prefix() {
        let m = Metrics::new();
        m.consumed.with_label_values(&["moving-average"]).inc();
        m.failed
            .with_label_values(&["moving-average", "invalid_json"])
            .inc();
        m.partition_lag.with_label_values(&["t", "0"]).set(3);
        m.retries.with_label_values(&["database"]).inc();
        m.rebalances.with_label_values(&["assign"]).inc();
        for family in m.registry.gather() {
            assert!(family.name().starts_with("streamops_"), "{}", family.name());
        }
        let text = m.render();
        assert!(text.contains("streamops_messages_consumed_total{handler=\"moving-average\"} 1"));
    }
}
