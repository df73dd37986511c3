//! fraud handler against the real reference scorer, broker and PostgreSQL: validation, scoring
//! with retries, timeouts and the circuit breaker, the error topic, and exactly-once storage.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use sqlx::PgPool;
use streamops_crds::v1alpha1::FraudSettings;
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
async fn exhausted_retries_reject_the_transactions_with_the_last_error() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        status: Some(503),
        ..FaultPlan::default()
    });
    let mut cfg = settings(&s.predict_url());
    cfg.max_retries = 2;
    let (mut h, _, items) = direct(cfg, 30);
    let p = h.prepare(items).await.unwrap();
    assert!(p.items.is_empty());
    assert_eq!(p.rejected.len(), 30);
    let offsets: Vec<i64> = p.rejected.iter().map(|(pos, _)| pos.offset).collect();
    assert_eq!(
        offsets,
        (0..30).collect::<Vec<_>>(),
        "every transaction is rejected, none lost"
    );
    let r = &p.rejected[0].1;
    assert_eq!(r.kind, RejectKind::ScoringFailed);
    assert!(
        r.detail
            .starts_with("scoring failed after 3 attempt(s): scoring service answered HTTP 503"),
        "{}",
        r.detail
    );
    assert_eq!(s.stats().predict_requests, 3);
}

#[tokio::test]
async fn unreachable_scorer_rejects_the_transactions_after_the_retries() {
    let mut cfg = settings(&dead_url());
    cfg.max_retries = 1;
    let (mut h, reg, items) = direct(cfg, 5);
    let p = h.prepare(items).await.unwrap();
    assert_eq!(p.rejected.len(), 5);
    assert!(
        p.rejected[0].1.detail.contains("unreachable"),
        "{}",
        p.rejected[0].1.detail
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
async fn client_errors_reject_the_transactions_without_retrying() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        status: Some(422),
        ..FaultPlan::default()
    });
    let (mut h, _, items) = direct(settings(&s.predict_url()), 5);
    let p = h.prepare(items).await.unwrap();
    assert_eq!(p.rejected.len(), 5);
    assert!(
        p.rejected[0].1.detail.contains("after 1 attempt(s)"),
        "{}",
        p.rejected[0].1.detail
    );
    assert_eq!(s.stats().predict_requests, 1);
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
    // Four groups: two failed calls open the breaker, the next two fail without a call.
    let p = h.prepare(items.clone()).await.unwrap();
    assert_eq!(p.rejected.len(), 20);
    assert_eq!(s.stats().predict_requests, 2);
    assert!(
        p.rejected[19].1.detail.contains("circuit breaker open"),
        "{}",
        p.rejected[19].1.detail
    );
    assert_eq!(metric(&reg, "streamops_fraud_circuit_state", None), 1.0);
    assert_eq!(
        metric(&reg, "streamops_fraud_circuit_opened_total", None),
        1.0
    );

    // The service recovers; once the breaker's reset time has passed, a trial call closes it.
    h.committed().await.unwrap();
    s.set_faults(FaultPlan::default());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = h.prepare(items).await.unwrap();
    assert_all_scored(&p, 20);
    assert_eq!(metric(&reg, "streamops_fraud_circuit_state", None), 0.0);
}

#[tokio::test]
async fn transactions_sent_to_the_error_topic_stay_rejected_when_their_batch_is_retried() {
    let s = scorer().await;
    s.set_faults(FaultPlan {
        status: Some(500),
        ..FaultPlan::default()
    });
    let mut cfg = settings(&s.predict_url());
    cfg.max_retries = 0;
    let (mut h, _, items) = direct(cfg, 10);
    let first = h.prepare(items.clone()).await.unwrap();
    assert_eq!(first.rejected.len(), 10);
    // The transaction of the batch failed: the pipeline resets the handler and retries.
    h.reset();
    s.set_faults(FaultPlan::default());
    let again = h.prepare(items.clone()).await.unwrap();
    assert_eq!(
        again.rejected, first.rejected,
        "the same transactions, with the same reason"
    );
    assert_eq!(s.stats().predict_requests, 1, "no second scoring call");
    // Once a batch commits, the next batches are scored normally.
    h.committed().await.unwrap();
    assert_all_scored(&h.prepare(items).await.unwrap(), 10);
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
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(800).await;
    w.kill();
    assert!(
        env.applied_offsets().await < total as i64,
        "the kill was not mid-stream"
    );
    let mut w = env.start_worker("w-0");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_scorer_down_transactions_go_to_the_error_topic_after_the_retries_and_none_is_lost(
) {
    let mut env = TestEnv::new("fraud-down", HandlerKind::Fraud, 2).await;
    let mut cfg = settings(&dead_url());
    cfg.max_retries = 2;
    cfg.timeout_ms = 500;
    fraud_env(&mut env, cfg);
    let first = env
        .produce(&ProduceSpec::new(HandlerKind::Fraud, 300).seed(51))
        .await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(300).await;
    assert!(w.terminate_and_wait().success());
    assert_eq!(env.count("transactions").await, 0);
    assert_eq!(env.count("streamops_rejections").await, 300);
    let records = env.consume_error_topic(300);
    assert_eq!(
        records.len(),
        300,
        "every transaction is on the error topic once"
    );
    let mut payloads: Vec<Vec<u8>> = records
        .iter()
        .map(|r| r.payload().unwrap().to_vec())
        .collect();
    let mut sent: Vec<Vec<u8>> = first.iter().map(|g| g.payload.clone()).collect();
    payloads.sort();
    sent.sort();
    assert_eq!(payloads, sent);
    let mut unreachable = 0;
    for r in &records {
        assert_eq!(
            header(r, "streamops.error.reason").as_deref(),
            Some("scoring_failed")
        );
        let d = header(r, "streamops.error.detail").unwrap();
        // The breaker opens after five failed calls; later attempts fail fast.
        assert!(
            d.contains("after 3 attempt(s)")
                && (d.contains("unreachable") || d.contains("circuit breaker open")),
            "{d}"
        );
        unreachable += usize::from(d.contains("unreachable"));
    }
    assert!(unreachable > 0);

    // The service is back: the next transactions are scored and stored.
    let s = scorer().await;
    fraud_env(&mut env, settings(&s.predict_url()));
    let second = env
        .produce(&ProduceSpec::new(HandlerKind::Fraud, 200).seed(52))
        .await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(500).await;
    assert_predictions(
        &independent_predictions(&second),
        &stored_predictions(&env.pool).await,
    );
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
