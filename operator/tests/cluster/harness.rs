//! The local control plane (scripts/cluster-up.sh: etcd, kube-apiserver, kube-controller-manager,
//! built from Go modules) and what the tests do with it: an admin client, kubectl and helm, one
//! namespace per test (dumped when the test fails), and the operator as a subprocess that
//! authenticates as the chart's ServiceAccount with a TokenRequest token.
//!
//! The control plane is started once per test binary (or reused when it already runs); if it
//! cannot start, every test fails with cluster-up's message.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

/// Namespace and name of the chart release every operator test runs under (cluster-wide mode,
/// leader election forced on so its leader-election Role exists).
pub const SYSTEM_NS: &str = "streamops-system";
pub const RELEASE: &str = "streamops";
/// The chart's names for that release: `<fullname>-operator` for the ServiceAccount, the
/// ClusterRole and the Lease.
pub const OPERATOR_SA: &str = "streamops-operator";
pub const LEASE_NAME: &str = "streamops-operator";
/// Label of every namespace a test creates.
pub const TEST_LABEL: &str = "streamops.dev/cluster-test";

/// Paths of the running control plane and its tools.
#[derive(Debug)]
pub struct Env {
    pub root: PathBuf,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// Scratch directory of this test binary (helm home, operator kubeconfigs and logs).
    pub scratch: PathBuf,
    /// The API server URL and its CA (base64), for the operator's kubeconfigs.
    pub server: String,
    pub ca_data: String,
}

static ENV: OnceLock<Result<Env, String>> = OnceLock::new();

/// The control plane, started (or found running) on first use, with the CRD applied by
/// `kubectl apply -f crds/` and the chart installed as release `streamops` in `streamops-system`.
pub fn env() -> &'static Env {
    match ENV.get_or_init(setup) {
        Ok(env) => env,
        Err(e) => panic!("the local control plane is not usable: {e}"),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ has a parent")
        .to_path_buf()
}

fn setup() -> Result<Env, String> {
    let root = root();
    let up = Command::new("bash")
        .arg(root.join("scripts/cluster-up.sh"))
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cannot run scripts/cluster-up.sh: {e}"))?;
    let up_text = format!(
        "{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    if !up.status.success() {
        return Err(format!(
            "scripts/cluster-up.sh exited with {}:\n{up_text}",
            up.status
        ));
    }
    eprintln!("{up_text}");
    let print = Command::new("bash")
        .arg(root.join("scripts/cluster-build.sh"))
        .arg("--print")
        .output()
        .map_err(|e| format!("cannot run scripts/cluster-build.sh --print: {e}"))?;
    let paths = String::from_utf8_lossy(&print.stdout).to_string();
    let path_of = |key: &str| -> Result<PathBuf, String> {
        paths
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(PathBuf::from)
            .ok_or_else(|| format!("cluster-build.sh --print names no {key}"))
    };
    let kubeconfig = root.join(".dev/cluster/kubeconfig");
    let kc = Kubeconfig::read_from(&kubeconfig)
        .map_err(|e| format!("cannot read {}: {e}", kubeconfig.display()))?;
    let cluster = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .ok_or("the admin kubeconfig has no cluster")?;
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cluster-tests-{}", std::process::id()));
    fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let env = Env {
        kubectl: path_of("KUBECTL")?,
        helm: path_of("HELM")?,
        server: cluster.server.ok_or("the admin kubeconfig has no server")?,
        ca_data: cluster
            .certificate_authority_data
            .ok_or("the admin kubeconfig has no CA data")?,
        root,
        kubeconfig,
        scratch,
    };

    // The CRD, the way the README installs it.
    let out = env.kubectl_output(&["apply", "-f", "crds/"]);
    if !out.status.success() {
        return Err(format!(
            "kubectl apply -f crds/ failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = env.kubectl_output(&[
        "wait",
        "--for=condition=Established",
        "crd/streamconsumers.streamops.dev",
        "--timeout=60s",
    ]);
    if !out.status.success() {
        return Err(format!(
            "the CRD is not Established: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // The operator's ServiceAccount and RBAC, from the chart.
    let out = env.helm_output(&[
        "upgrade",
        "--install",
        RELEASE,
        "charts/streamops",
        "--namespace",
        SYSTEM_NS,
        "--create-namespace",
        "--set",
        "leaderElection.force=true",
    ]);
    if !out.status.success() {
        return Err(format!(
            "helm upgrade --install {RELEASE} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(env)
}

impl Env {
    /// `kubectl --kubeconfig <admin> ARGS` in the repository root.
    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .current_dir(&self.root)
            .output()
            .expect("kubectl runs")
    }

    /// kubectl as admin; panics with its stderr unless it succeeds; returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `helm ARGS` against the control plane, with its own config/cache/data directories.
    pub fn helm_output(&self, args: &[&str]) -> Output {
        let home = self.scratch.join("helm");
        Command::new(&self.helm)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .current_dir(&self.root)
            .output()
            .expect("helm runs")
    }

    /// helm; panics with its stderr unless it succeeds; returns stdout.
    pub fn helm(&self, args: &[&str]) -> String {
        let out = self.helm_output(args);
        assert!(
            out.status.success(),
            "helm {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A TokenRequest token for a ServiceAccount (`kubectl create token`).
    pub fn token(&self, namespace: &str, service_account: &str) -> String {
        self.kubectl(&[
            "create",
            "token",
            service_account,
            "-n",
            namespace,
            "--duration=2h",
        ])
        .trim()
        .to_string()
    }

    /// Writes a kubeconfig that authenticates with `token`; returns its path.
    pub fn token_kubeconfig(&self, file: &str, token: &str, namespace: &str) -> PathBuf {
        let path = self.scratch.join(file);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context:\n    cluster: local\n    user: sa\n    namespace: {namespace}\ncurrent-context: sa\n",
            self.server, self.ca_data
        );
        fs::write(&path, text).expect("write a kubeconfig");
        path
    }
}

/// A client with the admin's rights (system:masters).
pub async fn admin() -> Client {
    let env = env();
    let kc = Kubeconfig::read_from(&env.kubeconfig).expect("admin kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("admin config");
    Client::try_from(config).expect("admin client")
}

/// A name unique to this run, usable as a namespace or object name.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{}",
        millis % 10_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` every 250 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A namespace for one test. When the test fails, its objects, events and the operator's
/// StreamConsumers are printed; the namespace is deleted either way (without waiting).
pub struct TestNs {
    pub name: String,
}

impl TestNs {
    pub async fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {TEST_LABEL: "true"}}
        }))
        .expect("a namespace");
        Api::<Namespace>::all(admin().await)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("cannot create namespace {name}: {e}"));
        Self { name }
    }

    /// Prints the namespace's state (for failures).
    pub fn dump(&self) {
        let env = env();
        eprintln!("==== state of namespace {} ====", self.name);
        for args in [
            vec![
                "get",
                "streamconsumers,deployments,replicasets,pods,configmaps,services,poddisruptionbudgets",
                "-o",
                "wide",
            ],
            vec!["get", "streamconsumers", "-o", "yaml"],
            vec!["get", "events", "--sort-by=.lastTimestamp"],
            vec!["get", "events.events.k8s.io", "-o", "custom-columns=REASON:.reason,NOTE:.note,OBJ:.regarding.name"],
        ] {
            let mut full = args.clone();
            full.extend(["-n", self.name.as_str()]);
            let out = env.kubectl_output(&full);
            eprintln!(
                "$ kubectl {}\n{}{}",
                full.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let _ = env().kubectl_output(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// A free TCP port on loopback (for an operator's metrics endpoint).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How to run one operator process.
#[derive(Debug, Clone)]
pub struct OperatorSpec {
    /// The ServiceAccount it authenticates as (its namespace is the operator's own: POD_NAMESPACE).
    pub sa_namespace: String,
    pub service_account: String,
    /// `--namespace`: what it watches (`None`: all namespaces).
    pub watch: Option<String>,
    pub leader_election: bool,
    pub lease_name: String,
    /// POD_NAME: the start of its leader identity.
    pub pod_name: String,
    /// Further command-line arguments (the admin's policy: `--job-triggers`, ...).
    pub args: Vec<String>,
}

impl OperatorSpec {
    /// The chart release's operator, watching one namespace, without leader election.
    pub fn watching(namespace: &str) -> Self {
        Self {
            sa_namespace: SYSTEM_NS.into(),
            service_account: OPERATOR_SA.into(),
            watch: Some(namespace.into()),
            leader_election: false,
            lease_name: LEASE_NAME.into(),
            pod_name: unique("operator"),
            args: Vec::new(),
        }
    }
}

/// `streamops-operator run` as a subprocess, killed on drop; its log is printed when the test
/// fails.
pub struct Operator {
    child: Child,
    pub name: String,
    pub log: PathBuf,
    pub metrics_port: u16,
}

impl Operator {
    pub fn start(spec: OperatorSpec) -> Self {
        let env = env();
        let token = env.token(&spec.sa_namespace, &spec.service_account);
        let kubeconfig = env.token_kubeconfig(
            &format!("{}.kubeconfig", spec.pod_name),
            &token,
            &spec.sa_namespace,
        );
        let log = env.scratch.join(format!("{}.log", spec.pod_name));
        let file = fs::File::create(&log).expect("operator log file");
        let metrics_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamops-operator"));
        cmd.arg("run")
            .arg("--log-format=text")
            .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
            .arg(format!("--lease-name={}", spec.lease_name))
            .arg(format!("--leader-election={}", spec.leader_election))
            // Lag readings every 5 s, so `status.lag` shows without a long wait.
            .arg("--lag-interval=5")
            .arg("--lag-status-interval=1")
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", &spec.sa_namespace)
            .env("POD_NAME", &spec.pod_name)
            .env("RUST_LOG", "info,streamops_operator=debug")
            // The admin's broker allow-list (chart value lag.brokers): the dev stack's Kafka.
            .env(
                "STREAMOPS_LAG_BROKERS",
                r#"[{"name": "dev", "bootstrapServers": ["127.0.0.1:9092"]}]"#,
            )
            .env_remove("WATCH_NAMESPACE")
            .env_remove("STREAMOPS_LEADER_ELECTION")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        if let Some(ns) = &spec.watch {
            cmd.arg(format!("--namespace={ns}"));
        }
        cmd.args(&spec.args);
        let child = cmd.spawn().expect("streamops-operator starts");
        Self {
            child,
            name: spec.pod_name,
            log,
            metrics_port,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `streamops_operator_leader` from its /metrics (`None` when it does not answer).
    pub async fn leader_gauge(&self) -> Option<i64> {
        leader_gauge_at(self.metrics_port).await
    }

    /// Sends SIGKILL and waits for the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("==== log of operator {} ====", self.name);
            if let Ok(f) = fs::File::open(&self.log) {
                let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
                let start = lines.len().saturating_sub(200);
                for l in &lines[start..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// `streamops_operator_leader` from the /metrics of the operator on `port`.
pub async fn leader_gauge_at(port: u16) -> Option<i64> {
    let body = http_get(port, "/metrics").await?;
    body.lines()
        .find_map(|l| l.strip_prefix("streamops_operator_leader "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

/// A plain HTTP/1.0 GET on loopback; `None` when nothing answers.
async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}
