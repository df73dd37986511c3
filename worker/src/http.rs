//! The worker's HTTP server: `/healthz`, `/readyz`, `/metrics`, `/consumer/lag` (the lag report,
//! see [`streamops_crds::lag_report`]), plus the handler's own routes.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::error::WorkerError;
use crate::metrics::Metrics as WorkerMetrics;
use crate::pipeline::{Health, Ownership};

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: WorkerMetrics,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", s.health.reason()),
        )
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics.ready.set(i64::from(s.health.ready()));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// The router: built-in endpoints merged with `extra` (the handler's routes).
pub fn router(health: Arc<Health>, metrics: WorkerMetrics, extra: Option<Router>) -> Router {
    let base = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { health, metrics });
    match extra {
        Some(r) => base.merge(r),
        None => base,
    }
}

/// What `/consumer/lag` reports from.
#[derive(Clone)]
pub struct LagSource {
    /// The partitions the pipeline owns.
    pub ownership: Arc<Ownership>,
    /// The consumer group.
    pub group: String,
}

async fn lag_report(State(s): State<LagSource>) -> impl IntoResponse {
    axum::Json(s.ownership.lag_report(&s.group))
}

/// `GET /consumer/lag`: the partitions this worker owns, with the next offset it will apply and
/// the high watermark its consumer last saw. The operator reads it when it may not connect to the
/// brokers itself.
pub fn lag_router(source: LagSource) -> Router {
    Router::new()
        .route(streamops_crds::lag_report::LAG_REPORT_PATH, get(lag_report))
        .with_state(source)
}

/// Binds `addr` and serves `app` until `shutdown` is cancelled. Returns once bound, with the
/// bound address and the serving task.
pub async fn serve(
    addr: &str,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), WorkerError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| WorkerError::Http {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| WorkerError::Http {
        addr: addr.to_string(),
        source,
    })?;
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http server failed");
        }
    });
    tracing::info!(listen = %local, "http server listening");
    Ok((local, task))
}
