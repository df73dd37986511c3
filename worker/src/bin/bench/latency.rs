//! `streamops-bench latency`: end-to-end latency from produce to committed row, at fixed rates,
//! against a running worker.
//!
//! Each message's clock starts when it is handed to the producer (the project's batching
//! producer, `linger.ms=5`, acks=all). It stops when a sample of `streamops_offsets` (moved in
//! the same transaction as the rows) shows its partition's `next_offset` past the message's
//! offset; the offsets are sampled every `poll_ms`, so a figure is late by at most that (the
//! longest pause between two samples is printed: a slow sample makes it longer). Each rate runs
//! `warmup_secs` (not counted), then `seconds` measured. Printed beside the figures: the
//! broker's acknowledgement time of the same messages (produce to ack), the part of the
//! latency that happens before the worker can fetch them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use streamops_crds::HandlerKind;
use streamops_worker::generate::{GenOptions, Generator};
use streamops_worker::kafka::KafkaClientSettings;

/// `latency` arguments.
#[derive(clap::Args, Debug)]
pub struct LatencyArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// Topic the worker consumes (moving-average events).
    #[arg(long)]
    pub topic: String,
    /// The worker's database.
    #[arg(long)]
    pub database_url: String,
    /// The worker's consumer group.
    #[arg(long)]
    pub group: String,
    /// Rates to measure, in messages per second, in order.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pub rates: Vec<u64>,
    /// Measured seconds per rate.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Unmeasured seconds before each rate.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Sampling period of the stored offsets, in milliseconds.
    #[arg(long, default_value_t = 2)]
    pub poll_ms: u64,
}

fn fail(msg: String) -> ! {
    eprintln!("error: latency: {msg}");
    std::process::exit(1)
}

/// Per partition, the sampled advances of `next_offset`: (next_offset, seen at), increasing.
type Advances = HashMap<i32, Vec<(i64, Instant)>>;

async fn sample(
    pool: PgPool,
    group: String,
    poll: Duration,
    seen: Arc<Mutex<Advances>>,
    samples: Arc<Mutex<Vec<Instant>>>,
) {
    let mut last: HashMap<i32, i64> = HashMap::new();
    loop {
        let rows: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, next_offset FROM streamops_offsets WHERE consumer_group = $1",
        )
        .bind(&group)
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        let now = Instant::now();
        if let Ok(mut v) = samples.lock() {
            v.push(now);
        }
        if let Ok(mut s) = seen.lock() {
            for (p, next) in rows {
                if last.get(&p).is_none_or(|l| next > *l) {
                    last.insert(p, next);
                    s.entry(p).or_default().push((next, now));
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// When the message at `offset` was first seen committed.
fn committed_at(advances: &[(i64, Instant)], offset: i64) -> Option<Instant> {
    let i = advances.partition_point(|(next, _)| *next <= offset);
    advances.get(i).map(|(_, t)| *t)
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Produces `count` messages at `rate`; returns (partition, offset, handed-over instant,
/// acknowledged instant) of each delivered message. An acknowledgement is seen at the next send
/// at the latest (within 1/`rate`).
async fn produce(
    producer: &rdkafka::producer::FutureProducer,
    gen: &mut Generator,
    topic: &str,
    rate: u64,
    count: u64,
) -> Vec<(i32, i64, Instant, Instant)> {
    use futures::StreamExt;
    let start = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let Some(g) = gen.next() else { break };
        let record = FutureRecord::to(topic)
            .key(g.key.as_bytes())
            .payload(g.payload.as_slice());
        let sent = Instant::now();
        match producer.send_result(record) {
            Ok(f) => inflight.push(async move { (f.await, sent, Instant::now()) }),
            Err((e, _)) => fail(format!("cannot enqueue: {e}")),
        }
        while let Some(Some((r, sent, acked))) = futures::FutureExt::now_or_never(inflight.next()) {
            match r {
                Ok(Ok(d)) => out.push((d.partition, d.offset, sent, acked)),
                other => fail(format!("delivery failed: {other:?}")),
            }
        }
    }
    while let Some((r, sent, acked)) = inflight.next().await {
        match r {
            Ok(Ok(d)) => out.push((d.partition, d.offset, sent, acked)),
            other => fail(format!("delivery failed: {other:?}")),
        }
    }
    out
}

/// Measures every rate; prints one line per rate.
pub async fn run(args: LatencyArgs) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await
        .unwrap_or_else(|e| fail(format!("database: {e}")));
    let seen: Arc<Mutex<Advances>> = Arc::default();
    let samples: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sampler = tokio::spawn(sample(
        pool.clone(),
        args.group.clone(),
        Duration::from_millis(args.poll_ms.max(1)),
        seen.clone(),
        samples.clone(),
    ));
    let settings = KafkaClientSettings::plaintext(&args.bootstrap_servers);
    let producer = streamops_worker::produce::producer(&settings, 1 << 20)
        .unwrap_or_else(|e| fail(format!("producer: {e}")));
    let mut gen = Generator::new(GenOptions {
        kind: HandlerKind::MovingAverage,
        seed: 11,
        keys: 16,
        poison_percent: 0.0,
        max_message_bytes: 1 << 20,
    });
    for &rate in &args.rates {
        let rate = rate.max(1);
        produce(
            &producer,
            &mut gen,
            &args.topic,
            rate,
            rate * args.warmup_secs,
        )
        .await;
        let t0 = Instant::now();
        if let Ok(mut v) = samples.lock() {
            v.clear();
        }
        let sent = produce(&producer, &mut gen, &args.topic, rate, rate * args.seconds).await;
        let produced_secs = t0.elapsed().as_secs_f64();
        // Wait until every measured message is committed.
        let patience = Instant::now() + Duration::from_secs(120);
        let mut latencies: Vec<Duration>;
        loop {
            let missing;
            {
                let s = seen.lock().unwrap_or_else(|e| e.into_inner());
                latencies = Vec::with_capacity(sent.len());
                let mut m = 0usize;
                for (p, offset, at, _) in &sent {
                    match s.get(p).and_then(|a| committed_at(a, *offset)) {
                        Some(t) => latencies.push(t.saturating_duration_since(*at)),
                        None => m += 1,
                    }
                }
                missing = m;
            }
            if missing == 0 {
                break;
            }
            if Instant::now() > patience {
                fail(format!(
                    "{missing} of {} messages at {rate} msg/s not committed after 120 s",
                    sent.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        latencies.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        // What the figure cannot blame on the worker: the broker's acknowledgement of each
        // message (the worker cannot fetch a message before the broker appended it), and the
        // longest pause between two samples of the offsets (a commit is seen that late).
        let mut acks: Vec<Duration> = sent
            .iter()
            .map(|(_, _, at, acked)| acked.saturating_duration_since(*at))
            .collect();
        acks.sort_unstable();
        let gap_max = samples
            .lock()
            .map(|v| {
                v.windows(2)
                    .map(|w| w[1].saturating_duration_since(w[0]))
                    .max()
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        println!(
            "rate={rate} achieved_rate={:.0} messages={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} \
             ack_p50_ms={:.1} ack_p99_ms={:.1} sample_gap_max_ms={:.1}",
            sent.len() as f64 / produced_secs.max(1e-9),
            latencies.len(),
            ms(quantile(&latencies, 0.50)),
            ms(quantile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
            ms(quantile(&acks, 0.50)),
            ms(quantile(&acks, 0.99)),
            ms(gap_max),
        );
    }
    sampler.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_committed_at_the_first_advance_past_its_offset() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let adv = vec![(5, at(10)), (9, at(20)), (12, at(30))];
        assert_eq!(committed_at(&adv, 0), Some(at(10)));
        assert_eq!(committed_at(&adv, 4), Some(at(10)));
        assert_eq!(committed_at(&adv, 5), Some(at(20)));
        assert_eq!(committed_at(&adv, 11), Some(at(30)));
        assert_eq!(committed_at(&adv, 12), None);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
