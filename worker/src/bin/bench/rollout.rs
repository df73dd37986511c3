//! `streamops-bench rollout`: the longest processing pause of any partition while the workers of
//! a consumer group are replaced one at a time, as a Deployment rollout does (maxSurge 1,
//! maxUnavailable 0: the replacement starts with a new identity, the old pod gets SIGTERM once
//! the replacement is ready), under a steady produce rate.
//!
//! Set-ups:
//! - `static`: classic protocol, cooperative-sticky, `group.instance.id` = the pod name (what
//!   the operator did with `STREAMOPS_INSTANCE_ID`);
//! - `dynamic`: classic protocol, cooperative-sticky, no instance id;
//! - `consumer`: KIP-848 (`group.protocol=consumer`), no instance id.
//!
//! A partition's processing is seen in `streamops_offsets` (moved in the same transaction as the
//! rows): the pause of a partition is the time between two advances of its `next_offset`,
//! sampled every `poll_ms`. After the rollout the producer stops and every produced message must
//! be committed exactly once (stored offsets and rows both equal to the produced count).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use streamops_crds::HandlerKind;
use streamops_worker::generate::{GenOptions, Generator};
use streamops_worker::kafka::KafkaClientSettings;

/// Group membership set-up of a rollout run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Setup {
    /// Classic protocol, static membership with the pod name as `group.instance.id`.
    Static,
    /// Classic protocol, cooperative-sticky, dynamic membership.
    Dynamic,
    /// KIP-848 consumer protocol, dynamic membership.
    Consumer,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Dynamic => "dynamic",
            Self::Consumer => "consumer",
        }
    }
}

/// `rollout` arguments.
#[derive(clap::Args, Debug)]
pub struct RolloutArgs {
    /// The worker binary.
    #[arg(long)]
    pub worker_bin: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// PostgreSQL server URL without a database (a fresh database is created per set-up).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub pg: String,
    /// Set-ups to measure, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "static,dynamic,consumer"
    )]
    pub setups: Vec<Setup>,
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Messages per second, spread evenly over the partitions.
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Seconds of steady processing before the first replacement and after each one (once every
    /// partition has resumed).
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Sampling period of the stored offsets, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub poll_ms: u64,
    /// Directory for the workers' configuration and logs (default: a new one under /tmp).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// librdkafka consumer settings for every worker (`STREAMOPS_KAFKA_CONSUMER_OVERRIDES`,
    /// `key=value,key=value`), to measure a tuning; none by default (the worker's own defaults).
    #[arg(long)]
    pub consumer_overrides: Option<String>,
}

fn fail(msg: String) -> ! {
    eprintln!("error: rollout: {msg}");
    std::process::exit(1)
}

/// A worker subprocess.
struct Worker {
    child: Child,
    http: String,
    name: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| fail(format!("no free port: {e}")))
}

impl Worker {
    fn start(args: &RolloutArgs, setup: Setup, config: &Path, db_url: &str, name: &str) -> Self {
        let http = format!("127.0.0.1:{}", free_port());
        let dir = config.parent().unwrap_or(Path::new("/tmp"));
        let log = std::fs::File::create(dir.join(format!("{name}.log")))
            .unwrap_or_else(|e| fail(format!("log file: {e}")));
        let mut cmd = Command::new(&args.worker_bin);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .args(["--http-listen", &http, "--log-format", "json"])
            .env("STREAMOPS_DATABASE_URL", db_url)
            .env_remove("STREAMOPS_INSTANCE_ID")
            .env_remove("STREAMOPS_KAFKA_CONSUMER_OVERRIDES")
            .stdout(Stdio::null())
            .stderr(log);
        if setup == Setup::Static {
            cmd.args(["--instance-id", name]);
        }
        if let Some(o) = &args.consumer_overrides {
            cmd.env("STREAMOPS_KAFKA_CONSUMER_OVERRIDES", o);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| fail(format!("cannot start {}: {e}", args.worker_bin.display())));
        Self {
            child,
            http,
            name: name.to_string(),
        }
    }

    /// Waits until `/readyz` answers 200 (the member has its assignment and the database is
    /// reachable), as the Deployment's readiness probe does before the old pod is stopped.
    async fn wait_ready(&mut self, patience: Duration) {
        let url = format!("http://{}/readyz", self.http);
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                fail(format!(
                    "worker {} exited while starting: {status}",
                    self.name
                ));
            }
            if start.elapsed() > patience {
                fail(format!("worker {} not ready after {patience:?}", self.name));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    async fn wait_exit(&mut self, patience: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if start.elapsed() > patience {
                let _ = self.child.kill();
                fail(format!("worker {} did not exit after SIGTERM", self.name));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the offsets sampler has seen.
#[derive(Default)]
struct Progress {
    /// Per partition: last next_offset and when it last advanced.
    last: HashMap<i32, (i64, Instant)>,
    /// Longest closed pause since `measuring` began: (pause, partition).
    longest: Option<(Duration, i32)>,
    measuring: bool,
}

impl Progress {
    fn observe(&mut self, partition: i32, next: i64, now: Instant) {
        match self.last.get_mut(&partition) {
            Some((prev, at)) if next > *prev => {
                let pause = now.duration_since(*at);
                if self.measuring && self.longest.is_none_or(|(l, _)| pause > l) {
                    self.longest = Some((pause, partition));
                }
                *prev = next;
                *at = now;
            }
            Some(_) => {}
            None => {
                self.last.insert(partition, (next, now));
            }
        }
    }

    /// The longest pause including the ones still open at `now`.
    fn longest_at(&self, now: Instant) -> Option<(Duration, i32)> {
        let open = self
            .last
            .iter()
            .map(|(p, (_, at))| (now.duration_since(*at), *p))
            .max();
        match (self.longest, open) {
            (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Whether every partition advanced after `t`.
    fn all_advanced_since(&self, t: Instant, partitions: i32) -> bool {
        self.last.len() == partitions as usize && self.last.values().all(|(_, at)| *at > t)
    }
}

async fn sample(pool: PgPool, group: String, poll: Duration, progress: Arc<Mutex<Progress>>) {
    loop {
        let rows: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, next_offset FROM streamops_offsets WHERE consumer_group = $1",
        )
        .bind(&group)
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        let now = Instant::now();
        if let Ok(mut p) = progress.lock() {
            for (partition, next) in rows {
                p.observe(partition, next, now);
            }
        }
        tokio::time::sleep(poll).await;
    }
}

/// Produces at `rate` msg/s, round robin over the partitions, until `stop`; counts acks.
async fn produce(
    settings: KafkaClientSettings,
    topic: String,
    partitions: i32,
    rate: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) {
    use futures::StreamExt;
    let producer = streamops_worker::produce::producer(&settings, 1 << 20)
        .unwrap_or_else(|e| fail(format!("producer: {e}")));
    let gen = Generator::new(GenOptions {
        kind: HandlerKind::MovingAverage,
        seed: 7,
        keys: 16,
        poison_percent: 0.0,
        max_message_bytes: 1 << 20,
    });
    let start = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    for (i, g) in gen.enumerate() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let record = FutureRecord::to(&topic)
            .partition(i as i32 % partitions)
            .key(g.key.as_bytes())
            .payload(g.payload.as_slice());
        match producer.send_result(record) {
            Ok(f) => inflight.push(f),
            Err((e, _)) => fail(format!("cannot enqueue: {e}")),
        }
        while let Some(Some(r)) = futures::FutureExt::now_or_never(inflight.next()) {
            match r {
                Ok(Ok(_)) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                other => fail(format!("delivery failed: {other:?}")),
            }
        }
    }
    while let Some(r) = inflight.next().await {
        match r {
            Ok(Ok(_)) => {
                acked.fetch_add(1, Ordering::Relaxed);
            }
            other => fail(format!("delivery failed: {other:?}")),
        }
    }
}

fn config_yaml(id: &str, bootstrap: &str, setup: Setup) -> String {
    let protocol = match setup {
        Setup::Consumer => "\n  groupProtocol: consumer",
        Setup::Static | Setup::Dynamic => "",
    };
    // No batch block: the spec's defaults.
    format!(
        "consumerId: {id}
kafka:
  bootstrapServers: {bootstrap}
  topics: [{id}]
  groupId: {id}
  autoOffsetReset: earliest
  securityProtocol: PLAINTEXT{protocol}
handler:
  kind: moving-average
  window: 5
errorTopic: {id}-failed
maxMessageBytes: 1048576
httpListen: 127.0.0.1:0
progressEvery: 1000000
"
    )
}

/// One set-up: returns the `key=value` result line.
async fn run_setup(args: &RolloutArgs, setup: Setup, dir: &Path) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 100_000_000)
        .unwrap_or_default();
    let id = format!("rollout-{}-{}-{millis}", setup.name(), std::process::id());
    let db = id.replace('-', "_");
    let settings = KafkaClientSettings::plaintext(&args.bootstrap_servers);
    for (topic, n) in [(id.clone(), args.partitions), (format!("{id}-failed"), 1)] {
        streamops_worker::admin::create_topic(&settings, &topic, n, 1)
            .await
            .unwrap_or_else(|e| fail(format!("topic {topic}: {e}")));
    }
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/postgres", args.pg))
        .await
        .unwrap_or_else(|e| fail(format!("PostgreSQL: {e}")));
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .unwrap_or_else(|e| fail(format!("create database: {e}")));
    let db_url = format!("{}/{db}", args.pg);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db_url)
        .await
        .unwrap_or_else(|e| fail(format!("database: {e}")));
    streamops_worker::db::MIGRATOR
        .run(&pool)
        .await
        .unwrap_or_else(|e| fail(format!("migrations: {e}")));
    let config = dir.join(format!("{id}.yaml"));
    std::fs::write(&config, config_yaml(&id, &args.bootstrap_servers, setup))
        .unwrap_or_else(|e| fail(format!("config: {e}")));
    eprintln!(
        "rollout[{}]: {} replicas, {} partitions, {} msg/s; logs in {}",
        setup.name(),
        args.replicas,
        args.partitions,
        args.rate,
        dir.display()
    );

    let patience = Duration::from_secs(120);
    let mut generation = 0usize;
    let pod = |generation: &mut usize| {
        *generation += 1;
        format!("{id}-pod-{generation}")
    };
    let mut workers: Vec<Worker> = (0..args.replicas)
        .map(|_| Worker::start(args, setup, &config, &db_url, &pod(&mut generation)))
        .collect();
    for w in &mut workers {
        w.wait_ready(patience).await;
    }

    let progress = Arc::new(Mutex::new(Progress::default()));
    let sampler = tokio::spawn(sample(
        pool.clone(),
        id.clone(),
        Duration::from_millis(args.poll_ms.max(1)),
        progress.clone(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(produce(
        settings.clone(),
        id.clone(),
        args.partitions,
        args.rate,
        stop.clone(),
        acked.clone(),
    ));

    // Steady state first: every partition processing.
    let settle = Duration::from_secs(args.settle_secs);
    let t0 = Instant::now();
    wait_until(patience, || {
        progress
            .lock()
            .map(|p| p.all_advanced_since(t0, args.partitions))
            .unwrap_or(false)
    })
    .await
    .unwrap_or_else(|| fail("not every partition is processed before the rollout".into()));
    tokio::time::sleep(settle).await;
    if let Ok(mut p) = progress.lock() {
        p.measuring = true;
    }

    let rollout_start = Instant::now();
    let mut steps = Vec::new();
    #[allow(clippy::needless_range_loop)] // each step replaces one slot while starting a new worker
    for i in 0..args.replicas {
        let step_start = Instant::now();
        let mut fresh = Worker::start(args, setup, &config, &db_url, &pod(&mut generation));
        fresh.wait_ready(patience).await;
        let mut old = std::mem::replace(&mut workers[i], fresh);
        let killed = Instant::now();
        old.signal_term();
        old.wait_exit(patience).await;
        wait_until(patience, || {
            progress
                .lock()
                .map(|p| p.all_advanced_since(killed, args.partitions))
                .unwrap_or(false)
        })
        .await
        .unwrap_or_else(|| {
            fail(format!(
                "partitions did not resume after replacing {}",
                old.name
            ))
        });
        let resumed = killed.elapsed();
        tokio::time::sleep(settle).await;
        steps.push(format!(
            "{:.1}",
            (resumed.as_secs_f64() * 10.0).round() / 10.0
        ));
        eprintln!(
            "rollout[{}]: replaced {} by {} in {:.1}s; all partitions moving {:.1}s after SIGTERM",
            setup.name(),
            old.name,
            workers[i].name,
            step_start.elapsed().as_secs_f64(),
            resumed.as_secs_f64()
        );
    }
    let rollout_secs = rollout_start.elapsed().as_secs_f64();
    let (longest, partition) = progress
        .lock()
        .ok()
        .and_then(|p| p.longest_at(Instant::now()))
        .unwrap_or((Duration::ZERO, -1));

    // Nothing lost, nothing doubled.
    stop.store(true, Ordering::Relaxed);
    let _ = producer.await;
    let produced = acked.load(Ordering::Relaxed) as i64;
    let committed = |pool: PgPool, group: String| async move {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT sum(next_offset)::int8 FROM streamops_offsets WHERE consumer_group = $1",
        )
        .bind(group)
        .fetch_one(&pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
    };
    let drain_start = Instant::now();
    let mut stored = committed(pool.clone(), id.clone()).await;
    while stored < produced && drain_start.elapsed() < patience {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stored = committed(pool.clone(), id.clone()).await;
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM price_points")
        .fetch_one(&pool)
        .await
        .unwrap_or(-1);
    sampler.abort();
    for w in &workers {
        w.signal_term();
    }
    for w in &mut workers {
        w.wait_exit(patience).await;
    }
    pool.close().await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&admin)
        .await;
    for topic in [id.clone(), format!("{id}-failed")] {
        let _ = streamops_worker::admin::delete_topic(&settings, &topic).await;
    }
    let exact = stored == produced && rows == produced;
    if !exact {
        eprintln!(
            "rollout[{}]: MISMATCH produced={produced} stored_offsets={stored} rows={rows}",
            setup.name()
        );
    }
    format!(
        "setup={} max_pause_ms={} partition={partition} resumed_after_sigterm_s={} rollout_s={rollout_secs:.1} produced={produced} stored_offsets={stored} rows={rows} exact={exact}",
        setup.name(),
        longest.as_millis(),
        steps.join(","),
    )
}

async fn wait_until(patience: Duration, mut ok: impl FnMut() -> bool) -> Option<()> {
    let start = Instant::now();
    while start.elapsed() < patience {
        if ok() {
            return Some(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Runs every set-up and prints one result line per set-up.
pub async fn run(args: RolloutArgs) {
    let dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("streamops-rollout-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(format!("{}: {e}", dir.display())));
    let mut failed = false;
    for &setup in &args.setups {
        let line = run_setup(&args, setup, &dir).await;
        failed |= line.contains("exact=false");
        println!("{line}");
    }
    if failed {
        fail("a set-up lost or doubled messages (see above)".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_the_time_between_two_advances_of_a_partition() {
        let t0 = Instant::now();
        let mut p = Progress {
            measuring: true,
            ..Progress::default()
        };
        p.observe(0, 10, t0);
        p.observe(1, 10, t0);
        p.observe(0, 10, t0 + Duration::from_secs(1));
        p.observe(0, 12, t0 + Duration::from_secs(2));
        p.observe(1, 11, t0 + Duration::from_millis(500));
        assert_eq!(p.longest, Some((Duration::from_secs(2), 0)));
        // Partition 1 has been still since 0.5 s: an open pause counts too.
        assert_eq!(
            p.longest_at(t0 + Duration::from_secs(4)),
            Some((Duration::from_millis(3500), 1))
        );
        assert!(p.all_advanced_since(t0 + Duration::from_millis(100), 2));
        assert!(!p.all_advanced_since(t0 + Duration::from_secs(1), 2));
    }
}
