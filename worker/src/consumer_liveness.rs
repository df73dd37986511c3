//! Liveness of the pipeline's consumer: telling a wedged librdkafka client from a Kafka outage.
//!
//! After a KRaft broker stall the broker is fenced for a moment; librdkafka 2.12 decommissions
//! every broker a Metadata response leaves out, the bootstrap one included, and a client whose
//! refresh lands in that window reports `AllBrokersDown` and can stay without any broker (see
//! DEVELOPERS.md, "Wedged producers"). Producers are replaced (`producer_health`); a wedged
//! consumer keeps `kafka_down` set, so `/readyz` stays 503, and nothing else ever changes.
//!
//! [`spawn`] watches for it: once the consumer has reported every broker down for
//! [`WEDGE_AFTER`], it asks a fresh, short-lived client with the worker's own connection and
//! security settings for metadata ([`probe_brokers`]). If the fresh client reaches a broker
//! while the consumer still reports none, the consumer is wedged: `/healthz` answers 503 with the
//! reason, `streamops_kafka_client_wedged` is 1, a WARN says so, and the kubelet restarts the
//! container (the offsets live in PostgreSQL, so a restart loses and repeats nothing). If the
//! fresh client cannot reach a broker either, Kafka is down: the worker stays live (no restart
//! loop during an outage) and not ready. One probe at a time, each bounded by
//! [`PROBE_TIMEOUT`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use crate::kafka::KafkaClientSettings;
use crate::pipeline::Health;

/// How long the consumer must report every broker down before a fresh client is asked. Well
/// over what a consumer needs to recover from a real, ended outage (librdkafka reconnects within
/// `reconnect.backoff.max.ms`, 10 s, and statistics report a broker up within 5 s), so a healthy
/// consumer is never probed; plus the liveness probe's 30 s (3 × 10 s), a wedged worker is
/// restarted about 1.5–2 minutes after it wedged.
pub const WEDGE_AFTER: Duration = Duration::from_secs(60);

/// How often the watcher looks at the consumer's state.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Bound of one probe's metadata request.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a fresh client found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// It got a Metadata answer listing that many brokers.
    Reachable {
        /// Brokers in the answer.
        brokers: usize,
    },
    /// It reached no broker (or could not be created), with the error.
    Unreachable(String),
}

/// The verdict on the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Working, or waiting out a real outage.
    Live,
    /// The consumer reports no broker while a fresh client reaches one: restart it. The text is
    /// what `/healthz` answers.
    Wedged(String),
}

/// Whether the consumer has reported every broker down (`down_for`) long enough to ask a fresh
/// client.
pub fn should_probe(down_for: Option<Duration>, threshold: Duration) -> bool {
    down_for.is_some_and(|d| d >= threshold)
}

/// The verdict from how long the consumer has reported every broker down (None: it does not),
/// read after the probe, and what the fresh client found.
pub fn decide(down_for: Option<Duration>, threshold: Duration, probe: &Probe) -> Liveness {
    match (down_for, probe) {
        (Some(d), Probe::Reachable { brokers }) if d >= threshold => Liveness::Wedged(format!(
            "kafka consumer wedged: it has reported every broker down for {}s while a fresh \
             client reaches {brokers} broker(s)",
            d.as_secs()
        )),
        _ => Liveness::Live,
    }
}

/// The probe client's context: librdkafka's log and errors at debug level (an unreachable
/// broker during an outage is expected, and the consumer already reports it).
struct ProbeContext;

impl ClientContext for ProbeContext {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(target: "librdkafka", "liveness probe: {fac} {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, reason, "liveness probe: kafka client error");
    }
}

impl ConsumerContext for ProbeContext {}

/// Asks a fresh client with `settings` (connection and security) for metadata, within
/// `timeout`: of `topic` when given (cheap; a client without a group never creates it), else of
/// every topic. The client is dropped afterwards. Runs on a blocking thread.
pub async fn probe_brokers(
    settings: &KafkaClientSettings,
    topic: Option<&str>,
    timeout: Duration,
) -> Probe {
    let mut config = settings.base();
    config
        .set("client.id", "streamops-worker-liveness-probe")
        .set("allow.auto.create.topics", "false");
    let topic = topic.map(str::to_owned);
    let task = tokio::task::spawn_blocking(move || {
        let client: BaseConsumer<ProbeContext> = match config.create_with_context(ProbeContext) {
            Ok(c) => c,
            Err(e) => return Probe::Unreachable(format!("cannot create a client: {e}")),
        };
        match client.client().fetch_metadata(topic.as_deref(), timeout) {
            Ok(m) => Probe::Reachable {
                brokers: m.brokers().len(),
            },
            Err(e) => Probe::Unreachable(e.to_string()),
        }
    });
    match task.await {
        Ok(p) => p,
        Err(e) => Probe::Unreachable(format!("probe task failed: {e}")),
    }
}

/// Watches `health` every [`CHECK_INTERVAL`] until `shutdown`, judging the consumer wedged
/// after [`WEDGE_AFTER`]; see the module documentation. `wedged` is the
/// `streamops_kafka_client_wedged` gauge.
pub fn spawn(
    health: Arc<Health>,
    settings: KafkaClientSettings,
    topic: Option<String>,
    wedged: prometheus::IntGauge,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let timing = Timing {
        wedge_after: WEDGE_AFTER,
        check_every: CHECK_INTERVAL,
    };
    spawn_with(health, settings, topic, wedged, shutdown, timing)
}

/// When the watcher looks and when it probes.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long the consumer must report every broker down before a probe.
    pub wedge_after: Duration,
    /// How often the watcher looks.
    pub check_every: Duration,
}

/// [`spawn`] with other timing (tests).
pub fn spawn_with(
    health: Arc<Health>,
    settings: KafkaClientSettings,
    topic: Option<String>,
    wedged: prometheus::IntGauge,
    shutdown: CancellationToken,
    timing: Timing,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(timing.check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let topic = topic.as_deref();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = check(&health, &settings, topic, &wedged, timing.wedge_after) => {}
            }
        }
    })
}

/// One check: probes when the consumer has been down for `threshold`, and records the verdict
/// in `health` and `wedged`. [`spawn`] runs it every [`CHECK_INTERVAL`] with [`WEDGE_AFTER`].
pub async fn check(
    health: &Health,
    settings: &KafkaClientSettings,
    topic: Option<&str>,
    wedged: &prometheus::IntGauge,
    threshold: Duration,
) {
    if !should_probe(health.kafka_down_for(Instant::now()), threshold) {
        if health.live().is_err() {
            tracing::info!("kafka consumer reaches a broker again: live");
        }
        health.set_wedged(None);
        wedged.set(0);
        return;
    }
    let probe = probe_brokers(settings, topic, PROBE_TIMEOUT).await;
    // Read again: the consumer may have recovered while the probe ran.
    match decide(health.kafka_down_for(Instant::now()), threshold, &probe) {
        Liveness::Wedged(reason) => {
            tracing::warn!(reason = %reason, "kafka consumer wedged: /healthz fails so the container restarts");
            health.set_wedged(Some(reason));
            wedged.set(1);
        }
        Liveness::Live => {
            if let Probe::Unreachable(e) = &probe {
                tracing::info!(error = %e, "kafka unreachable from a fresh client too: an outage, staying live");
            }
            health.set_wedged(None);
            wedged.set(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = WEDGE_AFTER;

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    #[test]
    fn a_consumer_down_for_less_than_the_threshold_is_not_probed_and_stays_live() {
        assert!(!should_probe(None, T));
        assert!(!should_probe(secs(59), T));
        assert!(should_probe(secs(60), T));
        let reach = Probe::Reachable { brokers: 1 };
        assert_eq!(decide(secs(59), T, &reach), Liveness::Live);
        assert_eq!(decide(None, T, &reach), Liveness::Live);
    }

    #[test]
    fn a_consumer_down_past_the_threshold_while_a_fresh_client_reaches_a_broker_is_wedged() {
        match decide(secs(61), T, &Probe::Reachable { brokers: 3 }) {
            Liveness::Wedged(reason) => {
                assert!(reason.contains("wedged"), "{reason}");
                assert!(reason.contains("61s"), "{reason}");
                assert!(reason.contains("3 broker(s)"), "{reason}");
            }
            Liveness::Live => panic!("a wedged consumer was judged live"),
        }
    }

    #[test]
    fn a_failed_probe_means_an_outage_and_the_worker_stays_live() {
        let p = Probe::Unreachable("Local: Broker transport failure".into());
        assert_eq!(decide(secs(600), T, &p), Liveness::Live);
    }

    #[test]
    fn a_consumer_that_recovered_during_the_probe_stays_live() {
        assert_eq!(
            decide(None, T, &Probe::Reachable { brokers: 1 }),
            Liveness::Live
        );
    }

    #[test]
    fn health_tracks_since_when_the_consumer_is_down() {
        let h = Health::default();
        assert_eq!(h.kafka_down_for(Instant::now()), None);
        h.set_kafka_down(true);
        let first = h.kafka_down_for(Instant::now() + Duration::from_secs(5));
        assert!(first.is_some_and(|d| d >= Duration::from_secs(5)));
        // A repeated AllBrokersDown keeps the original start.
        h.set_kafka_down(true);
        let again = h.kafka_down_for(Instant::now() + Duration::from_secs(5));
        assert!(again >= first);
        h.set_kafka_down(false);
        assert_eq!(h.kafka_down_for(Instant::now()), None);
    }

    #[tokio::test]
    async fn a_check_that_finds_the_consumer_up_clears_the_wedged_verdict() {
        let h = Health::default();
        h.set_wedged(Some("old".into()));
        let g = prometheus::IntGauge::new("streamops_test_wedged", "t").unwrap();
        g.set(1);
        // The consumer is up: no probe is made (the address would fail it anyway).
        check(
            &h,
            &KafkaClientSettings::plaintext("127.0.0.1:1"),
            None,
            &g,
            T,
        )
        .await;
        assert_eq!(h.live(), Ok(()));
        assert_eq!(g.get(), 0);
    }
}
