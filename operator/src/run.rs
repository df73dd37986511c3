//! `streamops-operator run`: the HTTP endpoints, leader election and the controller.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use kube::api::{Api, ListParams};
use kube::Client;
use streamops_crds::StreamConsumer;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cli::RunArgs;
use crate::consumer_group::KafkaGroupDeleter;
use crate::http::{self, HttpState};
use crate::lag::KafkaLagReader;
use crate::lag_book::LagBook;
use crate::lag_poller::LagPoller;
use crate::lag_workers::{BrokersOrWorkers, WorkerLagReader};
use crate::leader::{run_as_leader, LeaseLock, LeaseSettings};
use crate::metrics::Metrics;
use crate::reconcile::run_controller;
use crate::{Context, OperatorConfig};

/// Runs until SIGTERM/SIGINT, or until the leader lease is lost (an error: the process should exit
/// and restart as a candidate).
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_on(shutdown.clone()));

    // The allow-list is checked before anything else: a malformed one stops the operator.
    let brokers = Arc::new(args.broker_policy().context("invalid broker allow-list")?);
    let state = HttpState::default();
    let metrics = Metrics::register(&state.registry).context("cannot register metrics")?;
    let listener = http::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    info!(address = %args.metrics_listen, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(http::serve(listener, state.clone(), shutdown.clone()));

    let client = Client::try_default()
        .await
        .context("cannot configure the Kubernetes client")?;
    let namespace = args.watch_namespace().map(str::to_string);
    check_crd(&client, namespace.as_deref()).await?;
    state.ready.store(true, Ordering::SeqCst);

    // One book for the whole process: the poller writes it, the reconciler decides replicas and
    // publishes lag from it. A new leader term starts with whatever it holds; the autoscaler's
    // windows only ever make a fresh history more careful.
    let book = Arc::new(LagBook::new());
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        OperatorConfig {
            policy: args.policy(),
            job_trigger_cluster_role: args.job_trigger_cluster_role.clone(),
            worker_network: args.worker_network(),
            worker_tracing: args.worker_tracing()?,
            concurrency: args.max_concurrent_reconciles,
            lag_brokers: brokers.clone(),
            progress_hold: args.progress_hold(),
            ..OperatorConfig::new(args.worker_image.clone())
        },
        Arc::new(KafkaGroupDeleter::allowed(brokers.clone())),
        book.clone(),
    ));
    let poll_settings = args.poll_settings();
    // Lag of StreamConsumers on brokers the admin did not allow: their workers' reports.
    let workers = match WorkerLagReader::new(client.clone(), std::time::Duration::from_secs(3)) {
        Ok(reader) => Some(reader),
        Err(e) => {
            warn!(error = %e, "cannot read the workers' lag reports");
            None
        }
    };
    let poller = || {
        Some(LagPoller::new(
            BrokersOrWorkers::new(
                KafkaLagReader::new(
                    std::time::Duration::from_secs(5),
                    poll_settings.max_concurrent_reads,
                )
                .with_policy(brokers.clone()),
                workers.clone(),
            ),
            book.clone(),
            metrics.clone(),
            poll_settings.clone(),
        ))
    };
    info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        worker_image = %args.worker_image,
        leader_election = args.leader_election(),
        lag_interval = ?poll_settings.default_interval,
        max_concurrent_reconciles = args.max_concurrent_reconciles,
        allowed_brokers = brokers.brokers().len(),
        job_triggers = args.job_triggers,
        worker_network_policy = args.worker_network_policy,
        // Whether workers export spans; the endpoint and headers are not logged.
        worker_tracing = args.worker_otlp_endpoint.as_deref().is_some_and(|e| !e.trim().is_empty()),
        "starting the controller"
    );

    let result = if args.leader_election() {
        let lease_namespace = args
            .lease_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_string());
        let settings = LeaseSettings::new(&args.lease_name, lease_namespace, holder_identity());
        let mut lock = LeaseLock::new(client.clone(), settings);
        run_as_leader(&mut lock, &metrics, shutdown.clone(), |stop| {
            run_controller(
                client.clone(),
                namespace.clone(),
                ctx.clone(),
                stop,
                poller(),
            )
        })
        .await
        .map_err(anyhow::Error::from)
    } else {
        metrics.leader.set(1);
        run_controller(
            client.clone(),
            namespace.clone(),
            ctx.clone(),
            shutdown.clone(),
            poller(),
        )
        .await;
        Ok(())
    };

    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "the HTTP server failed"),
        Err(e) => warn!(error = %e, "the HTTP server task failed"),
    }
    result
}

/// Fails early, with a hint, when the CRD is not installed or the operator may not list it.
async fn check_crd(client: &Client, namespace: Option<&str>) -> anyhow::Result<()> {
    let api: Api<StreamConsumer> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    api.list_metadata(&ListParams::default().limit(1))
        .await
        .map(|_| ())
        .context("cannot list StreamConsumers: is the CRD installed (crds/streamconsumer.yaml) and the operator's RBAC applied?")
}

/// The pod name (HOSTNAME in a pod) plus a random suffix, so a restarted process never mistakes
/// its predecessor's lease for its own.
fn holder_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "streamops-operator".into());
    format!("{host}_{}", uuid::Uuid::new_v4().simple())
}

async fn signal_on(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
                }
            }
            Err(e) => {
                error!(error = %e, "cannot install the SIGTERM handler");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    shutdown.cancel();
}
