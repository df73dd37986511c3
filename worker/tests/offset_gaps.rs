//! Gaps in offsets against the real broker (Apache Kafka) and PostgreSQL: a topic deleted and
//! recreated with fewer messages than the worker had processed, and messages deleted by retention
//! (`DeleteRecords`) before the worker reached them. The worker detects the gap, counts it in
//! `streamops_offset_gaps_total`, records it in `streamops_offset_gaps` and attaches it to the
//! partition's Kafka commit for the operator; under `onOffsetGap: skip` it goes on, under `fail`
//! it stops. Nothing is skipped in silence.

mod support;

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use streamops_crds::gap::{GapKind, GapNote};
use streamops_crds::v1alpha1::OnOffsetGap;
use streamops_crds::HandlerKind;
use streamops_worker::kafka::KafkaClientSettings;
use support::*;

async fn send_prices(topic: &str, range: std::ops::Range<usize>) {
    let producer: FutureProducer = KafkaClientSettings::plaintext(BROKER)
        .reliable_producer()
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    for i in range {
        let value = format!(
            "{{\"symbol\":\"S{}\",\"price\":{}.25,\"timestamp\":\"2024-03-20T10:30:00Z\"}}",
            i % 3,
            10 + i
        );
        producer
            .send(
                FutureRecord::<str, str>::to(topic)
                    .partition(0)
                    .payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

/// The stored next offset of partition 0.
async fn stored(env: &TestEnv) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT next_offset FROM streamops_offsets WHERE consumer_group = $1 AND partition = 0",
    )
    .bind(&env.group)
    .fetch_optional(&env.pool)
    .await
    .unwrap()
}

async fn wait_for_stored(env: &TestEnv, n: i64) {
    let start = Instant::now();
    while stored(env).await != Some(n) {
        assert!(
            start.elapsed() < PATIENCE,
            "stored offset {:?}, expected {n}; logs in {}",
            stored(env).await,
            env.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type GapRow = (i64, i64, String, String);

async fn gaps(env: &TestEnv) -> Vec<GapRow> {
    sqlx::query_as(
        "SELECT from_offset, to_offset, kind, action FROM streamops_offset_gaps
          WHERE consumer_group = $1 ORDER BY detected_at",
    )
    .bind(&env.group)
    .fetch_all(&env.pool)
    .await
    .unwrap_or_default()
}

async fn wait_for_gap(env: &TestEnv) -> Vec<GapRow> {
    let start = Instant::now();
    loop {
        let g = gaps(env).await;
        if !g.is_empty() {
            return g;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "no gap recorded; logs in {}",
            env.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gap note on the group's committed offset of partition 0, as the operator reads it.
fn committed_note(env: &TestEnv) -> Option<GapNote> {
    let consumer: BaseConsumer = KafkaClientSettings::plaintext(BROKER)
        .base()
        .set("group.id", &env.group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&env.topic, 0);
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    let e = committed.find_partition(&env.topic, 0)?;
    GapNote::parse(e.metadata())
}

async fn wait_for_committed_note(env: &TestEnv) -> GapNote {
    let start = Instant::now();
    loop {
        if let Some(n) = committed_note(env) {
            return n;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "no gap note on the Kafka commit"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn admin() -> AdminClient<DefaultClientContext> {
    KafkaClientSettings::plaintext(BROKER)
        .base()
        .create()
        .expect("admin client")
}

/// Deletes the records of partition 0 below `before` (what retention does to old segments).
async fn delete_records_before(topic: &str, before: i64) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(before))
        .unwrap();
    let result = admin()
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("DeleteRecords");
    for e in result.elements() {
        assert!(e.error().is_ok(), "DeleteRecords failed: {:?}", e.error());
    }
}

/// Deletes `topic` and creates it again (empty, one partition) once the deletion completed.
async fn recreate(topic: &str) {
    let settings = KafkaClientSettings::plaintext(BROKER);
    streamops_worker::admin::delete_topic(&settings, topic)
        .await
        .expect("delete topic");
    let start = Instant::now();
    loop {
        match streamops_worker::admin::create_topic(&settings, topic, 1, 1).await {
            Ok(true) => return,
            Ok(false) | Err(_) => {
                assert!(start.elapsed() < PATIENCE, "cannot recreate {topic}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_with_fewer_messages_is_a_reset_gap_recorded_and_skipped() {
    let env = TestEnv::new("gap-recreate", HandlerKind::MovingAverage, 1).await;
    send_prices(&env.topic, 0..100).await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    wait_for_stored(&env, 100).await;
    assert!(w.terminate_and_wait().success());
    assert_eq!(env.count("price_points").await, 100);

    // The topic comes back with 30 messages: offsets 0..30 lie below the stored offset 100.
    recreate(&env.topic).await;
    send_prices(&env.topic, 0..30).await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    let g = wait_for_gap(&env).await;
    assert_eq!(g, vec![(0, 100, "reset".to_string(), "skip".to_string())]);
    // Offsets below 100 of the new log are never written over the old rows; from 100 on the
    // new messages are processed.
    send_prices(&env.topic, 30..110).await;
    wait_for_stored(&env, 110).await;
    assert_eq!(env.count("price_points").await, 110);
    assert_eq!(w.metric("streamops_offset_gaps_total"), 1.0);
    let note = wait_for_committed_note(&env).await;
    assert_eq!(
        (note.kind, note.from, note.to, note.skipped),
        (GapKind::Reset, 0, 100, true)
    );
    assert!(w.log_text().contains("offset gap"), "the gap is logged");
    assert!(w.terminate_and_wait().success());
    assert_eq!(gaps(&env).await.len(), 1, "recorded once");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_deleted_by_retention_before_processing_are_a_retention_gap_recorded_and_skipped()
{
    let env = TestEnv::new("gap-retention", HandlerKind::MovingAverage, 1).await;
    send_prices(&env.topic, 0..100).await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    wait_for_stored(&env, 100).await;
    assert!(w.terminate_and_wait().success());

    send_prices(&env.topic, 100..200).await;
    delete_records_before(&env.topic, 150).await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    wait_for_stored(&env, 200).await;
    assert_eq!(
        gaps(&env).await,
        vec![(100, 150, "retention".to_string(), "skip".to_string())]
    );
    // 0..100 and 150..200 were processed; 100..150 are the recorded gap.
    assert_eq!(env.count("price_points").await, 150);
    assert_eq!(w.metric("streamops_offset_gaps_total"), 1.0);
    let note = wait_for_committed_note(&env).await;
    assert_eq!(
        (note.kind, note.from, note.to, note.skipped),
        (GapKind::Retention, 100, 150, true)
    );
    assert!(w.terminate_and_wait().success());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_on_offset_gap_fail_the_worker_records_the_gap_and_stops_at_it() {
    let mut env = TestEnv::new("gap-fail", HandlerKind::MovingAverage, 1).await;
    env.config.kafka.on_offset_gap = OnOffsetGap::Fail;
    send_prices(&env.topic, 0..50).await;
    let mut w = env.start_worker("w-0");
    w.wait_ready().await;
    wait_for_stored(&env, 50).await;
    assert!(w.terminate_and_wait().success());

    send_prices(&env.topic, 50..100).await;
    delete_records_before(&env.topic, 80).await;
    let w = env.start_worker("w-0");
    let g = wait_for_gap(&env).await;
    assert_eq!(
        g,
        vec![(50, 80, "retention".to_string(), "fail".to_string())]
    );
    let status = w.wait_exit(PATIENCE);
    assert!(!status.success(), "the worker stops at the gap: {status}");
    assert_eq!(
        stored(&env).await,
        Some(50),
        "nothing past the gap was applied"
    );
    assert_eq!(env.count("price_points").await, 50);
    let note = committed_note(&env).expect("the gap is on the Kafka commit");
    assert_eq!((note.kind, note.skipped), (GapKind::Retention, false));
    env.cleanup().await;
}
