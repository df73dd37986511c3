//! Replay and suspend/resume (issue 17) against the real broker, PostgreSQL and Redis, for every
//! handler. One topic (two partitions, 2% poison) is processed twice, into two databases:
//! - run A, uninterrupted: the reference tables;
//! - run B: suspended after the first half (SIGTERM: the in-flight batch commits, the worker
//!   leaves), the second half produced while suspended, resumed: the tables must equal A's
//!   (nothing lost, nothing doubled); then `streamops-worker replay` from the middle of the topic
//!   and a worker run again: the tables must equal A's; then the same request again: nothing
//!   changes (a request runs once).
//!
//! Columns set from the wall clock (`created_at`, trigger window times, ...) and names that
//! embed the consumer group or id differ between two runs by construction and are left out of
//! the comparison; everything else is compared row by row.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use sqlx::PgPool;
use streamops_crds::v1alpha1::{FraudSettings, PipelineTriggerSettings, WebhookSpec};
use streamops_crds::{Handler as HandlerConfig, HandlerKind};
use streamops_worker::scorer::{FaultPlan, ScorerServer};
use support::*;

const REDIS_URL: &str = "redis://127.0.0.1:6379/";
/// Messages per half of the topic.
const HALF: u64 = 1500;
/// A stopped static member must leave the group quickly for the replay's idle check.
const WORKER_ENV: (&str, &str) = (
    "STREAMOPS_KAFKA_CONSUMER_OVERRIDES",
    "session.timeout.ms=6000",
);

fn require_redis() {
    if std::net::TcpStream::connect_timeout(
        &"127.0.0.1:6379".parse().unwrap(),
        Duration::from_secs(3),
    )
    .is_err()
    {
        panic!("Redis is not reachable at 127.0.0.1:6379; start it (`make dev-up`)");
    }
}

/// Tables of a handler, each as sorted JSON rows without the columns named.
fn tables(kind: HandlerKind) -> Vec<(&'static str, &'static [&'static str])> {
    let rejections: (&str, &[&str]) = ("streamops_rejections", &["consumer_group", "rejected_at"]);
    let mut t: Vec<(&str, &[&str])> = match kind {
        HandlerKind::MovingAverage => vec![("price_points", &[]), ("moving_averages", &[])],
        HandlerKind::Sensor => vec![
            ("machines", &[]),
            ("failures", &[]),
            ("sensor_readings", &[]),
        ],
        HandlerKind::Fraud => vec![
            ("transactions", &["created_at"]),
            ("predictions", &["created_at"]),
        ],
        HandlerKind::PipelineTrigger => vec![(
            "pipeline_runs",
            &[
                "trigger_id",
                "consumer_id",
                "window_start",
                "window_end",
                "claimed_at",
                "delivered_at",
                "updated_at",
                // Which partitions' offsets fill a window depends on how the partitions
                // interleave on arrival, which no two runs share; each window's count does not.
                "offsets",
            ],
        )],
    };
    t.push(rejections);
    t
}

async fn snapshot(pool: &PgPool, kind: HandlerKind) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (table, skip) in tables(kind) {
        let skip: Vec<String> = skip.iter().map(|s| s.to_string()).collect();
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT (to_jsonb(x) - $1::text[])::text AS r FROM {table} x ORDER BY r"
        ))
        .bind(&skip)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("cannot read {table}: {e}"));
        out.push((table.to_string(), rows));
    }
    out
}

fn assert_same_tables(
    what: &str,
    expected: &[(String, Vec<String>)],
    got: &[(String, Vec<String>)],
) {
    for ((table, want), (_, have)) in expected.iter().zip(got) {
        assert!(
            !want.is_empty() || table == "streamops_rejections",
            "{table} is empty in the reference run"
        );
        if want != have {
            let want_set: BTreeSet<&String> = want.iter().collect();
            let have_set: BTreeSet<&String> = have.iter().collect();
            let missing: Vec<_> = want_set.difference(&have_set).take(3).collect();
            let extra: Vec<_> = have_set.difference(&want_set).take(3).collect();
            panic!(
                "{what}: {table} differs from the uninterrupted run ({} rows expected, {} found); \
                 missing e.g. {missing:?}; unexpected e.g. {extra:?}",
                want.len(),
                have.len()
            );
        }
    }
}

// ---- A webhook receiver recording the Idempotency-Key of every call.

#[derive(Clone, Default)]
struct Hook {
    keys: Arc<Mutex<Vec<String>>>,
}

impl Hook {
    async fn start() -> (SocketAddr, Hook) {
        let hook = Hook::default();
        let h = hook.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, _body: String| {
                let h = h.clone();
                async move {
                    if let Some(k) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
                        h.keys.lock().unwrap().push(k.to_string());
                    }
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, hook)
    }

    fn distinct(&self) -> BTreeSet<String> {
        self.keys.lock().unwrap().iter().cloned().collect()
    }
}

// ---- The scenario.

/// Per-handler settings, and what a worker needs besides the database.
struct Fixture {
    _scorer: Option<ScorerServer>,
    hook: Option<Hook>,
    max_events: u64,
}

impl Fixture {
    async fn new(kind: HandlerKind, env: &mut TestEnv) -> Self {
        let mut f = Fixture {
            _scorer: None,
            hook: None,
            max_events: 0,
        };
        match kind {
            HandlerKind::Fraud => {
                let s = ScorerServer::spawn("127.0.0.1:0".parse().unwrap(), FaultPlan::default())
                    .await
                    .expect("scorer starts");
                env.config.handler = HandlerConfig::Fraud(FraudSettings {
                    scoring_url: format!("http://{}/predict", s.addr()),
                    timeout_ms: 2000,
                    max_retries: 3,
                    batch_size: 100,
                    fraud_threshold: 0.8,
                    circuit_breaker_failures: 5,
                    circuit_breaker_reset_ms: 30_000,
                    protocol: Default::default(),
                    retry_backoff: Default::default(),
                });
                f._scorer = Some(s);
            }
            HandlerKind::PipelineTrigger => {
                require_redis();
                let (addr, hook) = Hook::start().await;
                f.max_events = 97;
                env.config.handler = HandlerConfig::PipelineTrigger(PipelineTriggerSettings {
                    pipeline_name: "replay-test".into(),
                    max_events: f.max_events,
                    max_time_seconds: 3600,
                    trigger_on_empty_window: false,
                    consumer_id: None,
                    webhook: Some(WebhookSpec {
                        url: format!("http://{addr}/hook"),
                        timeout_ms: 2000,
                        max_retries: 3,
                        headers: Default::default(),
                        secret_headers: Default::default(),
                        retry_backoff: streamops_crds::v1alpha1::default_webhook_backoff(),
                    }),
                    job: None,
                });
                f.hook = Some(hook);
            }
            _ => {}
        }
        f
    }

    fn worker(&self, env: &TestEnv, id: &str) -> WorkerProcess {
        env.start_worker_with_env(id, &[WORKER_ENV, ("STREAMOPS_REDIS_URL", REDIS_URL)])
    }
}

/// Points `env` at a fresh database, group and consumer id (a second, independent run).
async fn second_run(env: &mut TestEnv, label: &str) {
    let (url, pool) = fresh_database(label).await;
    env.db_url = url;
    env.pool = pool;
    env.group = format!("{}-{label}", env.group);
    env.config.kafka.group_id = env.group.clone();
    env.config.consumer_id = format!("{}-{label}", env.config.consumer_id);
}

/// Runs `streamops-worker replay` for `env`'s configuration; returns (success, stdout, stderr).
fn replay_cmd(env: &TestEnv, args: &[&str]) -> (bool, Value, String) {
    let cfg = env.dir.join("replay.yaml");
    std::fs::write(&cfg, env.config.to_yaml().expect("config renders")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_streamops-worker"))
        .arg("replay")
        .arg("--config")
        .arg(&cfg)
        .args(args)
        .env("STREAMOPS_DATABASE_URL", &env.db_url)
        .env("STREAMOPS_REDIS_URL", REDIS_URL)
        .output()
        .expect("run streamops-worker replay");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let json = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (out.status.success(), json, stderr)
}

async fn stored_sum(env: &TestEnv) -> i64 {
    env.applied_offsets().await
}

/// Runs a worker until every produced message is applied, then stops it.
async fn run_to(env: &TestEnv, f: &Fixture, id: &str, total: i64) {
    let mut w = f.worker(env, id);
    w.wait_ready().await;
    env.wait_for_offsets(total).await;
    if let Some(hook) = &f.hook {
        // Every claimed trigger delivered before the worker stops.
        let want = pipeline_triggers(env).await;
        let start = Instant::now();
        while delivered(env).await < want {
            assert!(
                start.elapsed() < PATIENCE,
                "triggers not delivered; log {}",
                w.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = hook;
    }
    let status = w.terminate_and_wait();
    assert!(status.success(), "worker exited with {status}");
}

async fn pipeline_triggers(env: &TestEnv) -> i64 {
    env.count("pipeline_runs").await
}

async fn delivered(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pipeline_runs WHERE status = 'delivered'")
        .fetch_one(&env.pool)
        .await
        .unwrap_or(0)
}

/// The whole scenario for one handler; `replay_args` picks the replay target given the
/// timestamp between the two halves and the stored offsets after the first half.
async fn replay_leaves_the_tables_of_an_uninterrupted_run(kind: HandlerKind, prefix: &str) {
    let mut env = TestEnv::new(prefix, kind, 2).await;
    env.config.batch.max_messages = 200;
    let f = Fixture::new(kind, &mut env).await;
    let total = (2 * HALF) as i64;

    // Run B, part one: the first half, then suspend (graceful stop: the batch in flight commits).
    second_run(&mut env, "b").await;
    env.produce(&ProduceSpec::new(kind, HALF).seed(1).poison(2.0))
        .await;
    let mut w = f.worker(&env, "b-0");
    w.wait_ready().await;
    env.wait_for_offsets(HALF as i64).await;
    assert!(w.terminate_and_wait().success());
    let first_half = stored_sum(&env).await;
    assert_eq!(
        first_half, HALF as i64,
        "suspended after exactly the first half"
    );
    let first_half_offsets: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM streamops_offsets WHERE consumer_group = $1",
    )
    .bind(&env.group)
    .fetch_all(&env.pool)
    .await
    .unwrap();

    // The second half arrives while suspended; the timestamp between the halves is the replay
    // point.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let middle_ms = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    env.produce(&ProduceSpec::new(kind, HALF).seed(2).poison(2.0))
        .await;
    // Resume.
    run_to(&env, &f, "b-0", total).await;
    let resumed = snapshot(&env.pool, kind).await;

    // Run A: uninterrupted, into its own database.
    let b = (
        env.db_url.clone(),
        env.pool.clone(),
        env.group.clone(),
        env.config.kafka.group_id.clone(),
        env.config.consumer_id.clone(),
    );
    second_run(&mut env, "a").await;
    run_to(&env, &f, "a-0", total).await;
    let reference = snapshot(&env.pool, kind).await;
    let reference_triggers = match &f.hook {
        Some(_) => pipeline_triggers(&env).await,
        None => 0,
    };
    (
        env.db_url,
        env.pool,
        env.group,
        env.config.kafka.group_id,
        env.config.consumer_id,
    ) = b;
    assert_same_tables("suspend and resume", &reference, &resumed);

    // Replay B from the middle: the derived rows after the reset point go, the rest stay.
    let (args, expected_sum): (Vec<String>, i64) = match kind {
        HandlerKind::Sensor => (
            // Explicit offsets: the positions of record after the first half.
            vec![
                "--to-offsets".into(),
                first_half_offsets
                    .iter()
                    .map(|(t, p, o)| format!("{t}:{p}={o}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ],
            HALF as i64,
        ),
        _ => (
            vec!["--from-timestamp".into(), middle_ms.to_string()],
            HALF as i64,
        ),
    };
    let mut full: Vec<&str> = args.iter().map(String::as_str).collect();
    full.extend(["--request-id", "replay-1", "--wait-idle", "60"]);
    let (ok, outcome, stderr) = replay_cmd(&env, &full);
    assert!(ok, "replay failed: {stderr}");
    assert_eq!(outcome["appliedNow"], Value::Bool(true), "{outcome}");
    assert_eq!(
        stored_sum(&env).await,
        expected_sum,
        "offsets of record at the middle"
    );
    let rows = |s: &[(String, Vec<String>)]| -> usize {
        s.iter()
            .filter(|(t, _)| t != "streamops_rejections")
            .map(|(_, r)| r.len())
            .sum()
    };
    let after_reset = snapshot(&env.pool, kind).await;
    assert!(
        rows(&after_reset) < rows(&reference),
        "rows after the reset point were not deleted ({} rows left of {})",
        rows(&after_reset),
        rows(&reference)
    );
    run_to(&env, &f, "b-0", total).await;
    assert_same_tables(
        "replay from the middle",
        &reference,
        &snapshot(&env.pool, kind).await,
    );

    // The same request again: recorded, so nothing moves.
    let (ok, outcome, stderr) = replay_cmd(&env, &full);
    assert!(ok, "repeated replay failed: {stderr}");
    assert_eq!(outcome["appliedNow"], Value::Bool(false), "{outcome}");
    assert_eq!(
        stored_sum(&env).await,
        total,
        "a repeated request moved the offsets"
    );
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM streamops_replays")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);

    if kind == HandlerKind::Sensor {
        // A second request, to the earliest offsets: everything is rebuilt.
        let (ok, outcome, stderr) = replay_cmd(
            &env,
            &[
                "--to-earliest",
                "--request-id",
                "replay-2",
                "--wait-idle",
                "60",
            ],
        );
        assert!(ok, "replay to earliest failed: {stderr}");
        assert_eq!(outcome["appliedNow"], Value::Bool(true), "{outcome}");
        assert_eq!(stored_sum(&env).await, 0);
        assert_eq!(env.count("sensor_readings").await, 0);
        assert_eq!(env.count("machines").await, 0);
        run_to(&env, &f, "b-0", total).await;
        assert_same_tables(
            "replay from the earliest offsets",
            &reference,
            &snapshot(&env.pool, kind).await,
        );
    }

    if let Some(hook) = &f.hook {
        // Triggers claimed again after the replay carry the ids (Idempotency-Keys) of the first
        // claims: the receiver saw exactly the keys of one uninterrupted run.
        let keys = hook.distinct();
        let b_keys: BTreeSet<String> = keys
            .iter()
            .filter(|k| k.starts_with(&format!("{}:", env.config.consumer_id)))
            .cloned()
            .collect();
        let expected: BTreeSet<String> = (1..=reference_triggers)
            .map(|s| format!("{}:{s}", env.config.consumer_id))
            .collect();
        assert!(
            reference_triggers > 0,
            "the reference run triggered nothing"
        );
        assert_eq!(b_keys, expected);
        assert_eq!(
            reference_triggers,
            (total - env.count("streamops_rejections").await) / f.max_events as i64,
            "one count trigger per {} valid events",
            f.max_events
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_average_replay_from_the_middle_and_suspend_resume_leave_the_uninterrupted_tables() {
    replay_leaves_the_tables_of_an_uninterrupted_run(HandlerKind::MovingAverage, "rp-ma").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sensor_replay_from_the_middle_and_suspend_resume_leave_the_uninterrupted_tables() {
    replay_leaves_the_tables_of_an_uninterrupted_run(HandlerKind::Sensor, "rp-sensor").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fraud_replay_from_the_middle_and_suspend_resume_leave_the_uninterrupted_tables() {
    replay_leaves_the_tables_of_an_uninterrupted_run(HandlerKind::Fraud, "rp-fraud").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_trigger_replay_from_the_middle_and_suspend_resume_leave_the_uninterrupted_tables()
{
    replay_leaves_the_tables_of_an_uninterrupted_run(HandlerKind::PipelineTrigger, "rp-pt").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_while_a_worker_consumes_is_refused_with_the_members_named() {
    let env = TestEnv::new("rp-busy", HandlerKind::MovingAverage, 1).await;
    env.produce(&ProduceSpec::new(HandlerKind::MovingAverage, 100))
        .await;
    let mut w = env.start_worker("busy-0");
    w.wait_ready().await;
    env.wait_for_offsets(100).await;
    let (ok, _, stderr) = replay_cmd(&env, &["--to-earliest", "--request-id", "busy"]);
    assert!(!ok, "a replay ran while a worker consumed");
    assert!(stderr.contains("live member"), "{stderr}");
    assert_eq!(
        stored_sum(&env).await,
        100,
        "the refused replay moved offsets"
    );
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}
