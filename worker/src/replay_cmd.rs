//! `streamops-worker replay` and `streamops-worker offsets`.

use std::time::Duration;

use streamops_crds::WorkerConfig;
use streamops_worker::cli::{parse_timestamp, ConfigArgs, OffsetsArgs, ReplayArgs};
use streamops_worker::kafka::KafkaClientSettings;
use streamops_worker::replay::{self, ReplayRequest, ReplayTarget};
use streamops_worker::secrets::Secrets;
use streamops_worker::telemetry::{init_logging, LogFormat};
use streamops_worker::WorkerError;

fn config_of(source: &ConfigArgs) -> Result<WorkerConfig, WorkerError> {
    let mut config = super::load_config_from(source.spec.as_deref(), source.config.as_deref())?;
    if let Some(b) = &source.bootstrap_servers {
        config.kafka.bootstrap_servers = b.clone();
    }
    Ok(config)
}

async fn connect(secrets: &Secrets) -> Result<sqlx::PgPool, WorkerError> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(15))
        .connect(&secrets.database_url)
        .await?;
    streamops_worker::db::MIGRATOR.run(&pool).await?;
    Ok(pool)
}

fn other(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Other(e.to_string())
}

pub async fn replay(args: ReplayArgs) -> Result<(), WorkerError> {
    let config = config_of(&args.source)?;
    init_logging(args.log_format, config.log_level.as_str());
    let target = if args.to_earliest {
        ReplayTarget::Earliest
    } else if let Some(t) = &args.from_timestamp {
        ReplayTarget::Timestamp(parse_timestamp(t).map_err(WorkerError::Config)?)
    } else {
        ReplayTarget::Offsets(args.to_offsets.clone())
    };
    let secrets = Secrets::from_env(&config)?;
    let kafka = KafkaClientSettings::from_config(&config.kafka, secrets.sasl.clone());
    let pool = connect(&secrets).await?;
    let request_id = args.request_id.clone().unwrap_or_else(|| {
        format!(
            "cli-{}-{:08x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            rand::random::<u32>()
        )
    });
    let outcome = replay::run(ReplayRequest {
        config: &config,
        kafka: &kafka,
        pool: &pool,
        redis_url: secrets.redis_url.as_deref(),
        request_id: &request_id,
        target: &target,
        wait_idle: Duration::from_secs(args.wait_idle),
    })
    .await
    .map_err(other)?;
    println!("{}", serde_json::to_string(&outcome).map_err(other)?);
    Ok(())
}

pub async fn offsets(args: OffsetsArgs) -> Result<(), WorkerError> {
    init_logging(LogFormat::Text, "warn");
    let config = config_of(&args.source)?;
    let secrets = Secrets::from_env(&config)?;
    let kafka = KafkaClientSettings::from_config(&config.kafka, secrets.sasl.clone());
    let pool = connect(&secrets).await?;
    let rows = replay::offsets_with_ends(&pool, &kafka, &config)
        .await
        .map_err(other)?;
    if args.json {
        println!("{}", serde_json::to_string(&rows).map_err(other)?);
        return Ok(());
    }
    println!(
        "{:<40} {:>9} {:>14} {:>14} {:>10}",
        "TOPIC", "PARTITION", "STORED", "END", "LAG"
    );
    for r in rows {
        let show = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "{:<40} {:>9} {:>14} {:>14} {:>10}",
            r.topic,
            r.partition,
            show(r.stored),
            show(r.end),
            show(r.lag)
        );
    }
    Ok(())
}
