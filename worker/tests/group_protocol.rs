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

/// Produces 2,000 events with `seed` at 500 msg/s in the background (a membership change made
/// meanwhile happens mid-stream).
fn produce_phase(env: &TestEnv, seed: u64) -> tokio::task::JoinHandle<()> {
    let topic = env.topic.clone();
    let spec = ProduceSpec::new(HandlerKind::MovingAverage, PHASE)
        .seed(seed)
        .rate(500);
    tokio::spawn(async move {
        produce_events(&topic, &spec).await;
    })
}

const PHASE: u64 = 2000;

/// Sum of the assigned-partition gauges of `members`.
fn owned(members: &[&DynamicMember]) -> f64 {
    members
        .iter()
        .map(|m| m.metric("streamops_assigned_partitions"))
        .sum()
}

async fn wait_owned(members: &[&DynamicMember], n: f64) {
    let start = std::time::Instant::now();
    while owned(members) < n {
        assert!(
            start.elapsed() < PATIENCE,
            "the members own {} of {n} partitions",
            owned(members)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_and_leave_under_the_consumer_protocol_and_every_message_lands_once() {
    let mut env = TestEnv::new("ma-kip848", HandlerKind::MovingAverage, 6).await;
    env.config.kafka.group_protocol = GroupProtocol::Consumer;
    let mut done = 0i64;

    // w0 alone.
    let mut w0 = DynamicMember::start(&env, "w0");
    w0.wait_ready().await;
    w0.wait_for_partitions(6.0).await;
    produce_phase(&env, 8481).await.expect("producer");
    done += PHASE as i64;
    env.wait_for_offsets(done).await;

    // Two members join while events flow.
    let producer = produce_phase(&env, 8482);
    let mut w1 = DynamicMember::start(&env, "w1");
    w1.wait_ready().await;
    let mut w2 = DynamicMember::start(&env, "w2");
    w2.wait_ready().await;
    w1.wait_for_partitions(1.0).await;
    w2.wait_for_partitions(1.0).await;
    producer.await.expect("producer");
    done += PHASE as i64;
    env.wait_for_offsets(done).await;

    // w0 leaves while events flow: its partitions move to w1 and w2.
    let producer = produce_phase(&env, 8483);
    assert!(w0.terminate().await.success(), "w0 did not stop cleanly");
    wait_owned(&[&w1, &w2], 6.0).await;
    producer.await.expect("producer");
    done += PHASE as i64;
    env.wait_for_offsets(done).await;

    // w1 leaves while events flow: w2 owns everything.
    let producer = produce_phase(&env, 8484);
    assert!(w1.terminate().await.success(), "w1 did not stop cleanly");
    w2.wait_for_partitions(6.0).await;
    producer.await.expect("producer");
    done += PHASE as i64;
    env.wait_for_offsets(done).await;

    assert_exactly_once(&env, done).await;
    assert!(
        w2.log_text().contains("\"group_protocol\":\"consumer\""),
        "the worker did not run with group.protocol=consumer; log: {}",
        w2.log.display()
    );
    assert!(w2.terminate().await.success(), "w2 did not stop cleanly");
    env.cleanup().await;
}
