//! Consumer-group lag: committed offsets against high watermarks.
//!
//! One reading costs a fixed number of requests whatever the partition count: one Metadata
//! request per topic, one OffsetFetch for the whole group, one ListOffsets per partition leader for
//! the high watermarks (and one more for the low watermarks when partitions without a committed
//! offset start from the earliest message), and one DescribeGroups for the member count. Nothing is
//! fetched per partition.
//!
//! Readings of several groups on one cluster share what they can ([`LagReader::read_many`], used by
//! the poller for the readings due together): one Metadata request per distinct topic and one
//! ListOffsets per partition leader (each kind of watermark) for all of them, so each further group
//! costs only its OffsetFetch and DescribeGroups. Every group's committed offsets are fetched
//! before the watermarks they are compared with, as in a single reading, and an error touches only
//! the groups it concerns (a missing topic fails the groups that read it).
//!
//! A partition without a committed offset counts its lag from where a new member would start:
//! from the low watermark under `autoOffsetReset: earliest`, and as zero under `latest`. Such
//! partitions are counted ([`GroupLag::uncommitted`]): the autoscaler never takes their zero lag
//! for "no work".
//!
//! Workers attach a partition's latest offset gap to its commit as metadata
//! ([`streamops_crds::gap`]); a reading collects them in [`GroupLag::gaps`].
//!
//! Clients are reused and readings bounded ([`crate::lag_clients`]): a reading that times out
//! leaks no client and no thread. One client serves every group of a cluster connection: the
//! committed offsets come from the Admin API's ListConsumerGroupOffsets ([`committed`]), which
//! names the group, rather than from the client's own `group.id`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use streamops_crds::gap::GapNote;
use streamops_crds::v1alpha1::{AutoOffsetReset, SaslMechanism, SecurityProtocol};
use streamops_crds::StreamConsumer;

use crate::brokers::BrokerPolicy;
use crate::lag_clients::{ClientKey, LagClients};

mod committed;

/// Environment variables holding SASL credentials of `streamops-operator lag`, the admin's command
/// line tool, for the brokers named on its command line. The controller never uses them: it
/// connects only to the brokers of its [`BrokerPolicy`], with each one's own credentials.
pub const ENV_LAG_USERNAME: &str = "STREAMOPS_LAG_KAFKA_USERNAME";
/// See [`ENV_LAG_USERNAME`].
pub const ENV_LAG_PASSWORD: &str = "STREAMOPS_LAG_KAFKA_PASSWORD";

/// What to read the lag of. Its `Debug` output never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct LagTarget {
    /// Bootstrap brokers.
    pub bootstrap_servers: String,
    /// Consumer group.
    pub group_id: String,
    /// Consumed topics.
    pub topics: Vec<String>,
    /// Where partitions without a committed offset start.
    pub auto_offset_reset: AutoOffsetReset,
    /// Security protocol.
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism, when the protocol uses SASL.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL username and password, when the protocol uses SASL.
    pub credentials: Option<(String, String)>,
    /// PEM CA file for TLS protocols (default: the system CAs).
    pub ssl_ca_location: Option<String>,
    /// Where the StreamConsumer's workers report their lag, when the operator may not read it
    /// from the brokers ([`crate::lag_workers`]); `None` for the `lag` command.
    pub workers: Option<crate::lag_workers::WorkersRef>,
}

impl LagTarget {
    /// The lag target of a StreamConsumer: its brokers, group and topics, and the protocol the
    /// spec names, never any credentials. A reader with a [`BrokerPolicy`] (the controller's)
    /// replaces protocol, mechanism and credentials with those of the allowed entry.
    pub fn from_resource(sc: &StreamConsumer) -> Self {
        let security = sc.spec.kafka.security.as_ref();
        let protocol = security
            .map(|s| s.protocol)
            .unwrap_or(SecurityProtocol::Plaintext);
        Self {
            bootstrap_servers: sc.spec.kafka.bootstrap_servers.clone(),
            group_id: sc.spec.kafka.group_id.clone(),
            topics: sc.spec.kafka.topics.clone(),
            auto_offset_reset: sc.spec.kafka.auto_offset_reset,
            security_protocol: protocol,
            sasl_mechanism: security.and_then(|s| s.sasl.as_ref()).map(|s| s.mechanism),
            credentials: None,
            ssl_ca_location: None,
            workers: crate::lag_workers::WorkersRef::of(sc),
        }
    }
}

impl std::fmt::Debug for LagTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagTarget")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(user, _)| (user, "<redacted>")),
            )
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("workers", &self.workers)
            .finish()
    }
}

/// Lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// High watermark (the offset the next message will get).
    pub high_watermark: i64,
    /// Lag in messages.
    pub lag: i64,
    /// The latest offset gap the workers reported for this partition, if any.
    pub gap: Option<GapNote>,
}

/// An offset gap of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionGap {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The gap.
    pub note: GapNote,
}

/// Where a reading came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LagSource {
    /// The brokers (an allowed broker, with the operator's own connection).
    #[default]
    Brokers,
    /// The reports of the StreamConsumer's own workers ([`crate::lag_workers`]).
    Workers {
        /// Workers that reported.
        reported: i32,
    },
}

/// Lag of a whole group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupLag {
    /// Sum over partitions.
    pub total: i64,
    /// Partitions of the consumed topics.
    pub partitions: i32,
    /// Members of the group.
    pub members: i32,
    /// Largest lag of one partition.
    pub max_partition_lag: i64,
    /// Per-partition figures, sorted by topic and partition.
    pub per_partition: Vec<PartitionLag>,
    /// Partitions without a committed offset (never committed, or expired).
    pub uncommitted: i32,
    /// Offset gaps the workers reported, sorted by topic and partition.
    pub gaps: Vec<PartitionGap>,
    /// Where the figures came from.
    pub source: LagSource,
}

/// Why the lag could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LagError {
    /// SASL is required and the operator has no credentials.
    #[error("the cluster requires SASL and the operator has no credentials for it (chart value lag.brokers[].credentialsSecret)")]
    MissingCredentials,
    /// The brokers are not among those the operator's admin allowed: no connection is made.
    #[error("{0}")]
    BrokerNotAllowed(String),
    /// SASL PLAIN without TLS would send the password in clear text: refused.
    #[error("SASL PLAIN without TLS would send the password in clear text; use SASL_SSL or a SCRAM mechanism")]
    PlainWithoutTls,
    /// A Kafka request failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A topic does not exist or reported an error.
    #[error("topic {topic}: {reason}")]
    Topic {
        /// The topic.
        topic: String,
        /// What the broker said.
        reason: String,
    },
    /// The brokers gave no offset for a partition.
    #[error("topic {topic} partition {partition}: {reason}")]
    Partition {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// What went wrong.
        reason: String,
    },
    /// The blocking reader task failed.
    #[error("lag reader task: {0}")]
    Task(String),
    /// The workers' lag reports could not be read (no ready worker, one did not answer, or its
    /// report was refused).
    #[error("{0}")]
    Workers(String),
}

impl LagError {
    /// CamelCase reason: the reason of the `LagAvailable=False` condition; its snake case labels
    /// `streamops_operator_lag_read_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingCredentials => "MissingCredentials",
            Self::BrokerNotAllowed(_) => "BrokerNotAllowed",
            Self::PlainWithoutTls => "PlainWithoutTls",
            Self::Kafka(_) => "KafkaError",
            Self::Topic { .. } | Self::Partition { .. } => "TopicUnavailable",
            Self::Task(_) => "ReaderFailed",
            Self::Workers(_) => "WorkerReportsUnavailable",
        }
    }
}

/// Computes the lag of one partition from its offsets.
pub fn partition_lag(
    committed: Option<i64>,
    low_watermark: i64,
    high_watermark: i64,
    reset: AutoOffsetReset,
) -> i64 {
    let start = match (committed, reset) {
        (Some(c), _) => c,
        (None, AutoOffsetReset::Earliest) => low_watermark,
        (None, AutoOffsetReset::Latest) => high_watermark,
    };
    (high_watermark - start).max(0)
}

/// Sums per-partition figures into a group's lag.
pub fn summarize(mut per_partition: Vec<PartitionLag>, members: i32) -> GroupLag {
    per_partition.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let uncommitted = per_partition
        .iter()
        .filter(|p| p.committed.is_none())
        .count();
    let gaps = per_partition
        .iter()
        .filter_map(|p| {
            p.gap.map(|note| PartitionGap {
                topic: p.topic.clone(),
                partition: p.partition,
                note,
            })
        })
        .collect();
    GroupLag {
        // Saturating: figures reported by workers are untrusted and may be absurd.
        total: per_partition
            .iter()
            .fold(0i64, |sum, p| sum.saturating_add(p.lag)),
        partitions: i32::try_from(per_partition.len()).unwrap_or(i32::MAX),
        members,
        max_partition_lag: per_partition.iter().map(|p| p.lag).max().unwrap_or(0),
        per_partition,
        uncommitted: i32::try_from(uncommitted).unwrap_or(i32::MAX),
        gaps,
        source: LagSource::Brokers,
    }
}

/// Reads a group's lag. Implemented by [`KafkaLagReader`]; faked in tests.
pub trait LagReader: Send + Sync + 'static {
    /// Reads the lag of `target`.
    fn read(
        &self,
        target: &LagTarget,
    ) -> impl std::future::Future<Output = Result<GroupLag, LagError>> + Send;

    /// Reads the lag of each of `targets`, in their order. A reader that can share requests
    /// between groups of one cluster ([`KafkaLagReader`]) does; by default, one after another.
    fn read_many(
        &self,
        targets: &[LagTarget],
    ) -> impl std::future::Future<Output = Vec<Result<GroupLag, LagError>>> + Send {
        read_one_by_one(self, targets)
    }
}

/// Reads each of `targets` with `reader`, one after another: the default of
/// [`LagReader::read_many`], for readers that share nothing between readings.
pub async fn read_one_by_one<R: LagReader + ?Sized>(
    reader: &R,
    targets: &[LagTarget],
) -> Vec<Result<GroupLag, LagError>> {
    let mut out = Vec::with_capacity(targets.len());
    for target in targets {
        out.push(reader.read(target).await);
    }
    out
}

/// The same error for each of `n` readings.
fn all_failed(n: usize, e: &LagError) -> Vec<Result<GroupLag, LagError>> {
    (0..n).map(|_| Err(e.clone())).collect()
}

/// The `group.id` of the lag clients: a group they never join and never commit to (see
/// `client_config`).
pub const LAG_CLIENT_GROUP: &str = "streamops-operator-lag-reader";

/// Readings a [`KafkaLagReader`] runs at once by default (the poller's default too).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;

/// Reads lag from the brokers with librdkafka, reusing one client per cluster connection (for
/// every group), with at most a bounded number of readings in flight ([`LagClients`]).
#[derive(Debug, Clone)]
pub struct KafkaLagReader {
    /// Timeout of each request.
    pub timeout: Duration,
    /// The brokers the reader may connect to, and how. `None`: as the target says (the `lag`
    /// command, where the admin names brokers and credentials); the controller always sets it.
    pub brokers: Option<Arc<BrokerPolicy>>,
    clients: Arc<LagClients>,
}

impl Default for KafkaLagReader {
    fn default() -> Self {
        Self::with_timeout(Duration::from_secs(5))
    }
}

impl KafkaLagReader {
    /// A reader whose requests time out after `timeout`, with [`DEFAULT_MAX_IN_FLIGHT`]
    /// readings at once.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self::new(timeout, DEFAULT_MAX_IN_FLIGHT)
    }

    /// A reader whose requests time out after `timeout`, with at most `max_in_flight` readings
    /// running at once.
    pub fn new(timeout: Duration, max_in_flight: usize) -> Self {
        Self {
            timeout,
            brokers: None,
            clients: Arc::new(LagClients::new(max_in_flight)),
        }
    }

    /// How long the groups of one batch may take, one after another, before the rest of the
    /// batch is left for the next turn: twice the request timeout (10 s by default). With the
    /// watermarks after them (two more requests at most), a batch ends within four request
    /// timeouts, inside the poller's bound on a batch ([`crate::lag_poller::PollSettings`]).
    pub fn batch_budget(&self) -> Duration {
        self.timeout * 2
    }

    /// The clients (tests: how many are held, how many readings may start).
    pub fn clients(&self) -> &LagClients {
        &self.clients
    }
}

impl KafkaLagReader {
    /// A reader that connects only to the brokers `policy` allows, with their own settings.
    pub fn allowed(policy: Arc<BrokerPolicy>) -> Self {
        Self::default().with_policy(policy)
    }

    /// This reader, restricted to the brokers `policy` allows.
    pub fn with_policy(mut self, policy: Arc<BrokerPolicy>) -> Self {
        self.brokers = Some(policy);
        self
    }

    /// The target as this reader connects to it: with a policy, the allowed entry's protocol,
    /// mechanism, credentials and CA; a broker the policy does not allow is an error, before any
    /// connection.
    pub fn connect_as(&self, target: &LagTarget) -> Result<LagTarget, LagError> {
        let Some(policy) = &self.brokers else {
            return Ok(target.clone());
        };
        let allowed = policy
            .resolve(&target.bootstrap_servers)
            .map_err(|e| LagError::BrokerNotAllowed(e.message))?;
        let c = allowed.connection();
        Ok(LagTarget {
            security_protocol: c.security_protocol,
            sasl_mechanism: c.sasl_mechanism,
            credentials: c.credentials.map(|c| (c.username, c.password)),
            ssl_ca_location: c.ssl_ca_location,
            ..target.clone()
        })
    }
}

impl LagReader for KafkaLagReader {
    async fn read(&self, target: &LagTarget) -> Result<GroupLag, LagError> {
        let target = self.connect_as(target)?;
        self.read_on_one_client(vec![target])
            .await
            .pop()
            .unwrap_or_else(|| Err(LagError::Task("no reading came back".into())))
    }

    /// Groups the targets by client (cluster connection) and reads each group of targets in one
    /// pass on one blocking thread, holding one permit.
    async fn read_many(&self, targets: &[LagTarget]) -> Vec<Result<GroupLag, LagError>> {
        let mut out: Vec<Option<Result<GroupLag, LagError>>> =
            (0..targets.len()).map(|_| None).collect();
        let mut by_client: Vec<(ClientKey, Vec<(usize, LagTarget)>)> = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            match self.connect_as(target) {
                Ok(t) => {
                    let key = ClientKey::of(&t);
                    match by_client.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, batch)) => batch.push((i, t)),
                        None => by_client.push((key, vec![(i, t)])),
                    }
                }
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        let passes = by_client.into_iter().map(|(_, batch)| async move {
            let (indexes, targets): (Vec<usize>, Vec<LagTarget>) = batch.into_iter().unzip();
            indexes
                .into_iter()
                .zip(self.read_on_one_client(targets).await)
                .collect::<Vec<_>>()
        });
        for (i, result) in futures::future::join_all(passes)
            .await
            .into_iter()
            .flatten()
        {
            out[i] = Some(result);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(LagError::Task("no reading came back".into()))))
            .collect()
    }
}

impl KafkaLagReader {
    /// Reads `targets`, all on one client (already resolved with [`Self::connect_as`]), in one
    /// blocking pass.
    async fn read_on_one_client(&self, targets: Vec<LagTarget>) -> Vec<Result<GroupLag, LagError>> {
        let n = targets.len();
        let Some(first) = targets.first().cloned() else {
            return Vec::new();
        };
        let permit = match self.clients.permit().await {
            Ok(p) => p,
            Err(e) => return all_failed(n, &e),
        };
        let (timeout, budget) = (self.timeout, self.batch_budget());
        let clients = self.clients.clone();
        let pass = tokio::task::spawn_blocking(move || {
            // Released when the blocking work ends, even if the caller gave up waiting.
            let _permit = permit;
            match clients.client(&first, || client_config(&first)) {
                Ok(consumer) => read_blocking(&consumer, &targets, timeout, budget),
                Err(e) => all_failed(targets.len(), &e),
            }
        })
        .await;
        match pass {
            Ok(results) => results,
            Err(e) => all_failed(n, &LagError::Task(e.to_string())),
        }
    }
}

fn client_config(target: &LagTarget) -> Result<ClientConfig, LagError> {
    let mut cfg = ClientConfig::new();
    // The client never subscribes, so it never joins a group, and serves every group of the
    // connection. It still needs a group.id of its own: librdkafka 2.12 answers an OffsetFetch
    // error from a coordinator that is loading or has moved by asking the client's consumer
    // group to find the coordinator again, and a client without one crashes there (a null
    // dereference; tests/lag_coordinator.rs). This group is never joined nor committed to.
    cfg.set("bootstrap.servers", &target.bootstrap_servers)
        .set("group.id", LAG_CLIENT_GROUP)
        .set("enable.auto.commit", "false")
        .set("security.protocol", target.security_protocol.as_str())
        .set("socket.timeout.ms", "10000")
        .set("log_level", "3");
    if target.security_protocol.uses_sasl() {
        let mechanism = target.sasl_mechanism.ok_or(LagError::MissingCredentials)?;
        if mechanism == SaslMechanism::Plain && !target.security_protocol.uses_tls() {
            return Err(LagError::PlainWithoutTls);
        }
        let (user, pass) = target
            .credentials
            .as_ref()
            .ok_or(LagError::MissingCredentials)?;
        cfg.set("sasl.mechanism", mechanism.as_str())
            .set("sasl.username", user)
            .set("sasl.password", pass);
    }
    if let Some(ca) = target
        .ssl_ca_location
        .as_deref()
        .filter(|_| target.security_protocol.uses_tls())
    {
        cfg.set("ssl.ca.location", ca);
    }
    Ok(cfg)
}

/// The partitions of `topic`, from one Metadata request.
fn topic_partitions(
    consumer: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, LagError> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(LagError::Topic {
            topic: topic.to_string(),
            reason: "missing from metadata".into(),
        });
    };
    if let Some(err) = t.error() {
        return Err(LagError::Topic {
            topic: topic.to_string(),
            reason: rdkafka::types::RDKafkaErrorCode::from(err).to_string(),
        });
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// The watermarks (`Offset::End`: high, `Offset::Beginning`: low) of `partitions`, from one
/// ListOffsets request per partition leader (none for no partition).
fn watermarks(
    consumer: &BaseConsumer,
    partitions: &BTreeSet<(String, i32)>,
    which: Offset,
    timeout: Duration,
) -> Result<TopicPartitionList, LagError> {
    if partitions.is_empty() {
        return Ok(TopicPartitionList::new());
    }
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for (topic, partition) in partitions {
        tpl.add_partition_offset(topic, *partition, which)?;
    }
    Ok(consumer.offsets_for_times(tpl, timeout)?)
}

/// Whether a group's reading needs low watermarks: it starts partitions without a committed
/// offset from the earliest message, and has such partitions.
fn needs_low(target: &LagTarget, committed: &TopicPartitionList) -> bool {
    target.auto_offset_reset == AutoOffsetReset::Earliest
        && committed
            .elements()
            .iter()
            .any(|e| !matches!(e.offset(), Offset::Offset(_)))
}

/// The member count of `group` (0 when it cannot be described).
fn members_of(consumer: &BaseConsumer, group: &str, timeout: Duration) -> i32 {
    match consumer.fetch_group_list(Some(group), timeout) {
        Ok(list) => list
            .groups()
            .iter()
            .find(|g| g.name() == group)
            .map(|g| i32::try_from(g.members().len()).unwrap_or(i32::MAX))
            .unwrap_or(0),
        Err(e) => {
            tracing::debug!(group = %group, error = %e, "cannot describe the group");
            0
        }
    }
}

/// A group's partitions, committed offsets and member count, read before any watermark.
struct Committed {
    partitions: TopicPartitionList,
    committed: TopicPartitionList,
    members: i32,
    /// Whether its lag needs low watermarks ([`needs_low`]).
    from_start: bool,
}

/// Reads the lag of `targets`, all on `consumer`'s cluster, sharing the Metadata and ListOffsets
/// requests between them (see the module notes). One result per target, in order.
///
/// The groups are taken one after another (Metadata of a topic not seen yet, OffsetFetch,
/// DescribeGroups), then the watermarks of all of them. The first group is always read; a later
/// one that would start after `budget` fails alone, to be read at its next turn, so that a sick
/// cluster answering each request only at its timeout cannot hold a whole batch past the
/// poller's bound.
fn read_blocking(
    consumer: &BaseConsumer,
    targets: &[LagTarget],
    timeout: Duration,
    budget: Duration,
) -> Vec<Result<GroupLag, LagError>> {
    // A plain consumer that never subscribes: it only asks the group coordinator for offsets, so
    // it does not join any group or disturb its members. Serve its event queue (errors, logs)
    // before using it again.
    let _ = consumer.poll(Duration::ZERO);
    let deadline = std::time::Instant::now() + budget;

    let mut topics: BTreeMap<&str, Result<Vec<i32>, LagError>> = BTreeMap::new();
    // Every group's committed offsets come before the watermarks they are compared with, so a
    // commit made in between can only make the lag look larger, never negative.
    let committed: Vec<Result<Committed, LagError>> = targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            if i > 0 && std::time::Instant::now() >= deadline {
                return Err(LagError::Task(format!(
                    "not read in this batch: the groups before it took its {} s; read at the next turn",
                    budget.as_secs()
                )));
            }
            let mut partitions = TopicPartitionList::new();
            for topic in &target.topics {
                let ids = topics
                    .entry(topic.as_str())
                    .or_insert_with(|| topic_partitions(consumer, topic, timeout));
                match ids {
                    Ok(ids) => {
                        for id in ids.iter() {
                            partitions.add_partition(topic, *id);
                        }
                    }
                    Err(e) => return Err(e.clone()),
                }
            }
            let committed =
                committed::committed_offsets(consumer, &target.group_id, &partitions, timeout)?;
            let members = members_of(consumer, &target.group_id, timeout);
            Ok(Committed {
                from_start: needs_low(target, &committed),
                partitions,
                committed,
                members,
            })
        })
        .collect();

    let mut all = BTreeSet::new();
    let mut from_start = BTreeSet::new();
    for c in committed.iter().flatten() {
        for e in c.partitions.elements() {
            let tp = (e.topic().to_string(), e.partition());
            if c.from_start {
                from_start.insert(tp.clone());
            }
            all.insert(tp);
        }
    }
    let highs = watermarks(consumer, &all, Offset::End, timeout);
    let lows = watermarks(consumer, &from_start, Offset::Beginning, timeout);

    targets
        .iter()
        .zip(committed)
        .map(|(target, c)| {
            let c = c?;
            let highs = highs.as_ref().map_err(Clone::clone)?;
            let lows = if c.from_start {
                Some(lows.as_ref().map_err(Clone::clone)?)
            } else {
                None
            };
            group_lag(target, &c, highs, lows)
        })
        .collect()
}

/// One group's lag from its committed offsets and the watermarks read for it.
fn group_lag(
    target: &LagTarget,
    c: &Committed,
    highs: &TopicPartitionList,
    lows: Option<&TopicPartitionList>,
) -> Result<GroupLag, LagError> {
    let offset_of = |tpl: &TopicPartitionList, topic: &str, partition: i32| -> Option<i64> {
        tpl.find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
    };

    // A watermark the brokers did not give is an error, never a silent zero lag.
    let watermark = |tpl: &TopicPartitionList, topic: &str, partition: i32| {
        let found = tpl.find_partition(topic, partition);
        let reason = match found.as_ref().map(|e| (e.error(), e.offset())) {
            Some((Ok(()), Offset::Offset(o))) => return Ok(o),
            Some((Err(e), _)) => e.to_string(),
            Some((Ok(()), other)) => format!("no watermark ({other:?})"),
            None => "missing from the ListOffsets answer".to_string(),
        };
        Err(LagError::Partition {
            topic: topic.to_string(),
            partition,
            reason,
        })
    };

    let mut per_partition = Vec::new();
    for e in c.partitions.elements() {
        let (topic, partition) = (e.topic(), e.partition());
        let high = watermark(highs, topic, partition)?;
        let low = match lows {
            Some(l) => watermark(l, topic, partition)?,
            None => 0,
        };
        let gap = c
            .committed
            .find_partition(topic, partition)
            .and_then(|e| GapNote::parse(e.metadata()));
        let committed = offset_of(&c.committed, topic, partition);
        per_partition.push(PartitionLag {
            topic: topic.to_string(),
            partition,
            committed,
            high_watermark: high,
            lag: partition_lag(committed, low, high, target.auto_offset_reset),
            gap,
        });
    }
    Ok(summarize(per_partition, c.members))
}

/// Renders a group's lag for `streamops-operator lag`.
pub fn render(target: &LagTarget, lag: &GroupLag) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "group {} on {}: total lag {}, partitions {}, members {}, max partition lag {}",
        target.group_id,
        target.topics.join(","),
        lag.total,
        lag.partitions,
        lag.members,
        lag.max_partition_lag
    );
    let _ = writeln!(
        out,
        "{:<32} {:>9} {:>12} {:>14} {:>10}",
        "TOPIC", "PARTITION", "COMMITTED", "HIGH-WATERMARK", "LAG"
    );
    for p in &lag.per_partition {
        let committed = p
            .committed
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<32} {:>9} {:>12} {:>14} {:>10}",
            p.topic, p.partition, committed, p.high_watermark, p.lag
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_offset_lag_is_high_watermark_minus_committed() {
        assert_eq!(
            partition_lag(Some(40), 0, 100, AutoOffsetReset::Earliest),
            60
        );
        assert_eq!(partition_lag(Some(100), 0, 100, AutoOffsetReset::Latest), 0);
    }

    #[test]
    fn uncommitted_partition_counts_from_the_start_under_earliest_and_zero_under_latest() {
        assert_eq!(partition_lag(None, 10, 100, AutoOffsetReset::Earliest), 90);
        assert_eq!(partition_lag(None, 10, 100, AutoOffsetReset::Latest), 0);
    }

    #[test]
    fn lag_is_never_negative() {
        // A committed offset past the high watermark (a truncated topic) is zero lag.
        assert_eq!(
            partition_lag(Some(120), 0, 100, AutoOffsetReset::Earliest),
            0
        );
    }

    #[test]
    fn summary_totals_and_finds_the_largest_partition() {
        let p = |partition, lag| PartitionLag {
            topic: "t".into(),
            partition,
            committed: Some(0),
            high_watermark: lag,
            lag,
            gap: None,
        };
        let g = summarize(vec![p(2, 5), p(0, 30), p(1, 7)], 2);
        assert_eq!(
            (g.total, g.partitions, g.members, g.max_partition_lag),
            (42, 3, 2, 30)
        );
        assert_eq!((g.uncommitted, g.gaps.len()), (0, 0));
        let order: Vec<i32> = g.per_partition.iter().map(|p| p.partition).collect();
        assert_eq!(order, [0, 1, 2]);
    }

    #[test]
    fn summary_counts_uncommitted_partitions_and_collects_reported_gaps() {
        let note = GapNote {
            kind: streamops_crds::gap::GapKind::Retention,
            from: 3,
            to: 9,
            skipped: true,
            detected_at: 0,
        };
        let p = |partition, committed, gap| PartitionLag {
            topic: "t".into(),
            partition,
            committed,
            high_watermark: 10,
            lag: 0,
            gap,
        };
        let g = summarize(
            vec![
                p(1, None, None),
                p(0, Some(10), Some(note)),
                p(2, None, None),
            ],
            1,
        );
        assert_eq!(g.uncommitted, 2);
        assert_eq!(
            g.gaps,
            vec![PartitionGap {
                topic: "t".into(),
                partition: 0,
                note
            }]
        );
    }

    #[test]
    fn sasl_without_credentials_is_a_clear_error() {
        let target = LagTarget {
            bootstrap_servers: "k:9092".into(),
            group_id: "g".into(),
            topics: vec!["t".into()],
            auto_offset_reset: AutoOffsetReset::Earliest,
            security_protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            credentials: None,
            ssl_ca_location: None,
            workers: None,
        };
        assert!(matches!(
            client_config(&target),
            Err(LagError::MissingCredentials)
        ));
    }

    #[test]
    fn plain_without_tls_is_refused_even_with_credentials() {
        let target = LagTarget {
            bootstrap_servers: "k:9092".into(),
            group_id: "g".into(),
            topics: vec!["t".into()],
            auto_offset_reset: AutoOffsetReset::Earliest,
            security_protocol: SecurityProtocol::SaslPlaintext,
            sasl_mechanism: Some(SaslMechanism::Plain),
            credentials: Some(("u".into(), "p".into())),
            ssl_ca_location: None,
            workers: None,
        };
        assert!(matches!(
            client_config(&target),
            Err(LagError::PlainWithoutTls)
        ));
        let tls = LagTarget {
            security_protocol: SecurityProtocol::SaslSsl,
            ..target
        };
        assert!(client_config(&tls).is_ok());
    }
}
