//! Topic administration through the Kafka admin API: `streamops-worker topic create|delete`.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::KafkaClientSettings;

/// Admin failures.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The client could not be created or the request failed.
    #[error("kafka admin: {0}")]
    Kafka(#[from] KafkaError),
    /// The broker refused the operation on a topic.
    #[error("topic {topic}: {code}")]
    Topic {
        /// Topic.
        topic: String,
        /// Broker error.
        code: RDKafkaErrorCode,
    },
    /// The broker did not show the topic created (every partition with a leader) or deleted in
    /// time.
    #[error("topic {topic}: the metadata did not settle within {waited:?}")]
    NotReady {
        /// Topic.
        topic: String,
        /// How long we waited.
        waited: Duration,
    },
}

fn client(settings: &KafkaClientSettings) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    settings.base().create()
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))
}

/// How long [`create_topic`] waits for the new topic's partitions to have leaders.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates `name` with `partitions` partitions. An existing topic is success (idempotent);
/// returns whether it was created now. Returns once the broker's metadata lists every partition
/// of the topic with a leader: Kafka answers CreateTopics when the controller has recorded the
/// topic, before the brokers serve it, and a producer or consumer started right away would see
/// an unknown topic.
pub async fn create_topic(
    settings: &KafkaClientSettings,
    name: &str,
    partitions: i32,
    replication: i32,
) -> Result<bool, AdminError> {
    let admin = client(settings)?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
    let results = admin.create_topics([&topic], &options()).await?;
    let created = match results.into_iter().next() {
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => false,
        Some(Err((topic, code))) => return Err(AdminError::Topic { topic, code }),
        Some(Ok(_)) | None => true,
    };
    let want = if created { partitions } else { 1 };
    wait_for_metadata(settings, name, |t| match t {
        Some(t) => {
            t.partitions().len() >= want.max(1) as usize
                && t.partitions()
                    .iter()
                    .all(|p| p.leader() >= 0 && p.error().is_none())
        }
        None => false,
    })
    .await?;
    Ok(created)
}

/// Polls the metadata of `name` until `done` holds for it (`None`: the broker does not know the
/// topic), for up to [`READY_TIMEOUT`]. The metadata comes from a consumer-type client, which
/// never asks the broker to auto-create the topic.
async fn wait_for_metadata(
    settings: &KafkaClientSettings,
    name: &str,
    done: impl Fn(Option<&rdkafka::metadata::MetadataTopic>) -> bool,
) -> Result<(), AdminError> {
    let consumer: BaseConsumer = settings.base().create()?;
    let start = std::time::Instant::now();
    while start.elapsed() < READY_TIMEOUT {
        if let Ok(metadata) = consumer.fetch_metadata(Some(name), Duration::from_secs(5)) {
            let topic = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none());
            if done(topic) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(AdminError::NotReady {
        topic: name.to_string(),
        waited: READY_TIMEOUT,
    })
}

/// Deletes `name`. A missing topic is success; returns whether it was deleted now, once the
/// broker's metadata no longer lists it (so that a topic of the same name can be created next).
pub async fn delete_topic(settings: &KafkaClientSettings, name: &str) -> Result<bool, AdminError> {
    let admin = client(settings)?;
    let results = admin.delete_topics(&[name], &options()).await?;
    let deleted = match results.into_iter().next() {
        Some(Err((_, RDKafkaErrorCode::UnknownTopicOrPartition))) => false,
        Some(Err((topic, code))) => return Err(AdminError::Topic { topic, code }),
        Some(Ok(_)) | None => true,
    };
    wait_for_metadata(settings, name, |t| t.is_none()).await?;
    Ok(deleted)
}
