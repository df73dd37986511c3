//! Worker process assembly: configuration, secrets, database, HTTP server, signals, and the
//! pipeline for one handler.
//!
//! `main` builds a [`WorkerRuntime`], builds the handler the configuration names from
//! [`WorkerRuntime::handler_context`], and calls [`WorkerRuntime::run`] with it.

use std::sync::Arc;

use sqlx::PgPool;
use streamops_crds::WorkerConfig;
use tokio_util::sync::CancellationToken;

use crate::error::WorkerError;
use crate::handlers::{HandlerContext, MessageHandler};
use crate::kafka::KafkaClientSettings;
use crate::metrics::Metrics;
use crate::pipeline::{self, Health, PipelineContext, WriterTotals};
use crate::secrets::Secrets;

/// Inputs of a worker run.
pub struct RunOptions {
    /// The configuration (from `--config` or `--spec`).
    pub config: WorkerConfig,
    /// Secrets from the environment.
    pub secrets: Secrets,
    /// `group.instance.id`.
    pub instance_id: Option<String>,
    /// Replaces `kafka.bootstrapServers` (local runs).
    pub bootstrap_servers: Option<String>,
    /// Replaces `httpListen`.
    pub http_listen: Option<String>,
}

/// The pieces every handler run shares.
pub struct WorkerRuntime {
    /// The effective configuration.
    pub config: Arc<WorkerConfig>,
    /// PostgreSQL pool, migrations applied.
    pub pool: PgPool,
    /// Metrics registry and collectors.
    pub metrics: Metrics,
    /// Health flags.
    pub health: Arc<Health>,
    /// Graceful-stop token (first SIGTERM/SIGINT).
    pub shutdown: CancellationToken,
    /// Give-up token (second signal).
    pub abort: CancellationToken,
    kafka: KafkaClientSettings,
    instance_id: Option<String>,
    redis_url: Option<String>,
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT and `abort` on the second.
pub fn install_signal_handlers(shutdown: CancellationToken, abort: CancellationToken) {
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            wait_for_signal().await;
            count += 1;
            if count == 1 {
                tracing::info!("signal received: graceful shutdown");
                shutdown.cancel();
            } else {
                tracing::warn!("second signal: abandoning the in-flight batch");
                abort.cancel();
                return;
            }
        }
    });
}

/// Resolves on the next SIGTERM or SIGINT (Ctrl-C where those cannot be watched).
#[cfg(unix)]
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves on the next Ctrl-C.
#[cfg(not(unix))]
pub async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

impl WorkerRuntime {
    /// Connects to PostgreSQL (retrying while it is down), applies the migrations, starts the
    /// database probe and the signal handlers. Returns `Ok(None)` when a shutdown signal arrives
    /// before the database could be reached.
    pub async fn start(opts: RunOptions) -> Result<Option<Self>, WorkerError> {
        let mut config = opts.config;
        if let Some(b) = opts.bootstrap_servers {
            config.kafka.bootstrap_servers = b;
        }
        if let Some(h) = opts.http_listen {
            config.http_listen = h;
        }
        let shutdown = CancellationToken::new();
        let abort = CancellationToken::new();
        install_signal_handlers(shutdown.clone(), abort.clone());

        let Some(pool) = crate::db::connect(&opts.secrets.database_url, &shutdown).await? else {
            return Ok(None);
        };
        if !crate::db::migrate(&pool, &shutdown).await? {
            return Ok(None);
        }
        let health = Arc::new(Health::default());
        health.set_db_ok(true);
        crate::db::spawn_probe(pool.clone(), health.clone(), shutdown.clone());
        let kafka = KafkaClientSettings::from_config(&config.kafka, opts.secrets.sasl.clone());
        Ok(Some(Self {
            config: Arc::new(config),
            pool,
            metrics: Metrics::new(),
            health,
            shutdown,
            abort,
            kafka,
            instance_id: opts.instance_id,
            redis_url: opts.secrets.redis_url,
        }))
    }

    /// What handlers are built from.
    pub fn handler_context(&self) -> HandlerContext {
        HandlerContext {
            config: self.config.clone(),
            pool: self.pool.clone(),
            redis_url: self.redis_url.clone(),
            registry: self.metrics.registry.clone(),
            shutdown: self.shutdown.clone(),
            instance_id: self.instance_id.clone(),
        }
    }

    /// Serves HTTP and runs the pipeline with `handler` until shutdown.
    pub async fn run<H: MessageHandler>(self, handler: H) -> Result<WriterTotals, WorkerError> {
        self.run_lanes(vec![handler]).await
    }

    /// Like [`WorkerRuntime::run`] with one writer lane per handler instance (see
    /// [`pipeline::run_pipeline_lanes`]); only for handlers whose state is per partition. HTTP
    /// routes come from the first instance.
    pub async fn run_lanes<H: MessageHandler>(
        self,
        handlers: Vec<H>,
    ) -> Result<WriterTotals, WorkerError> {
        let http_stop = CancellationToken::new();
        let routes = handlers.first().and_then(MessageHandler::routes);
        let ownership = Arc::new(pipeline::Ownership::default());
        let lag = crate::http::LagSource {
            ownership: ownership.clone(),
            group: self.config.kafka.group_id.clone(),
        };
        let app = crate::http::router(self.health.clone(), self.metrics.clone(), routes)
            .merge(crate::http::lag_router(lag));
        let (_addr, http_task) =
            crate::http::serve(&self.config.http_listen, app, http_stop.clone()).await?;
        let liveness = crate::consumer_liveness::spawn(
            self.health.clone(),
            self.kafka.clone(),
            self.config.kafka.topics.first().cloned(),
            self.metrics.kafka_client_wedged.clone(),
            http_stop.clone(),
        );
        let ctx = PipelineContext {
            config: self.config.clone(),
            kafka: self.kafka.clone(),
            pool: self.pool.clone(),
            instance_id: self.instance_id.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            ownership,
            shutdown: self.shutdown.clone(),
            abort: self.abort.clone(),
        };
        // The pipeline runs on a runtime worker thread (block_in_place in the rebalance callback).
        let result = tokio::spawn(pipeline::run_pipeline_lanes(ctx, handlers)).await;
        http_stop.cancel();
        self.shutdown.cancel();
        let _ = http_task.await;
        let _ = liveness.await;
        self.pool.close().await;
        match result {
            Ok(Ok(totals)) => Ok(totals),
            Ok(Err(e)) => Err(WorkerError::Other(e.to_string())),
            Err(e) => Err(WorkerError::Other(format!("pipeline task failed: {e}"))),
        }
    }
}
