//! A fleet of worker processes for one StreamConsumer: one consumer group, static or dynamic
//! membership, each member on its own HTTP port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use streamops_worker::error::EXIT_RESTART;
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

/// What [`Fleet::tend`] found.
#[derive(Debug, Default)]
pub struct Exits {
    /// Members that exited to be restarted and were started again (their ids).
    pub restarted: Vec<String>,
    /// Members that crashed, each with its exit status.
    pub crashed: Vec<String>,
}

/// How a member's exit is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It asked to be restarted.
    Restart,
    /// Anything else.
    Crash,
}

/// How an exit with `status` is handled: [`ExitKind::Restart`] only for
/// [`streamops_worker::error::EXIT_RESTART`].
pub fn exit_kind(status: ExitStatus) -> ExitKind {
    if status.code() == Some(i32::from(EXIT_RESTART)) {
        ExitKind::Restart
    } else {
        ExitKind::Crash
    }
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

    /// Handles members that exited on their own, as the kubelet would under restartPolicy
    /// Always for a worker that asked for it: one that exited with
    /// [`streamops_worker::error::EXIT_RESTART`] (its Kafka consumer was wedged; it drained
    /// first) is started again under the same instance id; any other exit is a crash, which fails
    /// the scenario, but the run goes on so that the reconciliation still reports what happened.
    pub fn tend(&mut self) -> Result<Exits> {
        let mut exited = Vec::new();
        for (id, m) in self.members.iter_mut() {
            if let Ok(Some(status)) = m.child.try_wait() {
                exited.push((id.clone(), status));
            }
        }
        let mut out = Exits::default();
        for (id, status) in exited {
            self.members.remove(&id);
            match exit_kind(status) {
                ExitKind::Restart => {
                    tracing::info!(member = %id, %status, "worker exited to be restarted (wedged consumer): restarting it");
                    self.start(&id)?;
                    out.restarted.push(id);
                }
                ExitKind::Crash => out.crashed.push(format!("{id} ({status})")),
            }
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn only_an_exit_with_ex_tempfail_restarts_a_member_and_anything_else_is_a_crash() {
        // Wait statuses: the exit code in the second byte, a signal in the low bits.
        assert_eq!(exit_kind(ExitStatus::from_raw(75 << 8)), ExitKind::Restart);
        assert_eq!(exit_kind(ExitStatus::from_raw(0)), ExitKind::Crash);
        assert_eq!(exit_kind(ExitStatus::from_raw(1 << 8)), ExitKind::Crash);
        // Killed by SIGKILL (9): no exit code at all.
        assert_eq!(exit_kind(ExitStatus::from_raw(9)), ExitKind::Crash);
    }

    /// A stand-in worker: exits with `$FAKE_EXIT` on its first start (recorded in
    /// `$FAKE_DIR/starts`), then stays up.
    const FAKE_WORKER: &str = r#"#!/bin/sh
echo "$*" >> "$FAKE_DIR/starts"
if [ "$(wc -l < "$FAKE_DIR/starts")" -eq 1 ]; then exit "$FAKE_EXIT"; fi
exec sleep 60
"#;

    /// Starts member w0 of a fleet of [`FAKE_WORKER`] whose first start exits with `code`, and
    /// tends the fleet until that exit is handled.
    async fn first_exit_handled(code: &str) -> (Fleet, Exits, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "streamops-chaos-fleet-{}-{code}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("worker.sh");
        std::fs::write(&bin, FAKE_WORKER).unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let env = vec![
            ("FAKE_DIR".to_string(), dir.display().to_string()),
            ("FAKE_EXIT".to_string(), code.to_string()),
        ];
        let mut fleet = Fleet::new(
            &bin,
            dir.join("config.yaml"),
            dir.clone(),
            env,
            0,
            Membership::Static,
        );
        // The script was just written: a child forked meanwhile by another test's thread may
        // still hold its write descriptor until that child's exec, and exec then fails with
        // ETXTBSY ("Text file busy"). Only that error is retried, for at most a second.
        let mut tries = 0;
        while let Err(e) = fleet.start("w0") {
            let busy = e
                .root_cause()
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
                == Some(26);
            tries += 1;
            assert!(busy && tries < 50, "{e:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let exits = fleet.tend().unwrap();
            if !exits.restarted.is_empty() || !exits.crashed.is_empty() {
                return (fleet, exits, dir);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the member's exit was not seen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_member_exiting_with_ex_tempfail_is_restarted_under_the_same_instance_id() {
        let (mut fleet, exits, dir) = first_exit_handled("75").await;
        assert_eq!(exits.restarted, vec!["w0".to_string()]);
        assert!(exits.crashed.is_empty(), "{:?}", exits.crashed);
        assert_eq!(fleet.running(), vec!["w0".to_string()]);
        // Started twice, both times as w0.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let starts = loop {
            let starts = std::fs::read_to_string(dir.join("starts")).unwrap_or_default();
            if starts.lines().count() >= 2 || std::time::Instant::now() >= deadline {
                break starts;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let starts: Vec<&str> = starts.lines().collect();
        assert_eq!(starts.len(), 2, "{starts:?}");
        assert!(
            starts.iter().all(|s| s.contains("--instance-id w0")),
            "{starts:?}"
        );
        fleet.stop_all().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_member_exiting_with_another_code_is_a_crash_and_is_not_restarted() {
        let (mut fleet, exits, dir) = first_exit_handled("1").await;
        assert!(exits.restarted.is_empty(), "{:?}", exits.restarted);
        assert_eq!(exits.crashed.len(), 1, "{:?}", exits.crashed);
        assert!(exits.crashed[0].starts_with("w0 "), "{:?}", exits.crashed);
        assert!(fleet.running().is_empty());
        fleet.stop_all().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
