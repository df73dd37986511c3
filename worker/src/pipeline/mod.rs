//! The pipeline: consume, batch, decode, route rejections, and commit each batch's effects and
//! offsets in one PostgreSQL transaction. Generic over [`MessageHandler`], so every handler kind
//! plugs into the same exactly-once machinery.
//!
//! How a message flows:
//! 1. The consumer's rebalance callback ([`context`]) positions each newly assigned partition at
//!    the `next_offset` stored in `streamops_offsets` before fetching starts.
//! 2. The poll loop (`PollLoop`, started by [`run_pipeline`]) batches messages per writer lane
//!    and hands each batch to the lane's writer task through a bounded channel, so fetching the
//!    next batch overlaps writing the previous one. Batches adapt to the backlog ([`adaptive`]):
//!    a lane's batch goes as soon as its writer is idle (small once caught up) and takes what the
//!    lane buffered, up to `batch.maxMessages`; while the writer is busy, the next batch is
//!    queued once it reaches the lane's size limit, which grows while batches fill it;
//!    `batch.maxWaitMs` bounds how long a message waits for a busy writer's next batch. Rebalance
//!    events are applied before each message: buffered messages of revoked partitions are dropped
//!    (their next owner re-reads them from the stored offsets).
//! 3. The writer ([`writer`]) skips messages below the known `next_offset` (already applied),
//!    decodes the rest, produces rejections to the error topic (acknowledged by all replicas),
//!    then in one transaction moves each partition's offset with a compare-and-set, lets the
//!    handler write its rows and records the rejections. A failed compare-and-set (zombie or
//!    rebalance race) rolls back, reloads the stored offset, resets the handler and retries.
//!    Any other failure rolls back, resets the handler, pauses consumption (the poll loop keeps
//!    polling, so the member stays in the group) and retries with capped backoff.
//! 4. After the commit, the same offsets are committed to Kafka asynchronously, for lag tools.
//!    librdkafka's view of each owned partition's committed offset (statistics, every
//!    [`STATISTICS_INTERVAL_MS`]) is kept in [`Owned::kafka_committed`]. Every
//!    [`COMMIT_CHECK_EVERY`] the poll loop commits again the applied offset of each owned
//!    partition that Kafka has not acknowledged since the previous check: a commit refused or
//!    deferred during a rebalance, or a partition assigned with nothing left to apply, would
//!    otherwise leave the group's committed offset (the operator's lag) behind PostgreSQL for
//!    good once no message arrives.
//!
//! On shutdown the poll loop stops fetching, the writer commits what was already fetched, and the
//! consumer is closed.
//!
//! # Offsets: three views, fenced by epochs
//!
//! A partition's "next offset to apply" exists in three places, which move at different times:
//!
//! - **the row**: `streamops_offsets.next_offset` in PostgreSQL ([`crate::offsets`]). The truth.
//!   It moves only inside a batch's transaction, by a compare-and-set from the value the writer
//!   expects, so it commits with the batch's effects or not at all.
//! - **the ownership's next offset**: [`Ownership`] holds, for each partition this worker owns,
//!   an *epoch* (new on every assignment) and the row's value as this worker last knew it. The
//!   writer's compare-and-set expects this value.
//! - **the Kafka position**: where librdkafka fetches from. It starts at the row and runs ahead of
//!   it by whatever is buffered or in flight. (The offsets committed *to* Kafka are advisory:
//!   they follow the row after each commit, for lag tools, and are never read back. They are
//!   committed only for partitions owned when the commit is sent, at the ownership's next
//!   offset, and sent again until Kafka acknowledges them; see step 4.)
//!
//! ```text
//!                 rebalance callback             poll loop                 writer
//!                 (context.rs)                   (PollLoop)                (writer.rs)
//!  assigned ──►   row ──read──► Ownership{E, next}
//!                 seek Kafka position to next
//!                 event Assigned(tp, E) ──────►  epochs[tp] = E
//!                                                fetched message m ──────► batch of (m, E)
//!                                                tagged with epochs[tp]    keep m only if
//!                                                                          Ownership.epoch == E
//!                                                                          and m.offset >= next
//!                                                                          BEGIN
//!                                                                          CAS row: next → last+1
//!                                                                          handler rows,
//!                                                                          rejections
//!                                                                          COMMIT
//!                                                                          Ownership{E}.next
//!                                                                            = last+1
//!                                                                          advisory Kafka commit
//!  revoked ──►    Ownership forgets tp
//!                 event Revoked(tp) ──────────►  epochs forgets tp,
//!                                                buffered messages dropped ► handler state dropped
//! ```
//!
//! Per partition, as this worker sees it:
//!
//! ```text
//!              assign: new epoch E, next := row
//!  not owned ───────────────────────────────────► in step: owned(E, next == row) ◄──┐
//!    ▲   ▲                                          │   │        │                  │
//!    │   └──────────── revoke, or lost ─────────────┘   │        └── commit under E:┘
//!    │                                                  │            row and next := last+1
//!    │                                                  │ another member (a zombie, or the
//!    │                                                  ▼ partition's new owner) moves the row
//!    └──────────── revoke, or lost ─────────── stale: owned(E, next != row)
//!                                                       │ next batch: CAS conflict, ROLLBACK,
//!                                                       └ reload next := row ──► in step
//! ```
//!
//! The epochs are the fences. A message carries the epoch its partition had when it was fetched;
//! the writer drops it if the partition has been reassigned since (new epoch) or is no longer
//! owned, and the transaction is refused when the plan's epoch is not the ownership's. The
//! ownership's next offset is only updated under the epoch it was read for, so a late update from
//! an earlier assignment changes nothing. The row itself is fenced by the compare-and-set: a
//! member that lost the partition without knowing it (a zombie) expects a value that is no longer
//! stored, and its transaction rolls back. Messages below the ownership's next offset (fetched
//! before a reload moved it forward) are skipped as already applied.
//!
//! Two guards in the writer ([`defence`]): a partition whose first message in a batch is not at
//! the known next offset is checked against the broker's watermarks, and a gap (messages Kafka
//! no longer has) is logged, counted, recorded in `streamops_offset_gaps` in the batch's
//! transaction and reported on the partition's Kafka commit (`spec.kafka.onOffsetGap`: skip or
//! fail; see [`crate::gaps`]). A database error caused by the data (SQLSTATE classes 22, 23, 54)
//! splits the batch until the offending message is alone; it goes to the error topic with reason
//! `database_refused` and the rest commits. Only infrastructure errors are retried.

pub mod adaptive;
pub mod batch;
pub mod context;
pub mod defence;
pub mod fetchability;
pub mod state;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sqlx::PgPool;
use streamops_crds::{HandlerKind, WorkerConfig};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::errortopic::ErrorSink;
use crate::handlers::{HandlerError, MessageHandler, RawMessage, SharedDecoder, TopicPartition};
use crate::kafka::{ConsumerSettings, KafkaClientSettings};
use crate::metrics::Metrics;
use adaptive::AdaptiveBatch;
use batch::{Batch, Fetched, Pending};
use context::{PipelineConsumerContext, RebalanceEvent};
pub use state::{Health, Owned, Ownership, UnfetchablePartition};
pub use writer::WriterTotals;

/// Batches a writer lane may have buffered in the poll loop before fetching stops.
pub const LANE_BUFFER_BATCHES: usize = 3;

/// An owned partition with lag (statistics' high watermark above its fetch position) that
/// fetched nothing for this long, while the poll loop was able to fetch, is stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// How often the poll loop checks that Kafka acknowledged the advisory commit of every owned
/// partition's applied offset; one left unacknowledged for a whole period is committed again.
/// Not shorter than [`STATISTICS_INTERVAL_MS`], which is how often the acknowledgements are seen.
pub const COMMIT_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How often librdkafka reports statistics (lag gauge).
pub const STATISTICS_INTERVAL_MS: u32 = 5_000;

/// Batches handed to each writer lane and not yet finished (committed or given up), and a wake-up
/// for the poll loop whenever a writer finishes one: a lane with nothing in flight is idle, and
/// its next batch goes at once ([`adaptive`]).
pub(crate) struct InFlight {
    counts: Vec<std::sync::atomic::AtomicUsize>,
    finished: tokio::sync::Notify,
}

impl InFlight {
    fn new(lanes: usize) -> Self {
        Self {
            counts: (0..lanes).map(|_| Default::default()).collect(),
            finished: tokio::sync::Notify::new(),
        }
    }

    /// A batch was handed to `lane`'s writer.
    fn handed(&self, lane: usize) {
        self.counts[lane].fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// `lane`'s writer finished a batch.
    pub(crate) fn finished(&self, lane: usize) {
        self.counts[lane].fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.finished.notify_one();
    }

    /// Whether `lane`'s writer has nothing to do.
    fn idle(&self, lane: usize) -> bool {
        self.counts[lane].load(std::sync::atomic::Ordering::Acquire) == 0
    }
}

/// What the pipeline runs with. Build it with the worker's shared pieces (see
/// `crate::worker::WorkerRuntime`) or by hand in tests.
#[derive(Clone)]
pub struct PipelineContext {
    /// The worker configuration (topics, group, batch limits, error topic...).
    pub config: Arc<WorkerConfig>,
    /// Kafka connection (bootstrap override and credentials already applied).
    pub kafka: KafkaClientSettings,
    /// PostgreSQL pool; migrations applied.
    pub pool: PgPool,
    /// `group.instance.id`, if static membership is used.
    pub instance_id: Option<String>,
    /// Metrics.
    pub metrics: Metrics,
    /// Health flags for `/readyz`.
    pub health: Arc<Health>,
    /// The partitions this worker owns (shared with the HTTP server's lag report).
    pub ownership: Arc<Ownership>,
    /// Cancel for a graceful stop: stop fetching, commit what was fetched, leave.
    pub shutdown: CancellationToken,
    /// Cancel to give up retrying the in-flight batch (second signal). Nothing uncommitted is
    /// lost: it is read again from the stored offsets by the next run.
    pub abort: CancellationToken,
}

/// Why the pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Kafka refused the consumer or producer configuration, or the subscription.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The handler failed in a way retrying cannot fix.
    #[error("handler: {0}")]
    Handler(#[from] HandlerError),
    /// Retrying was abandoned on request (second shutdown signal).
    #[error(
        "aborted while retrying the in-flight batch; it will be replayed from the stored offsets"
    )]
    Aborted,
    /// Shutdown was requested while a batch was being retried: the writer gave the batch up (it is
    /// read again from the stored offsets by the partition's next owner) and stopped. Never
    /// returned by the pipeline: the writer turns it into a clean stop.
    #[error(
        "stopped while retrying the in-flight batch; it will be replayed from the stored offsets"
    )]
    StoppedWhileRetrying,
    /// The writer task panicked.
    #[error("writer task failed: {0}")]
    Writer(String),
    /// A gap in a partition's offsets under `onOffsetGap: fail`.
    #[error("offset gap (onOffsetGap: fail): {0}")]
    OffsetGap(String),
}

/// Runs `handler` over the configured topics until `ctx.shutdown` is cancelled (returns the
/// totals after a clean stop) or a fatal error occurs.
///
/// Must run on a multi-thread tokio runtime: the rebalance callback reads the stored offsets
/// with `block_in_place`.
pub async fn run_pipeline<H: MessageHandler>(
    ctx: PipelineContext,
    handler: H,
) -> Result<WriterTotals, PipelineError> {
    run_pipeline_lanes(ctx, vec![handler]).await
}

/// Like [`run_pipeline`], with one writer lane per handler instance. Partitions are spread over
/// the lanes ([`batch::lane_of`]); each lane writes its partitions in its own transactions on
/// its own connection, so PostgreSQL applies the lanes in parallel. Only for handlers whose
/// state is per partition (each instance sees a subset of the partitions). An empty vector is
/// an error.
///
/// The steps: `subscribe` (the consumer and its rebalance callback), the error topic's producer,
/// `spawn_writers` (one writer task per lane), the `PollLoop` until shutdown or a writer's
/// failure, `PollLoop::join_writers`, and `close_consumer`.
pub async fn run_pipeline_lanes<H: MessageHandler>(
    ctx: PipelineContext,
    handlers: Vec<H>,
) -> Result<WriterTotals, PipelineError> {
    let Some(first) = handlers.first() else {
        return Err(PipelineError::Handler(HandlerError::Fatal(
            "run_pipeline_lanes needs at least one handler".into(),
        )));
    };
    let config = ctx.config.clone();
    let kind = first.kind();
    let decoder = first.shared_decoder();
    let ownership = ctx.ownership.clone();
    let (consumer, events) = subscribe(&ctx, &ownership)?;
    let errors = Arc::new(
        ErrorSink::new(
            &ctx.kafka,
            &config.error_topic,
            &config.consumer_id,
            config.max_message_bytes,
        )?
        .with_rebuild_counter(ctx.metrics.producer_rebuilds.clone()),
    );
    tracing::info!(
        handler = %kind,
        topics = ?config.kafka.topics,
        group = %config.kafka.group_id,
        group_protocol = config.kafka.group_protocol.as_str(),
        instance_id = ?ctx.instance_id,
        error_topic = %config.error_topic,
        lanes = handlers.len(),
        "pipeline started"
    );
    let lanes = spawn_writers(&ctx, handlers, &consumer, &ownership, &errors);
    let mut poll = PollLoop::new(&ctx, kind, decoder, consumer.clone(), events, lanes);
    let writer_failure = poll.run().await;
    let result = poll.join_writers(writer_failure).await;
    close_consumer(consumer, &ownership).await;
    match &result {
        Ok(t) => tracing::info!(
            processed = t.processed,
            rejected = t.rejected,
            batches = t.batches,
            "pipeline stopped"
        ),
        Err(e) => tracing::error!(error = %e, "pipeline failed"),
    }
    result
}

/// The pipeline's consumer.
type PipelineConsumer = StreamConsumer<PipelineConsumerContext>;

/// Step 1: the consumer, with the rebalance callback that positions each assigned partition at its
/// stored offset and records it in `ownership`, subscribed to the configured topics. Returns the
/// consumer and the callback's events, in order, for the poll loop.
fn subscribe(
    ctx: &PipelineContext,
    ownership: &Arc<Ownership>,
) -> Result<
    (
        Arc<PipelineConsumer>,
        mpsc::UnboundedReceiver<RebalanceEvent>,
    ),
    PipelineError,
> {
    let config = &ctx.config;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let consumer_ctx = PipelineConsumerContext::new(
        config.kafka.group_id.clone(),
        ctx.pool.clone(),
        tokio::runtime::Handle::current(),
        ownership.clone(),
        ctx.health.clone(),
        ctx.metrics.clone(),
        events_tx,
        ctx.shutdown.clone(),
        context::unstored_start(config.kafka.auto_offset_reset),
    );
    let client_config = ctx.kafka.consumer(&ConsumerSettings {
        group_id: &config.kafka.group_id,
        instance_id: ctx.instance_id.as_deref(),
        auto_offset_reset: config.kafka.auto_offset_reset.as_str(),
        statistics_interval_ms: STATISTICS_INTERVAL_MS,
        group_protocol: config.kafka.group_protocol,
        session_timeout_ms: config.kafka.session_timeout_ms,
        max_poll_interval_ms: config.kafka.max_poll_interval_ms,
    });
    let consumer: Arc<PipelineConsumer> = Arc::new(StreamConsumer::from_config_and_context(
        &client_config,
        consumer_ctx,
    )?);
    let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok((consumer, events_rx))
}

/// What a writer task returns.
type WriterExit = Result<Result<WriterTotals, PipelineError>, tokio::task::JoinError>;

/// The poll loop's ends of the writer lanes.
struct Lanes<T> {
    /// Batches to each lane's writer (room for one queued batch).
    batches: Vec<mpsc::Sender<writer::DecodedBatch<T>>>,
    /// Revoked partitions, to every writer (each drops its handler state of them).
    revocations: Vec<mpsc::UnboundedSender<Vec<TopicPartition>>>,
    /// The writer tasks.
    writers: tokio::task::JoinSet<Result<WriterTotals, PipelineError>>,
    /// One bit per lane in outage backoff; consumption is paused while any is set.
    outage: watch::Receiver<u64>,
    /// Batches in flight per lane.
    in_flight: Arc<InFlight>,
}

/// Step 2: one writer task per handler instance (lane).
fn spawn_writers<H: MessageHandler>(
    ctx: &PipelineContext,
    handlers: Vec<H>,
    consumer: &Arc<PipelineConsumer>,
    ownership: &Arc<Ownership>,
    errors: &Arc<ErrorSink>,
) -> Lanes<H::Item> {
    let config = &ctx.config;
    let (outage_tx, outage_rx) = watch::channel(0u64);
    let outage_tx = Arc::new(outage_tx);
    let mut lanes = Lanes {
        batches: Vec::with_capacity(handlers.len()),
        revocations: Vec::with_capacity(handlers.len()),
        writers: tokio::task::JoinSet::new(),
        outage: outage_rx,
        in_flight: Arc::new(InFlight::new(handlers.len())),
    };
    for (lane, handler) in handlers.into_iter().enumerate() {
        let (batch_tx, batch_rx) = mpsc::channel::<writer::DecodedBatch<H::Item>>(1);
        let (revoke_tx, revoke_rx) = mpsc::unbounded_channel();
        let writer = writer::Writer::new(
            handler,
            writer::WriterParts {
                lane,
                pool: ctx.pool.clone(),
                group: config.kafka.group_id.clone(),
                errors: errors.clone(),
                ownership: ownership.clone(),
                health: ctx.health.clone(),
                metrics: ctx.metrics.clone(),
                consumer: consumer.clone(),
                revocations: revoke_rx,
                outage: outage_tx.clone(),
                max_message_bytes: config.max_message_bytes as usize,
                progress_every: config.progress_every,
                abort: ctx.abort.clone(),
                shutdown: ctx.shutdown.clone(),
                on_offset_gap: config.kafka.on_offset_gap,
                in_flight: lanes.in_flight.clone(),
            },
        );
        lanes.writers.spawn(writer.run(batch_rx));
        lanes.batches.push(batch_tx);
        lanes.revocations.push(revoke_tx);
    }
    lanes
}

/// What the poll loop buffers: messages per lane, tagged with their partition's assignment epoch.
struct Buffers<T> {
    /// Messages received but not yet handed to a lane's writer.
    pending: Vec<Pending>,
    /// The assignment epoch of each owned partition, as the rebalance events told it.
    epochs: HashMap<TopicPartition, u64>,
    /// The adaptive size limit of each lane's batches (`batch.maxMessages` the ceiling).
    sizes: Vec<AdaptiveBatch>,
    /// The handler's shared decoder, if any: batches are decoded before they are handed over.
    decoder: Option<SharedDecoder<T>>,
    max_bytes: usize,
}

/// Step 3: the poll loop. Fetches messages into per-lane buffers, hands due batches to the
/// writers, applies rebalance events, and pauses consumption while a writer is in outage backoff.
struct PollLoop<T> {
    consumer: Arc<PipelineConsumer>,
    events: mpsc::UnboundedReceiver<RebalanceEvent>,
    lanes: Lanes<T>,
    buffers: Buffers<T>,
    health: Arc<Health>,
    metrics: Metrics,
    consumed: prometheus::IntCounter,
    shutdown: CancellationToken,
    /// Consumption is paused (a writer is in outage backoff).
    paused: bool,
    /// Shutdown was requested: fetch nothing more, hand over what was fetched.
    stopping: bool,
    /// The topic of the last message and its hash (most messages come in runs of one topic).
    last_topic: Option<(Arc<str>, u64)>,
    /// When each owned partition last delivered a message (or was assigned).
    last_fetched: HashMap<TopicPartition, Instant>,
    /// The last time the loop could not fetch (full buffers, outage pause, stopping).
    fetch_blocked_at: Instant,
    /// When the stall check runs next.
    next_stall_check: Instant,
    /// When the commit check runs next.
    next_commit_check: Instant,
    /// The owned partitions Kafka had not acknowledged at the last commit check, with the
    /// epoch and applied offset they had then.
    unacknowledged: HashMap<TopicPartition, (u64, i64)>,
}

impl<T> Buffers<T> {
    /// Whether nothing is buffered.
    fn is_empty(&self) -> bool {
        self.pending.iter().all(Pending::is_empty)
    }

    /// Messages buffered in all lanes.
    fn len(&self) -> usize {
        self.pending.iter().map(Pending::len).sum()
    }

    /// The lanes whose batch should be handed over now ([`AdaptiveBatch::due`]): anything
    /// buffered once the lane's writer is idle, a full batch, a batch whose time is up, or
    /// anything at all when `stopping`.
    fn due_lanes(&self, now: Instant, stopping: bool, idle: impl Fn(usize) -> bool) -> Vec<usize> {
        (0..self.pending.len())
            .filter(|&l| {
                let p = &self.pending[l];
                !p.is_empty() && (stopping || self.sizes[l].due(p, idle(l), now))
            })
            .collect()
    }

    /// Each lane may buffer a few batches of its current limit: messages arrive in runs per
    /// partition, so a lane whose writer is busy must not stop the others from filling
    /// (fetching stops only when some lane is this far behind).
    fn has_room(&self) -> bool {
        self.pending
            .iter()
            .zip(&self.sizes)
            .all(|(p, s)| p.len() < s.fetch_budget(LANE_BUFFER_BATCHES))
    }

    /// When the earliest batch being formed is due.
    fn deadline(&self, now: Instant) -> Instant {
        self.pending
            .iter()
            .zip(&self.sizes)
            .filter_map(|(p, s)| p.deadline(s.max_wait()))
            .min()
            .unwrap_or(now + Duration::from_secs(3600))
    }

    /// Takes the next batch of `lane`: everything buffered, up to the ceiling
    /// ([`AdaptiveBatch::batch_len`]); adapts the lane's limit to it.
    fn take(&mut self, lane: usize) -> Option<Batch> {
        let n = self.sizes[lane].batch_len(self.pending[lane].len());
        let batch = self.pending[lane].take(n)?;
        self.sizes[lane].taken(batch.messages.len(), self.pending[lane].len());
        Some(batch)
    }

    /// Decodes `batch` with the shared decoder, if the handler has one: done here, on the poll
    /// task, it overlaps the writers' work on earlier batches.
    fn decode(&self, batch: Batch) -> writer::DecodedBatch<T> {
        let pre = self.decoder.as_ref().map(|d| {
            batch
                .messages
                .iter()
                .map(|f| {
                    crate::telemetry::decode(f.trace.as_deref(), &f.msg, || {
                        writer::precheck(&f.msg, self.max_bytes).and_then(|()| d(&f.msg))
                    })
                })
                .collect()
        });
        (batch, pre)
    }
}

/// What woke the poll loop, for what needs the whole loop to handle it.
enum Woke<'c> {
    Shutdown,
    Outage,
    Message(BorrowedMessage<'c>),
    Nothing,
}

impl<T: Send + Sync + 'static> PollLoop<T> {
    fn new(
        ctx: &PipelineContext,
        kind: HandlerKind,
        decoder: Option<SharedDecoder<T>>,
        consumer: Arc<PipelineConsumer>,
        events: mpsc::UnboundedReceiver<RebalanceEvent>,
        lanes: Lanes<T>,
    ) -> Self {
        let config = &ctx.config;
        let buffers = Buffers {
            pending: (0..lanes.batches.len())
                .map(|_| Pending::default())
                .collect(),
            epochs: HashMap::new(),
            sizes: (0..lanes.batches.len())
                .map(|_| {
                    AdaptiveBatch::new(
                        config.batch.max_messages as usize,
                        Duration::from_millis(u64::from(config.batch.max_wait_ms.max(1))),
                    )
                })
                .collect(),
            decoder,
            max_bytes: config.max_message_bytes as usize,
        };
        Self {
            consumer,
            events,
            lanes,
            buffers,
            health: ctx.health.clone(),
            metrics: ctx.metrics.clone(),
            consumed: ctx.metrics.consumed.with_label_values(&[kind.as_str()]),
            shutdown: ctx.shutdown.clone(),
            paused: false,
            stopping: false,
            last_topic: None,
            last_fetched: HashMap::new(),
            fetch_blocked_at: Instant::now(),
            next_stall_check: Instant::now() + STALL_AFTER,
            next_commit_check: Instant::now() + COMMIT_CHECK_EVERY,
            unacknowledged: HashMap::new(),
        }
    }

    /// Runs until a requested shutdown has handed every fetched message to the writers (`None`),
    /// or until a writer ends early, which it only does on a fatal error or a panic (its exit).
    async fn run(&mut self) -> Option<WriterExit> {
        let consumer = self.consumer.clone();
        loop {
            self.apply_rebalance_events();
            if self.stopping && self.buffers.is_empty() {
                return None;
            }
            let now = Instant::now();
            let in_flight = &self.lanes.in_flight;
            let due = self
                .buffers
                .due_lanes(now, self.stopping, |l| in_flight.idle(l));
            let can_fetch = !self.stopping && (self.paused || self.buffers.has_room());
            if !can_fetch || self.paused {
                self.fetch_blocked_at = now;
            }
            if now >= self.next_stall_check {
                self.next_stall_check = now + STALL_AFTER / 6;
                self.check_stalls(now);
            }
            if now >= self.next_commit_check {
                self.next_commit_check = now + COMMIT_CHECK_EVERY;
                if !self.stopping {
                    self.check_commits();
                }
            }
            // The periodic checks must run while nothing arrives, too.
            let checks = self.next_stall_check.min(self.next_commit_check);
            let deadline = self.buffers.deadline(now);
            let waiting = !self.buffers.is_empty();
            let woke = tokio::select! {
                biased;
                _ = self.shutdown.cancelled(), if !self.stopping => Woke::Shutdown,
                r = self.lanes.writers.join_next() => return r,
                changed = self.lanes.outage.changed() => match changed {
                    Ok(()) => Woke::Outage,
                    Err(_) => Woke::Nothing,
                },
                (lane, permit) = reserve_any(&self.lanes.batches, &due), if !due.is_empty() => {
                    // A closed channel means the writer is gone; `join_next` reports why.
                    if let (Ok(permit), Some(batch)) = (permit, self.buffers.take(lane)) {
                        self.lanes.in_flight.handed(lane);
                        permit.send(self.buffers.decode(batch));
                    }
                    Woke::Nothing
                }
                msg = consumer.recv(), if can_fetch => match msg {
                    Ok(m) => Woke::Message(m),
                    Err(e) => {
                        self.metrics.retries.with_label_values(&["kafka_fetch"]).inc();
                        tracing::warn!(error = %e, "kafka consume error");
                        Woke::Nothing
                    }
                },
                _ = tokio::time::sleep_until(deadline.into()), if waiting && due.is_empty() => {
                    Woke::Nothing
                }
                _ = tokio::time::sleep_until(checks.into()), if !self.stopping => Woke::Nothing,
                // A writer finished a batch: its lane may be idle now.
                _ = self.lanes.in_flight.finished.notified(), if waiting => Woke::Nothing,
            };
            match woke {
                Woke::Shutdown => self.begin_stop(),
                Woke::Outage => self.follow_outage(),
                // `now` was taken before the wait: after an idle wait a message stamped with it
                // would look overdue, and go out as a batch of one.
                Woke::Message(m) => self.accept(&m, Instant::now()),
                Woke::Nothing => {}
            }
        }
    }

    /// Shutdown requested: fetch nothing more, hand over what was fetched.
    fn begin_stop(&mut self) {
        self.stopping = true;
        self.health.set_stopping();
        let buffered = self.buffers.len();
        tracing::info!(buffered, "shutdown requested: committing what was fetched");
    }

    /// Pauses consumption while any writer is in outage backoff, resumes it when none is. The
    /// member keeps polling, so it stays in the group.
    fn follow_outage(&mut self) {
        let outage = *self.lanes.outage.borrow_and_update() != 0;
        if outage == self.paused {
            return;
        }
        match self.consumer.assignment() {
            Ok(tpl) => {
                let r = if outage {
                    self.consumer.pause(&tpl)
                } else {
                    self.consumer.resume(&tpl)
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, outage, "cannot pause or resume consumption");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the assignment"),
        }
        self.paused = outage;
        tracing::info!(
            paused = self.paused,
            "consumption {}",
            if self.paused { "paused" } else { "resumed" }
        );
    }

    /// A fetched message: buffered in its partition's lane, tagged with the partition's
    /// assignment epoch, or dropped if the partition is not owned.
    fn accept(&mut self, m: &BorrowedMessage<'_>, now: Instant) {
        self.consumed.inc();
        if self.health.kafka_down() {
            self.health.set_kafka_down(false);
        }
        let (topic, topic_hash) = match &self.last_topic {
            Some((t, h)) if &**t == m.topic() => (t.clone(), *h),
            _ => {
                let t = self.consumer.context().intern(m.topic());
                let h = batch::topic_hash(&t);
                self.last_topic = Some((t.clone(), h));
                (t, h)
            }
        };
        let tp = TopicPartition {
            topic,
            partition: m.partition(),
        };
        // A rebalance may have run inside this very `recv`: apply it before tagging the message
        // with its partition's assignment epoch.
        self.apply_rebalance_events();
        match self.buffers.epochs.get(&tp) {
            Some(epoch) => {
                tracing::debug!(topic = %tp.topic, partition = tp.partition,
                    offset = m.offset(), "received message");
                let lane = batch::lane_for(topic_hash, tp.partition, self.buffers.pending.len());
                let raw = RawMessage {
                    topic: tp.topic,
                    partition: tp.partition,
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    timestamp_ms: m.timestamp().to_millis(),
                };
                let epoch = *epoch;
                let trace = crate::telemetry::extract(m.headers());
                self.last_fetched.insert(tp_key(&raw), now);
                self.buffers.pending[lane].push(
                    Fetched {
                        msg: raw,
                        epoch,
                        trace,
                    },
                    now,
                );
            }
            None => tracing::debug!(topic = %tp.topic, partition = tp.partition,
                offset = m.offset(), "message of a partition not owned; dropped"),
        }
    }

    /// Applies the rebalance callback's events, in order, to the poll loop's view: epochs of
    /// owned partitions, buffered messages of revoked partitions (dropped), the writers (told to
    /// drop the handler state of revoked partitions), and the pause state of new partitions.
    fn apply_rebalance_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                RebalanceEvent::Assigned(parts) => {
                    let mut tpl = TopicPartitionList::new();
                    for (tp, epoch) in parts {
                        tpl.add_partition(&tp.topic, tp.partition);
                        self.last_fetched.insert(tp.clone(), Instant::now());
                        self.buffers.epochs.insert(tp, epoch);
                    }
                    if self.paused && tpl.count() > 0 {
                        if let Err(e) = self.consumer.pause(&tpl) {
                            tracing::warn!(error = %e, "cannot pause newly assigned partitions");
                        }
                    }
                }
                RebalanceEvent::Revoked(parts) => {
                    for tp in &parts {
                        self.buffers.epochs.remove(tp);
                        self.last_fetched.remove(tp);
                    }
                    let dropped: usize = self
                        .buffers
                        .pending
                        .iter_mut()
                        .map(|p| p.drop_partitions(&parts))
                        .sum();
                    if dropped > 0 {
                        tracing::info!(dropped, "dropped buffered messages of revoked partitions");
                    }
                    for tx in &self.lanes.revocations {
                        let _ = tx.send(parts.clone());
                    }
                }
            }
        }
    }

    /// The stall check: an owned partition whose high watermark (latest statistics) is above its
    /// fetch position, that delivered nothing for [`STALL_AFTER`] while the loop could fetch, is
    /// stalled: librdkafka is not fetching it (seen after cooperative rebalances during which
    /// advisory commits failed with ILLEGAL_GENERATION: the member kept the partition but never
    /// fetched it again). It is logged, counted in `streamops_stalled_partitions`, makes
    /// `/readyz` fail, and its fetcher is restarted: an incremental unassign and assign at the
    /// stored offset (which clears librdkafka's own pause of the partition). The ownership and
    /// its epoch are unchanged: this member still owns the partition in the group.
    fn check_stalls(&mut self, now: Instant) {
        let mut stalled = Vec::new();
        if !self.stopping && !self.paused {
            let positions = self.consumer.position().unwrap_or_default();
            for tp in self.buffers.epochs.keys() {
                let since = self
                    .last_fetched
                    .get(tp)
                    .copied()
                    .unwrap_or(now)
                    .max(self.fetch_blocked_at);
                if now.saturating_duration_since(since) < STALL_AFTER {
                    continue;
                }
                let Some(high) = self.consumer.context().high_watermark(tp) else {
                    continue;
                };
                let next = self
                    .consumer
                    .context()
                    .ownership
                    .get(tp)
                    .and_then(|o| o.next_offset);
                let position = match positions
                    .find_partition(&tp.topic, tp.partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => next,
                };
                if let Some(pos) = position {
                    if high > pos {
                        stalled.push((tp.clone(), pos, high, next));
                    }
                }
            }
        }
        self.metrics.stalled_partitions.set(stalled.len() as i64);
        self.health.set_stalled(!stalled.is_empty());
        for (tp, position, high, next) in stalled {
            tracing::warn!(topic = %tp.topic, partition = tp.partition, position, high_watermark = high,
                stored_next_offset = ?next, idle_s = STALL_AFTER.as_secs(),
                "owned partition with lag fetched nothing: restarting its fetcher");
            self.metrics.stall_restarts.inc();
            let mut out = TopicPartitionList::new();
            out.add_partition(&tp.topic, tp.partition);
            let mut back = TopicPartitionList::new();
            let start = next.map(Offset::Offset).unwrap_or(Offset::Stored);
            if back
                .add_partition_offset(&tp.topic, tp.partition, start)
                .is_err()
            {
                continue;
            }
            match self.consumer.incremental_unassign(&out) {
                Ok(()) => {
                    if let Err(e) = self.consumer.incremental_assign(&back) {
                        tracing::error!(topic = %tp.topic, partition = tp.partition, error = %e,
                            "cannot re-assign the stalled partition");
                    }
                }
                Err(e) => tracing::error!(topic = %tp.topic, partition = tp.partition,
                    error = %e, "cannot restart the stalled partition's fetcher"),
            }
            // Give the restarted fetcher a full window before judging it again.
            self.last_fetched.insert(tp, now);
        }
    }

    /// The commit check: commits again, to Kafka, the applied offset of every owned partition
    /// whose committed offset (librdkafka statistics) has not matched it since the previous check
    /// (same epoch, same offset), with its gap note. A commit refused during a rebalance, or a
    /// partition assigned with nothing left to apply, is thus caught up once the group is
    /// stable, without any new message. Only partitions owned now are committed (a revoked
    /// partition leaves the ownership in the rebalance callback, on this task), and a partition
    /// whose offset is still moving is left to the writer's own commits.
    fn check_commits(&mut self) {
        let ownership = &self.consumer.context().ownership;
        let mut seen = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for (tp, owned) in ownership.unacknowledged() {
            let Some(next) = owned.unacknowledged() else {
                continue;
            };
            if self.unacknowledged.get(&tp) == Some(&(owned.epoch, next)) {
                add_advisory(&mut tpl, &tp, next, owned.gap);
            }
            seen.insert(tp, (owned.epoch, next));
        }
        self.unacknowledged = seen;
        if tpl.count() == 0 {
            return;
        }
        self.metrics.kafka_commit_retries.inc_by(tpl.count() as u64);
        tracing::debug!(
            partitions = tpl.count(),
            "committing unacknowledged applied offsets to Kafka again"
        );
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            self.metrics.kafka_commit_failures.inc();
            tracing::info!(error = %e, "advisory Kafka commit failed (offsets are in PostgreSQL)");
        }
    }

    /// Step 4: closes the lanes and waits for every writer to commit what it was handed; sums
    /// their totals, or returns the first failure (`writer_failure`, a writer that ended early,
    /// comes first; the other lanes stop too, since their channels are closed).
    async fn join_writers(
        self,
        writer_failure: Option<WriterExit>,
    ) -> Result<WriterTotals, PipelineError> {
        let Lanes {
            batches,
            mut writers,
            ..
        } = self.lanes;
        drop(batches);
        let mut result: Result<WriterTotals, PipelineError> = Ok(WriterTotals::default());
        let mut absorb = |r: WriterExit| match r {
            Ok(Ok(t)) => {
                if let Ok(total) = &mut result {
                    total.processed += t.processed;
                    total.rejected += t.rejected;
                    total.batches += t.batches;
                }
            }
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(e) => {
                if result.is_ok() {
                    result = Err(PipelineError::Writer(e.to_string()));
                }
            }
        };
        if let Some(r) = writer_failure {
            absorb(r);
        }
        while let Some(r) = writers.join_next().await {
            absorb(r);
        }
        result
    }
}

/// Step 5: the final advisory commit of what PostgreSQL holds, then the consumer is closed (it
/// leaves the group, or keeps the static membership until the same instance id returns). Closing
/// blocks, so it runs on a blocking thread; `consumer` must be the last reference.
async fn close_consumer(consumer: Arc<PipelineConsumer>, ownership: &Ownership) {
    let mut tpl = TopicPartitionList::new();
    for tp in ownership.partitions() {
        if let Some(o) = ownership.get(&tp) {
            if let Some(next) = o.next_offset {
                add_advisory(&mut tpl, &tp, next, o.gap);
            }
        }
    }
    let closing = tokio::task::spawn_blocking(move || {
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::debug!(error = %e, "final advisory Kafka commit failed");
            }
        }
        drop(consumer);
    });
    if let Err(e) = closing.await {
        tracing::warn!(error = %e, "closing the consumer failed");
    }
}

/// Adds `tp` at `next` to an advisory commit; the partition's latest gap note rides on it as the
/// offset's metadata, for the operator.
fn add_advisory(
    tpl: &mut TopicPartitionList,
    tp: &TopicPartition,
    next: i64,
    gap: Option<streamops_crds::gap::GapNote>,
) {
    if tpl
        .add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next))
        .is_err()
    {
        return;
    }
    if let (Some(note), Some(mut e)) = (gap, tpl.find_partition(&tp.topic, tp.partition)) {
        e.set_metadata(note.to_string());
    }
}

/// The partition of a fetched message.
fn tp_key(m: &RawMessage) -> TopicPartition {
    TopicPartition {
        topic: m.topic.clone(),
        partition: m.partition,
    }
}

/// Waits for room in the channel of any lane in `due`; returns the lane and its permit.
async fn reserve_any<'a, T>(
    txs: &'a [mpsc::Sender<T>],
    due: &[usize],
) -> (
    usize,
    Result<mpsc::Permit<'a, T>, mpsc::error::SendError<()>>,
) {
    let futures = due
        .iter()
        .map(|&lane| Box::pin(async move { (lane, txs[lane].reserve().await) }));
    futures::future::select_all(futures).await.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_is_idle_only_once_its_writer_finished_every_batch_handed_to_it() {
        let f = InFlight::new(2);
        assert!(f.idle(0) && f.idle(1));
        f.handed(0);
        f.handed(0);
        assert!(!f.idle(0));
        assert!(f.idle(1), "lanes are counted apart");
        f.finished(0);
        assert!(!f.idle(0), "one batch is still queued");
        f.finished(0);
        assert!(f.idle(0));
    }

    #[test]
    fn a_finished_batch_wakes_the_poll_loop_even_when_it_was_not_waiting_yet() {
        let f = InFlight::new(1);
        f.handed(0);
        f.finished(0);
        // The wake-up is kept until the loop waits for it: the wait ends at once.
        assert!(futures::FutureExt::now_or_never(f.finished.notified()).is_some());
        // And it is used up.
        assert!(futures::FutureExt::now_or_never(f.finished.notified()).is_none());
    }
}
