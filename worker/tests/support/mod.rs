//! Shared support for the worker's integration tests (also for the handlers' tests: add
//! `mod support;` to a test file).
//!
//! Every test runs against the real services of DEVELOPERS.md (Apache Kafka on 127.0.0.1:9092,
//! PostgreSQL on 127.0.0.1:5432) and fails loudly, naming the service, when one is absent.
//! Names are unique per run ([`unique`]), and every test gets a fresh database
//! ([`fresh_database`]). The Kafka and PostgreSQL helpers shared with the operator's tests come
//! from `streamops-test-support` (re-exported here); this module adds the worker's own.
//!
//! Typical flow:
//! ```ignore
//! let t = TestEnv::new("ma-basic", HandlerKind::MovingAverage, 3).await; // db + topics
//! let events = t.produce(ProduceSpec::new(HandlerKind::MovingAverage, 1000)).await;
//! let mut w = t.start_worker("w-0");                                         // subprocess
//! t.wait_for_rows("price_points", 1000).await;
//! w.terminate_and_wait();                                                    // SIGTERM
//! ```
#![allow(dead_code, unused_imports)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sqlx::PgPool;
use streamops_crds::{HandlerKind, StreamConsumerSpec, WorkerConfig};
use streamops_worker::generate::{GenOptions, Generated, Generator};
use streamops_worker::kafka::KafkaClientSettings;
use streamops_worker::produce::{produce, ProduceOptions};

pub mod own_broker;

pub use streamops_test_support::kafka;
pub use streamops_test_support::pg::{self, drop_database, fresh_database};
pub use streamops_test_support::{require_services, unique, BROKER, PG_HOST};

/// How long a wait may take before the test fails with a message (a liveness guard, not a
/// performance assertion).
pub const PATIENCE: Duration = Duration::from_secs(180);

/// Creates a topic through the worker's own admin command path.
pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_on(BROKER, name, partitions).await;
}

/// [`create_topic`] on the broker at `bootstrap`.
pub async fn create_topic_on(bootstrap: &str, name: &str, partitions: i32) {
    streamops_worker::admin::create_topic(
        &KafkaClientSettings::plaintext(bootstrap),
        name,
        partitions,
        1,
    )
    .await
    .unwrap_or_else(|e| panic!("cannot create topic {name}: {e}"));
}

/// What to produce.
#[derive(Debug, Clone)]
pub struct ProduceSpec {
    /// Generator options.
    pub gen: GenOptions,
    /// Messages.
    pub count: u64,
    /// Messages per second (0 = unlimited).
    pub rate: u64,
}

impl ProduceSpec {
    /// `count` valid events of `kind`, seed 1, 8 keys (the producer batches and compresses as
    /// `streamops-worker produce` does).
    pub fn new(kind: HandlerKind, count: u64) -> Self {
        Self {
            gen: GenOptions {
                kind,
                seed: 1,
                keys: 8,
                poison_percent: 0.0,
                max_message_bytes: 4096,
            },
            count,
            rate: 0,
        }
    }
    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.gen.seed = seed;
        self
    }
    /// Sets the poison percentage.
    pub fn poison(mut self, percent: f64) -> Self {
        self.gen.poison_percent = percent;
        self
    }
    /// Sets the rate.
    pub fn rate(mut self, rate: u64) -> Self {
        self.rate = rate;
        self
    }
    /// The events this spec produces, computed independently of any broker.
    pub fn events(&self) -> Vec<Generated> {
        Generator::new(self.gen.clone())
            .take(self.count as usize)
            .collect()
    }
}

/// Produces `spec` to `topic`; returns the generated events (in production order).
pub async fn produce_events(topic: &str, spec: &ProduceSpec) -> Vec<Generated> {
    produce_events_on(BROKER, topic, spec).await
}

/// [`produce_events`] to the broker at `bootstrap`.
pub async fn produce_events_on(bootstrap: &str, topic: &str, spec: &ProduceSpec) -> Vec<Generated> {
    let summary = produce(
        &KafkaClientSettings::plaintext(bootstrap),
        &ProduceOptions {
            topic: topic.to_string(),
            count: spec.count,
            rate: spec.rate,
            gen: spec.gen.clone(),
            message_timeout: streamops_worker::produce::DEFAULT_MESSAGE_TIMEOUT,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("cannot produce to {topic}: {e}"));
    assert_eq!(summary.failed, 0, "undelivered messages: {summary}");
    spec.events()
}

/// One test's world: a database, a source topic, an error topic, a group.
pub struct TestEnv {
    /// Database URL.
    pub db_url: String,
    /// Pool on the database.
    pub pool: PgPool,
    /// Source topic.
    pub topic: String,
    /// Error topic.
    pub error_topic: String,
    /// Consumer group.
    pub group: String,
    /// The worker configuration (edit before `start_worker`).
    pub config: WorkerConfig,
    /// Directory for config files and worker logs.
    pub dir: PathBuf,
}

impl TestEnv {
    /// Checks the services, creates a fresh database, the topics (with `partitions`) and a
    /// configuration for `kind` (batch of 500 messages / 50 ms, maxMessageBytes 4096).
    pub async fn new(prefix: &str, kind: HandlerKind, partitions: i32) -> Self {
        Self::new_on(BROKER, prefix, kind, partitions).await
    }

    /// [`TestEnv::new`] with the topics on the broker at `bootstrap` (a test's own broker).
    pub async fn new_on(bootstrap: &str, prefix: &str, kind: HandlerKind, partitions: i32) -> Self {
        require_services();
        let topic = unique(prefix);
        let error_topic = format!("{topic}-failed");
        let group = format!("{topic}-group");
        create_topic_on(bootstrap, &topic, partitions).await;
        create_topic_on(bootstrap, &error_topic, 1).await;
        let (db_url, pool) = fresh_database(prefix).await;
        let mut spec = StreamConsumerSpec::example(kind);
        spec.kafka.bootstrap_servers = bootstrap.into();
        spec.kafka.topics = vec![topic.clone()];
        spec.kafka.group_id = group.clone();
        spec.error_topic = Some(error_topic.clone());
        spec.batch.max_messages = 500;
        spec.batch.max_wait_ms = 50;
        spec.max_message_bytes = 4096;
        let mut config = WorkerConfig::from_spec(&topic, None, &spec).expect("valid example spec");
        config.progress_every = 1000;
        let dir = std::env::temp_dir().join("streamops-tests").join(&topic);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self {
            db_url,
            pool,
            topic,
            error_topic,
            group,
            config,
            dir,
        }
    }

    /// Produces to the source topic.
    pub async fn produce(&self, spec: &ProduceSpec) -> Vec<Generated> {
        produce_events(&self.topic, spec).await
    }

    /// Starts a worker subprocess with the current configuration as a dynamic group member (the
    /// command line's default: no `--instance-id`); `name` names its configuration and log files.
    pub fn start_worker(&self, name: &str) -> WorkerProcess {
        WorkerProcess::start(self, name, Membership::Dynamic, &[])
    }

    /// Like [`TestEnv::start_worker`], with extra environment variables (`STREAMOPS_REDIS_URL`).
    pub fn start_worker_with_env(&self, name: &str, vars: &[(&str, &str)]) -> WorkerProcess {
        WorkerProcess::start(self, name, Membership::Dynamic, vars)
    }

    /// Starts a worker as a static group member with `--instance-id id`, the way the operator
    /// runs it (the pod name). Starting it again under the same id after a kill is a container
    /// restart in its pod: the member gets its partitions back without waiting for
    /// `session.timeout.ms`.
    pub fn start_static_worker(&self, id: &str) -> WorkerProcess {
        WorkerProcess::start(self, id, Membership::Static, &[])
    }

    /// Like [`TestEnv::start_static_worker`], with extra environment variables.
    pub fn start_static_worker_with_env(&self, id: &str, vars: &[(&str, &str)]) -> WorkerProcess {
        WorkerProcess::start(self, id, Membership::Static, vars)
    }

    /// Row count of `table`.
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }

    /// Sum of the stored next offsets of this test's group (= messages applied when every
    /// partition started at 0).
    pub async fn applied_offsets(&self) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>(
            "SELECT sum(next_offset)::int8 FROM streamops_offsets WHERE consumer_group = $1",
        )
        .bind(&self.group)
        .fetch_one(&self.pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
    }

    /// Waits until the group's stored offsets cover `n` messages.
    pub async fn wait_for_offsets(&self, n: i64) {
        let start = Instant::now();
        loop {
            let got = self.applied_offsets().await;
            if got >= n {
                return;
            }
            if start.elapsed() > PATIENCE {
                panic!(
                    "stored offsets cover {got} messages, expected {n}; see worker logs in {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `table` holds at least `n` rows.
    pub async fn wait_for_rows(&self, table: &str, n: i64) {
        let start = Instant::now();
        loop {
            let got = self.count(table).await;
            if got >= n {
                return;
            }
            if start.elapsed() > PATIENCE {
                panic!(
                    "{table} holds {got} rows, expected {n}; see worker logs in {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads `n` records of the error topic from the beginning.
    pub fn consume_error_topic(&self, n: usize) -> Vec<OwnedMessage> {
        consume_topic(&self.error_topic, n)
    }

    /// Drops the test database (call at the end of a passing test).
    pub async fn cleanup(self) {
        self.pool.close().await;
        drop_database(&self.db_url).await;
    }
}

/// High watermark of each of the first `partitions` partitions of `topic`: what was produced.
pub fn high_watermarks(topic: &str, partitions: i32) -> std::collections::BTreeMap<i32, i64> {
    let consumer: BaseConsumer = KafkaClientSettings::plaintext(BROKER)
        .base()
        .create()
        .expect("watermark client");
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("watermarks of {topic}/{p}: {e}"));
            (p, high)
        })
        .collect()
}

/// Reads `n` records of every partition of `topic` from the beginning (panics if fewer arrive).
pub fn consume_topic(topic: &str, n: usize) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = KafkaClientSettings::plaintext(BROKER)
        .base()
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::with_capacity(n);
    let start = Instant::now();
    while out.len() < n {
        if start.elapsed() > PATIENCE {
            panic!("read {} of {n} records from {topic}", out.len());
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    // Anything beyond n would be a duplicate or an unexpected record: read a little more.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

/// The value of header `name` of `m`, as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A worker subprocess (`streamops-worker run --config ...`).
pub struct WorkerProcess {
    child: Child,
    /// HTTP address.
    pub http: String,
    /// Log file.
    pub log: PathBuf,
}

/// How a worker joins its consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A fresh member id per process (no `group.instance.id`); a graceful stop leaves the group.
    Dynamic,
    /// `group.instance.id` = the worker's name (what the operator sets: the pod name).
    Static,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl WorkerProcess {
    /// Starts a worker for `env` named `name`, logging to a file in `env.dir`, with extra
    /// environment variables.
    pub fn start(env: &TestEnv, name: &str, membership: Membership, vars: &[(&str, &str)]) -> Self {
        let port = free_port();
        let http = format!("127.0.0.1:{port}");
        let cfg_path = env.dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg_path, env.config.to_yaml().expect("config renders"))
            .expect("write config");
        let n = std::fs::read_dir(&env.dir).map(|d| d.count()).unwrap_or(0);
        let log = env.dir.join(format!("{name}-{n}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamops-worker"));
        cmd.args(["run", "--config"]).arg(&cfg_path).args([
            "--http-listen",
            &http,
            "--log-format",
            "json",
        ]);
        if membership == Membership::Static {
            cmd.args(["--instance-id", name]);
        }
        let child = cmd
            .env("STREAMOPS_DATABASE_URL", &env.db_url)
            .env("RUST_LOG", "info,streamops_worker=debug")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start streamops-worker");
        Self { child, http, log }
    }

    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(&self.http).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        Some((status, body))
    }

    /// Status and body of `GET path` on the worker's HTTP port, if it answers.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        self.get(path)
    }

    /// `/readyz` status code, if the server answers.
    pub fn readyz(&self) -> Option<u16> {
        self.get("/readyz").map(|r| r.0)
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        self.get("/metrics").map(|r| r.1).unwrap_or_default()
    }

    /// The value of an unlabelled or fully labelled sample in `/metrics` (sum over matches).
    pub fn metric(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(200) = self.readyz() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "worker exited with {status} before becoming ready; log: {}",
                    self.log.display()
                );
            }
            if start.elapsed() > PATIENCE {
                panic!("worker never became ready; log: {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate_and_wait(mut self) -> ExitStatus {
        sigterm(&self.child);
        let start = Instant::now();
        loop {
            if let Some(status) = exited_after_sigterm(&mut self.child, start, &self.log) {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `patience` for the worker to exit on its own; panics if it does not.
    pub fn wait_exit(mut self, patience: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if start.elapsed() > patience {
                panic!("worker did not exit; log: {}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log text.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends SIGTERM to a worker process.
pub fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// One look at a worker told to stop at `since`: its exit status once it has exited; past
/// [`PATIENCE`] it is killed and the test fails, naming its log.
pub fn exited_after_sigterm(child: &mut Child, since: Instant, log: &Path) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if since.elapsed() > PATIENCE {
        let _ = child.kill();
        panic!("worker did not exit after SIGTERM; log: {}", log.display());
    }
    None
}
