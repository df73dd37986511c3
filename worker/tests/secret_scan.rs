//! No secret value reaches a worker's logs, metrics or `/consumer/info`. A pipeline-trigger worker
//! runs against the real PostgreSQL, Redis and broker on loopback with known secret values: a
//! password in its database URL and a webhook header from a Secret; the webhook fails once
//! (answering with a body of its own) and then accepts. Every output is searched for the values.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use streamops_crds::v1alpha1::{PipelineTriggerSettings, SecretHeader, SecretKeyRef, WebhookSpec};
use streamops_crds::{Handler as HandlerConfig, HandlerKind};
use support::*;

const REDIS: &str = "127.0.0.1:6379";
const REDIS_URL: &str = "redis://127.0.0.1:6379/";
/// PostgreSQL runs with trust authentication, so any password is accepted and the URL still works.
const DB_PASSWORD: &str = "pg-secret-4b1d7e";
const HEADER_VALUE: &str = "Bearer hook-secret-93c2aa";
/// What the webhook answers in its failing response: data of the remote service.
const REMOTE_BODY: &str = "remote-only-body-5e8f";

#[derive(Clone, Default)]
struct Hook {
    authorizations: Arc<Mutex<Vec<String>>>,
}

async fn hook(State(h): State<Hook>, headers: HeaderMap) -> (StatusCode, &'static str) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut seen = h.authorizations.lock().unwrap();
    seen.push(auth);
    if seen.len() == 1 {
        (StatusCode::SERVICE_UNAVAILABLE, REMOTE_BODY)
    } else {
        (StatusCode::OK, "ok")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_appears_in_logs_metrics_or_consumer_info() {
    if std::net::TcpStream::connect_timeout(&REDIS.parse().unwrap(), Duration::from_secs(3))
        .is_err()
    {
        panic!("Redis is not reachable at {REDIS}; start it (`make dev-up`)");
    }
    let h = Hook::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(h.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let mut env = TestEnv::new("secret-scan", HandlerKind::PipelineTrigger, 1).await;
    env.config.handler = HandlerConfig::PipelineTrigger(PipelineTriggerSettings {
        pipeline_name: "nightly-load".into(),
        max_events: 10,
        max_time_seconds: 3600,
        trigger_on_empty_window: false,
        consumer_id: None,
        webhook: Some(WebhookSpec {
            url: format!("http://{addr}/hook"),
            timeout_ms: 2000,
            max_retries: 3,
            headers: Default::default(),
            retry_backoff: streamops_crds::v1alpha1::default_webhook_backoff(),
            secret_headers: vec![SecretHeader {
                name: "Authorization".into(),
                secret_key_ref: SecretKeyRef {
                    name: "hook".into(),
                    key: "authorization".into(),
                },
            }],
        }),
        job: None,
    });
    let db_url = env.db_url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{DB_PASSWORD}@"),
        1,
    );
    assert!(db_url.contains(DB_PASSWORD), "{db_url}");
    let mut worker = env.start_worker_with_env(
        "w-0",
        &[
            ("STREAMOPS_REDIS_URL", REDIS_URL),
            ("STREAMOPS_DATABASE_URL", &db_url),
            ("STREAMOPS_WEBHOOK_HEADER_0", HEADER_VALUE),
            ("RUST_LOG", "debug,streamops_worker=trace"),
        ],
    );
    worker.wait_ready().await;
    env.produce(&ProduceSpec::new(HandlerKind::PipelineTrigger, 10))
        .await;
    env.wait_for_offsets(10).await;

    // The webhook fails once, then the retry is delivered.
    let start = Instant::now();
    loop {
        let delivered: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pipeline_runs WHERE status = 'delivered'")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        if delivered >= 1 {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "no delivery");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = h.authorizations.lock().unwrap().clone();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter().all(|a| a == HEADER_VALUE),
        "the secret header reached the webhook: {seen:?}"
    );

    let consumer_id = env.config.consumer_id.clone();
    let info = reqwest::get(format!(
        "http://{}/consumer/info/{consumer_id}",
        worker.http
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let metrics = worker.metrics();
    let last_errors: Vec<Option<String>> =
        sqlx::query_scalar("SELECT last_error FROM pipeline_runs")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let log_path = worker.log.clone();
    let status = worker.terminate_and_wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    server.abort();

    assert!(status.success(), "worker exit {status:?}\n{log}");
    assert!(
        info.contains("\"consumer_id\""),
        "/consumer/info answered: {info}"
    );
    assert!(
        metrics.contains("streamops_"),
        "/metrics answered: {metrics}"
    );
    assert!(log.len() > 1000, "the worker logged: {log}");
    for (what, text) in [
        ("the worker's log", log.as_str()),
        ("/metrics", metrics.as_str()),
        ("/consumer/info", info.as_str()),
        ("pipeline_runs.last_error", &format!("{last_errors:?}")),
    ] {
        for secret in [DB_PASSWORD, "hook-secret-93c2aa"] {
            assert!(
                !text.contains(secret),
                "{secret} appears in {what}:\n{text}"
            );
        }
        assert!(
            !text.contains(REMOTE_BODY),
            "the webhook's response body appears in {what}:\n{text}"
        );
    }
    env.cleanup().await;
}
