//! fraud handler against the real reference scorer, broker and PostgreSQL: validation, scoring
//! with retries, timeouts and the circuit breaker, the error topic, and exactly-once storage.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use sqlx::PgPool;
use streamops_crds::v1alpha1::{FraudSettings, RetryBackoff, ScoringProtocol};
use streamops_crds::{Handler as HandlerConfig, HandlerKind, StreamConsumerSpec, WorkerConfig};
use streamops_worker::generate::{Event, Generated};
use streamops_worker::handlers::fraud::{FraudHandler, FraudItem};
use streamops_worker::handlers::{
    Decoded, HandlerContext, MessageHandler, Position, Prepared, RawMessage, RejectKind,
};
use streamops_worker::kafka::KafkaClientSettings;
use streamops_worker::scorer::api::ScoreInput;
use streamops_worker::scorer::{model, FaultPlan, ScorerServer};
use support::*;

fn settings(url: &str) -> FraudSettings {
    FraudSettings {
        scoring_url: url.to_string(),
        timeout_ms: 2000,
        max_retries: 3,
        batch_size: 100,
        fraud_threshold: 0.8,
        circuit_breaker_failures: 5,
        circuit_breaker_reset_ms: 30_000,
        protocol: ScoringProtocol::Streamops,
        retry_backoff: RetryBackoff::default(),
    }
}

async fn scorer() -> ScorerServer {
    ScorerServer::spawn("127.0.0.1:0".parse().unwrap(), FaultPlan::default())
        .await
        .expect("scorer starts")
}

/// A URL on which nothing listens.
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    format!("http://127.0.0.1:{port}/predict")
}

fn context(pool: PgPool) -> HandlerContext {
    let spec = StreamConsumerSpec::example(HandlerKind::Fraud);
    HandlerContext {
        config: Arc::new(WorkerConfig::from_spec("fraud-direct", None, &spec).unwrap()),
        pool,
        redis_url: None,
        registry: prometheus::Registry::new(),
        shutdown: tokio_util::sync::CancellationToken::new(),
        instance_id: None,
    }
}

fn lazy_pool() -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .connect_lazy(&format!("postgres://postgres@{PG_HOST}/postgres"))
        .unwrap()
}

/// A handler, its registry, and `n` decoded generated transactions.
fn direct(
    s: FraudSettings,
    n: u64,
) -> (FraudHandler, prometheus::Registry, Vec<Decoded<FraudItem>>) {
    let ctx = context(lazy_pool());
    let h = FraudHandler::new(&ctx, &s).unwrap();
    let topic: Arc<str> = Arc::from("transactions");
    let items = ProduceSpec::new(HandlerKind::Fraud, n)
        .seed(9)
        .events()
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let msg = RawMessage {
                topic: topic.clone(),
                partition: 0,
                offset: i as i64,
                key: Some(g.key.into_bytes()),
                payload: Some(g.payload),
                timestamp_ms: Some(chrono::Utc::now().timestamp_millis()),
            };
            Decoded {
                pos: Position {
                    topic: topic.clone(),
                    partition: 0,
                    offset: i as i64,
                },
                timestamp_ms: msg.timestamp_ms,
                item: h.decode(&msg).unwrap(),
            }
        })
        .collect();
    (h, ctx.registry, items)
}

/// Sum of the samples of `name` (with `label="value"` among its labels, if given).
fn metric(registry: &prometheus::Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .unwrap();
    let want = label.map(|(k, v)| format!("{k}=\"{v}\""));
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.split(' ').next().unwrap_or_default();
            let metric_name = series.split('{').next().unwrap_or_default();
            metric_name == name && want.as_ref().is_none_or(|w| series.contains(w.as_str()))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn expected_score(item: &FraudItem) -> f64 {
    model::score(&item.transaction.score_input())
}

fn assert_all_scored(p: &Prepared<FraudItem>, n: usize) {
    assert!(p.rejected.is_empty(), "rejected: {:?}", p.rejected.first());
    assert_eq!(p.items.len(), n);
    for d in &p.items {
        let pred = d.item.prediction.as_ref().expect("prediction");
        assert!((pred.score - expected_score(&d.item)).abs() < 1e-12);
        assert_eq!(&*pred.model_version, model::MODEL_VERSION);
    }
}

#[tokio::test]
async fn transactions_are_scored_in_groups_of_batch_size() {
    let s = scorer().await;
    let mut cfg = settings(&s.predict_url());
    cfg.batch_size = 10;
    let (mut h, _, items) = direct(cfg, 35);
    let p = h.prepare(items).await.unwrap();
    assert_all_scored(&p, 35);
    assert_eq!(s.stats().predict_requests, 4);
    assert_eq!(s.stats().transactions, 35);
}

#[tokio::test]
async fn timeouts_are_retried_and_the_batch_is_then_scored() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        delay_ms: 1_500,
        count: Some(2),
        ..FaultPlan::default()
    });
    let mut cfg = settings(&s.predict_url());
    cfg.timeout_ms = 200;
    let (mut h, reg, items) = direct(cfg, 20);
    let p = h.prepare(items).await.unwrap();
    assert_all_scored(&p, 20);
    assert_eq!(
        metric(
            &reg,
            "streamops_fraud_scoring_calls_total",
            Some(("outcome", "timeout"))
        ),
        2.0
    );
    assert_eq!(
        metric(&reg, "streamops_fraud_scoring_retries_total", None),
        2.0
    );
    assert_eq!(s.stats().predict_requests, 3);
}

#[tokio::test]
async fn server_errors_are_retried_and_the_batch_is_then_scored() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        status: Some(503),
        count: Some(3),
        ..FaultPlan::default()
    });
    let (mut h, reg, items) = direct(settings(&s.predict_url()), 20);
    let p = h.prepare(items).await.unwrap();
    assert_all_scored(&p, 20);
    assert_eq!(
        metric(
            &reg,
            "streamops_fraud_scoring_calls_total",
            Some(("outcome", "http_5xx"))
        ),
        3.0
    );
    assert_eq!(
        metric(
            &reg,
            "streamops_fraud_scoring_calls_total",
            Some(("outcome", "ok"))
        ),
        1.0
    );
}

#[tokio::test]
async fn malformed_answers_are_retried_and_the_batch_is_then_scored() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        malformed: true,
        count: Some(1),
        ..FaultPlan::default()
    });
    let (mut h, reg, items) = direct(settings(&s.predict_url()), 20);
    let p = h.prepare(items).await.unwrap();
    assert_all_scored(&p, 20);
    assert_eq!(
        metric(
            &reg,
            "streamops_fraud_scoring_calls_total",
            Some(("outcome", "malformed"))
        ),
        1.0
    );
}

#[tokio::test]
async fn exhausted_retries_fail_the_batch_for_a_later_retry_and_reject_nothing() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        status: Some(503),
        ..FaultPlan::default()
    });
    let mut cfg = settings(&s.predict_url());
    cfg.max_retries = 2;
    let (mut h, _, items) = direct(cfg, 30);
    let e = h.prepare(items).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(
        e.to_string().contains(
            "scoring service unavailable: scoring failed after 3 attempt(s): scoring service answered HTTP 503"
        ),
        "{e}"
    );
    assert_eq!(s.stats().predict_requests, 3);
}

#[tokio::test]
async fn an_unreachable_scorer_fails_the_batch_for_a_later_retry() {
    let mut cfg = settings(&dead_url());
    cfg.max_retries = 1;
    let (mut h, reg, items) = direct(cfg, 5);
    let e = h.prepare(items).await.unwrap_err();
    assert!(
        e.is_retryable() && e.to_string().contains("unreachable"),
        "{e}"
    );
    assert_eq!(
        metric(
            &reg,
            "streamops_fraud_scoring_calls_total",
            Some(("outcome", "connect"))
        ),
        2.0
    );
}

#[tokio::test]
async fn a_transaction_the_scorer_refuses_is_isolated_and_its_neighbours_are_scored() {
    let s = scorer().await;
    let (mut h, _, mut items) = direct(settings(&s.predict_url()), 20);
    // The decoder accepts nothing the reference scorer refuses; alter one decoded transaction.
    items[7].item.transaction.currency = "usd".into();
    let p = h.prepare(items).await.unwrap();
    assert_eq!(p.rejected.len(), 1, "{:?}", p.rejected);
    let (pos, r) = &p.rejected[0];
    assert_eq!(pos.offset, 7);
    assert_eq!(r.kind, RejectKind::ScoringRejected);
    assert!(
        r.detail.contains("HTTP 422") && r.detail.contains("currency"),
        "{}",
        r.detail
    );
    assert_eq!(p.items.len(), 19);
    let offsets: Vec<i64> = p.items.iter().map(|d| d.pos.offset).collect();
    assert_eq!(
        offsets,
        (0..20).filter(|o| *o != 7).collect::<Vec<_>>(),
        "scored items keep their order"
    );
    for d in &p.items {
        let pred = d.item.prediction.as_ref().expect("prediction");
        assert!((pred.score - expected_score(&d.item)).abs() < 1e-12);
    }
}

#[tokio::test]
async fn open_circuit_breaker_fails_fast_and_a_successful_trial_call_closes_it() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        status: Some(503),
        ..FaultPlan::default()
    });
    let mut cfg = settings(&s.predict_url());
    cfg.max_retries = 0;
    cfg.batch_size = 5;
    cfg.circuit_breaker_failures = 2;
    cfg.circuit_breaker_reset_ms = 400;
    let (mut h, reg, items) = direct(cfg, 20);
    // Two failed calls (two attempts of the batch) open the breaker; the third fails fast.
    assert!(h.prepare(items.clone()).await.is_err());
    assert!(h.prepare(items.clone()).await.is_err());
    let e = h.prepare(items.clone()).await.unwrap_err();
    assert!(e.to_string().contains("circuit breaker open"), "{e}");
    assert_eq!(s.stats().predict_requests, 2);
    assert_eq!(metric(&reg, "streamops_fraud_circuit_state", None), 1.0);
    assert_eq!(
        metric(&reg, "streamops_fraud_circuit_opened_total", None),
        1.0
    );

    // The service recovers; once the breaker's reset time has passed, a trial call closes it.
    s.set_faults(FaultPlan::default());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = h.prepare(items).await.unwrap();
    assert_all_scored(&p, 20);
    assert_eq!(metric(&reg, "streamops_fraud_circuit_state", None), 0.0);
}

#[tokio::test]
async fn a_retried_batch_only_scores_the_transactions_still_unscored() {
    let s = scorer().await;
    let mut cfg = settings(&s.predict_url());
    cfg.batch_size = 10;
    cfg.max_retries = 0;
    let (mut h, _, items) = direct(cfg, 30);
    // The first group is scored, then the scorer fails.
    h.prepare(items[..10].to_vec()).await.unwrap();
    s.set_faults(FaultPlan {
        status: Some(503),
        ..FaultPlan::default()
    });
    assert!(h.prepare(items.clone()).await.is_err());
    assert_eq!(s.stats().predict_requests, 2);
    s.set_faults(FaultPlan::default());
    h.reset();
    let p = h.prepare(items.clone()).await.unwrap();
    assert_all_scored(&p, 30);
    assert_eq!(s.stats().predict_requests, 4, "two more calls, not three");
    assert_eq!(s.stats().transactions, 30);
    // After the commit, the same positions (a replay) are scored afresh.
    h.committed().await.unwrap();
    assert_all_scored(&h.prepare(items).await.unwrap(), 30);
    assert_eq!(s.stats().transactions, 60);
}

#[tokio::test]
async fn transactions_sent_to_the_error_topic_stay_rejected_when_their_batch_is_retried() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        status: Some(422),
        ..FaultPlan::default()
    });
    let mut cfg = settings(&s.predict_url());
    cfg.max_retries = 0;
    let (mut h, _, items) = direct(cfg, 10);
    let first = h.prepare(items.clone()).await.unwrap();
    assert_eq!(first.rejected.len(), 10);
    let calls = s.stats().predict_requests;
    // The transaction of the batch failed: the pipeline resets the handler and retries.
    h.reset();
    s.set_faults(FaultPlan::default());
    let again = h.prepare(items.clone()).await.unwrap();
    assert_eq!(
        again.rejected, first.rejected,
        "the same transactions, with the same reason"
    );
    assert_eq!(s.stats().predict_requests, calls, "no second scoring call");
    // Once a batch commits, the next batches are scored normally.
    h.committed().await.unwrap();
    assert_all_scored(&h.prepare(items).await.unwrap(), 10);
}

/// Every protocol, against the reference scorer's endpoint for it.
async fn protocol_scores_every_transaction(protocol: ScoringProtocol) {
    let s = scorer().await;
    let mut cfg = settings(&s.url_for(protocol));
    cfg.protocol = protocol;
    cfg.batch_size = 25;
    let (mut h, _, items) = direct(cfg, 60);
    let p = h.prepare(items).await.unwrap();
    assert!(p.rejected.is_empty(), "{:?}", p.rejected.first());
    assert_eq!(p.items.len(), 60);
    for d in &p.items {
        let pred = d.item.prediction.as_ref().expect("prediction");
        assert!(
            (pred.score - expected_score(&d.item)).abs() < 1e-12,
            "{}: {} vs {}",
            protocol.as_str(),
            pred.score,
            expected_score(&d.item)
        );
        assert_eq!(&*pred.model_version, model::MODEL_VERSION);
    }
    assert_eq!(s.stats().predict_requests, 3);
    assert_eq!(s.stats().transactions, 60);
}

#[tokio::test]
async fn the_streamops_protocol_scores_every_transaction_like_the_reference_model() {
    protocol_scores_every_transaction(ScoringProtocol::Streamops).await;
}

#[tokio::test]
async fn the_kserve_v1_protocol_scores_every_transaction_like_the_reference_model() {
    protocol_scores_every_transaction(ScoringProtocol::KserveV1).await;
}

#[tokio::test]
async fn the_open_inference_v2_protocol_scores_every_transaction_like_the_reference_model() {
    protocol_scores_every_transaction(ScoringProtocol::OpenInferenceV2).await;
}

#[tokio::test]
async fn tensor_protocols_are_retried_through_an_outage_like_the_streamops_one() {
    for protocol in [ScoringProtocol::KserveV1, ScoringProtocol::OpenInferenceV2] {
        let s = scorer().await;
        s.set_faults(FaultPlan {
            status: Some(503),
            count: Some(2),
            ..FaultPlan::default()
        });
        let mut cfg = settings(&s.url_for(protocol));
        cfg.protocol = protocol;
        let (mut h, _, items) = direct(cfg, 10);
        assert_all_scored(&h.prepare(items).await.unwrap(), 10);
        assert_eq!(s.stats().predict_requests, 3, "{}", protocol.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_stores_transactions_with_their_predictions_once_per_transaction_id() {
    require_services();
    let s = scorer().await;
    let (_, pool) = fresh_database("fraud-direct").await;
    streamops_worker::db::MIGRATOR.run(&pool).await.unwrap();
    let ctx = context(pool.clone());
    let mut h = FraudHandler::new(&ctx, &settings(&s.predict_url())).unwrap();
    let (_, _, mut items) = direct(settings(&s.predict_url()), 50);
    // The same transaction id again, at a later offset.
    let mut dup = items[3].clone();
    dup.pos.offset = 1000;
    items.push(dup);
    let p = h.prepare(items).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    h.write(&mut tx, &p.items).await.unwrap();
    tx.commit().await.unwrap();
    h.committed().await.unwrap();

    let rows: Vec<(String, f64, bool, f64, String, i64, f64)> = sqlx::query_as(
        "SELECT t.transaction_id, p.fraud_score, p.is_fraud, p.threshold, p.model_version, \
                t.source_offset, t.amount::float8 \
         FROM transactions t JOIN predictions p USING (transaction_id) ORDER BY t.source_offset",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 50);
    for (row, d) in rows.iter().zip(&p.items) {
        let t = &d.item.transaction;
        assert_eq!(row.0, t.transaction_id);
        let score = expected_score(&d.item);
        assert!((row.1 - score).abs() < 1e-12);
        assert_eq!(row.2, score >= 0.8);
        assert_eq!(row.3, 0.8);
        assert_eq!(row.4, model::MODEL_VERSION);
        assert_eq!(row.5, d.pos.offset, "the first occurrence is kept");
        assert!((row.6 - t.amount).abs() < 1e-9);
    }
    assert_eq!(
        metric(&ctx.registry, "streamops_fraud_duplicates_total", None),
        1.0
    );
    assert_eq!(
        metric(
            &ctx.registry,
            "streamops_fraud_transactions_stored_total",
            None
        ),
        50.0
    );
    let labels: Vec<(String, i64)> =
        sqlx::query_as("SELECT prediction, count(*) FROM predictions GROUP BY 1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(labels
        .iter()
        .all(|(l, _)| l == "fraud" || l == "legitimate"));
}

// ---- The worker process.

fn fraud_env(env: &mut TestEnv, s: FraudSettings) {
    env.config.handler = HandlerConfig::Fraud(s);
}

/// Per transaction id: (score, is_fraud, amount) for every generated valid transaction.
fn independent_predictions(events: &[Generated]) -> HashMap<String, (f64, bool, f64)> {
    events
        .iter()
        .filter_map(|g| match &g.event {
            Some(Event::Transaction(t)) => {
                let score = model::score(&ScoreInput {
                    transaction_id: t.transaction_id.clone(),
                    account_id: t.account_id.clone(),
                    merchant: t.merchant_id.clone(),
                    amount: t.amount,
                    currency: t.currency.clone(),
                    timestamp: t.timestamp.clone(),
                });
                Some((t.transaction_id.clone(), (score, score >= 0.8, t.amount)))
            }
            _ => None,
        })
        .collect()
}

async fn stored_predictions(pool: &PgPool) -> HashMap<String, (f64, bool, f64)> {
    let rows: Vec<(String, f64, bool, f64)> = sqlx::query_as(
        "SELECT t.transaction_id, p.fraud_score, p.is_fraud, t.amount::float8 \
         FROM transactions t JOIN predictions p USING (transaction_id)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, s, f, a)| (id, (s, f, a)))
        .collect()
}

fn assert_predictions(
    expected: &HashMap<String, (f64, bool, f64)>,
    got: &HashMap<String, (f64, bool, f64)>,
) {
    assert_eq!(expected.len(), got.len(), "transaction count");
    for (id, e) in expected {
        let g = got.get(id).unwrap_or_else(|| panic!("{id} is not stored"));
        assert!((e.0 - g.0).abs() < 1e-12, "{id}: score {} != {}", e.0, g.0);
        assert_eq!(e.1, g.1, "{id}: is_fraud");
        assert!((e.2 - g.2).abs() < 1e-9, "{id}: amount");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_predictions_equal_the_reference_model_for_every_generated_transaction() {
    let s = scorer().await;
    let mut env = TestEnv::new("fraud-ok", HandlerKind::Fraud, 3).await;
    fraud_env(&mut env, settings(&s.predict_url()));
    let events = env
        .produce(&ProduceSpec::new(HandlerKind::Fraud, 2000).seed(17))
        .await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(2000).await;
    let expected = independent_predictions(&events);
    assert!(
        expected.values().any(|p| p.1),
        "no transaction crosses the threshold"
    );
    assert_predictions(&expected, &stored_predictions(&env.pool).await);
    let versions: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT model_version FROM predictions")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(versions, vec![model::MODEL_VERSION.to_string()]);
    assert_eq!(
        w.metric("streamops_fraud_transactions_stored_total"),
        2000.0
    );
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_and_restarted_leaves_no_missing_and_no_duplicate_rows() {
    let s = scorer().await;
    let mut env = TestEnv::new("fraud-kill", HandlerKind::Fraud, 3).await;
    fraud_env(&mut env, settings(&s.predict_url()));
    env.config.batch.max_messages = 50;
    env.config.batch.max_wait_ms = 20;
    let total = 4000u64;
    let spec = ProduceSpec::new(HandlerKind::Fraud, total)
        .seed(31)
        .rate(1200);
    let producer = {
        let topic = env.topic.clone();
        tokio::spawn(async move { produce_events(&topic, &spec).await })
    };
    // Static membership (the operator's): the restart is a container restart in its pod.
    let mut w = env.start_static_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(800).await;
    w.kill();
    assert!(
        env.applied_offsets().await < total as i64,
        "the kill was not mid-stream"
    );
    let mut w = env.start_static_worker("w-0");
    w.wait_ready().await;
    let events = producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;
    assert_eq!(env.count("transactions").await, total as i64);
    assert_eq!(env.count("predictions").await, total as i64);
    assert_eq!(env.count("streamops_rejections").await, 0);
    assert_predictions(
        &independent_predictions(&events),
        &stored_predictions(&env.pool).await,
    );
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

async fn send_raw(topic: &str, values: &[String]) {
    let producer: FutureProducer = KafkaClientSettings::plaintext(BROKER)
        .reliable_producer()
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    for v in values {
        producer
            .send(
                FutureRecord::to(topic).key("k").payload(v.as_str()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_transactions_land_in_the_error_topic_with_the_rule_they_broke() {
    let s = scorer().await;
    let mut env = TestEnv::new("fraud-poison", HandlerKind::Fraud, 1).await;
    fraud_env(&mut env, settings(&s.predict_url()));
    let spec = ProduceSpec::new(HandlerKind::Fraud, 500)
        .seed(41)
        .poison(10.0);
    let events = env.produce(&spec).await;
    let tx = |f: &str, v: &str| {
        let mut o = serde_json::json!({"transaction_id": "x-1", "account_id": "a", "merchant": "m",
            "amount": 10.0, "currency": "USD", "timestamp": "2024-03-20T10:30:00Z"});
        o[f] = serde_json::from_str(v).unwrap();
        o.to_string()
    };
    let custom = [
        (
            tx("currency", "\"usd\""),
            "invalid_value",
            "three uppercase letters",
        ),
        (
            tx("currency", "\"ABC\""),
            "invalid_value",
            "not a known ISO 4217 currency",
        ),
        (
            tx("amount", "-3"),
            "invalid_value",
            "`amount` must be positive",
        ),
        (
            tx("amount", "0"),
            "invalid_value",
            "`amount` must be positive",
        ),
        (
            tx("timestamp", "\"2999-01-01T00:00:00Z\""),
            "invalid_value",
            "24 hours",
        ),
        (
            tx("timestamp", "\"20/03/2024\""),
            "invalid_value",
            "RFC 3339",
        ),
        (
            tx("transaction_id", "\"\""),
            "invalid_value",
            "must not be empty",
        ),
        ("[1, 2]".to_string(), "wrong_type", "JSON object"),
    ];
    send_raw(
        &env.topic,
        &custom.iter().map(|c| c.0.clone()).collect::<Vec<_>>(),
    )
    .await;
    let poison: Vec<&Generated> = events.iter().filter(|g| g.poison.is_some()).collect();
    let total = events.len() + custom.len();
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(total as i64).await;
    assert_eq!(
        env.count("transactions").await,
        (events.len() - poison.len()) as i64
    );
    let rejected = poison.len() + custom.len();
    assert_eq!(env.count("streamops_rejections").await, rejected as i64);

    let records = env.consume_error_topic(rejected);
    assert_eq!(records.len(), rejected);
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for g in &poison {
        *reasons
            .entry(g.poison.unwrap().expected_reason().into())
            .or_default() += 1;
    }
    for c in &custom {
        *reasons.entry(c.1.into()).or_default() += 1;
    }
    let mut got: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *got.entry(header(r, "streamops.error.reason").unwrap())
            .or_default() += 1;
    }
    assert_eq!(reasons, got);
    for (value, reason, detail) in &custom {
        let r = records
            .iter()
            .find(|r| r.payload() == Some(value.as_bytes()))
            .unwrap_or_else(|| panic!("{value} is not in the error topic"));
        assert_eq!(
            header(r, "streamops.error.reason").as_deref(),
            Some(*reason)
        );
        let d = header(r, "streamops.error.detail").unwrap();
        assert!(d.contains(detail), "{value}: {d}");
    }
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

/// Stored predictions per transaction id: how many rows each id has.
async fn predictions_per_transaction(pool: &PgPool) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT transaction_id, count(*) FROM predictions GROUP BY transaction_id")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_second_scorer_outage_mid_stream_leaves_every_valid_transaction_with_exactly_one_prediction(
) {
    let s = scorer().await;
    let addr = s.addr();
    let mut env = TestEnv::new("fraud-outage", HandlerKind::Fraud, 2).await;
    let mut cfg = settings(&s.predict_url());
    cfg.max_retries = 2;
    cfg.timeout_ms = 500;
    cfg.circuit_breaker_reset_ms = 2_000;
    fraud_env(&mut env, cfg);
    env.config.batch.max_messages = 50;
    env.config.batch.max_wait_ms = 50;
    // About 75 s of traffic at 40 messages per second, 2% of it invalid.
    let total = 3000u64;
    let spec = ProduceSpec::new(HandlerKind::Fraud, total)
        .seed(53)
        .rate(40)
        .poison(2.0);
    let producer = {
        let topic = env.topic.clone();
        tokio::spawn(async move { produce_events(&topic, &spec).await })
    };
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(300).await;

    // The scorer goes away for 60 s: connections are refused.
    s.stop().await.expect("scorer stops");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let applied = env.applied_offsets().await;
    assert!(applied < total as i64, "the outage was not mid-stream");
    let mut readyz_seen_false = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        readyz_seen_false |= w.readyz() == Some(503);
    }
    assert_eq!(
        env.applied_offsets().await,
        applied,
        "nothing commits while the scorer is down: consumption is paused"
    );
    assert!(
        readyz_seen_false,
        "the worker reports not ready during the outage"
    );
    let refused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM streamops_rejections WHERE reason = 'scoring_rejected'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        refused, 0,
        "no transaction goes to the error topic because the scorer is down"
    );

    // The scorer returns on the same address.
    let s = ScorerServer::spawn(addr, FaultPlan::default())
        .await
        .expect("scorer restarts on the same address");
    let events = producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;
    assert!(s.stats().transactions > 0);

    let valid = independent_predictions(&events);
    let poison = events.iter().filter(|g| g.poison.is_some()).count();
    assert!(poison > 0 && !valid.is_empty());
    let per_tx = predictions_per_transaction(&env.pool).await;
    assert_eq!(
        per_tx.len(),
        valid.len(),
        "every valid transaction has a prediction"
    );
    for id in valid.keys() {
        assert_eq!(per_tx.get(id), Some(&1), "{id}: exactly one prediction");
    }
    assert_predictions(&valid, &stored_predictions(&env.pool).await);
    // The error topic holds the invalid messages only, none for the outage.
    assert_eq!(env.count("streamops_rejections").await, poison as i64);
    let records = env.consume_error_topic(poison);
    assert!(records
        .iter()
        .all(|r| header(r, "streamops.error.reason").as_deref() != Some("scoring_rejected")));
    assert!(w.metric("streamops_fraud_scoring_calls_total{outcome=\"connect\"}") > 0.0);
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_scorer_is_retried_after_timeouts_and_every_transaction_is_stored() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        delay_ms: 2_000,
        count: Some(2),
        ..FaultPlan::default()
    });
    let mut env = TestEnv::new("fraud-slow", HandlerKind::Fraud, 1).await;
    let mut cfg = settings(&s.predict_url());
    cfg.timeout_ms = 300;
    fraud_env(&mut env, cfg);
    let events = env
        .produce(&ProduceSpec::new(HandlerKind::Fraud, 400).seed(61))
        .await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(400).await;
    assert_predictions(
        &independent_predictions(&events),
        &stored_predictions(&env.pool).await,
    );
    assert_eq!(env.count("streamops_rejections").await, 0);
    assert_eq!(
        w.metric("streamops_fraud_scoring_calls_total{outcome=\"timeout\"}"),
        2.0
    );
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_table_left_by_the_original_service_is_refused_not_adopted() {
    let (_url, pool) = fresh_database("fraud-foreign").await;
    // Seed 003's own table (Flyway), with other columns.
    sqlx::query(
        "CREATE TABLE transactions (id UUID PRIMARY KEY, amount NUMERIC, created_at TIMESTAMPTZ)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let err = streamops_worker::db::migrate(&pool, &tokio_util::sync::CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("table \"transactions\" already exists with other columns")
            && err.contains("missing transaction_id")
            && err.contains("unexpected id"),
        "{err}"
    );
    let predictions: Option<String> = sqlx::query_scalar("SELECT to_regclass('predictions')::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        predictions, None,
        "nothing of the fraud migration was applied"
    );

    // The same database with the table renamed away: the migrations apply.
    sqlx::query("ALTER TABLE transactions RENAME TO legacy_transactions")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        streamops_worker::db::migrate(&pool, &tokio_util::sync::CancellationToken::new())
            .await
            .unwrap()
    );
    // Once applied, a second start does not trip over its own tables.
    assert!(
        streamops_worker::db::migrate(&pool, &tokio_util::sync::CancellationToken::new())
            .await
            .unwrap()
    );
}
