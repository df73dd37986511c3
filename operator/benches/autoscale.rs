//! Autoscaling latency (`make bench-autoscale`): the time from a consumer group's lag crossing the
//! threshold to the operator patching the worker Deployment's replicas, with the default settings
//! (`pollIntervalSeconds` 5, `scaleUpStabilizationSeconds` 0, the operator's default poller).
//!
//! The real operator runs in-process: controller, lag poller, `KafkaLagReader` against the local
//! broker (Apache Kafka, DEVELOPERS.md). Kubernetes is a small stateful fake API server over HTTP
//! that serves the requests the operator makes (lists, watches, applies, patches, events) and
//! timestamps each replicas change. Each round fills the topic up to exactly `n × lagThreshold`
//! (no scale), waits a random part of the poll interval, produces one more record and measures
//! from its acknowledgement to the Deployment patch.
//!
//! Prints the figures; asserts nothing (speed targets are never test assertions). Target: ≤ 15 s.

use streamops_test_support::kafka;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{json, Value};
use streamops_crds::v1alpha1::AutoscalingSpec;
use streamops_crds::StreamConsumer;
use streamops_operator::consumer_group::KafkaGroupDeleter;
use streamops_operator::lag::KafkaLagReader;
use streamops_operator::lag_book::LagBook;
use streamops_operator::lag_poller::{LagPoller, PollSettings};
use streamops_operator::metrics::Metrics;
use streamops_operator::reconcile::run_controller;
use streamops_operator::{Context, OperatorConfig};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const NAMESPACE: &str = "bench";
const NAME: &str = "orders";
const PARTITIONS: i32 = 9;
const ROUNDS: i32 = 8;
const TARGET: Duration = Duration::from_secs(15);

// ---- a fake Kubernetes API server ------------------------------------------------------------

/// A replicas change the fake API server saw.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    replicas: i64,
}

#[derive(Default)]
struct World {
    /// Every object, by path.
    objects: HashMap<String, Value>,
    resource_version: u64,
    deployment_scaled: Vec<Seen>,
    spec_scaled: Vec<Seen>,
    lag_in_status: Option<i64>,
    requests: u64,
}

struct FakeApi {
    world: Mutex<World>,
    consumer_path: String,
    /// MODIFIED events of the StreamConsumer, for its watches.
    events: broadcast::Sender<Value>,
}

impl FakeApi {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// Whether `path` names a namespaced collection (`.../namespaces/NS/PLURAL`), not one object.
fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    segments
        .iter()
        .position(|s| *s == "namespaces")
        .is_some_and(|i| segments.len() == i + 3)
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap_or_default()))
        .unwrap_or_default()
}

fn not_found(path: &str) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("{path} not found"), "reason": "NotFound", "code": 404}),
    )
}

async fn serve(
    State(api): State<Arc<FakeApi>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let consumers = api
        .consumer_path
        .trim_end_matches(&format!("/{NAME}"))
        .to_string();
    let mut world = api.world();
    world.requests += 1;

    if method == Method::GET && query.contains("watch=true") {
        drop(world);
        if path == consumers {
            let rx = api.events.subscribe();
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(event) => {
                            let mut line = serde_json::to_vec(&event).unwrap_or_default();
                            line.push(b'\n');
                            return Some((Ok::<_, Infallible>(Bytes::from(line)), rx));
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            return Response::new(Body::from_stream(stream));
        }
        return Response::new(Body::from_stream(futures::stream::pending::<
            Result<Bytes, Infallible>,
        >()));
    }

    let rv = world.resource_version.to_string();
    match method {
        Method::GET => {
            if path == consumers {
                let items: Vec<Value> = world
                    .objects
                    .get(&api.consumer_path)
                    .cloned()
                    .into_iter()
                    .collect();
                return json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
                );
            }
            match world.objects.get(&path) {
                Some(o) => json_response(StatusCode::OK, o),
                // Collections (label-selected lists of children): nothing to clean up.
                None if is_collection(&path) => json_response(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": []}),
                ),
                None => not_found(&path),
            }
        }
        Method::POST => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or("unnamed")
                .to_string();
            world.objects.insert(format!("{path}/{name}"), body.clone());
            json_response(StatusCode::CREATED, &body)
        }
        Method::PATCH => {
            world.resource_version += 1;
            let rv = world.resource_version.to_string();
            let status_of_consumer = format!("{}/status", api.consumer_path);
            if path == status_of_consumer {
                let Some(sc) = world.objects.get_mut(&api.consumer_path) else {
                    return not_found(&path);
                };
                sc["status"] = body["status"].clone();
                sc["metadata"]["resourceVersion"] = json!(rv);
                let sc = sc.clone();
                world.lag_in_status = sc["status"]["lag"]["total"].as_i64();
                let _ = api.events.send(json!({"type": "MODIFIED", "object": sc}));
                return json_response(StatusCode::OK, &sc);
            }
            if path == api.consumer_path {
                let Some(sc) = world.objects.get_mut(&api.consumer_path) else {
                    return not_found(&path);
                };
                if content_type.contains("merge-patch") {
                    let before = sc["spec"].clone();
                    merge(sc, &body);
                    if sc["spec"] != before {
                        let generation = sc["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                        sc["metadata"]["generation"] = json!(generation);
                    }
                }
                sc["metadata"]["resourceVersion"] = json!(rv);
                let sc = sc.clone();
                if let Some(replicas) = body["spec"]["replicas"].as_i64() {
                    world.spec_scaled.push(Seen { at, replicas });
                }
                let _ = api.events.send(json!({"type": "MODIFIED", "object": sc}));
                return json_response(StatusCode::OK, &sc);
            }
            // Server-side apply of a child (or an event's merge patch): store and answer.
            let previous = world.objects.get(&path).cloned();
            let mut object = if content_type.contains("apply-patch") {
                body.clone()
            } else {
                let mut o = previous.clone().unwrap_or(Value::Null);
                merge(&mut o, &body);
                o
            };
            object["metadata"]["resourceVersion"] = json!(rv);
            if path.contains("/deployments/") {
                let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
                let old = previous
                    .as_ref()
                    .and_then(|p| p["spec"]["replicas"].as_i64());
                let generation = previous
                    .as_ref()
                    .and_then(|p| p["metadata"]["generation"].as_i64())
                    .unwrap_or(0)
                    + 1;
                object["metadata"]["generation"] = json!(generation);
                object["metadata"]["uid"] = json!("deployment-uid");
                // The workers are up at once: only the operator's latency is measured.
                object["status"] = json!({"observedGeneration": generation, "replicas": replicas,
                    "readyReplicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas});
                if old != Some(replicas) {
                    world.deployment_scaled.push(Seen { at, replicas });
                }
            }
            world.objects.insert(path, object.clone());
            json_response(StatusCode::OK, &object)
        }
        Method::DELETE => {
            world.objects.remove(&path);
            json_response(
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            )
        }
        _ => json_response(StatusCode::METHOD_NOT_ALLOWED, &json!({})),
    }
}

// ---- the benchmark --------------------------------------------------------------------------

fn consumer(topic: &str, group: &str) -> StreamConsumer {
    let mut sc = StreamConsumer::test();
    sc.metadata.name = Some(NAME.into());
    sc.metadata.namespace = Some(NAMESPACE.into());
    sc.metadata.resource_version = Some("1".into());
    sc.metadata.finalizers = Some(vec!["streamops.dev/cleanup".into()]);
    sc.spec.kafka.bootstrap_servers = kafka::BROKER.into();
    sc.spec.kafka.topics = vec![topic.into()];
    sc.spec.kafka.group_id = group.into();
    // Everything else at the CRD's defaults, as a user would write it.
    sc.spec.autoscaling = Some(
        serde_json::from_value::<AutoscalingSpec>(
            json!({"maxReplicas": PARTITIONS, "lagThreshold": 100}),
        )
        .expect("a valid autoscaling spec"),
    );
    sc
}

/// A pseudo-random delay in `[0, max)`, to spread the crossings over the poll interval.
fn random_below(max: Duration) -> Duration {
    let r = uuid::Uuid::new_v4().as_u128();
    let millis = u64::try_from(max.as_millis()).unwrap_or(1).max(1);
    Duration::from_millis(u64::try_from(r % u128::from(millis)).unwrap_or(0))
}

async fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    kafka::require_broker();

    let topic = kafka::unique("bench-autoscale");
    let group = kafka::unique("bench-autoscale-group");
    kafka::create_topic(&topic, PARTITIONS).await;
    let sc = consumer(&topic, &group);
    let autoscaling = sc.spec.autoscaling.clone().expect("set above");
    let settings = PollSettings::default();

    let consumer_path =
        format!("/apis/streamops.dev/v1alpha1/namespaces/{NAMESPACE}/streamconsumers/{NAME}");
    let (events, _) = broadcast::channel(1024);
    let api = Arc::new(FakeApi {
        world: Mutex::new(World {
            objects: HashMap::from([(
                consumer_path.clone(),
                serde_json::to_value(&sc).expect("json"),
            )]),
            resource_version: 1,
            ..World::default()
        }),
        consumer_path,
        events,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let address = listener.local_addr().expect("an address");
    let app = axum::Router::new().fallback(serve).with_state(api.clone());
    let stop = CancellationToken::new();
    let server_stop = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await;
    });

    let mut config = kube::Config::new(format!("http://{address}").parse().expect("a URL"));
    config.default_namespace = NAMESPACE.into();
    let client = kube::Client::try_from(config).expect("a client");
    let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
    let book = Arc::new(LagBook::new());
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        OperatorConfig::new("example.com/streamops-worker:bench"),
        Arc::new(KafkaGroupDeleter::default()),
        book.clone(),
    ));
    let poller = LagPoller::new(KafkaLagReader::default(), book, metrics, settings.clone());
    let controller = tokio::spawn(run_controller(
        client,
        Some(NAMESPACE.into()),
        ctx,
        stop.clone(),
        Some(poller),
    ));

    // Steady state: the workers exist and the status shows the (empty) group's lag.
    wait_for("the first reconciliation and lag reading", || {
        let w = api.world();
        (w.lag_in_status == Some(0) && !w.deployment_scaled.is_empty()).then_some(())
    })
    .await;

    println!("streamops autoscaling benchmark: lag over the threshold -> worker Deployment scaled");
    println!(
        "  settings: lagThreshold {}, pollIntervalSeconds {} (default), scaleUpStabilizationSeconds {} (default), \
         operator tick {:?}, {PARTITIONS} partitions",
        autoscaling.lag_threshold,
        autoscaling.poll_interval_seconds,
        autoscaling.scale_up_stabilization_seconds,
        settings.tick,
    );
    println!(
        "  lag read from the real group on {}; Kubernetes: in-process fake API over HTTP",
        kafka::BROKER
    );

    let producer = kafka::producer();
    let threshold = i64::try_from(autoscaling.lag_threshold).unwrap_or(i64::MAX);
    let poll = Duration::from_secs(autoscaling.poll_interval_seconds.into());
    let mut produced: i64 = 0;
    let mut latencies = Vec::new();
    for round in 1..=ROUNDS {
        let replicas = i64::from(round);
        // Fill up to exactly round × threshold: the current count is still right.
        let fill = replicas * threshold - produced;
        for i in 0..fill {
            kafka::produce(
                &producer,
                &topic,
                i32::try_from(i % i64::from(PARTITIONS)).unwrap_or(0),
                1,
            )
            .await;
        }
        produced += fill;
        tokio::time::sleep(random_below(poll)).await;
        let seen_before = api.world().deployment_scaled.len();
        let crossed = kafka::produce(&producer, &topic, 0, 1).await;
        produced += 1;
        let want = replicas + 1;
        let scaled = wait_for("the Deployment scale-up", || {
            let w = api.world();
            w.deployment_scaled[seen_before..]
                .iter()
                .find(|s| s.replicas == want)
                .copied()
        })
        .await;
        let spec = wait_for("the spec.replicas patch", || {
            let w = api.world();
            w.spec_scaled
                .iter()
                .rev()
                .find(|s| s.replicas == want)
                .copied()
        })
        .await;
        let early = api.world().deployment_scaled[seen_before..]
            .iter()
            .any(|s| s.at < crossed);
        let latency = scaled.at.saturating_duration_since(crossed);
        latencies.push(latency);
        println!(
            "  round {round}: lag {} -> {}, replicas {} -> {want}: Deployment patched after {:.2} s, spec.replicas after {:.2} s{}",
            produced - 1,
            produced,
            replicas,
            latency.as_secs_f64(),
            spec.at.saturating_duration_since(crossed).as_secs_f64(),
            if early { " (WARNING: a scale before the crossing)" } else { "" }
        );
    }

    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let (min, max) = (latencies[0], latencies[latencies.len() - 1]);
    println!(
        "autoscale latency over {ROUNDS} rounds: min {:.2} s, median {:.2} s, max {:.2} s (target <= {} s: {}; KEDA's default polling interval alone is 30 s)",
        min.as_secs_f64(),
        median.as_secs_f64(),
        max.as_secs_f64(),
        TARGET.as_secs(),
        if max <= TARGET { "met" } else { "NOT met" }
    );
    println!("  fake API requests served: {}", api.world().requests);

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    kafka::delete_topic(&topic).await;
}
