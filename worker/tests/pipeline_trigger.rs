//! pipeline-trigger against real Redis, PostgreSQL and the broker: idempotent counting, exactly
//! one trigger per threshold crossing across replicas and restarts, time triggers, webhook and
//! Job delivery, and the consumer info endpoint.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use redis::AsyncCommands;
use serde_json::{json, Value};
use sqlx::PgPool;
use streamops_crds::v1alpha1::{JobTriggerSpec, PipelineTriggerSettings, WebhookSpec};
use streamops_crds::{Handler as HandlerConfig, HandlerKind, StreamConsumerSpec, WorkerConfig};
use streamops_worker::handlers::pipeline_trigger::{
    job_name, runs, Claimed, Counter, Event, JobSink, PipelineTriggerHandler, Reason, Sink,
    IDEMPOTENCY_KEY,
};
use streamops_worker::handlers::{Decoded, HandlerContext, MessageHandler, Position};
use support::*;
use tokio_util::sync::CancellationToken;

const REDIS: &str = "127.0.0.1:6379";
const REDIS_URL: &str = "redis://127.0.0.1:6379/";

fn require_redis() {
    if std::net::TcpStream::connect_timeout(&REDIS.parse().unwrap(), Duration::from_secs(3))
        .is_err()
    {
        panic!("Redis is not reachable at {REDIS}; start it (see DEVELOPERS.md, `make dev-up`)");
    }
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {REDIS}: {e}"))
}

/// Deletes every Redis key of `consumer_id`.
async fn forget(consumer_id: &str) {
    let mut r = redis().await;
    let keys: Vec<String> = r
        .keys(format!("consumer:{{{consumer_id}}}:*"))
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = r.del(keys).await.unwrap();
    }
}

async fn redis_state(consumer_id: &str) -> (u64, HashMap<String, String>) {
    let mut r = redis().await;
    let events: Option<u64> = r
        .get(format!("consumer:{{{consumer_id}}}:events"))
        .await
        .unwrap();
    let state: HashMap<String, String> = r
        .hgetall(format!("consumer:{{{consumer_id}}}:state"))
        .await
        .unwrap();
    (events.unwrap_or(0), state)
}

// ---- A webhook receiver that records every call.

#[derive(Debug, Clone)]
struct Call {
    key: Option<String>,
    team: Option<String>,
    body: Value,
}

#[derive(Clone, Default)]
struct Recorded {
    calls: Arc<Mutex<Vec<Call>>>,
    /// Statuses to answer, in order; 200 once empty.
    plan: Arc<Mutex<VecDeque<u16>>>,
}

struct Receiver {
    addr: SocketAddr,
    rec: Recorded,
    stop: CancellationToken,
}

async fn hook(
    State(rec): State<Recorded>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, &'static str) {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    rec.calls.lock().unwrap().push(Call {
        key: header(IDEMPOTENCY_KEY),
        team: header("x-team"),
        body,
    });
    let status = rec.plan.lock().unwrap().pop_front().unwrap_or(200);
    (StatusCode::from_u16(status).unwrap(), REMOTE_BODY)
}

/// What the webhook answers in every response body: data of the remote service that the worker
/// must never echo (pipeline_runs.last_error, /consumer/info, logs).
const REMOTE_BODY: &str = "remote-only: db=10.1.2.3 token=hunter2";

impl Receiver {
    async fn start() -> Self {
        let rec = Recorded::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(rec.clone());
        let token = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
        });
        Self { addr, rec, stop }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn answer(&self, statuses: &[u16]) {
        self.rec.plan.lock().unwrap().extend(statuses);
    }

    fn calls(&self) -> Vec<Call> {
        self.rec.calls.lock().unwrap().clone()
    }

    fn distinct_keys(&self) -> BTreeSet<String> {
        self.calls().into_iter().filter_map(|c| c.key).collect()
    }

    /// Waits until `n` distinct triggers arrived.
    async fn wait_for_triggers(&self, n: usize) {
        let start = Instant::now();
        while self.distinct_keys().len() < n {
            assert!(
                start.elapsed() < PATIENCE,
                "{} of {n} triggers arrived",
                self.distinct_keys().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn settings(
    url: &str,
    max_events: u64,
    max_time_seconds: u64,
    on_empty: bool,
) -> PipelineTriggerSettings {
    PipelineTriggerSettings {
        pipeline_name: "nightly-load".into(),
        max_events,
        max_time_seconds,
        trigger_on_empty_window: on_empty,
        consumer_id: None,
        webhook: Some(WebhookSpec {
            url: url.to_string(),
            timeout_ms: 2000,
            max_retries: 3,
            headers: BTreeMap::from([("X-Team".to_string(), "data".to_string())]),
            retry_backoff: streamops_crds::v1alpha1::default_webhook_backoff(),
            secret_headers: Vec::new(),
        }),
        job: None,
    }
}

// ---- The handler in process (each handler is one replica, with its own background loops).

struct Direct {
    consumer_id: String,
    pool: PgPool,
    shutdown: CancellationToken,
}

impl Direct {
    async fn new(prefix: &str) -> Self {
        require_services();
        require_redis();
        let (_, pool) = fresh_database(prefix).await;
        streamops_worker::db::MIGRATOR.run(&pool).await.unwrap();
        Self {
            consumer_id: unique(prefix),
            pool,
            shutdown: CancellationToken::new(),
        }
    }

    fn context(&self) -> HandlerContext {
        let spec = StreamConsumerSpec::example(HandlerKind::PipelineTrigger);
        let mut config = WorkerConfig::from_spec("x", None, &spec).unwrap();
        config.consumer_id = self.consumer_id.clone();
        HandlerContext {
            config: Arc::new(config),
            pool: self.pool.clone(),
            redis_url: Some(REDIS_URL.into()),
            registry: prometheus::Registry::new(),
            shutdown: self.shutdown.clone(),
            instance_id: None,
        }
    }

    fn handler(&self, s: &PipelineTriggerSettings) -> PipelineTriggerHandler {
        PipelineTriggerHandler::new(&self.context(), s).unwrap()
    }

    /// A replica whose background loops (the ticker and the delivery loop) end when the returned
    /// token is cancelled, as a worker's do when its pod stops.
    fn replica(&self, s: &PipelineTriggerSettings) -> (PipelineTriggerHandler, CancellationToken) {
        let stop = self.shutdown.child_token();
        let mut ctx = self.context();
        ctx.shutdown = stop.clone();
        (PipelineTriggerHandler::new(&ctx, s).unwrap(), stop)
    }

    /// Stops a replica the way a replay needs its workers stopped (the operator suspends the
    /// StreamConsumer first): once its `delivered` triggers are delivered and none is pending,
    /// its loops are cancelled. A delivery loop left running would record a trigger again after
    /// the replay deleted it.
    async fn stop_replica(
        &self,
        h: PipelineTriggerHandler,
        stop: CancellationToken,
        delivered: usize,
    ) {
        self.wait_for_runs(delivered, "delivered").await;
        let start = Instant::now();
        loop {
            let pending = h.engine().counter.pending().await.unwrap();
            if pending.is_empty() {
                break;
            }
            assert!(start.elapsed() < PATIENCE, "still pending: {pending:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        drop(h);
    }

    async fn runs(&self) -> Vec<(i64, String, i64, String, i32, Option<String>)> {
        sqlx::query_as(
            "SELECT seq, reason, event_count, status, attempts, last_error FROM pipeline_runs \
             WHERE consumer_id = $1 ORDER BY seq",
        )
        .bind(&self.consumer_id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn wait_for_runs(&self, n: usize, status: &str) {
        let start = Instant::now();
        loop {
            let runs = self.runs().await;
            if runs.iter().filter(|r| r.3 == status).count() >= n {
                return;
            }
            assert!(start.elapsed() < PATIENCE, "runs: {runs:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) {
        self.shutdown.cancel();
        forget(&self.consumer_id).await;
    }
}

fn events(partition: i32, offsets: std::ops::Range<i64>) -> Vec<Decoded<Event>> {
    let topic: Arc<str> = Arc::from("events");
    offsets
        .map(|offset| Decoded {
            pos: Position {
                topic: topic.clone(),
                partition,
                offset,
            },
            timestamp_ms: None,
            item: Event,
        })
        .collect()
}

/// Runs a batch through the handler as the pipeline does: prepare, write, commit.
async fn run_batch(h: &mut PipelineTriggerHandler, pool: &PgPool, items: Vec<Decoded<Event>>) {
    let p = h.prepare(items).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    h.write(&mut tx, &p.items).await.unwrap();
    tx.commit().await.unwrap();
    h.committed().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_overlapping_batches_are_counted_once() {
    let d = Direct::new("pt-replay").await;
    let hook = Receiver::start().await;
    let mut h = d.handler(&settings(&hook.url(), 1000, 3600, false));
    run_batch(&mut h, &d.pool, events(0, 0..100)).await;
    // The same batch again (a retry after a failed transaction), then one overlapping it.
    h.reset();
    run_batch(&mut h, &d.pool, events(0, 0..100)).await;
    run_batch(&mut h, &d.pool, events(0, 50..150)).await;
    // Another partition has offsets of its own.
    run_batch(&mut h, &d.pool, events(1, 0..30)).await;
    let (window, state) = redis_state(&d.consumer_id).await;
    assert_eq!(window, 180);
    assert_eq!(state["events_total"], "180");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replicas_claim_exactly_one_trigger_per_threshold_crossing() {
    let d = Direct::new("pt-race").await;
    let hook = Receiver::start().await;
    let s = settings(&hook.url(), 50, 3600, false);
    let per_partition = 700i64;
    let mut tasks = Vec::new();
    for partition in 0..3 {
        let mut h = d.handler(&s);
        let pool = d.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut offset = 0;
            while offset < per_partition {
                let end = (offset + 37).min(per_partition);
                // Every batch twice: replicas retrying interleave with each other.
                run_batch(&mut h, &pool, events(partition, offset..end)).await;
                run_batch(&mut h, &pool, events(partition, offset..end)).await;
                offset = end;
            }
            h
        }));
    }
    let mut handlers = Vec::new();
    for t in tasks {
        handlers.push(t.await.unwrap());
    }
    let expected = (3 * per_partition / 50) as usize;
    hook.wait_for_triggers(expected).await;
    d.wait_for_runs(expected, "delivered").await;
    let runs = d.runs().await;
    assert_eq!(runs.len(), expected);
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(
            (r.0, r.1.as_str(), r.2, r.3.as_str()),
            (i as i64 + 1, "count", 50, "delivered")
        );
    }
    let keys = hook.distinct_keys();
    let want: BTreeSet<String> = (1..=expected)
        .map(|i| format!("{}:{i}", d.consumer_id))
        .collect();
    assert_eq!(keys, want);
    assert_eq!(hook.calls().len(), expected, "one call per trigger");
    let (window, state) = redis_state(&d.consumer_id).await;
    assert_eq!(window, (3 * per_partition % 50) as u64);
    assert_eq!(state["events_total"], (3 * per_partition).to_string());
    assert_eq!(state["seq"], expected.to_string());
    drop(handlers);
    d.finish().await;
}

/// The first payload of each trigger, by sequence number.
fn payloads(hook: &Receiver) -> BTreeMap<u64, Value> {
    let mut out = BTreeMap::new();
    for c in hook.calls() {
        let seq = c.body["sequence"].as_u64().unwrap();
        out.entry(seq).or_insert(c.body);
    }
    out
}

/// `(first, last, events, seq)` of one partition's range in one trigger.
type Range = (i64, i64, u64, u64);

/// `(topic, partition) -> [(first, last, events, seq)]` in sequence order, after checking that
/// each payload's ranges add up to its event count.
fn ranges_by_partition(payloads: &BTreeMap<u64, Value>) -> BTreeMap<(String, i64), Vec<Range>> {
    let mut out: BTreeMap<(String, i64), Vec<Range>> = BTreeMap::new();
    for (seq, p) in payloads {
        let ranges = p["offsets"].as_array().expect("offsets is a list");
        let sum: u64 = ranges.iter().map(|r| r["events"].as_u64().unwrap()).sum();
        assert_eq!(
            sum,
            p["event_count"].as_u64().unwrap(),
            "trigger {seq}: {p}"
        );
        for r in ranges {
            out.entry((
                r["topic"].as_str().unwrap().to_string(),
                r["partition"].as_i64().unwrap(),
            ))
            .or_default()
            .push((
                r["first_offset"].as_i64().unwrap(),
                r["last_offset"].as_i64().unwrap(),
                r["events"].as_u64().unwrap(),
                *seq,
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_payloads_carry_offset_ranges_that_split_each_partition_into_exact_windows() {
    let d = Direct::new("pt-ranges").await;
    let hook = Receiver::start().await;
    let s = settings(&hook.url(), 50, 3600, false);
    let per_partition = 700i64;
    let mut tasks = Vec::new();
    for partition in 0..3 {
        let mut h = d.handler(&s);
        let pool = d.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut offset = 0;
            while offset < per_partition {
                // Batches of 37 straddle the windows of 50: boundaries fall inside batches.
                let end = (offset + 37).min(per_partition);
                run_batch(&mut h, &pool, events(partition, offset..end)).await;
                run_batch(&mut h, &pool, events(partition, offset..end)).await;
                offset = end;
            }
            h
        }));
    }
    let mut handlers = Vec::new();
    for t in tasks {
        handlers.push(t.await.unwrap());
    }
    let expected = (3 * per_partition / 50) as usize;
    hook.wait_for_triggers(expected).await;
    let payloads = payloads(&hook);
    assert_eq!(payloads.len(), expected);
    let by_partition = ranges_by_partition(&payloads);
    assert_eq!(by_partition.len(), 3, "{by_partition:?}");
    for ((topic, partition), ranges) in &by_partition {
        assert_eq!(topic, "events");
        // In sequence order the ranges tile the partition: no offset in two windows, none in none.
        let mut next = 0;
        for &(first, last, n, seq) in ranges {
            assert_eq!(
                first, next,
                "partition {partition}, trigger {seq}: {ranges:?}"
            );
            assert!(last >= first);
            assert_eq!((last - first + 1) as u64, n, "every offset is an event");
            next = last + 1;
        }
        assert_eq!(next, per_partition, "partition {partition}: {ranges:?}");
    }
    // The recorded runs keep the ranges (a trigger delivered after a restart sends the same).
    d.wait_for_runs(expected, "delivered").await;
    let stored: Vec<(i64, Value)> = sqlx::query_as::<_, (i64, sqlx::types::Json<Value>)>(
        "SELECT seq, offsets FROM pipeline_runs WHERE consumer_id = $1 ORDER BY seq",
    )
    .bind(&d.consumer_id)
    .fetch_all(&d.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(s, j)| (s, j.0))
    .collect();
    for (seq, offsets) in stored {
        let mut sent: Vec<Value> = payloads[&(seq as u64)]["offsets"]
            .as_array()
            .unwrap()
            .clone();
        let mut kept = offsets.as_array().unwrap().clone();
        let key = |v: &Value| (v["topic"].to_string(), v["partition"].as_i64());
        sent.sort_by_key(key);
        kept.sort_by_key(key);
        assert_eq!(sent, kept, "trigger {seq}");
    }
    drop(handlers);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_trigger_carries_its_windows_ranges_and_uncounted_offsets_stay_outside_the_count() {
    let d = Direct::new("pt-time-ranges").await;
    let hook = Receiver::start().await;
    let mut h = d.handler(&settings(&hook.url(), 1000, 1, false));
    // Offsets 10..15 of partition 0 were not events (rejected before counting).
    let mut batch = events(0, 0..10);
    batch.extend(events(0, 15..20));
    batch.extend(events(1, 3..4));
    run_batch(&mut h, &d.pool, batch).await;
    hook.wait_for_triggers(1).await;
    let p = &payloads(&hook)[&1];
    assert_eq!(p["reason"], "time");
    assert_eq!(p["event_count"], 16);
    assert!(p["window_start"].as_str().unwrap() < p["window_end"].as_str().unwrap());
    assert_eq!(
        p["offsets"],
        json!([
            {"topic": "events", "partition": 0, "first_offset": 0, "last_offset": 19, "events": 15},
            {"topic": "events", "partition": 1, "first_offset": 3, "last_offset": 3, "events": 1},
        ])
    );
    // The next window starts after the last counted offset.
    run_batch(&mut h, &d.pool, events(0, 18..25)).await;
    hook.wait_for_triggers(2).await;
    let p = &payloads(&hook)[&2];
    assert_eq!(
        p["offsets"],
        json!([{"topic": "events", "partition": 0, "first_offset": 20, "last_offset": 24, "events": 5}])
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_errors_are_retried_with_the_same_idempotency_key_and_every_attempt_is_recorded() {
    let d = Direct::new("pt-retry").await;
    let hook = Receiver::start().await;
    hook.answer(&[503, 500]);
    let mut h = d.handler(&settings(&hook.url(), 10, 3600, false));
    run_batch(&mut h, &d.pool, events(0, 0..10)).await;
    d.wait_for_runs(1, "delivered").await;
    let calls = hook.calls();
    assert_eq!(calls.len(), 3);
    let key = format!("{}:1", d.consumer_id);
    for c in &calls {
        assert_eq!(c.key.as_deref(), Some(key.as_str()));
        assert_eq!(c.team.as_deref(), Some("data"), "spec headers are sent");
        assert_eq!(c.body, calls[0].body, "the same payload every time");
    }
    let b = &calls[0].body;
    assert_eq!(b["trigger_id"], key);
    assert_eq!(b["consumer_id"], d.consumer_id);
    assert_eq!(b["pipeline_name"], "nightly-load");
    assert_eq!(b["sequence"], 1);
    assert_eq!(b["reason"], "count");
    assert_eq!(b["event_count"], 10);
    assert!(b["window_start"].as_str().unwrap() <= b["window_end"].as_str().unwrap());
    let runs = d.runs().await;
    assert_eq!(runs[0].4, 3, "attempts");
    let delivered_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT delivered_at FROM pipeline_runs WHERE trigger_id = $1")
            .bind(&key)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert!(delivered_at.is_some());
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_error_from_the_webhook_marks_the_trigger_failed_without_retrying() {
    let d = Direct::new("pt-4xx").await;
    let hook = Receiver::start().await;
    hook.answer(&[400]);
    let mut h = d.handler(&settings(&hook.url(), 5, 3600, false));
    run_batch(&mut h, &d.pool, events(0, 0..5)).await;
    d.wait_for_runs(1, "failed").await;
    let runs = d.runs().await;
    assert_eq!(runs[0].4, 1);
    assert!(
        runs[0]
            .5
            .as_deref()
            .unwrap_or_default()
            .contains("HTTP 400"),
        "{runs:?}"
    );
    assert!(
        !runs[0]
            .5
            .as_deref()
            .unwrap_or_default()
            .contains("remote-only"),
        "the webhook's response body is not kept: {runs:?}"
    );
    assert_eq!(hook.calls().len(), 1);
    let mut r = redis().await;
    let pending: u64 = r
        .hlen(format!("consumer:{{{}}}:pending", d.consumer_id))
        .await
        .unwrap();
    assert_eq!(pending, 0, "a failed trigger leaves the pending set");
    d.finish().await;
}

// ---- Delivery leases: a worker whose lease expired mid-delivery (a long pause, a slow network)
// and another worker took the trigger over.

/// The sequence numbers in Redis's pending set.
async fn pending_seqs(counter: &Counter) -> Vec<u64> {
    counter
        .pending()
        .await
        .unwrap()
        .iter()
        .map(|t| t.seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_or_nobody_can_finish_a_pending_trigger() {
    require_redis();
    let id = unique("pt-lease");
    let counter = Counter::new(REDIS_URL, &id).unwrap();
    assert!(counter.restore_pending(&claimed(1)).await.unwrap());
    assert!(counter.restore_pending(&claimed(2)).await.unwrap());
    let short = Duration::from_millis(200);
    let long = Duration::from_secs(60);

    // Trigger 1: the first worker's lease expires and a second worker takes it over.
    assert!(counter.acquire_lease(1, "first", short).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(counter.acquire_lease(1, "second", long).await.unwrap());
    assert!(
        !counter.finish(1, "first").await.unwrap(),
        "the first worker cannot finish what the second holds"
    );
    let pending = pending_seqs(&counter).await;
    assert_eq!(
        pending,
        vec![1, 2],
        "trigger 1 stays pending for its holder"
    );
    assert!(counter.renew_lease(1, "second", long).await.unwrap());
    assert!(counter.finish(1, "second").await.unwrap());

    // Trigger 2: the lease expired and nobody took it over; its outcome is settled all the same.
    assert!(counter.acquire_lease(2, "first", short).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(counter.finish(2, "first").await.unwrap());
    assert!(counter.pending().await.unwrap().is_empty());
    let mut r = redis().await;
    let leases: Vec<String> = r.keys(format!("consumer:{{{id}}}:lease:*")).await.unwrap();
    assert!(leases.is_empty(), "no lease is left behind: {leases:?}");
    forget(&id).await;
}

/// A webhook that, while the worker waits for its answer, hands the trigger's lease to another
/// worker (as if the worker's lease had expired meanwhile) and then answers 400; from then on it
/// answers 200.
#[derive(Clone)]
struct Stealing {
    lease: String,
    calls: Arc<Mutex<Vec<Option<String>>>>,
}

async fn stealing_hook(State(s): State<Stealing>, headers: HeaderMap) -> StatusCode {
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let first = {
        let mut calls = s.calls.lock().unwrap();
        calls.push(key);
        calls.len() == 1
    };
    if first {
        let mut r = redis().await;
        let _: () = r.set(&s.lease, "another-worker").await.unwrap();
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_mid_delivery_leaves_the_outcome_to_the_new_holder() {
    let d = Direct::new("pt-zombie").await;
    let lease = format!("consumer:{{{}}}:lease:1", d.consumer_id);
    let hook = Stealing {
        lease: lease.clone(),
        calls: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/hook", post(stealing_hook))
        .with_state(hook.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut h = d.handler(&settings(&format!("http://{addr}/hook"), 5, 3600, false));
    run_batch(&mut h, &d.pool, events(0, 0..5)).await;

    // The 400 came after the lease was lost: the error is recorded, but the trigger is neither
    // failed nor taken out of the pending set.
    let start = Instant::now();
    let runs = loop {
        let runs = d.runs().await;
        if runs.first().is_some_and(|r| r.5.is_some()) {
            break runs;
        }
        assert!(start.elapsed() < PATIENCE, "runs: {runs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(runs[0].3, "pending", "{runs:?}");
    assert!(
        runs[0].5.as_deref().unwrap().contains("HTTP 400"),
        "{runs:?}"
    );
    // Give a wrong finish time to happen before looking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pending = pending_seqs(&h.engine().counter).await;
    assert_eq!(pending, vec![1]);
    assert_eq!(d.runs().await[0].3, "pending");

    // The other worker goes away without finishing it: its lease ends, and the trigger is
    // delivered, under its one idempotency key.
    let mut r = redis().await;
    let _: () = r.del(&lease).await.unwrap();
    d.wait_for_runs(1, "delivered").await;
    let key = format!("{}:1", d.consumer_id);
    assert_eq!(
        *hook.calls.lock().unwrap(),
        vec![Some(key.clone()), Some(key)]
    );
    server.abort();
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_trigger_whose_delivery_is_already_recorded_is_finished_without_sending_it_again()
{
    let d = Direct::new("pt-settled").await;
    // A worker delivered trigger 1 and recorded it, then died before taking it out of Redis's
    // pending set.
    let mut conn = d.pool.acquire().await.unwrap();
    runs::record_claimed(&mut conn, &d.consumer_id, "webhook", &[claimed(1)])
        .await
        .unwrap();
    drop(conn);
    let id = format!("{}:1", d.consumer_id);
    runs::delivered(&d.pool, &id, None).await.unwrap();
    let counter = Counter::new(REDIS_URL, &d.consumer_id).unwrap();
    assert!(counter.restore_pending(&claimed(1)).await.unwrap());

    let hook = Receiver::start().await;
    let h = d.handler(&settings(&hook.url(), 5, 3600, false));
    let start = Instant::now();
    while !h.engine().counter.pending().await.unwrap().is_empty() {
        assert!(start.elapsed() < PATIENCE, "trigger 1 is still pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hook.calls().is_empty(), "sent again: {:?}", hook.calls());
    let runs = d.runs().await;
    assert_eq!(
        (runs.len(), runs[0].3.as_str(), runs[0].4),
        (1, "delivered", 0)
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_ids_are_never_reused_and_pending_triggers_survive_when_redis_loses_its_data() {
    let d = Direct::new("pt-lost").await;
    let hook = Receiver::start().await;
    let s = settings(&hook.url(), 1, 3600, false);
    let mut h = d.handler(&s);
    run_batch(&mut h, &d.pool, events(0, 0..3)).await;
    d.wait_for_runs(3, "delivered").await;
    // Redis is wiped, and a trigger claimed before was still waiting for delivery.
    forget(&d.consumer_id).await;
    sqlx::query(
        "INSERT INTO pipeline_runs (trigger_id, consumer_id, pipeline_name, seq, reason, \
             event_count, window_start, window_end, target) \
         VALUES ($1, $2, 'nightly-load', 4, 'count', 1, now(), now(), 'webhook')",
    )
    .bind(format!("{}:4", d.consumer_id))
    .bind(&d.consumer_id)
    .execute(&d.pool)
    .await
    .unwrap();
    // A new worker process: its first batch finds Redis empty.
    let mut h2 = d.handler(&s);
    run_batch(&mut h2, &d.pool, events(0, 3..4)).await;
    hook.wait_for_triggers(5).await;
    d.wait_for_runs(5, "delivered").await;
    let seqs: Vec<i64> = d.runs().await.iter().map(|r| r.0).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(hook.calls().len(), 5);
    drop((h, h2));
    d.finish().await;
}

fn job_template() -> Value {
    json!({
        "backoffLimit": 1,
        "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "load", "image": "busybox", "command": ["sh", "-c", "echo $STREAMOPS_TRIGGER_ID"]}]
        }}
    })
}

fn claimed(seq: u64) -> Claimed {
    Claimed {
        seq,
        reason: Reason::Count,
        event_count: 100,
        window_start_ms: 1_710_930_600_000,
        window_end_ms: 1_710_930_660_000,
        pipeline: "nightly-load".into(),
        offsets: Vec::new(),
        traces: Vec::new(),
    }
}

type Mock =
    tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;

fn mock_client() -> (kube::Client, Mock) {
    let (svc, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    (kube::Client::new(svc, "default"), handle)
}

/// Answers the next request, which must create a Job in `ns`; returns the Job sent.
async fn answer_job_create(handle: &mut Mock, ns: &str, status: u16, reason: &str) -> Value {
    let (req, send) = handle.next_request().await.expect("a request");
    assert_eq!(req.method(), http::Method::POST);
    assert_eq!(
        req.uri().path(),
        format!("/apis/batch/v1/namespaces/{ns}/jobs")
    );
    let body: Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    let answer = if status == 201 {
        body.clone()
    } else {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("answered {status}"), "reason": reason, "code": status})
    };
    send.send_response(
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(kube::client::Body::from(
                serde_json::to_vec(&answer).unwrap(),
            ))
            .unwrap(),
    );
    body
}

#[tokio::test]
async fn job_target_creates_the_named_job_and_takes_already_exists_as_success() {
    let (client, mut handle) = mock_client();
    let sink = JobSink::new(
        &JobTriggerSpec {
            template: job_template(),
        },
        Some("team-a".into()),
    )
    .unwrap()
    .with_client(client);
    let api = tokio::spawn(async move {
        let job = answer_job_create(&mut handle, "team-a", 201, "").await;
        answer_job_create(&mut handle, "team-a", 409, "AlreadyExists").await;
        answer_job_create(&mut handle, "team-a", 403, "Forbidden").await;
        answer_job_create(&mut handle, "team-a", 503, "ServiceUnavailable").await;
        job
    });
    let name = job_name("team-a/clicks", "nightly-load", 7);
    let first = sink.send("team-a/clicks", &claimed(7)).await.unwrap();
    assert_eq!(first.job_name.as_deref(), Some(name.as_str()));
    let again = sink.send("team-a/clicks", &claimed(7)).await.unwrap();
    assert_eq!(
        again.job_name.as_deref(),
        Some(name.as_str()),
        "AlreadyExists is a success"
    );
    let forbidden = sink.send("team-a/clicks", &claimed(8)).await.unwrap_err();
    assert!(!forbidden.is_retryable(), "{forbidden}");
    let unavailable = sink.send("team-a/clicks", &claimed(9)).await.unwrap_err();
    assert!(unavailable.is_retryable(), "{unavailable}");

    let job = api.await.unwrap();
    assert_eq!(job["metadata"]["name"], name);
    assert_eq!(job["metadata"]["namespace"], "team-a");
    assert_eq!(
        job["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "streamops"
    );
    assert_eq!(
        job["metadata"]["annotations"]["streamops.dev/trigger-id"],
        "team-a/clicks:7"
    );
    assert_eq!(job["spec"]["backoffLimit"], 1);
    let env = &job["spec"]["template"]["spec"]["containers"][0]["env"];
    let var = |n: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .map(|e| e["value"].clone())
    };
    assert_eq!(var("STREAMOPS_TRIGGER_ID"), Some(json!("team-a/clicks:7")));
    assert_eq!(var("STREAMOPS_EVENT_COUNT"), Some(json!("100")));
    assert_eq!(var("STREAMOPS_PIPELINE_NAME"), Some(json!("nightly-load")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_trigger_is_recorded_with_its_job_name() {
    let d = Direct::new("pt-job").await;
    let (client, mut handle) = mock_client();
    let s = PipelineTriggerSettings {
        webhook: None,
        job: Some(JobTriggerSpec {
            template: job_template(),
        }),
        ..settings("http://unused", 20, 3600, false)
    };
    let sink = JobSink::new(s.job.as_ref().unwrap(), Some("team-a".into()))
        .unwrap()
        .with_client(client);
    let mut h =
        PipelineTriggerHandler::with_sink(&d.context(), &s, Sink::Job(Box::new(sink))).unwrap();
    let api = tokio::spawn(async move { answer_job_create(&mut handle, "team-a", 201, "").await });
    run_batch(&mut h, &d.pool, events(0, 0..20)).await;
    let job = api.await.unwrap();
    d.wait_for_runs(1, "delivered").await;
    let (target, name): (String, Option<String>) =
        sqlx::query_as("SELECT target, job_name FROM pipeline_runs WHERE consumer_id = $1")
            .bind(&d.consumer_id)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(target, "job");
    assert_eq!(name.as_deref(), job["metadata"]["name"].as_str());
    assert_eq!(name, Some(job_name(&d.consumer_id, "nightly-load", 1)));
    d.finish().await;
}

// ---- Worker processes.

fn pt_env(env: &mut TestEnv, s: PipelineTriggerSettings) {
    env.config.handler = HandlerConfig::PipelineTrigger(s);
}

fn start(env: &TestEnv, id: &str) -> WorkerProcess {
    env.start_worker_with_env(id, &[("STREAMOPS_REDIS_URL", REDIS_URL)])
}

/// A static member (`--instance-id id`), as the operator runs a pod.
fn start_static(env: &TestEnv, id: &str) -> WorkerProcess {
    env.start_static_worker_with_env(id, &[("STREAMOPS_REDIS_URL", REDIS_URL)])
}

async fn stored_runs(env: &TestEnv) -> Vec<(i64, String, i64, String)> {
    sqlx::query_as("SELECT seq, reason, event_count, status FROM pipeline_runs ORDER BY seq")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn wait_for_delivered(env: &TestEnv, n: usize) {
    let start = Instant::now();
    loop {
        let runs = stored_runs(env).await;
        if runs.iter().filter(|r| r.3 == "delivered").count() >= n {
            return;
        }
        assert!(start.elapsed() < PATIENCE, "runs: {runs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /consumer/info/{id}` of a worker.
async fn info(w: &WorkerProcess, id: &str) -> Value {
    let resp = reqwest::get(format!("http://{}/consumer/info/{id}", w.http))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_yield_exactly_one_trigger_per_threshold_crossing_through_a_kill_and_restart()
{
    require_redis();
    let hook = Receiver::start().await;
    let mut env = TestEnv::new("pt-three", HandlerKind::PipelineTrigger, 3).await;
    pt_env(&mut env, settings(&hook.url(), 100, 3600, false));
    env.config.batch.max_messages = 40;
    env.config.batch.max_wait_ms = 20;
    let total = 2550u64;
    let spec = ProduceSpec::new(HandlerKind::PipelineTrigger, total)
        .seed(3)
        .rate(600);
    // Static members, as the operator runs three pods: the restart of w-1 is a container restart
    // in its pod.
    let mut w0 = start_static(&env, "w-0");
    let mut w1 = start_static(&env, "w-1");
    let mut w2 = start_static(&env, "w-2");
    for w in [&mut w0, &mut w1, &mut w2] {
        w.wait_ready().await;
    }
    // Produce once the group is up, so that the kill below lands mid-stream.
    let producer = {
        let topic = env.topic.clone();
        tokio::spawn(async move { produce_events(&topic, &spec).await })
    };
    env.wait_for_offsets(900).await;
    w1.kill();
    assert!(
        env.applied_offsets().await < total as i64,
        "the kill was not mid-stream"
    );
    let mut w1 = start_static(&env, "w-1");
    w1.wait_ready().await;
    producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;

    let expected = (total / 100) as usize;
    hook.wait_for_triggers(expected).await;
    wait_for_delivered(&env, expected).await;
    let runs = stored_runs(&env).await;
    assert_eq!(runs.len(), expected, "one pipeline_runs row per trigger");
    for (i, r) in runs.iter().enumerate() {
        assert_eq!((r.0, r.1.as_str(), r.2), (i as i64 + 1, "count", 100));
    }
    let consumer = env.config.consumer_id.clone();
    let want: BTreeSet<String> = (1..=expected).map(|i| format!("{consumer}:{i}")).collect();
    assert_eq!(
        hook.distinct_keys(),
        want,
        "exactly the claimed triggers reached the webhook"
    );
    // A delivery cut short by the kill is repeated with the same key and payload, never a new one.
    let mut bodies: HashMap<String, Value> = HashMap::new();
    for c in hook.calls() {
        let prev = bodies.insert(c.key.clone().unwrap(), c.body.clone());
        assert!(prev.is_none_or(|p| p == c.body));
    }
    let (window, state) = redis_state(&consumer).await;
    assert_eq!(
        state["events_total"],
        total.to_string(),
        "every event counted once"
    );
    assert_eq!(window, total % 100);
    for w in [w0, w1, w2] {
        assert!(w.terminate_and_wait().success());
    }
    forget(&consumer).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_triggers_fire_without_any_event_when_empty_windows_trigger() {
    require_redis();
    let hook = Receiver::start().await;
    let mut env = TestEnv::new("pt-time", HandlerKind::PipelineTrigger, 1).await;
    pt_env(&mut env, settings(&hook.url(), 1000, 2, true));
    let mut w = start(&env, "w-0");
    w.wait_ready().await;
    hook.wait_for_triggers(2).await;
    let calls = hook.calls();
    let first = &calls[0].body;
    let second = &calls[1].body;
    for (i, b) in [first, second].iter().enumerate() {
        assert_eq!(b["reason"], "time");
        assert_eq!(b["event_count"], 0);
        assert_eq!(b["sequence"], i as u64 + 1);
    }
    assert_eq!(
        first["window_end"], second["window_start"],
        "windows are contiguous"
    );
    wait_for_delivered(&env, 2).await;
    assert!(w.terminate_and_wait().success());
    forget(&env.config.consumer_id).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_empty_window_triggers_on_its_next_event_when_empty_windows_do_not() {
    require_redis();
    let hook = Receiver::start().await;
    let mut env = TestEnv::new("pt-empty", HandlerKind::PipelineTrigger, 1).await;
    pt_env(&mut env, settings(&hook.url(), 1000, 2, false));
    let mut w = start(&env, "w-0");
    w.wait_ready().await;
    let id = env.config.consumer_id.clone();
    // Wait until the window has been due for a while (several ticks).
    let start_wait = Instant::now();
    loop {
        let i = info(&w, &id).await;
        if let Some(at) = i["counters"]["time_threshold_at"].as_str() {
            let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
            if chrono::Utc::now() > at + chrono::Duration::milliseconds(2500) {
                assert_eq!(
                    i["counters"]["triggers"], 0,
                    "an empty window triggered: {i}"
                );
                break;
            }
        }
        assert!(start_wait.elapsed() < PATIENCE, "{i}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(hook.calls().is_empty());
    env.produce(&ProduceSpec::new(HandlerKind::PipelineTrigger, 1))
        .await;
    hook.wait_for_triggers(1).await;
    let b = &hook.calls()[0].body;
    assert_eq!(
        (b["reason"].clone(), b["event_count"].clone()),
        (json!("time"), json!(1))
    );
    assert!(w.terminate_and_wait().success());
    forget(&id).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_survive_a_restart_and_consumer_info_reports_counters_thresholds_and_last_trigger() {
    require_redis();
    let hook = Receiver::start().await;
    let mut env = TestEnv::new("pt-restart", HandlerKind::PipelineTrigger, 2).await;
    pt_env(&mut env, settings(&hook.url(), 1000, 3600, false));
    let id = env.config.consumer_id.clone();
    env.produce(&ProduceSpec::new(HandlerKind::PipelineTrigger, 600).seed(1))
        .await;
    let mut w = start(&env, "w-0");
    w.wait_ready().await;
    env.wait_for_offsets(600).await;
    assert!(w.terminate_and_wait().success());
    assert_eq!(
        redis_state(&id).await.0,
        600,
        "the count is in Redis while no worker runs"
    );

    let mut w = start(&env, "w-0");
    w.wait_ready().await;
    let i = info(&w, &id).await;
    assert_eq!(i["counters"]["events_in_window"], 600);
    assert_eq!(i["last_trigger"], Value::Null);
    env.produce(&ProduceSpec::new(HandlerKind::PipelineTrigger, 500).seed(2))
        .await;
    env.wait_for_offsets(1100).await;
    hook.wait_for_triggers(1).await;
    wait_for_delivered(&env, 1).await;

    let i = info(&w, &id).await;
    assert_eq!(i["consumer_id"], id);
    assert_eq!(i["pipeline_name"], "nightly-load");
    assert_eq!(i["target"], "webhook");
    assert_eq!(
        i["thresholds"],
        json!({"max_events": 1000, "max_time_seconds": 3600, "trigger_on_empty_window": false})
    );
    assert_eq!(i["counters"]["events_in_window"], 100);
    assert_eq!(i["counters"]["events_total"], 1100);
    assert_eq!(i["counters"]["triggers"], 1);
    assert_eq!(i["counters"]["pending_triggers"], 0);
    let last = &i["last_trigger"];
    assert_eq!(last["trigger_id"], format!("{id}:1"));
    assert_eq!(last["reason"], "count");
    assert_eq!(last["event_count"], 1000);
    assert_eq!(last["status"], "delivered");
    assert_eq!(last["attempts"], 1);
    assert!(last["delivered_at"].is_string());
    let unknown = reqwest::get(format!("http://{}/consumer/info/someone-else", w.http))
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(unknown, 404);
    assert!(w.metric("streamops_pipeline_trigger_claimed_total") >= 1.0);
    assert!(w.terminate_and_wait().success());
    forget(&id).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_go_to_the_error_topic_and_are_not_counted() {
    require_redis();
    let hook = Receiver::start().await;
    let mut env = TestEnv::new("pt-poison", HandlerKind::PipelineTrigger, 2).await;
    pt_env(&mut env, settings(&hook.url(), 100, 3600, false));
    let id = env.config.consumer_id.clone();
    let events = env
        .produce(
            &ProduceSpec::new(HandlerKind::PipelineTrigger, 1500)
                .seed(8)
                .poison(10.0),
        )
        .await;
    let poison = events.iter().filter(|g| g.poison.is_some()).count();
    let valid = events.len() - poison;
    assert!(poison > 50);
    let mut w = start(&env, "w-0");
    w.wait_ready().await;
    env.wait_for_offsets(events.len() as i64).await;
    assert_eq!(env.count("streamops_rejections").await, poison as i64);
    let records = env.consume_error_topic(poison);
    assert_eq!(records.len(), poison);
    let mut want: HashMap<String, usize> = HashMap::new();
    for g in events.iter().filter(|g| g.poison.is_some()) {
        *want
            .entry(g.poison.unwrap().expected_reason().into())
            .or_default() += 1;
    }
    let mut got: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *got.entry(header(r, "streamops.error.reason").unwrap())
            .or_default() += 1;
    }
    assert_eq!(want, got);
    let (_, state) = redis_state(&id).await;
    assert_eq!(state["events_total"], valid.to_string());
    hook.wait_for_triggers(valid / 100).await;
    assert!(w.terminate_and_wait().success());
    assert_eq!(hook.distinct_keys().len(), valid / 100);
    forget(&id).await;
    env.cleanup().await;
}

// ---- Open windows across a replay and a restart.

/// The open window as Redis holds it: events counted into it, and per `topic:partition` its
/// `first:last:events`.
async fn open_window(consumer_id: &str) -> (u64, BTreeMap<String, String>) {
    let (events, _) = redis_state(consumer_id).await;
    let ranges: HashMap<String, String> = redis()
        .await
        .hgetall(format!("consumer:{{{consumer_id}}}:window"))
        .await
        .unwrap();
    (events, ranges.into_iter().collect())
}

fn window_of(ranges: &[(&str, &str)]) -> BTreeMap<String, String> {
    ranges
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A recorded trigger: sequence, event count and its `(partition, first, last, events)`.
type RecordedRun = (i64, i64, Vec<(i64, i64, i64, i64)>);

/// The recorded triggers, by sequence.
async fn recorded_ranges(d: &Direct) -> Vec<RecordedRun> {
    let rows: Vec<(i64, i64, sqlx::types::Json<Value>)> = sqlx::query_as(
        "SELECT seq, event_count, offsets FROM pipeline_runs WHERE consumer_id = $1 ORDER BY seq",
    )
    .bind(&d.consumer_id)
    .fetch_all(&d.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(seq, n, offsets)| {
            let mut ranges: Vec<(i64, i64, i64, i64)> = offsets
                .0
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    assert_eq!(r["topic"], "events");
                    (
                        r["partition"].as_i64().unwrap(),
                        r["first_offset"].as_i64().unwrap(),
                        r["last_offset"].as_i64().unwrap(),
                        r["events"].as_i64().unwrap(),
                    )
                })
                .collect();
            ranges.sort();
            (seq, n, ranges)
        })
        .collect()
}

/// Sets the offsets of record of `config`'s group, as the pipeline's transactions would have.
async fn offsets_of_record(d: &Direct, config: &WorkerConfig, next: &[(i32, i64)]) {
    for (partition, offset) in next {
        sqlx::query(
            "INSERT INTO streamops_offsets (consumer_group, topic, partition, next_offset)
             VALUES ($1, 'events', $2, $3)
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET next_offset = $3",
        )
        .bind(&config.kafka.group_id)
        .bind(partition)
        .bind(offset)
        .execute(&d.pool)
        .await
        .unwrap();
    }
}

/// `replay --to-offsets` for the named partitions (the others keep their offsets of record).
async fn replay_to(d: &Direct, config: &WorkerConfig, id: &str, to: &[(i32, i64)]) {
    use streamops_worker::replay::{apply, PartitionOffset, ReplayTarget};
    let positions: Vec<PartitionOffset> = to
        .iter()
        .map(|(partition, offset)| PartitionOffset {
            topic: "events".into(),
            partition: *partition,
            offset: *offset,
        })
        .collect();
    let outcome = apply(
        &d.pool,
        config,
        Some(REDIS_URL),
        id,
        &ReplayTarget::Offsets(positions.clone()),
        &positions,
    )
    .await
    .unwrap();
    assert!(outcome.applied_now);
}

/// Every offset of every recorded trigger, with how many triggers hold it.
fn offsets_in_triggers(runs: &[RecordedRun]) -> BTreeMap<(i64, i64), u32> {
    let mut seen = BTreeMap::new();
    for (_, n, ranges) in runs {
        assert_eq!(
            *n,
            ranges.iter().map(|r| r.3).sum::<i64>(),
            "a trigger's count is its ranges' events: {runs:?}"
        );
        for &(p, first, last, _) in ranges {
            for o in first..=last {
                *seen.entry((p, o)).or_insert(0) += 1;
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_windows_ranges_and_count_come_back_exact_after_a_restart_and_a_replay_into_it() {
    let d = Direct::new("pt-open-window").await;
    let hook = Receiver::start().await;
    let s = settings(&hook.url(), 10, 3600, false);
    let mut config = (*d.context().config).clone();
    config.handler = HandlerConfig::PipelineTrigger(s.clone());
    let mut h = d.handler(&s);
    // Trigger 1: partitions 0 and 1, offsets 0-4 each. Then an open window of 7.
    run_batch(&mut h, &d.pool, events(0, 0..5)).await;
    run_batch(&mut h, &d.pool, events(1, 0..5)).await;
    run_batch(&mut h, &d.pool, events(0, 5..9)).await;
    run_batch(&mut h, &d.pool, events(1, 5..8)).await;
    offsets_of_record(&d, &config, &[(0, 9), (1, 8)]).await;
    let before = window_of(&[("events:0", "5:8:4"), ("events:1", "5:7:3")]);
    assert_eq!(open_window(&d.consumer_id).await, (7, before.clone()));

    // A restart mid-window: a new handler, and the last batch delivered again.
    drop(h);
    let mut h = d.handler(&s);
    run_batch(&mut h, &d.pool, events(1, 5..8)).await;
    assert_eq!(
        open_window(&d.consumer_id).await,
        (7, before),
        "a restart neither loses nor doubles the open window"
    );

    // A replay into the open window: partition 0 from offset 7, partition 1 from 6.
    drop(h);
    replay_to(&d, &config, "into-the-window", &[(0, 7), (1, 6)]).await;
    assert_eq!(
        open_window(&d.consumer_id).await,
        (
            3,
            window_of(&[("events:0", "5:6:2"), ("events:1", "5:5:1")])
        ),
        "the open window holds exactly the counted events before the reset points"
    );
    assert_eq!(recorded_ranges(&d).await.len(), 1, "trigger 1 lies before");

    // Processing again from there, then on to offset 9 in both partitions.
    let mut h = d.handler(&s);
    run_batch(&mut h, &d.pool, events(0, 7..10)).await;
    run_batch(&mut h, &d.pool, events(1, 6..10)).await;
    let runs = recorded_ranges(&d).await;
    assert_eq!(
        runs,
        vec![
            (1, 10, vec![(0, 0, 4, 5), (1, 0, 4, 5)]),
            (2, 10, vec![(0, 5, 9, 5), (1, 5, 9, 5)]),
        ],
        "the trigger that closes the window carries exactly its ranges"
    );
    assert!(offsets_in_triggers(&runs).values().all(|&n| n == 1));
    assert_eq!(open_window(&d.consumer_id).await, (0, BTreeMap::new()));
    drop(h);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_one_partition_of_a_claimed_trigger_reopens_its_window_and_counts_no_event_twice(
) {
    let d = Direct::new("pt-cut-trigger").await;
    let hook = Receiver::start().await;
    let s = settings(&hook.url(), 10, 3600, false);
    let mut config = (*d.context().config).clone();
    config.handler = HandlerConfig::PipelineTrigger(s.clone());
    let (mut h, stop) = d.replica(&s);
    run_batch(&mut h, &d.pool, events(0, 0..5)).await;
    run_batch(&mut h, &d.pool, events(1, 0..5)).await;
    run_batch(&mut h, &d.pool, events(1, 5..8)).await;
    offsets_of_record(&d, &config, &[(0, 5), (1, 8)]).await;
    assert_eq!(
        recorded_ranges(&d).await,
        vec![(1, 10, vec![(0, 0, 4, 5), (1, 0, 4, 5)])]
    );
    d.stop_replica(h, stop, 1).await;
    // Partition 0 only, into trigger 1's window: 11 events lie before the reset points, more
    // than one window, but trigger 1 needs offsets 3 and 4 of partition 0, which are counted
    // again: it cannot stand.
    replay_to(&d, &config, "into-trigger-1", &[(0, 3)]).await;
    assert_eq!(recorded_ranges(&d).await, vec![], "trigger 1 is undone");
    assert_eq!(
        open_window(&d.consumer_id).await,
        (
            11,
            window_of(&[("events:0", "0:2:3"), ("events:1", "0:7:8")])
        ),
        "the window holds every counted event before the reset points"
    );
    let mut h = d.handler(&s);
    run_batch(&mut h, &d.pool, events(0, 3..5)).await;
    let runs = recorded_ranges(&d).await;
    assert_eq!(
        runs,
        vec![(1, 12, vec![(0, 0, 3, 4), (1, 0, 7, 8)])],
        "the next event closes the overfull window, with every event it holds"
    );
    let seen = offsets_in_triggers(&runs);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    assert_eq!(
        open_window(&d.consumer_id).await,
        (1, window_of(&[("events:0", "4:4:1")]))
    );
    drop(h);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_triggers_restored_from_postgresql_keep_their_messages_trace_contexts() {
    use streamops_worker::handlers::pipeline_trigger::{runs, TraceContext};
    let d = Direct::new("pt-traces-kept").await;
    let mut traced = claimed(1);
    traced.traces = vec![
        TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-00000000000000c0-01".into(),
            tracestate: Some("vendor=1".into()),
        },
        TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-00000000000000c1-01".into(),
            tracestate: None,
        },
    ];
    let untraced = claimed(2);
    let mut conn = d.pool.acquire().await.unwrap();
    runs::record_claimed(
        &mut conn,
        &d.consumer_id,
        "webhook",
        &[traced.clone(), untraced.clone()],
    )
    .await
    .unwrap();
    drop(conn);
    assert_eq!(
        runs::pending(&d.pool, &d.consumer_id).await.unwrap(),
        vec![traced, untraced]
    );
    d.finish().await;
}
