//! Liveness of the pipeline's consumer: telling a wedged librdkafka client from a Kafka outage.
//!
//! After a KRaft broker stall the broker is fenced for a moment; librdkafka 2.12 decommissions
//! every broker a Metadata response leaves out, the bootstrap one included (see DEVELOPERS.md,
//! "Wedged producers"). A consumer whose refresh lands in that window wedges in one of two ways:
//!
//! - it reports `AllBrokersDown` and stays without any broker (`kafka_down` stays set);
//! - it reconnects, but a partition whose leader was decommissioned stays delegated to no broker
//!   (`new leader-1 not found in cache`) and is never fetched again, while statistics show a
//!   broker up. Statistics record this per owned partition ([`crate::pipeline::fetchability`]).
//!
//! [`spawn`] watches for both: once the consumer has reported every broker down, or an owned
//! partition unfetchable, for [`WEDGE_AFTER`], it asks a fresh, short-lived client with the
//! worker's own connection and security settings for the metadata of the topic concerned
//! ([`probe_brokers`]). The consumer is wedged if the fresh client reaches a broker while the
//! consumer still reports none, or finds the unfetchable partition's leader among the brokers it
//! lists, and reads the partition's offsets from it, while the consumer still cannot fetch it.
//! Otherwise it is an outage, a leader election or a network fault a restart would not cure: the
//! worker stays live (no restart loop) and, for the first case, not ready.
//!
//! A wedged worker restarts: `/healthz` answers 503 with the reason,
//! `streamops_kafka_client_wedged` is 1, a WARN says so, and the watcher cancels its `restart`
//! token; the worker then stops as on SIGTERM (drain, final commit) and exits with
//! [`crate::error::EXIT_RESTART`] (75). The offsets live in PostgreSQL, so nothing is lost or
//! applied twice. Under Kubernetes the container restarts at once (restartPolicy Always), before
//! three failed liveness probes would; a plain process or the chaos suite restarts it the same
//! way. One probe at a time, each bounded by [`PROBE_TIMEOUT`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

use crate::handlers::TopicPartition;
use crate::kafka::KafkaClientSettings;
use crate::pipeline::{Health, Ownership, UnfetchablePartition};

/// How long the consumer must report every broker down, or an owned partition unfetchable,
/// before a fresh client is asked. Well over what a consumer needs to recover from a real, ended
/// outage or a leader change (librdkafka reconnects within `reconnect.backoff.max.ms`, 10 s,
/// refreshes the metadata of a partition without a leader at once, and statistics report it
/// within 5 s), so a healthy consumer is never probed. A wedged worker exits 60-130 s after it
/// wedged: this, up to one [`CHECK_INTERVAL`], the probe (up to two [`PROBE_TIMEOUT`]s) and the
/// drain (up to [`crate::worker::WEDGE_DRAIN_LIMIT`]).
pub const WEDGE_AFTER: Duration = Duration::from_secs(60);

/// How often the watcher looks at the consumer's state.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Bound of one probe's metadata request.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a fresh client found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// It got a Metadata answer.
    Reachable(Cluster),
    /// It reached no broker (or could not be created), with the error.
    Unreachable(String),
}

/// A Metadata answer, as far as the verdict needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    /// The ids of the brokers it lists.
    pub brokers: BTreeSet<i32>,
    /// The leader of each partition of the topics it describes (-1: none), by topic and
    /// partition.
    pub leaders: BTreeMap<(String, i32), i32>,
    /// The partitions whose leader answered the fresh client (a ListOffsets request for the
    /// partition asked about, sent once its leader is listed).
    pub leader_answered: BTreeSet<(String, i32)>,
}

impl Cluster {
    /// The leader of `tp` if the answer names one that is among its brokers.
    pub fn listed_leader(&self, tp: &TopicPartition) -> Option<i32> {
        self.leaders
            .get(&key(tp))
            .copied()
            .filter(|l| *l >= 0 && self.brokers.contains(l))
    }

    /// The leader of `tp` if it is listed and answered the fresh client.
    pub fn answering_leader(&self, tp: &TopicPartition) -> Option<i32> {
        self.listed_leader(tp)
            .filter(|_| self.leader_answered.contains(&key(tp)))
    }
}

fn key(tp: &TopicPartition) -> (String, i32) {
    (tp.topic.to_string(), tp.partition)
}

/// The consumer's state the watcher judges, read from [`Health`] and [`Ownership`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// How long the consumer has reported every broker down (None: it does not).
    pub down_for: Option<Duration>,
    /// The owned partition unfetchable the longest, if any.
    pub unfetchable: Option<UnfetchablePartition>,
}

impl Observed {
    /// Reads the consumer's state as of `now`.
    pub fn read(health: &Health, ownership: &Ownership, now: Instant) -> Self {
        Self {
            down_for: health.kafka_down_for(now),
            unfetchable: ownership.longest_unfetchable(now),
        }
    }

    /// The unfetchable partition, if it has been so for `threshold`.
    fn stalled(&self, threshold: Duration) -> Option<&UnfetchablePartition> {
        self.unfetchable.as_ref().filter(|u| u.for_ >= threshold)
    }

    /// Whether every broker has been reported down for `threshold`.
    fn all_down(&self, threshold: Duration) -> bool {
        self.down_for.is_some_and(|d| d >= threshold)
    }
}

/// The verdict on the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Working, or waiting out a real outage or leader election.
    Live,
    /// The consumer cannot fetch while a fresh client could: restart it. The text is what
    /// `/healthz` answers.
    Wedged(String),
}

/// Whether the consumer has reported every broker down, or an owned partition unfetchable, long
/// enough to ask a fresh client.
pub fn should_probe(seen: &Observed, threshold: Duration) -> bool {
    seen.all_down(threshold) || seen.stalled(threshold).is_some()
}

/// What a probe asks about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// The topic whose metadata is asked for (None: every topic).
    pub topic: Option<String>,
    /// A partition of it whose leader is then asked for its offsets.
    pub partition: Option<i32>,
}

/// What a probe asks about: the unfetchable partition (its leader is what the verdict needs),
/// else the metadata of `default` (cheap; None asks for every topic).
pub fn probe_target(seen: &Observed, threshold: Duration, default: Option<&str>) -> Target {
    match seen.stalled(threshold) {
        Some(u) => Target {
            topic: Some(u.tp.topic.to_string()),
            partition: Some(u.tp.partition),
        },
        None => Target {
            topic: default.map(str::to_owned),
            partition: None,
        },
    }
}

/// The verdict from the consumer's state, read after the probe, and what the fresh client found.
pub fn decide(seen: &Observed, threshold: Duration, probe: &Probe) -> Liveness {
    let Probe::Reachable(cluster) = probe else {
        return Liveness::Live;
    };
    if let Some(d) = seen.down_for.filter(|d| *d >= threshold) {
        return Liveness::Wedged(format!(
            "kafka consumer wedged: it has reported every broker down for {}s while a fresh \
             client reaches {} broker(s)",
            d.as_secs(),
            cluster.brokers.len()
        ));
    }
    if let Some(u) = seen.stalled(threshold) {
        if let Some(leader) = cluster.answering_leader(&u.tp) {
            return Liveness::Wedged(format!(
                "kafka consumer wedged: partition {}[{}] has not been fetchable for {}s ({}) \
                 while a fresh client reads it from its leader, broker {leader}, one of {} \
                 broker(s)",
                u.tp.topic,
                u.tp.partition,
                u.for_.as_secs(),
                u.why,
                cluster.brokers.len()
            ));
        }
    }
    Liveness::Live
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

/// Asks a fresh client with `settings` (connection and security) for metadata, each request
/// within `timeout`: of `target.topic` when given (cheap; a client without a group never creates
/// it), else of every topic. For `target.partition`, once the answer lists its leader, it also
/// asks that leader for the partition's offsets: a leader the metadata lists but this host
/// cannot reach (a network fault between them) does not make the consumer wedged, and
/// restarting would not help. The client is dropped afterwards. Runs on a blocking thread.
pub async fn probe_brokers(
    settings: &KafkaClientSettings,
    target: &Target,
    timeout: Duration,
) -> Probe {
    let mut config = settings.base();
    config
        .set("client.id", "streamops-worker-liveness-probe")
        .set("allow.auto.create.topics", "false");
    let target = target.clone();
    let task = tokio::task::spawn_blocking(move || {
        let client: BaseConsumer<ProbeContext> = match config.create_with_context(ProbeContext) {
            Ok(c) => c,
            Err(e) => return Probe::Unreachable(format!("cannot create a client: {e}")),
        };
        let m = match client.fetch_metadata(target.topic.as_deref(), timeout) {
            Ok(m) => m,
            Err(e) => return Probe::Unreachable(e.to_string()),
        };
        let mut cluster = Cluster {
            brokers: m.brokers().iter().map(|b| b.id()).collect(),
            leaders: m
                .topics()
                .iter()
                .flat_map(|t| {
                    t.partitions()
                        .iter()
                        .map(|p| ((t.name().to_string(), p.id()), p.leader()))
                })
                .collect(),
            leader_answered: BTreeSet::new(),
        };
        if let (Some(topic), Some(partition)) = (target.topic, target.partition) {
            let tp = TopicPartition {
                topic: Arc::from(topic.as_str()),
                partition,
            };
            if cluster.listed_leader(&tp).is_some()
                && client.fetch_watermarks(&topic, partition, timeout).is_ok()
            {
                cluster.leader_answered.insert(key(&tp));
            }
        }
        Probe::Reachable(cluster)
    });
    match task.await {
        Ok(p) => p,
        Err(e) => Probe::Unreachable(format!("probe task failed: {e}")),
    }
}

/// What the watcher watches and how it acts.
#[derive(Clone)]
pub struct Watched {
    /// The consumer's health flags (`kafka_down`; the verdict is recorded here).
    pub health: Arc<Health>,
    /// The owned partitions, with their fetchability from statistics.
    pub ownership: Arc<Ownership>,
    /// The worker's connection and security settings, for the probe.
    pub settings: KafkaClientSettings,
    /// The topic asked about when every broker is reported down (None: every topic).
    pub topic: Option<String>,
    /// The `streamops_kafka_client_wedged` gauge.
    pub wedged: prometheus::IntGauge,
    /// Cancelled on a wedge: the worker stops as on SIGTERM and exits for a restart.
    pub restart: CancellationToken,
}

/// Watches every [`CHECK_INTERVAL`] until `stop`, judging the consumer wedged after
/// [`WEDGE_AFTER`]; see the module documentation. Ends after a wedge (the verdict stays).
pub fn spawn(watched: Watched, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let timing = Timing {
        wedge_after: WEDGE_AFTER,
        check_every: CHECK_INTERVAL,
    };
    spawn_with(watched, stop, timing)
}

/// When the watcher looks and when it probes.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long the consumer must report every broker down, or a partition unfetchable,
    /// before a probe.
    pub wedge_after: Duration,
    /// How often the watcher looks.
    pub check_every: Duration,
}

/// [`spawn`] with other timing (tests).
pub fn spawn_with(
    watched: Watched,
    stop: CancellationToken,
    timing: Timing,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(timing.check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = check(&watched, timing.wedge_after) => {}
            }
            if watched.restart.is_cancelled() {
                return;
            }
        }
    })
}

/// One check: probes when the consumer has reported every broker down, or an owned partition
/// unfetchable, for `threshold`; records the verdict in `health` and the gauge, and on a wedge
/// cancels `restart`. Once `restart` is cancelled the verdict is kept (the worker is on its way
/// out) and nothing more is checked. [`spawn`] runs it every [`CHECK_INTERVAL`] with
/// [`WEDGE_AFTER`].
pub async fn check(w: &Watched, threshold: Duration) -> Liveness {
    if w.restart.is_cancelled() {
        return w
            .health
            .live()
            .map_or_else(Liveness::Wedged, |()| Liveness::Live);
    }
    let seen = Observed::read(&w.health, &w.ownership, Instant::now());
    if !should_probe(&seen, threshold) {
        if w.health.live().is_err() {
            tracing::info!("kafka consumer fetches again: live");
        }
        w.health.set_wedged(None);
        w.wedged.set(0);
        return Liveness::Live;
    }
    let target = probe_target(&seen, threshold, w.topic.as_deref());
    let probe = probe_brokers(&w.settings, &target, PROBE_TIMEOUT).await;
    // Read again: the consumer may have recovered while the probe ran.
    let seen = Observed::read(&w.health, &w.ownership, Instant::now());
    let verdict = decide(&seen, threshold, &probe);
    match &verdict {
        Liveness::Wedged(reason) => {
            tracing::warn!(reason = %reason,
                "kafka consumer wedged: /healthz fails and the worker stops to be restarted (exit 75)");
            w.health.set_wedged(Some(reason.clone()));
            w.wedged.set(1);
            w.restart.cancel();
        }
        Liveness::Live => {
            match (&probe, seen.stalled(threshold)) {
                (Probe::Unreachable(e), _) => tracing::info!(error = %e,
                    "kafka unreachable from a fresh client too: an outage, staying live"),
                (Probe::Reachable(_), Some(u)) => tracing::info!(topic = %u.tp.topic,
                    partition = u.tp.partition, reason = %u.why, unfetchable_s = u.for_.as_secs(),
                    "a fresh client cannot read the unfetchable partition from a listed leader \
                     either: a leader election or an outage, staying live"),
                (Probe::Reachable(_), None) => {}
            }
            w.health.set_wedged(None);
            w.wedged.set(0);
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fetchability::Unfetchable;

    const T: Duration = WEDGE_AFTER;

    fn secs(s: u64) -> Option<Duration> {
        Some(Duration::from_secs(s))
    }

    fn down(s: u64) -> Observed {
        Observed {
            down_for: secs(s),
            unfetchable: None,
        }
    }

    fn tp(p: i32) -> TopicPartition {
        TopicPartition {
            topic: Arc::from("orders"),
            partition: p,
        }
    }

    /// Partition 0 of `orders` delegated to no broker for `s` seconds, every broker reachable.
    fn stalled(s: u64) -> Observed {
        Observed {
            down_for: None,
            unfetchable: Some(UnfetchablePartition {
                tp: tp(0),
                why: Unfetchable::NoBroker { leader: -1 },
                for_: Duration::from_secs(s),
            }),
        }
    }

    /// A Metadata answer listing `brokers`, with `leaders` for `orders`' partitions 0, 1, ...,
    /// each of which answered.
    fn reach(brokers: &[i32], leaders: &[i32]) -> Probe {
        let leaders: BTreeMap<_, _> = leaders
            .iter()
            .enumerate()
            .map(|(p, l)| (("orders".to_string(), p as i32), *l))
            .collect();
        Probe::Reachable(Cluster {
            brokers: brokers.iter().copied().collect(),
            leader_answered: leaders.keys().cloned().collect(),
            leaders,
        })
    }

    #[test]
    fn a_consumer_down_for_less_than_the_threshold_is_not_probed_and_stays_live() {
        assert!(!should_probe(&Observed::default(), T));
        assert!(!should_probe(&down(59), T));
        assert!(should_probe(&down(60), T));
        let r = reach(&[1], &[]);
        assert_eq!(decide(&down(59), T, &r), Liveness::Live);
        assert_eq!(decide(&Observed::default(), T, &r), Liveness::Live);
    }

    #[test]
    fn a_consumer_down_past_the_threshold_while_a_fresh_client_reaches_a_broker_is_wedged() {
        match decide(&down(61), T, &reach(&[1, 2, 3], &[])) {
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
        assert_eq!(decide(&down(600), T, &p), Liveness::Live);
        assert_eq!(decide(&stalled(600), T, &p), Liveness::Live);
    }

    #[test]
    fn a_consumer_that_recovered_during_the_probe_stays_live() {
        assert_eq!(
            decide(&Observed::default(), T, &reach(&[1], &[1])),
            Liveness::Live
        );
    }

    #[test]
    fn a_partition_unfetchable_for_less_than_the_threshold_is_not_probed() {
        assert!(!should_probe(&stalled(59), T));
        assert!(should_probe(&stalled(60), T));
        assert_eq!(decide(&stalled(59), T, &reach(&[1], &[1])), Liveness::Live);
    }

    #[test]
    fn a_partition_unfetchable_past_the_threshold_whose_leader_a_fresh_client_finds_is_wedged() {
        match decide(&stalled(75), T, &reach(&[1, 2], &[2])) {
            Liveness::Wedged(reason) => {
                assert!(reason.contains("orders[0]"), "{reason}");
                assert!(reason.contains("75s"), "{reason}");
                assert!(reason.contains("delegated to no broker"), "{reason}");
                assert!(reason.contains("broker 2"), "{reason}");
            }
            Liveness::Live => panic!("a wedged consumer was judged live"),
        }
    }

    #[test]
    fn a_partition_without_a_listed_leader_is_a_leader_election_and_stays_live() {
        // No leader at all.
        assert_eq!(
            decide(&stalled(600), T, &reach(&[1], &[-1])),
            Liveness::Live
        );
        // A leader the answer does not list among its brokers (fenced or gone).
        assert_eq!(decide(&stalled(600), T, &reach(&[1], &[2])), Liveness::Live);
        // The answer does not describe the partition (topic unknown to the fresh client).
        assert_eq!(decide(&stalled(600), T, &reach(&[1], &[])), Liveness::Live);
        // A leader for another partition only.
        assert_eq!(
            decide(&stalled(600), T, &reach(&[1], &[-1, 1])),
            Liveness::Live
        );
    }

    #[test]
    fn a_listed_leader_that_did_not_answer_the_fresh_client_leaves_the_worker_live() {
        // A network fault between this host and the leader: a restart would not help.
        let Probe::Reachable(mut cluster) = reach(&[1, 2], &[2]) else {
            unreachable!()
        };
        cluster.leader_answered.clear();
        assert_eq!(
            decide(&stalled(600), T, &Probe::Reachable(cluster)),
            Liveness::Live
        );
    }

    #[test]
    fn the_probe_asks_about_the_unfetchable_partition_else_the_default_topic() {
        assert_eq!(
            probe_target(&stalled(60), T, Some("other")),
            Target {
                topic: Some("orders".into()),
                partition: Some(0)
            }
        );
        // Not yet past the threshold: the partition is not what the probe is for.
        assert_eq!(
            probe_target(&stalled(59), T, Some("other"))
                .topic
                .as_deref(),
            Some("other")
        );
        assert_eq!(
            probe_target(&down(60), T, Some("other")),
            Target {
                topic: Some("other".into()),
                partition: None
            }
        );
        assert_eq!(probe_target(&down(60), T, None), Target::default());
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

    fn watched(address: &str) -> Watched {
        Watched {
            health: Arc::new(Health::default()),
            ownership: Arc::new(Ownership::default()),
            settings: KafkaClientSettings::plaintext(address),
            topic: None,
            wedged: prometheus::IntGauge::new("streamops_test_wedged", "t").unwrap(),
            restart: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn a_check_that_finds_the_consumer_up_clears_the_wedged_verdict() {
        let w = watched("127.0.0.1:1");
        w.health.set_wedged(Some("old".into()));
        w.wedged.set(1);
        // The consumer is up: no probe is made (the address would fail it anyway).
        assert_eq!(check(&w, T).await, Liveness::Live);
        assert_eq!(w.health.live(), Ok(()));
        assert_eq!(w.wedged.get(), 0);
        assert!(!w.restart.is_cancelled());
    }

    #[tokio::test]
    async fn once_a_restart_is_under_way_the_wedged_verdict_is_kept() {
        let w = watched("127.0.0.1:1");
        w.health
            .set_wedged(Some("kafka consumer wedged: test".into()));
        w.wedged.set(1);
        w.restart.cancel();
        // The consumer looks fine now (e.g. its partitions were revoked while draining), but the
        // worker is on its way out: /healthz stays 503.
        assert!(matches!(check(&w, T).await, Liveness::Wedged(_)));
        assert!(w.health.live().is_err());
        assert_eq!(w.wedged.get(), 1);
    }
}
