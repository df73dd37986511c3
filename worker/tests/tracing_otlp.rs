//! OpenTelemetry tracing of the worker against a real OTLP/HTTP receiver: a server in this test
//! that accepts `POST /v1/traces` with `application/x-protobuf` and decodes each body as an
//! `ExportTraceServiceRequest` (opentelemetry-proto, prost), a scorer in this test that records
//! the `traceparent` of every request, the real broker and PostgreSQL, and a worker process.
//! The trace model under test is described in `streamops_worker::telemetry`.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::Message as _;
use streamops_crds::v1alpha1::{FraudSettings, RetryBackoff, ScoringProtocol};
use streamops_crds::{Handler as HandlerConfig, HandlerKind};
use streamops_worker::scorer::api::{PredictRequest, PredictResponse, ScoreOutput};
use support::*;

// ---- The OTLP receiver.

/// Spans received, with the resource attributes they came with.
#[derive(Default)]
struct Received {
    spans: Vec<(Vec<KeyValue>, Span)>,
    /// Requests that were not protobuf trace exports (wrong path, type or body).
    refused: Vec<String>,
}

struct OtlpReceiver {
    endpoint: String,
    received: Arc<Mutex<Received>>,
}

async fn export(
    axum::extract::State(received): axum::extract::State<Arc<Mutex<Received>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], Vec<u8>) {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut r = received.lock().unwrap();
    if content_type != "application/x-protobuf" {
        r.refused.push(format!("content-type {content_type:?}"));
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            [("content-type", "text/plain")],
            Vec::new(),
        );
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(req) => {
            for rs in req.resource_spans {
                let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        r.spans.push((attrs.clone(), s));
                    }
                }
            }
            (
                StatusCode::OK,
                [("content-type", "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }
        Err(e) => {
            r.refused.push(format!("undecodable body: {e}"));
            (
                StatusCode::BAD_REQUEST,
                [("content-type", "text/plain")],
                Vec::new(),
            )
        }
    }
}

async fn otlp_receiver() -> OtlpReceiver {
    let received = Arc::new(Mutex::new(Received::default()));
    let app = Router::new()
        .route("/v1/traces", post(export))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the OTLP receiver");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("OTLP receiver");
    });
    OtlpReceiver {
        endpoint: format!("http://{addr}"),
        received,
    }
}

impl OtlpReceiver {
    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        self.received.lock().unwrap().spans.clone()
    }

    fn refused(&self) -> Vec<String> {
        self.received.lock().unwrap().refused.clone()
    }
}

// ---- A scorer that records the trace context of each call.

struct RecordingScorer {
    url: String,
    traceparents: Arc<Mutex<Vec<Option<String>>>>,
}

async fn predict(
    axum::extract::State(seen): axum::extract::State<Arc<Mutex<Vec<Option<String>>>>>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<PredictRequest>,
) -> axum::Json<PredictResponse> {
    seen.lock().unwrap().push(
        headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    );
    axum::Json(PredictResponse {
        model_version: "recording-1".into(),
        predictions: req
            .transactions
            .into_iter()
            .map(|t| ScoreOutput {
                transaction_id: t.transaction_id,
                score: 0.25,
            })
            .collect(),
    })
}

async fn recording_scorer() -> RecordingScorer {
    let traceparents = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new()
        .route("/predict", post(predict))
        .with_state(traceparents.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the scorer");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("scorer");
    });
    RecordingScorer {
        url: format!("http://{addr}/predict"),
        traceparents,
    }
}

fn fraud_settings(url: &str) -> FraudSettings {
    FraudSettings {
        scoring_url: url.to_string(),
        timeout_ms: 5000,
        max_retries: 3,
        batch_size: 100,
        fraud_threshold: 0.8,
        circuit_breaker_failures: 5,
        circuit_breaker_reset_ms: 30_000,
        protocol: ScoringProtocol::Streamops,
        retry_backoff: RetryBackoff::default(),
    }
}

// ---- Messages.

const TRACE_A: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACE_B: &str = "0af7651916cd43dd8448eb211c80319c";

/// A message to produce: its value and, if any, its `traceparent`.
struct Outgoing {
    payload: Vec<u8>,
    key: String,
    traceparent: Option<String>,
}

fn traceparent(trace: &str, span: u64) -> String {
    format!("00-{trace}-{span:016x}-01")
}

async fn produce_all(topic: &str, messages: &[Outgoing]) {
    let producer = kafka::producer();
    for m in messages {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "source",
            value: Some("tracing-test"),
        });
        if let Some(tp) = &m.traceparent {
            headers = headers
                .insert(Header {
                    key: "traceparent",
                    value: Some(tp.as_str()),
                })
                .insert(Header {
                    key: "tracestate",
                    value: Some("streamops-test=1"),
                });
        }
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(0)
                    .key(&m.key)
                    .payload(&m.payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("cannot produce to {topic}: {e}"));
    }
}

/// Six valid transactions and one value that is not JSON: three transactions and the bad value
/// in trace A, one in trace B, one untraced, one with a `traceparent` that does not parse.
fn messages() -> (Vec<Outgoing>, usize) {
    let events = ProduceSpec::new(HandlerKind::Fraud, 6).seed(23).events();
    assert!(
        events.iter().all(|g| g.event.is_some()),
        "valid events only"
    );
    let tp = [
        Some(traceparent(TRACE_A, 0xa1)),
        Some(traceparent(TRACE_A, 0xa2)),
        None,
        Some(traceparent(TRACE_B, 0xb1)),
        Some("00-not-a-trace-context-01".to_string()),
        Some(traceparent(TRACE_A, 0xa3)),
    ];
    let mut out: Vec<Outgoing> = events
        .into_iter()
        .zip(tp)
        .map(|(g, traceparent)| Outgoing {
            payload: g.payload,
            key: g.key,
            traceparent,
        })
        .collect();
    out.push(Outgoing {
        payload: b"{\"transaction_id\": ".to_vec(),
        key: "bad".into(),
        traceparent: Some(traceparent(TRACE_A, 0xa4)),
    });
    (out, 6)
}

// ---- Span helpers.

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match v.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The spans, one per line, for failure messages.
fn dump(spans: &[(Vec<KeyValue>, Span)]) -> String {
    spans
        .iter()
        .map(|(_, s)| {
            let links: Vec<String> = s.links.iter().map(|l| hex(&l.span_id)).collect();
            format!(
                "\n  {} trace {} span {} parent {} links {links:?}",
                s.name,
                hex(&s.trace_id),
                hex(&s.span_id),
                hex(&s.parent_span_id)
            )
        })
        .collect()
}

/// `(trace id, span id)` of a W3C `traceparent`.
fn ids_of(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {traceparent:?}");
    (parts[1].to_string(), parts[2].to_string())
}

/// The contexts a batch span serves: its parent and its links.
fn served(s: &Span) -> HashSet<(String, String)> {
    let mut out: HashSet<(String, String)> = s
        .links
        .iter()
        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
        .collect();
    out.insert((hex(&s.trace_id), hex(&s.parent_span_id)));
    out
}

/// Waits until the receiver holds spans named `names` (at least one of each).
async fn wait_for_spans(rx: &OtlpReceiver, names: &[&str], log: &std::path::Path) {
    let start = Instant::now();
    loop {
        let spans = rx.spans();
        if names
            .iter()
            .all(|n| spans.iter().any(|(_, s)| s.name == *n))
        {
            return;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let got: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
            panic!(
                "the OTLP receiver got spans {got:?}, expected {names:?} (refused: {:?}); worker log: {}",
                rx.refused(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_traceparent_continues_into_decode_scoring_db_write_and_the_error_topic() {
    let rx = otlp_receiver().await;
    let scorer = recording_scorer().await;
    let mut env = TestEnv::new("otel-fraud", HandlerKind::Fraud, 1).await;
    env.config.handler = HandlerConfig::Fraud(fraud_settings(&scorer.url));
    let (msgs, valid) = messages();
    produce_all(&env.topic, &msgs).await;

    let mut w = env.start_worker_with_env(
        "w-0",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint.as_str()),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    w.wait_ready().await;
    env.wait_for_offsets(msgs.len() as i64).await;
    assert_eq!(env.count("transactions").await, valid as i64);
    let errors = env.consume_error_topic(1);
    assert_eq!(errors.len(), 1, "one record on the error topic");
    let log = w.log.clone();
    // Logs are unchanged by the tracing layer: JSON lines, none lost.
    let text = w.log_text();
    for line in [
        "\"pipeline started\"",
        "\"partition assigned\"",
        "trace export on",
    ] {
        assert!(text.contains(line), "the log lacks {line}: {text}");
    }
    // SIGTERM: the spans still buffered are flushed on the way out.
    let status = w.terminate_and_wait();
    assert!(
        status.success(),
        "worker exit: {status}; log {}",
        log.display()
    );
    wait_for_spans(
        &rx,
        &[
            "streamops.decode",
            "streamops.score",
            "streamops.db.write",
            "streamops.reject",
        ],
        &log,
    )
    .await;
    assert!(
        rx.refused().is_empty(),
        "refused exports: {:?}",
        rx.refused()
    );
    let spans = rx.spans();
    for (resource, _) in &spans {
        assert_eq!(
            attr(resource, "service.name").as_deref(),
            Some("streamops-worker")
        );
        assert_eq!(
            attr(resource, "deployment.environment").as_deref(),
            Some("test")
        );
    }
    let traced: Vec<(String, String)> = msgs
        .iter()
        .filter_map(|m| m.traceparent.as_deref())
        .filter(|tp| !tp.contains("not-a-trace"))
        .map(ids_of)
        .collect();
    assert_eq!(traced.len(), 5);
    // Only the messages' own traces: untraced messages and the unparsable traceparent start none.
    for (_, s) in &spans {
        let t = hex(&s.trace_id);
        assert!(
            t == TRACE_A || t == TRACE_B,
            "span {} in trace {t}, which no message started",
            s.name
        );
    }

    // decode: one child span per traced message; the bad value's is an error.
    let decode: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "streamops.decode")
        .collect();
    let decode_parents: HashSet<(String, String)> = decode
        .iter()
        .map(|s| (hex(&s.trace_id), hex(&s.parent_span_id)))
        .collect();
    assert_eq!(
        decode_parents,
        traced.iter().cloned().collect::<HashSet<_>>(),
        "decode spans are children of the traced messages' contexts; spans: {}",
        dump(&spans)
    );
    let bad = traceparent(TRACE_A, 0xa4);
    let bad_ids = ids_of(&bad);
    let bad_decode = decode
        .iter()
        .find(|s| (hex(&s.trace_id), hex(&s.parent_span_id)) == bad_ids)
        .unwrap();
    assert_eq!(
        attr(&bad_decode.attributes, "error.type").as_deref(),
        Some("invalid_json")
    );
    assert_eq!(
        bad_decode.status.as_ref().map(|s| s.code),
        Some(2),
        "ERROR status"
    );
    assert_eq!(
        attr(&bad_decode.attributes, "messaging.destination.name").as_deref(),
        Some(env.topic.as_str())
    );

    // db write: parent and links cover every traced message.
    let db: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "streamops.db.write")
        .collect();
    let db_served: HashSet<(String, String)> = db.iter().flat_map(|s| served(s)).collect();
    for m in &traced {
        assert!(
            db_served.contains(m),
            "no db write span serves message {m:?}"
        );
    }
    assert!(
        db.iter().any(|s| !s.links.is_empty()),
        "a batch of several traced messages links the others"
    );

    // score: the scorer calls serve the traced valid transactions, and each call carried the
    // traceparent of its span.
    let score: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "streamops.score")
        .collect();
    let score_served: HashSet<(String, String)> = score.iter().flat_map(|s| served(s)).collect();
    for m in traced.iter().filter(|m| **m != bad_ids) {
        assert!(
            score_served.contains(m),
            "no score span serves message {m:?}"
        );
    }
    let sent: Vec<String> = scorer
        .traceparents
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .cloned()
        .collect();
    assert!(!sent.is_empty(), "the scorer got no traceparent");
    let score_ids: HashSet<(String, String)> = score
        .iter()
        .map(|s| (hex(&s.trace_id), hex(&s.span_id)))
        .collect();
    for tp in &sent {
        assert!(
            score_ids.contains(&ids_of(tp)),
            "the scorer's traceparent {tp} is no exported score span"
        );
    }
    assert!(
        sent.iter().any(|tp| ids_of(tp).0 == TRACE_A),
        "a scorer call continues trace A: {sent:?}"
    );

    // error topic: the record's traceparent is a reject span, a child of the bad message.
    let rec_tp = header(&errors[0], "traceparent").expect("error record has a traceparent");
    let rec_ids = ids_of(&rec_tp);
    assert_eq!(rec_ids.0, TRACE_A);
    assert_eq!(
        header(&errors[0], "tracestate").as_deref(),
        Some("streamops-test=1")
    );
    let reject = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "streamops.reject" && hex(&s.span_id) == rec_ids.1)
        .expect("the error record's span was exported");
    assert_eq!(hex(&reject.parent_span_id), bad_ids.1);
    assert_eq!(
        attr(&reject.attributes, "messaging.destination.name").as_deref(),
        Some(env.error_topic.as_str())
    );
    let headers = errors[0].headers().map(|h| {
        use rdkafka::message::Headers;
        h.iter().filter(|h| h.key == "traceparent").count()
    });
    assert_eq!(headers, Some(1), "exactly one traceparent header");
    env.cleanup().await;
}

/// Runs the fixture through a worker with `vars` and checks that no trace context leaves it:
/// none to the scorer, none on the error record, no export to `rx`, logs as usual.
async fn run_untraced(rx: &OtlpReceiver, prefix: &str, vars: &[(&str, &str)]) {
    let scorer = recording_scorer().await;
    let mut env = TestEnv::new(prefix, HandlerKind::Fraud, 1).await;
    env.config.handler = HandlerConfig::Fraud(fraud_settings(&scorer.url));
    let (msgs, valid) = messages();
    produce_all(&env.topic, &msgs).await;
    let mut w = env.start_worker_with_env("w-0", vars);
    w.wait_ready().await;
    env.wait_for_offsets(msgs.len() as i64).await;
    assert_eq!(env.count("transactions").await, valid as i64);
    let errors = env.consume_error_topic(1);
    assert_eq!(errors.len(), 1);
    assert_eq!(header(&errors[0], "traceparent"), None);
    let log = w.log_text();
    let status = w.terminate_and_wait();
    assert!(status.success(), "worker exit: {status}");
    assert!(!log.contains("trace export on"), "{log}");
    assert!(log.contains("\"pipeline started\""), "{log}");
    let calls = scorer.traceparents.lock().unwrap().clone();
    assert!(!calls.is_empty(), "the scorer was called");
    assert!(
        calls.iter().all(Option::is_none),
        "no traceparent without export: {calls:?}"
    );
    // Give a (wrongly) running exporter its schedule delay several times over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rx.spans().is_empty() && rx.refused().is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_otlp_endpoint_or_with_otel_sdk_disabled_nothing_is_exported_or_propagated() {
    for (k, _) in std::env::vars() {
        assert!(
            !k.starts_with("OTEL_"),
            "{k} is set in the test's environment, which the worker inherits; unset it"
        );
    }
    let rx = otlp_receiver().await;
    // No OTEL_* variable at all (the receiver gets nothing, since nothing names it; what is
    // checked is that no context is propagated and the worker runs as before).
    run_untraced(&rx, "otel-unset", &[]).await;
    // An endpoint, but the SDK disabled.
    run_untraced(
        &rx,
        "otel-off",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint.as_str()),
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await;
}

#[test]
fn messages_cover_traced_untraced_and_unparsable_contexts() {
    // The fixture the tests rely on: five parsable contexts, one unparsable, one untraced.
    let (msgs, valid) = messages();
    assert_eq!(valid, 6);
    let parsable = msgs
        .iter()
        .filter_map(|m| m.traceparent.as_deref())
        .filter(|tp| streamops_worker::telemetry::parse_traceparent(tp, None).is_some())
        .count();
    assert_eq!(parsable, 5);
    assert_eq!(msgs.iter().filter(|m| m.traceparent.is_none()).count(), 1);
    let by_trace: HashMap<String, usize> = msgs
        .iter()
        .filter_map(|m| m.traceparent.as_deref())
        .filter(|tp| !tp.contains("not-a"))
        .fold(HashMap::new(), |mut acc, tp| {
            *acc.entry(ids_of(tp).0).or_default() += 1;
            acc
        });
    assert_eq!(by_trace.get(TRACE_A), Some(&4));
    assert_eq!(by_trace.get(TRACE_B), Some(&1));
}

// ---- pipeline-trigger: the webhook delivery.

/// `traceparent` and `Idempotency-Key` of one webhook request.
type HookCall = (Option<String>, Option<String>);

#[derive(Clone, Default)]
struct Hook {
    calls: Arc<Mutex<Vec<HookCall>>>,
}

async fn hook_call(
    axum::extract::State(hook): axum::extract::State<Hook>,
    headers: HeaderMap,
) -> StatusCode {
    let get = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    hook.calls
        .lock()
        .unwrap()
        .push((get("traceparent"), get("idempotency-key")));
    StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Two windows of three events: the first all traced (trace B, spans c0, c1, c2), the second
/// untraced. The first trigger's delivery continues the window's first traced message (child of
/// c0, links to c1 and c2) and its request carries that trace; the second is a root span as
/// before, whose context its request carries.
async fn a_webhook_delivery_continues_the_trace_of_its_windows_first_traced_message() {
    const REDIS: &str = "127.0.0.1:6379";
    if std::net::TcpStream::connect_timeout(&REDIS.parse().unwrap(), Duration::from_secs(3))
        .is_err()
    {
        panic!("Redis is not reachable at {REDIS}; start it (see DEVELOPERS.md, `make dev-up`)");
    }
    let rx = otlp_receiver().await;
    let hook = Hook::default();
    let app = Router::new()
        .route("/hook", post(hook_call))
        .with_state(hook.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("webhook") });

    let mut env = TestEnv::new("otel-pt", HandlerKind::PipelineTrigger, 1).await;
    env.config.handler =
        HandlerConfig::PipelineTrigger(streamops_crds::v1alpha1::PipelineTriggerSettings {
            pipeline_name: "traced-load".into(),
            max_events: 3,
            max_time_seconds: 3600,
            trigger_on_empty_window: false,
            consumer_id: None,
            webhook: Some(streamops_crds::v1alpha1::WebhookSpec {
                url: url.clone(),
                timeout_ms: 2000,
                max_retries: 3,
                headers: Default::default(),
                retry_backoff: streamops_crds::v1alpha1::default_webhook_backoff(),
                secret_headers: Vec::new(),
            }),
            job: None,
        });
    let msgs: Vec<Outgoing> = (0..6)
        .map(|i| Outgoing {
            payload: format!("{{\"n\":{i}}}").into_bytes(),
            key: format!("k{i}"),
            traceparent: (i < 3).then(|| traceparent(TRACE_B, 0xc0 + i)),
        })
        .collect();
    produce_all(&env.topic, &msgs).await;
    let mut w = env.start_worker_with_env(
        "w-0",
        &[
            ("STREAMOPS_REDIS_URL", "redis://127.0.0.1:6379/"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    w.wait_ready().await;
    env.wait_for_offsets(6).await;
    let start = Instant::now();
    let first = format!("{}:1", env.config.consumer_id);
    let second = format!("{}:2", env.config.consumer_id);
    let called = |key: &str| {
        hook.calls
            .lock()
            .unwrap()
            .iter()
            .any(|(_, k)| k.as_deref() == Some(key))
    };
    while !(called(&first) && called(&second)) {
        assert!(
            start.elapsed() < PATIENCE,
            "the webhook was never called; log {}",
            w.log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = w.log.clone();
    let status = w.terminate_and_wait();
    assert!(status.success(), "worker exit: {status}");
    wait_for_spans(&rx, &["streamops.webhook", "streamops.decode"], &log).await;
    let calls = hook.calls.lock().unwrap().clone();
    let spans = rx.spans();
    for (tp, key) in &calls {
        let tp = tp
            .as_deref()
            .expect("the webhook request carries a traceparent");
        let (trace, span) = ids_of(tp);
        let s = spans
            .iter()
            .map(|(_, s)| s)
            .find(|s| hex(&s.trace_id) == trace && hex(&s.span_id) == span)
            .unwrap_or_else(|| panic!("{tp} is no exported span; spans: {}", dump(&spans)));
        assert_eq!(s.name, "streamops.webhook");
        assert_eq!(attr(&s.attributes, "streamops.trigger.id"), key.clone());
        if key.as_deref() == Some(first.as_str()) {
            assert_eq!(
                trace,
                TRACE_B,
                "the first window's delivery continues its messages' trace; spans: {}",
                dump(&spans)
            );
            assert_eq!(
                hex(&s.parent_span_id),
                format!("{:016x}", 0xc0),
                "child of the window's first traced message"
            );
            let links: HashSet<(String, String)> = s
                .links
                .iter()
                .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                .collect();
            let expected: HashSet<(String, String)> = [0xc1u64, 0xc2]
                .iter()
                .map(|sp| (TRACE_B.to_string(), format!("{sp:016x}")))
                .collect();
            assert_eq!(
                links, expected,
                "linked to the window's other traced messages"
            );
        } else {
            assert_eq!(key.as_deref(), Some(second.as_str()));
            assert_ne!(trace, TRACE_B, "an untraced window continues no trace");
            assert!(
                s.parent_span_id.is_empty(),
                "an untraced window's delivery is a root span"
            );
            assert!(s.links.is_empty());
        }
        assert_eq!(
            attr(&s.attributes, "http.response.status_code").as_deref(),
            Some("200")
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_does_not_hold_up_a_sigterm_beyond_the_flush_bound() {
    // Accepts connections and never answers (a collector behind a dropped route looks alike).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            keep.lock().unwrap().push(socket);
        }
    });
    let scorer = recording_scorer().await;
    let mut env = TestEnv::new("otel-hung", HandlerKind::Fraud, 1).await;
    env.config.handler = HandlerConfig::Fraud(fraud_settings(&scorer.url));
    let (msgs, _) = messages();
    produce_all(&env.topic, &msgs).await;
    let mut w = env.start_worker_with_env(
        "w-0",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            // Without the worker's own bound, the flush would wait minutes for this collector.
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "120000"),
            ("OTEL_BSP_EXPORT_TIMEOUT", "120000"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    w.wait_ready().await;
    env.wait_for_offsets(msgs.len() as i64).await;
    let start = Instant::now();
    while held.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < PATIENCE,
            "the exporter never connected; log {}",
            w.log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = w.log.clone();
    let stopping = Instant::now();
    let status = w.terminate_and_wait();
    let took = stopping.elapsed();
    assert!(status.success(), "worker exit: {status}");
    // The bound is 5 s; 60 s leaves room for a loaded machine and is still far below the
    // exporter's 120 s.
    assert!(
        took < Duration::from_secs(60),
        "the worker took {took:?} to stop; log {}",
        log.display()
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // Cut short by the worker's bound or the SDK's own shutdown timeout (also 5 s), whichever
    // comes first: either way it says so.
    assert!(
        text.contains("flushing spans at shutdown timed out")
            || text.contains("flushing spans at shutdown failed"),
        "the log does not say the flush was cut short: {text}"
    );
    env.cleanup().await;
}
