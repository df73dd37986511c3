//! `streamops-demo`: the helper behind `make demo`. `info` reads names out of a StreamConsumer
//! manifest; `report` prints what each handler produced, read back from PostgreSQL, Redis and the
//! error topics.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use streamops_crds::config::{stream_consumer_from_manifest, Handler, WorkerConfig};

#[derive(Parser)]
#[command(name = "streamops-demo", about = "Helpers of the local demo")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Field {
    Topic,
    ErrorTopic,
    Group,
    Name,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prints one name from a StreamConsumer manifest.
    Info {
        #[arg(long)]
        spec: PathBuf,
        #[arg(long, value_enum)]
        field: Field,
    },
    /// Prints what each StreamConsumer produced.
    Report {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        redis_url: String,
        #[arg(long)]
        bootstrap_servers: String,
        #[arg(long = "spec")]
        specs: Vec<PathBuf>,
        /// JSON lines written by the demo's webhook receiver.
        #[arg(long)]
        webhooks: Option<PathBuf>,
    },
}

fn load(path: &PathBuf) -> Result<WorkerConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let sc = stream_consumer_from_manifest(&text)?;
    Ok(WorkerConfig::from_resource(&sc)?)
}

/// Counts the messages of a topic and their `streamops.error.reason` headers, reading from the
/// start until nothing arrives for two seconds.
fn error_topic_reasons(bootstrap: &str, topic: &str) -> Result<(u64, BTreeMap<String, u64>)> {
    use rdkafka::message::Headers;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "streamops-demo-report")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let mut count = 0;
    let mut reasons = BTreeMap::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(2) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last = Instant::now();
                count += 1;
                let reason = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == "streamops.error.reason")
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                    .unwrap_or_else(|| "(no reason header)".into());
                *reasons.entry(reason).or_default() += 1;
            }
            Some(Err(e)) => anyhow::bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    Ok((count, reasons))
}

async fn scalar(pool: &PgPool, sql: &str) -> Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await?)
}

async fn rejected(pool: &PgPool, group: &str) -> Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM streamops_rejections WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await?)
}

async fn report_one(
    pool: &PgPool,
    redis_url: &str,
    bootstrap: &str,
    cfg: &WorkerConfig,
    webhooks: Option<&PathBuf>,
) -> Result<()> {
    let kind = cfg.handler.kind();
    println!(
        "== {} ({kind}) — topics {}",
        cfg.consumer_id,
        cfg.kafka.topics.join(",")
    );
    let consumed: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(next_offset), 0)::BIGINT FROM streamops_offsets WHERE consumer_group = $1",
    )
    .bind(&cfg.kafka.group_id)
    .fetch_one(pool)
    .await?;
    let rejected = rejected(pool, &cfg.kafka.group_id).await?;
    match &cfg.handler {
        Handler::MovingAverage(s) => {
            let rows: Vec<(String, f64, Option<f64>, i64)> = sqlx::query_as(
                "SELECT p.symbol,
                        (SELECT price FROM price_points q WHERE q.symbol = p.symbol ORDER BY event_time DESC, \"offset\" DESC LIMIT 1),
                        (SELECT average FROM moving_averages m WHERE m.symbol = p.symbol ORDER BY event_time DESC, \"offset\" DESC LIMIT 1),
                        count(*)
                 FROM price_points p GROUP BY p.symbol ORDER BY p.symbol",
            )
            .fetch_all(pool)
            .await?;
            println!(
                "   {:<8} {:>12} {:>16} {:>8}",
                "symbol",
                "last price",
                format!("{}-pt average", s.window),
                "points"
            );
            for (symbol, price, avg, n) in rows {
                let avg = avg.map(|a| format!("{a:.4}")).unwrap_or_else(|| "-".into());
                println!("   {symbol:<8} {price:>12.2} {avg:>16} {n:>8}");
            }
            let averages = scalar(pool, "SELECT count(*) FROM moving_averages").await?;
            println!("   messages consumed {consumed}, price points stored {}, averages {averages}, rejected {rejected}",
                scalar(pool, "SELECT count(*) FROM price_points").await?);
        }
        Handler::Sensor(_) => {
            let (machines, readings, open, closed, late): (i64, i64, i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM machines), (SELECT count(*) FROM sensor_readings),
                        (SELECT count(*) FROM failures WHERE active), (SELECT count(*) FROM failures WHERE NOT active),
                        (SELECT count(*) FROM sensor_readings WHERE late)",
            )
            .fetch_one(pool)
            .await?;
            println!("   machines {machines}, readings {readings} ({late} late), failure episodes: {closed} closed, {open} open");
            let worst: Vec<(String, i64, i64)> = sqlx::query_as(
                "SELECT f.machine_id, count(*), COALESCE(SUM((SELECT count(*) FROM sensor_readings r WHERE r.failure_id = f.failure_id)), 0)::BIGINT
                 FROM failures f GROUP BY f.machine_id ORDER BY count(*) DESC, f.machine_id LIMIT 5",
            )
            .fetch_all(pool)
            .await?;
            for (m, episodes, failing) in worst {
                println!("   {m:<8} {episodes:>4} episodes, {failing:>5} readings during failures");
            }
            println!("   messages consumed {consumed}, rejected {rejected}");
        }
        Handler::Fraud(f) => {
            let (tx, fraud, avg): (i64, i64, Option<f64>) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM transactions), (SELECT count(*) FROM predictions WHERE is_fraud),
                        (SELECT avg(fraud_score) FROM predictions)",
            )
            .fetch_one(pool)
            .await?;
            println!(
                "   transactions scored {tx}: {fraud} flagged as fraud (score >= {}), mean score {:.3}",
                f.fraud_threshold,
                avg.unwrap_or(0.0)
            );
            println!("   messages consumed {consumed}, rejected {rejected}");
        }
        Handler::PipelineTrigger(p) => {
            let client = redis::Client::open(redis_url)?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            let state_key = format!("consumer:{{{}}}:state", cfg.consumer_id);
            let events_key = format!("consumer:{{{}}}:events", cfg.consumer_id);
            let total: Option<i64> = redis::cmd("HGET")
                .arg(&state_key)
                .arg("events_total")
                .query_async(&mut conn)
                .await?;
            let window: Option<i64> = redis::cmd("GET")
                .arg(&events_key)
                .query_async(&mut conn)
                .await?;
            let runs: Vec<(i64, String, i64, String)> = sqlx::query_as(
                "SELECT seq, reason, event_count, status FROM pipeline_runs ORDER BY seq",
            )
            .fetch_all(pool)
            .await?;
            println!(
                "   events counted {} (in the open window: {}), thresholds: {} events or {} s",
                total.unwrap_or(0),
                window.unwrap_or(0),
                p.max_events,
                p.max_time_seconds
            );
            let delivered = runs.iter().filter(|r| r.3 == "delivered").count();
            println!(
                "   triggers of {}: {} ({} delivered)",
                p.pipeline_name,
                runs.len(),
                delivered
            );
            for (seq, reason, count, status) in runs.iter().take(5) {
                println!("   #{seq:<3} {reason:<5} {count:>6} events  {status}");
            }
            if runs.len() > 5 {
                println!("   ...");
            }
            if let Some(path) = webhooks {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let mut keys: Vec<String> = text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter_map(|v| {
                        v.get("_idempotency_key")
                            .and_then(|k| k.as_str())
                            .map(str::to_string)
                    })
                    .collect();
                let calls = keys.len();
                keys.sort();
                keys.dedup();
                println!(
                    "   webhook receiver: {calls} calls, {} distinct idempotency keys",
                    keys.len()
                );
            }
            println!("   messages consumed {consumed}, rejected {rejected}");
        }
    }
    let (bs, topic) = (bootstrap.to_string(), cfg.error_topic.clone());
    let (count, reasons) =
        tokio::task::spawn_blocking(move || error_topic_reasons(&bs, &topic)).await??;
    let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    println!(
        "   error topic {}: {count} messages ({})",
        cfg.error_topic,
        reasons.join(", ")
    );
    println!();
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Info { spec, field } => {
            let cfg = load(&spec)?;
            let v = match field {
                Field::Topic => cfg.kafka.topics.join(","),
                Field::ErrorTopic => cfg.error_topic,
                Field::Group => cfg.kafka.group_id,
                Field::Name => cfg.consumer_id,
            };
            println!("{v}");
        }
        Cmd::Report {
            database_url,
            redis_url,
            bootstrap_servers,
            specs,
            webhooks,
        } => {
            let pool = PgPoolOptions::new()
                .max_connections(2)
                .connect(&database_url)
                .await?;
            for spec in &specs {
                let cfg = load(spec)?;
                report_one(
                    &pool,
                    &redis_url,
                    &bootstrap_servers,
                    &cfg,
                    webhooks.as_ref(),
                )
                .await?;
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamops-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
