//! Kafka helpers for the operator's broker tests and the autoscaling benchmark: the local broker
//! of DEVELOPERS.md (tansu on 127.0.0.1:9092), unique names, topics, and producing one record per
//! batch (tansu reports a wrong high watermark for multi-record batches; see DEVELOPERS.md).
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
            "the Kafka broker (tansu) is not reachable at {BROKER}; start it (see DEVELOPERS.md, \
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

/// A producer that sends every record in its own batch.
pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .set("acks", "all")
        .create()
        .expect("a producer")
}

/// Produces `count` records to `partition` of `topic`, one at a time (one record per batch);
/// returns when the last one was acknowledged, and when.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    count: usize,
) -> Instant {
    let mut acked = Instant::now();
    for i in 0..count {
        let payload = format!("record {i}");
        let key = format!("k{i}");
        producer
            .send(
                FutureRecord::to(topic)
                    .partition(partition)
                    .key(&key)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("cannot produce to {topic}/{partition}: {e}"));
        acked = Instant::now();
    }
    acked
}
