//! Scaling out while a member is far behind, on Apache Kafka with the worker's default consumer
//! (classic protocol, cooperative-sticky, dynamic members): one worker starts on a large
//! backlog, two more join while it is behind. Its advisory Kafka commits then fail during the
//! rebalance (`ILLEGAL_GENERATION`), as in the end-to-end run where the member that kept a
//! partition stopped fetching it for good. Every partition must reach its high watermark, with
//! exactly one row per offset.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use streamops_crds::HandlerKind;
use support::*;

const PARTITIONS: i32 = 3;
const BACKLOG: u64 = 100_000;
/// How long a partition with lag may go without advancing before the test calls it stalled
/// (far above a rebalance round, 1 s heartbeats).
const STALL: Duration = Duration::from_secs(60);

async fn stored(env: &TestEnv) -> BTreeMap<i32, i64> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM streamops_offsets WHERE consumer_group = $1",
    )
    .bind(&env.group)
    .fetch_all(&env.pool)
    .await
    .unwrap_or_default();
    rows.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_joining_a_member_far_behind_leave_no_partition_stalled() {
    let mut env = TestEnv::new("scale-backlog", HandlerKind::MovingAverage, PARTITIONS).await;
    // Small batches: the backlog takes long enough to apply that the joins land mid-way.
    env.config.batch.max_messages = 50;
    env.config.batch.max_wait_ms = 20;
    let mut spec = ProduceSpec::new(HandlerKind::MovingAverage, BACKLOG).seed(7);
    spec.gen.keys = 48;
    env.produce(&spec).await;
    let hw = high_watermarks(&env.topic, PARTITIONS);
    assert_eq!(hw.values().sum::<i64>(), BACKLOG as i64);
    assert!(
        hw.values().all(|h| *h > 0),
        "every partition has a backlog: {hw:?}"
    );

    // STREAMOPS_TEST_KAFKA_DEBUG=cgrp,... turns on librdkafka debug logs in the workers' logs.
    let debug = std::env::var("STREAMOPS_TEST_KAFKA_DEBUG").unwrap_or_default();
    let overrides = format!("debug={debug}");
    let vars: Vec<(&str, &str)> = if debug.is_empty() {
        Vec::new()
    } else {
        vec![
            ("STREAMOPS_KAFKA_CONSUMER_OVERRIDES", overrides.as_str()),
            ("RUST_LOG", "info,streamops_worker=debug,librdkafka=debug"),
        ]
    };
    let mut w0 = env.start_worker_with_env("w-0", &vars);
    w0.wait_ready().await;
    // Join while w-0 is well behind: a few thousand messages in.
    let start = Instant::now();
    while env.applied_offsets().await < 5_000 {
        assert!(
            start.elapsed() < PATIENCE,
            "w-0 never started: {}",
            w0.log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Scaled from 1 to 3 replicas: both new members start together.
    let mut w1 = env.start_worker_with_env("w-1", &vars);
    let mut w2 = env.start_worker_with_env("w-2", &vars);
    w1.wait_ready().await;
    w2.wait_ready().await;
    let behind = env.applied_offsets().await;
    eprintln!("applied when both new members were ready: {behind}");
    assert!(
        behind < BACKLOG as i64 / 2,
        "the members joined after half the backlog was applied ({behind}): not a scale-out under backlog"
    );

    // Every partition must reach its high watermark; one whose stored offset does not move for
    // STALL while it has lag is stalled.
    let mut last: BTreeMap<i32, (i64, Instant)> = BTreeMap::new();
    loop {
        let now = Instant::now();
        let offs = stored(&env).await;
        if hw.iter().all(|(p, h)| offs.get(p) == Some(h)) {
            break;
        }
        for p in 0..PARTITIONS {
            let o = offs.get(&p).copied().unwrap_or(0);
            let e = last.entry(p).or_insert((o, now));
            if e.0 != o {
                *e = (o, now);
            }
            assert!(
                now.duration_since(e.1) < STALL,
                "partition {p} stalled at {o} (high watermark {}) for {STALL:?}; stored {offs:?}; \
                 logs in {}",
                hw[&p],
                env.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for (p, high) in &hw {
        let (rows, distinct): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT \"offset\") FROM price_points
              WHERE topic = $1 AND partition = $2",
        )
        .bind(&env.topic)
        .bind(p)
        .fetch_one(&env.pool)
        .await
        .expect("reconcile query");
        assert_eq!(
            rows,
            distinct,
            "partition {p}: {} duplicated rows",
            rows - distinct
        );
        assert_eq!(rows, *high, "partition {p}: rows vs high watermark");
    }
    for w in [w2, w1, w0] {
        assert!(w.terminate_and_wait().success());
    }
    env.cleanup().await;
}
