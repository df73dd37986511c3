//! Kafka helpers for the operator's broker tests and the autoscaling benchmark: the local broker
//! of DEVELOPERS.md (Apache Kafka on 127.0.0.1:9092), unique names, topics, and producing records
//! with an ordinary batching, compressing producer.
#![allow(dead_code)]

use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// The broker.
pub const BROKER: &str = "127.0.0.1:9092";

/// Panics with a clear message when the broker is not listening.
pub fn require_broker() {
    let addr = BROKER.parse().expect("valid address");
    if TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_err() {
        panic!(
            "the Kafka broker is not reachable at {BROKER}; start it (see DEVELOPERS.md, \
             `make dev-up`) before running the operator's broker tests"
        );
    }
}

/// A name unique to this run: `prefix-<pid>-<millis>-<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        millis % 100_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn admin() -> AdminClient<DefaultClientContext> {
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
