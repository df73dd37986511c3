//! Hostile but well-formed input, for every handler, through a real worker process: valid
//! messages interleaved with JSON that decodes but holds what PostgreSQL refuses (U+0000 in a value
//! or a key, lone surrogates) or extreme shapes (nesting, field counts, sizes, non-finite
//! numbers). Every valid message lands, every hostile one is on the error topic with its reason,
//! and the worker never stalls. Then the second line of defence: rows the decoder accepts but the
//! database refuses (a CHECK constraint added to the handler's table) are isolated by splitting
//! the batch and sent to the error topic with reason `database_refused`, while the rest commits.
//!
//! Needs the broker and PostgreSQL (pipeline-trigger: Redis too); fails loudly without them.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::AsyncCommands;
use streamops_crds::config::Handler as HandlerConfig;
use streamops_crds::v1alpha1::{FraudSettings, PipelineTriggerSettings, WebhookSpec};
use streamops_crds::HandlerKind;
use streamops_worker::errortopic::headers;
use streamops_worker::kafka::KafkaClientSettings;
use streamops_worker::scorer::{FaultPlan, ScorerServer};
use support::*;

const REDIS: &str = "127.0.0.1:6379";
const REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// A message to produce: valid (`None`) or hostile with the reason the worker must give.
type Msg = (String, Option<&'static str>);

/// Produces `messages` in order to partition 0 of `topic` (offset = index).
async fn send(topic: &str, messages: &[Msg]) {
    let producer: FutureProducer = KafkaClientSettings::plaintext(BROKER)
        .reliable_producer()
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    for (value, _) in messages {
        producer
            .send(
                FutureRecord::<str, str>::to(topic)
                    .partition(0)
                    .payload(value.as_str()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

/// `n` valid messages from `valid(i)`, with `hostile` spread evenly between them.
fn interleave(
    n: usize,
    valid: impl Fn(usize) -> String,
    hostile: Vec<(String, &'static str)>,
) -> Vec<Msg> {
    let every = (n / hostile.len().max(1)).max(1);
    let mut hostile = hostile.into_iter();
    let mut out = Vec::new();
    for i in 0..n {
        if i % every == 1 {
            if let Some((v, reason)) = hostile.next() {
                out.push((v, Some(reason)));
            }
        }
        out.push((valid(i), None));
    }
    out.extend(hostile.map(|(v, r)| (v, Some(r))));
    out
}

/// Runs a worker over `messages` until every offset is stored; checks the error topic holds
/// exactly the hostile messages with their reasons, and returns the number of valid ones.
async fn run_and_check_error_topic(
    env: &TestEnv,
    messages: &[Msg],
    vars: &[(&str, &str)],
) -> usize {
    send(&env.topic, messages).await;
    let mut w = env.start_worker_with_env("w-0", vars);
    w.wait_ready().await;
    env.wait_for_offsets(messages.len() as i64).await;

    let expected: BTreeMap<i64, &str> = messages
        .iter()
        .enumerate()
        .filter_map(|(i, (_, r))| r.map(|r| (i as i64, r)))
        .collect();
    let records = env.consume_error_topic(expected.len());
    let mut got: BTreeMap<i64, String> = BTreeMap::new();
    for m in &records {
        let offset: i64 = header(m, headers::SOURCE_OFFSET)
            .and_then(|o| o.parse().ok())
            .expect("source offset header");
        let reason = header(m, headers::REASON).expect("reason header");
        assert!(
            m.payload().is_some(),
            "the original value travels with the error"
        );
        got.insert(offset, reason);
    }
    let got_ref: BTreeMap<i64, &str> = got.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(got_ref, expected, "error topic (source offset -> reason)");
    assert_eq!(
        env.count("streamops_rejections").await,
        expected.len() as i64
    );
    assert_eq!(w.readyz(), Some(200), "the worker is not stalled");
    assert!(w.terminate_and_wait().success());
    messages.len() - expected.len()
}

fn deep(levels: usize) -> String {
    format!("{}0{}", "[".repeat(levels), "]".repeat(levels))
}

fn many_fields(n: usize) -> String {
    (0..n)
        .map(|i| format!("\"f{i}\":0"))
        .collect::<Vec<_>>()
        .join(",")
}

const TS: &str = "\"timestamp\":\"2024-03-20T10:30:00Z\"";

fn price(i: usize, symbol: &str) -> String {
    format!(
        "{{\"symbol\":\"{symbol}\",\"price\":{}.5,{TS}}}",
        100 + i % 7
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_average_hostile_messages_go_to_the_error_topic_and_valid_ones_land() {
    let mut env = TestEnv::new("hostile-ma", HandlerKind::MovingAverage, 1).await;
    env.config.max_message_bytes = 65_536;
    let hostile = vec![
        (
            format!("{{\"symbol\":\"A\\u0000\",\"price\":1,{TS}}}"),
            "unstorable",
        ),
        (
            format!("{{\"symbol\":\"A\",\"price\":1,{TS},\"source\":\"\\u0000\"}}"),
            "unstorable",
        ),
        (
            format!("{{\"symbol\":\"\\ud800\",\"price\":1,{TS}}}"),
            "invalid_json",
        ),
        (
            format!("{{\"\\udfff\":1,\"symbol\":\"A\",\"price\":1,{TS}}}"),
            "invalid_json",
        ),
        (
            format!("{{\"symbol\":\"A\",\"price\":1,{TS},\"x\":{}}}", deep(40)),
            "too_complex",
        ),
        (
            format!(
                "{{\"symbol\":\"A\",\"price\":1,{TS},{}}}",
                many_fields(5000)
            ),
            "too_complex",
        ),
        (
            format!("{{\"symbol\":\"A\",\"price\":1e999,{TS}}}"),
            "invalid_value",
        ),
        (
            format!("{{\"symbol\":\"A\",\"price\":1e300,{TS}}}"),
            "invalid_value",
        ),
    ];
    let messages = interleave(
        200,
        |i| price(i, ["AAPL", "MSFT", "A\u{e9}\u{20ac}"][i % 3]),
        hostile,
    );
    let valid = run_and_check_error_topic(&env, &messages, &[]).await;
    assert_eq!(env.count("price_points").await, valid as i64);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_database_refuses_are_isolated_by_splitting_the_batch_and_the_rest_commits() {
    let mut env = TestEnv::new("hostile-ma-db", HandlerKind::MovingAverage, 1).await;
    env.config.batch.max_messages = 100;
    streamops_worker::db::MIGRATOR
        .run(&env.pool)
        .await
        .expect("migrations");
    // A rule the decoder knows nothing about: the database refuses these rows (SQLSTATE 23514).
    sqlx::query("ALTER TABLE price_points ADD CONSTRAINT no_refused CHECK (symbol <> 'REFUSED')")
        .execute(&env.pool)
        .await
        .expect("constraint");
    let messages: Vec<Msg> = (0..300)
        .map(|i| {
            if i % 37 == 5 {
                (price(i, "REFUSED"), Some("database_refused"))
            } else {
                (price(i, "OK"), None)
            }
        })
        .collect();
    let valid = run_and_check_error_topic(&env, &messages, &[]).await;
    assert_eq!(env.count("price_points").await, valid as i64);
    let detail: String = sqlx::query_scalar(
        "SELECT detail FROM streamops_rejections WHERE reason = 'database_refused' LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        detail.contains("no_refused") && detail.contains("23514"),
        "the database's reason travels with the message: {detail}"
    );
    env.cleanup().await;
}

fn reading(i: usize, machine: &str) -> String {
    format!(
        "{{\"machine_id\":\"{machine}\",\"timestamp\":\"2024-03-20T10:{:02}:{:02}Z\",\"readings\":{{\"t\":{i}}},\"failure\":{}}}",
        (i / 60) % 60,
        i % 60,
        i % 10 == 3
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_hostile_messages_go_to_the_error_topic_and_valid_ones_land() {
    let mut env = TestEnv::new("hostile-sensor", HandlerKind::Sensor, 1).await;
    env.config.max_message_bytes = 65_536;
    let base = "\"machine_id\":\"m-1\",\"timestamp\":\"2024-03-20T10:30:00Z\",\"failure\":false";
    let readings257 = (0..257)
        .map(|i| format!("\"s{i}\":1"))
        .collect::<Vec<_>>()
        .join(",");
    let hostile = vec![
        (format!("{{{base},\"readings\":{{\"t\\u0000\":1}}}}"), "unstorable"),
        (
            "{\"machine_id\":\"m\\u0000\",\"timestamp\":\"2024-03-20T10:30:00Z\",\"readings\":{},\"failure\":false}".to_string(),
            "invalid_value",
        ),
        (format!("{{{base},\"readings\":{{\"\\udc00\":1}}}}"), "invalid_json"),
        (format!("{{{base},\"readings\":{{}},\"x\":{}}}", deep(64)), "too_complex"),
        (format!("{{{base},\"readings\":{{{readings257}}}}}"), "invalid_value"),
        (format!("{{{base},\"readings\":{{\"t\":1e999}}}}"), "invalid_value"),
    ];
    let messages = interleave(150, |i| reading(i, ["m-1", "m-2"][i % 2]), hostile);
    let valid = run_and_check_error_topic(&env, &messages, &[]).await;
    assert_eq!(env.count("sensor_readings").await, valid as i64);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensor_rows_the_database_refuses_are_isolated_and_the_rest_commits() {
    let mut env = TestEnv::new("hostile-sensor-db", HandlerKind::Sensor, 1).await;
    env.config.batch.max_messages = 50;
    streamops_worker::db::MIGRATOR
        .run(&env.pool)
        .await
        .expect("migrations");
    sqlx::query(
        "ALTER TABLE sensor_readings ADD CONSTRAINT no_refused CHECK (machine_id <> 'refused')",
    )
    .execute(&env.pool)
    .await
    .expect("constraint");
    let messages: Vec<Msg> = (0..120)
        .map(|i| {
            if i % 29 == 7 {
                (reading(i, "refused"), Some("database_refused"))
            } else {
                (reading(i, "m-ok"), None)
            }
        })
        .collect();
    let valid = run_and_check_error_topic(&env, &messages, &[]).await;
    assert_eq!(env.count("sensor_readings").await, valid as i64);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_hostile_messages_go_to_the_error_topic_and_valid_ones_land() {
    let scorer = ScorerServer::spawn("127.0.0.1:0".parse().unwrap(), FaultPlan::default())
        .await
        .expect("scorer starts");
    let mut env = TestEnv::new("hostile-fraud", HandlerKind::Fraud, 1).await;
    env.config.max_message_bytes = 65_536;
    env.config.handler = HandlerConfig::Fraud(FraudSettings {
        scoring_url: scorer.predict_url(),
        timeout_ms: 2000,
        max_retries: 3,
        batch_size: 100,
        fraud_threshold: 0.8,
        circuit_breaker_failures: 5,
        circuit_breaker_reset_ms: 30_000,
        protocol: Default::default(),
        retry_backoff: Default::default(),
    });
    let tx = |id: &str, merchant: &str| {
        format!("{{\"transaction_id\":\"{id}\",\"account_id\":\"a-1\",\"merchant\":\"{merchant}\",\"amount\":12.5,\"currency\":\"EUR\",{TS}}}")
    };
    let hostile = vec![
        (tx("h-1", "a\\u0000b"), "invalid_value"),
        (tx("h-2\\u0000", "m"), "invalid_value"),
        (tx("h-3", "\\udbff"), "invalid_json"),
        (
            format!("{{\"transaction_id\":\"h-4\",\"account_id\":\"a\",\"merchant\":\"m\",\"amount\":1,\"currency\":\"EUR\",{TS},\"x\":{}}}", deep(40)),
            "too_complex",
        ),
    ];
    let messages = interleave(100, |i| tx(&format!("ok-{i}"), "caf\u{e9}"), hostile);
    let valid = run_and_check_error_topic(&env, &messages, &[]).await;
    assert_eq!(env.count("transactions").await, valid as i64);
    assert_eq!(env.count("predictions").await, valid as i64);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_trigger_hostile_messages_go_to_the_error_topic_and_valid_ones_are_counted() {
    if std::net::TcpStream::connect_timeout(&REDIS.parse().unwrap(), Duration::from_secs(3))
        .is_err()
    {
        panic!("Redis is not reachable at {REDIS}; start it (`make dev-up`)");
    }
    let mut env = TestEnv::new("hostile-pt", HandlerKind::PipelineTrigger, 1).await;
    env.config.max_message_bytes = 65_536;
    env.config.handler = HandlerConfig::PipelineTrigger(PipelineTriggerSettings {
        pipeline_name: "hostile".into(),
        max_events: 1_000_000,
        max_time_seconds: 86_400,
        trigger_on_empty_window: false,
        consumer_id: None,
        // Never called: no threshold is reached.
        webhook: Some(WebhookSpec {
            url: "http://127.0.0.1:9/never".into(),
            timeout_ms: 1000,
            max_retries: 0,
            headers: Default::default(),
            secret_headers: Default::default(),
            retry_backoff: streamops_crds::v1alpha1::default_webhook_backoff(),
        }),
        job: None,
    });
    let hostile = vec![
        ("{\"e\":\"\\ud800\"}".to_string(), "invalid_json"),
        (format!("{{\"e\":{}}}", deep(40)), "too_complex"),
        (format!("{{{}}}", many_fields(5000)), "too_complex"),
        ("[1,2]".to_string(), "wrong_type"),
    ];
    // A NUL inside an event is harmless: events never reach PostgreSQL.
    let messages = interleave(
        100,
        |i| format!("{{\"event\":{i},\"note\":\"\\u0000\"}}"),
        hostile,
    );
    let valid =
        run_and_check_error_topic(&env, &messages, &[("STREAMOPS_REDIS_URL", REDIS_URL)]).await;
    let mut redis = redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let consumer = &env.config.consumer_id;
    let counted: Option<u64> = redis
        .get(format!("consumer:{{{consumer}}}:events"))
        .await
        .unwrap();
    assert_eq!(counted, Some(valid as u64));
    env.cleanup().await;
}
