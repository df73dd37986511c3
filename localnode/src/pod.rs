//! One pod: its address, its directory, a process per container (in a private mount namespace, with
//! the bind shim), probes, restarts, status, and deletion (SIGTERM, SIGKILL after the grace period,
//! then the final delete).

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::resolve::{self, Lookup, Mount};
use crate::{image_map, probe, Desired, Shared};

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A container's process state as reported in containerStatuses.
#[derive(Debug, Clone)]
enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        started_at: String,
        finished_at: String,
    },
}

impl State {
    fn to_json(&self) -> Value {
        match self {
            State::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            State::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            State::Terminated {
                exit_code,
                signal,
                reason,
                started_at,
                finished_at,
            } => {
                let mut t = json!({"exitCode": exit_code, "reason": reason, "startedAt": started_at, "finishedAt": finished_at});
                if let Some(s) = signal {
                    t["signal"] = json!(s);
                }
                json!({"terminated": t})
            }
        }
    }
}

struct Ctr {
    spec: Container,
    program: PathBuf,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<Mount>,
    pid: Option<i32>,
    /// Bumped on every start, so that the exit of an old process is told apart.
    generation: u64,
    restart_count: i32,
    state: State,
    last_state: Option<State>,
    started: bool,
    ready: bool,
    /// Set once the startup probe (if any) succeeded.
    startup_done: bool,
    ready_streak: (i32, i32),
    live_failures: i32,
    next_probe: Instant,
    probe_in_flight: bool,
    next_live: Instant,
    live_in_flight: bool,
    restart_at: Option<Instant>,
    backoff: Duration,
    run_since: Option<Instant>,
    done: bool,
}

enum Msg {
    Exited {
        idx: usize,
        generation: u64,
        status: std::process::ExitStatus,
    },
    Probe {
        idx: usize,
        generation: u64,
        kind: ProbeKind,
        result: Result<(), String>,
    },
}

#[derive(Clone, Copy)]
enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}_{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("pod")
    )
}

fn pod_ref(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("pod")
    )
}

/// Runs the pod until it is deleted (or the node shuts down).
pub async fn supervise(shared: Arc<Shared>, pod: Pod, mut desired: watch::Receiver<Desired>) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let terminal = phase == "Succeeded" || phase == "Failed";
    if terminal || *desired.borrow() != Desired::Run {
        // Nothing to run: a finished pod from before, or one deleted before it started.
        wait_for_deletion(&mut desired, terminal).await;
        let d = desired.borrow().clone();
        finish_deletion(&api, &pod, &d).await;
        return;
    }
    let Some(ip) = shared.ips.lock().ok().and_then(|mut p| p.take()) else {
        tracing::error!(pod = %pod_ref(&pod), "no pod address left");
        return;
    };
    tracing::info!(pod = %pod_ref(&pod), %ip, "starting pod");
    let dir = shared.state_dir.join("pods").join(pod_key(&pod));
    let mut runner = Runner {
        shared: shared.clone(),
        api: api.clone(),
        pod,
        ip,
        dir,
        ctrs: Vec::new(),
        start_time: now(),
        last_status: Value::Null,
        ready_since: now(),
        was_ready: false,
        hosts: String::new(),
    };
    runner.run(&mut desired).await;
    let final_desired = desired.borrow().clone();
    if final_desired != Desired::NodeShutdown {
        finish_deletion(&api, &runner.pod, &final_desired).await;
    }
    if let Ok(mut p) = shared.ips.lock() {
        p.release(ip);
    }
    let _ = std::fs::remove_dir_all(runner.dir.join("volumes"));
    tracing::info!(pod = %format!("{ns}/{name}"), "pod stopped");
}

async fn wait_for_deletion(desired: &mut watch::Receiver<Desired>, _terminal: bool) {
    while *desired.borrow() == Desired::Run {
        if desired.changed().await.is_err() {
            return;
        }
    }
}

/// Removes the pod object once its processes are gone (grace period 0, only this incarnation).
async fn finish_deletion(api: &Api<Pod>, pod: &Pod, desired: &Desired) {
    if !matches!(desired, Desired::Terminate(_)) {
        return;
    }
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    match api.delete(name, &dp).await {
        Ok(_) => tracing::info!(pod = %pod_ref(pod), "pod deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %pod_ref(pod), error = %e, "final delete failed"),
    }
}

struct Runner {
    shared: Arc<Shared>,
    api: Api<Pod>,
    pod: Pod,
    ip: Ipv4Addr,
    dir: PathBuf,
    ctrs: Vec<Ctr>,
    start_time: String,
    last_status: Value,
    ready_since: String,
    was_ready: bool,
    hosts: String,
}

impl Runner {
    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn grace(&self) -> i64 {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
    }

    /// Volumes, ServiceAccount credentials, hosts file, environments. Err: a reason to retry.
    async fn prepare(&mut self) -> Result<(), String> {
        let client = self.shared.client.clone();
        let ns = self
            .pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let mut lookup = Lookup::new(&client, &ns);
        let spec = self.pod.spec.clone().ok_or("pod without spec")?;
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let vols_dir = self.dir.join("volumes");
        let mut volume_paths = std::collections::HashMap::new();
        for vol in spec.volumes.iter().flatten() {
            let path = resolve::volume(
                &client,
                &mut lookup,
                &self.pod,
                self.ip,
                vol,
                &vols_dir.join(&vol.name),
            )
            .await?;
            volume_paths.insert(vol.name.clone(), path);
        }
        let sa_dir = vols_dir.join("localnode-serviceaccount");
        let with_sa = resolve::wants_service_account(&client, &self.pod).await?;
        if with_sa {
            resolve::write_service_account(&client, &mut lookup, &self.pod, &sa_dir).await?;
        }
        self.hosts = self.hosts_text();
        let hosts_path = self.dir.join("hosts");
        std::fs::write(&hosts_path, &self.hosts).map_err(|e| e.to_string())?;

        let mut ctrs = Vec::new();
        for c in &spec.containers {
            let image = c.image.clone().unwrap_or_default();
            let (program, argv) = image_map::program(
                &self.shared.images,
                &image,
                c.command.as_deref().unwrap_or_default(),
                c.args.as_deref().unwrap_or_default(),
            )?;
            if program.is_absolute() && !program.is_file() {
                return Err(format!(
                    "{} (mapped from image {image}) does not exist; build it first",
                    program.display()
                ));
            }
            let env = resolve::env(&mut lookup, &self.pod, c, self.ip).await?;
            let mut mounts = vec![Mount {
                source: hosts_path.clone(),
                target: "/etc/hosts".into(),
                read_only: true,
            }];
            for m in c.volume_mounts.iter().flatten() {
                let base = volume_paths
                    .get(&m.name)
                    .ok_or_else(|| format!("container {}: no volume {}", c.name, m.name))?;
                let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                    Some(sub) if !sub.split('/').any(|p| p == "..") => base.join(sub),
                    Some(sub) => return Err(format!("subPath {sub} escapes its volume")),
                    None => base.clone(),
                };
                mounts.push(Mount {
                    source,
                    target: m.mount_path.clone(),
                    read_only: m.read_only == Some(true),
                });
            }
            if with_sa {
                mounts.push(Mount {
                    source: sa_dir.clone(),
                    target: resolve::SA_DIR.into(),
                    read_only: true,
                });
            }
            ctrs.push(Ctr {
                spec: c.clone(),
                program,
                argv,
                env,
                mounts,
                pid: None,
                generation: 0,
                restart_count: 0,
                state: State::Waiting {
                    reason: "ContainerCreating".into(),
                    message: String::new(),
                },
                last_state: None,
                started: false,
                ready: false,
                startup_done: c.startup_probe.is_none(),
                ready_streak: (0, 0),
                live_failures: 0,
                next_probe: Instant::now(),
                probe_in_flight: false,
                next_live: Instant::now(),
                live_in_flight: false,
                restart_at: None,
                backoff: Duration::from_secs(1),
                run_since: None,
                done: false,
            });
        }
        self.ctrs = ctrs;
        Ok(())
    }

    fn hosts_text(&self) -> String {
        let aliases: Vec<(String, String)> = self
            .shared
            .args
            .host_aliases
            .iter()
            .filter_map(|a| {
                a.split_once('=')
                    .map(|(h, ip)| (h.to_string(), ip.to_string()))
            })
            .collect();
        let services = self
            .shared
            .services
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        resolve::hosts_file(&self.pod, self.ip, &aliases, &services)
    }

    async fn run(&mut self, desired: &mut watch::Receiver<Desired>) {
        // Prepare, retrying while the pod wants to run.
        let mut last_reason = String::new();
        loop {
            match self.prepare().await {
                Ok(()) => break,
                Err(reason) => {
                    if reason != last_reason {
                        tracing::warn!(pod = %pod_ref(&self.pod), %reason, "cannot start the pod yet (retrying every 3 s)");
                        last_reason = reason.clone();
                    }
                    self.patch_pending("CreateContainerConfigError", &reason)
                        .await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                        r = desired.changed() => if r.is_err() { return; },
                    }
                    if *desired.borrow() != Desired::Run {
                        return;
                    }
                }
            }
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        for idx in 0..self.ctrs.len() {
            self.start(idx, &tx);
        }
        self.publish().await;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_hosts_check = Instant::now();
        loop {
            tokio::select! {
                r = desired.changed() => {
                    if r.is_err() || *desired.borrow() != Desired::Run {
                        break;
                    }
                }
                Some(msg) = rx.recv() => self.handle(msg, &tx),
                _ = tick.tick() => {
                    self.tick(&tx);
                    if last_hosts_check.elapsed() > Duration::from_secs(3) {
                        last_hosts_check = Instant::now();
                        self.refresh_hosts();
                    }
                }
            }
            self.publish().await;
        }
        let grace = match desired.borrow().clone() {
            Desired::Terminate(g) => g,
            Desired::NodeShutdown => self.grace().min(10),
            _ => 0,
        };
        self.stop_all(grace, &mut rx).await;
        let terminating = matches!(*desired.borrow(), Desired::Terminate(_));
        if terminating {
            self.publish().await;
        }
    }

    fn refresh_hosts(&mut self) {
        let text = self.hosts_text();
        if text != self.hosts {
            // In place: the file is bind-mounted, a rename would not be seen.
            if std::fs::write(self.dir.join("hosts"), &text).is_ok() {
                self.hosts = text;
            }
        }
    }

    fn start(&mut self, idx: usize, tx: &mpsc::UnboundedSender<Msg>) {
        let shared = self.shared.clone();
        let ip = self.ip;
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let dir = self.dir.clone();
        let c = &mut self.ctrs[idx];
        c.generation += 1;
        c.ready = false;
        c.ready_streak = (0, 0);
        c.live_failures = 0;
        c.startup_done = c.spec.startup_probe.is_none();
        c.restart_at = None;
        let initial_delay = |p: &Option<Probe>| {
            p.as_ref()
                .and_then(|p| p.initial_delay_seconds)
                .unwrap_or(0)
        };
        c.next_probe = Instant::now()
            + Duration::from_secs(
                initial_delay(&c.spec.startup_probe)
                    .min(initial_delay(&c.spec.readiness_probe))
                    .max(0) as u64,
            );
        match spawn(&shared, &dir, &name, ip, c) {
            Ok(child) => {
                let pid = child.id().map(|p| p as i32);
                c.pid = pid;
                c.started = true;
                c.run_since = Some(Instant::now());
                c.state = State::Running { started_at: now() };
                if let Some(pid) = pid {
                    let _ =
                        std::fs::write(dir.join(format!("{}.pid", c.spec.name)), pid.to_string());
                }
                tracing::info!(pod = %pod_ref(&self.pod), container = %c.spec.name, ?pid, program = %c.program.display(), "container started");
                let generation = c.generation;
                let tx = tx.clone();
                let mut child = child;
                tokio::spawn(async move {
                    if let Ok(status) = child.wait().await {
                        let _ = tx.send(Msg::Exited {
                            idx,
                            generation,
                            status,
                        });
                    }
                });
            }
            Err(e) => {
                tracing::warn!(pod = %pod_ref(&self.pod), container = %c.spec.name, error = %e, "cannot start the container");
                c.pid = None;
                c.state = State::Waiting {
                    reason: "RunContainerError".into(),
                    message: e,
                };
                c.restart_at = Some(Instant::now() + c.backoff);
                c.backoff = (c.backoff * 2).min(Duration::from_secs(30));
            }
        }
    }

    fn handle(&mut self, msg: Msg, tx: &mpsc::UnboundedSender<Msg>) {
        match msg {
            Msg::Exited {
                idx,
                generation,
                status,
            } => {
                let policy = self.restart_policy();
                let c = &mut self.ctrs[idx];
                if generation != c.generation {
                    return;
                }
                use std::os::unix::process::ExitStatusExt;
                let code = status.code().unwrap_or(128 + status.signal().unwrap_or(0));
                let started_at = match &c.state {
                    State::Running { started_at } => started_at.clone(),
                    _ => now(),
                };
                let term = State::Terminated {
                    exit_code: code,
                    signal: status.signal(),
                    reason: if code == 0 {
                        "Completed".into()
                    } else {
                        "Error".into()
                    },
                    started_at,
                    finished_at: now(),
                };
                tracing::info!(pod = %pod_ref(&self.pod), container = %c.spec.name, exit_code = code, "container exited");
                c.pid = None;
                c.ready = false;
                let restart = policy == "Always" || (policy == "OnFailure" && code != 0);
                if restart {
                    if c.run_since
                        .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
                    {
                        c.backoff = Duration::from_secs(1);
                    }
                    c.last_state = Some(term);
                    c.state = State::Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: format!("back-off {:?} restarting failed container", c.backoff),
                    };
                    c.restart_at = Some(Instant::now() + c.backoff);
                    c.backoff = (c.backoff * 2).min(Duration::from_secs(30));
                } else {
                    c.state = term;
                    c.done = true;
                }
            }
            Msg::Probe {
                idx,
                generation,
                kind,
                result,
            } => {
                let c = &mut self.ctrs[idx];
                match kind {
                    ProbeKind::Liveness => c.live_in_flight = false,
                    _ => c.probe_in_flight = false,
                }
                if generation != c.generation || c.pid.is_none() {
                    return;
                }
                match kind {
                    ProbeKind::Startup => {
                        let threshold = c
                            .spec
                            .startup_probe
                            .as_ref()
                            .and_then(|p| p.failure_threshold)
                            .unwrap_or(3);
                        if result.is_ok() {
                            c.startup_done = true;
                        } else {
                            c.live_failures += 1;
                            if c.live_failures >= threshold {
                                tracing::warn!(pod = %pod_ref(&self.pod), container = %c.spec.name, "startup probe failed; killing");
                                kill(c.pid, libc::SIGKILL);
                            }
                        }
                    }
                    ProbeKind::Liveness => {
                        let threshold = c
                            .spec
                            .liveness_probe
                            .as_ref()
                            .and_then(|p| p.failure_threshold)
                            .unwrap_or(3);
                        if result.is_ok() {
                            c.live_failures = 0;
                        } else {
                            c.live_failures += 1;
                            if c.live_failures >= threshold {
                                tracing::warn!(pod = %pod_ref(&self.pod), container = %c.spec.name, "liveness probe failed; killing");
                                kill(c.pid, libc::SIGKILL);
                            }
                        }
                    }
                    ProbeKind::Readiness => {
                        let p = c.spec.readiness_probe.as_ref();
                        let succ = p.and_then(|p| p.success_threshold).unwrap_or(1);
                        let fail = p.and_then(|p| p.failure_threshold).unwrap_or(3);
                        match result {
                            Ok(()) => {
                                c.ready_streak = (c.ready_streak.0 + 1, 0);
                                if c.ready_streak.0 >= succ {
                                    c.ready = true;
                                }
                            }
                            Err(_) => {
                                c.ready_streak = (0, c.ready_streak.1 + 1);
                                if c.ready_streak.1 >= fail {
                                    c.ready = false;
                                }
                            }
                        }
                    }
                }
            }
        }
        let _ = tx;
    }

    fn tick(&mut self, tx: &mpsc::UnboundedSender<Msg>) {
        for idx in 0..self.ctrs.len() {
            let due_restart = self.ctrs[idx]
                .restart_at
                .is_some_and(|t| Instant::now() >= t);
            if due_restart && self.ctrs[idx].pid.is_none() {
                self.ctrs[idx].restart_count += 1;
                self.start(idx, tx);
                continue;
            }
            let ip = self.ip;
            let c = &mut self.ctrs[idx];
            if c.pid.is_none() {
                continue;
            }
            // Without a readiness probe a running container is ready once started.
            if c.spec.readiness_probe.is_none() && c.startup_done {
                c.ready = true;
            }
            let now = Instant::now();
            let mut due: Vec<(ProbeKind, Probe)> = Vec::new();
            if !c.probe_in_flight && now >= c.next_probe {
                let p = if c.startup_done {
                    c.spec
                        .readiness_probe
                        .clone()
                        .map(|p| (ProbeKind::Readiness, p))
                } else {
                    c.spec
                        .startup_probe
                        .clone()
                        .map(|p| (ProbeKind::Startup, p))
                };
                if let Some((kind, p)) = p {
                    // Checked at least every 2 s here, so that Ready follows quickly.
                    let period = (p.period_seconds.unwrap_or(10).max(1) as u64).min(2);
                    c.next_probe = now + Duration::from_secs(period);
                    c.probe_in_flight = true;
                    due.push((kind, p));
                }
            }
            if c.startup_done && !c.live_in_flight && now >= c.next_live {
                if let Some(p) = c.spec.liveness_probe.clone() {
                    let first =
                        c.run_since.is_some_and(|t| {
                            t.elapsed()
                                < Duration::from_secs(
                                    p.initial_delay_seconds.unwrap_or(0).max(0) as u64
                                )
                        });
                    if !first {
                        c.next_live =
                            now + Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
                        c.live_in_flight = true;
                        due.push((ProbeKind::Liveness, p));
                    }
                }
            }
            let generation = c.generation;
            for (kind, probe) in due {
                let container = c.spec.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let result = probe::check(&container, &probe, ip).await;
                    let _ = tx.send(Msg::Probe {
                        idx,
                        generation,
                        kind,
                        result,
                    });
                });
            }
        }
    }

    async fn stop_all(&mut self, grace: i64, rx: &mut mpsc::UnboundedReceiver<Msg>) {
        let pids: Vec<i32> = self.ctrs.iter().filter_map(|c| c.pid).collect();
        tracing::info!(pod = %pod_ref(&self.pod), grace, ?pids, "stopping: SIGTERM");
        for c in &mut self.ctrs {
            c.restart_at = None;
            c.ready = false;
            kill(c.pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(grace.max(0) as u64);
        while self.ctrs.iter().any(|c| c.pid.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::info!(pod = %pod_ref(&self.pod), "grace period over: SIGKILL");
                for c in &self.ctrs {
                    kill(c.pid, libc::SIGKILL);
                }
                // The exit is reported once the process is reaped.
                let until = Instant::now() + Duration::from_secs(10);
                while self.ctrs.iter().any(|c| c.pid.is_some()) && Instant::now() < until {
                    match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                        Ok(Some(Msg::Exited {
                            idx, generation, ..
                        })) if self.ctrs[idx].generation == generation => self.ctrs[idx].pid = None,
                        _ => {}
                    }
                }
                break;
            }
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(Msg::Exited {
                    idx,
                    generation,
                    status,
                })) if self.ctrs[idx].generation == generation => {
                    use std::os::unix::process::ExitStatusExt;
                    let c = &mut self.ctrs[idx];
                    c.pid = None;
                    let started_at = match &c.state {
                        State::Running { started_at } => started_at.clone(),
                        _ => now(),
                    };
                    let code = status.code().unwrap_or(128 + status.signal().unwrap_or(0));
                    c.state = State::Terminated {
                        exit_code: code,
                        signal: status.signal(),
                        reason: if code == 0 {
                            "Completed".into()
                        } else {
                            "Error".into()
                        },
                        started_at,
                        finished_at: now(),
                    };
                    c.done = true;
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => break,
            }
        }
        // Whatever the container left behind in its process group.
        for c in &self.ctrs {
            kill(c.pid, libc::SIGKILL);
        }
    }

    fn status(&mut self) -> Value {
        let all_ready = !self.ctrs.is_empty() && self.ctrs.iter().all(|c| c.ready);
        if all_ready != self.was_ready {
            self.was_ready = all_ready;
            self.ready_since = now();
        }
        let policy = self.restart_policy();
        let phase = if self.ctrs.iter().all(|c| c.done) && !self.ctrs.is_empty() {
            let ok = self
                .ctrs
                .iter()
                .all(|c| matches!(c.state, State::Terminated { exit_code: 0, .. }));
            if ok || policy == "Always" {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if self.ctrs.iter().any(|c| c.started) {
            "Running"
        } else {
            "Pending"
        };
        let flag = |b: bool| if b { "True" } else { "False" };
        let not_ready: Vec<String> = self
            .ctrs
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.spec.name.clone())
            .collect();
        let (reason, message) = if all_ready {
            (Value::Null, Value::Null)
        } else if phase == "Succeeded" || phase == "Failed" {
            (json!("PodCompleted"), Value::Null)
        } else {
            (
                json!("ContainersNotReady"),
                json!(format!(
                    "containers with unready status: [{}]",
                    not_ready.join(" ")
                )),
            )
        };
        let cond = |t: &str, s: &str, since: &str| {
            let mut c =
                json!({"type": t, "status": s, "lastProbeTime": null, "lastTransitionTime": since});
            if s == "False" {
                c["reason"] = reason.clone();
                c["message"] = message.clone();
            }
            c
        };
        let start = self.start_time.clone();
        let ready_since = self.ready_since.clone();
        let statuses: Vec<Value> = self
            .ctrs
            .iter()
            .map(|c| {
                let mut s = json!({
                    "name": c.spec.name,
                    "image": c.spec.image.clone().unwrap_or_default(),
                    "imageID": format!("localnode://{}", c.program.display()),
                    "ready": c.ready,
                    "started": c.pid.is_some() && c.startup_done,
                    "restartCount": c.restart_count,
                    "state": c.state.to_json(),
                    "lastState": c.last_state.as_ref().map(State::to_json).unwrap_or(json!({})),
                });
                if let Some(pid) = c.pid {
                    s["containerID"] = json!(format!("localnode://{pid}"));
                }
                s
            })
            .collect();
        json!({"status": {
            "phase": phase,
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": start,
            "conditions": [
                cond("PodReadyToStartContainers", "True", &start),
                cond("Initialized", "True", &start),
                cond("Ready", flag(all_ready), &ready_since),
                cond("ContainersReady", flag(all_ready), &ready_since),
                cond("PodScheduled", "True", &start),
            ],
            "containerStatuses": statuses,
        }})
    }

    async fn publish(&mut self) {
        let status = self.status();
        if status == self.last_status {
            return;
        }
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        match self
            .api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            Ok(_) => self.last_status = status,
            Err(kube::Error::Api(e)) if e.code == 404 => self.last_status = status,
            Err(e) => tracing::warn!(pod = %pod_ref(&self.pod), error = %e, "status update failed"),
        }
    }

    async fn patch_pending(&self, reason: &str, message: &str) {
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let statuses: Vec<Value> = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| json!({"name": c.name, "image": c.image, "imageID": "", "ready": false, "restartCount": 0,
                             "state": {"waiting": {"reason": reason, "message": message}}}))
            .collect();
        let patch = json!({"status": {"phase": "Pending", "hostIP": "127.0.0.1", "containerStatuses": statuses,
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "message": message, "lastTransitionTime": now()},
            {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now()},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
        ]}});
        if let Err(e) = self
            .api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(pod = %pod_ref(&self.pod), error = %e, "status update failed");
        }
    }
}

/// Signals the container's process group (each container runs in its own session).
fn kill(pid: Option<i32>, sig: i32) {
    if let Some(pid) = pid.filter(|p| *p > 1) {
        // SAFETY: kill(2) has no memory-safety requirements.
        unsafe {
            libc::kill(-pid, sig);
            libc::kill(pid, sig);
        }
    }
}

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Creates the mount point on the host when it is missing (a file for a file source).
fn ensure_target(source: &Path, target: &Path) -> std::io::Result<()> {
    if target.exists() {
        return Ok(());
    }
    if source.is_file() {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(target, b"")
    } else {
        std::fs::create_dir_all(target)
    }
}

fn spawn(
    shared: &Shared,
    dir: &Path,
    pod_name: &str,
    ip: Ipv4Addr,
    c: &Ctr,
) -> Result<tokio::process::Child, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let log_path = dir.join(format!("{}.log", c.spec.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    use std::io::Write;
    let mut header = log.try_clone().map_err(|e| e.to_string())?;
    let _ = writeln!(
        header,
        "### {} localnode: starting {} {:?} (pod IP {ip})",
        now(),
        c.program.display(),
        c.argv
    );

    let mut binds = Vec::new();
    for m in &c.mounts {
        ensure_target(&m.source, Path::new(&m.target))
            .map_err(|e| format!("mount point {}: {e}", m.target))?;
        binds.push((
            cstring(&m.source).map_err(|e| e.to_string())?,
            cstring(Path::new(&m.target)).map_err(|e| e.to_string())?,
            m.read_only,
        ));
    }
    let mut cmd = tokio::process::Command::new(&c.program);
    cmd.args(&c.argv)
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| {
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
            }),
        )
        .env("HOME", "/")
        .env("LANG", "C.UTF-8")
        .env("HOSTNAME", pod_name)
        .env("KUBERNETES_SERVICE_HOST", &shared.service_host)
        .env("KUBERNETES_SERVICE_PORT", shared.service_port.to_string())
        .env(
            "KUBERNETES_PORT",
            format!("tcp://{}:{}", shared.service_host, shared.service_port),
        )
        .env("LD_PRELOAD", &shared.args.bind_shim)
        .env("LOCALNODE_POD_IP", ip.to_string())
        .envs(c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(c.spec.working_dir.as_deref().unwrap_or("/"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .kill_on_drop(false);
    let root = CString::new("/").expect("no NUL");
    let none = CString::new("none").expect("no NUL");
    // SAFETY: runs in the forked child before exec; only async-signal-safe system calls on data
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                none.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for (src, dst, ro) in &binds {
                check(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                if *ro {
                    check(libc::mount(
                        std::ptr::null(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?;
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("{}: {e}", c.program.display()))
}
