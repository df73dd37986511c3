//! The worker configuration contract.
//!
//! The operator derives a [`WorkerConfig`] from a `StreamConsumer` with [`WorkerConfig::from_spec`],
//! renders it into a ConfigMap, and the worker reads it back. The worker's `--spec` mode derives it
//! with the same function, so both paths run exactly the same configuration. Secrets never appear
//! here: they reach the worker only through the environment variables named below.

use serde::{Deserialize, Serialize};

use crate::v1alpha1::{
    AutoOffsetReset, BatchSpec, FraudSettings, GroupProtocol, HandlerKind, LogLevel,
    MovingAverageSettings, OnOffsetGap, PipelineTriggerSettings, SaslMechanism, SecurityProtocol,
    SensorSettings, StreamConsumer, StreamConsumerSpec,
};
use crate::validate::{validate_spec, SpecError};

/// PostgreSQL connection URL of the sink.
pub const ENV_DATABASE_URL: &str = "STREAMOPS_DATABASE_URL";
/// Redis connection URL (pipeline-trigger).
pub const ENV_REDIS_URL: &str = "STREAMOPS_REDIS_URL";
/// SASL username.
pub const ENV_KAFKA_USERNAME: &str = "STREAMOPS_KAFKA_USERNAME";
/// SASL password.
pub const ENV_KAFKA_PASSWORD: &str = "STREAMOPS_KAFKA_PASSWORD";
/// Environment variable holding the value of `webhook.secretHeaders[index]`; the operator fills
/// it from the header's Secret with a `secretKeyRef`.
pub fn webhook_header_env(index: usize) -> String {
    format!("STREAMOPS_WEBHOOK_HEADER_{index}")
}
/// Static group membership id (`group.instance.id`). The operator leaves it unset (dynamic
/// members: a Deployment's pod names change on every rollout); tests and tools may set it.
pub const ENV_INSTANCE_ID: &str = "STREAMOPS_INSTANCE_ID";
/// Path of the rendered configuration file the worker reads.
pub const ENV_CONFIG_PATH: &str = "STREAMOPS_CONFIG";

/// Directory where the operator mounts the worker ConfigMap.
pub const CONFIG_MOUNT_DIR: &str = "/etc/streamops";
/// Key of the rendered configuration in the worker ConfigMap.
pub const CONFIG_FILE_NAME: &str = "worker.yaml";
/// Directory where Kafka TLS material is mounted.
pub const TLS_MOUNT_DIR: &str = "/etc/streamops/tls";
/// Port of the worker's HTTP server: `/healthz`, `/readyz`, `/metrics`, `/consumer/info/<id>`.
pub const WORKER_HTTP_PORT: u16 = 8080;
/// Default progress-log interval, in messages.
pub const DEFAULT_PROGRESS_EVERY: u64 = 10_000;

/// Everything a worker needs to run one StreamConsumer, apart from secrets.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerConfig {
    /// Consumer id: `namespace/name` of the StreamConsumer, or its name alone outside a cluster.
    pub consumer_id: String,
    /// Namespace of the StreamConsumer, when it runs in a cluster (pipeline-trigger creates Jobs
    /// there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Kafka connection and group settings.
    pub kafka: KafkaConfig,
    /// The handler and its settings.
    pub handler: Handler,
    /// Topic for messages the handler cannot process.
    pub error_topic: String,
    /// Batching of database transactions (the spec's defaults when left out).
    #[serde(default)]
    pub batch: BatchSpec,
    /// Largest accepted message value, in bytes.
    pub max_message_bytes: u32,
    /// Address of the HTTP server.
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
    /// Log level.
    #[serde(default)]
    pub log_level: LogLevel,
    /// A progress line is logged every this many messages.
    #[serde(default = "default_progress_every")]
    pub progress_every: u64,
}

fn default_http_listen() -> String {
    format!("0.0.0.0:{WORKER_HTTP_PORT}")
}

fn default_progress_every() -> u64 {
    DEFAULT_PROGRESS_EVERY
}

/// Kafka settings of a worker. Credentials come from [`ENV_KAFKA_USERNAME`] and
/// [`ENV_KAFKA_PASSWORD`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers.
    pub bootstrap_servers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group.
    pub group_id: String,
    /// Start of a partition with no stored offset.
    pub auto_offset_reset: AutoOffsetReset,
    /// What to do at a gap in a partition's offsets.
    #[serde(default)]
    pub on_offset_gap: OnOffsetGap,
    /// Security protocol.
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism, when the protocol uses SASL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// PEM CA file for the brokers' certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_ca_location: Option<String>,
    /// PEM client certificate file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_certificate_location: Option<String>,
    /// PEM client key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_key_location: Option<String>,
    /// Consumer group protocol (`group.protocol`). Under `consumer` (KIP-848) the broker assigns
    /// partitions, so the worker sets neither `partition.assignment.strategy` nor the classic
    /// session and heartbeat timeouts.
    #[serde(default, skip_serializing_if = "GroupProtocol::is_classic")]
    pub group_protocol: GroupProtocol,
    /// `session.timeout.ms`.
    #[serde(default = "crate::v1alpha1::default_session_timeout_ms")]
    pub session_timeout_ms: u32,
    /// `max.poll.interval.ms`.
    #[serde(default = "crate::v1alpha1::default_max_poll_interval_ms")]
    pub max_poll_interval_ms: u32,
}

/// A handler with its resolved settings.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Handler {
    /// Moving averages.
    MovingAverage(MovingAverageSettings),
    /// Sensor readings and failures.
    Sensor(SensorSettings),
    /// Fraud scoring.
    Fraud(FraudSettings),
    /// Pipeline triggering.
    PipelineTrigger(PipelineTriggerSettings),
}

impl Handler {
    /// The handler's kind.
    pub fn kind(&self) -> HandlerKind {
        match self {
            Self::MovingAverage(_) => HandlerKind::MovingAverage,
            Self::Sensor(_) => HandlerKind::Sensor,
            Self::Fraud(_) => HandlerKind::Fraud,
            Self::PipelineTrigger(_) => HandlerKind::PipelineTrigger,
        }
    }

    /// Whether the handler needs [`ENV_REDIS_URL`].
    pub fn needs_redis(&self) -> bool {
        matches!(self, Self::PipelineTrigger(_))
    }
}

/// File names of the client certificate and key in a `kubernetes.io/tls` Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// See [`TLS_CERT_KEY`].
pub const TLS_KEY_KEY: &str = "tls.key";
/// File name of the CA certificate under [`TLS_MOUNT_DIR`].
pub const TLS_CA_FILE: &str = "ca.crt";

impl WorkerConfig {
    /// Derives the worker configuration from a spec. This is the one place where a spec becomes a
    /// configuration; it validates the spec first and names the offending field on error.
    pub fn from_spec(
        name: &str,
        namespace: Option<&str>,
        spec: &StreamConsumerSpec,
    ) -> Result<Self, SpecError> {
        validate_spec(spec)?;
        let security = spec.kafka.security.as_ref();
        let protocol = security
            .map(|s| s.protocol)
            .unwrap_or(SecurityProtocol::Plaintext);
        let tls = security.and_then(|s| s.tls.as_ref());
        let uses_tls = protocol.uses_tls();
        let ssl_ca_location = tls
            .filter(|_| uses_tls)
            .and_then(|t| t.ca_secret_ref.as_ref())
            .map(|_| format!("{TLS_MOUNT_DIR}/ca/{TLS_CA_FILE}"));
        let client_cert = tls
            .filter(|_| uses_tls)
            .and_then(|t| t.client_cert_secret_name.as_ref());
        let handler = match spec.handler.kind {
            HandlerKind::MovingAverage => {
                Handler::MovingAverage(spec.handler.moving_average.clone().unwrap_or_default())
            }
            HandlerKind::Sensor => Handler::Sensor(spec.handler.sensor.clone().unwrap_or_default()),
            HandlerKind::Fraud => Handler::Fraud(
                spec.handler
                    .fraud
                    .clone()
                    .ok_or_else(|| SpecError::field("spec.handler.fraud", "required"))?,
            ),
            HandlerKind::PipelineTrigger => Handler::PipelineTrigger(
                spec.handler
                    .pipeline_trigger
                    .clone()
                    .ok_or_else(|| SpecError::field("spec.handler.pipelineTrigger", "required"))?,
            ),
        };
        Ok(Self {
            consumer_id: match namespace {
                Some(ns) => format!("{ns}/{name}"),
                None => name.to_string(),
            },
            namespace: namespace.map(str::to_string),
            kafka: KafkaConfig {
                bootstrap_servers: spec.kafka.bootstrap_servers.clone(),
                topics: spec.kafka.topics.clone(),
                group_id: spec.kafka.group_id.clone(),
                auto_offset_reset: spec.kafka.auto_offset_reset,
                on_offset_gap: spec.kafka.on_offset_gap,
                security_protocol: protocol,
                sasl_mechanism: security
                    .filter(|s| s.protocol.uses_sasl())
                    .and_then(|s| s.sasl.as_ref())
                    .map(|s| s.mechanism),
                ssl_ca_location,
                ssl_certificate_location: client_cert
                    .map(|_| format!("{TLS_MOUNT_DIR}/client/{TLS_CERT_KEY}")),
                ssl_key_location: client_cert
                    .map(|_| format!("{TLS_MOUNT_DIR}/client/{TLS_KEY_KEY}")),
                group_protocol: spec.kafka.group_protocol,
                session_timeout_ms: spec.kafka.session_timeout_ms,
                max_poll_interval_ms: spec.kafka.max_poll_interval_ms,
            },
            handler,
            error_topic: spec.error_topic.clone().unwrap_or_else(|| {
                // validate_spec guarantees at least one topic.
                format!("{}-failed", spec.kafka.topics[0])
            }),
            batch: spec.batch.clone(),
            max_message_bytes: spec.max_message_bytes,
            http_listen: default_http_listen(),
            log_level: spec.log_level.unwrap_or_default(),
            progress_every: spec.progress_every.unwrap_or(DEFAULT_PROGRESS_EVERY),
        })
    }

    /// Derives the worker configuration of a StreamConsumer object.
    pub fn from_resource(sc: &StreamConsumer) -> Result<Self, SpecError> {
        let name = sc
            .metadata
            .name
            .as_deref()
            .ok_or_else(|| SpecError::field("metadata.name", "required"))?;
        Self::from_spec(name, sc.metadata.namespace.as_deref(), &sc.spec)
    }

    /// Renders the configuration as YAML, the form stored in the worker ConfigMap.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_yaml::to_string(self).map_err(ConfigError::Render)
    }

    /// Parses a rendered configuration (YAML or JSON).
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        serde_yaml::from_str(text).map_err(ConfigError::Parse)
    }
}

/// Errors reading or writing a worker configuration or a StreamConsumer manifest.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration could not be rendered.
    #[error("cannot render the worker configuration: {0}")]
    Render(#[source] serde_yaml::Error),
    /// The configuration could not be parsed.
    #[error("invalid worker configuration: {0}")]
    Parse(#[source] serde_yaml::Error),
    /// A manifest document could not be parsed.
    #[error("invalid StreamConsumer manifest: {0}")]
    Manifest(String),
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
}

/// Finds the one StreamConsumer in a (possibly multi-document) YAML manifest, such as the files
/// in `manifests/examples/` that carry their Secrets beside the StreamConsumer.
pub fn stream_consumer_from_manifest(text: &str) -> Result<StreamConsumer, ConfigError> {
    let mut found = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_json::Value::deserialize(doc)
            .map_err(|e| ConfigError::Manifest(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        if value.get("kind").and_then(|k| k.as_str()) == Some("StreamConsumer") {
            found.push(value);
        }
    }
    match found.len() {
        0 => Err(ConfigError::Manifest(
            "the file holds no document of kind StreamConsumer".into(),
        )),
        1 => {
            let doc = found.remove(0);
            // Strict field validation, as the API server applies it.
            let unknown = crate::strict::unknown_fields(&doc);
            if !unknown.is_empty() {
                return Err(ConfigError::Manifest(
                    unknown
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                ));
            }
            serde_json::from_value(doc).map_err(|e| ConfigError::Manifest(e.to_string()))
        }
        n => Err(ConfigError::Manifest(format!(
            "the file holds {n} StreamConsumer documents; expected exactly one"
        ))),
    }
}
