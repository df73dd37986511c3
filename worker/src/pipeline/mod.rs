//! The pipeline: consume, batch, decode, route rejections, and commit each batch's effects and
//! offsets in one PostgreSQL transaction. Generic over [`Handler`], so every handler kind plugs
//! into the same exactly-once machinery.
//!
//! How a message flows:
//! 1. The consumer's rebalance callback ([`context`]) positions each newly assigned partition at
//!    the `next_offset` stored in `streamops_offsets` before fetching starts.
//! 2. The poll loop ([`run_pipeline`]) batches messages (`batch.maxMessages` /
//!    `batch.maxWaitMs`) and hands each batch to the writer task through a bounded channel, so
//!    fetching the next batch overlaps writing the previous one. Rebalance events are applied
//!    before each message: buffered messages of revoked partitions are dropped (their next owner
//!    re-reads them from the stored offsets).
//! 3. The writer ([`writer`]) skips messages below the known `next_offset` (already applied),
//!    decodes the rest, produces rejections to the error topic (acknowledged by all replicas),
//!    then in one transaction moves each partition's offset with a compare-and-set, lets the
//!    handler write its rows and records the rejections. A failed compare-and-set (zombie or
//!    rebalance race) rolls back, reloads the stored offset, resets the handler and retries.
//!    Any other failure rolls back, resets the handler, pauses consumption (the poll loop keeps
//!    polling, so the member stays in the group) and retries with capped backoff.
//! 4. After the commit, the same offsets are committed to Kafka asynchronously, for lag tools.
//!
//! On shutdown the poll loop stops fetching, the writer commits what was already fetched, and the
//! consumer is closed.

pub mod batch;
pub mod context;
pub mod state;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sqlx::PgPool;
use streamops_crds::WorkerConfig;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::errortopic::ErrorSink;
use crate::handlers::{Handler, HandlerError, RawMessage, TopicPartition};
use crate::kafka::{ConsumerSettings, KafkaClientSettings};
use crate::metrics::Metrics;
use batch::{Fetched, Pending};
use context::{PipelineConsumerContext, RebalanceEvent};
pub use state::{Health, Ownership};
pub use writer::WriterTotals;

/// Batches a writer lane may have buffered in the poll loop before fetching stops.
pub const LANE_BUFFER_BATCHES: usize = 3;

/// How often librdkafka reports statistics (lag gauge).
pub const STATISTICS_INTERVAL_MS: u32 = 5_000;

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
    /// The writer task panicked.
    #[error("writer task failed: {0}")]
    Writer(String),
}

/// Runs `handler` over the configured topics until `ctx.shutdown` is cancelled (returns the
/// totals after a clean stop) or a fatal error occurs.
///
/// Must run on a multi-thread tokio runtime: the rebalance callback reads the stored offsets
/// with `block_in_place`.
pub async fn run_pipeline<H: Handler>(
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
pub async fn run_pipeline_lanes<H: Handler>(
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
    let lanes = handlers.len();
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let ownership = Arc::new(Ownership::default());
    let consumer_ctx = PipelineConsumerContext::new(
        config.kafka.group_id.clone(),
        ctx.pool.clone(),
        tokio::runtime::Handle::current(),
        ownership.clone(),
        ctx.health.clone(),
        ctx.metrics.clone(),
        events_tx,
        ctx.shutdown.clone(),
    );
    let client_config = ctx.kafka.consumer(&ConsumerSettings {
        group_id: &config.kafka.group_id,
        instance_id: ctx.instance_id.as_deref(),
        auto_offset_reset: config.kafka.auto_offset_reset.as_str(),
        statistics_interval_ms: STATISTICS_INTERVAL_MS,
        session_timeout_ms: config.kafka.session_timeout_ms,
        max_poll_interval_ms: config.kafka.max_poll_interval_ms,
    });
    let consumer: Arc<StreamConsumer<PipelineConsumerContext>> = Arc::new(
        StreamConsumer::from_config_and_context(&client_config, consumer_ctx)?,
    );
    let topics: Vec<&str> = config.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let errors = Arc::new(ErrorSink::new(
        &ctx.kafka,
        &config.error_topic,
        &config.consumer_id,
        config.max_message_bytes,
    )?);
    tracing::info!(
        handler = %kind,
        topics = ?config.kafka.topics,
        group = %config.kafka.group_id,
        instance_id = ?ctx.instance_id,
        error_topic = %config.error_topic,
        lanes,
        "pipeline started"
    );

    let max_bytes = config.max_message_bytes as usize;
    let (outage_tx, mut outage_rx) = watch::channel(0u64);
    let outage_tx = Arc::new(outage_tx);
    let mut batch_txs = Vec::with_capacity(lanes);
    let mut revoke_txs = Vec::with_capacity(lanes);
    let mut writers = tokio::task::JoinSet::new();
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
                max_message_bytes: max_bytes,
                progress_every: config.progress_every,
                abort: ctx.abort.clone(),
            },
        );
        writers.spawn(writer.run(batch_rx));
        batch_txs.push(batch_tx);
        revoke_txs.push(revoke_tx);
    }
    drop(outage_tx);

    let max_messages = config.batch.max_messages.max(1) as usize;
    let max_wait = Duration::from_millis(u64::from(config.batch.max_wait_ms.max(1)));
    let consumed = ctx.metrics.consumed.with_label_values(&[kind.as_str()]);
    let mut pending: Vec<Pending> = (0..lanes).map(|_| Pending::default()).collect();
    let mut epochs: HashMap<TopicPartition, u64> = HashMap::new();
    let mut paused = false;
    let mut stopping = false;
    let mut last_topic: Option<(Arc<str>, u64)> = None;
    let mut writer_failure: Option<
        Result<Result<WriterTotals, PipelineError>, tokio::task::JoinError>,
    > = None;

    loop {
        apply_rebalance_events(
            &mut events_rx,
            &mut epochs,
            &mut pending,
            &revoke_txs,
            paused,
            &consumer,
        );
        if stopping && pending.iter().all(Pending::is_empty) {
            break;
        }
        let now = Instant::now();
        let due: Vec<usize> = (0..lanes)
            .filter(|&l| {
                !pending[l].is_empty() && (stopping || pending[l].due(max_messages, max_wait, now))
            })
            .collect();
        // Each lane may buffer a few batches: messages arrive in runs per partition, so a lane
        // whose writer is busy must not stop the others from filling (fetching stops only when
        // some lane is this far behind).
        let can_fetch = !stopping
            && (paused
                || pending
                    .iter()
                    .all(|p| p.len() < max_messages.saturating_mul(LANE_BUFFER_BATCHES)));
        let deadline = pending
            .iter()
            .filter_map(|p| p.deadline(max_wait))
            .min()
            .unwrap_or(now + Duration::from_secs(3600));
        let waiting = pending.iter().any(|p| !p.is_empty());
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled(), if !stopping => {
                stopping = true;
                ctx.health.set_stopping();
                let buffered: usize = pending.iter().map(Pending::len).sum();
                tracing::info!(buffered, "shutdown requested: committing what was fetched");
            }
            r = writers.join_next() => {
                // A writer only ends early on a fatal error (or a panic).
                writer_failure = r;
                break;
            }
            changed = outage_rx.changed() => {
                if changed.is_err() { continue; }
                let outage = *outage_rx.borrow_and_update() != 0;
                if outage != paused {
                    match consumer.assignment() {
                        Ok(tpl) => {
                            let r = if outage { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
                            if let Err(e) = r {
                                tracing::warn!(error = %e, outage, "cannot pause or resume consumption");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read the assignment"),
                    }
                    paused = outage;
                    tracing::info!(paused, "consumption {}", if paused { "paused" } else { "resumed" });
                }
            }
            (lane, permit) = reserve_any(&batch_txs, &due), if !due.is_empty() => {
                if let (Ok(permit), Some(b)) = (permit, pending[lane].take(max_messages)) {
                    // Decoding here overlaps the writers' work on earlier batches.
                    let pre = decoder.as_ref().map(|d| {
                        b.messages
                            .iter()
                            .map(|f| writer::precheck(&f.msg, max_bytes).and_then(|()| d(&f.msg)))
                            .collect()
                    });
                    permit.send((b, pre));
                }
                // A closed channel means the writer is gone; `join_next` reports why.
            }
            msg = consumer.recv(), if can_fetch => {
                match msg {
                    Ok(m) => {
                        consumed.inc();
                        if ctx.health.kafka_down() {
                            ctx.health.set_kafka_down(false);
                        }
                        let (topic, topic_hash) = match &last_topic {
                            Some((t, h)) if &**t == m.topic() => (t.clone(), *h),
                            _ => {
                                let t = consumer.context().intern(m.topic());
                                let h = batch::topic_hash(&t);
                                last_topic = Some((t.clone(), h));
                                (t, h)
                            }
                        };
                        let tp = TopicPartition { topic, partition: m.partition() };
                        // A rebalance may have run inside this very `recv`: apply it before
                        // tagging the message with its partition's assignment epoch.
                        apply_rebalance_events(&mut events_rx, &mut epochs, &mut pending, &revoke_txs, paused, &consumer);
                        match epochs.get(&tp) {
                            Some(epoch) => {
                                tracing::debug!(topic = %tp.topic, partition = tp.partition,
                                    offset = m.offset(), "received message");
                                let lane = batch::lane_for(topic_hash, tp.partition, lanes);
                                let raw = RawMessage {
                                    topic: tp.topic,
                                    partition: tp.partition,
                                    offset: m.offset(),
                                    key: m.key().map(<[u8]>::to_vec),
                                    payload: m.payload().map(<[u8]>::to_vec),
                                    timestamp_ms: m.timestamp().to_millis(),
                                };
                                pending[lane].push(Fetched { msg: raw, epoch: *epoch }, now);
                            }
                            None => tracing::debug!(topic = %tp.topic, partition = tp.partition,
                                offset = m.offset(), "message of a partition not owned; dropped"),
                        }
                    }
                    Err(e) => {
                        ctx.metrics.retries.with_label_values(&["kafka_fetch"]).inc();
                        tracing::warn!(error = %e, "kafka consume error");
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()), if waiting && due.is_empty() => {}
        }
    }

    drop(batch_txs);
    let mut result: Result<WriterTotals, PipelineError> = Ok(WriterTotals::default());
    let mut absorb =
        |r: Result<Result<WriterTotals, PipelineError>, tokio::task::JoinError>| match r {
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
        // The other lanes stop too: their channels are closed.
    }
    while let Some(r) = writers.join_next().await {
        absorb(r);
    }

    // Final advisory commit of what PostgreSQL holds, then close (leaves the group, or keeps the
    // static membership until the same instance id returns).
    let mut tpl = TopicPartitionList::new();
    for tp in ownership.partitions() {
        if let Some(Some(next)) = ownership.get(&tp).map(|o| o.next_offset) {
            let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next));
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

/// Applies the rebalance callback's events, in order, to the poll loop's view: epochs of owned
/// partitions, buffered messages of revoked partitions (dropped), the writer (told to drop the
/// handler state of revoked partitions), and the pause state of new partitions.
fn apply_rebalance_events(
    events_rx: &mut mpsc::UnboundedReceiver<RebalanceEvent>,
    epochs: &mut HashMap<TopicPartition, u64>,
    pending: &mut [Pending],
    revoke_txs: &[mpsc::UnboundedSender<Vec<TopicPartition>>],
    paused: bool,
    consumer: &StreamConsumer<PipelineConsumerContext>,
) {
    while let Ok(ev) = events_rx.try_recv() {
        match ev {
            RebalanceEvent::Assigned(parts) => {
                let mut tpl = TopicPartitionList::new();
                for (tp, epoch) in parts {
                    tpl.add_partition(&tp.topic, tp.partition);
                    epochs.insert(tp, epoch);
                }
                if paused && tpl.count() > 0 {
                    if let Err(e) = consumer.pause(&tpl) {
                        tracing::warn!(error = %e, "cannot pause newly assigned partitions");
                    }
                }
            }
            RebalanceEvent::Revoked(parts) => {
                for tp in &parts {
                    epochs.remove(tp);
                }
                let dropped: usize = pending.iter_mut().map(|p| p.drop_partitions(&parts)).sum();
                if dropped > 0 {
                    tracing::info!(dropped, "dropped buffered messages of revoked partitions");
                }
                for tx in revoke_txs {
                    let _ = tx.send(parts.clone());
                }
            }
        }
    }
}
