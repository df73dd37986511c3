//! Topic administration through the Kafka admin API: `streamops-worker topic create|delete`.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
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
}

fn client(settings: &KafkaClientSettings) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    settings.base().create()
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))
}

/// Creates `name` with `partitions` partitions. An existing topic is success (idempotent);
/// returns whether it was created now.
pub async fn create_topic(
    settings: &KafkaClientSettings,
    name: &str,
    partitions: i32,
    replication: i32,
) -> Result<bool, AdminError> {
    let admin = client(settings)?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
    let results = admin.create_topics([&topic], &options()).await?;
    match results.into_iter().next() {
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
        Some(Err((topic, code))) => Err(AdminError::Topic { topic, code }),
        Some(Ok(_)) | None => Ok(true),
    }
}

/// Deletes `name`. A missing topic is success; returns whether it was deleted now.
pub async fn delete_topic(settings: &KafkaClientSettings, name: &str) -> Result<bool, AdminError> {
    let admin = client(settings)?;
    let results = admin.delete_topics(&[name], &options()).await?;
    match results.into_iter().next() {
        Some(Err((_, RDKafkaErrorCode::UnknownTopicOrPartition))) => Ok(false),
        Some(Err((topic, code))) => Err(AdminError::Topic { topic, code }),
        Some(Ok(_)) | None => Ok(true),
    }
}
