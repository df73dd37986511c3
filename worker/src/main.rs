//! `streamops-worker`: see `streamops_worker::cli`.

use std::process::ExitCode;

use clap::Parser;
use streamops_crds::config::stream_consumer_from_manifest;
use streamops_crds::{Handler, WorkerConfig};
use streamops_worker::cli::{Cli, Command, ProduceArgs, RunArgs, TopicAction};
use streamops_worker::generate::GenOptions;
use streamops_worker::handlers::fraud::FraudHandler;
use streamops_worker::handlers::moving_average::MovingAverageHandler;
use streamops_worker::handlers::pipeline_trigger::PipelineTriggerHandler;
use streamops_worker::handlers::sensor::SensorHandler;
use streamops_worker::kafka::KafkaClientSettings;
use streamops_worker::produce::{produce, ProduceOptions, DEFAULT_MESSAGE_TIMEOUT};
use streamops_worker::scorer::{self, ScorerArgs};
use streamops_worker::secrets::Secrets;
use streamops_worker::telemetry::{self, init_logging, LogFormat};
use streamops_worker::worker::{RunOptions, WorkerRuntime};
use streamops_worker::{admin, WorkerError};

mod replay_cmd;

fn read(path: &std::path::Path) -> Result<String, WorkerError> {
    std::fs::read_to_string(path).map_err(|source| WorkerError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn load_config(args: &RunArgs) -> Result<WorkerConfig, WorkerError> {
    load_config_from(args.spec.as_deref(), args.config.as_deref())
}

fn load_config_from(
    spec: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
) -> Result<WorkerConfig, WorkerError> {
    if let Some(spec) = spec {
        let sc = stream_consumer_from_manifest(&read(spec)?)
            .map_err(|e| WorkerError::Config(format!("{}: {e}", spec.display())))?;
        return WorkerConfig::from_resource(&sc)
            .map_err(|e| WorkerError::Config(format!("{}: {e}", spec.display())));
    }
    match config {
        Some(path) => WorkerConfig::from_yaml(&read(path)?)
            .map_err(|e| WorkerError::Config(format!("{}: {e}", path.display()))),
        None => Err(WorkerError::Config(
            "give --spec FILE or --config FILE (or set STREAMOPS_CONFIG)".into(),
        )),
    }
}

async fn run(args: RunArgs) -> Result<(), WorkerError> {
    let config = load_config(&args)?;
    // Logs, and OpenTelemetry trace export when OTEL_EXPORTER_OTLP_ENDPOINT asks for it.
    let telemetry = telemetry::init(args.log_format, config.log_level.as_str());
    let result = run_worker(args, config).await;
    // Spans buffered until now are exported before the process exits (SIGTERM path included).
    telemetry.shutdown().await;
    result
}

async fn run_worker(args: RunArgs, config: WorkerConfig) -> Result<(), WorkerError> {
    let secrets = Secrets::from_env(&config)?;
    let handler_spec = config.handler.clone();
    let writer_lanes = args.writer_lanes;
    let opts = RunOptions {
        config,
        secrets,
        instance_id: args.instance_id.filter(|s| !s.is_empty()),
        bootstrap_servers: args.bootstrap_servers,
        http_listen: args.http_listen,
    };
    let Some(rt) = WorkerRuntime::start(opts).await? else {
        tracing::info!("stopped before start-up completed");
        return Ok(());
    };
    let hctx = rt.handler_context();
    // Handler dispatch: one arm per kind.
    let totals = match &handler_spec {
        Handler::MovingAverage(s) => {
            // Windows are per partition, so partitions can be written in parallel lanes.
            let lanes = (0..writer_lanes.max(1))
                .map(|_| MovingAverageHandler::new(&hctx, s))
                .collect();
            rt.run_lanes(lanes).await?
        }
        Handler::Sensor(s) => rt.run(SensorHandler::new(&hctx, s)?).await?,
        Handler::Fraud(s) => rt.run(FraudHandler::new(&hctx, s)?).await?,
        Handler::PipelineTrigger(s) => rt.run(PipelineTriggerHandler::new(&hctx, s)?).await?,
    };
    tracing::info!(
        processed = totals.processed,
        rejected = totals.rejected,
        "worker stopped"
    );
    Ok(())
}

async fn produce_cmd(args: ProduceArgs) -> Result<(), WorkerError> {
    init_logging(LogFormat::Text, "warn");
    if !(0.0..=100.0).contains(&args.poison_percent) {
        return Err(WorkerError::Config(
            "--poison-percent must be between 0 and 100".into(),
        ));
    }
    let settings = KafkaClientSettings::plaintext(&args.bootstrap_servers);
    let opts = ProduceOptions {
        topic: args.topic,
        count: args.count,
        rate: args.rate,
        gen: GenOptions {
            kind: args.kind.into(),
            seed: args.seed,
            keys: args.keys,
            poison_percent: args.poison_percent,
            max_message_bytes: args.max_message_bytes,
        },
        message_timeout: DEFAULT_MESSAGE_TIMEOUT,
    };
    let summary = produce(&settings, &opts)
        .await
        .map_err(|e| WorkerError::Other(format!("produce: {e}")))?;
    println!("{summary}");
    if summary.failed > 0 {
        return Err(WorkerError::Other(format!(
            "{} messages were not delivered",
            summary.failed
        )));
    }
    Ok(())
}

async fn topic_cmd(action: TopicAction) -> Result<(), WorkerError> {
    init_logging(LogFormat::Text, "warn");
    let map = |e: admin::AdminError| WorkerError::Other(e.to_string());
    match action {
        TopicAction::Create {
            name,
            partitions,
            replication_factor,
            bootstrap_servers,
        } => {
            let settings = KafkaClientSettings::plaintext(bootstrap_servers);
            let created = admin::create_topic(&settings, &name, partitions, replication_factor)
                .await
                .map_err(map)?;
            println!(
                "topic {name} {}",
                if created { "created" } else { "already exists" }
            );
        }
        TopicAction::Delete {
            name,
            bootstrap_servers,
        } => {
            let settings = KafkaClientSettings::plaintext(bootstrap_servers);
            let deleted = admin::delete_topic(&settings, &name).await.map_err(map)?;
            println!(
                "topic {name} {}",
                if deleted { "deleted" } else { "did not exist" }
            );
        }
    }
    Ok(())
}

async fn scorer_cmd(args: ScorerArgs) -> Result<(), WorkerError> {
    init_logging(LogFormat::Text, "info");
    let shutdown = tokio_util::sync::CancellationToken::new();
    streamops_worker::worker::install_signal_handlers(
        shutdown.clone(),
        tokio_util::sync::CancellationToken::new(),
    );
    scorer::run(args, shutdown)
        .await
        .map_err(|e| WorkerError::Other(e.to_string()))
}

/// The worker's allocation pattern is a producer/consumer one: librdkafka's threads allocate
/// fetched messages, the poll loop copies them, the writer tasks (on other threads) free them.
/// glibc gives every thread that allocates its own arena (up to 8 per core) and rarely returns
/// their freed pages, so the same live heap costs far more resident memory. One arena keeps the
/// worker's peak RSS at about 44 MiB instead of about 62 MiB in `make bench`, with no measurable
/// loss of throughput on two cores (see DEVELOPERS.md, "Memory"). An operator-set
/// `MALLOC_ARENA_MAX` wins. Must run before any other thread exists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt only changes the allocator's tuning; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Produce(args) => produce_cmd(args).await,
            Command::Topic { action } => topic_cmd(action).await,
            Command::Scorer(args) => scorer_cmd(args).await,
            Command::Replay(args) => replay_cmd::replay(args).await,
            Command::Offsets(args) => replay_cmd::offsets(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ WorkerError::Wedged(_)) => {
            tracing::warn!(reason = %e, exit_code = e.exit_code(), "exiting to be restarted");
            // A consumer that did not drain may still be closing on a blocking thread: do not
            // wait for it (dropping the runtime would).
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
