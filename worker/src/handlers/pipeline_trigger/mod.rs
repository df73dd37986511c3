//! The `pipeline-trigger` handler (seed 004): count events in Redis and trigger a pipeline when
//! `maxEvents` events were counted or `maxTimeSeconds` passed since the last trigger, whichever
//! comes first.
//!
//! # Events
//! Any JSON object is an event; anything else (not UTF-8, not JSON, a JSON array or scalar) goes
//! to the error topic with the reason, and so does an object nested deeper than 32 levels or with
//! more than 4096 fields and elements (`too_complex`, see [`storable`](super::storable)). Event
//! contents are not interpreted and never reach PostgreSQL, so a `\u0000` inside an event is
//! harmless and accepted.
//!
//! # Counting
//! Events are counted per consumer (the StreamConsumer, shared by all its replicas) in Redis, by
//! one Lua script per batch (see [`counter`] for the keys). The script counts an event only if
//! its offset is above the last offset counted for its partition, so a batch replayed after a
//! failed transaction, a restart or a rebalance counts nothing twice, and the counts survive
//! worker restarts. Counting happens in `prepare`, before the pipeline's transaction stores the
//! offsets, so a crash can only cause a replay, never a gap. (To recount a topic from scratch,
//! delete `consumer:{C}:offsets` along with resetting the offsets.)
//!
//! # Triggers
//! The same script that counts claims triggers: each time the window reaches `maxEvents` it
//! increments the consumer's trigger sequence and records the trigger (`reason: count`,
//! `event_count: maxEvents`, window start and end, and per partition the offsets of the window's
//! first and last event with their count, and the trace contexts of the window's first traced
//! events, see [`crate::telemetry`]) in the consumer's pending set, then opens a new window;
//! events beyond `maxEvents` carry over. Events join windows in offset order, one by one, so a
//! window boundary can fall inside a batch and consecutive windows never share an offset: a
//! pipeline that reads each partition's `[first_offset, last_offset]` reads exactly its window. A window at least `maxTimeSeconds` old
//! triggers with `reason: time` and the events it holds: a background ticker (every replica runs
//! one, at most one second apart, stopping on shutdown) claims it even when no events arrive, and
//! an event arriving into an overdue window claims it at once. An overdue window with no events
//! triggers only with `triggerOnEmptyWindow`; otherwise it stays open and the next event triggers
//! it. Windows are measured on Redis's clock. Because every claim is one atomic script, each
//! threshold crossing yields exactly one trigger sequence number, however many replicas run and
//! however often they restart.
//!
//! # Delivery
//! A delivery loop on each replica takes pending triggers in order, each under a Redis lease so
//! one replica delivers it, records it in `pipeline_runs` (`pending`), and attempts delivery up to
//! `1 + maxRetries` times (Job: 6) with capped exponential backoff (`webhook.retryBackoff`: 250 ms, factor 2, at most 30 s by default),
//! counting `attempts`; then `delivered` (with `delivered_at`) or `failed` (with `last_error`).
//! A worker that dies mid-delivery leaves the trigger pending; another takes it over when the
//! lease expires. A worker that only paused past its lease (and finds it taken over) records what
//! it saw, a delivery or an attempt's error, but neither fails the trigger nor removes it from the
//! pending set: that is the new holder's to do. A trigger whose outcome is already recorded (its
//! worker died before removing it from the pending set) is finished without being sent again.
//! A trigger that is sent twice keeps its trigger id, so:
//! - webhook: `POST` of `{"trigger_id", "consumer_id", "pipeline_name", "sequence", "reason",
//!   "event_count", "window_start", "window_end", "offsets"}` with header
//!   `Idempotency-Key: <trigger_id>`
//!   (plus the spec's headers); 2xx or 409 is a delivery, 408/429/5xx and transport errors are
//!   retried, other 4xx fail at once;
//! - job: a Job from the template, named `<pipeline>-<hash of consumer>-<seq>`, so a repeated
//!   creation answers `AlreadyExists`, taken as success; the trigger reaches the containers as
//!   `STREAMOPS_TRIGGER_ID`, `STREAMOPS_EVENT_COUNT`, ... environment variables.
//!
//! The trigger id is `<consumer_id>:<seq>`. At start the worker raises the Redis sequence above
//! the highest one in `pipeline_runs` and restores triggers recorded there as pending, so ids are
//! never reused and no claimed trigger is lost, even if Redis loses its data.
//!
//! # Consumer info
//! `GET /consumer/info/{id}` (the consumer id, URL-encoded, or its name; also
//! `/consumer/info/{namespace}/{name}`) answers the thresholds, the counters (events in the
//! window, total, window start, when the time threshold is reached, triggers, pending) and the
//! last trigger with its delivery status.

pub mod counter;
pub mod deliver;
pub mod engine;
pub mod info;
pub mod runs;
pub mod trigger;

use std::sync::Arc;

use streamops_crds::v1alpha1::PipelineTriggerSettings;
use streamops_crds::HandlerKind;

pub use counter::{Counter, Keys};
pub use deliver::{JobSink, Sink, WebhookSink, IDEMPOTENCY_KEY};
pub use engine::{Engine, TriggerMetrics};
pub use trigger::{
    build_job, job_name, trigger_id, Claimed, PartitionRange, Reason, TraceContext, WebhookPayload,
};

use super::json_fields::parse_object;
use super::{
    Decoded, HandlerContext, HandlerError, MessageHandler, Prepared, RawMessage, Rejection,
    TopicPartition,
};

/// A valid event. Its contents are not used; only its position is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event;

/// The pipeline-trigger handler.
pub struct PipelineTriggerHandler {
    engine: Arc<Engine>,
    /// Triggers claimed by `prepare` and not yet recorded by a committed `write`. The claims are
    /// final in Redis, so this survives `reset`.
    claimed: Vec<Claimed>,
}

impl PipelineTriggerHandler {
    /// Builds the handler and starts its ticker and delivery loop (they stop on
    /// `ctx.shutdown`). Needs `ctx.redis_url`.
    pub fn new(
        ctx: &HandlerContext,
        settings: &PipelineTriggerSettings,
    ) -> Result<Self, HandlerError> {
        let sink =
            match (&settings.webhook, &settings.job) {
                (Some(w), None) => Sink::Webhook(WebhookSink::new(w).map_err(HandlerError::Fatal)?),
                (None, Some(j)) => Sink::Job(Box::new(
                    JobSink::new(j, ctx.config.namespace.clone()).map_err(HandlerError::Fatal)?,
                )),
                _ => return Err(HandlerError::Fatal(
                    "exactly one of pipelineTrigger.webhook and pipelineTrigger.job must be set"
                        .into(),
                )),
            };
        Self::with_sink(ctx, settings, sink)
    }

    /// Like [`PipelineTriggerHandler::new`] with a given target (tests use a Job target with a
    /// mock Kubernetes client).
    pub fn with_sink(
        ctx: &HandlerContext,
        settings: &PipelineTriggerSettings,
        sink: Sink,
    ) -> Result<Self, HandlerError> {
        let url = ctx.redis_url.as_deref().ok_or_else(|| {
            HandlerError::Fatal(
                "the pipeline-trigger handler needs Redis: set STREAMOPS_REDIS_URL".into(),
            )
        })?;
        // seed 004's `consumer_id`, when the spec sets one.
        let consumer_id = settings
            .consumer_id
            .clone()
            .unwrap_or_else(|| ctx.config.consumer_id.clone());
        let counter = Counter::new(url, &consumer_id)
            .map_err(|e| HandlerError::Fatal(format!("invalid Redis URL: {e}")))?;
        let metrics = TriggerMetrics::register(&ctx.registry).map_err(|e| {
            HandlerError::Fatal(format!("cannot register pipeline-trigger metrics: {e}"))
        })?;
        let token = format!(
            "{}-{}-{:08x}",
            ctx.instance_id.as_deref().unwrap_or("worker"),
            std::process::id(),
            rand::random::<u32>()
        );
        let engine = Arc::new(Engine::new(
            consumer_id,
            settings.clone(),
            counter,
            ctx.pool.clone(),
            sink,
            metrics,
            token,
        ));
        tokio::spawn(engine.clone().run_ticker(ctx.shutdown.clone()));
        tokio::spawn(engine.clone().run_delivery(ctx.shutdown.clone()));
        Ok(Self {
            engine,
            claimed: Vec::new(),
        })
    }

    /// The shared engine (tests and the info route).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

/// Decodes one event: any JSON object. Pure; the fuzz target `decode_pipeline_event` drives it.
pub fn decode_event(payload: &[u8]) -> Result<Event, Rejection> {
    parse_object(payload).map(|_| Event)
}

impl MessageHandler for PipelineTriggerHandler {
    type Item = Event;

    fn kind(&self) -> HandlerKind {
        HandlerKind::PipelineTrigger
    }

    fn decode(&self, msg: &RawMessage) -> Result<Event, Rejection> {
        decode_event(msg.payload.as_deref().unwrap_or_default())
    }

    async fn prepare(
        &mut self,
        items: Vec<Decoded<Event>>,
    ) -> Result<Prepared<Event>, HandlerError> {
        if !items.is_empty() {
            let e = &self.engine;
            e.ensure_init().await?;
            let counted = e
                .counter
                .count(
                    &items,
                    e.settings.max_events,
                    e.max_time_ms(),
                    &e.settings.pipeline_name,
                    |d| {
                        let (traceparent, tracestate) =
                            crate::telemetry::header_values(&crate::telemetry::trace_of(&d.pos)?)?;
                        Some(TraceContext {
                            traceparent,
                            tracestate,
                        })
                    },
                )
                .await
                .map_err(engine::EngineError::from)?;
            e.metrics.counted.inc_by(counted.new_events);
            e.metrics.window_events.set(counted.window_events as i64);
            e.claimed(&counted.claimed);
            self.claimed.extend(counted.claimed);
        }
        Ok(Prepared {
            items,
            rejected: Vec::new(),
        })
    }

    async fn write(
        &mut self,
        tx: &mut sqlx::PgConnection,
        items: &[Decoded<Event>],
    ) -> Result<(), HandlerError> {
        runs::record_counted(tx, &self.engine.consumer_id, items).await?;
        // The batch's triggers are recorded with its offsets. (The delivery loop records them
        // too before delivering, so none is missed if this transaction fails.)
        runs::record_claimed(
            tx,
            &self.engine.consumer_id,
            self.engine.sink.target(),
            &self.claimed,
        )
        .await?;
        Ok(())
    }

    async fn committed(&mut self) -> Result<(), HandlerError> {
        self.claimed.clear();
        Ok(())
    }

    fn revoke(&mut self, _partitions: &[TopicPartition]) {}

    fn reset(&mut self) {}

    fn routes(&self) -> Option<axum::Router> {
        Some(info::router(self.engine.clone()))
    }
}
