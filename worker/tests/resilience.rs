//! The worker under a database outage and a rebalance, against the real broker and PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use streamops_crds::HandlerKind;
use support::*;

async fn admin_pool() -> sqlx::PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("postgres://postgres@{PG_HOST}/postgres"))
        .await
        .expect("admin connection to PostgreSQL")
}

/// Makes the test database unreachable: refuses new connections and ends the open ones.
async fn cut_database(admin: &sqlx::PgPool, name: &str, allow: bool) {
    sqlx::query(&format!(
        "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS {allow}"
    ))
    .execute(admin)
    .await
    .expect("alter database");
    if !allow {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .execute(admin)
        .await
        .expect("terminate backends");
    }
}

async fn assert_exactly_once(env: &TestEnv, total: i64) {
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT raw_response_id) FROM price_points")
            .fetch_one(&env.pool)
            .await
            .expect("count rows");
    assert_eq!(rows, total, "missing or duplicate price points");
    assert_eq!(distinct, total, "duplicate events");
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM streamops_offsets o
           CROSS JOIN LATERAL generate_series(0, o.next_offset - 1) AS s(off)
          WHERE o.consumer_group = $1 AND NOT EXISTS (
                SELECT 1 FROM price_points p
                 WHERE p.topic = o.topic AND p.partition = o.partition AND p.\"offset\" = s.off)",
    )
    .bind(&env.group)
    .fetch_one(&env.pool)
    .await
    .expect("gap query");
    assert_eq!(gaps, 0, "offsets below next_offset without a row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_pauses_the_worker_unready_and_loses_nothing() {
    let mut env = TestEnv::new("ma-dbcut", HandlerKind::MovingAverage, 2).await;
    env.config.batch.max_messages = 100;
    env.config.batch.max_wait_ms = 20;
    let total = 3000u64;
    let spec = ProduceSpec::new(HandlerKind::MovingAverage, total)
        .seed(31)
        .rate(600);
    let producer = {
        let topic = env.topic.clone();
        let spec = spec.clone();
        tokio::spawn(async move { produce_events(&topic, &spec).await })
    };
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(300).await;

    let db = env.db_url.rsplit('/').next().unwrap().to_string();
    let admin = admin_pool().await;
    cut_database(&admin, &db, false).await;
    let start = Instant::now();
    while w.readyz() == Some(200) {
        assert!(
            start.elapsed() < PATIENCE,
            "the worker stayed ready without its database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let it retry a few times while messages keep arriving.
    let start = Instant::now();
    while w.metric("streamops_retries_total") < 3.0 {
        assert!(start.elapsed() < PATIENCE, "the worker never retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cut_database(&admin, &db, true).await;

    w.wait_ready().await;
    producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;
    assert_exactly_once(&env, total as i64).await;
    assert!(w.metric("streamops_outages_total") >= 1.0);
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

/// A worker whose batch keeps failing (here: its database is gone) must still stop on one SIGTERM,
/// as Kubernetes sends only one before SIGKILL: it gives the batch up and leaves the group at
/// once instead of holding its partitions while it retries. Nothing is lost: the next member
/// reads the batch again from the stored offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_retrying_a_batch_stops_on_sigterm_and_the_next_member_loses_nothing() {
    let mut env = TestEnv::new("ma-retry-term", HandlerKind::MovingAverage, 2).await;
    env.config.batch.max_messages = 100;
    env.config.batch.max_wait_ms = 20;
    let total = 2000u64;
    let spec = ProduceSpec::new(HandlerKind::MovingAverage, total)
        .seed(37)
        .rate(500);
    let producer = {
        let topic = env.topic.clone();
        let spec = spec.clone();
        tokio::spawn(async move { produce_events(&topic, &spec).await })
    };
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    env.wait_for_offsets(200).await;

    let db = env.db_url.rsplit('/').next().unwrap().to_string();
    let admin = admin_pool().await;
    cut_database(&admin, &db, false).await;
    let start = Instant::now();
    while w.metric("streamops_retries_total") < 2.0 {
        assert!(start.elapsed() < PATIENCE, "the worker never retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still retrying (the database is still gone) when the signal comes.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &w.pid().to_string()])
        .status();
    // A liveness bound, far above the retry backoff's first delays: without the fix the worker
    // retries until a second signal, i.e. forever.
    let status = w.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "a stop while retrying is a clean stop: {status}"
    );
    cut_database(&admin, &db, true).await;

    let mut w1 = env.start_worker("w-1");
    w1.wait_ready().await;
    producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;
    assert_exactly_once(&env, total as i64).await;
    assert!(w1.terminate_and_wait().success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_joining_mid_stream_shares_the_partitions_exactly_once() {
    let mut env = TestEnv::new("ma-rebal", HandlerKind::MovingAverage, 4).await;
    env.config.batch.max_messages = 50;
    env.config.batch.max_wait_ms = 20;
    // Phase 1 while only w-0 runs, phase 2 once w-1 owns partitions.
    let phase = 2000u64;
    let total = 2 * phase;
    let first = ProduceSpec::new(HandlerKind::MovingAverage, phase)
        .seed(47)
        .rate(800);
    let producer = {
        let topic = env.topic.clone();
        tokio::spawn(async move { produce_events(&topic, &first).await })
    };
    let mut w0 = env.start_worker("w-0");
    w0.wait_ready().await;
    env.wait_for_offsets(500).await;
    let mut w1 = env.start_worker("w-1");
    w1.wait_ready().await;
    let start = Instant::now();
    while w1.metric("streamops_assigned_partitions") < 1.0 {
        assert!(
            start.elapsed() < PATIENCE,
            "the second member never got a partition"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    producer.await.expect("producer task");
    let second = ProduceSpec::new(HandlerKind::MovingAverage, phase)
        .seed(48)
        .rate(800);
    env.produce(&second).await;
    env.wait_for_offsets(total as i64).await;
    assert_exactly_once(&env, total as i64).await;
    assert!(
        w1.metric("streamops_messages_processed_total") > 0.0,
        "the second member processed nothing"
    );
    assert!(w1.terminate_and_wait().success());
    assert!(w0.terminate_and_wait().success());
    env.cleanup().await;
}
