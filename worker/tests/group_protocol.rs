//! KIP-848 (`spec.kafka.groupProtocol: consumer`) against Apache Kafka: members join and leave
//! a group whose partitions the broker assigns, and every message is committed exactly once.

#[path = "support/members.rs"]
mod members;
mod support;

use members::DynamicMember;
use streamops_crds::v1alpha1::GroupProtocol;
use streamops_crds::HandlerKind;
use support::*;

/// Every produced event is one row, and every offset below a partition's stored next offset
/// has its row.
async fn assert_exactly_once(env: &TestEnv, total: i64) {
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT raw_response_id) FROM price_points")
            .fetch_one(&env.pool)
            .await
            .expect("count rows");
    assert_eq!(rows, total, "missing or duplicate price points");
    assert_eq!(distinct, total, "duplicate events");
    assert_eq!(env.applied_offsets().await, total, "stored offsets");
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
async fn members_join_and_leave_under_the_consumer_protocol_and_every_message_lands_once() {
    let mut env = TestEnv::new("ma-kip848", HandlerKind::MovingAverage, 6).await;
    env.config.kafka.group_protocol = GroupProtocol::Consumer;
    // Phases run while the producer keeps going: w0 alone, w0 + w1 (join), w0 + w1 + w2
    // (join), w1 + w2 after w0 leaves, w2 alone after w1 leaves.
    let total = 12_000u64;
    let spec = ProduceSpec::new(HandlerKind::MovingAverage, total)
        .seed(848)
        .rate(600);
    let producer = {
        let topic = env.topic.clone();
        let spec = spec.clone();
        tokio::spawn(async move { produce_events(&topic, &spec).await })
    };
    let mut w0 = DynamicMember::start(&env, "w0");
    w0.wait_ready().await;
    w0.wait_for_partitions(6.0).await;
    env.wait_for_offsets(1000).await;

    let mut w1 = DynamicMember::start(&env, "w1");
    w1.wait_ready().await;
    w1.wait_for_partitions(1.0).await;
    let mut w2 = DynamicMember::start(&env, "w2");
    w2.wait_ready().await;
    w2.wait_for_partitions(1.0).await;
    let before = env.applied_offsets().await;
    env.wait_for_offsets(before + 1000).await;

    assert!(w0.terminate().await.success(), "w0 did not stop cleanly");
    // The leaver's partitions move to the others: together they own all six again.
    w1.wait_for_partitions(1.0).await;
    let start = std::time::Instant::now();
    while w1.metric("streamops_assigned_partitions") + w2.metric("streamops_assigned_partitions")
        < 6.0
    {
        assert!(
            start.elapsed() < PATIENCE,
            "the partitions of the member that left were never reassigned"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let before = env.applied_offsets().await;
    env.wait_for_offsets(before + 1000).await;
    assert!(w1.terminate().await.success(), "w1 did not stop cleanly");
    w2.wait_for_partitions(6.0).await;

    producer.await.expect("producer task");
    env.wait_for_offsets(total as i64).await;
    assert_exactly_once(&env, total as i64).await;
    assert!(
        w2.log_text().contains("\"group_protocol\":\"consumer\""),
        "the worker did not run with group.protocol=consumer; log: {}",
        w2.log.display()
    );
    assert!(w2.terminate().await.success(), "w2 did not stop cleanly");
    env.cleanup().await;
}
