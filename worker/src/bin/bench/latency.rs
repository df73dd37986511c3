//! `streamops-bench latency`: end-to-end latency from produce to committed row, at fixed rates,
//! against a running worker.
//!
//! Each message's clock starts when it is handed to the producer (the settings of the project's
//! producer, `streamops_worker::produce::producer`: acks=all, idempotence, snappy,
//! `linger.ms=5`; see `streamops_worker::produce::producer_config`). It stops when a sample of `streamops_offsets` (moved in the same transaction
//! as the rows) shows its partition's `next_offset` past the message's offset.
//!
//! The tool is built to stay out of the way of what it measures (on a small machine the old
//! one, a future per message, used as much CPU as the broker):
//! - the payloads of a rate are generated before its clock starts;
//! - sends are paced in bursts: every `tick_ms` the loop hands over every message that is due
//!   (message `i` is due `i / rate` s after the start), then sleeps;
//! - a `ThreadedProducer` reports each delivery to a callback, which records partition, offset
//!   and the acknowledgement instant; the send instant travels in the delivery opaque;
//! - the offsets are sampled every `poll_ms` by a thread of its own (with its own
//!   current-thread runtime and connection), so a busy producer loop cannot delay a sample. A
//!   figure is late by at most the gap between two samples; the longest gap is printed.
//!
//! Per rate: `warmup_secs` unmeasured (before the first rate, `first_warmup_secs` at
//! `first_warmup_rate` instead, for a freshly started broker whose JIT is still cold), then
//! `rounds` back-to-back rounds of `seconds` each. One line per round, then one line with the
//! median of each column over the rounds (`round=median`). Beside the latency: the broker's
//! acknowledgement time of the same messages (produce to ack, the part the worker cannot beat),
//! the longest lateness of a send behind its schedule, and the CPU the tool itself used in the
//! round (whole process, and the sampler thread alone; 100 = one core).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use sqlx::postgres::PgPoolOptions;
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
    /// Measured seconds per round.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Measured rounds per rate (back to back); the median over them is printed too.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Unmeasured seconds before each rate but the first.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Unmeasured seconds before the first rate (a freshly started broker is slow for its first
    /// minutes).
    #[arg(long, default_value_t = 120)]
    pub first_warmup_secs: u64,
    /// Rate of the first warm-up, in messages per second.
    #[arg(long, default_value_t = 10000)]
    pub first_warmup_rate: u64,
    /// Sampling period of the stored offsets, in milliseconds.
    #[arg(long, default_value_t = 2)]
    pub poll_ms: u64,
    /// Pacing period of the sends, in milliseconds.
    #[arg(long, default_value_t = 1)]
    pub tick_ms: u64,
}

fn fail(msg: String) -> ! {
    eprintln!("error: latency: {msg}");
    std::process::exit(1)
}

/// Per partition, the sampled advances of `next_offset`: (next_offset, seen at), increasing.
type Advances = HashMap<i32, Vec<(i64, Instant)>>;

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

/// The median of `values` (the mean of the two middle ones for an even count; 0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How many of `count` messages are due `elapsed` after the start at `rate` msg/s: message `i`
/// is due at `i / rate` s, so the first one at once.
pub fn due(elapsed: Duration, rate: u64, count: u64) -> u64 {
    let n = elapsed.as_nanos() * u128::from(rate) / 1_000_000_000 + 1;
    n.min(u128::from(count)) as u64
}

/// When message `i` is due, after the start, at `rate` msg/s.
pub fn due_at(i: u64, rate: u64) -> Duration {
    Duration::from_nanos((u128::from(i) * 1_000_000_000 / u128::from(rate.max(1))) as u64)
}

/// The delivery opaque: the round (0 = warm-up) in the top 16 bits, the send instant in
/// microseconds after the tool's base instant in the low 48 (8.9 years).
pub fn pack(round: u16, sent_us: u64) -> usize {
    ((u64::from(round) << 48) | (sent_us & ((1 << 48) - 1))) as usize
}

/// The inverse of [`pack`].
pub fn unpack(opaque: usize) -> (u16, u64) {
    let v = opaque as u64;
    ((v >> 48) as u16, v & ((1 << 48) - 1))
}

/// The longest gap between two consecutive samples (sorted instants) that overlaps `[from, to]`.
pub fn gap_max(samples: &[Instant], from: Instant, to: Instant) -> Duration {
    samples
        .windows(2)
        .filter(|w| w[1] > from && w[0] < to)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default()
}

/// One acknowledged message of a measured round.
#[derive(Clone, Copy, Debug)]
struct Delivery {
    round: u16,
    partition: i32,
    offset: i64,
    sent_us: u64,
    acked_us: u64,
}

/// The producer's context: records every acknowledged message of a measured round.
struct DeliveryLog {
    base: Instant,
    log: Mutex<Vec<Delivery>>,
    failed: Mutex<Option<String>>,
}

impl ClientContext for DeliveryLog {}

impl ProducerContext for DeliveryLog {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let acked_us = self.base.elapsed().as_micros() as u64;
        let (round, sent_us) = unpack(opaque);
        match result {
            Ok(m) if round > 0 => {
                if let Ok(mut log) = self.log.lock() {
                    log.push(Delivery {
                        round,
                        partition: m.partition(),
                        offset: m.offset(),
                        sent_us,
                        acked_us,
                    });
                }
            }
            Ok(_) => {}
            Err((e, _)) => {
                if let Ok(mut f) = self.failed.lock() {
                    f.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

type LatencyProducer = ThreadedProducer<DeliveryLog>;

/// The generated messages of a rate, in one buffer: (start, end of key, end of payload).
struct Messages {
    bytes: Vec<u8>,
    spans: Vec<(usize, usize, usize)>,
}

impl Messages {
    fn generate(gen: &mut Generator, count: usize) -> Self {
        let mut bytes = Vec::new();
        let mut spans = Vec::with_capacity(count);
        for g in gen.by_ref().take(count.max(1)) {
            let start = bytes.len();
            bytes.extend_from_slice(g.key.as_bytes());
            let key_end = bytes.len();
            bytes.extend_from_slice(&g.payload);
            spans.push((start, key_end, bytes.len()));
        }
        Messages { bytes, spans }
    }

    /// Message `i`, cycling: (key, payload).
    fn get(&self, i: u64) -> (&[u8], &[u8]) {
        let (s, k, e) = self.spans[(i % self.spans.len() as u64) as usize];
        (&self.bytes[s..k], &self.bytes[k..e])
    }
}

/// CPU time (user + system) of the process or of the calling thread.
fn cpu_time(thread: bool) -> Duration {
    #[cfg(target_os = "linux")]
    let who = if thread {
        libc::RUSAGE_THREAD
    } else {
        libc::RUSAGE_SELF
    };
    #[cfg(not(target_os = "linux"))]
    let who = {
        if thread {
            return Duration::ZERO;
        }
        libc::RUSAGE_SELF
    };
    // SAFETY: getrusage only writes the struct it is given, which lives on this stack frame.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What the sampler thread shares.
#[derive(Default)]
struct Sampled {
    advances: Mutex<Advances>,
    /// Instants of the samples taken.
    samples: Mutex<Vec<Instant>>,
    /// The sampler thread's CPU time so far, in microseconds.
    cpu_us: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// Samples the group's stored offsets every `poll` on a thread of its own, until `stop`.
fn spawn_sampler(
    url: String,
    group: String,
    poll: Duration,
    shared: Arc<Sampled>,
) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let handle = std::thread::Builder::new()
        .name("offsets-sampler".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("sampler runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let pool = match PgPoolOptions::new().max_connections(1).connect(&url).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("database: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let mut last: HashMap<i32, i64> = HashMap::new();
                while !shared.stop.load(Ordering::Relaxed) {
                    let rows: Result<Vec<(i32, i64)>, _> = sqlx::query_as(
                        "SELECT partition, next_offset FROM streamops_offsets \
                         WHERE consumer_group = $1",
                    )
                    .bind(&group)
                    .fetch_all(&pool)
                    .await;
                    let now = Instant::now();
                    match rows {
                        Ok(rows) => {
                            if let Ok(mut v) = shared.samples.lock() {
                                v.push(now);
                            }
                            let mut a = shared.advances.lock().unwrap_or_else(|e| e.into_inner());
                            for (p, next) in rows {
                                if last.get(&p).is_none_or(|l| next > *l) {
                                    last.insert(p, next);
                                    a.entry(p).or_default().push((next, now));
                                }
                            }
                        }
                        Err(_) => {
                            shared.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    shared
                        .cpu_us
                        .store(cpu_time(true).as_micros() as u64, Ordering::Relaxed);
                    tokio::time::sleep(poll).await;
                }
            });
        })
        .unwrap_or_else(|e| fail(format!("sampler thread: {e}")));
    match ready_rx.recv() {
        Ok(Ok(())) => handle,
        Ok(Err(e)) => fail(e),
        Err(_) => fail("the sampler thread ended before connecting".into()),
    }
}

/// A round's sending side.
struct Sent {
    count: u64,
    start: Instant,
    end: Instant,
    lag_max: Duration,
    cpu: Duration,
    sampler_cpu: Duration,
}

/// Sends `count` messages at `rate`, tagged with `round`, in bursts every `tick`.
fn pace(
    producer: &LatencyProducer,
    topic: &str,
    messages: &Messages,
    first: u64,
    (rate, count, round): (u64, u64, u16),
    tick: Duration,
    sampled: &Sampled,
) -> Sent {
    let base = producer.context().base;
    let cpu0 = cpu_time(false);
    let sampler0 = sampled.cpu_us.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut lag_max = Duration::ZERO;
    while sent < count {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(start);
        let due = due(elapsed, rate, count);
        if due > sent {
            lag_max = lag_max.max(elapsed.saturating_sub(due_at(sent, rate)));
        }
        while sent < due {
            let (key, payload) = messages.get(first + sent);
            let opaque = pack(round, base.elapsed().as_micros() as u64);
            let record = BaseRecord::with_opaque_to(topic, opaque)
                .key(key)
                .payload(payload);
            if let Err((e, _)) = producer.send(record) {
                fail(format!("cannot enqueue: {e}"));
            }
            sent += 1;
        }
        if sent >= count {
            break;
        }
        let wake = (start + due_at(sent, rate)).max(now + tick);
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
    let sampler1 = sampled.cpu_us.load(Ordering::Relaxed);
    Sent {
        count: sent,
        start,
        end: Instant::now(),
        lag_max,
        cpu: cpu_time(false).saturating_sub(cpu0),
        sampler_cpu: Duration::from_micros(sampler1.saturating_sub(sampler0)),
    }
}

/// One printed line of figures, in milliseconds unless named otherwise.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    achieved_rate: f64,
    messages: f64,
    p50: f64,
    p99: f64,
    max: f64,
    ack_p50: f64,
    ack_p99: f64,
    sample_gap_max: f64,
    send_lag_max: f64,
    tool_cpu_pct: f64,
    sampler_cpu_pct: f64,
}

impl Figures {
    fn print(&self, rate: u64, round: &str) {
        println!(
            "rate={rate} round={round} achieved_rate={:.0} messages={:.0} p50_ms={:.1} \
             p99_ms={:.1} max_ms={:.1} ack_p50_ms={:.1} ack_p99_ms={:.1} \
             sample_gap_max_ms={:.1} send_lag_max_ms={:.1} tool_cpu_pct={:.0} \
             sampler_cpu_pct={:.1}",
            self.achieved_rate,
            self.messages,
            self.p50,
            self.p99,
            self.max,
            self.ack_p50,
            self.ack_p99,
            self.sample_gap_max,
            self.send_lag_max,
            self.tool_cpu_pct,
            self.sampler_cpu_pct,
        );
    }

    /// The median of each column over `rounds`.
    fn median_of(rounds: &[Figures]) -> Figures {
        let m = |f: fn(&Figures) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        Figures {
            achieved_rate: m(|f| f.achieved_rate),
            messages: m(|f| f.messages),
            p50: m(|f| f.p50),
            p99: m(|f| f.p99),
            max: m(|f| f.max),
            ack_p50: m(|f| f.ack_p50),
            ack_p99: m(|f| f.ack_p99),
            sample_gap_max: m(|f| f.sample_gap_max),
            send_lag_max: m(|f| f.send_lag_max),
            tool_cpu_pct: m(|f| f.tool_cpu_pct),
            sampler_cpu_pct: m(|f| f.sampler_cpu_pct),
        }
    }
}

/// Waits until the sampled offsets cover every delivered message, then returns a copy of them.
fn wait_committed(sampled: &Sampled, deliveries: &[Delivery], rate: u64) -> Advances {
    let mut last: HashMap<i32, i64> = HashMap::new();
    for d in deliveries {
        let o = last.entry(d.partition).or_insert(d.offset);
        *o = (*o).max(d.offset);
    }
    let patience = Instant::now() + Duration::from_secs(120);
    loop {
        {
            let a = sampled.advances.lock().unwrap_or_else(|e| e.into_inner());
            let covered = last.iter().all(|(p, off)| {
                a.get(p)
                    .and_then(|v| v.last())
                    .is_some_and(|(next, _)| next > off)
            });
            if covered {
                return a.clone();
            }
        }
        if Instant::now() > patience {
            fail(format!(
                "the messages at {rate} msg/s were not all committed after 120 s \
                 ({} failed offset samples)",
                sampled.errors.load(Ordering::Relaxed)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The figures of one round.
fn round_figures(
    base: Instant,
    sent: &Sent,
    deliveries: &[&Delivery],
    advances: &Advances,
    samples: &[Instant],
) -> Figures {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut latencies = Vec::with_capacity(deliveries.len());
    let mut acks = Vec::with_capacity(deliveries.len());
    let mut last_commit = sent.end;
    for d in deliveries {
        let at = base + Duration::from_micros(d.sent_us);
        let committed = advances
            .get(&d.partition)
            .and_then(|a| committed_at(a, d.offset))
            .unwrap_or_else(|| fail(format!("no commit seen for {}:{}", d.partition, d.offset)));
        last_commit = last_commit.max(committed);
        latencies.push(committed.saturating_duration_since(at));
        acks.push(Duration::from_micros(d.acked_us.saturating_sub(d.sent_us)));
    }
    latencies.sort_unstable();
    acks.sort_unstable();
    let wall = sent.end.saturating_duration_since(sent.start).as_secs_f64();
    Figures {
        achieved_rate: sent.count as f64 / wall.max(1e-9),
        messages: latencies.len() as f64,
        p50: ms(quantile(&latencies, 0.50)),
        p99: ms(quantile(&latencies, 0.99)),
        max: ms(latencies.last().copied().unwrap_or_default()),
        ack_p50: ms(quantile(&acks, 0.50)),
        ack_p99: ms(quantile(&acks, 0.99)),
        sample_gap_max: ms(gap_max(samples, sent.start, last_commit)),
        send_lag_max: ms(sent.lag_max),
        tool_cpu_pct: 100.0 * sent.cpu.as_secs_f64() / wall.max(1e-9),
        sampler_cpu_pct: 100.0 * sent.sampler_cpu.as_secs_f64() / wall.max(1e-9),
    }
}

/// Measures every rate; prints one line per round and one with the medians per rate.
pub fn run(args: LatencyArgs) {
    let sampled = Arc::new(Sampled::default());
    let sampler = spawn_sampler(
        args.database_url.clone(),
        args.group.clone(),
        Duration::from_millis(args.poll_ms.max(1)),
        sampled.clone(),
    );
    let settings = KafkaClientSettings::plaintext(&args.bootstrap_servers);
    let context = DeliveryLog {
        base: Instant::now(),
        log: Mutex::default(),
        failed: Mutex::default(),
    };
    let producer: LatencyProducer = streamops_worker::produce::producer_config(&settings, 1 << 20)
        .create_with_context(context)
        .unwrap_or_else(|e| fail(format!("producer: {e}")));
    let base = producer.context().base;
    let mut gen = Generator::new(GenOptions {
        kind: HandlerKind::MovingAverage,
        seed: 11,
        keys: 16,
        poison_percent: 0.0,
        max_message_bytes: 1 << 20,
    });
    let tick = Duration::from_millis(args.tick_ms.max(1));
    let rounds = args.rounds.clamp(1, u32::from(u16::MAX) - 1) as u16;
    let mut next = 0u64;
    for (i, &rate) in args.rates.iter().enumerate() {
        let rate = rate.max(1);
        let per_round = rate * args.seconds;
        let messages = Messages::generate(&mut gen, per_round.min(2_000_000) as usize);
        let (warm_rate, warm_secs) = if i == 0 {
            (args.first_warmup_rate.max(1), args.first_warmup_secs)
        } else {
            (rate, args.warmup_secs)
        };
        if warm_secs > 0 {
            let w = pace(
                &producer,
                &args.topic,
                &messages,
                next,
                (warm_rate, warm_rate * warm_secs, 0),
                tick,
                &sampled,
            );
            next += w.count;
        }
        let mut sent = Vec::new();
        for round in 1..=rounds {
            let s = pace(
                &producer,
                &args.topic,
                &messages,
                next,
                (rate, per_round, round),
                tick,
                &sampled,
            );
            next += s.count;
            sent.push(s);
        }
        if let Err(e) = producer.flush(Duration::from_secs(120)) {
            fail(format!("flush at {rate} msg/s: {e}"));
        }
        if let Some(e) = producer
            .context()
            .failed
            .lock()
            .ok()
            .and_then(|f| f.clone())
        {
            fail(format!("delivery failed: {e}"));
        }
        let deliveries: Vec<Delivery> = producer
            .context()
            .log
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        let advances = wait_committed(&sampled, &deliveries, rate);
        let samples = sampled
            .samples
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let mut figures = Vec::new();
        for (r, s) in sent.iter().enumerate() {
            let round = r as u16 + 1;
            let of_round: Vec<&Delivery> = deliveries.iter().filter(|d| d.round == round).collect();
            if of_round.len() as u64 != s.count {
                fail(format!(
                    "round {round} at {rate} msg/s: {} of {} messages acknowledged",
                    of_round.len(),
                    s.count
                ));
            }
            let f = round_figures(base, s, &of_round, &advances, &samples);
            f.print(rate, &round.to_string());
            figures.push(f);
        }
        Figures::median_of(&figures).print(rate, "median");
        if let Ok(mut v) = sampled.samples.lock() {
            v.clear();
        }
    }
    sampled.stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
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

    #[test]
    fn the_median_of_rounds_is_the_middle_one_or_the_mean_of_the_two_middle_ones() {
        assert_eq!(median(&[140.0, 545.0, 210.0]), 210.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn the_first_message_is_due_at_once_and_one_more_every_period() {
        assert_eq!(due(Duration::ZERO, 10_000, 100), 1);
        assert_eq!(due(Duration::from_micros(99), 10_000, 100), 1);
        assert_eq!(due(Duration::from_micros(100), 10_000, 100), 2);
        assert_eq!(due_at(1, 10_000), Duration::from_micros(100));
        assert_eq!(due_at(10_000, 10_000), Duration::from_secs(1));
    }

    #[test]
    fn a_tick_sends_every_message_due_since_the_last_one() {
        // 1 ms ticks at 10,000 msg/s: ten messages a tick.
        let a = due(Duration::from_millis(1), 10_000, u64::MAX);
        let b = due(Duration::from_millis(2), 10_000, u64::MAX);
        assert_eq!(b - a, 10);
        // A tick 30 ms late sends the 300 messages due meanwhile in one burst.
        let c = due(Duration::from_millis(32), 10_000, u64::MAX);
        assert_eq!(c - b, 300);
    }

    #[test]
    fn pacing_never_sends_more_than_the_round_count() {
        assert_eq!(due(Duration::from_secs(60), 50_000, 500_000), 500_000);
        assert_eq!(due(Duration::from_secs(3600), u64::from(u32::MAX), 7), 7);
    }

    #[test]
    fn the_delivery_opaque_carries_round_and_send_instant() {
        for (round, us) in [(0, 0), (1, 12_345_678), (3, (1 << 48) - 1), (u16::MAX, 1)] {
            assert_eq!(unpack(pack(round, us)), (round, us));
        }
    }

    #[test]
    fn the_sample_gap_counts_only_gaps_overlapping_the_round() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let samples = [at(0), at(50), at(52), at(54), at(90), at(92)];
        // The 50 ms gap before the round and the 36 ms one after it do not count.
        assert_eq!(gap_max(&samples, at(51), at(53)), Duration::from_millis(2));
        assert_eq!(gap_max(&samples, at(51), at(60)), Duration::from_millis(36));
        assert_eq!(gap_max(&samples, at(0), at(100)), Duration::from_millis(50));
        assert_eq!(gap_max(&[], at(0), at(1)), Duration::ZERO);
    }
}
