//! Command-line interface of `streamops-worker`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use streamops_crds::HandlerKind;

use crate::telemetry::LogFormat;

/// The streamops worker: runs one StreamConsumer's handler, and tools to feed it.
#[derive(Debug, Parser)]
#[command(name = "streamops-worker", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume and process messages until SIGTERM/SIGINT (exit 0). Exits with 75 (EX_TEMPFAIL)
    /// after a graceful stop when the Kafka consumer is wedged: run it again.
    Run(RunArgs),
    /// Produce generated events (deterministic for a seed).
    Produce(ProduceArgs),
    /// Create or delete topics through the Kafka admin API.
    Topic {
        /// Action.
        #[command(subcommand)]
        action: TopicAction,
    },
    /// Replay: move the offsets of record back (earliest, a timestamp, or explicit offsets) and
    /// rebuild the handler's tables so that processing again gives those of an uninterrupted run.
    /// Refused while the consumer group has live members. Runs once per `--request-id`.
    Replay(ReplayArgs),
    /// List the offsets of record of the consumer group, per partition, with the broker's end
    /// offsets and the lag.
    Offsets(OffsetsArgs),
    /// Serve the reference fraud-scoring API (`POST /predict`, `GET /health`) until SIGTERM/SIGINT.
    Scorer(crate::scorer::ScorerArgs),
}

/// `run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A StreamConsumer manifest (may hold other documents, such as Secrets); the configuration is
    /// derived from it exactly as the operator derives it.
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    /// A rendered worker configuration (the operator's ConfigMap). Used when --spec is absent.
    #[arg(long, value_name = "FILE", env = "STREAMOPS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Static group membership id (`group.instance.id`).
    #[arg(long, env = "STREAMOPS_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Overrides the configured bootstrap servers (local runs).
    #[arg(long, value_name = "HOST:PORT")]
    pub bootstrap_servers: Option<String>,
    /// Overrides the configured HTTP listen address.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "STREAMOPS_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Parallel writer lanes (one database connection and transaction stream each), for handlers
    /// whose state is per partition (moving-average). Others always use one.
    #[arg(long, default_value_t = 2, env = "STREAMOPS_WRITER_LANES")]
    pub writer_lanes: usize,
}

/// Event shapes of `produce`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum KindArg {
    /// Price events.
    MovingAverage,
    /// Sensor readings.
    Sensor,
    /// Transactions.
    Fraud,
    /// Pipeline events.
    PipelineTrigger,
}

impl From<KindArg> for HandlerKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::MovingAverage => HandlerKind::MovingAverage,
            KindArg::Sensor => HandlerKind::Sensor,
            KindArg::Fraud => HandlerKind::Fraud,
            KindArg::PipelineTrigger => HandlerKind::PipelineTrigger,
        }
    }
}

/// `produce` arguments.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Bootstrap brokers.
    #[arg(long, value_name = "HOST:PORT")]
    pub bootstrap_servers: String,
    /// Target topic.
    #[arg(long)]
    pub topic: String,
    /// Event shape.
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// Messages to send.
    #[arg(long)]
    pub count: u64,
    /// Messages per second; 0 = unlimited.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Distinct keys (symbols, machines, accounts...).
    #[arg(long, default_value_t = 8)]
    pub keys: u32,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Percentage of malformed messages (0-100).
    #[arg(long, default_value_t = 0.0)]
    pub poison_percent: f64,
    /// The consumer's maxMessageBytes; oversized poison exceeds it by one byte.
    #[arg(long, default_value_t = 1_048_576)]
    pub max_message_bytes: usize,
}

/// `topic` actions.
#[derive(Debug, Subcommand)]
pub enum TopicAction {
    /// Create a topic (success if it exists).
    Create {
        /// Topic name.
        name: String,
        /// Partitions.
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// Replication factor.
        #[arg(long, default_value_t = 1)]
        replication_factor: i32,
        /// Bootstrap brokers.
        #[arg(long, value_name = "HOST:PORT")]
        bootstrap_servers: String,
    },
    /// Delete a topic (success if it does not exist).
    Delete {
        /// Topic name.
        name: String,
        /// Bootstrap brokers.
        #[arg(long, value_name = "HOST:PORT")]
        bootstrap_servers: String,
    },
}

/// Where the configuration comes from (`replay`, `offsets`).
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// A StreamConsumer manifest (as for `run --spec`).
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    /// A rendered worker configuration (as for `run --config`).
    #[arg(long, value_name = "FILE", env = "STREAMOPS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Overrides the configured bootstrap servers (local runs).
    #[arg(long, value_name = "HOST:PORT")]
    pub bootstrap_servers: Option<String>,
}

/// `replay` arguments: exactly one of `--to-earliest`, `--from-timestamp`, `--to-offsets`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to_earliest", "from_timestamp", "to_offsets"])))]
pub struct ReplayArgs {
    /// The configuration.
    #[command(flatten)]
    pub source: ConfigArgs,
    /// Every partition from the earliest offset the broker holds.
    #[arg(long)]
    pub to_earliest: bool,
    /// Every partition from its first message at or after this time: RFC 3339
    /// (`2024-03-20T10:30:00Z`) or milliseconds since the epoch.
    #[arg(long, value_name = "TIME")]
    pub from_timestamp: Option<String>,
    /// Explicit positions, `TOPIC:PARTITION=OFFSET` (repeat or separate with commas); other
    /// partitions keep their offsets of record.
    #[arg(long, value_name = "TOPIC:PARTITION=OFFSET", value_delimiter = ',')]
    pub to_offsets: Vec<crate::replay::PartitionOffset>,
    /// Identifies the request: a request id already applied changes nothing (default: a new id
    /// per invocation).
    #[arg(long, env = "STREAMOPS_REPLAY_ID")]
    pub request_id: Option<String>,
    /// Seconds to wait for the consumer group to empty before refusing (a stopped static member
    /// stays listed until its session times out).
    #[arg(long, default_value_t = 0)]
    pub wait_idle: u64,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "STREAMOPS_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// `offsets` arguments.
#[derive(Debug, Args)]
pub struct OffsetsArgs {
    /// The configuration.
    #[command(flatten)]
    pub source: ConfigArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Parses `--from-timestamp`: RFC 3339 or milliseconds since the epoch.
pub fn parse_timestamp(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.trim().parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("--from-timestamp {s:?}: neither RFC 3339 nor milliseconds ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_needs_exactly_one_target() {
        let base = ["streamops-worker", "replay", "--spec", "x.yaml"];
        assert!(Cli::try_parse_from(base).is_err());
        assert!(Cli::try_parse_from(base.iter().chain(&[
            "--to-earliest",
            "--from-timestamp",
            "1"
        ]))
        .is_err());
        let ok = Cli::try_parse_from(base.iter().chain(&["--to-offsets", "t:0=5,t:1=7"])).unwrap();
        match ok.command {
            Command::Replay(a) => assert_eq!(a.to_offsets.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn timestamps_are_rfc3339_or_milliseconds() {
        assert_eq!(parse_timestamp("1710930600000"), Ok(1_710_930_600_000));
        assert_eq!(
            parse_timestamp("2024-03-20T10:30:00Z"),
            Ok(1_710_930_600_000)
        );
        assert!(parse_timestamp("yesterday").is_err());
    }
}
