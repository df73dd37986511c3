//! `streamops-worker produce`: sends generated events (see [`crate::generate`]) with a reliable,
//! batching producer (`acks=all`, idempotence, retries, snappy), waits for every delivery and
//! reports the rate.
//!
//! # Exactly once across resends
//!
//! A message whose delivery times out may have been written all the same (the broker appended
//! it, the acknowledgement never came back), so sending it again blindly can duplicate it. The
//! generator is the only writer of its topic, and an idempotent producer writes each partition's
//! messages in the order they were sent, at most once each. So a run proceeds in *rounds*, one a
//! producer:
//!
//! 1. Before a round sends anything, it holds each partition's high watermark (its `start`).
//! 2. Every delivery report names the message's partition (and, when acknowledged, its offset).
//! 3. When a message times out (or the producer turns fatal), the round ends: the producer is
//!    purged and destroyed so that it can write nothing more, the high watermarks are read again
//!    until two reads a settle apart agree (a request the broker had already received may still
//!    be appended), and [`written_unacknowledged`] tells, partition by partition, which of the
//!    unacknowledged messages the offsets between `start` and the watermark hold.
//! 4. Only the others are sent again, by a fresh producer, in a new round.
//!
//! When the watermarks cannot be read, or do not fit the messages sent, the run fails with
//! [`ProduceError`] rather than risk a duplicate or a loss.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::Message;

use crate::generate::{GenOptions, Generator};
use crate::kafka::KafkaClientSettings;
use crate::producer_health::{self, Outcome, ProducerHealth};

/// Options of a produce run.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Target topic (it must exist; the generator must be its only writer).
    pub topic: String,
    /// Messages to send.
    pub count: u64,
    /// Messages per second; 0 = unlimited.
    pub rate: u64,
    /// Generator settings.
    pub gen: GenOptions,
    /// `message.timeout.ms`: how long a message may wait for its acknowledgement before the
    /// round ends and it is checked against the watermarks ([`DEFAULT_MESSAGE_TIMEOUT`]).
    pub message_timeout: Duration,
}

/// The generator's `message.timeout.ms` (see [`producer_config`]).
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a produce run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProduceSummary {
    /// Messages written: acknowledged, or found in the topic although unacknowledged.
    pub sent: u64,
    /// Messages that failed.
    pub failed: u64,
    /// Producers replaced by a fresh one (a round ended by a timeout or a fatal error).
    pub rebuilds: u64,
    /// Messages counted in `sent` that were never acknowledged but that the watermarks showed
    /// written (they were not sent again).
    pub written_unacknowledged: u64,
    /// Messages sent again because the watermarks showed them not written.
    pub resent: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl ProduceSummary {
    /// Written messages per second.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for ProduceSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent={} failed={} rebuilds={} written_unacknowledged={} resent={} elapsed={:.3}s rate={:.0} msg/s",
            self.sent,
            self.failed,
            self.rebuilds,
            self.written_unacknowledged,
            self.resent,
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}

/// Why a produce run stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// librdkafka refused the configuration, or a client could not be built.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The topic has no partitions the generator can see.
    #[error("topic {0} does not exist (create it before producing)")]
    NoTopic(String),
    /// The high watermarks could not be read (or did not settle): the messages whose delivery
    /// was not acknowledged can be neither counted written nor sent again safely.
    #[error("cannot read stable high watermarks of {topic} within {waited:?}: {reason}")]
    Watermarks {
        /// The topic.
        topic: String,
        /// How long it tried.
        waited: Duration,
        /// The last failure.
        reason: String,
    },
    /// The watermarks do not fit the messages sent (another writer, or a broken assumption).
    #[error("partition {partition} of {topic}: {source}")]
    Inconsistent {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// What does not fit.
        #[source]
        source: Inconsistent,
    },
    /// A delivery report names a partition the topic did not have when the run began.
    #[error(
        "a delivery report names partition {partition} of {topic}, unknown when the run began"
    )]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
    /// A delivery report never came: whether that message was written cannot be told.
    #[error("the delivery report of message {0} was lost")]
    ReportLost(u64),
}

/// A producer configured for `opts`.
pub fn producer(
    settings: &KafkaClientSettings,
    max_message_bytes: usize,
) -> Result<FutureProducer, KafkaError> {
    producer_config(settings, max_message_bytes).create()
}

/// The load generator's producer settings (also the latency bench's, which needs them with a
/// delivery callback instead of futures).
pub fn producer_config(settings: &KafkaClientSettings, max_message_bytes: usize) -> ClientConfig {
    let mut cfg = settings.reliable_producer();
    cfg.set(
        "message.max.bytes",
        (max_message_bytes + 64 * 1024).max(1_000_000).to_string(),
    )
    .set("queue.buffering.max.messages", "1000000")
    .set("queue.buffering.max.kbytes", "1048576")
    // A load generator waits out a slow or restarting broker (the chaos suite cuts, restarts and
    // freezes it for up to 30 s) rather than failing messages: with idempotence, a timed-out
    // message makes librdkafka bump the producer epoch and fail what is still in flight. Two
    // minutes, not more: a timeout is also how a wedged producer shows (`produce` then replaces
    // it and sends again what the watermarks show unwritten, see `produce`).
    .set(
        "message.timeout.ms",
        DEFAULT_MESSAGE_TIMEOUT.as_millis().to_string(),
    )
    .set("batch.num.messages", "10000")
    .set("batch.size", "1000000")
    .set("linger.ms", "5");
    cfg
}

/// Times a message is sent (in as many rounds) before it counts as failed.
const MAX_SENDS: u32 = 3;
/// Deliveries awaited at most at once.
const WINDOW: usize = 100_000;
/// Between two watermark reads that must agree before a round's messages are judged.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the watermarks may stay unreadable (a frozen or restarting broker) before the run
/// fails.
const WATERMARK_PATIENCE: Duration = Duration::from_secs(300);

/// What the delivery report of one message of a partition said, in the order the messages were
/// sent to that partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Acknowledged at this offset.
    Acked(i64),
    /// Not acknowledged (timed out, purged, fatal): written or not.
    Unacked,
}

/// Watermarks that do not fit the reports of a round.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistent {
    /// The watermark is below the round's start.
    #[error("high watermark {hw} is below the round's start {start}")]
    WatermarkBelowStart {
        /// Start.
        start: i64,
        /// High watermark.
        hw: i64,
    },
    /// An acknowledged offset outside `[lower, hw)`: acknowledgements out of send order, or
    /// beyond the watermark.
    #[error("acknowledged offset {offset} outside [{lower}, {hw})")]
    AckOutOfOrder {
        /// The offset.
        offset: i64,
        /// The least offset it could have.
        lower: i64,
        /// High watermark.
        hw: i64,
    },
    /// More records between two acknowledgements than messages sent there: another writer.
    #[error(
        "{records} records at offsets {from}..{to} but only {candidates} unacknowledged messages could be there"
    )]
    UnknownRecords {
        /// First offset of the range.
        from: i64,
        /// End of the range.
        to: i64,
        /// Records in it.
        records: i64,
        /// Unacknowledged messages sent in that stretch.
        candidates: usize,
    },
}

/// Which unacknowledged messages of one partition were written, given the high watermark before
/// the round (`start`) and after it (`hw`, read once its producer can write nothing more) and
/// the round's reports in send order. Returns one flag per [`Report::Unacked`], in order.
///
/// The partition's log holds exactly the round's written messages in send order (idempotent
/// producer, sole writer). So the offsets between two acknowledged messages that no
/// acknowledgement holds are the unacknowledged messages sent between them that were written;
/// within such a stretch an idempotent producer writes a prefix (a message follows its
/// predecessor only once that one is written), so the earliest are the written ones.
pub fn written_unacknowledged(
    start: i64,
    hw: i64,
    reports: &[Report],
) -> Result<Vec<bool>, Inconsistent> {
    if hw < start {
        return Err(Inconsistent::WatermarkBelowStart { start, hw });
    }
    let mut written = Vec::new();
    let mut stretch_begins = 0; // index into `written` of the current stretch's first message
    let mut lower = start;
    let close = |written: &mut Vec<bool>, first: usize, to: i64, lower: i64| {
        let records = to - lower;
        let candidates = written.len() - first;
        if records as usize > candidates {
            return Err(Inconsistent::UnknownRecords {
                from: lower,
                to,
                records,
                candidates,
            });
        }
        for w in &mut written[first..first + records as usize] {
            *w = true;
        }
        Ok(())
    };
    for r in reports {
        match *r {
            Report::Unacked => written.push(false),
            Report::Acked(offset) => {
                if offset < lower || offset >= hw {
                    return Err(Inconsistent::AckOutOfOrder { offset, lower, hw });
                }
                close(&mut written, stretch_begins, offset, lower)?;
                stretch_begins = written.len();
                lower = offset + 1;
            }
        }
    }
    close(&mut written, stretch_begins, hw, lower)?;
    Ok(written)
}

/// A message to send.
#[derive(Debug)]
struct Outgoing {
    /// Position in the generated sequence.
    index: u64,
    key: String,
    payload: Vec<u8>,
    /// Sends so far.
    sends: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Report not yet received.
    Pending,
    /// Acknowledged at `offset`.
    Acked { partition: i32, offset: i64 },
    /// Not acknowledged; `partition` < 0 when it never left the unassigned queue (not written).
    Unacked { partition: i32 },
    /// Refused for good (not written; counted failed).
    Refused,
}

/// A message of the current round, in send order.
#[derive(Debug)]
struct Slot {
    state: State,
    /// Kept until the message is acknowledged or refused.
    msg: Option<Outgoing>,
}

type Reported = (
    u64,
    Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
);

/// One producer's round, and the run's totals.
struct Run<'a> {
    settings: &'a KafkaClientSettings,
    topic: &'a str,
    config: ClientConfig,
    producer: FutureProducer,
    health: ProducerHealth,
    /// The round is ending: its reports are only recorded.
    ending: bool,
    /// Per partition: offsets below this hold nothing of the round's unsettled messages.
    start: BTreeMap<i32, i64>,
    /// The round's messages from the first not yet acknowledged or refused, in send order.
    slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`.
    base: u64,
    next_seq: u64,
    inflight: FuturesUnordered<BoxFuture<'static, Reported>>,
    /// Messages waiting to be sent (resends first).
    backlog: VecDeque<Outgoing>,
    summary: ProduceSummary,
}

impl Run<'_> {
    /// Sends the backlog.
    async fn pump(&mut self) -> Result<(), ProduceError> {
        while let Some(mut out) = self.backlog.pop_front() {
            let record = FutureRecord::to(self.topic)
                .key(out.key.as_bytes())
                .payload(out.payload.as_slice());
            match self.producer.send_result(record).map_err(|(e, _)| e) {
                Ok(f) => {
                    out.sends += 1;
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.slots.push_back(Slot {
                        state: State::Pending,
                        msg: Some(out),
                    });
                    self.inflight.push(Box::pin(async move { (seq, f.await) }));
                }
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    self.backlog.push_front(out);
                    if !self.await_one().await? {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Err(e) => {
                    self.summary.failed += 1;
                    tracing::warn!(error = %e, index = out.index, "cannot enqueue");
                }
            }
        }
        Ok(())
    }

    /// Waits for one delivery report (ending the round if it says so); false if none is due.
    async fn await_one(&mut self) -> Result<bool, ProduceError> {
        match self.inflight.next().await {
            Some(r) => {
                if self.record(r) {
                    self.end_round().await?;
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Records the delivery reports already in (ending the round if one says so), without
    /// waiting: a timeout ends the round when it happens, not when the window is full.
    async fn record_ready(&mut self) -> Result<(), ProduceError> {
        while let Some(Some(r)) = self.inflight.next().now_or_never() {
            if self.record(r) {
                self.end_round().await?;
            }
        }
        Ok(())
    }

    /// Records a delivery report; true when the round must end (the producer timed out or
    /// turned fatal).
    fn record(&mut self, (seq, result): Reported) -> bool {
        let Some(slot) = seq
            .checked_sub(self.base)
            .and_then(|i| self.slots.get_mut(i as usize))
        else {
            return false;
        };
        let mut end = false;
        match result {
            Ok(Ok(d)) => {
                slot.state = State::Acked {
                    partition: d.partition,
                    offset: d.offset,
                };
                slot.msg = None;
                self.summary.sent += 1;
                self.health.observe(Outcome::Delivered, None);
            }
            Ok(Err((e, m))) => {
                let code = e.rdkafka_error_code();
                let purged = matches!(
                    code,
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                );
                let outcome = Outcome::of_error(&e);
                if purged || outcome != Outcome::Failed {
                    slot.state = State::Unacked {
                        partition: m.partition(),
                    };
                    if !purged && !self.ending {
                        let fatal = producer_health::fatal_error(self.producer.client());
                        if let Some(reason) = self.health.observe(outcome, fatal) {
                            tracing::warn!(%reason, error = %e, "ending the round: the producer is replaced; unacknowledged messages are checked against the watermarks");
                            end = true;
                        }
                    }
                } else {
                    let index = slot.msg.as_ref().map(|m| m.index);
                    tracing::warn!(error = %e, ?index, "delivery refused");
                    slot.state = State::Refused;
                    slot.msg = None;
                    self.summary.failed += 1;
                }
            }
            // Kept as pending: the round's end reports it as lost.
            Err(_) => {}
        }
        self.trim();
        end
    }

    /// Drops the settled head of the round: acknowledged messages move their partition's start
    /// past them (everything sent before them is settled too).
    fn trim(&mut self) {
        while let Some(front) = self.slots.front() {
            match front.state {
                State::Acked { partition, offset } => match self.start.get_mut(&partition) {
                    Some(s) => *s = (*s).max(offset + 1),
                    // Unknown partition: the round's end reports it.
                    None => break,
                },
                State::Refused => {}
                State::Pending | State::Unacked { .. } => break,
            }
            self.slots.pop_front();
            self.base += 1;
        }
    }

    /// Ends the round: purges and destroys the producer, waits for every report, reads the
    /// settled watermarks, counts the written unacknowledged messages as sent and puts the
    /// others in front of the backlog for a fresh producer.
    async fn end_round(&mut self) -> Result<(), ProduceError> {
        self.ending = true;
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        while let Some(r) = self.inflight.next().await {
            self.record(r);
        }
        let fresh: FutureProducer = self.config.create()?;
        let old = std::mem::replace(&mut self.producer, fresh);
        // Destroying a client joins its threads: not on the runtime.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        self.summary.rebuilds += 1;
        self.health = ProducerHealth::new(1);

        let partitions: Vec<i32> = self.start.keys().copied().collect();
        let hw = settled_watermarks(self.settings, self.topic, &partitions).await?;
        let mut resend = Vec::new();
        let mut reports: BTreeMap<i32, Vec<Report>> = BTreeMap::new();
        for (i, slot) in self.slots.iter().enumerate() {
            match slot.state {
                State::Pending => {
                    return Err(ProduceError::ReportLost(
                        slot.msg.as_ref().map_or(self.base + i as u64, |m| m.index),
                    ))
                }
                State::Acked { partition, offset } => {
                    reports
                        .entry(partition)
                        .or_default()
                        .push(Report::Acked(offset));
                }
                State::Unacked { partition } if partition >= 0 => {
                    reports.entry(partition).or_default().push(Report::Unacked);
                }
                State::Unacked { .. } | State::Refused => {}
            }
        }
        let mut verdicts: BTreeMap<i32, std::vec::IntoIter<bool>> = BTreeMap::new();
        for (partition, r) in &reports {
            let inconsistent = |source| ProduceError::Inconsistent {
                topic: self.topic.to_string(),
                partition: *partition,
                source,
            };
            let (Some(&start), Some(&hw)) = (self.start.get(partition), hw.get(partition)) else {
                return Err(ProduceError::UnknownPartition {
                    topic: self.topic.to_string(),
                    partition: *partition,
                });
            };
            let written = written_unacknowledged(start, hw, r).map_err(inconsistent)?;
            verdicts.insert(*partition, written.into_iter());
        }
        // Partitions where this round wrote nothing must not have moved either.
        for (partition, &start) in &self.start {
            let now = hw.get(partition).copied().unwrap_or(start);
            if !reports.contains_key(partition) && now != start {
                return Err(ProduceError::Inconsistent {
                    topic: self.topic.to_string(),
                    partition: *partition,
                    source: Inconsistent::UnknownRecords {
                        from: start,
                        to: now,
                        records: now - start,
                        candidates: 0,
                    },
                });
            }
        }
        let (mut written, mut failed) = (0u64, 0u64);
        for slot in self.slots.drain(..) {
            let State::Unacked { partition } = slot.state else {
                continue;
            };
            let was_written = partition >= 0
                && verdicts
                    .get_mut(&partition)
                    .and_then(|v| v.next())
                    .unwrap_or(false);
            let Some(msg) = slot.msg else { continue };
            if was_written {
                written += 1;
            } else if msg.sends >= MAX_SENDS {
                failed += 1;
                tracing::warn!(
                    index = msg.index,
                    sends = msg.sends,
                    "message not written after all its sends"
                );
            } else {
                resend.push(msg);
            }
        }
        tracing::warn!(
            written_unacknowledged = written,
            resend = resend.len(),
            failed,
            "round ended; the watermarks settled"
        );
        self.summary.sent += written;
        self.summary.written_unacknowledged += written;
        self.summary.failed += failed;
        self.summary.resent += resend.len() as u64;
        self.base = self.next_seq;
        self.start = hw;
        self.ending = false;
        for msg in resend.into_iter().rev() {
            self.backlog.push_front(msg);
        }
        Ok(())
    }

    /// True while some message of the round is unsettled or waits to be sent.
    fn unfinished(&self) -> bool {
        !self.backlog.is_empty()
            || !self.inflight.is_empty()
            || self
                .slots
                .iter()
                .any(|s| matches!(s.state, State::Unacked { .. } | State::Pending))
    }
}

/// The partitions of `topic` and their high watermarks, read by a fresh client (the producer's
/// own may be the one that lost its brokers).
fn read_watermarks(
    settings: &KafkaClientSettings,
    topic: &str,
    partitions: Option<&[i32]>,
) -> Result<BTreeMap<i32, i64>, String> {
    let consumer: BaseConsumer = settings
        .base()
        .set("log_level", "3")
        .create()
        .map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(10);
    let ids: Vec<i32> = match partitions {
        Some(p) => p.to_vec(),
        None => {
            let metadata = consumer
                .fetch_metadata(Some(topic), timeout)
                .map_err(|e| e.to_string())?;
            let t = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .ok_or_else(|| "topic not in the metadata".to_string())?;
            if let Some(e) = t.error() {
                return Err(format!("metadata error {e:?}"));
            }
            t.partitions().iter().map(|p| p.id()).collect()
        }
    };
    let mut out = BTreeMap::new();
    for p in ids {
        let (_, hw) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| format!("partition {p}: {e}"))?;
        out.insert(p, hw);
    }
    Ok(out)
}

/// Reads the watermarks until two reads [`SETTLE`] apart agree; fails after
/// [`WATERMARK_PATIENCE`].
async fn settled_watermarks(
    settings: &KafkaClientSettings,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, i64>, ProduceError> {
    let began = Instant::now();
    let mut last: Option<BTreeMap<i32, i64>> = None;
    let mut reason = String::from("never read");
    while began.elapsed() < WATERMARK_PATIENCE {
        let (s, t, p) = (settings.clone(), topic.to_string(), partitions.to_vec());
        match tokio::task::spawn_blocking(move || read_watermarks(&s, &t, Some(&p))).await {
            Ok(Ok(w)) => {
                if last.as_ref() == Some(&w) {
                    return Ok(w);
                }
                last = Some(w);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the high watermarks yet");
                reason = e;
                last = None;
            }
            Err(e) => reason = e.to_string(),
        }
        tokio::time::sleep(SETTLE).await;
    }
    Err(ProduceError::Watermarks {
        topic: topic.to_string(),
        waited: began.elapsed(),
        reason,
    })
}

/// Produces `opts.count` generated events to `opts.topic`, each exactly once.
///
/// A round ends when a message times out (`MessageTimedOut`) or the producer turns fatal (an
/// idempotent producer can stay wedged after a broker stall, see [`crate::producer_health`]);
/// the unacknowledged messages the watermarks show unwritten are sent again by a fresh producer
/// (see the module documentation), up to [`MAX_SENDS`] times in all.
pub async fn produce(
    settings: &KafkaClientSettings,
    opts: &ProduceOptions,
) -> Result<ProduceSummary, ProduceError> {
    let begun = Instant::now();
    let mut config = producer_config(settings, opts.gen.max_message_bytes);
    config.set(
        "message.timeout.ms",
        opts.message_timeout.as_millis().max(1).to_string(),
    );
    let producer: FutureProducer = config.create()?;
    let (s, t) = (settings.clone(), opts.topic.clone());
    let start = match tokio::task::spawn_blocking(move || read_watermarks(&s, &t, None)).await {
        Ok(Ok(w)) if !w.is_empty() => w,
        Ok(Ok(_)) => return Err(ProduceError::NoTopic(opts.topic.clone())),
        Ok(Err(reason)) => {
            return Err(ProduceError::Watermarks {
                topic: opts.topic.clone(),
                waited: begun.elapsed(),
                reason,
            })
        }
        Err(e) => {
            return Err(ProduceError::Watermarks {
                topic: opts.topic.clone(),
                waited: begun.elapsed(),
                reason: e.to_string(),
            })
        }
    };
    let mut run = Run {
        settings,
        topic: &opts.topic,
        config,
        producer,
        health: ProducerHealth::new(1),
        ending: false,
        start,
        slots: VecDeque::new(),
        base: 0,
        next_seq: 0,
        inflight: FuturesUnordered::new(),
        backlog: VecDeque::new(),
        summary: ProduceSummary {
            sent: 0,
            failed: 0,
            rebuilds: 0,
            written_unacknowledged: 0,
            resent: 0,
            elapsed: Duration::ZERO,
        },
    };
    let clock = Instant::now();
    for (i, g) in Generator::new(opts.gen.clone())
        .take(opts.count as usize)
        .enumerate()
    {
        if opts.rate > 0 {
            let due = clock + Duration::from_secs_f64(i as f64 / opts.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        run.backlog.push_back(Outgoing {
            index: g.index,
            key: g.key,
            payload: g.payload,
            sends: 0,
        });
        run.pump().await?;
        run.record_ready().await?;
        while run.inflight.len() >= WINDOW {
            run.await_one().await?;
        }
    }
    while run.unfinished() {
        run.pump().await?;
        if !run.await_one().await? && run.unfinished() {
            // Nothing in flight, yet unacknowledged messages: judge them now.
            run.end_round().await?;
        }
    }
    let _ = run.producer.flush(Duration::from_secs(30));
    run.summary.elapsed = begun.elapsed();
    Ok(run.summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Report::{Acked, Unacked};

    #[test]
    fn nothing_counts_as_written_when_the_watermark_did_not_move() {
        assert_eq!(
            written_unacknowledged(10, 10, &[Unacked, Unacked]),
            Ok(vec![false, false])
        );
    }

    #[test]
    fn the_earliest_unacknowledged_messages_fill_the_records_past_the_last_ack() {
        // Two acknowledged at 10 and 11, then four unacknowledged of which the log holds two.
        assert_eq!(
            written_unacknowledged(
                10,
                14,
                &[Acked(10), Acked(11), Unacked, Unacked, Unacked, Unacked]
            ),
            Ok(vec![true, true, false, false])
        );
    }

    #[test]
    fn a_gap_before_a_later_ack_belongs_to_the_unacknowledged_messages_sent_before_it() {
        // Unacked, Acked at 11 (so offset 10 holds the first), then an unacked one not written.
        assert_eq!(
            written_unacknowledged(10, 12, &[Unacked, Acked(11), Unacked]),
            Ok(vec![true, false])
        );
    }

    #[test]
    fn an_unacknowledged_message_before_an_adjacent_ack_was_not_written() {
        // The ack at the round's start leaves no room before it: the first message is resent
        // even though the watermark moved past a later unacknowledged one, which was written.
        assert_eq!(
            written_unacknowledged(10, 12, &[Unacked, Acked(10), Unacked]),
            Ok(vec![false, true])
        );
    }

    #[test]
    fn every_unacknowledged_message_counts_as_written_when_the_records_cover_them_all() {
        assert_eq!(
            written_unacknowledged(0, 3, &[Unacked, Unacked, Unacked]),
            Ok(vec![true, true, true])
        );
    }

    #[test]
    fn more_records_than_messages_sent_fails_loudly() {
        assert!(matches!(
            written_unacknowledged(0, 3, &[Unacked, Acked(1)]),
            Err(Inconsistent::UnknownRecords {
                records: 1,
                candidates: 0,
                ..
            })
        ));
        assert!(matches!(
            written_unacknowledged(5, 9, &[Acked(5), Unacked]),
            Err(Inconsistent::UnknownRecords {
                records: 3,
                candidates: 1,
                ..
            })
        ));
    }

    #[test]
    fn acks_out_of_send_order_or_past_the_watermark_fail_loudly() {
        assert!(matches!(
            written_unacknowledged(0, 5, &[Unacked, Unacked, Unacked, Acked(3), Acked(2)]),
            Err(Inconsistent::AckOutOfOrder { offset: 2, .. })
        ));
        assert!(matches!(
            written_unacknowledged(0, 3, &[Acked(3)]),
            Err(Inconsistent::AckOutOfOrder { offset: 3, .. })
        ));
    }

    #[test]
    fn a_watermark_below_the_start_fails_loudly() {
        assert_eq!(
            written_unacknowledged(7, 6, &[]),
            Err(Inconsistent::WatermarkBelowStart { start: 7, hw: 6 })
        );
    }
}
