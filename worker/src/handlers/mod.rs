//! Handlers: what a worker does with the messages of one StreamConsumer.
//!
//! The pipeline (`crate::pipeline`) owns consuming, batching, error routing, offsets and retries. A
//! handler only decodes messages and writes their effects inside the transaction the pipeline
//! opens; the pipeline stores the consumed offsets in that same transaction, which is what makes
//! the effect exactly-once.
//!
//! The contract every handler keeps:
//! - `decode` is pure: it never touches I/O, and a rejection names the reason.
//! - `prepare` and `write` may be called again with the same batch after a failure (the pipeline
//!   retries with capped backoff), so their outside effects must be idempotent.
//! - After `reset`, the handler rebuilds any in-memory state from PostgreSQL (or Redis) lazily,
//!   so a failed transaction, a restart or a rebalance yields exactly the same results as an
//!   uninterrupted run.

use std::future::Future;
use std::sync::Arc;

use streamops_crds::{HandlerKind, WorkerConfig};

pub mod fraud;
pub(crate) mod json_fields;
pub mod moving_average;
pub mod pipeline_trigger;
pub mod sensor;
pub mod storable;

/// A Kafka message as consumed, owned by the pipeline.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// Source topic.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Option<Vec<u8>>,
    /// Broker or producer timestamp, in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

/// Where a decoded item came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// Source topic.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
}

/// A topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
}

/// A decoded message with its position.
#[derive(Debug, Clone)]
pub struct Decoded<T> {
    /// Where it came from.
    pub pos: Position,
    /// Broker or producer timestamp, in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// The decoded item.
    pub item: T,
}

/// The category of a rejected message, sent as the `streamops.error.reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// The message had no value.
    EmptyPayload,
    /// The value exceeds `maxMessageBytes`.
    TooLarge,
    /// The value is not UTF-8.
    InvalidUtf8,
    /// The value is not JSON.
    InvalidJson,
    /// A required field is missing.
    MissingField,
    /// A field has the wrong type.
    WrongType,
    /// A field has a value outside its domain (non-finite number, bad currency, ...).
    InvalidValue,
    /// The scoring service refused it as invalid (fraud: a 4xx answer other than 408 and 429).
    ScoringRejected,
    /// A value PostgreSQL cannot store (U+0000 in a text or JSON string or key).
    Unstorable,
    /// Nesting or the number of fields and elements beyond the limits of
    /// [`storable::check_shape`].
    TooComplex,
    /// PostgreSQL refused the message's rows with a data error (SQLSTATE class 22 or 23); the
    /// detail carries the database's message. Found by splitting the batch.
    DatabaseRefused,
}

impl RejectKind {
    /// Stable name, used in headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmptyPayload => "empty_payload",
            Self::TooLarge => "too_large",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidJson => "invalid_json",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::InvalidValue => "invalid_value",
            Self::ScoringRejected => "scoring_rejected",
            Self::Unstorable => "unstorable",
            Self::TooComplex => "too_complex",
            Self::DatabaseRefused => "database_refused",
        }
    }
}

/// Why a message cannot be processed. It goes to the error topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", kind.as_str())]
pub struct Rejection {
    /// Category.
    pub kind: RejectKind,
    /// Human-readable detail, such as `missing field \`price\` at line 1 column 40`.
    pub detail: String,
}

impl Rejection {
    /// A rejection of the given kind. A NUL in the detail (which may quote the message) is
    /// written as `\u0000`, so the detail itself can always be stored in `streamops_rejections`.
    pub fn new(kind: RejectKind, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        let detail = if detail.contains('\0') {
            detail.replace('\0', "\\u0000")
        } else {
            detail
        };
        Self { kind, detail }
    }
}

/// A failure while processing a batch. Every variant but `Fatal` is retried by the pipeline with
/// capped exponential backoff while consumption is paused; nothing is skipped.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// An HTTP dependency failed (scoring service, webhook).
    #[error("http: {0}")]
    Http(String),
    /// The Kubernetes API failed (Job triggers).
    #[error("kubernetes: {0}")]
    Kube(String),
    /// A failure retrying cannot fix; the worker exits non-zero.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl HandlerError {
    /// Stable name, used as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Database(_) => "database",
            Self::Redis(_) => "redis",
            Self::Http(_) => "http",
            Self::Kube(_) => "kubernetes",
            Self::Fatal(_) => "fatal",
        }
    }

    /// Whether retrying can help.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Fatal(_))
    }
}

/// What `prepare` leaves for `write`.
#[derive(Debug)]
pub struct Prepared<T> {
    /// Items that go on to `write`, in the order received.
    pub items: Vec<Decoded<T>>,
    /// Items rejected during preparation (fraud: refused by the scorer as invalid). The pipeline
    /// routes them to the error topic before the transaction commits.
    pub rejected: Vec<(Position, Rejection)>,
}

/// What a handler is built from.
#[derive(Clone)]
pub struct HandlerContext {
    /// The worker configuration.
    pub config: Arc<WorkerConfig>,
    /// PostgreSQL pool; migrations are already applied.
    pub pool: sqlx::PgPool,
    /// Redis URL, when the handler needs one (`STREAMOPS_REDIS_URL`).
    pub redis_url: Option<String>,
    /// Registry for the handler's own metrics (prefix `streamops_`).
    pub registry: prometheus::Registry,
    /// Cancelled when the worker shuts down; background tasks stop on it.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// This worker's static membership id, if any.
    pub instance_id: Option<String>,
}

/// A message handler. See the module docs for the contract.
pub trait MessageHandler: Send + 'static {
    /// A decoded message.
    type Item: Send + Sync + 'static;

    /// The handler's kind.
    fn kind(&self) -> HandlerKind;

    /// Decodes one message. The pipeline has already rejected empty and oversized values.
    fn decode(&self, msg: &RawMessage) -> Result<Self::Item, Rejection>;

    /// Runs before the transaction, outside it: remote calls such as scoring. May reject items.
    /// Must be safe to call again with the same items after a failure.
    fn prepare(
        &mut self,
        items: Vec<Decoded<Self::Item>>,
    ) -> impl Future<Output = Result<Prepared<Self::Item>, HandlerError>> + Send {
        async move {
            Ok(Prepared {
                items,
                rejected: Vec::new(),
            })
        }
    }

    /// Writes the batch's effects inside `tx`. The pipeline stores the batch's offsets in the same
    /// transaction and commits it; on any error it rolls back, calls [`MessageHandler::reset`] and
    /// retries.
    fn write(
        &mut self,
        tx: &mut sqlx::PgConnection,
        items: &[Decoded<Self::Item>],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Called after the transaction of the last `write` committed.
    fn committed(&mut self) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }

    /// Drops in-memory state of partitions this worker no longer owns.
    fn revoke(&mut self, partitions: &[TopicPartition]);

    /// Drops every in-memory state that is not backed by committed data.
    fn reset(&mut self);

    /// Extra HTTP routes served beside `/healthz`, `/readyz` and `/metrics`.
    fn routes(&self) -> Option<axum::Router> {
        None
    }

    /// Optional: a thread-safe equivalent of [`MessageHandler::decode`] (it must return exactly what
    /// `decode` returns). When given, the pipeline decodes the next batch on the poll task while
    /// the writer is still writing the previous one, overlapping decoding with the database
    /// round trip.
    fn shared_decoder(&self) -> Option<SharedDecoder<Self::Item>> {
        None
    }
}

/// A thread-safe decoding function; see [`MessageHandler::shared_decoder`].
pub type SharedDecoder<T> = Arc<dyn Fn(&RawMessage) -> Result<T, Rejection> + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// Decoding helpers shared by the handlers.

/// The payload of a message, or an [`RejectKind::EmptyPayload`] rejection.
pub fn payload_of(msg: &RawMessage) -> Result<&[u8], Rejection> {
    match msg.payload.as_deref() {
        Some(p) if !p.is_empty() => Ok(p),
        _ => Err(Rejection::new(
            RejectKind::EmptyPayload,
            "message has no value",
        )),
    }
}

/// The rejection category of a `serde_json` error: syntax errors are
/// [`RejectKind::InvalidJson`], a missing field [`RejectKind::MissingField`], a type mismatch
/// [`RejectKind::WrongType`], and out-of-range numbers or values refused by a field's own
/// validation [`RejectKind::InvalidValue`].
pub fn classify_json_error(e: &serde_json::Error) -> RejectKind {
    let text = e.to_string();
    if text.starts_with("number out of range") {
        return RejectKind::InvalidValue;
    }
    match e.classify() {
        serde_json::error::Category::Data => {
            if text.starts_with("missing field") {
                RejectKind::MissingField
            } else if text.starts_with("invalid type") {
                RejectKind::WrongType
            } else {
                RejectKind::InvalidValue
            }
        }
        serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof
        | serde_json::error::Category::Io => RejectKind::InvalidJson,
    }
}

/// Checks that `payload` is UTF-8 and of a bounded shape ([`storable::check_shape`]) and parses
/// it as JSON into `T`, with a classified rejection on failure. `T` may borrow from the payload.
pub fn decode_json<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, Rejection> {
    let text = std::str::from_utf8(payload)
        .map_err(|e| Rejection::new(RejectKind::InvalidUtf8, format!("value is not UTF-8: {e}")))?;
    storable::check_shape(payload)?;
    serde_json::from_str(text).map_err(|e| Rejection::new(classify_json_error(&e), e.to_string()))
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Quote {
        price: f64,
        symbol: String,
    }

    fn kind(payload: &[u8]) -> RejectKind {
        decode_json::<Quote>(payload).unwrap_err().kind
    }

    #[test]
    fn json_errors_are_classified_by_cause() {
        assert_eq!(kind(b"{\"price\": "), RejectKind::InvalidJson);
        assert_eq!(kind(b"not json"), RejectKind::InvalidJson);
        assert_eq!(kind(b"{\"symbol\":\"A\"}"), RejectKind::MissingField);
        assert_eq!(
            kind(b"{\"symbol\":\"A\",\"price\":\"abc\"}"),
            RejectKind::WrongType
        );
        assert_eq!(
            kind(b"{\"symbol\":\"A\",\"price\":1e999}"),
            RejectKind::InvalidValue
        );
        assert_eq!(kind(b"{\"symbol\":\"\xff\"}"), RejectKind::InvalidUtf8);
        // A lone surrogate is not a Unicode scalar value: invalid JSON for serde_json.
        assert_eq!(
            kind(b"{\"symbol\":\"\\ud800\",\"price\":1}"),
            RejectKind::InvalidJson
        );
        assert_eq!(
            kind(b"{\"\\udfff\":1,\"symbol\":\"A\",\"price\":1}"),
            RejectKind::InvalidJson
        );
    }

    #[test]
    fn a_nul_in_a_rejection_detail_is_escaped_so_the_detail_can_be_stored() {
        let r = Rejection::new(RejectKind::InvalidValue, "field `a\0b`");
        assert_eq!(r.detail, "field `a\\u0000b`");
    }

    #[test]
    fn empty_values_are_rejected_as_empty_payload() {
        let msg = RawMessage {
            topic: Arc::from("t"),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(Vec::new()),
            timestamp_ms: None,
        };
        assert_eq!(payload_of(&msg).unwrap_err().kind, RejectKind::EmptyPayload);
    }
}
