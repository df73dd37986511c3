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

/// Live unless the Kafka consumer is judged wedged (see [`crate::consumer_liveness`]): then 503
/// with the reason, and the kubelet restarts the container.
async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.live() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: {reason}\n"),
        ),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(health: Arc<Health>, path: &str) -> (u16, String) {
        let stop = CancellationToken::new();
        let app = router(health, WorkerMetrics::new(), None);
        let (addr, task) = serve("127.0.0.1:0", app, stop.clone())
            .await
            .expect("bind an ephemeral port");
        let resp = reqwest::get(format!("http://{addr}{path}"))
            .await
            .expect("the server answers");
        let status = resp.status().as_u16();
        let body = resp.text().await.expect("a text body");
        stop.cancel();
        task.await.expect("the server stops");
        (status, body)
    }

    #[tokio::test]
    async fn healthz_answers_503_with_the_reason_when_the_consumer_is_wedged() {
        let health = Arc::new(Health::default());
        health.set_kafka_down(true);
        // Down but not judged wedged (an outage): live.
        assert_eq!(
            get_status(health.clone(), "/healthz").await,
            (200, "ok\n".into())
        );
        health.set_wedged(Some("kafka consumer wedged: test".into()));
        let (status, body) = get_status(health.clone(), "/healthz").await;
        assert_eq!(status, 503);
        assert_eq!(body, "not live: kafka consumer wedged: test\n");
        // Not ready either, for its own reason.
        let (status, body) = get_status(health.clone(), "/readyz").await;
        assert_eq!(status, 503, "{body}");
        health.set_wedged(None);
        assert_eq!(get_status(health, "/healthz").await.0, 200);
    }
}
