//! streamops-localnode: test tooling, not product.
//!
//! A node for the local control plane (`make cluster-up`) that runs the pods the scheduler binds to
//! it as ordinary processes on this machine, so that the operator and its workers run as pods
//! without Docker. See `localnode/README.md` for what it does and does not do.

mod image_map;
mod node;
mod pod;
mod probe;
mod resolve;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::watch;

/// Command line.
#[derive(Debug, Parser, Clone)]
#[command(
    name = "streamops-localnode",
    about = "Test-only local node: runs pods as processes"
)]
pub struct Args {
    /// Name of the Node object to register.
    #[arg(long, default_value = "streamops-local")]
    pub node_name: String,
    /// Where pod directories (volumes, logs, pid files) live.
    #[arg(long, default_value = ".dev/localnode")]
    pub state_dir: PathBuf,
    /// Image -> binary map: lines `IMAGE_PATTERN BINARY [ENTRYPOINT]` (a pattern may end in `*`).
    #[arg(long)]
    pub image_map: PathBuf,
    /// The LD_PRELOAD bind shim (localnode/shim/bindshim.c, built by mk/local.mk).
    #[arg(long)]
    pub bind_shim: PathBuf,
    /// Extra host names every pod resolves, `NAME=IP` (repeatable), e.g. `kafka.streamops-dev=127.0.0.1`.
    #[arg(long = "host-alias")]
    pub host_aliases: Vec<String>,
    /// First two octets of the pod addresses (pods get PREFIX.X.Y in 127.0.0.0/8).
    #[arg(long, default_value = "127.1")]
    pub pod_ip_prefix: String,
    /// KUBERNETES_SERVICE_HOST given to the pods (default: the host of the kubeconfig's server).
    #[arg(long)]
    pub service_host: Option<String>,
    /// KUBERNETES_SERVICE_PORT given to the pods (default: the port of the kubeconfig's server).
    #[arg(long)]
    pub service_port: Option<u16>,
    /// Capacity advertised to the scheduler.
    #[arg(long, default_value = "32")]
    pub cpu: String,
    #[arg(long, default_value = "128Gi")]
    pub memory: String,
    #[arg(long, default_value = "250")]
    pub max_pods: u32,
}

/// State shared by the pod supervisors.
pub struct Shared {
    pub client: Client,
    pub args: Args,
    pub images: image_map::ImageMap,
    pub service_host: String,
    pub service_port: u16,
    pub ips: Mutex<IpPool>,
    pub state_dir: PathBuf,
    /// (namespace, name, address) of every Service with a ready pod on this node.
    pub services: Mutex<Vec<(String, String, Ipv4Addr)>>,
}

/// Pod addresses in 127.0.0.0/8.
pub struct IpPool {
    prefix: [u8; 2],
    used: std::collections::HashSet<u16>,
    next: u16,
}

impl IpPool {
    fn new(prefix: &str) -> anyhow::Result<Self> {
        let parts: Vec<u8> = prefix
            .split('.')
            .map(|p| p.parse::<u8>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--pod-ip-prefix {prefix}: not two octets"))?;
        anyhow::ensure!(
            parts.len() == 2 && parts[0] == 127,
            "--pod-ip-prefix {prefix}: must be 127.N"
        );
        Ok(Self {
            prefix: [parts[0], parts[1]],
            used: Default::default(),
            next: 0,
        })
    }

    pub fn take(&mut self) -> Option<Ipv4Addr> {
        for _ in 0..u16::MAX {
            self.next = self.next.wrapping_add(1);
            let n = self.next;
            let (hi, lo) = ((n >> 8) as u8, (n & 0xff) as u8);
            if lo == 0 || lo == 255 {
                continue;
            }
            if self.used.insert(n) {
                return Some(Ipv4Addr::new(self.prefix[0], self.prefix[1], hi, lo));
            }
        }
        None
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        let o = ip.octets();
        self.used.remove(&(u16::from(o[2]) << 8 | u16::from(o[3])));
    }
}

/// What the watch loop tells a pod supervisor.
#[derive(Debug, Clone, PartialEq)]
pub enum Desired {
    Run,
    /// Deleted through the API with this grace period (seconds).
    Terminate(i64),
    /// The object is gone: stop now.
    Gone,
    /// The node shuts down: stop the processes, leave the object.
    NodeShutdown,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let config = kube::Config::infer()
        .await
        .context("no kubeconfig (set KUBECONFIG)")?;
    let service_host = args
        .service_host
        .clone()
        .or_else(|| config.cluster_url.host().map(str::to_string))
        .context("no service host")?;
    let service_port = args
        .service_port
        .or_else(|| config.cluster_url.port_u16())
        .unwrap_or(443);
    let client = Client::try_from(config)?;
    let images = image_map::ImageMap::load(&args.image_map)?;
    anyhow::ensure!(
        args.bind_shim.is_file(),
        "bind shim {} does not exist (make -f mk/local.mk builds it)",
        args.bind_shim.display()
    );
    std::fs::create_dir_all(args.state_dir.join("pods"))?;
    let state_dir = std::fs::canonicalize(&args.state_dir)?;
    let shared = Arc::new(Shared {
        client: client.clone(),
        ips: Mutex::new(IpPool::new(&args.pod_ip_prefix)?),
        images,
        service_host,
        service_port,
        state_dir,
        services: Mutex::new(Vec::new()),
        args: Args {
            bind_shim: std::fs::canonicalize(&args.bind_shim)?,
            ..args.clone()
        },
    });

    node::register(&shared).await?;
    tokio::spawn(node::heartbeat(shared.clone()));
    tokio::spawn(services(shared.clone()));

    let pods: Api<Pod> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", args.node_name));
    let mut events = watcher(pods, cfg).boxed();
    let mut running: HashMap<String, (watch::Sender<Desired>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    tracing::info!(node = %args.node_name, "watching the pods bound to this node");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let event = tokio::select! {
            e = events.try_next() => e,
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        };
        let event = match event {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch error; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        running.retain(|_, (_, task)| !task.is_finished());
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                let Some(uid) = pod.metadata.uid.clone() else {
                    continue;
                };
                let desired = match &pod.metadata.deletion_timestamp {
                    Some(_) => Desired::Terminate(
                        pod.metadata
                            .deletion_grace_period_seconds
                            .or(pod
                                .spec
                                .as_ref()
                                .and_then(|s| s.termination_grace_period_seconds))
                            .unwrap_or(30),
                    ),
                    None => Desired::Run,
                };
                match running.get(&uid) {
                    Some((tx, _)) => {
                        if desired != Desired::Run {
                            tx.send_if_modified(|d| {
                                if *d == Desired::Run {
                                    *d = desired.clone();
                                    true
                                } else {
                                    false
                                }
                            });
                        }
                    }
                    None => {
                        let (tx, rx) = watch::channel(desired);
                        let task = tokio::spawn(pod::supervise(shared.clone(), pod, rx));
                        running.insert(uid, (tx, task));
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some((tx, _)) = pod.metadata.uid.as_ref().and_then(|u| running.get(u)) {
                    let _ = tx.send(Desired::Gone);
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
    tracing::info!(
        pods = running.len(),
        "shutting down: stopping every pod's processes"
    );
    for (tx, _) in running.values() {
        let _ = tx.send(Desired::NodeShutdown);
    }
    for (_, (_, task)) in running {
        let _ = task.await;
    }
    Ok(())
}

/// Keeps the Service table of the pods' /etc/hosts: a Service name resolves to the address of a
/// ready pod on this node that its selector matches (no kube-proxy: the Service port must equal
/// the target port).
async fn services(shared: Arc<Shared>) {
    use k8s_openapi::api::core::v1::Service;
    let svcs: Api<Service> = Api::all(shared.client.clone());
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let lp_pods = kube::api::ListParams::default()
        .fields(&format!("spec.nodeName={}", shared.args.node_name));
    let lp_svcs = kube::api::ListParams::default();
    loop {
        let (s, p) = futures::join!(svcs.list(&lp_svcs), pods.list(&lp_pods));
        if let (Ok(s), Ok(p)) = (s, p) {
            let mut table = Vec::new();
            for svc in &s.items {
                let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
                    continue;
                };
                if sel.is_empty() {
                    continue;
                }
                let ns = svc.metadata.namespace.clone().unwrap_or_default();
                let ready_ip = p.items.iter().find_map(|pod| {
                    let labels = pod.metadata.labels.as_ref()?;
                    let same_ns = pod.metadata.namespace.as_deref() == Some(ns.as_str());
                    let matches = sel.iter().all(|(k, v)| labels.get(k) == Some(v));
                    let status = pod.status.as_ref()?;
                    let ready = status
                        .conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    (same_ns && matches && ready && pod.metadata.deletion_timestamp.is_none())
                        .then(|| status.pod_ip.as_deref()?.parse::<Ipv4Addr>().ok())
                        .flatten()
                });
                if let Some(ip) = ready_ip {
                    table.push((ns, svc.metadata.name.clone().unwrap_or_default(), ip));
                }
            }
            table.sort();
            if let Ok(mut t) = shared.services.lock() {
                *t = table;
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    }
}
