//! Worker process assembly: configuration, secrets, database, HTTP server, signals, and the
//! pipeline for one handler.
//!
//! `main` builds a [`WorkerRuntime`], builds the handler the configuration names from
//! [`WorkerRuntime::handler_context`], and calls [`WorkerRuntime::run`] with it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use streamops_crds::WorkerConfig;
use tokio_util::sync::CancellationToken;

use crate::consumer_liveness::Watched;
use crate::error::WorkerError;
use crate::handlers::{HandlerContext, MessageHandler};
use crate::kafka::KafkaClientSettings;
use crate::metrics::Metrics;
use crate::pipeline::{self, Health, PipelineContext, PipelineError, WriterTotals};
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

/// How long a worker that stops because its Kafka consumer is wedged waits for the pipeline to
/// drain before it exits anyway, as the kubelet ends a SIGTERM drain with SIGKILL after the pod's
/// grace period (30 s by default). Nothing is lost: what was not committed to PostgreSQL is read
/// again from the stored offsets.
pub const WEDGE_DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// The pipeline's outcome: its result, or its task's failure.
type PipelineOutcome = Result<Result<WriterTotals, PipelineError>, tokio::task::JoinError>;

/// How the pipeline ended.
struct Ended {
    /// Its outcome; None when a drain for a restart did not finish within [`WEDGE_DRAIN_LIMIT`]
    /// (the task is left behind: the process is about to exit).
    outcome: Option<PipelineOutcome>,
    /// It was stopped because the consumer is wedged (not by a signal, not on its own).
    for_restart: bool,
}

/// Waits for the pipeline. On a wedge (`restart` cancelled) it stops it as SIGTERM does
/// (cancels `shutdown`: stop fetching, commit what was fetched, close the consumer) and waits at
/// most [`WEDGE_DRAIN_LIMIT`]. A wedge judged while a signal's shutdown is already under way
/// changes nothing.
async fn await_pipeline(
    mut pipeline: tokio::task::JoinHandle<Result<WriterTotals, PipelineError>>,
    restart: &CancellationToken,
    shutdown: &CancellationToken,
) -> Ended {
    let wedged = async {
        restart.cancelled().await;
        if shutdown.is_cancelled() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = &mut pipeline => return Ended { outcome: Some(r), for_restart: false },
        _ = wedged => {}
    }
    tracing::warn!(
        limit_s = WEDGE_DRAIN_LIMIT.as_secs(),
        "kafka consumer wedged: stopping as on SIGTERM, then exiting with 75 to be restarted"
    );
    shutdown.cancel();
    let outcome = match tokio::time::timeout(WEDGE_DRAIN_LIMIT, &mut pipeline).await {
        Ok(r) => Some(r),
        Err(_) => {
            tracing::warn!(
                limit_s = WEDGE_DRAIN_LIMIT.as_secs(),
                "the pipeline did not drain in time: exiting without it (what was not \
                 committed is read again from the stored offsets)"
            );
            None
        }
    };
    Ended {
        outcome,
        for_restart: true,
    }
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

    /// Serves HTTP and runs the pipeline with `handler` until shutdown. A wedged Kafka consumer
    /// ([`crate::consumer_liveness`]) stops it the same way, and it returns
    /// [`WorkerError::Wedged`] (exit code [`crate::error::EXIT_RESTART`]).
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
        let restart = CancellationToken::new();
        let liveness = crate::consumer_liveness::spawn(
            Watched {
                health: self.health.clone(),
                ownership: ownership.clone(),
                settings: self.kafka.clone(),
                topic: self.config.kafka.topics.first().cloned(),
                wedged: self.metrics.kafka_client_wedged.clone(),
                restart: restart.clone(),
            },
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
        let pipeline = tokio::spawn(pipeline::run_pipeline_lanes(ctx, handlers));
        let ended = await_pipeline(pipeline, &restart, &self.shutdown).await;
        http_stop.cancel();
        self.shutdown.cancel();
        let _ = http_task.await;
        let _ = liveness.await;
        // A pipeline that did not drain may still hold connections: closing would wait for them.
        if ended.outcome.is_some() {
            self.pool.close().await;
        }
        if !ended.for_restart {
            return match ended.outcome {
                Some(Ok(Ok(totals))) => Ok(totals),
                Some(Ok(Err(e))) => Err(WorkerError::Other(e.to_string())),
                Some(Err(e)) => Err(WorkerError::Other(format!("pipeline task failed: {e}"))),
                None => Err(WorkerError::Other("the pipeline did not stop".into())),
            };
        }
        match &ended.outcome {
            Some(Ok(Err(e))) => tracing::warn!(error = %e, "the pipeline failed while draining"),
            Some(Err(e)) => tracing::warn!(error = %e, "the pipeline task failed while draining"),
            _ => {}
        }
        let reason = self
            .health
            .live()
            .err()
            .unwrap_or_else(|| "kafka consumer wedged".into());
        Err(WorkerError::Wedged(reason))
    }
}
