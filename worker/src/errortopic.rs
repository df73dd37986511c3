//! The error topic: every message a handler cannot process is produced there with its reason
//! and source position in headers. Delivery is acknowledged by all in-sync replicas
//! (`acks=all`, idempotent producer) before the batch's offsets are committed.
//!
//! Headers of an error record:
//! - `streamops.error.reason`: [`RejectKind::as_str`]
//! - `streamops.error.detail`: human-readable detail
//! - `streamops.source.topic`, `streamops.source.partition`, `streamops.source.offset`
//! - `streamops.consumer`: the consumer id (`namespace/name`)
//! - `streamops.error.truncated` and `streamops.error.original.bytes`, only when the value is a
//!   prefix of an oversized original.
//! - `traceparent` (and `tracestate`), only when trace export is on and the source message
//!   carried a trace context: the context of a `streamops.reject` span in the source message's
//!   trace (see [`crate::telemetry`]). The source message's own headers are not copied to the
//!   error record, so this is its only `traceparent`.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntCounterVec;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use crate::handlers::{RawMessage, RejectKind, Rejection};
use crate::kafka::KafkaClientSettings;
use crate::producer_health::{self, Outcome, ProducerHealth, RebuildReason};

/// Header names.
pub mod headers {
    /// Reject reason.
    pub const REASON: &str = "streamops.error.reason";
    /// Reject detail.
    pub const DETAIL: &str = "streamops.error.detail";
    /// Source topic.
    pub const SOURCE_TOPIC: &str = "streamops.source.topic";
    /// Source partition.
    pub const SOURCE_PARTITION: &str = "streamops.source.partition";
    /// Source offset.
    pub const SOURCE_OFFSET: &str = "streamops.source.offset";
    /// Consumer id.
    pub const CONSUMER: &str = "streamops.consumer";
    /// `true` when the value is a truncated prefix.
    pub const TRUNCATED: &str = "streamops.error.truncated";
    /// Size of the original value when truncated.
    pub const ORIGINAL_BYTES: &str = "streamops.error.original.bytes";
}

/// Largest prefix of an oversized value that is forwarded.
pub const TRUNCATED_PREFIX_BYTES: usize = 16 * 1024;

/// Length of the prefix kept of an oversized value: [`TRUNCATED_PREFIX_BYTES`], or the consumer's
/// `maxMessageBytes` if smaller.
pub fn prefix_len(max_message_bytes: usize) -> usize {
    TRUNCATED_PREFIX_BYTES.min(max_message_bytes)
}

/// Longest detail header.
const MAX_DETAIL_BYTES: usize = 1024;

/// One record bound for the error topic.
#[derive(Debug, Clone)]
pub struct ErrorRecord {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Original key.
    pub key: Option<Vec<u8>>,
    /// Original value, or a prefix of it.
    pub value: Vec<u8>,
    /// Size of the original value.
    pub original_bytes: usize,
    /// Why it was rejected.
    pub kind: RejectKind,
    /// Detail.
    pub detail: String,
    /// `traceparent` and `tracestate` of the record, when the source message was traced.
    pub trace: Option<(String, Option<String>)>,
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl ErrorRecord {
    /// The record for `msg` rejected with `rejection`. Oversized values keep only a prefix of
    /// [`prefix_len`]`(max_message_bytes)` bytes.
    pub fn new(msg: &RawMessage, rejection: &Rejection, max_message_bytes: usize) -> Self {
        let payload = msg.payload.as_deref().unwrap_or_default();
        let value = if rejection.kind == RejectKind::TooLarge {
            payload[..payload.len().min(prefix_len(max_message_bytes))].to_vec()
        } else {
            payload.to_vec()
        };
        Self {
            topic: msg.topic.to_string(),
            partition: msg.partition,
            offset: msg.offset,
            key: msg.key.clone(),
            value,
            original_bytes: payload.len(),
            kind: rejection.kind,
            detail: truncate_utf8(&rejection.detail, MAX_DETAIL_BYTES).to_string(),
            trace: None,
        }
    }

    fn truncated(&self) -> bool {
        self.value.len() < self.original_bytes
    }

    fn shorten(&mut self) {
        self.value.truncate(TRUNCATED_PREFIX_BYTES);
    }

    fn headers(&self, consumer: &str) -> OwnedHeaders {
        let partition = self.partition.to_string();
        let offset = self.offset.to_string();
        let mut h = OwnedHeaders::new_with_capacity(8)
            .insert(Header {
                key: headers::REASON,
                value: Some(self.kind.as_str()),
            })
            .insert(Header {
                key: headers::DETAIL,
                value: Some(self.detail.as_str()),
            })
            .insert(Header {
                key: headers::SOURCE_TOPIC,
                value: Some(self.topic.as_str()),
            })
            .insert(Header {
                key: headers::SOURCE_PARTITION,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: headers::SOURCE_OFFSET,
                value: Some(offset.as_str()),
            })
            .insert(Header {
                key: headers::CONSUMER,
                value: Some(consumer),
            });
        if self.truncated() {
            let original = self.original_bytes.to_string();
            h = h
                .insert(Header {
                    key: headers::TRUNCATED,
                    value: Some("true"),
                })
                .insert(Header {
                    key: headers::ORIGINAL_BYTES,
                    value: Some(original.as_str()),
                });
        }
        if let Some((parent, state)) = &self.trace {
            h = h.insert(Header {
                key: crate::telemetry::TRACEPARENT,
                value: Some(parent.as_str()),
            });
            if let Some(state) = state {
                h = h.insert(Header {
                    key: crate::telemetry::TRACESTATE,
                    value: Some(state.as_str()),
                });
            }
        }
        h
    }
}

/// Failure to deliver to the error topic; the pipeline retries with backoff.
#[derive(Debug, thiserror::Error)]
#[error("error topic {topic}: {source}")]
pub struct ErrorTopicError {
    /// The error topic.
    pub topic: String,
    /// The first delivery error.
    #[source]
    pub source: KafkaError,
}

/// `purpose` label of the error-topic producer in `streamops_producer_rebuilds_total`.
pub const REBUILD_PURPOSE: &str = "error_topic";

/// Producer of the error topic. A producer that stays wedged (see [`crate::producer_health`]) is
/// replaced by a fresh one built from the same configuration; the records it did not deliver
/// are sent again by the next [`ErrorSink::deliver`] (the pipeline retries the batch, and
/// commits nothing before every record is acknowledged).
pub struct ErrorSink {
    producer: Mutex<FutureProducer>,
    config: ClientConfig,
    health: Mutex<ProducerHealth>,
    rebuilds: Option<IntCounterVec>,
    topic: String,
    consumer: String,
}

impl ErrorSink {
    /// A sink producing to `topic`, tagging records with `consumer`.
    pub fn new(
        settings: &KafkaClientSettings,
        topic: &str,
        consumer: &str,
        max_message_bytes: u32,
    ) -> Result<Self, KafkaError> {
        let mut cfg = settings.reliable_producer();
        // Let the client accept anything up to the consumer's own limit; the broker may still
        // refuse, in which case the value is truncated (see `deliver`).
        let max = (max_message_bytes as usize + 64 * 1024).max(1_000_000);
        cfg.set("message.max.bytes", max.to_string())
            .set("linger.ms", "2");
        Self::with_config(cfg, topic, consumer)
    }

    /// A sink with the producer configuration `config` (tests add debug settings).
    pub fn with_config(
        config: ClientConfig,
        topic: &str,
        consumer: &str,
    ) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: Mutex::new(config.create()?),
            config,
            health: Mutex::new(ProducerHealth::new(
                producer_health::ERROR_TOPIC_REBUILD_AFTER,
            )),
            rebuilds: None,
            topic: topic.to_string(),
            consumer: consumer.to_string(),
        })
    }

    /// Counts producer rebuilds in `counter` (`streamops_producer_rebuilds_total`).
    pub fn with_rebuild_counter(mut self, counter: IntCounterVec) -> Self {
        self.rebuilds = Some(counter);
        self
    }

    /// The producer in use (a cheap handle on it).
    pub fn producer(&self) -> FutureProducer {
        match self.producer.lock() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the producer with a fresh one built from the same configuration. Whatever the old
    /// one still holds is purged when it is dropped (off the async threads: dropping waits for its
    /// queue); the caller sends again what was not acknowledged.
    async fn rebuild(&self, reason: &RebuildReason) {
        let fresh: FutureProducer = match self.config.create() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(topic = %self.topic, error = %e, %reason, "cannot build a new error-topic producer; keeping the old one");
                return;
            }
        };
        let old = match self.producer.lock() {
            Ok(mut p) => std::mem::replace(&mut *p, fresh),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), fresh),
        };
        if let Some(c) = &self.rebuilds {
            c.with_label_values(&[REBUILD_PURPOSE]).inc();
        }
        tracing::warn!(
            topic = %self.topic,
            %reason,
            "error-topic producer replaced by a fresh one; undelivered records are sent again"
        );
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
    }

    /// The error topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Delivers every record not yet delivered; marks each delivered one in `delivered`, so a
    /// retry after a failure only sends the rest. A record the broker refuses as too large is
    /// truncated and sent again at once.
    pub async fn deliver(
        &self,
        records: &mut [ErrorRecord],
        delivered: &mut [bool],
    ) -> Result<(), ErrorTopicError> {
        let producer = self.producer();
        let mut outcomes = Vec::new();
        let mut first_err = None;
        for _round in 0..2 {
            let mut futures = Vec::new();
            for (i, rec) in records.iter().enumerate() {
                if delivered[i] {
                    continue;
                }
                let headers = rec.headers(&self.consumer);
                let mut record = FutureRecord::to(&self.topic)
                    .payload(rec.value.as_slice())
                    .headers(headers);
                if let Some(k) = rec.key.as_deref() {
                    record = record.key(k);
                }
                loop {
                    match producer.send_result(record) {
                        Ok(f) => {
                            futures.push((i, f));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) => {
                            first_err.get_or_insert(e);
                            break;
                        }
                    }
                }
            }
            let mut retry_truncated = false;
            for (i, f) in futures {
                match f.await {
                    Ok(Ok(_)) => {
                        delivered[i] = true;
                        outcomes.push(Outcome::Delivered);
                    }
                    Ok(Err((e, _))) => {
                        outcomes.push(Outcome::of_error(&e));
                        let too_large = matches!(
                            e,
                            KafkaError::MessageProduction(
                                RDKafkaErrorCode::MessageSizeTooLarge
                                    | RDKafkaErrorCode::InvalidMessageSize
                            )
                        );
                        if too_large && records[i].value.len() > TRUNCATED_PREFIX_BYTES {
                            records[i].shorten();
                            retry_truncated = true;
                        } else {
                            first_err.get_or_insert(e);
                        }
                    }
                    Err(_canceled) => {
                        first_err.get_or_insert(KafkaError::Canceled);
                    }
                }
            }
            if !retry_truncated {
                break;
            }
        }
        if first_err.is_some() {
            let round = Outcome::of_round(outcomes);
            let fatal = producer_health::fatal_error(producer.client());
            let verdict = match self.health.lock() {
                Ok(mut h) => h.observe(round, fatal),
                Err(poisoned) => poisoned.into_inner().observe(round, fatal),
            };
            if let Some(reason) = verdict {
                self.rebuild(&reason).await;
            }
        } else if let Ok(mut h) = self.health.lock() {
            h.observe(Outcome::Delivered, None);
        }
        match first_err {
            None if delivered.iter().all(|d| *d) => Ok(()),
            None => Err(ErrorTopicError {
                topic: self.topic.clone(),
                source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            }),
            Some(source) => Err(ErrorTopicError {
                topic: self.topic.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn oversized_values_keep_a_prefix_and_say_so() {
        let msg = RawMessage {
            topic: Arc::from("t"),
            partition: 2,
            offset: 9,
            key: Some(b"k".to_vec()),
            payload: Some(vec![b'x'; TRUNCATED_PREFIX_BYTES * 3]),
            timestamp_ms: None,
        };
        let rec = ErrorRecord::new(
            &msg,
            &Rejection::new(RejectKind::TooLarge, "too big"),
            1 << 20,
        );
        assert_eq!(rec.value.len(), TRUNCATED_PREFIX_BYTES);
        assert_eq!(rec.original_bytes, TRUNCATED_PREFIX_BYTES * 3);
        assert!(rec.truncated());
    }

    #[test]
    fn long_details_are_cut_on_a_character_boundary() {
        let detail = "é".repeat(MAX_DETAIL_BYTES);
        let cut = truncate_utf8(&detail, MAX_DETAIL_BYTES + 1);
        assert!(cut.len() <= MAX_DETAIL_BYTES + 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
