//! The group's committed offsets in Kafka catch up with what the workers applied, with no further
//! messages: the operator reads lag from them (`streamops_operator::lag`), so a partition whose
//! Kafka commit stays behind PostgreSQL shows lag forever and the autoscaler never scales down.
//!
//! The workers commit to Kafka after each batch only as advice (the truth is the offset row in
//! PostgreSQL). An advisory commit made while the group rebalances fails (REBALANCE_IN_PROGRESS,
//! ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID) and a partition handed over with nothing left to apply
//! gets no further batch, hence no further commit: the worker must commit its owned partitions'
//! applied offsets again until Kafka acknowledges them.
//!
//! Both tests run the worker's default consumer (classic protocol, cooperative-sticky, dynamic
//! members) on Apache Kafka.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use streamops_crds::HandlerKind;
use support::*;

const PARTITIONS: i32 = 3;
/// How long the committed offsets may take to reach the high watermarks once everything is
/// applied in PostgreSQL (a liveness bound: the worker re-commits every few seconds).
const CATCH_UP: Duration = Duration::from_secs(60);

/// Longer than two commit checks and a statistics interval (5 s each).
const SETTLE: Duration = Duration::from_secs(12);

/// One test at a time: each runs several workers on a small machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The group's committed offsets in Kafka, read by a client of the same group id that never
/// subscribes (an OffsetFetch; it does not join the group). A partition without a commit is
/// absent.
fn kafka_committed(group: &str, topic: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("offset reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(got) => got
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect(),
        Err(e) => {
            eprintln!("cannot read the committed offsets of {group}: {e}");
            BTreeMap::new()
        }
    }
}

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

async fn wait_applied(env: &TestEnv, hw: &BTreeMap<i32, i64>) {
    let start = Instant::now();
    loop {
        let offs = stored(env).await;
        if hw.iter().all(|(p, h)| offs.get(p) == Some(h)) {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the backlog was not applied: stored {offs:?}, high watermarks {hw:?}; logs in {}",
            env.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until Kafka's committed offsets of the group equal the high watermarks; returns how
/// long it took, or the last committed offsets seen.
async fn wait_committed(
    env: &TestEnv,
    hw: &BTreeMap<i32, i64>,
) -> Result<Duration, BTreeMap<i32, i64>> {
    let start = Instant::now();
    loop {
        let (group, topic) = (env.group.clone(), env.topic.clone());
        let committed = tokio::task::spawn_blocking(move || kafka_committed(&group, &topic))
            .await
            .expect("offset reader task");
        if &committed == hw {
            return Ok(start.elapsed());
        }
        if start.elapsed() > CATCH_UP {
            return Err(committed);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_commits_reach_the_high_watermarks_after_a_scale_out_drains_the_backlog() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = {
        let mut env = TestEnv::new("commits-scale", HandlerKind::MovingAverage, PARTITIONS).await;
        env.config.batch.max_messages = 50;
        env.config.batch.max_wait_ms = 20;
        env
    };
    let backlog: u64 = 60_000;
    let mut spec = ProduceSpec::new(HandlerKind::MovingAverage, backlog).seed(11);
    spec.gen.keys = 48;
    env.produce(&spec).await;
    let hw = high_watermarks(&env.topic, PARTITIONS);
    assert_eq!(hw.values().sum::<i64>(), backlog as i64);

    let mut w0 = env.start_worker("w-0");
    w0.wait_ready().await;
    // Scale out from 1 to 3 while the backlog is being applied (as the autoscaler does on lag).
    let start = Instant::now();
    while env.applied_offsets().await < backlog as i64 / 4 {
        assert!(
            start.elapsed() < PATIENCE,
            "w-0 is not applying: {}",
            w0.log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut w1 = env.start_worker("w-1");
    let mut w2 = env.start_worker("w-2");
    w1.wait_ready().await;
    w2.wait_ready().await;
    let joined_at = env.applied_offsets().await;
    eprintln!("applied when both new members were ready: {joined_at} of {backlog}");
    wait_applied(&env, &hw).await;
    eprintln!("backlog applied in PostgreSQL: {hw:?}");

    let caught_up = wait_committed(&env, &hw).await;
    let failures: f64 = [&w0, &w1, &w2]
        .iter()
        .map(|w| w.metric("streamops_kafka_commit_failures_total"))
        .sum();
    let retries: f64 = [&w0, &w1, &w2]
        .iter()
        .map(|w| w.metric("streamops_kafka_commit_retries_total"))
        .sum();
    eprintln!("advisory commit failures {failures}, retries {retries}");
    match caught_up {
        Ok(took) => eprintln!("committed offsets reached the high watermarks in {took:?}"),
        Err(committed) => panic!(
            "the group's committed offsets in Kafka stayed behind PostgreSQL: committed \
             {committed:?}, applied {hw:?}; logs in {}",
            env.dir.display()
        ),
    }
    for w in [w2, w1, w0] {
        assert!(w.terminate_and_wait().success());
    }
    env.cleanup().await;
}

/// Kafka's committed offsets are behind PostgreSQL when the members join (as after advisory
/// commits lost to a rebalance): the members commit what they applied without any new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_commit_the_applied_offsets_of_assigned_partitions_without_new_messages() {
    let _one = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new("commits-assign", HandlerKind::MovingAverage, PARTITIONS).await;
    let backlog: u64 = 3_000;
    env.produce(&ProduceSpec::new(HandlerKind::MovingAverage, backlog).seed(5))
        .await;
    let hw = high_watermarks(&env.topic, PARTITIONS);
    let w0 = env.start_worker("w-0");
    wait_applied(&env, &hw).await;
    assert!(w0.terminate_and_wait().success());
    // The group is empty now: an outside commit (generation -1) is accepted. Kafka's committed
    // offsets go back to the start, PostgreSQL still holds the high watermarks.
    let behind: Vec<(i32, i64)> = (0..PARTITIONS).map(|p| (p, 0)).collect();
    kafka::commit_offsets(&env.group, &env.topic, &behind);
    assert_eq!(
        kafka_committed(&env.group, &env.topic),
        behind.iter().copied().collect::<BTreeMap<_, _>>(),
        "the committed offsets were set back"
    );

    let mut w0 = env.start_worker("w-0");
    let mut w1 = env.start_worker("w-1");
    w0.wait_ready().await;
    w1.wait_ready().await;
    match wait_committed(&env, &hw).await {
        Ok(took) => eprintln!("committed offsets reached the high watermarks in {took:?}"),
        Err(committed) => panic!(
            "no member committed the applied offsets of its partitions: committed \
             {committed:?}, applied {hw:?}; logs in {}",
            env.dir.display()
        ),
    }
    // Once Kafka holds the applied offsets (and the members' statistics have seen it), the
    // members stop committing them again: acknowledged commits are recognised.
    let retries = |ws: [&WorkerProcess; 2]| -> f64 {
        ws.iter()
            .map(|w| w.metric("streamops_kafka_commit_retries_total"))
            .sum()
    };
    tokio::time::sleep(SETTLE).await;
    let before = retries([&w0, &w1]);
    assert!(before >= 1.0, "the catch-up was not a re-commit ({before})");
    tokio::time::sleep(SETTLE).await;
    let after = retries([&w0, &w1]);
    assert_eq!(
        before,
        after,
        "the members kept committing offsets Kafka already holds; logs in {}",
        env.dir.display()
    );
    // Nothing was applied twice: the members started from PostgreSQL, not from Kafka.
    assert_eq!(env.count("price_points").await, backlog as i64);
    for w in [w1, w0] {
        assert!(w.terminate_and_wait().success());
    }
    env.cleanup().await;
}
