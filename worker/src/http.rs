//! The worker's HTTP server: `/healthz`, `/readyz`, `/metrics`, plus the handler's own routes.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::error::WorkerError;
use crate::metrics::Metrics as WorkerMetrics;
use crate::pipeline::Health;

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
