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
    validation = Rule::new("!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas").message("spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas").field_path(".autoscaling")
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

    /// How messages are grouped into one database transaction.
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
    /// ran. To process a topic again, use a new group id or a replay.
    #[serde(default)]
    pub cleanup_policy: CleanupPolicy,

    /// Lag-based autoscaling. When set, the operator owns `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
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

    /// Transport security and authentication. Credentials are only ever read from Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<KafkaSecurity>,

    /// Kafka's `session.timeout.ms`: how long the group coordinator waits for a heartbeat before
    /// it removes a member (a static member: before its partitions move to others). Between 6000
    /// and 300000 (the broker's `group.min/max.session.timeout.ms` defaults), at most
    /// `maxPollIntervalMs`. Default 45000.
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
    /// Extra HTTP headers sent with every call. Never put credentials here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Backoff between the retries of a failed call (default: 250 ms, factor 2, at most 30 s).
    #[serde(default = "default_webhook_backoff")]
    pub retry_backoff: RetryBackoff,
}

/// Default of `webhook.retryBackoff`; also the backoff of Job triggers.
pub fn default_webhook_backoff() -> RetryBackoff {
    RetryBackoff {
        base_ms: 250,
        factor: 2.0,
        cap_ms: 30_000,
    }
}

fn default_webhook_timeout_ms() -> u32 {
    5000
}
fn default_webhook_retries() -> u32 {
    5
}

/// A Kubernetes Job trigger.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTriggerSpec {
    /// A `batch/v1` JobSpec. Each trigger creates one Job from it, in the StreamConsumer's
    /// namespace, named after the pipeline and the trigger.
    #[schemars(schema_with = "preserve_unknown_object")]
    pub template: serde_json::Value,
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
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

/// How messages are grouped into one database transaction.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSpec {
    /// Most messages in one batch.
    #[serde(default = "default_batch_max_messages")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_messages: u32,
    /// Longest time a batch waits to fill, in milliseconds.
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
    1000
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
