//! What runs beside the pipeline: the time-trigger ticker and the delivery loop, sharing one
//! [`Engine`] with the handler and the info route.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use redis::{ErrorKind, RedisError};
use sqlx::PgPool;
use streamops_crds::v1alpha1::PipelineTriggerSettings;
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::counter::{Counter, CounterError};
use super::deliver::Sink;
use super::runs;
use super::trigger::{trigger_id, Claimed};
use crate::backoff::Backoff;
use crate::handlers::HandlerError;

/// Longest wait between two ticks, so a window reset by another replica is noticed soon.
pub const MAX_TICK: Duration = Duration::from_secs(1);
/// Shortest wait between two ticks.
pub const MIN_TICK: Duration = Duration::from_millis(10);
/// How often the delivery loop looks for pending triggers without being woken.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest delay after a failed Redis or PostgreSQL call of a background loop.
const LOOP_BACKOFF_CAP: Duration = Duration::from_secs(10);

/// First delay after a failed Redis or PostgreSQL call of a background loop.
const LOOP_BACKOFF_BASE: Duration = Duration::from_millis(200);

/// Errors of the Redis and PostgreSQL calls.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Redis.
    #[error(transparent)]
    Counter(#[from] CounterError),
    /// PostgreSQL.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<RedisError> for EngineError {
    fn from(e: RedisError) -> Self {
        Self::Counter(CounterError::Redis(e))
    }
}

impl From<EngineError> for HandlerError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Counter(CounterError::Redis(r)) => HandlerError::Redis(r),
            EngineError::Counter(CounterError::Protocol(p)) => HandlerError::Redis(
                RedisError::from((ErrorKind::TypeError, "unexpected script result", p)),
            ),
            EngineError::Database(d) => HandlerError::Database(d),
        }
    }
}

/// Metrics of the pipeline-trigger handler.
#[derive(Clone)]
pub struct TriggerMetrics {
    /// Events counted for the first time by this worker.
    pub counted: IntCounter,
    /// Events in the current window, as last seen.
    pub window_events: IntGauge,
    /// Triggers claimed by this worker, by reason.
    pub claimed: IntCounterVec,
    /// Finished deliveries, by outcome.
    pub deliveries: IntCounterVec,
    /// Delivery attempts, by result.
    pub attempts: IntCounterVec,
    /// Pending triggers, as last seen.
    pub pending: IntGauge,
}

impl TriggerMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            counted: IntCounter::new(
                "streamops_pipeline_trigger_events_counted_total",
                "Events counted in Redis for the first time by this worker.",
            )?,
            window_events: IntGauge::new(
                "streamops_pipeline_trigger_window_events",
                "Events in the current trigger window, as last seen by this worker.",
            )?,
            claimed: IntCounterVec::new(
                Opts::new(
                    "streamops_pipeline_trigger_claimed_total",
                    "Triggers claimed by this worker, by reason (count or time).",
                ),
                &["reason"],
            )?,
            deliveries: IntCounterVec::new(
                Opts::new(
                    "streamops_pipeline_trigger_deliveries_total",
                    "Triggers this worker finished delivering, by outcome (delivered or failed).",
                ),
                &["outcome"],
            )?,
            attempts: IntCounterVec::new(
                Opts::new(
                    "streamops_pipeline_trigger_delivery_attempts_total",
                    "Delivery attempts, by result (ok, retryable, permanent).",
                ),
                &["result"],
            )?,
            pending: IntGauge::new(
                "streamops_pipeline_trigger_pending",
                "Triggers claimed and not yet delivered, as last seen by this worker.",
            )?,
        };
        registry.register(Box::new(m.counted.clone()))?;
        registry.register(Box::new(m.window_events.clone()))?;
        registry.register(Box::new(m.claimed.clone()))?;
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.attempts.clone()))?;
        registry.register(Box::new(m.pending.clone()))?;
        Ok(m)
    }
}

/// State shared by the handler, the background loops and the info route.
pub struct Engine {
    /// Consumer id.
    pub consumer_id: String,
    /// Settings.
    pub settings: PipelineTriggerSettings,
    /// Redis side.
    pub counter: Arc<Counter>,
    /// PostgreSQL.
    pub pool: PgPool,
    /// Trigger target.
    pub sink: Sink,
    /// Metrics.
    pub metrics: TriggerMetrics,
    /// Wakes the delivery loop.
    pub notify: Notify,
    /// Lease owner token of this worker.
    pub token: String,
    init: OnceCell<()>,
}

impl Engine {
    /// An engine. `token` identifies this worker in delivery leases.
    pub fn new(
        consumer_id: String,
        settings: PipelineTriggerSettings,
        counter: Arc<Counter>,
        pool: PgPool,
        sink: Sink,
        metrics: TriggerMetrics,
        token: String,
    ) -> Self {
        Self {
            consumer_id,
            settings,
            counter,
            pool,
            sink,
            metrics,
            notify: Notify::new(),
            token,
            init: OnceCell::new(),
        }
    }

    /// `maxTimeSeconds` in milliseconds.
    pub fn max_time_ms(&self) -> u64 {
        self.settings.max_time_seconds.saturating_mul(1000)
    }

    /// How long this worker holds a delivery lease without renewing it: longer than one attempt
    /// plus the longest backoff.
    pub fn lease_ttl(&self) -> Duration {
        let attempt = match &self.settings.webhook {
            Some(w) => Duration::from_millis(u64::from(w.timeout_ms)),
            None => Duration::from_secs(30),
        };
        let cap = Duration::from_millis(u64::from(self.sink.backoff().cap_ms));
        attempt + cap + Duration::from_secs(10)
    }

    /// Once per process, before the first claim: makes sure the Redis sequence is above every
    /// trigger recorded in PostgreSQL (so ids are never reused, even if Redis lost its data) and
    /// puts triggers recorded as pending back in Redis's pending set.
    pub async fn ensure_init(&self) -> Result<(), EngineError> {
        self.init
            .get_or_try_init(|| async {
                let floor = runs::max_seq(&self.pool, &self.consumer_id).await?;
                if self.counter.raise_seq(floor).await? {
                    warn!(
                        floor,
                        "Redis trigger sequence was behind PostgreSQL; raised it"
                    );
                }
                for t in runs::pending(&self.pool, &self.consumer_id).await? {
                    if self.counter.restore_pending(&t).await? {
                        warn!(seq = t.seq, "restored a pending trigger missing from Redis");
                    }
                }
                Ok::<(), EngineError>(())
            })
            .await?;
        Ok(())
    }

    /// Accounts for freshly claimed triggers and wakes the delivery loop.
    pub fn claimed(&self, triggers: &[Claimed]) {
        for t in triggers {
            self.metrics
                .claimed
                .with_label_values(&[t.reason.as_str()])
                .inc();
            info!(
                trigger_id = %trigger_id(&self.consumer_id, t.seq),
                reason = t.reason.as_str(),
                events = t.event_count,
                "trigger claimed"
            );
        }
        if !triggers.is_empty() {
            self.notify.notify_one();
        }
    }

    /// One tick: claims a due time trigger. Returns when to tick next.
    pub async fn tick_once(&self) -> Result<Duration, EngineError> {
        self.ensure_init().await?;
        let t = self
            .counter
            .tick(
                self.max_time_ms(),
                self.settings.trigger_on_empty_window,
                &self.settings.pipeline_name,
            )
            .await?;
        if let Some(c) = &t.claimed {
            let mut conn = self.pool.acquire().await?;
            let recorded = runs::record_claimed(
                &mut conn,
                &self.consumer_id,
                self.sink.target(),
                std::slice::from_ref(c),
            )
            .await;
            if let Err(e) = recorded {
                // The delivery loop records it before delivering.
                debug!(error = %e, "cannot record the time trigger yet");
            }
            self.claimed(std::slice::from_ref(c));
        }
        Ok(t.due_in.unwrap_or(MAX_TICK).clamp(MIN_TICK, MAX_TICK))
    }

    /// Claims time triggers until `shutdown`.
    pub async fn run_ticker(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(LOOP_BACKOFF_BASE, LOOP_BACKOFF_CAP);
        loop {
            let wait = match self.tick_once().await {
                Ok(w) => {
                    backoff.reset();
                    w
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(error = %e, failures = backoff.attempts(), "time-trigger tick failed; retrying");
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Delivers pending triggers until `shutdown`.
    pub async fn run_delivery(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(LOOP_BACKOFF_BASE, LOOP_BACKOFF_CAP);
        loop {
            match self.delivery_pass(&shutdown).await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let wait = backoff.next_delay();
                    warn!(error = %e, failures = backoff.attempts(), "trigger delivery pass failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(SCAN_INTERVAL) => {}
            }
        }
    }

    /// Delivers every pending trigger whose lease this worker gets.
    pub async fn delivery_pass(&self, shutdown: &CancellationToken) -> Result<(), EngineError> {
        self.ensure_init().await?;
        let pending = self.counter.pending().await?;
        self.metrics.pending.set(pending.len() as i64);
        let ttl = self.lease_ttl();
        for t in pending {
            if shutdown.is_cancelled() {
                break;
            }
            if !self.counter.acquire_lease(t.seq, &self.token, ttl).await? {
                continue;
            }
            if let Err(e) = self.deliver(&t, shutdown).await {
                let _ = self.counter.release_lease(t.seq, &self.token).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Delivers one trigger whose lease this worker holds: records it, then attempts up to
    /// `1 + maxRetries` times with capped exponential backoff, recording each attempt. Gives up
    /// (status `failed`) after the retries or on a permanent error. On shutdown it releases the
    /// lease and leaves the trigger pending for the next worker.
    ///
    /// The lease, taken just before the call, is checked again before each attempt and before a
    /// failure is made final. A worker that lost it (its lease expired during a long pause and
    /// another worker took the trigger over) records what it saw, a delivery or an attempt's
    /// error, and leaves the outcome to the new owner: it neither marks the trigger failed nor
    /// removes it from the pending set under the new owner. A trigger whose outcome is already
    /// recorded (its previous owner stopped before finishing it in Redis) is finished without
    /// another delivery.
    async fn deliver(&self, t: &Claimed, shutdown: &CancellationToken) -> Result<(), EngineError> {
        let id = trigger_id(&self.consumer_id, t.seq);
        let ttl = self.lease_ttl();
        {
            let mut conn = self.pool.acquire().await?;
            runs::record_claimed(
                &mut conn,
                &self.consumer_id,
                self.sink.target(),
                std::slice::from_ref(t),
            )
            .await?;
        }
        if let Some(status) = runs::settled(&self.pool, &id).await? {
            self.finish(t, &id).await?;
            info!(trigger_id = %id, %status, "trigger already settled; not delivering it again");
            return Ok(());
        }
        let max_retries = self.sink.max_retries();
        let mut attempt: u32 = 0;
        let mut backoff = Backoff::from_spec(&self.sink.backoff());
        loop {
            attempt += 1;
            if !self.counter.renew_lease(t.seq, &self.token, ttl).await? {
                warn!(trigger_id = %id, "lost the delivery lease; another worker takes over");
                return Ok(());
            }
            runs::attempt_started(&self.pool, &id).await?;
            match self.sink.send(&self.consumer_id, t).await {
                Ok(sent) => {
                    self.metrics.attempts.with_label_values(&["ok"]).inc();
                    // Recorded even if the lease was lost meanwhile: the target did get it.
                    runs::delivered(&self.pool, &id, sent.job_name.as_deref()).await?;
                    self.finish(t, &id).await?;
                    self.metrics
                        .deliveries
                        .with_label_values(&["delivered"])
                        .inc();
                    info!(trigger_id = %id, attempt, job = ?sent.job_name, "trigger delivered");
                    return Ok(());
                }
                Err(e) => {
                    let give_up = !e.is_retryable() || attempt > max_retries;
                    self.metrics
                        .attempts
                        .with_label_values(&[if e.is_retryable() {
                            "retryable"
                        } else {
                            "permanent"
                        }])
                        .inc();
                    let owned = self.counter.renew_lease(t.seq, &self.token, ttl).await?;
                    runs::failed(&self.pool, &id, &e.to_string(), give_up && owned).await?;
                    if !owned {
                        warn!(trigger_id = %id, attempt, error = %e, "delivery attempt failed after the lease was lost; another worker takes over");
                        return Ok(());
                    }
                    if give_up {
                        self.finish(t, &id).await?;
                        self.metrics.deliveries.with_label_values(&["failed"]).inc();
                        error!(trigger_id = %id, attempts = attempt, error = %e, "trigger delivery failed; giving up");
                        return Ok(());
                    }
                    let wait = backoff.next_delay();
                    warn!(trigger_id = %id, attempt, error = %e, retry_in_ms = wait.as_millis() as u64, "trigger delivery failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            let _ = self.counter.release_lease(t.seq, &self.token).await;
                            return Ok(());
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Takes a settled trigger out of the pending set, unless another worker holds its lease.
    async fn finish(&self, t: &Claimed, id: &str) -> Result<(), EngineError> {
        if !self.counter.finish(t.seq, &self.token).await? {
            warn!(trigger_id = %id, "another worker holds the delivery lease; it finishes the trigger");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_trigger_delivery_backoff_is_the_webhook_default() {
        let spec = streamops_crds::v1alpha1::default_webhook_backoff();
        let mut b = Backoff::from_spec(&spec);
        for n in 1..40u32 {
            let d = b.next_delay();
            let full = spec.ceiling(n);
            assert!(d >= full / 2 && d <= full, "{n}: {d:?}");
        }
        assert_eq!(spec.ceiling(1), Duration::from_millis(250));
        assert_eq!(spec.ceiling(40), Duration::from_secs(30));
    }
}
