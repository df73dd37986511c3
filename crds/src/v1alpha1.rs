//! `streamops.dev/v1alpha1`: the `StreamConsumer` custom resource.
//!
//! Every doc comment in this module becomes `kubectl explain` text, so write them for users.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every streamops resource.
pub const GROUP: &str = "streamops.dev";
/// API version of this module's types.
pub const VERSION: &str = "v1alpha1";

/// A Kafka consumer workload: which topics to read, which handler processes the messages, where
/// the results go, and how many worker replicas run it.
// clippy reads the repeated `type_ = ...` of different `printcolumn(...)` entries as duplicated
// attributes; they are not.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "streamops.dev",
    version = "v1alpha1",
    kind = "StreamConsumer",
    plural = "streamconsumers",
    singular = "streamconsumer",
    shortname = "stc",
    category = "streamops",
    namespaced,
    cel,
    doc = "A Kafka consumer workload run by streamops: topics, consumer group, handler, sinks and replicas.",
    status = "StreamConsumerStatus",
    derive = "PartialEq",
    annotation("helm.sh/resource-policy", "keep"),
    printcolumn(
        name = "Handler",
        type_ = "string",
        json_path = ".spec.handler.kind",
        description = "Handler kind"
    ),
    printcolumn(
        name = "Topics",
        type_ = "string",
        json_path = ".spec.kafka.topics",
        description = "Consumed topics"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired worker replicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Ready worker replicas"
    ),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        json_path = ".status.lag.total",
        description = "Total consumer-group lag in messages"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Running, Suspended or Replaying"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    )
)]
#[x_kube(
    validation = Rule::new("self.handler.kind != 'pipeline-trigger' || has(self.redis)").message("spec.redis is required when spec.handler.kind is pipeline-trigger").field_path(".redis"),
    validation = Rule::new("!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas").message("spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas").field_path(".autoscaling"),
    validation = Rule::new("has(self.errorTopic) ? !(self.errorTopic in self.kafka.topics) : !((self.kafka.topics[0] + '-failed') in self.kafka.topics)").message("spec.errorTopic (default: the first topic plus -failed) must differ from every consumed topic, or rejected messages loop back into the consumer").field_path(".errorTopic")
)]
#[serde(rename_all = "camelCase")]
pub struct StreamConsumerSpec {
    /// Number of worker pods. Each pod is one member of the consumer group, so more replicas than
    /// partitions leaves some idle. Ignored while `autoscaling` is set: the operator then owns it.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Where and how to consume.
    pub kafka: KafkaSpec,

    /// What the workers do with each message.
    pub handler: HandlerSpec,

    /// Where results are written.
    pub sink: SinkSpec,

    /// Redis connection, used by the pipeline-trigger handler for its counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,

    /// Topic that receives every message the handler cannot process, with the reason and the
    /// source topic, partition and offset in its headers. Defaults to the first topic plus
    /// `-failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub error_topic: Option<String>,

    /// How messages are grouped into one database transaction. Within these bounds each batch
    /// adapts to the backlog: small once the workers have caught up, up to `maxMessages` while
    /// they are behind.
    #[serde(default)]
    pub batch: BatchSpec,

    /// Largest message value, in bytes, that the handler accepts. Larger messages go to the
    /// error topic.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1024, max = 67108864))]
    pub max_message_bytes: u32,

    /// Worker container image. Defaults to the image the operator was configured with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// CPU and memory requests and limits of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Worker log level: error, warn, info, debug or trace. At debug, every message received and
    /// every result (fraud: each score) is logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,

    /// A progress line (messages processed and rejected so far) is logged every this many
    /// messages (seed 003 logged every 100). 1-100000000; default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000000))]
    pub progress_every: Option<u64>,

    /// What happens to the Kafka consumer group when this resource is deleted. Sink data, and the
    /// consumed offsets stored in PostgreSQL with it, are never touched: a StreamConsumer created
    /// later with the same group id and database resumes where this one stopped, whichever policy
    /// ran. To process a topic again, use a new group id or a replay. Under `DeleteConsumerGroup`
    /// the object carries the operator's finalizer `streamops.dev/cleanup`, so its deletion waits
    /// for the operator; under `Retain` it carries none.
    #[serde(default)]
    pub cleanup_policy: CleanupPolicy,

    /// Lag-based autoscaling. When set, the operator owns `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// Suspends the consumer: its workers commit the batches they hold and stop (the Deployment
    /// scales to 0), autoscaling pauses, and lag is still reported. Set it back to false to
    /// resume from the offsets of record, exactly where processing stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// A replay: reset the consumer to earlier positions and rebuild the handler's tables, so
    /// that they end up as those of an uninterrupted run from there. It runs once per
    /// `requestId`; to replay again, set a new one. See `status.replay` for its progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplaySpec>,
}

/// Where a replay starts: exactly one of `toEarliest`, `fromTimestamp` and `offsets`.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(
    validation = Rule::new("(has(self.toEarliest) && self.toEarliest ? 1 : 0) + (has(self.fromTimestamp) ? 1 : 0) + (has(self.offsets) && size(self.offsets) > 0 ? 1 : 0) == 1").message("replay needs exactly one of toEarliest, fromTimestamp and offsets")
)]
#[serde(rename_all = "camelCase")]
pub struct ReplaySpec {
    /// Identifies the request: a replay runs once per id. Lowercase letters, digits and `-`,
    /// at most 40 characters.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub request_id: String,
    /// Every partition from the earliest offset the broker still holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub to_earliest: bool,
    /// Every partition from its first message with a timestamp at or after this time
    /// (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub from_timestamp: Option<String>,
    /// Explicit positions; partitions not listed keep theirs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000))]
    pub offsets: Vec<ReplayOffset>,
}

/// The position of one partition.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayOffset {
    /// Topic (one of `kafka.topics`).
    #[schemars(length(min = 1, max = 249))]
    pub topic: String,
    /// Partition.
    #[schemars(range(min = 0))]
    pub partition: i32,
    /// Offset of the next message to process.
    #[schemars(range(min = 0))]
    pub offset: i64,
}

fn default_replicas() -> i32 {
    1
}

fn default_max_message_bytes() -> u32 {
    1_048_576
}

/// Kafka connection and consumer-group settings.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("self.sessionTimeoutMs <= self.maxPollIntervalMs").message("sessionTimeoutMs must not exceed maxPollIntervalMs").field_path(".sessionTimeoutMs"))]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Comma-separated `host:port` list of bootstrap brokers.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,

    /// Topics to consume. Each must exist.
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))
    )]
    pub topics: Vec<String>,

    /// Consumer group id shared by all replicas.
    #[schemars(length(min = 1, max = 255))]
    pub group_id: String,

    /// Where a partition with no stored offset starts: `earliest` or `latest`.
    #[serde(default)]
    pub auto_offset_reset: AutoOffsetReset,

    /// What a worker does when Kafka no longer has the messages at a partition's stored offset
    /// (retention deleted them before they were processed, or the stored offset lies beyond the
    /// end of the log because the topic was recreated or the cluster restored): `skip` (the
    /// default) goes on with the next message it can apply, `fail` stops the worker at the gap. Either
    /// way the gap is logged with its range, counted in `streamops_offset_gaps_total`, recorded in
    /// `streamops_offset_gaps` and shown as the `OffsetGap` condition.
    #[serde(default)]
    pub on_offset_gap: OnOffsetGap,

    /// Transport security and authentication. Credentials are only ever read from Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<KafkaSecurity>,

    /// Consumer group protocol: `classic` (the default: the members agree on the assignment
    /// in JoinGroup/SyncGroup rounds, cooperative-sticky) or `consumer` (KIP-848, Apache Kafka
    /// 4.0 or newer: the broker computes the assignment and hands it out incrementally in
    /// heartbeats; the broker's group.consumer.* settings then decide the assignor, session
    /// timeout and heartbeat interval).
    #[serde(default, skip_serializing_if = "GroupProtocol::is_classic")]
    pub group_protocol: GroupProtocol,

    /// Kafka's `session.timeout.ms`: how long the group coordinator waits for a heartbeat before
    /// it removes a member (a static member: before its partitions move to others). Between 6000
    /// and 300000 (the broker's `group.min/max.session.timeout.ms` defaults), at most
    /// `maxPollIntervalMs`. Default 45000. Classic protocol only: under `consumer` (KIP-848) the
    /// broker's `group.consumer.session.timeout.ms` decides.
    #[serde(default = "default_session_timeout_ms")]
    #[schemars(range(min = 6000, max = 300000))]
    pub session_timeout_ms: u32,

    /// Kafka's `max.poll.interval.ms`: the longest a member may go without polling before it
    /// leaves the group. The worker polls while a batch waits for a dependency, so this only
    /// matters if a poll stalls. Between 10000 and 86400000. Default 300000.
    #[serde(default = "default_max_poll_interval_ms")]
    #[schemars(range(min = 10000, max = 86400000))]
    pub max_poll_interval_ms: u32,
}

/// Default of `spec.kafka.sessionTimeoutMs`.
pub fn default_session_timeout_ms() -> u32 {
    45_000
}

/// Default of `spec.kafka.maxPollIntervalMs`.
pub fn default_max_poll_interval_ms() -> u32 {
    300_000
}

/// Consumer group protocol (`group.protocol` of the Kafka client).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// JoinGroup/SyncGroup rebalances with the cooperative-sticky assignor; works with every
    /// Kafka version.
    #[default]
    Classic,
    /// KIP-848: the broker assigns partitions; needs Apache Kafka 4.0 or newer.
    Consumer,
}

impl GroupProtocol {
    /// The librdkafka value of `group.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Consumer => "consumer",
        }
    }

    /// Whether this is the classic protocol (the default, left out when serializing).
    pub fn is_classic(&self) -> bool {
        *self == Self::Classic
    }
}

/// Where a partition with no stored offset starts.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoOffsetReset {
    /// From the oldest retained message.
    #[default]
    Earliest,
    /// From the next message produced.
    Latest,
}

impl AutoOffsetReset {
    /// The librdkafka value of `auto.offset.reset`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Earliest => "earliest",
            Self::Latest => "latest",
        }
    }
}

/// What a worker does at a gap in a partition's offsets.
///
/// The default is `skip`: the messages of a gap are already gone, so stopping cannot bring them
/// back; under retention, a stopped worker only lets the gap grow while its backlog ages out. The
/// gap is never silent (log, metric, table, condition). Choose `fail` where a human must decide
/// first, for instance when a recreated topic reuses offsets that already have rows.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnOffsetGap {
    /// Record the gap and resume at the next available message.
    #[default]
    Skip,
    /// Record the gap and stop: the worker exits with an error naming the gap.
    Fail,
}

impl OnOffsetGap {
    /// The spec value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::Fail => "fail",
        }
    }
}

/// Transport security and SASL authentication for Kafka.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("!(self.protocol == 'SASL_SSL' || self.protocol == 'SASL_PLAINTEXT') || has(self.sasl)").message("sasl is required for the SASL_SSL and SASL_PLAINTEXT protocols").field_path(".sasl"))]
#[serde(rename_all = "camelCase")]
pub struct KafkaSecurity {
    /// Security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    pub protocol: SecurityProtocol,
    /// SASL mechanism and the Secret holding the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<SaslSpec>,
    /// TLS material, mounted into the workers from Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// Kafka security protocol.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[serde(rename = "PLAINTEXT")]
    Plaintext,
    /// TLS without SASL.
    #[serde(rename = "SSL")]
    Ssl,
    /// SASL without TLS.
    #[serde(rename = "SASL_PLAINTEXT")]
    SaslPlaintext,
    /// SASL over TLS.
    #[serde(rename = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka value of `security.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    /// Whether this protocol authenticates with SASL.
    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    /// Whether this protocol uses TLS.
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

/// SASL mechanism and credentials.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SaslSpec {
    /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    pub mechanism: SaslMechanism,
    /// Secret holding the username and password. They reach the workers as the
    /// `STREAMOPS_KAFKA_USERNAME` and `STREAMOPS_KAFKA_PASSWORD` environment variables.
    pub credentials_secret_ref: CredentialsSecretRef,
}

/// SASL mechanism.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum SaslMechanism {
    /// Username and password in clear text (use with SASL_SSL only).
    #[serde(rename = "PLAIN")]
    Plain,
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka value of `sasl.mechanism`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A Secret holding a username and a password.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret, in the StreamConsumer's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the username in the Secret.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// Key of the password in the Secret.
    #[serde(default = "default_password_key")]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}

fn default_password_key() -> String {
    "password".into()
}

/// A key in a Secret.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the StreamConsumer's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// TLS material for Kafka, mounted into the workers as files.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// CA certificate (PEM) that signs the brokers' certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Client certificate and key (PEM) for mutual TLS, from a `kubernetes.io/tls` Secret
    /// (`tls.crt` and `tls.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_name: Option<String>,
}

/// The handler kind and its settings. Exactly the settings block named after `kind` may be set.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.movingAverage) || self.kind == 'moving-average'").message("handler.movingAverage is only allowed when handler.kind is moving-average").field_path(".movingAverage"),
    validation = Rule::new("!has(self.sensor) || self.kind == 'sensor'").message("handler.sensor is only allowed when handler.kind is sensor").field_path(".sensor"),
    validation = Rule::new("has(self.fraud) == (self.kind == 'fraud')").message("handler.fraud is required when, and only when, handler.kind is fraud").field_path(".fraud"),
    validation = Rule::new("has(self.pipelineTrigger) == (self.kind == 'pipeline-trigger')").message("handler.pipelineTrigger is required when, and only when, handler.kind is pipeline-trigger").field_path(".pipelineTrigger")
)]
#[serde(rename_all = "camelCase")]
pub struct HandlerSpec {
    /// Handler kind: moving-average, sensor, fraud or pipeline-trigger.
    pub kind: HandlerKind,
    /// Settings of the moving-average handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_average: Option<MovingAverageSettings>,
    /// Settings of the sensor handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensor: Option<SensorSettings>,
    /// Settings of the fraud handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraud: Option<FraudSettings>,
    /// Settings of the pipeline-trigger handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_trigger: Option<PipelineTriggerSettings>,
}

/// Handler kind.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HandlerKind {
    /// N-point moving averages of price events, per symbol, into PostgreSQL.
    MovingAverage,
    /// Machine sensor readings and failure episodes into PostgreSQL.
    Sensor,
    /// Transaction validation, ML fraud scoring and persistence.
    Fraud,
    /// Event counting in Redis and pipeline triggering on count or time thresholds.
    PipelineTrigger,
}

impl HandlerKind {
    /// The kind as written in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MovingAverage => "moving-average",
            Self::Sensor => "sensor",
            Self::Fraud => "fraud",
            Self::PipelineTrigger => "pipeline-trigger",
        }
    }

    /// Every handler kind.
    pub const ALL: [HandlerKind; 4] = [
        Self::MovingAverage,
        Self::Sensor,
        Self::Fraud,
        Self::PipelineTrigger,
    ];
}

impl std::fmt::Display for HandlerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of the moving-average handler.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MovingAverageSettings {
    /// Number of price points in each average.
    #[serde(default = "default_window")]
    #[schemars(range(min = 2, max = 1000))]
    pub window: u32,
}

impl Default for MovingAverageSettings {
    fn default() -> Self {
        Self {
            window: default_window(),
        }
    }
}

fn default_window() -> u32 {
    5
}

/// Settings of the sensor handler.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SensorSettings {}

/// Settings of the fraud handler.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FraudSettings {
    /// URL of the scoring API's `POST /predict` endpoint.
    #[schemars(length(min = 1), regex(pattern = r"^https?://"))]
    pub scoring_url: String,
    /// Timeout of one scoring call, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 1, max = 600000))]
    pub timeout_ms: u32,
    /// Retries of a failed scoring call before its transactions go to the error topic.
    #[serde(default = "default_max_retries")]
    #[schemars(range(min = 0, max = 20))]
    pub max_retries: u32,
    /// Transactions per scoring call.
    #[serde(default = "default_fraud_batch")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: u32,
    /// Score at or above which a transaction is flagged as fraud.
    #[serde(default = "default_fraud_threshold")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub fraud_threshold: f64,
    /// Consecutive failed calls that open the circuit breaker.
    #[serde(default = "default_breaker_failures")]
    #[schemars(range(min = 1, max = 1000))]
    pub circuit_breaker_failures: u32,
    /// How long an open circuit waits before it lets one trial call through, in milliseconds.
    #[serde(default = "default_breaker_reset_ms")]
    #[schemars(range(min = 100, max = 3600000))]
    pub circuit_breaker_reset_ms: u32,
    /// The scoring API's protocol: `streamops` (the reference scorer's `POST /predict`),
    /// `kserve-v1` (KServe/Seldon V1: `{"instances": [...]}` -> `{"predictions": [...]}`, URL
    /// `.../v1/models/NAME:predict`) or `open-inference-v2` (the Open Inference Protocol, URL
    /// `.../v2/models/NAME/infer`). The feature vector sent for `kserve-v1` and
    /// `open-inference-v2` is documented in the worker's fraud handler.
    #[serde(default)]
    pub protocol: ScoringProtocol,
    /// Backoff between the retries of a failed scoring call.
    #[serde(default)]
    pub retry_backoff: RetryBackoff,
}

/// Protocol of a scoring API.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum ScoringProtocol {
    /// The reference scorer's `POST /predict` with named fields.
    #[default]
    #[serde(rename = "streamops")]
    Streamops,
    /// KServe/Seldon V1: `{"instances": [[...], ...]}` -> `{"predictions": [...]}`.
    #[serde(rename = "kserve-v1")]
    KserveV1,
    /// Open Inference Protocol (KServe V2, Triton, Seldon MLServer): `inputs`/`outputs` tensors.
    #[serde(rename = "open-inference-v2")]
    OpenInferenceV2,
}

impl ScoringProtocol {
    /// The name used in specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Streamops => "streamops",
            Self::KserveV1 => "kserve-v1",
            Self::OpenInferenceV2 => "open-inference-v2",
        }
    }
}

/// Capped exponential backoff between retries: retry `n` (1-based) waits
/// `baseMs * factor^(n-1)`, at most `capMs`, times a random factor between 0.5 and 1 so that
/// replicas do not retry in lockstep.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("self.baseMs <= self.capMs").message("baseMs must not exceed capMs").field_path(".baseMs"))]
#[serde(rename_all = "camelCase")]
pub struct RetryBackoff {
    /// Delay before the first retry, in milliseconds (1-60000). Default 100.
    #[serde(default = "default_backoff_base_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub base_ms: u32,
    /// Growth of the delay from one retry to the next (1-10). Default 2.
    #[serde(default = "default_backoff_factor")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub factor: f64,
    /// Longest delay between two attempts, in milliseconds (1-600000). Default 5000.
    #[serde(default = "default_backoff_cap_ms")]
    #[schemars(range(min = 1, max = 600000))]
    pub cap_ms: u32,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self {
            base_ms: default_backoff_base_ms(),
            factor: default_backoff_factor(),
            cap_ms: default_backoff_cap_ms(),
        }
    }
}

impl RetryBackoff {
    /// The full (un-jittered) delay before retry `retry` (1-based).
    pub fn ceiling(&self, retry: u32) -> std::time::Duration {
        let exp = retry.saturating_sub(1).min(64) as i32;
        let ms = f64::from(self.base_ms) * self.factor.max(1.0).powi(exp);
        std::time::Duration::from_millis(ms.min(f64::from(self.cap_ms)) as u64)
    }
}

fn default_backoff_base_ms() -> u32 {
    100
}
fn default_backoff_factor() -> f64 {
    2.0
}
fn default_backoff_cap_ms() -> u32 {
    5000
}

fn default_timeout_ms() -> u32 {
    2000
}
fn default_max_retries() -> u32 {
    3
}
fn default_fraud_batch() -> u32 {
    100
}
fn default_fraud_threshold() -> f64 {
    0.8
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_reset_ms() -> u32 {
    30_000
}

/// Settings of the pipeline-trigger handler. Exactly one of `webhook` and `job` is set.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[x_kube(validation = Rule::new("has(self.webhook) != has(self.job)").message("exactly one of pipelineTrigger.webhook and pipelineTrigger.job must be set"))]
#[serde(rename_all = "camelCase")]
pub struct PipelineTriggerSettings {
    /// Name of the pipeline to trigger; sent in every trigger.
    #[schemars(length(min = 1, max = 253))]
    pub pipeline_name: String,
    /// Trigger once this many events have been counted since the last trigger.
    #[schemars(range(min = 1))]
    pub max_events: u64,
    /// Trigger once this many seconds have passed since the last trigger.
    #[schemars(range(min = 1, max = 31536000))]
    pub max_time_seconds: u64,
    /// Whether the time threshold triggers a window with no events in it.
    #[serde(default)]
    pub trigger_on_empty_window: bool,
    /// The consumer id of seed 004's configuration: names the Redis counters
    /// (`consumer:<id>:events`), the `/consumer/info/<id>` endpoint and the `consumer_id` of every
    /// trigger. Defaults to `namespace/name` of the StreamConsumer. 1-253 characters of
    /// `[a-zA-Z0-9._:/-]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-zA-Z0-9._:/-]+$"))]
    pub consumer_id: Option<String>,
    /// Trigger by an HTTP POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    /// Trigger by creating a Kubernetes Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobTriggerSpec>,
}

/// An HTTP webhook trigger.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// URL that receives a JSON POST for every trigger.
    #[schemars(length(min = 1), regex(pattern = r"^https?://"))]
    pub url: String,
    /// Timeout of one call, in milliseconds.
    #[serde(default = "default_webhook_timeout_ms")]
    #[schemars(range(min = 1, max = 600000))]
    pub timeout_ms: u32,
    /// Retries of a failed call, with capped exponential backoff.
    #[serde(default = "default_webhook_retries")]
    #[schemars(range(min = 0, max = 100))]
    pub max_retries: u32,
    /// Extra HTTP headers sent with every call, inline. Never put credentials here: use
    /// `secretHeaders`. Credential-bearing names (Authorization, Proxy-Authorization, Cookie and
    /// any name containing token, secret, key or password) are refused inline.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Backoff between the retries of a failed call (default: 250 ms, factor 2, at most 30 s).
    #[serde(default = "default_webhook_backoff")]
    pub retry_backoff: RetryBackoff,
    /// HTTP headers whose values come from Secrets, such as `Authorization`. The kubelet puts each
    /// value into the worker's environment (`STREAMOPS_WEBHOOK_HEADER_<index>`); it never appears
    /// in the StreamConsumer, the worker configuration, logs or status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub secret_headers: Vec<SecretHeader>,
}

/// Default of `webhook.retryBackoff`; also the backoff of Job triggers.
pub fn default_webhook_backoff() -> RetryBackoff {
    RetryBackoff {
        base_ms: 250,
        factor: 2.0,
        cap_ms: 30_000,
    }
}

/// An HTTP header whose value is read from a Secret.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretHeader {
    /// Header name, such as `Authorization`.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    )]
    pub name: String,
    /// Secret key holding the header value, in the StreamConsumer's namespace.
    pub secret_key_ref: SecretKeyRef,
}

fn default_webhook_timeout_ms() -> u32 {
    5000
}
fn default_webhook_retries() -> u32 {
    5
}

/// A Kubernetes Job trigger. Only when the operator's admin enabled Job triggers.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTriggerSpec {
    /// A `batch/v1` JobSpec. Each trigger creates one Job from it, in the StreamConsumer's
    /// namespace, named after the pipeline and the trigger. Its pod must meet the restricted Pod
    /// Security Standard (no privileged containers, host namespaces, hostPath volumes, host ports,
    /// added capabilities, privilege escalation or running as root; what it leaves unset the
    /// workers set to the restricted values) and may name only a ServiceAccount the operator's
    /// policy allows.
    #[schemars(schema_with = "job_template_schema")]
    pub template: serde_json::Value,
}

/// `schema` with a `description` (for `kubectl explain`).
fn described(mut schema: serde_json::Value, description: &str) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.insert("description".into(), description.into());
    }
    schema
}

/// An object whose listed properties are typed and whose other fields are kept as written.
fn open_object(description: &str, properties: serde_json::Value) -> serde_json::Value {
    described(
        serde_json::json!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
            "properties": properties
        }),
        description,
    )
}

fn typed(type_: &str, description: &str) -> serde_json::Value {
    described(serde_json::json!({ "type": type_ }), description)
}

fn int64(description: &str) -> serde_json::Value {
    described(
        serde_json::json!({"type": "integer", "format": "int64"}),
        description,
    )
}

/// Schema of the containers of a Job template: the fields the restricted Pod Security Standard
/// constrains are typed and checked by CEL; everything else is kept as written.
fn restricted_containers_schema(description: &str) -> serde_json::Value {
    let security_context = open_object(
        "Container security context; must meet the restricted Pod Security Standard.",
        serde_json::json!({
            "privileged": typed("boolean", "Must not be true."),
            "allowPrivilegeEscalation": typed("boolean", "Must not be true; the workers set false when unset."),
            "runAsNonRoot": typed("boolean", "Must not be false."),
            "runAsUser": int64("Must not be 0 (root)."),
            "capabilities": open_object(
                "Capabilities; the workers drop ALL.",
                serde_json::json!({
                    "add": described(
                        serde_json::json!({"type": "array", "maxItems": 64, "items": {"type": "string"}}),
                        "Must be empty: no capability may be added."
                    )
                })
            )
        }),
    );
    let ports = described(
        serde_json::json!({
            "type": "array",
            "maxItems": 64,
            "items": open_object("A container port.", serde_json::json!({
                "hostPort": described(serde_json::json!({"type": "integer", "format": "int32"}), "Must be unset or 0.")
            }))
        }),
        "Container ports; host ports are not allowed.",
    );
    let mut item = open_object(
        "A container.",
        serde_json::json!({"ports": ports, "securityContext": security_context}),
    );
    item["x-kubernetes-validations"] = serde_json::json!([
        {"rule": "!has(self.securityContext) || !has(self.securityContext.privileged) || !self.securityContext.privileged",
         "message": "privileged containers are not allowed (restricted Pod Security Standard)",
         "fieldPath": ".securityContext.privileged"},
        {"rule": "!has(self.securityContext) || !has(self.securityContext.allowPrivilegeEscalation) || !self.securityContext.allowPrivilegeEscalation",
         "message": "allowPrivilegeEscalation must be false (restricted Pod Security Standard)",
         "fieldPath": ".securityContext.allowPrivilegeEscalation"},
        {"rule": "!has(self.securityContext) || !has(self.securityContext.runAsNonRoot) || self.securityContext.runAsNonRoot",
         "message": "runAsNonRoot must not be false (restricted Pod Security Standard)",
         "fieldPath": ".securityContext.runAsNonRoot"},
        {"rule": "!has(self.securityContext) || !has(self.securityContext.runAsUser) || self.securityContext.runAsUser != 0",
         "message": "running as root (runAsUser 0) is not allowed (restricted Pod Security Standard)",
         "fieldPath": ".securityContext.runAsUser"},
        {"rule": "!has(self.securityContext) || !has(self.securityContext.capabilities) || !has(self.securityContext.capabilities.add) || size(self.securityContext.capabilities.add) == 0",
         "message": "added capabilities are not allowed (restricted Pod Security Standard)",
         "fieldPath": ".securityContext.capabilities.add"},
        {"rule": "!has(self.ports) || self.ports.all(p, !has(p.hostPort) || p.hostPort == 0)",
         "message": "host ports are not allowed (restricted Pod Security Standard)",
         "fieldPath": ".ports"}
    ]);
    described(
        serde_json::json!({"type": "array", "maxItems": 32, "items": item}),
        description,
    )
}

fn job_template_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let volumes = described(
        serde_json::json!({
            "type": "array",
            "maxItems": 128,
            "items": open_object("A volume.", serde_json::json!({
                "hostPath": described(
                    serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
                    "Not allowed."
                )
            }))
        }),
        "Volumes; hostPath volumes are not allowed.",
    );
    let mut pod_spec = open_object(
        "The pod spec; must meet the restricted Pod Security Standard.",
        serde_json::json!({
            "hostNetwork": typed("boolean", "Must not be true."),
            "hostPID": typed("boolean", "Must not be true."),
            "hostIPC": typed("boolean", "Must not be true."),
            "serviceAccountName": typed("string", "Only a ServiceAccount the operator's policy allows; unset runs as the namespace's default ServiceAccount."),
            "securityContext": open_object(
                "Pod security context; the workers set runAsNonRoot and the RuntimeDefault seccomp profile when unset.",
                serde_json::json!({
                    "runAsNonRoot": typed("boolean", "Must not be false."),
                    "runAsUser": int64("Must not be 0 (root).")
                })
            ),
            "volumes": volumes,
            "containers": restricted_containers_schema("Containers."),
            "initContainers": restricted_containers_schema("Init containers."),
            "ephemeralContainers": restricted_containers_schema("Ephemeral containers.")
        }),
    );
    pod_spec["x-kubernetes-validations"] = serde_json::json!([
        {"rule": "!has(self.hostNetwork) || !self.hostNetwork",
         "message": "hostNetwork is not allowed (restricted Pod Security Standard)",
         "fieldPath": ".hostNetwork"},
        {"rule": "!has(self.hostPID) || !self.hostPID",
         "message": "hostPID is not allowed (restricted Pod Security Standard)",
         "fieldPath": ".hostPID"},
        {"rule": "!has(self.hostIPC) || !self.hostIPC",
         "message": "hostIPC is not allowed (restricted Pod Security Standard)",
         "fieldPath": ".hostIPC"},
        {"rule": "!has(self.volumes) || self.volumes.all(v, !has(v.hostPath))",
         "message": "hostPath volumes are not allowed (restricted Pod Security Standard)",
         "fieldPath": ".volumes"},
        {"rule": "!has(self.securityContext) || !has(self.securityContext.runAsNonRoot) || self.securityContext.runAsNonRoot",
         "message": "runAsNonRoot must not be false (restricted Pod Security Standard)",
         "fieldPath": ".securityContext.runAsNonRoot"},
        {"rule": "!has(self.securityContext) || !has(self.securityContext.runAsUser) || self.securityContext.runAsUser != 0",
         "message": "running as root (runAsUser 0) is not allowed (restricted Pod Security Standard)",
         "fieldPath": ".securityContext.runAsUser"}
    ]);
    let template = open_object(
        "The Job's pod template.",
        serde_json::json!({ "spec": pod_spec }),
    );
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": { "template": template }
    })
}

/// Sinks. Every handler writes to PostgreSQL.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SinkSpec {
    /// PostgreSQL sink.
    pub postgres: PostgresSink,
}

/// PostgreSQL sink.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSink {
    /// Secret key holding the connection URL (`postgres://user:pass@host:5432/db`). It reaches
    /// the workers as the `STREAMOPS_DATABASE_URL` environment variable.
    pub url_secret_ref: SecretKeyRef,
}

/// Redis connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// Secret key holding the connection URL (`redis://host:6379/0`). It reaches the workers as
    /// the `STREAMOPS_REDIS_URL` environment variable.
    pub url_secret_ref: SecretKeyRef,
}

/// How messages are grouped into one database transaction. Within these bounds the worker
/// adapts each batch to the backlog: a batch goes to the database as soon as the previous one
/// is committed, so batches are small (low latency) once the worker has caught up, and their
/// size limit doubles, up to `maxMessages`, while messages are left behind (high throughput).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSpec {
    /// Most messages in one batch: the ceiling of the adaptive batch size (default 5000).
    #[serde(default = "default_batch_max_messages")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_messages: u32,
    /// Longest time a message waits for its batch while the writer is busy, in milliseconds.
    #[serde(default = "default_batch_max_wait_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub max_wait_ms: u32,
}

impl Default for BatchSpec {
    fn default() -> Self {
        Self {
            max_messages: default_batch_max_messages(),
            max_wait_ms: default_batch_max_wait_ms(),
        }
    }
}

fn default_batch_max_messages() -> u32 {
    5_000
}
fn default_batch_max_wait_ms() -> u32 {
    100
}

/// Worker log level.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default.
    #[default]
    Info,
    /// Verbose.
    Debug,
    /// Very verbose.
    Trace,
}

impl LogLevel {
    /// The `tracing` filter directive.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// What deleting a StreamConsumer does to its consumer group.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum CleanupPolicy {
    /// Keep the consumer group and its committed offsets.
    #[default]
    Retain,
    /// Delete the Kafka consumer group and the offsets committed to Kafka, which are advisory
    /// (lag tools read them). It does not reset processing: the authoritative offsets are stored
    /// in PostgreSQL with the results and are kept.
    DeleteConsumerGroup,
}

/// Lag-based autoscaling.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest replicas while there is lag (or always, without `scaleToZero`).
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Target lag per replica, in messages.
    #[schemars(range(min = 1))]
    pub lag_threshold: u64,
    /// How long a higher replica count must be wanted before scaling up, in seconds.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: u32,
    /// How long a lower replica count must be wanted before scaling down, in seconds.
    #[serde(default = "default_scale_down_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: u32,
    /// Scale to zero replicas when there is no lag.
    #[serde(default)]
    pub scale_to_zero: bool,
    /// Lag at which a consumer scaled to zero is woken up.
    #[serde(default = "default_activation_lag")]
    #[schemars(range(min = 1))]
    pub activation_lag: u64,
    /// Allow more replicas than partitions (the extra ones sit idle).
    #[serde(default)]
    pub allow_idle_consumers: bool,
    /// How often lag is read, in seconds.
    #[serde(default = "default_lag_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub poll_interval_seconds: u32,
}

fn default_min_replicas() -> i32 {
    1
}
fn default_scale_down_stabilization() -> u32 {
    300
}
fn default_activation_lag() -> u64 {
    1
}
fn default_lag_interval() -> u32 {
    5
}

/// Observed state of a StreamConsumer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamConsumerStatus {
    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Worker pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Worker pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the worker pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Consumer-group lag, read by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<LagStatus>,
    /// Hash of the rendered worker configuration that the Deployment runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// `Running`, `Suspended` (spec.suspend, or while a replay holds the workers stopped) or
    /// `Replaying`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The last replay request seen and how far it got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayStatus>,
}

/// Progress of a replay request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayStatus {
    /// The `spec.replay.requestId` this describes; a request whose id is here and `Completed`
    /// never runs again.
    pub request_id: String,
    /// `Suspending` (waiting for the workers to stop), `Running` (the replay Job runs),
    /// `Completed`, or `Failed` (see `message`; set a new requestId to try again).
    pub phase: String,
    /// The replay Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// What happened, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the request was first seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it completed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
}

/// Consumer-group lag.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LagStatus {
    /// Total lag over all partitions, in messages.
    pub total: i64,
    /// Partitions of the consumed topics.
    pub partitions: i32,
    /// Members of the consumer group.
    pub members: i32,
    /// Largest lag of a single partition.
    pub max_partition_lag: i64,
    /// When the lag was read (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<String>,
}
