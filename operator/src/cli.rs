//! Command line. The flag and environment-variable names are a contract with the Helm chart.

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use streamops_crds::v1alpha1::{AutoOffsetReset, SaslMechanism, SecurityProtocol};

use crate::brokers::{BrokerPolicy, BrokerPolicyError};
use crate::build::{TracingSettingsError, WorkerNetwork, WorkerTracing};
use crate::lag::{LagTarget, ENV_LAG_PASSWORD, ENV_LAG_USERNAME};
use crate::lag_poller::PollSettings;
use crate::policy::Policy;
use crate::telemetry::LogFormat;

/// Worker image used when a StreamConsumer sets no `spec.image`.
pub const DEFAULT_WORKER_IMAGE: &str = "ghcr.io/streamops/streamops-worker:0.1.0";

/// The streamops operator.
#[derive(Debug, Parser)]
#[command(name = "streamops-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// Parsed once per process: the size of `RunArgs` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller.
    Run(RunArgs),
    /// Print a consumer group's lag as the operator computes it (status.lag and the autoscaler).
    Lag(LagArgs),
}

/// `streamops-operator run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces). An empty value means all.
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Worker image for StreamConsumers without spec.image.
    #[arg(long, env = "STREAMOPS_WORKER_IMAGE", default_value = DEFAULT_WORKER_IMAGE)]
    pub worker_image: String,

    /// Run the controller only while holding the leader Lease (default: true).
    #[arg(
        long = "leader-election",
        env = "STREAMOPS_LEADER_ELECTION",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        default_value = "true",
        default_missing_value = "true",
        overrides_with = "no_leader_election"
    )]
    pub leader_election: bool,

    /// Run the controller without leader election (one operator replica only).
    #[arg(long = "no-leader-election", overrides_with = "leader_election")]
    pub no_leader_election: bool,

    /// Name of the leader Lease.
    #[arg(long, default_value = "streamops-operator")]
    pub lease_name: String,

    /// Namespace of the leader Lease (default: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,

    /// Log format.
    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// Seconds between two lag readings of a StreamConsumer without spec.autoscaling (with it,
    /// spec.autoscaling.pollIntervalSeconds). 0: read only the lag of autoscaled ones.
    #[arg(long, env = "STREAMOPS_LAG_INTERVAL", default_value_t = 30)]
    pub lag_interval: u64,

    /// Reconciliations run at once (never two of the same StreamConsumer). Bounds the load the
    /// operator puts on the API server when many StreamConsumers need work together (a start, a
    /// fail-over, an upgrade of the worker image); at least 1.
    #[arg(
        long,
        env = "STREAMOPS_MAX_CONCURRENT_RECONCILES",
        default_value_t = crate::reconcile::DEFAULT_CONCURRENCY,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub max_concurrent_reconciles: u16,

    /// Most seconds a status change that is only progress (how far the workers got, with no
    /// condition turning True or False) waits, so that the progress reached by then goes out in
    /// one write. 0: every status change is written at once (see the operator README, "Status").
    #[arg(
        long,
        env = "STREAMOPS_STATUS_PROGRESS_HOLD",
        default_value_t = crate::status::PROGRESS_HOLD.as_secs()
    )]
    pub status_progress_hold: u64,

    /// Least seconds between two status writes made only to refresh status.lag (a scale decision
    /// or a change of LagAvailable is written at once).
    #[arg(long, default_value_t = 15)]
    pub lag_status_interval: u64,

    /// The Kafka brokers the operator may connect to (to read lag, and to delete consumer groups),
    /// as a JSON list of {name, bootstrapServers, hostPatterns, securityProtocol, saslMechanism,
    /// sslCaLocation}; entry N's credentials come from STREAMOPS_LAG_BROKER_<N>_USERNAME and
    /// _PASSWORD. Empty: none, so no lag is read.
    #[arg(
        long,
        env = "STREAMOPS_LAG_BROKERS",
        default_value = "",
        hide_env_values = true
    )]
    pub lag_brokers: String,

    /// Further worker images spec.image may name, comma-separated: exact, or a prefix ending in
    /// `*`. --worker-image is always allowed; any other spec.image is refused.
    #[arg(long, env = "STREAMOPS_ALLOWED_WORKER_IMAGES", value_delimiter = ',')]
    pub allowed_worker_images: Vec<String>,

    /// Let pipeline-trigger workers create Kubernetes Jobs (default: off; such StreamConsumers are
    /// refused).
    #[arg(
        long,
        env = "STREAMOPS_JOB_TRIGGERS",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub job_triggers: bool,

    /// ServiceAccounts a Job template may name, comma-separated (default: none; a template
    /// without one runs as its namespace's default ServiceAccount).
    #[arg(long, env = "STREAMOPS_JOB_SERVICE_ACCOUNTS", value_delimiter = ',')]
    pub job_service_accounts: Vec<String>,

    /// ClusterRole (create/get/list on jobs.batch) that Job-trigger workers are bound to in their
    /// namespace with a RoleBinding; the chart creates it.
    #[arg(
        long,
        env = "STREAMOPS_JOB_TRIGGER_CLUSTER_ROLE",
        default_value = "streamops-job-trigger"
    )]
    pub job_trigger_cluster_role: String,

    /// Give every worker a NetworkPolicy: ingress only to its metrics port, egress only to DNS,
    /// its brokers, PostgreSQL, Redis and its scorer or webhook (and the API server for Job
    /// triggers).
    #[arg(
        long,
        env = "STREAMOPS_WORKER_NETWORK_POLICY",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub worker_network_policy: bool,

    /// PostgreSQL ports the worker NetworkPolicy allows.
    #[arg(
        long,
        env = "STREAMOPS_WORKER_POSTGRES_PORTS",
        value_delimiter = ',',
        default_value = "5432"
    )]
    pub worker_postgres_ports: Vec<u16>,

    /// Redis ports the worker NetworkPolicy allows (pipeline-trigger).
    #[arg(
        long,
        env = "STREAMOPS_WORKER_REDIS_PORTS",
        value_delimiter = ',',
        default_value = "6379"
    )]
    pub worker_redis_ports: Vec<u16>,

    /// Kubernetes API server ports the worker NetworkPolicy allows to Job-trigger workers.
    #[arg(
        long,
        env = "STREAMOPS_WORKER_API_SERVER_PORTS",
        value_delimiter = ',',
        default_value = "443,6443"
    )]
    pub worker_api_server_ports: Vec<u16>,

    /// OTLP/HTTP endpoint the workers export their spans to (their
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`), e.g. `http://otel-collector.observability:4318`. Unset or
    /// empty: the workers export nothing.
    #[arg(long, env = "STREAMOPS_WORKER_OTLP_ENDPOINT")]
    pub worker_otlp_endpoint: Option<String>,

    /// OTLP protocol of the workers (they export `http/protobuf` only).
    #[arg(long, env = "STREAMOPS_WORKER_OTLP_PROTOCOL", default_value = crate::build::OTLP_PROTOCOL)]
    pub worker_otlp_protocol: String,

    /// Resource attributes added to the workers' (`key=value,...`), after the operator's own
    /// `k8s.namespace.name` and `streamops.consumer`.
    #[arg(long, env = "STREAMOPS_WORKER_OTEL_RESOURCE_ATTRIBUTES")]
    pub worker_otel_resource_attributes: Option<String>,

    /// Further plain `OTEL_*` variables for the workers, `NAME=value`, `;`-separated (sampler,
    /// timeouts...). Headers are refused here: see --worker-otlp-headers-secret-name.
    #[arg(long, env = "STREAMOPS_WORKER_OTEL_ENV", value_delimiter = ';')]
    pub worker_otel_env: Vec<String>,

    /// Secret, in each StreamConsumer's namespace, whose key (--worker-otlp-headers-secret-key)
    /// the workers read as `OTEL_EXPORTER_OTLP_HEADERS` (referenced, never read by the operator).
    #[arg(long, env = "STREAMOPS_WORKER_OTLP_HEADERS_SECRET_NAME")]
    pub worker_otlp_headers_secret_name: Option<String>,

    /// Key of --worker-otlp-headers-secret-name.
    #[arg(
        long,
        env = "STREAMOPS_WORKER_OTLP_HEADERS_SECRET_KEY",
        default_value = "headers"
    )]
    pub worker_otlp_headers_secret_key: String,
}

impl RunArgs {
    /// The namespace to watch; `None` for all.
    pub fn watch_namespace(&self) -> Option<&str> {
        self.namespace
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
    }

    /// Whether leader election is on.
    pub fn leader_election(&self) -> bool {
        self.leader_election && !self.no_leader_election
    }

    /// The operator's policy: allowed worker images and Job triggers.
    pub fn policy(&self) -> Policy {
        let list = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        Policy {
            default_image: self.worker_image.clone(),
            allowed_images: list(&self.allowed_worker_images),
            job_triggers: self.job_triggers,
            job_service_accounts: list(&self.job_service_accounts),
        }
    }

    /// The brokers the operator may connect to, with their credentials from the environment.
    pub fn broker_policy(&self) -> Result<BrokerPolicy, BrokerPolicyError> {
        BrokerPolicy::from_json(&self.lag_brokers, &|name| std::env::var(name).ok())
    }

    /// The worker NetworkPolicy settings; `None` when off.
    pub fn worker_network(&self) -> Option<WorkerNetwork> {
        self.worker_network_policy.then(|| WorkerNetwork {
            postgres_ports: self.worker_postgres_ports.clone(),
            redis_ports: self.worker_redis_ports.clone(),
            api_server_ports: self.worker_api_server_ports.clone(),
        })
    }

    /// The workers' OpenTelemetry settings; `None` when no endpoint is set.
    pub fn worker_tracing(&self) -> Result<Option<WorkerTracing>, TracingSettingsError> {
        WorkerTracing::from_flags(
            self.worker_otlp_endpoint.as_deref(),
            &self.worker_otlp_protocol,
            self.worker_otel_resource_attributes.as_deref(),
            &self.worker_otel_env,
            self.worker_otlp_headers_secret_name.as_deref(),
            &self.worker_otlp_headers_secret_key,
        )
    }

    /// How long a status change that is only progress may wait (`--status-progress-hold`).
    pub fn progress_hold(&self) -> Duration {
        Duration::from_secs(self.status_progress_hold)
    }

    /// Settings of the lag poller.
    pub fn poll_settings(&self) -> PollSettings {
        PollSettings {
            default_interval: (self.lag_interval > 0)
                .then(|| Duration::from_secs(self.lag_interval)),
            status_interval: Duration::from_secs(self.lag_status_interval),
            ..PollSettings::default()
        }
    }
}

/// `streamops-operator lag`. SASL credentials come from the environment, as for the controller:
/// `STREAMOPS_LAG_KAFKA_USERNAME` and `STREAMOPS_LAG_KAFKA_PASSWORD`.
#[derive(Debug, Clone, Args)]
pub struct LagArgs {
    /// Bootstrap brokers, HOST:PORT[,HOST:PORT...].
    #[arg(long)]
    pub bootstrap_servers: String,

    /// Consumer group.
    #[arg(long)]
    pub group: String,

    /// Consumed topic; repeat for several.
    #[arg(long = "topic", required = true)]
    pub topics: Vec<String>,

    /// Where partitions without a committed offset start (the StreamConsumer's autoOffsetReset).
    #[arg(long, value_enum, default_value = "earliest")]
    pub auto_offset_reset: OffsetReset,

    /// Kafka security protocol.
    #[arg(long, value_enum, default_value = "PLAINTEXT")]
    pub security_protocol: Protocol,

    /// SASL mechanism (with a SASL protocol).
    #[arg(long, value_enum)]
    pub sasl_mechanism: Option<Mechanism>,

    /// Timeout of each request to the brokers, in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_seconds: u64,
}

impl LagArgs {
    /// What to read.
    pub fn target(&self) -> LagTarget {
        let protocol = SecurityProtocol::from(self.security_protocol);
        let credentials = match (
            std::env::var(ENV_LAG_USERNAME),
            std::env::var(ENV_LAG_PASSWORD),
        ) {
            (Ok(u), Ok(p)) if protocol.uses_sasl() => Some((u, p)),
            _ => None,
        };
        LagTarget {
            bootstrap_servers: self.bootstrap_servers.clone(),
            group_id: self.group.clone(),
            topics: self.topics.clone(),
            auto_offset_reset: self.auto_offset_reset.into(),
            security_protocol: protocol,
            sasl_mechanism: self.sasl_mechanism.map(Into::into),
            credentials,
            ssl_ca_location: None,
            workers: None,
        }
    }
}

/// `--auto-offset-reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OffsetReset {
    /// From the oldest retained message.
    Earliest,
    /// From the next message produced.
    Latest,
}

impl From<OffsetReset> for AutoOffsetReset {
    fn from(r: OffsetReset) -> Self {
        match r {
            OffsetReset::Earliest => Self::Earliest,
            OffsetReset::Latest => Self::Latest,
        }
    }
}

/// `--security-protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// No TLS, no authentication.
    #[value(name = "PLAINTEXT")]
    Plaintext,
    /// TLS (system CAs).
    #[value(name = "SSL")]
    Ssl,
    /// SASL without TLS.
    #[value(name = "SASL_PLAINTEXT")]
    SaslPlaintext,
    /// SASL over TLS.
    #[value(name = "SASL_SSL")]
    SaslSsl,
}

impl From<Protocol> for SecurityProtocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Plaintext => Self::Plaintext,
            Protocol::Ssl => Self::Ssl,
            Protocol::SaslPlaintext => Self::SaslPlaintext,
            Protocol::SaslSsl => Self::SaslSsl,
        }
    }
}

/// `--sasl-mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mechanism {
    /// PLAIN.
    #[value(name = "PLAIN")]
    Plain,
    /// SCRAM-SHA-256.
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl From<Mechanism> for SaslMechanism {
    fn from(m: Mechanism) -> Self {
        match m {
            Mechanism::Plain => Self::Plain,
            Mechanism::ScramSha256 => Self::ScramSha256,
            Mechanism::ScramSha512 => Self::ScramSha512,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> RunArgs {
        let mut argv = vec!["streamops-operator", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(r) => r,
            other => panic!("not run: {other:?}"),
        }
    }

    fn lag(args: &[&str]) -> Result<LagArgs, clap::Error> {
        let mut argv = vec!["streamops-operator", "lag"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Lag(l) => Ok(l),
            other => panic!("not lag: {other:?}"),
        }
    }

    #[test]
    fn lag_takes_several_topics_and_defaults_to_earliest_plaintext() {
        let l = lag(&[
            "--bootstrap-servers",
            "k:9092",
            "--group",
            "g",
            "--topic",
            "a",
            "--topic",
            "b",
        ])
        .unwrap();
        let t = l.target();
        assert_eq!(t.topics, ["a", "b"]);
        assert_eq!(t.group_id, "g");
        assert_eq!(t.auto_offset_reset, AutoOffsetReset::Earliest);
        assert_eq!(t.security_protocol, SecurityProtocol::Plaintext);
        assert_eq!(t.credentials, None);
        let l = lag(&[
            "--bootstrap-servers",
            "k:9092",
            "--group",
            "g",
            "--topic",
            "a",
            "--auto-offset-reset",
            "latest",
            "--security-protocol",
            "SASL_SSL",
            "--sasl-mechanism",
            "SCRAM-SHA-512",
        ])
        .unwrap();
        let t = l.target();
        assert_eq!(t.auto_offset_reset, AutoOffsetReset::Latest);
        assert_eq!(t.security_protocol, SecurityProtocol::SaslSsl);
        assert_eq!(t.sasl_mechanism, Some(SaslMechanism::ScramSha512));
    }

    #[test]
    fn lag_needs_a_topic_a_group_and_brokers() {
        assert!(lag(&["--bootstrap-servers", "k:9092", "--group", "g"]).is_err());
        assert!(lag(&["--bootstrap-servers", "k:9092", "--topic", "t"]).is_err());
        assert!(lag(&["--group", "g", "--topic", "t"]).is_err());
        assert!(lag(&[
            "--bootstrap-servers",
            "k:9092",
            "--group",
            "g",
            "--topic",
            "t",
            "--auto-offset-reset",
            "none"
        ])
        .is_err());
    }

    #[test]
    fn lag_interval_zero_reads_only_autoscaled_consumers() {
        let settings = run(&["--lag-interval", "0"]).poll_settings();
        assert_eq!(settings.default_interval, None);
        let settings = run(&["--lag-interval", "12", "--lag-status-interval", "3"]).poll_settings();
        assert_eq!(settings.default_interval, Some(Duration::from_secs(12)));
        assert_eq!(settings.status_interval, Duration::from_secs(3));
    }

    // Environment variables are process-wide: every assertion that depends on them is here, so
    // no other test races with it.
    #[test]
    fn flags_environment_and_defaults() {
        for var in [
            "WATCH_NAMESPACE",
            "STREAMOPS_WORKER_IMAGE",
            "STREAMOPS_LEADER_ELECTION",
            "POD_NAMESPACE",
            "STREAMOPS_LAG_INTERVAL",
            "STREAMOPS_STATUS_PROGRESS_HOLD",
        ] {
            std::env::remove_var(var);
        }
        let r = run(&[]);
        assert_eq!(r.watch_namespace(), None);
        assert_eq!(r.worker_image, "ghcr.io/streamops/streamops-worker:0.1.0");
        assert!(r.leader_election());
        assert_eq!(r.lease_name, "streamops-operator");
        assert_eq!(r.lease_namespace, None);
        assert_eq!(r.metrics_listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(r.log_format, LogFormat::Json);
        assert_eq!(r.lag_interval, 30);
        assert_eq!(r.lag_status_interval, 15);
        assert_eq!(r.progress_hold(), crate::status::PROGRESS_HOLD);
        assert_eq!(
            run(&["--status-progress-hold", "0"]).progress_hold(),
            Duration::ZERO
        );

        let r = run(&[
            "--namespace",
            "team-a",
            "--worker-image",
            "w:2",
            "--no-leader-election",
            "--lease-name",
            "l",
            "--lease-namespace",
            "ops",
            "--metrics-listen",
            "127.0.0.1:9000",
            "--log-format",
            "text",
        ]);
        assert_eq!(r.watch_namespace(), Some("team-a"));
        assert_eq!(r.worker_image, "w:2");
        assert!(!r.leader_election());
        assert_eq!(r.lease_name, "l");
        assert_eq!(r.lease_namespace.as_deref(), Some("ops"));
        assert_eq!(r.log_format, LogFormat::Text);

        assert!(run(&["--leader-election"]).leader_election());
        assert!(!run(&["--leader-election=false"]).leader_election());
        assert!(run(&["--no-leader-election", "--leader-election"]).leader_election());

        std::env::set_var("WATCH_NAMESPACE", "team-b");
        std::env::set_var("STREAMOPS_WORKER_IMAGE", "w:3");
        std::env::set_var("STREAMOPS_LEADER_ELECTION", "false");
        std::env::set_var("POD_NAMESPACE", "streamops-system");
        std::env::set_var("STREAMOPS_LAG_INTERVAL", "60");
        std::env::set_var("STREAMOPS_STATUS_PROGRESS_HOLD", "2");
        let r = run(&[]);
        assert_eq!(r.lag_interval, 60);
        assert_eq!(r.progress_hold(), Duration::from_secs(2));
        assert_eq!(r.watch_namespace(), Some("team-b"));
        assert_eq!(r.worker_image, "w:3");
        assert!(!r.leader_election());
        assert_eq!(r.lease_namespace.as_deref(), Some("streamops-system"));
        assert!(
            run(&["--leader-election"]).leader_election(),
            "the flag beats the environment"
        );

        std::env::set_var("WATCH_NAMESPACE", "");
        assert_eq!(
            run(&[]).watch_namespace(),
            None,
            "empty means all namespaces"
        );
        for var in [
            "WATCH_NAMESPACE",
            "STREAMOPS_WORKER_IMAGE",
            "STREAMOPS_LEADER_ELECTION",
            "POD_NAMESPACE",
            "STREAMOPS_LAG_INTERVAL",
            "STREAMOPS_STATUS_PROGRESS_HOLD",
        ] {
            std::env::remove_var(var);
        }
    }

    #[test]
    fn policy_is_strict_unless_the_admin_loosens_it() {
        let p = run(&["--worker-image", "w:1"]).policy();
        assert_eq!(p, Policy::strict("w:1"));
        let r = run(&[
            "--worker-image",
            "w:1",
            "--allowed-worker-images",
            "w:2, registry.local/team/*,",
            "--job-triggers",
            "--job-service-accounts",
            "loader",
        ]);
        let p = r.policy();
        assert_eq!(p.allowed_images, ["w:2", "registry.local/team/*"]);
        assert!(p.job_triggers);
        assert_eq!(p.job_service_accounts, ["loader"]);
        assert_eq!(r.job_trigger_cluster_role, "streamops-job-trigger");
        assert!(!run(&["--job-triggers=false"]).policy().job_triggers);
    }

    #[test]
    fn broker_allow_list_and_worker_network_policy_flags() {
        let r = run(&[]);
        assert_eq!(r.broker_policy().unwrap(), BrokerPolicy::none());
        assert_eq!(r.worker_network(), None);
        let r = run(&[
            "--lag-brokers",
            r#"[{"name": "dev", "bootstrapServers": ["kafka:9092"]}]"#,
            "--worker-network-policy",
            "--worker-postgres-ports",
            "5432,6432",
        ]);
        assert!(r.broker_policy().unwrap().resolve("kafka:9092").is_ok());
        let n = r.worker_network().unwrap();
        assert_eq!(n.postgres_ports, [5432, 6432]);
        assert_eq!(n.redis_ports, [6379]);
        assert_eq!(n.api_server_ports, [443, 6443]);
        let bad = run(&["--lag-brokers", "[{\"name\": \"x\"}]"]);
        assert!(bad.broker_policy().is_err());
    }

    #[test]
    fn unknown_log_format_is_rejected() {
        assert!(Cli::try_parse_from(["streamops-operator", "run", "--log-format", "xml"]).is_err());
    }
}
