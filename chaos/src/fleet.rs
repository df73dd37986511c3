//! A fleet of worker processes for one StreamConsumer: one consumer group, static or dynamic
//! membership, each member on its own HTTP port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

use crate::stack::{log_file, terminate};

/// How the members join the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// `--instance-id w<N>`, as the operator runs pods (`group.instance.id` = the pod name).
    Static,
    /// No instance id (the worker's default): a graceful stop leaves the group.
    Dynamic,
}

/// One worker process.
pub struct Member {
    child: Child,
    /// Its HTTP port.
    pub port: u16,
}

/// The worker processes of one lane.
pub struct Fleet {
    bin: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    base_port: u16,
    membership: Membership,
    members: BTreeMap<String, Member>,
    /// Peak resident set size seen, in KiB.
    pub peak_rss_kib: u64,
}

impl Fleet {
    /// A fleet running `config` with the given environment.
    pub fn new(
        bin: &Path,
        config: PathBuf,
        dir: PathBuf,
        env: Vec<(String, String)>,
        base_port: u16,
        membership: Membership,
    ) -> Self {
        Self {
            bin: bin.to_path_buf(),
            config,
            dir,
            env,
            base_port,
            membership,
            members: BTreeMap::new(),
            peak_rss_kib: 0,
        }
    }

    /// The instance id of member `i`.
    pub fn id(i: usize) -> String {
        format!("w{i}")
    }

    /// Starts member `id` (again, after a kill: with static membership the same id reclaims its
    /// partitions at once).
    pub fn start(&mut self, id: &str) -> Result<()> {
        let index: u16 = id
            .trim_start_matches('w')
            .parse()
            .context("instance ids are w<N>")?;
        let port = self.base_port + index;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run").arg("--config").arg(&self.config);
        if self.membership == Membership::Static {
            cmd.args(["--instance-id", id]);
        }
        let child = cmd
            .args(["--http-listen", &format!("127.0.0.1:{port}")])
            .args(["--log-format", "json"])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("STREAMOPS_CHAOS_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log_file(&self.dir, &format!("{id}.log"))?)
            .stderr(log_file(&self.dir, &format!("{id}.log"))?)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {id}"))?;
        self.members.insert(id.to_string(), Member { child, port });
        Ok(())
    }

    /// Running member ids.
    pub fn running(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }

    /// SIGKILLs member `id`.
    pub async fn kill(&mut self, id: &str) {
        if let Some(mut m) = self.members.remove(id) {
            let _ = m.child.kill().await;
        }
    }

    /// Stops member `id` gracefully (SIGTERM) and waits for it.
    pub async fn stop(&mut self, id: &str) {
        if let Some(mut m) = self.members.remove(id) {
            terminate(&mut m.child).await;
        }
    }

    /// Stops every member gracefully.
    pub async fn stop_all(&mut self) {
        let ids = self.running();
        for id in ids {
            self.stop(&id).await;
        }
    }

    /// Forgets members that exited on their own and returns them: a crash fails the scenario, but
    /// the run goes on so that the reconciliation still reports what happened.
    pub fn reap_exited(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        for (id, m) in self.members.iter_mut() {
            if let Ok(Some(status)) = m.child.try_wait() {
                exited.push((id.clone(), status));
            }
        }
        for (id, _) in &exited {
            self.members.remove(id);
        }
        exited
            .into_iter()
            .map(|(id, status)| format!("{id} ({status})"))
            .collect()
    }

    /// Samples the members' resident set sizes and keeps the peak.
    pub fn sample_rss(&mut self) {
        for m in self.members.values() {
            if let Some(pid) = m.child.id() {
                if let Some(kib) = rss_kib(pid) {
                    self.peak_rss_kib = self.peak_rss_kib.max(kib);
                }
            }
        }
    }

    /// Waits until every member answers 200 on /readyz, up to `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let start = std::time::Instant::now();
        'outer: while start.elapsed() < limit {
            for m in self.members.values() {
                if !ready(m.port).await {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'outer;
                }
            }
            return true;
        }
        false
    }
}

async fn ready(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let req =
        format!("GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 200")
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
