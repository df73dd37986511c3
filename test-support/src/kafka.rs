//! Kafka helpers: the local broker of DEVELOPERS.md (Apache Kafka on 127.0.0.1:9092), topics,
//! producing records with an ordinary batching, compressing producer, and committing a group's
//! offsets.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

pub use crate::unique;

/// The broker.
pub const BROKER: &str = "127.0.0.1:9092";

/// Panics with a clear message when the broker is not listening.
pub fn require_broker() {
    crate::require_service("the Kafka broker", BROKER);
}

/// An admin client on the broker.
pub fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .create()
        .expect("an admin client")
}

/// Creates a topic with `partitions` partitions.
pub async fn create_topic(name: &str, partitions: i32) {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin()
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .unwrap_or_else(|e| panic!("cannot create topic {name}: {e}"));
    for r in results {
        if let Err((topic, code)) = r {
            panic!("cannot create topic {topic}: {code}");
        }
    }
}

/// Deletes a topic; failures are ignored (clean-up only).
pub async fn delete_topic(name: &str) {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let _ = admin().delete_topics(&[name], &opts).await;
}

/// A reliable producer that batches and compresses (several records per batch).
pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "snappy")
        .set("linger.ms", "5")
        .create()
        .expect("a producer")
}

/// Produces `count` records to `partition` of `topic`, all in flight together (so they share
/// batches); returns when the last one was acknowledged.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    count: usize,
) -> Instant {
    let sends = (0..count).map(|i| {
        let payload = format!("record {i}");
        let key = format!("k{i}");
        async move {
            producer
                .send(
                    FutureRecord::to(topic)
                        .partition(partition)
                        .key(&key)
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("cannot produce to {topic}/{partition}: {e}"))
        }
    });
    futures::future::join_all(sends).await;
    Instant::now()
}

/// Commits `(partition, offset)` pairs of `topic` for `group` without joining it (a consumer that
/// never subscribes); committing creates the group on the broker.
pub fn commit_offsets(group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer");
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .expect("a valid offset");
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .unwrap_or_else(|e| panic!("cannot commit offsets for {group}: {e}"));
}
