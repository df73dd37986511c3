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
    /// Consume and process messages until SIGTERM/SIGINT.
    Run(RunArgs),
    /// Produce generated events (deterministic for a seed).
    Produce(ProduceArgs),
    /// Create or delete topics through the Kafka admin API.
    Topic {
        /// Action.
        #[command(subcommand)]
        action: TopicAction,
    },
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
