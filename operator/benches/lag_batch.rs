//! Lag readings one by one against readings in batches (`make bench-lag`): the cost, to the
//! operator and to the broker, of reading the lag of many consumer groups on one cluster.
//!
//! `GROUPS` groups, each with offsets committed on one topic of `PARTITIONS` partitions on the
//! local broker (Apache Kafka, DEVELOPERS.md). Each round reads every group's lag twice with one
//! `KafkaLagReader` and four readings in flight, as the poller does: one reading per group
//! (`read`), then batches of 32 (`read_many`, the poller's default `max_batch`). Rounds alternate
//! so that both modes see the same machine. Per reading: wall time, the operator process's CPU
//! time (getrusage) and the broker's (`/proc/<pid>/stat` of `.dev/kafka/kafka.pid`, or of the process running `kafka.Kafka`). Also checks
//! that both modes read the same figures.
//!
//! Prints the figures; asserts nothing (speed targets are never test assertions).

use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use streamops_crds::v1alpha1::{AutoOffsetReset, SecurityProtocol};
use streamops_operator::lag::{GroupLag, KafkaLagReader, LagError, LagReader, LagTarget};
use streamops_test_support::kafka::{self, BROKER};
use streamops_test_support::unique;

const GROUPS: usize = 256;
const PARTITIONS: i32 = 6;
const RECORDS: usize = 50;
const BATCH: usize = 32;
const IN_FLIGHT: usize = 4;
const ROUNDS: usize = 3;

/// CPU seconds used by this process so far.
fn own_cpu() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The broker's pid: from `.dev/kafka/kafka.pid`, else the process running `kafka.Kafka`.
fn broker_pid() -> Option<String> {
    let pid_file = concat!(env!("CARGO_MANIFEST_DIR"), "/../.dev/kafka/kafka.pid");
    if let Ok(pid) = std::fs::read_to_string(pid_file) {
        return Some(pid.trim().to_string());
    }
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().into_string().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        cmdline
            .windows(b"kafka.Kafka".len())
            .any(|w| w == b"kafka.Kafka")
            .then_some(pid)
    })
}

/// CPU seconds used by the broker so far, if it is found.
fn broker_cpu() -> Option<f64> {
    let pid = broker_pid()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

struct Cost {
    wall: Duration,
    own: f64,
    broker: Option<f64>,
    totals: Vec<i64>,
    failures: usize,
}

/// Readings of every group per measure (`PASSES` rounds of `GROUPS`), for CPU times well above
/// the clock tick.
const PASSES: usize = 4;

async fn measure<F, Fut>(read: F) -> Cost
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<Result<GroupLag, LagError>>>,
{
    let (own0, broker0, start) = (own_cpu(), broker_cpu(), Instant::now());
    let mut results = read().await;
    for _ in 1..PASSES {
        results = read().await;
    }
    let wall = start.elapsed();
    let own = own_cpu() - own0;
    let broker = broker0.zip(broker_cpu()).map(|(a, b)| b - a);
    let failures = results.iter().filter(|r| r.is_err()).count();
    let totals = results
        .into_iter()
        .map(|r| r.map(|l| l.total).unwrap_or(-1))
        .collect();
    Cost {
        wall,
        own,
        broker,
        totals,
        failures,
    }
}

fn per_reading(c: &Cost) -> (f64, f64, Option<f64>) {
    let n = (GROUPS * PASSES) as f64;
    (
        c.wall.as_secs_f64() * 1e3 / n,
        c.own * 1e3 / n,
        c.broker.map(|b| b * 1e3 / n),
    )
}

#[tokio::main]
async fn main() {
    kafka::require_broker();
    let topic = unique("bench-lag");
    kafka::create_topic(&topic, PARTITIONS).await;
    let producer = kafka::producer();
    for p in 0..PARTITIONS {
        kafka::produce(&producer, &topic, p, RECORDS).await;
    }
    println!("committing offsets for {GROUPS} groups on {topic} ({PARTITIONS} partitions)");
    let targets: Vec<LagTarget> = (0..GROUPS)
        .map(|i| {
            let group = unique("bench-lag-group");
            // Every group a different position, some partitions without a commit.
            let offsets: Vec<(i32, i64)> = (0..PARTITIONS)
                .filter(|p| !(i + *p as usize).is_multiple_of(4))
                .map(|p| (p, ((i * 7 + p as usize) % RECORDS) as i64))
                .collect();
            kafka::commit_offsets(&group, &topic, &offsets);
            LagTarget {
                bootstrap_servers: BROKER.into(),
                group_id: group,
                topics: vec![topic.clone()],
                auto_offset_reset: AutoOffsetReset::Earliest,
                security_protocol: SecurityProtocol::Plaintext,
                sasl_mechanism: None,
                credentials: None,
                ssl_ca_location: None,
                workers: None,
            }
        })
        .collect();

    let reader = KafkaLagReader::new(Duration::from_secs(10), IN_FLIGHT);
    // Connect once, so neither mode pays for the client's creation.
    let _ = reader.read(&targets[0]).await;

    let one_by_one = || async {
        stream::iter(targets.iter().map(|t| reader.read(t)))
            .buffered(IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
    };
    let batched = || async {
        stream::iter(targets.chunks(BATCH).map(|c| reader.read_many(c)))
            .buffered(IN_FLIGHT)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
    };

    println!(
        "{:<6} {:<11} {:>10} {:>16} {:>15} {:>9}",
        "round", "mode", "wall ms/rd", "operator CPU ms", "broker CPU ms", "failures"
    );
    let mut sums = [(0.0, 0.0, 0.0); 2];
    for round in 1..=ROUNDS {
        let single = measure(&one_by_one).await;
        let batch = measure(&batched).await;
        if single.totals != batch.totals {
            println!("round {round}: the two modes read different figures (a commit in between?)");
        }
        for (i, (mode, c)) in [("one by one", &single), ("batches", &batch)]
            .into_iter()
            .enumerate()
        {
            let (wall, own, broker) = per_reading(c);
            sums[i].0 += wall;
            sums[i].1 += own;
            sums[i].2 += broker.unwrap_or(f64::NAN);
            println!(
                "{round:<6} {mode:<11} {wall:>10.2} {own:>16.3} {:>15} {:>9}",
                broker.map_or("n/a".into(), |b| format!("{b:.3}")),
                c.failures
            );
        }
    }
    let ratio = |f: fn(&(f64, f64, f64)) -> f64| f(&sums[0]) / f(&sums[1]);
    println!(
        "one by one / batches over {ROUNDS} rounds: wall {:.2}x, operator CPU {:.2}x, broker CPU {:.2}x",
        ratio(|s| s.0),
        ratio(|s| s.1),
        ratio(|s| s.2),
    );
    kafka::delete_topic(&topic).await;
}
