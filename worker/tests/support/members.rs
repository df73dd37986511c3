//! Group members without a static identity (no `--instance-id`), as a Deployment's pods are
//! when the operator leaves `STREAMOPS_INSTANCE_ID` unset. Include with
//! `#[path = "support/members.rs"] mod members;` next to `mod support;`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::{exited_after_sigterm, sigterm, TestEnv, PATIENCE};

/// A worker subprocess with dynamic group membership.
pub struct DynamicMember {
    child: Child,
    /// HTTP address.
    pub http: String,
    /// Log file.
    pub log: PathBuf,
}

impl DynamicMember {
    /// Starts a worker for `env` without a `group.instance.id`; `name` only names its files.
    pub fn start(env: &TestEnv, name: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let http = format!("127.0.0.1:{port}");
        let cfg_path = env.dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg_path, env.config.to_yaml().expect("config renders"))
            .expect("write config");
        let log = env.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_streamops-worker"))
            .args(["run", "--config"])
            .arg(&cfg_path)
            .args(["--http-listen", &http, "--log-format", "json"])
            .env("STREAMOPS_DATABASE_URL", &env.db_url)
            .env("RUST_LOG", "info,streamops_worker=debug")
            .env_remove("STREAMOPS_INSTANCE_ID")
            .env_remove("STREAMOPS_KAFKA_CONSUMER_OVERRIDES")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start streamops-worker");
        Self { child, http, log }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.http).ok()?;
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

    /// Sum of the samples of `/metrics` starting with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.get("/metrics")
            .map(|r| r.1)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some((200, _)) = self.get("/readyz") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "worker exited with {status} before becoming ready; log: {}",
                    self.log.display()
                );
            }
            assert!(
                start.elapsed() < PATIENCE,
                "worker never became ready; log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the member owns at least `n` partitions.
    pub async fn wait_for_partitions(&self, n: f64) {
        let start = Instant::now();
        while self.metric("streamops_assigned_partitions") < n {
            assert!(
                start.elapsed() < PATIENCE,
                "the member never owned {n} partitions; log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The log text.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> ExitStatus {
        sigterm(&self.child);
        let start = Instant::now();
        loop {
            if let Some(status) = exited_after_sigterm(&mut self.child, start, &self.log) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for DynamicMember {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
