//! The `fraud` handler (seed 003): validate transactions, score them with an ML service, and store
//! transactions and predictions in PostgreSQL.
//!
//! # Message
//! One JSON object per Kafka message:
//!
//! ```json
//! {"transaction_id": "6f1c2d0e-9b1a-4c1e-8d7f-0a1b2c3d4e5f", "account_id": "acc-1042",
//!  "merchant": "Corner Grocery", "amount": 129.99, "currency": "USD",
//!  "timestamp": "2024-03-20T10:30:00Z",
//!  "merchant_category": "grocery", "country": "US", "card_present": true}
//! ```
//!
//! | field | type | rule |
//! |---|---|---|
//! | `transaction_id` (alias `id`) | string | required; 1-64 bytes, not blank, no control characters; unique |
//! | `account_id` (aliases `user_id`, `customer_id`) | string | required; 1-64 bytes |
//! | `merchant` (aliases `merchant_id`, `merchant_name`) | string | required; 1-128 bytes |
//! | `amount` | number | required; finite, between 0.0001 and 1,000,000,000 major units |
//! | `currency` | string | required; an active ISO 4217 code, three uppercase letters ([`transaction::CURRENCIES`]) |
//! | `timestamp` (alias `transaction_time`) | string | required; RFC 3339, 1970 or later, at most 24 hours after the Kafka record's timestamp |
//! | `merchant_category` | string | optional; 1-128 bytes |
//! | `country` | string | optional; ISO 3166-1 alpha-2, two uppercase letters |
//! | `card_present` | boolean | optional |
//!
//! Text fields (ids, merchant, category) allow no control characters, so no U+0000 (`\u0000`),
//! which PostgreSQL cannot store; a message nested deeper than 32 levels or with more than 4096
//! fields and elements is `too_complex` (see [`storable`](super::storable)).
//! Other fields are ignored. An invalid transaction goes to the error topic (by default the topic
//! plus `-failed`, as in seed 003: `transactions-failed`) with the rule it broke.
//!
//! # Scoring
//! `prepare` sends the valid transactions of a batch to `scoringUrl` in groups of `batchSize`,
//! in the configured `protocol`: `streamops` (the reference API, described in [`crate::scorer`]),
//! `kserve-v1` or `open-inference-v2`. The two tensor protocols carry one feature vector per
//! transaction, documented in [`crate::scorer::model::features`]: `amount`,
//! `log1p_amount_usd`, `hour_utc`, `night`, `rare_currency`, `merchant_risk`, `account_risk`, all
//! FP64. Each call has `timeoutMs`; a failed call (unreachable, timeout, 5xx, 408, 429, malformed
//! answer) is retried up to `maxRetries` times with capped exponential backoff
//! (`retryBackoff`: 100 ms, factor 2, at most 5 s by default, with jitter). A circuit breaker
//! opens after `circuitBreakerFailures` consecutive failed calls and fails attempts fast for
//! `circuitBreakerResetMs`, then lets one trial call through.
//!
//! **No transaction goes unscored because the scorer was down.** When the retries run out or the
//! breaker is open, `prepare` fails with a retryable error: the pipeline pauses consumption
//! (the member stays in the group), marks the worker not ready and retries the same batch with
//! its own capped backoff, exactly as during a PostgreSQL outage. Groups of the batch that were
//! already scored are kept, so the retry only calls for the rest. We chose pausing over parking
//! transactions as pending: the batch's offsets, rows and predictions still commit together, so
//! exactly-once and partition order hold with no second store to reconcile, and the backlog
//! stays in Kafka where the lag (and its alerts) shows it.
//!
//! Only a transaction the scorer refuses as invalid (a 4xx answer other than 408 and 429) goes to
//! the error topic, with reason `scoring_rejected` and the answer in the detail. A refused group
//! is split in halves and retried until the refused transactions are isolated, so one bad
//! transaction does not take its valid neighbours with it. The error topic is written before the
//! batch commits, so the handler remembers what it sent there until the batch commits: if the
//! transaction fails and the batch is retried, those transactions are rejected again rather than
//! scored a second time.
//!
//! # Tables (migration `0004_fraud.sql`)
//! `transactions` (keyed by `transaction_id`, with the source position) and `predictions`
//! (`fraud_score`, `is_fraud = fraud_score >= fraudThreshold`, `threshold`, `model_version`, and
//! seed 003's `prediction` = `fraud` | `legitimate`), written in the pipeline's transaction with
//! the offsets. A transaction id already stored is not stored again; such duplicates are counted
//! in `streamops_fraud_duplicates_total`. (`predictions` has no foreign key to `transactions`:
//! both rows are written together, and the per-row check would triple the cost of storing
//! predictions.)

mod breaker;
mod client;
mod store;
pub mod transaction;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{IntCounter, Opts};
use streamops_crds::v1alpha1::FraudSettings;
use streamops_crds::HandlerKind;
use tracing::{debug, warn, Instrument};

pub use breaker::{BreakerState, CircuitBreaker};
pub use client::{backoff, CallError, ClientSettings, Scored, ScoringClient, ScoringFailure};
pub use store::{
    amount_numeric, amount_text, prediction_row, transaction_row, PREDICTIONS_COPY,
    TRANSACTIONS_COPY,
};
pub use transaction::{decode_transaction, Transaction};

use super::{
    Decoded, HandlerContext, HandlerError, MessageHandler, Position, Prepared, RawMessage,
    RejectKind, Rejection, TopicPartition,
};
use client::ClientMetrics;

/// A prediction attached to a transaction by `prepare`.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Fraud probability.
    pub score: f64,
    /// Model version reported by the service.
    pub model_version: Arc<str>,
}

/// A decoded transaction, with its prediction once scored.
#[derive(Debug, Clone, PartialEq)]
pub struct FraudItem {
    /// The transaction.
    pub transaction: Transaction,
    /// Set by `prepare`.
    pub prediction: Option<Prediction>,
}

#[derive(Clone)]
struct FraudMetrics {
    stored: IntCounter,
    flagged: IntCounter,
    duplicates: IntCounter,
    scoring_rejected: IntCounter,
}

impl FraudMetrics {
    fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| IntCounter::with_opts(Opts::new(name, help));
        let m = Self {
            stored: counter(
                "streamops_fraud_transactions_stored_total",
                "Transactions stored with their prediction (committed).",
            )?,
            flagged: counter(
                "streamops_fraud_flagged_total",
                "Stored transactions whose score reached fraudThreshold (committed).",
            )?,
            duplicates: counter(
                "streamops_fraud_duplicates_total",
                "Transactions skipped because their id was already stored (committed).",
            )?,
            scoring_rejected: counter(
                "streamops_fraud_scoring_rejected_total",
                "Transactions sent to the error topic because the scorer refused them as invalid (committed).",
            )?,
        };
        registry.register(Box::new(m.stored.clone()))?;
        registry.register(Box::new(m.flagged.clone()))?;
        registry.register(Box::new(m.duplicates.clone()))?;
        registry.register(Box::new(m.scoring_rejected.clone()))?;
        Ok(m)
    }
}

/// The fraud handler.
pub struct FraudHandler {
    settings: FraudSettings,
    client: ScoringClient,
    metrics: FraudMetrics,
    /// Transactions sent to the error topic by a `prepare` whose batch has not committed yet.
    /// Kept across `reset`: the error topic already holds them.
    sticky: HashMap<Position, Rejection>,
    /// Predictions obtained by a `prepare` whose batch has not committed yet, so that a retry of
    /// the batch (after a scorer or database outage) only scores what is still missing. Kept
    /// across `reset`: they come from the scorer, not from uncommitted data.
    scored: HashMap<Position, Prediction>,
    staged: Option<store::Written>,
    /// Transactions the last `prepare` rejected, counted once their batch commits.
    scoring_rejected: u64,
}

impl FraudHandler {
    /// Builds the handler and registers its metrics on the context's registry.
    pub fn new(ctx: &HandlerContext, settings: &FraudSettings) -> Result<Self, HandlerError> {
        let metrics = FraudMetrics::register(&ctx.registry)
            .map_err(|e| HandlerError::Fatal(format!("cannot register fraud metrics: {e}")))?;
        let client_metrics = ClientMetrics::register(&ctx.registry)
            .map_err(|e| HandlerError::Fatal(format!("cannot register fraud metrics: {e}")))?;
        let client = ScoringClient::new(
            ClientSettings {
                url: settings.scoring_url.clone(),
                protocol: settings.protocol,
                backoff: settings.retry_backoff.clone(),
                timeout: Duration::from_millis(u64::from(settings.timeout_ms.max(1))),
                max_retries: settings.max_retries,
                breaker_failures: settings.circuit_breaker_failures,
                breaker_reset: Duration::from_millis(u64::from(settings.circuit_breaker_reset_ms)),
            },
            client_metrics,
        )
        .map_err(|e| HandlerError::Fatal(format!("cannot build the scoring client: {e}")))?;
        Ok(Self {
            settings: settings.clone(),
            client,
            metrics,
            sticky: HashMap::new(),
            scored: HashMap::new(),
            staged: None,
            scoring_rejected: 0,
        })
    }
}

impl MessageHandler for FraudHandler {
    type Item = FraudItem;

    fn kind(&self) -> HandlerKind {
        HandlerKind::Fraud
    }

    fn decode(&self, msg: &RawMessage) -> Result<FraudItem, Rejection> {
        let reference = msg
            .timestamp_ms
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .unwrap_or_else(Utc::now);
        let transaction =
            decode_transaction(msg.payload.as_deref().unwrap_or_default(), reference)?;
        Ok(FraudItem {
            transaction,
            prediction: None,
        })
    }

    async fn prepare(
        &mut self,
        items: Vec<Decoded<FraudItem>>,
    ) -> Result<Prepared<FraudItem>, HandlerError> {
        let size = self.settings.batch_size.max(1) as usize;
        let mut scored = Vec::with_capacity(items.len());
        let mut rejected = Vec::new();
        let mut todo: Vec<Decoded<FraudItem>> = Vec::with_capacity(items.len());
        let order: HashMap<Position, usize> = items
            .iter()
            .enumerate()
            .map(|(i, d)| (d.pos.clone(), i))
            .collect();
        for mut d in items {
            if let Some(r) = self.sticky.get(&d.pos) {
                rejected.push((d.pos, r.clone()));
            } else if let Some(p) = self.scored.get(&d.pos) {
                d.item.prediction = Some(p.clone());
                scored.push(d);
            } else {
                todo.push(d);
            }
        }
        let mut groups: VecDeque<Vec<Decoded<FraudItem>>> = VecDeque::new();
        let mut rest = todo.into_iter().peekable();
        while rest.peek().is_some() {
            groups.push_back(rest.by_ref().take(size).collect());
        }
        while let Some(mut group) = groups.pop_front() {
            let inputs: Vec<_> = group
                .iter()
                .map(|d| d.item.transaction.score_input())
                .collect();
            // Continues the trace of the group's first traced transaction, linked to the others'.
            let span = crate::telemetry::batch_span(
                crate::telemetry::BatchOp::Score,
                group.len(),
                &crate::telemetry::traces_of(group.iter().map(|d| &d.pos)),
            );
            let result = self.client.score(&inputs).instrument(span.clone()).await;
            if let Err(failure) = &result {
                crate::telemetry::record_failure(&span, failure.last.label());
            }
            match result {
                Ok(s) => {
                    for (d, score) in group.iter_mut().zip(s.scores) {
                        let p = Prediction {
                            score,
                            model_version: s.model_version.clone(),
                        };
                        debug!(transaction_id = %d.item.transaction.transaction_id,
                            score, partition = d.pos.partition, offset = d.pos.offset, "scored");
                        self.scored.insert(d.pos.clone(), p.clone());
                        d.item.prediction = Some(p);
                    }
                    scored.append(&mut group);
                }
                Err(failure) if failure.last.is_retryable() => {
                    // The scorer is unavailable: nothing of this batch is rejected for it. The
                    // pipeline pauses consumption and retries the batch; what was scored so far
                    // is kept in `self.scored`.
                    return Err(HandlerError::Http(format!(
                        "scoring service unavailable: {failure}"
                    )));
                }
                Err(failure) if group.len() > 1 => {
                    // Refused as invalid: isolate the refused transactions by halving.
                    debug!(transactions = group.len(), error = %failure,
                        "scorer refused a group; splitting it");
                    let right = group.split_off(group.len() / 2);
                    groups.push_front(right);
                    groups.push_front(group);
                }
                Err(failure) => {
                    warn!(error = %failure, "the scorer refused a transaction; sending it to the error topic");
                    let reason = Rejection::new(RejectKind::ScoringRejected, failure.to_string());
                    for d in group {
                        self.sticky.insert(d.pos.clone(), reason.clone());
                        rejected.push((d.pos, reason.clone()));
                    }
                }
            }
        }
        // The pipeline expects the items in the order received; halving and cached predictions
        // may have changed it.
        scored.sort_by_key(|d| order.get(&d.pos).copied().unwrap_or(usize::MAX));
        // Counted once the batch commits (prepare may run again for the same batch).
        self.scoring_rejected = rejected.len() as u64;
        Ok(Prepared {
            items: scored,
            rejected,
        })
    }

    async fn write(
        &mut self,
        tx: &mut sqlx::PgConnection,
        items: &[Decoded<FraudItem>],
    ) -> Result<(), HandlerError> {
        self.staged = None;
        let written = store::write_batch(tx, items, self.settings.fraud_threshold).await?;
        self.staged = Some(written);
        Ok(())
    }

    async fn committed(&mut self) -> Result<(), HandlerError> {
        self.sticky.clear();
        self.scored.clear();
        if let Some(w) = self.staged.take() {
            self.metrics.stored.inc_by(w.transactions);
            self.metrics.flagged.inc_by(w.flagged);
            self.metrics.duplicates.inc_by(w.duplicates);
        }
        self.metrics
            .scoring_rejected
            .inc_by(std::mem::take(&mut self.scoring_rejected));
        Ok(())
    }

    fn revoke(&mut self, partitions: &[TopicPartition]) {
        let revoked: HashSet<(&str, i32)> = partitions
            .iter()
            .map(|tp| (&*tp.topic, tp.partition))
            .collect();
        self.sticky
            .retain(|pos, _| !revoked.contains(&(&*pos.topic, pos.partition)));
        self.scored
            .retain(|pos, _| !revoked.contains(&(&*pos.topic, pos.partition)));
    }

    fn reset(&mut self) {
        self.staged = None;
        self.scoring_rejected = 0;
    }
}
