//! The services a chaos run uses, separate from the development stack so that faults stay
//! contained: an Apache Kafka broker of its own (one KRaft node started with `scripts/kafka.sh`,
//! its own data directory and ports) behind the TCP proxy, a Redis with append-only persistence
//! (so that a restart keeps its data, as a production Redis would), the reference scorer, and an
//! in-process webhook receiver. PostgreSQL is the machine's: a PostgreSQL restart scenario restarts
//! it with `pg_ctlcluster`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

use crate::proxy::Proxy;

/// Ports of the chaos stack.
pub const BROKER_PORT: u16 = 19092;
/// The chaos broker's KRaft controller port.
pub const CONTROLLER_PORT: u16 = 19093;
/// The proxy's port, advertised by the chaos broker (clients always reconnect through it).
pub const PROXY_PORT: u16 = 29092;

/// `scripts/kafka.sh` of this checkout.
fn kafka_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka.sh")
}
/// The chaos Redis.
pub const REDIS_PORT: u16 = 16379;
/// The reference scorer.
pub const SCORER_PORT: u16 = 18090;
/// The webhook receiver.
pub const WEBHOOK_PORT: u16 = 18091;

/// Whether something listens on a loopback port.
pub async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// Waits until a port opens, or fails naming the service.
pub async fn wait_port(port: u16, what: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if port_open(port).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not open 127.0.0.1:{port} within {limit:?}")
}

/// Waits until a port closes.
pub async fn wait_port_closed(port: u16, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !port_open(port).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("127.0.0.1:{port} is still open after {limit:?}")
}

/// Webhook calls received, by idempotency key.
#[derive(Clone, Default)]
pub struct Webhooks {
    calls: Arc<Mutex<HashMap<String, u32>>>,
}

impl Webhooks {
    /// Distinct keys with the given prefix (one consumer's triggers).
    pub fn distinct_with_prefix(&self, prefix: &str) -> usize {
        self.calls
            .lock()
            .map(|c| c.keys().filter(|k| k.starts_with(prefix)).count())
            .unwrap_or(0)
    }
}

async fn serve_webhooks(webhooks: Webhooks) -> Result<()> {
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: HeaderMap| {
            let webhooks = webhooks.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if key.is_empty() {
                    return StatusCode::BAD_REQUEST;
                }
                if let Ok(mut c) = webhooks.calls.lock() {
                    *c.entry(key).or_default() += 1;
                }
                StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", WEBHOOK_PORT))
        .await
        .context("binding the webhook receiver")?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

/// The chaos stack.
pub struct Stack {
    /// The worker binary.
    pub worker_bin: PathBuf,
    /// Scratch directory of this run.
    pub dir: PathBuf,
    /// The broker's proxy.
    pub proxy: Proxy,
    /// Webhook calls received.
    pub webhooks: Webhooks,
    /// The broker's directory (configuration, data, logs, pid file).
    kafka_dir: PathBuf,
    broker_running: bool,
    redis: Option<Child>,
    scorer: Option<Child>,
}

impl Stack {
    /// Starts the stack. The development stack's PostgreSQL must be up.
    pub async fn start(worker_bin: PathBuf, dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)?;
        if !port_open(5432).await {
            bail!("PostgreSQL is not listening on 127.0.0.1:5432: run `make dev-up`");
        }
        for (port, what) in [
            (BROKER_PORT, "chaos broker"),
            (CONTROLLER_PORT, "chaos broker's controller"),
            (PROXY_PORT, "chaos proxy"),
            (REDIS_PORT, "chaos Redis"),
            (SCORER_PORT, "chaos scorer"),
            (WEBHOOK_PORT, "webhook receiver"),
        ] {
            if port_open(port).await {
                bail!("port {port} for the {what} is taken: is another chaos run going on?");
            }
        }
        let kafka_dir = dir.join("kafka");
        start_kafka(&kafka_dir).await?;
        let proxy = Proxy::start(
            SocketAddr::from(([127, 0, 0, 1], PROXY_PORT)),
            SocketAddr::from(([127, 0, 0, 1], BROKER_PORT)),
        )
        .await
        .context("starting the broker proxy")?;
        let webhooks = Webhooks::default();
        serve_webhooks(webhooks.clone()).await?;
        let mut stack = Self {
            worker_bin,
            dir,
            proxy,
            webhooks,
            kafka_dir,
            broker_running: true,
            redis: None,
            scorer: None,
        };
        stack.start_redis().await?;
        stack.start_scorer(0).await?;
        Ok(stack)
    }

    /// Bootstrap address of the broker, through the proxy.
    pub fn bootstrap(&self) -> String {
        self.proxy.addr().to_string()
    }

    /// Redis URL of the chaos Redis.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{REDIS_PORT}/0")
    }

    /// Scoring URL of the chaos scorer.
    pub fn scoring_url(&self) -> String {
        format!("http://127.0.0.1:{SCORER_PORT}/predict")
    }

    /// Webhook URL of the receiver.
    pub fn webhook_url(&self) -> String {
        format!("http://127.0.0.1:{WEBHOOK_PORT}/hook")
    }

    /// The broker's process id (from its pid file).
    fn broker_pid(&self) -> Result<u32> {
        let text = std::fs::read_to_string(self.kafka_dir.join("kafka.pid"))
            .context("reading the chaos broker's pid file")?;
        text.trim()
            .parse()
            .context("the chaos broker's pid file holds no pid")
    }

    /// Stops the broker process: gracefully (SIGTERM: it flushes its logs and closes its
    /// segments) or abruptly (SIGKILL: it recovers its logs at the next start). Waits until the
    /// process is gone.
    pub async fn stop_broker(&mut self, abrupt: bool) -> Result<()> {
        let pid = self.broker_pid()?;
        signal(pid, if abrupt { "KILL" } else { "TERM" });
        let start = Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}")).exists() && !zombie(pid) {
            if start.elapsed() > Duration::from_secs(60) {
                signal(pid, "KILL");
            }
            if start.elapsed() > Duration::from_secs(90) {
                bail!("the chaos broker (pid {pid}) did not exit");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.broker_running = false;
        wait_port_closed(BROKER_PORT, Duration::from_secs(30)).await
    }

    /// Freezes the broker process (SIGSTOP) for `frozen`, then resumes it (SIGCONT). Its
    /// connections stay open and unanswered, as under a long GC pause or a stalled controller.
    pub async fn freeze_broker(&mut self, frozen: Duration) -> Result<()> {
        let pid = self.broker_pid()?;
        signal(pid, "STOP");
        tokio::time::sleep(frozen).await;
        signal(pid, "CONT");
        Ok(())
    }

    /// Starts the broker again on its data directory.
    pub async fn start_broker(&mut self) -> Result<()> {
        start_kafka(&self.kafka_dir).await?;
        self.broker_running = true;
        Ok(())
    }

    /// Starts the Redis with append-only persistence (fsync on every write).
    pub async fn start_redis(&mut self) -> Result<()> {
        let data = self.dir.join("redis");
        std::fs::create_dir_all(&data)?;
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &REDIS_PORT.to_string(),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
            ])
            .arg(&data)
            .stdout(log_file(&self.dir, "redis.log")?)
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (`make dev-up` installs it)")?;
        self.redis = Some(child);
        wait_port(REDIS_PORT, "the chaos Redis", Duration::from_secs(30)).await
    }

    /// Stops Redis the way an orchestrator restart would (SIGTERM: it finishes its AOF).
    pub async fn stop_redis(&mut self) -> Result<()> {
        if let Some(mut c) = self.redis.take() {
            terminate(&mut c).await;
        }
        wait_port_closed(REDIS_PORT, Duration::from_secs(30)).await
    }

    /// Starts the scorer; `delay_ms` > 0 makes it slow.
    pub async fn start_scorer(&mut self, delay_ms: u64) -> Result<()> {
        let child = Command::new(&self.worker_bin)
            .args([
                "scorer",
                "--listen",
                &format!("127.0.0.1:{SCORER_PORT}"),
                "--fault-delay-ms",
                &delay_ms.to_string(),
            ])
            .stdout(log_file(&self.dir, "scorer.log")?)
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the scorer")?;
        self.scorer = Some(child);
        wait_port(SCORER_PORT, "the scorer", Duration::from_secs(30)).await
    }

    /// Stops the scorer abruptly.
    pub async fn stop_scorer(&mut self) -> Result<()> {
        if let Some(mut c) = self.scorer.take() {
            let _ = c.kill().await;
        }
        wait_port_closed(SCORER_PORT, Duration::from_secs(30)).await
    }

    /// Restarts the machine's PostgreSQL cluster.
    pub async fn restart_postgres(&self, down_for: Duration) -> Result<()> {
        let version = pg_version()?;
        run_pg_ctl(&version, "stop").await?;
        wait_port_closed(5432, Duration::from_secs(60)).await?;
        tokio::time::sleep(down_for).await;
        run_pg_ctl(&version, "start").await?;
        wait_port(5432, "PostgreSQL", Duration::from_secs(60)).await
    }

    /// Stops every process of the stack.
    pub async fn shutdown(mut self) {
        if let Ok(pid) = self.broker_pid() {
            signal(pid, "CONT");
        }
        if let Some(mut c) = self.scorer.take() {
            let _ = c.kill().await;
        }
        if let Some(mut c) = self.redis.take() {
            terminate(&mut c).await;
        }
        stop_kafka(&self.kafka_dir).await;
        self.broker_running = false;
    }
}

impl Drop for Stack {
    /// The broker runs in a session of its own (it outlives the shell that started it): stop it
    /// even when the run ends without `shutdown`.
    fn drop(&mut self) {
        if self.broker_running {
            // A frozen broker handles SIGTERM only once it runs again.
            if let Ok(pid) = self.broker_pid() {
                signal(pid, "CONT");
            }
            let _ = std::process::Command::new("bash")
                .arg(kafka_sh())
                .arg("stop")
                .arg(&self.kafka_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Starts (formatting its storage the first time) the chaos broker in `dir`, advertising the
/// proxy's address, and waits until it answers a Metadata request.
async fn start_kafka(dir: &Path) -> Result<()> {
    let status = Command::new("bash")
        .arg(kafka_sh())
        .arg("start")
        .arg(dir)
        .args([
            BROKER_PORT.to_string(),
            CONTROLLER_PORT.to_string(),
            format!("127.0.0.1:{PROXY_PORT}"),
        ])
        .stdout(Stdio::null())
        .stderr(log_file(dir.parent().unwrap_or(dir), "kafka-sh.log")?)
        .status()
        .await
        .context("running scripts/kafka.sh start")?;
    if !status.success() {
        bail!(
            "scripts/kafka.sh start failed ({status}); see kafka-sh.log in {} (Java and Maven: \
             `make dev-up` installs them)",
            dir.parent().unwrap_or(dir).display()
        );
    }
    let status = Command::new("bash")
        .arg(kafka_sh())
        .args(["ready", &format!("127.0.0.1:{BROKER_PORT}"), "120"])
        .stdout(Stdio::null())
        .stderr(log_file(dir.parent().unwrap_or(dir), "kafka-sh.log")?)
        .status()
        .await
        .context("running scripts/kafka.sh ready")?;
    if !status.success() {
        bail!(
            "the chaos broker did not become ready; see {}",
            dir.join("kafka.log").display()
        );
    }
    Ok(())
}

async fn stop_kafka(dir: &Path) {
    let _ = Command::new("bash")
        .arg(kafka_sh())
        .arg("stop")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Whether `pid` is a zombie (exited, not yet reaped by its parent).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn pg_version() -> Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .context(
            "the PostgreSQL restart scenario needs a Debian PostgreSQL cluster (/etc/postgresql)",
        )?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    versions.pop().context("no cluster under /etc/postgresql")
}

async fn run_pg_ctl(version: &str, action: &str) -> Result<()> {
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", action])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("running pg_ctlcluster")?;
    if !status.success() {
        bail!("pg_ctlcluster {version} main {action} failed: {status}");
    }
    Ok(())
}

/// Sends SIGTERM and waits up to 30 s, then SIGKILL.
pub async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        signal(pid, "TERM");
        if tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Sends a signal with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A log file in the run directory.
pub fn log_file(dir: &Path, name: &str) -> Result<Stdio> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .with_context(|| format!("opening {name}"))?;
    Ok(Stdio::from(f))
}
