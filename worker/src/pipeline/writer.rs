//! The writer task: decodes a batch, routes rejections to the error topic, and commits the
//! handler's rows, the rejections and the new offsets in one PostgreSQL transaction. It runs
//! beside the poll loop, so fetching the next batch overlaps writing this one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batch::{applicable_mask, plan_offsets, retain_by_mask, Batch, Fetched, PartitionPlan};
use super::context::PipelineConsumerContext;
use super::defence::{self, KnownResets};
use super::state::{Health, Ownership};
use super::PipelineError;
use crate::backoff::Backoff;
use crate::errortopic::{ErrorRecord, ErrorSink};
use crate::gaps::{self, Gap};
use crate::handlers::{
    Decoded, HandlerError, MessageHandler, Position, RawMessage, RejectKind, Rejection,
    TopicPartition,
};
use crate::metrics::Metrics;
use crate::offsets::{self, Cas};

/// Everything the writer needs apart from the handler.
pub(crate) struct WriterParts {
    pub lane: usize,
    pub pool: PgPool,
    pub group: String,
    pub errors: Arc<ErrorSink>,
    pub ownership: Arc<Ownership>,
    pub health: Arc<Health>,
    pub metrics: Metrics,
    pub consumer: Arc<StreamConsumer<PipelineConsumerContext>>,
    pub revocations: mpsc::UnboundedReceiver<Vec<TopicPartition>>,
    /// One bit per lane in outage backoff.
    pub outage: Arc<watch::Sender<u64>>,
    pub max_message_bytes: usize,
    pub progress_every: u64,
    pub abort: CancellationToken,
    /// The graceful stop (first signal): a batch being retried is given up, so a worker whose
    /// batch keeps failing still leaves the group when asked to stop.
    pub shutdown: CancellationToken,
    pub on_offset_gap: streamops_crds::v1alpha1::OnOffsetGap,
    /// Batches handed to each lane and not yet finished; the writer reports each one it finishes.
    pub in_flight: Arc<super::InFlight>,
}

/// Totals of a writer's run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterTotals {
    /// Messages whose effect was committed.
    pub processed: u64,
    /// Messages routed to the error topic.
    pub rejected: u64,
    /// Batches committed.
    pub batches: u64,
}

enum Outcome {
    Committed,
    Conflict(Vec<TopicPartition>),
}

enum Failure {
    Retry(&'static str, String),
    /// The database refused the batch's data (see [`defence::data_error`]): split, do not retry.
    Data(String),
    Fatal(PipelineError),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        match defence::data_error(&e) {
            Some(reason) => Failure::Data(reason),
            None => Failure::Retry("database", e.to_string()),
        }
    }
}

impl From<HandlerError> for Failure {
    fn from(e: HandlerError) -> Self {
        if let Some(reason) = defence::handler_data_error(&e) {
            Failure::Data(reason)
        } else if e.is_retryable() {
            Failure::Retry(e.kind(), e.to_string())
        } else {
            Failure::Fatal(PipelineError::Handler(e))
        }
    }
}

/// Checks that the pipeline (not the handler) rejects: empty and oversized values.
pub(crate) fn precheck(msg: &RawMessage, max_bytes: usize) -> Result<(), Rejection> {
    match msg.payload.as_deref() {
        None | Some([]) => Err(Rejection::new(
            RejectKind::EmptyPayload,
            "message has no value",
        )),
        Some(p) if p.len() > max_bytes => Err(Rejection::new(
            RejectKind::TooLarge,
            format!("value is {} bytes; the limit is {max_bytes}", p.len()),
        )),
        Some(_) => Ok(()),
    }
}

type ErrKey = (Arc<str>, i32, i64);

/// Rejected messages, by index into the batch's messages, with the reason.
type Rejected = Vec<(usize, Rejection)>;

/// A batch with its messages already decoded, when the handler offers a shared decoder.
pub(crate) type DecodedBatch<T> = (Batch, Option<Vec<Result<T, Rejection>>>);

pub(crate) struct Writer<H: MessageHandler> {
    handler: H,
    p: WriterParts,
    totals: WriterTotals,
    next_progress: u64,
    processed_counter: prometheus::IntCounter,
    label: &'static str,
    known_resets: KnownResets,
    /// Gaps already logged and counted (a gap is seen again when its batch is retried or split).
    reported_gaps: Vec<Gap>,
}

impl<H: MessageHandler> Writer<H> {
    pub(crate) fn new(handler: H, p: WriterParts) -> Self {
        let label = handler.kind().as_str();
        let processed_counter = p.metrics.processed.with_label_values(&[label]);
        let next_progress = p.progress_every.max(1);
        Self {
            handler,
            p,
            totals: WriterTotals::default(),
            next_progress,
            processed_counter,
            label,
            known_resets: KnownResets::new(),
            reported_gaps: Vec::new(),
        }
    }

    /// Processes batches until the channel closes.
    pub(crate) async fn run(
        mut self,
        mut batches: mpsc::Receiver<DecodedBatch<H::Item>>,
    ) -> Result<WriterTotals, PipelineError> {
        while let Some((batch, pre)) = batches.recv().await {
            let result = self.process(batch, pre).await;
            self.p.in_flight.finished(self.p.lane);
            match result {
                Ok(()) => {}
                Err(PipelineError::StoppedWhileRetrying) => {
                    self.set_outage(false);
                    tracing::warn!(
                        "shutdown while retrying a batch: it is left uncommitted and will be read \
                         again from the stored offsets; stopping"
                    );
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        self.drain_revocations();
        Ok(self.totals)
    }

    fn drain_revocations(&mut self) {
        while let Ok(parts) = self.p.revocations.try_recv() {
            self.handler.revoke(&parts);
        }
    }

    fn set_outage(&self, on: bool) {
        let bit = 1u64 << (self.p.lane % 64);
        let mut was_any = false;
        let mut now_any = false;
        self.p.outage.send_if_modified(|mask| {
            was_any = *mask != 0;
            let new = if on { *mask | bit } else { *mask & !bit };
            let changed = new != *mask;
            *mask = new;
            now_any = new != 0;
            changed
        });
        if was_any != now_any {
            self.p.health.set_outage(now_any);
            self.p.metrics.in_outage.set(i64::from(now_any));
            if now_any {
                self.p.metrics.outages.inc();
            }
        }
    }

    async fn process(
        &mut self,
        batch: Batch,
        pre: Option<Vec<Result<H::Item, Rejection>>>,
    ) -> Result<(), PipelineError> {
        let started = batch.started;
        let mut delivered: HashSet<ErrKey> = HashSet::new();
        // Messages the database refused, found by splitting (second line of defence).
        let mut refused: HashMap<ErrKey, Rejection> = HashMap::new();
        // Parts of the batch still to commit, in order (last = next): a data error splits one.
        let mut parts = vec![(batch.messages, pre)];
        while let Some((messages, pre)) = parts.pop() {
            if let Some(second) = self
                .process_part(messages, pre, &mut delivered, &mut refused, started)
                .await?
            {
                parts.push(second);
            }
        }
        Ok(())
    }

    /// Commits one part of a batch, retrying infrastructure errors. On a data error it commits
    /// the first half itself and returns the second to be processed next; a single message the
    /// database refuses is rejected with the database's reason.
    #[allow(clippy::type_complexity)]
    async fn process_part(
        &mut self,
        mut messages: Vec<Fetched>,
        mut pre: Option<Vec<Result<H::Item, Rejection>>>,
        delivered: &mut HashSet<ErrKey>,
        refused: &mut HashMap<ErrKey, Rejection>,
        started: Instant,
    ) -> Result<Option<(Vec<Fetched>, Option<Vec<Result<H::Item, Rejection>>>)>, PipelineError>
    {
        let mut backoff = Backoff::default_worker();
        let mut second = None;
        let mut gaps: Vec<Gap> = Vec::new();
        loop {
            self.drain_revocations();
            match defence::detect_gaps(
                &self.p.consumer,
                &self.p.ownership,
                &messages,
                self.p.on_offset_gap,
                &self.known_resets,
            )
            .await
            {
                Ok(found) => {
                    for g in found {
                        if !gaps.contains(&g) {
                            self.gap_found(&g).await?;
                            gaps.push(g);
                        }
                    }
                }
                Err(e) => {
                    self.retry_wait(&mut backoff, "watermarks", &e).await?;
                    continue;
                }
            }
            let ownership = &self.p.ownership;
            let mask = applicable_mask(&messages, |tp| {
                ownership.get(tp).map(|o| (o.epoch, o.next_offset))
            });
            if mask.iter().any(|k| !k) {
                retain_by_mask(&mut messages, &mask);
                if let Some(p) = pre.as_mut() {
                    retain_by_mask(p, &mask);
                }
            }
            if messages.is_empty() {
                if gaps.is_empty() {
                    return Ok(second);
                }
                // Nothing to apply (a reset gap drops messages below the stored offset): the
                // gap still gets its transaction.
                match self.record_gaps_alone(&gaps).await {
                    Ok(()) => return Ok(second),
                    Err(e) => {
                        self.retry_wait(&mut backoff, "database", &e.to_string())
                            .await?;
                        continue;
                    }
                }
            }
            // Pre-decoded items serve the first attempt only (`prepare` consumes them).
            match self
                .attempt(&messages, pre.take(), delivered, refused, &gaps, started)
                .await
            {
                Ok(Outcome::Committed) => {
                    if backoff.attempts() > 0 {
                        tracing::info!(attempts = backoff.attempts(), "recovered; batch committed");
                    }
                    self.set_outage(false);
                    return Ok(second);
                }
                Ok(Outcome::Conflict(parts)) => {
                    self.p.metrics.fencing_conflicts.inc();
                    self.handler.reset();
                    if let Err(e) = self.reload(&parts).await {
                        self.retry_wait(&mut backoff, "offsets_read", &e.to_string())
                            .await?;
                    }
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(op, detail)) => {
                    self.handler.reset();
                    self.retry_wait(&mut backoff, op, &detail).await?;
                }
                Err(Failure::Data(reason)) => {
                    self.handler.reset();
                    self.p
                        .metrics
                        .retries
                        .with_label_values(&["database_refused"])
                        .inc();
                    if messages.len() > 1 {
                        // Split: this half now, the other after it (offset order is kept).
                        let tail = messages.split_off(messages.len() / 2);
                        tracing::info!(
                            first = messages.len(),
                            second = tail.len(),
                            reason = %reason,
                            "the database refused the batch's data; splitting it to isolate the message"
                        );
                        let later = match second.take() {
                            // An earlier split left a part to do after this one: it comes after.
                            Some(rest) => {
                                let (mut rest_msgs, _): (Vec<Fetched>, _) = rest;
                                let mut t = tail;
                                t.append(&mut rest_msgs);
                                t
                            }
                            None => tail,
                        };
                        second = Some((later, None));
                        pre = None;
                        continue;
                    }
                    let m = &messages[0].msg;
                    let key = (m.topic.clone(), m.partition, m.offset);
                    if refused.contains_key(&key) {
                        // Rejected already and still refused: not this message's data.
                        self.retry_wait(&mut backoff, "database", &reason).await?;
                        continue;
                    }
                    tracing::warn!(topic = %m.topic, partition = m.partition, offset = m.offset,
                        reason = %reason, "the database refused this message; sending it to the error topic");
                    refused.insert(key, Rejection::new(RejectKind::DatabaseRefused, reason));
                }
            }
        }
    }

    /// Logs and counts a gap once per detection; under `onOffsetGap: fail` records it, reports it
    /// on the partition's Kafka commit and stops the worker.
    async fn gap_found(&mut self, gap: &Gap) -> Result<(), PipelineError> {
        let Some(owned) = self.p.ownership.get(&gap.tp) else {
            return Ok(());
        };
        if self.reported_gaps.contains(gap) {
            return Ok(());
        }
        if self.reported_gaps.len() >= 64 {
            self.reported_gaps.remove(0);
        }
        self.reported_gaps.push(gap.clone());
        self.p
            .metrics
            .offset_gaps
            .with_label_values(&[&gap.tp.topic, gap.kind.as_str()])
            .inc();
        tracing::warn!(topic = %gap.tp.topic, partition = gap.tp.partition,
            kind = gap.kind.as_str(), from = gap.from, to = gap.to,
            action = gap.action.as_str(), "offset gap: {}", gap.describe());
        let now = chrono::Utc::now().timestamp();
        if gap.kind == streamops_crds::gap::GapKind::Reset {
            if let Some(next) = owned.next_offset {
                self.known_resets
                    .insert(gap.tp.clone(), (owned.epoch, next));
            }
        }
        if gap.action == streamops_crds::v1alpha1::OnOffsetGap::Fail {
            let mut backoff = Backoff::default_worker();
            while let Err(e) = self.record_gaps_alone(std::slice::from_ref(gap)).await {
                self.retry_wait(&mut backoff, "database", &e.to_string())
                    .await?;
            }
            self.p
                .ownership
                .set_gap(&gap.tp, owned.epoch, gap.note(now));
            if let Some(next) = owned.next_offset {
                let mut tpl = TopicPartitionList::new();
                if tpl
                    .add_partition_offset(&gap.tp.topic, gap.tp.partition, Offset::Offset(next))
                    .is_ok()
                {
                    if let Some(mut e) = tpl.find_partition(&gap.tp.topic, gap.tp.partition) {
                        e.set_metadata(gap.note(now).to_string());
                    }
                    let consumer = self.p.consumer.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        consumer.commit(&tpl, CommitMode::Sync)
                    })
                    .await;
                }
            }
            return Err(PipelineError::OffsetGap(gap.describe()));
        }
        Ok(())
    }

    /// Records gaps in a transaction of their own and reports them on the next commits.
    async fn record_gaps_alone(&mut self, found: &[Gap]) -> Result<(), sqlx::Error> {
        let mut tx = self.p.pool.begin().await?;
        for g in found {
            gaps::record(&mut tx, &self.p.group, g).await?;
        }
        tx.commit().await?;
        self.gaps_committed(found);
        Ok(())
    }

    /// After the transaction recording `found` committed: the gaps ride on the commits.
    fn gaps_committed(&self, found: &[Gap]) {
        let now = chrono::Utc::now().timestamp();
        for g in found {
            if let Some(o) = self.p.ownership.get(&g.tp) {
                self.p.ownership.set_gap(&g.tp, o.epoch, g.note(now));
            }
        }
        let mut tpl = TopicPartitionList::new();
        for g in found {
            if let Some(Some(next)) = self.p.ownership.get(&g.tp).map(|o| o.next_offset) {
                let _ = tpl.add_partition_offset(&g.tp.topic, g.tp.partition, Offset::Offset(next));
                if let Some(mut e) = tpl.find_partition(&g.tp.topic, g.tp.partition) {
                    e.set_metadata(g.note(now).to_string());
                }
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = self.p.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "advisory Kafka commit of a gap failed");
            }
        }
    }

    async fn retry_wait(
        &mut self,
        backoff: &mut Backoff,
        op: &'static str,
        detail: &str,
    ) -> Result<(), PipelineError> {
        if self.p.shutdown.is_cancelled() {
            tracing::warn!(
                operation = op,
                error = detail,
                "batch failed during shutdown; not retrying"
            );
            return Err(PipelineError::StoppedWhileRetrying);
        }
        self.set_outage(true);
        self.p.metrics.retries.with_label_values(&[op]).inc();
        let delay = backoff.next_delay();
        tracing::warn!(
            operation = op,
            error = detail,
            attempt = backoff.attempts(),
            retry_in_ms = delay.as_millis() as u64,
            "batch failed; consumption paused, retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.p.abort.cancelled() => Err(PipelineError::Aborted),
            _ = self.p.shutdown.cancelled() => Err(PipelineError::StoppedWhileRetrying),
        }
    }

    /// Reloads the stored offsets of partitions whose compare-and-set failed.
    async fn reload(&mut self, parts: &[TopicPartition]) -> Result<(), sqlx::Error> {
        let mut conn = self.p.pool.acquire().await?;
        let stored = offsets::load(&mut conn, &self.p.group, parts).await?;
        for tp in parts {
            if let (Some(o), Some(next)) = (self.p.ownership.get(tp), stored.get(tp)) {
                tracing::warn!(topic = %tp.topic, partition = tp.partition,
                    known = ?o.next_offset, stored = next,
                    "offset conflict: the partition was written by another member; resuming from the stored offset");
                self.p.ownership.set_next_offset(tp, o.epoch, *next);
            }
        }
        Ok(())
    }

    /// One attempt at a batch, in four steps: [decode](Self::decode),
    /// [prepare](Self::prepare), [error topic](deliver_rejections) and
    /// [transaction](Self::transaction); then, once committed, [`Self::after_commit`]. Each step
    /// works on the messages it is given, so a step can be run again on part of a batch.
    async fn attempt(
        &mut self,
        messages: &[Fetched],
        pre: Option<Vec<Result<H::Item, Rejection>>>,
        delivered: &mut HashSet<ErrKey>,
        refused: &HashMap<ErrKey, Rejection>,
        gaps_found: &[Gap],
        started: Instant,
    ) -> Result<Outcome, Failure> {
        let (items, mut rejected) = self.decode(messages, pre, refused);
        let items = self.prepare(messages, items, &mut rejected).await?;
        let (errors, max) = (&self.p.errors, self.p.max_message_bytes);
        deliver_rejections(errors, max, messages, &rejected, delivered).await?;
        let plan = plan_offsets(messages);
        let span = crate::telemetry::batch_span(
            crate::telemetry::BatchOp::DbWrite,
            messages.len(),
            messages.iter().filter_map(|f| f.trace.as_deref()),
        );
        let outcome = self
            .transaction(messages, &plan, &items, &rejected, gaps_found)
            .instrument(span.clone())
            .await
            .inspect_err(|_| crate::telemetry::record_failure(&span, "transaction_failed"))?;
        if let Outcome::Committed = outcome {
            self.after_commit(
                &plan,
                messages.len(),
                items.len(),
                &rejected,
                gaps_found,
                started,
            )
            .await;
        }
        Ok(outcome)
    }

    /// Step 1, decode: the pipeline's checks, then the handler's `decode`. Pure, and done again on
    /// every attempt, since `prepare` consumes the items; the poll loop's pre-decoded results
    /// (`pre`) serve when they cover exactly these messages. Returns the items and the rejections
    /// (by index into `messages`). Messages the database refused earlier (`refused`) are
    /// rejected with the database's reason.
    fn decode(
        &self,
        messages: &[Fetched],
        pre: Option<Vec<Result<H::Item, Rejection>>>,
        refused: &HashMap<ErrKey, Rejection>,
    ) -> (Vec<Decoded<H::Item>>, Rejected) {
        let max = self.p.max_message_bytes;
        let mut items: Vec<Decoded<H::Item>> = Vec::with_capacity(messages.len());
        let mut rejected: Rejected = Vec::new();
        let mut pre = pre
            .filter(|p| p.len() == messages.len())
            .map(Vec::into_iter);
        for (i, f) in messages.iter().enumerate() {
            let m = &f.msg;
            let decoded = match pre.as_mut().and_then(Iterator::next) {
                Some(r) => r,
                None => crate::telemetry::decode(f.trace.as_deref(), m, || {
                    precheck(m, max).and_then(|()| self.handler.decode(m))
                }),
            };
            let decoded = match refused.get(&(m.topic.clone(), m.partition, m.offset)) {
                Some(r) => Err(r.clone()),
                None => decoded,
            };
            match decoded {
                Ok(item) => items.push(Decoded {
                    pos: Position {
                        topic: m.topic.clone(),
                        partition: m.partition,
                        offset: m.offset,
                    },
                    timestamp_ms: m.timestamp_ms,
                    item,
                }),
                Err(r) => rejected.push((i, r)),
            }
        }
        (items, rejected)
    }

    /// Step 2, prepare: the handler's remote preparation (outside any transaction), which may
    /// reject more items; those are added to `rejected`. A rejection of a message that is not in
    /// `messages` is a handler bug, and fatal.
    async fn prepare(
        &mut self,
        messages: &[Fetched],
        items: Vec<Decoded<H::Item>>,
        rejected: &mut Rejected,
    ) -> Result<Vec<Decoded<H::Item>>, Failure> {
        let traces = crate::telemetry::BatchTraces::collect(
            messages.iter().map(|f| (&f.msg, f.trace.as_deref())),
        );
        let prepared =
            crate::telemetry::with_batch_traces(traces, self.handler.prepare(items)).await?;
        if !prepared.rejected.is_empty() {
            let index: HashMap<(&str, i32, i64), usize> = messages
                .iter()
                .enumerate()
                .map(|(i, f)| ((&*f.msg.topic, f.msg.partition, f.msg.offset), i))
                .collect();
            for (pos, r) in prepared.rejected {
                match index.get(&(&*pos.topic, pos.partition, pos.offset)) {
                    Some(i) => rejected.push((*i, r)),
                    None => {
                        return Err(Failure::Fatal(PipelineError::Handler(HandlerError::Fatal(
                            format!(
                                "prepare rejected {}:{}@{}, which is not in the batch",
                                pos.topic, pos.partition, pos.offset
                            ),
                        ))))
                    }
                }
            }
        }
        Ok(prepared.items)
    }

    /// Step 4, transaction: in one PostgreSQL transaction, moves each partition of `plan` from
    /// the offset this worker knows (its [`Ownership`]) to the plan's next offset with a
    /// compare-and-set, lets the handler write `items`, and records `rejected` (indices into
    /// `messages`). A partition no longer owned under the plan's epoch, or whose stored offset
    /// moved, rolls everything back: [`Outcome::Conflict`]. Nothing in memory changes here, so the
    /// step can be retried, on the whole batch or on part of it.
    async fn transaction(
        &mut self,
        messages: &[Fetched],
        plan: &BTreeMap<TopicPartition, PartitionPlan>,
        items: &[Decoded<H::Item>],
        rejected: &[(usize, Rejection)],
        gaps_found: &[Gap],
    ) -> Result<Outcome, Failure> {
        let t0 = Instant::now();
        let mut tx = self.p.pool.begin().await?;
        let mut conflicts = Vec::new();
        for (tp, p) in plan {
            let expected = match self.p.ownership.get(tp) {
                Some(o) if o.epoch == p.epoch => o.next_offset,
                _ => {
                    conflicts.push(tp.clone());
                    continue;
                }
            };
            if offsets::compare_and_set(&mut tx, &self.p.group, tp, expected, p.next_offset).await?
                == Cas::Conflict
            {
                conflicts.push(tp.clone());
            }
        }
        if !conflicts.is_empty() {
            tx.rollback().await?;
            return Ok(Outcome::Conflict(conflicts));
        }
        self.handler.write(&mut tx, items).await?;
        for g in gaps_found {
            gaps::record(&mut tx, &self.p.group, g).await?;
        }
        if !rejected.is_empty() {
            insert_rejections(
                &mut tx,
                &self.p.group,
                self.p.errors.topic(),
                messages,
                rejected,
            )
            .await?;
        }
        tx.commit().await?;
        self.p
            .metrics
            .db_write_duration
            .observe(t0.elapsed().as_secs_f64());
        Ok(Outcome::Committed)
    }

    /// After the commit: advances the known offsets, runs the handler's post-commit hook, counts,
    /// and tells Kafka (advisory).
    async fn after_commit(
        &mut self,
        plan: &BTreeMap<TopicPartition, PartitionPlan>,
        batch_len: usize,
        processed: usize,
        rejected: &[(usize, Rejection)],
        gaps_found: &[Gap],
        started: Instant,
    ) {
        for (tp, p) in plan {
            self.p.ownership.set_next_offset(tp, p.epoch, p.next_offset);
        }
        let now = chrono::Utc::now().timestamp();
        for g in gaps_found {
            if let Some(o) = self.p.ownership.get(&g.tp) {
                self.p.ownership.set_gap(&g.tp, o.epoch, g.note(now));
            }
        }
        if let Err(e) = self.handler.committed().await {
            tracing::warn!(error = %e, "handler post-commit hook failed; resetting its state");
            self.handler.reset();
        }
        self.account(batch_len, processed, rejected, started);
        self.advisory_commit(plan);
    }

    fn account(
        &mut self,
        batch_len: usize,
        processed: usize,
        rejected: &[(usize, Rejection)],
        started: Instant,
    ) {
        let m = &self.p.metrics;
        self.processed_counter.inc_by(processed as u64);
        for (_, r) in rejected {
            m.failed
                .with_label_values(&[self.label, r.kind.as_str()])
                .inc();
        }
        m.batch_size.observe(batch_len as f64);
        m.batch_duration.observe(started.elapsed().as_secs_f64());
        self.totals.processed += processed as u64;
        self.totals.rejected += rejected.len() as u64;
        self.totals.batches += 1;
        let seen = self.totals.processed + self.totals.rejected;
        if seen >= self.next_progress {
            let every = self.p.progress_every.max(1);
            self.next_progress = (seen / every + 1) * every;
            tracing::info!(
                handler = self.label,
                processed = self.totals.processed,
                rejected = self.totals.rejected,
                batches = self.totals.batches,
                partitions = self.p.ownership.len(),
                "progress"
            );
        }
    }

    fn advisory_commit(&self, plan: &BTreeMap<TopicPartition, PartitionPlan>) {
        let mut tpl = TopicPartitionList::with_capacity(plan.len());
        for (tp, p) in plan {
            if let Err(e) =
                tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(p.next_offset))
            {
                tracing::debug!(error = %e, "cannot build the advisory commit");
                return;
            }
            // The partition's latest gap rides on every commit, for the operator.
            if let Some(note) = self.p.ownership.get(tp).and_then(|o| o.gap) {
                if let Some(mut e) = tpl.find_partition(&tp.topic, tp.partition) {
                    e.set_metadata(note.to_string());
                }
            }
        }
        if let Err(e) = self.p.consumer.commit(&tpl, CommitMode::Async) {
            self.p.metrics.kafka_commit_failures.inc();
            tracing::debug!(error = %e, "advisory Kafka commit failed (offsets are in PostgreSQL)");
        }
    }
}

/// Step 3, error topic: every rejection reaches the error topic (acknowledged) before anything
/// commits; values are cut to `max` bytes. `delivered` remembers what earlier attempts of the batch already delivered, so a
/// retry does not send it again.
async fn deliver_rejections(
    errors: &ErrorSink,
    max: usize,
    messages: &[Fetched],
    rejected: &[(usize, Rejection)],
    delivered: &mut HashSet<ErrKey>,
) -> Result<(), Failure> {
    let mut records: Vec<ErrorRecord> = rejected
        .iter()
        .filter(|(i, _)| {
            let m = &messages[*i].msg;
            !delivered.contains(&(m.topic.clone(), m.partition, m.offset))
        })
        .map(|(i, r)| {
            let f = &messages[*i];
            let mut rec = ErrorRecord::new(&f.msg, r, max);
            rec.trace =
                crate::telemetry::reject_headers(f.trace.as_deref(), &f.msg, r, errors.topic());
            rec
        })
        .collect();
    if records.is_empty() {
        return Ok(());
    }
    let mut done = vec![false; records.len()];
    let result = errors.deliver(&mut records, &mut done).await;
    for (rec, ok) in records.iter().zip(&done) {
        if *ok {
            delivered.insert((Arc::from(rec.topic.as_str()), rec.partition, rec.offset));
        }
    }
    result.map_err(|e| Failure::Retry("error_topic", e.to_string()))
}

async fn insert_rejections(
    tx: &mut sqlx::PgConnection,
    group: &str,
    error_topic: &str,
    messages: &[Fetched],
    rejected: &[(usize, Rejection)],
) -> Result<(), sqlx::Error> {
    let mut topics = Vec::with_capacity(rejected.len());
    let mut parts = Vec::with_capacity(rejected.len());
    let mut offs = Vec::with_capacity(rejected.len());
    let mut reasons = Vec::with_capacity(rejected.len());
    let mut details = Vec::with_capacity(rejected.len());
    let mut sizes = Vec::with_capacity(rejected.len());
    for (i, r) in rejected {
        let m = &messages[*i].msg;
        topics.push(m.topic.to_string());
        parts.push(m.partition);
        offs.push(m.offset);
        reasons.push(r.kind.as_str());
        details.push(r.detail.clone());
        sizes.push(m.payload.as_ref().map_or(0, |p| p.len()) as i32);
    }
    sqlx::query(
        "INSERT INTO streamops_rejections
            (consumer_group, topic, partition, \"offset\", reason, detail, payload_bytes, error_topic)
         SELECT $1, t, p, o, r, d, s, $2
           FROM UNNEST($3::text[], $4::int4[], $5::int8[], $6::text[], $7::text[], $8::int4[])
             AS x(t, p, o, r, d, s)",
    )
    .bind(group)
    .bind(error_topic)
    .bind(&topics)
    .bind(&parts)
    .bind(&offs)
    .bind(&reasons)
    .bind(&details)
    .bind(&sizes)
    .execute(tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(payload: Option<Vec<u8>>) -> RawMessage {
        RawMessage {
            topic: Arc::from("t"),
            partition: 0,
            offset: 0,
            key: None,
            payload,
            timestamp_ms: None,
        }
    }

    #[test]
    fn empty_and_oversized_values_are_rejected_before_decoding() {
        assert_eq!(
            precheck(&msg(None), 10).unwrap_err().kind,
            RejectKind::EmptyPayload
        );
        assert_eq!(
            precheck(&msg(Some(vec![])), 10).unwrap_err().kind,
            RejectKind::EmptyPayload
        );
        assert_eq!(
            precheck(&msg(Some(vec![b'x'; 11])), 10).unwrap_err().kind,
            RejectKind::TooLarge
        );
        assert!(precheck(&msg(Some(vec![b'x'; 10])), 10).is_ok());
    }
}
