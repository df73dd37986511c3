//! `streamops-bench`: the measuring half of `scripts/bench.sh`.
//!
//! - `consume`: raw consume rate of a topic (fetch + copy of each value, no processing).
//! - `copy`: PostgreSQL binary COPY rate of the rows the handler would write for the same
//!   generated events (rows are prepared before the clock starts).
//! - `wait`: waits until a group's stored offsets cover N messages and reports the worker's
//!   sustained rate (first commit to last) and its peak RSS.
//! - `latency`: produce-to-committed-row latency (p50, p99) at fixed rates ([`latency`]).
//! - `rollout`: longest processing pause of any partition while the workers are replaced one at
//!   a time, per group-membership set-up ([`rollout`]).
//!
//! Each prints one `key=value` line that the script parses. To add a handler kind to `copy`,
//! add an arm to `copy_rows`.

#[path = "bench/latency.rs"]
mod latency;
#[path = "bench/rollout.rs"]
mod rollout;

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use streamops_crds::HandlerKind;
use streamops_worker::cli::KindArg;
use streamops_worker::copy::BinaryCopy;
use streamops_worker::generate::{GenOptions, Generator};
use streamops_worker::handlers::moving_average::{decode_price, Window};
use streamops_worker::kafka::KafkaClientSettings;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Raw consume rate.
    Consume {
        #[arg(long)]
        bootstrap_servers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        count: u64,
    },
    /// COPY rate of the handler's rows for the generated events.
    Copy {
        #[arg(long)]
        database_url: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 8)]
        keys: u32,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
    },
    /// Produce-to-committed-row latency at fixed rates, against a running worker.
    Latency(latency::LatencyArgs),
    /// Longest partition pause during a rolling replacement of the workers.
    Rollout(rollout::RolloutArgs),
    /// Rate of the reference fraud scorer alone under a bounded load loop.
    ScorerLoad(streamops_worker::scorer::load::LoadArgs),
    /// Worker rate from the offsets table.
    Wait {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        group: String,
        #[arg(long)]
        count: i64,
        /// Worker process id, for VmHWM.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

fn fail(msg: String) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}

async fn consume(bootstrap: &str, topic: &str, count: u64) {
    let consumer: StreamConsumer = KafkaClientSettings::plaintext(bootstrap)
        .base()
        .set("group.id", format!("bench-raw-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .set("queued.min.messages", "200000")
        .create()
        .unwrap_or_else(|e| fail(format!("consumer: {e}")));
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap_or_else(|e| fail(format!("metadata: {e}")));
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            let _ = tpl.add_partition_offset(topic, p.id(), Offset::Beginning);
        }
    }
    consumer
        .assign(&tpl)
        .unwrap_or_else(|e| fail(format!("assign: {e}")));
    let mut n = 0u64;
    let mut bytes = 0usize;
    let mut start = None;
    while n < count {
        match tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await {
            Ok(Ok(m)) => {
                start.get_or_insert_with(Instant::now);
                let v = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
                bytes += v.len();
                n += 1;
            }
            Ok(Err(e)) => fail(format!("consume: {e}")),
            Err(_) => fail(format!("only {n} of {count} messages arrived")),
        }
    }
    let secs = start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
    println!(
        "consumed={n} bytes={bytes} elapsed={secs:.3} rate={:.0}",
        n as f64 / secs.max(1e-9)
    );
}

/// The rows the handler writes for the events, as COPY buffers: (statement, rows).
fn copy_rows(
    kind: HandlerKind,
    opts: GenOptions,
    count: u64,
    partitions: i32,
) -> Vec<(&'static str, BinaryCopy)> {
    match kind {
        HandlerKind::MovingAverage => {
            let mut points = BinaryCopy::new(8);
            let mut avgs = BinaryCopy::new(7);
            let mut windows: std::collections::HashMap<String, Window> = Default::default();
            let mut offsets = vec![0i64; partitions.max(1) as usize];
            for g in Generator::new(opts).take(count as usize) {
                let Ok(p) = decode_price(&g.payload) else {
                    continue;
                };
                // Any stable key -> partition mapping will do for a load test.
                let part =
                    (g.key.bytes().map(u32::from).sum::<u32>() % offsets.len() as u32) as usize;
                let off = offsets[part];
                offsets[part] += 1;
                let avg = windows
                    .entry(p.symbol.clone())
                    .or_default()
                    .push(p.price, 5);
                points
                    .row()
                    .text("bench")
                    .int4(part as i32)
                    .text(&p.symbol)
                    .int8(off)
                    .float8(p.price)
                    .timestamptz(p.event_time)
                    .opt_text(p.source.as_deref())
                    .opt_text(p.raw_response_id.as_deref());
                if let Some(a) = avg {
                    avgs.row()
                        .text("bench")
                        .int4(part as i32)
                        .int8(off)
                        .text(&p.symbol)
                        .int4(5)
                        .float8(a)
                        .timestamptz(p.event_time);
                }
            }
            vec![
                ("COPY price_points (topic, partition, symbol, \"offset\", price, event_time, source, raw_response_id) FROM STDIN (FORMAT binary)", points),
                ("COPY moving_averages (topic, partition, \"offset\", symbol, window_size, average, event_time) FROM STDIN (FORMAT binary)", avgs),
            ]
        }
        HandlerKind::Sensor => sensor_rows(opts, count, partitions),
        HandlerKind::Fraud => fraud_rows(opts, count, partitions),
        HandlerKind::PipelineTrigger => pipeline_trigger_rows(count),
    }
}

/// A stable key -> partition mapping for the COPY rows (any will do for a load test).
fn bench_partition(key: &str, partitions: &mut [i64]) -> (i32, i64) {
    let part = (key.bytes().map(u32::from).sum::<u32>() % partitions.len() as u32) as usize;
    let off = partitions[part];
    partitions[part] += 1;
    (part as i32, off)
}

/// The sensor handler's rows (machines, failure episodes, readings), planned by its own state
/// machine.
fn sensor_rows(opts: GenOptions, count: u64, partitions: i32) -> Vec<(&'static str, BinaryCopy)> {
    use streamops_worker::handlers::sensor::{
        decode_reading, plan_batch, reading_row, READINGS_COPY,
    };
    use streamops_worker::handlers::{Decoded, Position};
    let topic: std::sync::Arc<str> = std::sync::Arc::from("bench");
    let mut offsets = vec![0i64; partitions.max(1) as usize];
    let items: Vec<_> = Generator::new(opts)
        .take(count as usize)
        .filter_map(|g| {
            let item = decode_reading(&g.payload).ok()?;
            let (partition, offset) = bench_partition(&g.key, &mut offsets);
            Some(Decoded {
                pos: Position {
                    topic: topic.clone(),
                    partition,
                    offset,
                },
                timestamp_ms: None,
                item,
            })
        })
        .collect();
    let plan = plan_batch(&mut Default::default(), &items);
    let mut machines = BinaryCopy::new(6);
    for (id, m) in &plan.machines {
        let Some(applied) = &m.last_applied else {
            continue;
        };
        machines
            .row()
            .text(id)
            .timestamptz(m.first_seen)
            .timestamptz(m.last_seen)
            .text(&applied.topic)
            .int4(applied.partition)
            .int8(applied.offset);
    }
    let mut failures = BinaryCopy::new(8);
    for f in &plan.failures {
        let mut row = failures.row();
        row.text(&f.id)
            .text(&f.machine_id)
            .timestamptz(f.started_at);
        match f.ended_at {
            Some(t) => row.timestamptz(t),
            None => row.null(),
        };
        row.bool(f.active())
            .text(&f.opened_by.topic)
            .int4(f.opened_by.partition)
            .int8(f.opened_by.offset);
    }
    let mut readings = BinaryCopy::new(9);
    for r in &plan.readings {
        reading_row(&mut readings, r);
    }
    vec![
        ("COPY machines (machine_id, first_seen, last_seen, applied_topic, applied_partition, applied_offset) FROM STDIN (FORMAT binary)", machines),
        ("COPY failures (failure_id, machine_id, started_at, ended_at, active, opened_topic, opened_partition, opened_offset) FROM STDIN (FORMAT binary)", failures),
        (READINGS_COPY, readings),
    ]
}

/// The fraud handler's rows: transactions and their predictions by the reference model.
fn fraud_rows(opts: GenOptions, count: u64, partitions: i32) -> Vec<(&'static str, BinaryCopy)> {
    use streamops_worker::handlers::fraud::{
        decode_transaction, prediction_row, transaction_row, PREDICTIONS_COPY, TRANSACTIONS_COPY,
    };
    use streamops_worker::handlers::Position;
    use streamops_worker::scorer::model;
    let now = chrono::Utc::now();
    let topic: std::sync::Arc<str> = std::sync::Arc::from("bench");
    let mut offsets = vec![0i64; partitions.max(1) as usize];
    let mut txs = BinaryCopy::new(12);
    let mut preds = BinaryCopy::new(5);
    for g in Generator::new(opts).take(count as usize) {
        let Ok(t) = decode_transaction(&g.payload, now) else {
            continue;
        };
        let (partition, offset) = bench_partition(&g.key, &mut offsets);
        let pos = Position {
            topic: topic.clone(),
            partition,
            offset,
        };
        transaction_row(&mut txs, &t, &pos);
        let score = model::score(&t.score_input());
        prediction_row(
            &mut preds,
            &t.transaction_id,
            score,
            0.8,
            model::MODEL_VERSION,
        );
    }
    vec![(TRANSACTIONS_COPY, txs), (PREDICTIONS_COPY, preds)]
}

/// `maxEvents` of the pipeline-trigger benchmark (scripts/bench.sh uses the same).
const PIPELINE_TRIGGER_MAX_EVENTS: u64 = 10_000;

/// The pipeline-trigger handler writes no per-event rows (events are counted in Redis): its rows
/// are one `pipeline_runs` row per `maxEvents` events.
fn pipeline_trigger_rows(count: u64) -> Vec<(&'static str, BinaryCopy)> {
    let mut runs = BinaryCopy::new(9);
    let now = chrono::Utc::now();
    for seq in 1..=(count / PIPELINE_TRIGGER_MAX_EVENTS) as i64 {
        runs.row()
            .text(&format!("bench:{seq}"))
            .text("bench")
            .text("bench")
            .int8(seq)
            .text("count")
            .int8(PIPELINE_TRIGGER_MAX_EVENTS as i64)
            .timestamptz(now)
            .timestamptz(now)
            .text("webhook");
    }
    vec![("COPY pipeline_runs (trigger_id, consumer_id, pipeline_name, seq, reason, event_count, window_start, window_end, target) FROM STDIN (FORMAT binary)", runs)]
}

async fn copy(url: &str, kind: HandlerKind, opts: GenOptions, count: u64, partitions: i32) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap_or_else(|e| fail(format!("database: {e}")));
    streamops_worker::db::MIGRATOR
        .run(&pool)
        .await
        .unwrap_or_else(|e| fail(format!("migrations: {e}")));
    let rows = copy_rows(kind, opts, count, partitions);
    let mut conn = pool.acquire().await.unwrap_or_else(|e| fail(e.to_string()));
    let start = Instant::now();
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .unwrap_or_else(|e| fail(e.to_string()));
    let mut loaded = 0;
    for (stmt, buf) in rows {
        loaded += buf
            .load(&mut tx, stmt)
            .await
            .unwrap_or_else(|e| fail(format!("copy: {e}")));
    }
    tx.commit().await.unwrap_or_else(|e| fail(e.to_string()));
    let secs = start.elapsed().as_secs_f64();
    println!(
        "messages={count} rows={loaded} elapsed={secs:.3} rate={:.0}",
        count as f64 / secs.max(1e-9)
    );
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn wait(url: &str, group: &str, count: i64, pid: Option<u32>, timeout: Duration) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap_or_else(|e| fail(format!("database: {e}")));
    let begin = Instant::now();
    let mut first: Option<(Instant, i64)> = None;
    loop {
        let n: i64 = sqlx::query_scalar::<_, Option<i64>>(
            "SELECT sum(next_offset)::int8 FROM streamops_offsets WHERE consumer_group = $1",
        )
        .bind(group)
        .fetch_one(&pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(0);
        let now = Instant::now();
        if n > 0 && first.is_none() {
            first = Some((now, n));
        }
        if n >= count {
            let (t1, n1) = first.unwrap_or((begin, 0));
            let secs = now.duration_since(t1).as_secs_f64();
            let rate = if secs > 0.0 {
                (n - n1) as f64 / secs
            } else {
                f64::NAN
            };
            let hwm = pid.and_then(vm_hwm_kb).unwrap_or(0);
            println!(
                "committed={n} first_seen={n1} elapsed={secs:.3} rate={rate:.0} vmhwm_kb={hwm}"
            );
            return;
        }
        if begin.elapsed() > timeout {
            fail(format!("only {n} of {count} messages committed"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    match Cli::parse().cmd {
        Cmd::Consume {
            bootstrap_servers,
            topic,
            count,
        } => consume(&bootstrap_servers, &topic, count).await,
        Cmd::Copy {
            database_url,
            kind,
            count,
            seed,
            keys,
            partitions,
        } => {
            let kind: HandlerKind = kind.into();
            let opts = GenOptions {
                kind,
                seed,
                keys,
                poison_percent: 0.0,
                max_message_bytes: 1 << 20,
            };
            copy(&database_url, kind, opts, count, partitions).await
        }
        Cmd::Latency(args) => latency::run(args),
        Cmd::Rollout(args) => rollout::run(args).await,
        Cmd::ScorerLoad(args) => {
            let r = streamops_worker::scorer::load::run(&args)
                .await
                .unwrap_or_else(|e| fail(e.to_string()));
            if r.failed_requests > 0 {
                fail(format!(
                    "{} of {} scoring requests failed",
                    r.failed_requests, args.requests
                ));
            }
            println!(
                "requests={} transactions={} elapsed={:.3} rate={:.0}",
                r.ok_requests, r.transactions, r.seconds, r.transactions_per_second
            );
        }
        Cmd::Wait {
            database_url,
            group,
            count,
            pid,
            timeout_secs,
        } => {
            wait(
                &database_url,
                &group,
                count,
                pid,
                Duration::from_secs(timeout_secs),
            )
            .await
        }
    }
}
