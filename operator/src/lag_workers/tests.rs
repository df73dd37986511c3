//! Worker-reported lag: unit tests of the merge, and readings against the mock API server (the
//! EndpointSlices) with real HTTP servers on loopback addresses standing in for worker pods.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use http::Method;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use streamops_crds::lag_report::PartitionPosition;
use streamops_crds::v1alpha1::{AutoscalingSpec, StreamConsumer};

use super::*;
use crate::brokers::BrokerPolicy;
use crate::fixtures::{finish, mock_client, path, Expect, Reply};
use crate::lag::KafkaLagReader;
use crate::lag_book::LagBook;
use crate::status;
use crate::ReplicaDecider;

const GROUP: &str = "moving-average-consumer";
const TOPIC: &str = "price-events";
const SECRET_IN_BODY: &str = "s3cr3t-from-a-hostile-worker";

fn pos(partition: i32, next: Option<i64>, high: Option<i64>) -> PartitionPosition {
    PartitionPosition {
        topic: TOPIC.into(),
        partition,
        next_offset: next,
        high_watermark: high,
    }
}

fn report(parts: Vec<PartitionPosition>) -> LagReport {
    LagReport {
        group_id: GROUP.into(),
        partitions: parts,
    }
}

#[test]
fn reports_merge_per_partition_with_the_furthest_position_and_count_unknowns_as_uncommitted() {
    let a = report(vec![
        pos(0, Some(10), Some(100)),
        pos(1, Some(50), Some(60)),
    ]);
    // A rebalance in flight: partition 1 is also reported by its new owner, further ahead.
    let b = report(vec![
        pos(1, Some(55), Some(61)),
        pos(2, None, Some(30)),
        pos(3, Some(5), None),
    ]);
    let lag = merge(&[a, b], AutoOffsetReset::Earliest);
    assert_eq!(lag.source, LagSource::Workers { reported: 2 });
    assert_eq!(lag.members, 2);
    assert_eq!(lag.partitions, 4);
    let per: Vec<_> = lag
        .per_partition
        .iter()
        .map(|p| (p.partition, p.lag))
        .collect();
    assert_eq!(per, [(0, 90), (1, 6), (2, 30), (3, 0)]);
    assert_eq!(lag.total, 126);
    // No stored offset, and no high watermark yet: never "no work".
    assert_eq!(lag.uncommitted, 2);
    let latest = merge(
        &[report(vec![pos(2, None, Some(30))])],
        AutoOffsetReset::Latest,
    );
    assert_eq!(latest.total, 0);
    assert_eq!(latest.uncommitted, 1);
}

#[test]
fn absurd_offsets_saturate_instead_of_overflowing() {
    let lag = merge(
        &[report(vec![
            pos(0, Some(0), Some(i64::MAX)),
            pos(1, Some(0), Some(i64::MAX)),
        ])],
        AutoOffsetReset::Earliest,
    );
    assert_eq!(lag.max_partition_lag, i64::MAX);
    assert!(lag.total > 0, "{}", lag.total);
}

// ---- readings through the mock API server ----------------------------------------------------

/// A stand-in worker: answers `/consumer/lag` with `body` (after `delay`) and counts requests.
struct FakeWorker {
    hits: Arc<AtomicUsize>,
}

async fn serve(
    ip: &str,
    port: u16,
    body: Arc<Vec<u8>>,
    delay: Duration,
) -> Option<(u16, FakeWorker)> {
    let listener = tokio::net::TcpListener::bind((ip, port)).await.ok()?;
    let port = listener.local_addr().ok()?.port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().route(
        "/consumer/lag",
        get(move || {
            let body = body.clone();
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                body.as_ref().clone()
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Some((port, FakeWorker { hits }))
}

/// Workers on 127.0.0.1, 127.0.0.2, ... sharing one port (pods share the container port).
async fn workers(bodies: Vec<(Vec<u8>, Duration)>) -> (u16, Vec<FakeWorker>) {
    'attempt: for _ in 0..20 {
        let mut port = 0;
        let mut out = Vec::new();
        for (i, (body, delay)) in bodies.iter().enumerate() {
            let ip = format!("127.0.0.{}", i + 1);
            match serve(&ip, port, Arc::new(body.clone()), *delay).await {
                Some((p, w)) => {
                    port = p;
                    out.push(w);
                }
                None => continue 'attempt,
            }
        }
        return (port, out);
    }
    panic!("no common free port on the loopback addresses");
}

fn good_body(parts: Vec<PartitionPosition>) -> Vec<u8> {
    serde_json::to_vec(&report(parts)).unwrap()
}

/// An EndpointSlice of the worker Service `test` with `ips` on `port`.
fn slice(name: &str, ips: &[&str], port: u16, by_controller: bool, ready: bool) -> Value {
    let mut labels = json!({"kubernetes.io/service-name": "test"});
    if by_controller {
        labels["endpointslice.kubernetes.io/managed-by"] = json!("endpointslice-controller.k8s.io");
    }
    let owners = if by_controller {
        json!([{"apiVersion": "v1", "kind": "Service", "name": "test", "uid": "svc-uid", "controller": true}])
    } else {
        json!([])
    };
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": labels, "ownerReferences": owners},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": ready}})).collect::<Vec<_>>()
    })
}

fn list_slices(items: Vec<Value>) -> Expect {
    Expect::new(
        Method::GET,
        path("discovery.k8s.io/v1", "endpointslices", ""),
    )
    .query("labelSelector", "kubernetes.io/service-name=test")
    .reply(Reply::Json(
        200,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {}, "items": items}),
    ))
}

/// A reader that may contact no broker at all, falling back to the workers.
fn reader(client: kube::Client) -> BrokersOrWorkers<KafkaLagReader> {
    BrokersOrWorkers::new(
        KafkaLagReader::allowed(Arc::new(BrokerPolicy::none())),
        Some(WorkerLagReader::new(client, Duration::from_millis(500)).unwrap()),
    )
}

async fn read_with(slices: Vec<Value>) -> Result<GroupLag, LagError> {
    let (client, server) = mock_client();
    let mock = server.run_steps(vec![list_slices(slices)]);
    let sc = StreamConsumer::test();
    let result = reader(client).read(&LagTarget::from_resource(&sc)).await;
    finish(mock).await;
    result
}

#[tokio::test]
async fn a_consumer_on_a_broker_not_allowed_gets_its_lag_from_its_ready_workers() {
    let (port, fakes) = workers(vec![
        (
            good_body(vec![pos(0, Some(100), Some(400))]),
            Duration::ZERO,
        ),
        (
            good_body(vec![pos(1, Some(7), Some(57)), pos(2, Some(0), Some(0))]),
            Duration::ZERO,
        ),
    ])
    .await;
    let lag = read_with(vec![slice(
        "test-abc",
        &["127.0.0.1", "127.0.0.2"],
        port,
        true,
        true,
    )])
    .await
    .unwrap();
    assert_eq!(lag.source, LagSource::Workers { reported: 2 });
    assert_eq!((lag.total, lag.partitions, lag.members), (350, 3, 2));
    assert!(fakes.iter().all(|f| f.hits.load(Ordering::SeqCst) == 1));
}

#[tokio::test]
async fn in_a_batch_each_consumer_on_a_broker_not_allowed_gets_its_lag_from_its_workers() {
    let (port, fakes) = workers(vec![(
        good_body(vec![pos(0, Some(100), Some(400))]),
        Duration::ZERO,
    )])
    .await;
    let (client, server) = mock_client();
    let ready = || slice("test-abc", &["127.0.0.1"], port, true, true);
    let mock = server.run_steps(vec![list_slices(vec![ready()]), list_slices(vec![ready()])]);
    let target = LagTarget::from_resource(&StreamConsumer::test());
    let results = reader(client).read_many(&[target.clone(), target]).await;
    finish(mock).await;
    assert_eq!(results.len(), 2);
    for r in results {
        let lag = r.unwrap();
        assert_eq!(lag.source, LagSource::Workers { reported: 1 });
        assert_eq!(lag.total, 300);
    }
    assert_eq!(fakes[0].hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_endpoint_slice_not_made_by_the_controller_for_the_service_is_never_contacted() {
    let (port, fakes) = workers(vec![
        (good_body(vec![pos(0, Some(0), Some(10))]), Duration::ZERO),
        (
            good_body(vec![pos(1, Some(0), Some(1_000_000))]),
            Duration::ZERO,
        ),
    ])
    .await;
    let lag = read_with(vec![
        slice("test-abc", &["127.0.0.1"], port, true, true),
        // Written by hand (no managed-by label, no owner): points at 127.0.0.2.
        slice("test-forged", &["127.0.0.2"], port, false, true),
    ])
    .await
    .unwrap();
    assert_eq!(lag.total, 10);
    assert_eq!(
        fakes[1].hits.load(Ordering::SeqCst),
        0,
        "the forged endpoint was asked"
    );
}

#[tokio::test]
async fn without_a_ready_worker_the_lag_is_unavailable_and_says_why() {
    let (port, fakes) = workers(vec![(good_body(vec![]), Duration::ZERO)]).await;
    let err = read_with(vec![slice("test-abc", &["127.0.0.1"], port, true, false)])
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "WorkerReportsUnavailable");
    let message = err.to_string();
    assert!(message.contains("does not connect"), "{message}");
    assert!(message.contains("no ready worker"), "{message}");
    assert_eq!(fakes[0].hits.load(Ordering::SeqCst), 0);
}

/// A worker's answer is untrusted: an oversized body, unknown fields, another group, a topic the
/// consumer does not read, negative offsets, non-JSON, or no answer in time each fail the reading
/// (a partial sum would understate the lag), and nothing of the body reaches the error.
#[tokio::test]
async fn a_hostile_or_silent_worker_fails_the_reading_without_its_body_in_the_message() {
    let huge = {
        let mut parts: Vec<_> = (0..3000).map(|p| pos(p, Some(0), Some(1))).collect();
        parts
            .iter_mut()
            .for_each(|p| p.topic = format!("{TOPIC}{SECRET_IN_BODY}"));
        serde_json::to_vec(&report(parts)).unwrap()
    };
    let hostile: Vec<(Vec<u8>, Duration)> = vec![
        (huge, Duration::ZERO),
        (
            serde_json::to_vec(
                &json!({"groupId": GROUP, "partitions": [], "note": SECRET_IN_BODY}),
            )
            .unwrap(),
            Duration::ZERO,
        ),
        (
            serde_json::to_vec(&json!({"groupId": SECRET_IN_BODY, "partitions": []})).unwrap(),
            Duration::ZERO,
        ),
        (
            serde_json::to_vec(&json!({"groupId": GROUP, "partitions": [
                {"topic": SECRET_IN_BODY, "partition": 0, "nextOffset": 0, "highWatermark": 9}]}))
            .unwrap(),
            Duration::ZERO,
        ),
        (good_body(vec![pos(0, Some(-1), Some(10))]), Duration::ZERO),
        (SECRET_IN_BODY.as_bytes().to_vec(), Duration::ZERO),
        (
            good_body(vec![pos(0, Some(0), Some(10))]),
            Duration::from_secs(3),
        ),
    ];
    for (body, delay) in hostile {
        let (port, _fakes) = workers(vec![
            (good_body(vec![pos(1, Some(0), Some(5))]), Duration::ZERO),
            (body, delay),
        ])
        .await;
        let err = read_with(vec![slice(
            "test-abc",
            &["127.0.0.1", "127.0.0.2"],
            port,
            true,
            true,
        )])
        .await
        .unwrap_err();
        assert_eq!(err.reason(), "WorkerReportsUnavailable", "{err}");
        let message = err.to_string();
        assert!(message.contains("127.0.0.2"), "{message}");
        assert!(!message.contains(SECRET_IN_BODY), "{message}");
    }
}

/// What the workers report acts on that StreamConsumer only, within its own bounds, and the
/// condition says where the lag came from.
#[tokio::test]
async fn worker_reported_lag_scales_only_within_the_consumers_bounds_and_the_condition_names_its_source(
) {
    let mut sc = StreamConsumer::test().with_replicas(1);
    sc.spec.autoscaling = Some(AutoscalingSpec {
        min_replicas: 1,
        max_replicas: 3,
        lag_threshold: 100,
        scale_up_stabilization_seconds: 0,
        scale_down_stabilization_seconds: 60,
        scale_to_zero: false,
        activation_lag: 1,
        allow_idle_consumers: true,
        poll_interval_seconds: 5,
    });
    let target = LagTarget::from_resource(&sc);
    let book = LagBook::new();
    // A worker claims an absurd lag.
    let lag = merge(
        &[report(vec![pos(0, Some(0), Some(i64::MAX))])],
        AutoOffsetReset::Earliest,
    );
    book.record(
        &sc,
        &target,
        Ok(&lag),
        Duration::from_secs(1),
        Timestamp::now(),
    )
    .unwrap();
    assert_eq!(book.desired_replicas(&sc), 3, "held at maxReplicas");
    let mut other = StreamConsumer::test().with_replicas(2);
    other.metadata.name = Some("other".into());
    assert_eq!(
        book.desired_replicas(&other),
        2,
        "another consumer is untouched"
    );

    let view = book.lag(&sc).unwrap();
    let s = status::observed(
        &sc,
        &k8s_openapi::api::apps::v1::Deployment::default(),
        3,
        "h",
        Some(&view),
        status::now(),
    );
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == status::LAG_AVAILABLE)
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", status::REASON_LAG_REPORTED_BY_WORKERS)
    );
    assert!(c.message.contains("1 ready worker"), "{}", c.message);
}
