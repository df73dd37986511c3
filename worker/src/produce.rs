//! `streamops-worker produce`: sends generated events (see [`crate::generate`]) with a reliable,
//! batching producer (`acks=all`, idempotence, retries, snappy), waits for every delivery and
//! reports the rate.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::generate::{GenOptions, Generator};
use crate::kafka::KafkaClientSettings;
use crate::producer_health::{self, Outcome, ProducerHealth};

/// Options of a produce run.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Target topic.
    pub topic: String,
    /// Messages to send.
    pub count: u64,
    /// Messages per second; 0 = unlimited.
    pub rate: u64,
    /// Generator settings.
    pub gen: GenOptions,
}

/// What a produce run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProduceSummary {
    /// Messages acknowledged.
    pub sent: u64,
    /// Messages that failed.
    pub failed: u64,
    /// Producers replaced by a fresh one (wedged or fatal).
    pub rebuilds: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl ProduceSummary {
    /// Acknowledged messages per second.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for ProduceSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent={} failed={} rebuilds={} elapsed={:.3}s rate={:.0} msg/s",
            self.sent,
            self.failed,
            self.rebuilds,
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
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
    // it and sends again, see `produce`).
    .set("message.timeout.ms", "120000")
    .set("batch.num.messages", "10000")
    .set("batch.size", "1000000")
    .set("linger.ms", "5");
    cfg
}

/// Times a message timed out by librdkafka is sent again before it counts as failed.
const MAX_SENDS: u32 = 3;

type Delivery = (
    u64,
    u32,
    Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
);

/// Produces `opts.count` generated events to `opts.topic`.
///
/// A message that times out (`MessageTimedOut`) is sent again, up to [`MAX_SENDS`] times in all;
/// a timeout of the producer in use, or a fatal error, replaces it first by a fresh one (an
/// idempotent producer can stay wedged after a broker stall, see
/// [`crate::producer_health`]). Replaced producers are kept until their last delivery report.
/// A message that timed out may still have been written, so a resend can duplicate it: a
/// generator prefers that to losing it.
pub async fn produce(
    settings: &KafkaClientSettings,
    opts: &ProduceOptions,
) -> Result<ProduceSummary, KafkaError> {
    let config = producer_config(settings, opts.gen.max_message_bytes);
    let mut producer: FutureProducer = config.create()?;
    let mut retired: Vec<FutureProducer> = Vec::new();
    let mut generation = 0u64;
    let mut health = ProducerHealth::new(1);
    let mut rebuilds = 0u64;
    let start = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut sent = 0u64;
    let mut failed = 0u64;
    let window = 100_000;
    use futures::StreamExt;

    fn track(
        f: rdkafka::producer::DeliveryFuture,
        generation: u64,
        sends: u32,
    ) -> futures::future::BoxFuture<'static, Delivery> {
        Box::pin(async move { (generation, sends, f.await) })
    }

    // Handles one delivery report; returns a message to send again.
    let mut settle = |d: Delivery,
                      producer: &mut FutureProducer,
                      retired: &mut Vec<FutureProducer>,
                      generation: &mut u64,
                      sent: &mut u64,
                      failed: &mut u64|
     -> Option<(rdkafka::message::OwnedMessage, u32)> {
        let (gen, sends, result) = d;
        match result {
            Ok(Ok(_)) => {
                *sent += 1;
                if gen == *generation {
                    health.observe(Outcome::Delivered, None);
                }
                None
            }
            Ok(Err((e, msg))) => {
                let outcome = Outcome::of_error(&e);
                if gen == *generation && outcome != Outcome::Failed {
                    let fatal = producer_health::fatal_error(producer.client());
                    if let Some(reason) = health.observe(outcome, fatal) {
                        match config.create() {
                            Ok(fresh) => {
                                retired.push(std::mem::replace(producer, fresh));
                                *generation += 1;
                                rebuilds += 1;
                                tracing::warn!(%reason, "producer replaced by a fresh one; timed-out messages are sent again");
                            }
                            Err(err) => {
                                tracing::error!(error = %err, %reason, "cannot build a new producer")
                            }
                        }
                    }
                }
                if outcome != Outcome::Failed && sends < MAX_SENDS {
                    Some((msg, sends))
                } else {
                    *failed += 1;
                    tracing::warn!(error = %e, sends, "delivery failed");
                    None
                }
            }
            Err(_) => {
                *failed += 1;
                None
            }
        }
    };

    for (i, g) in Generator::new(opts.gen.clone())
        .take(opts.count as usize)
        .enumerate()
    {
        if opts.rate > 0 {
            let due = start + Duration::from_secs_f64(i as f64 / opts.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut record = FutureRecord::to(&opts.topic)
            .key(g.key.as_bytes())
            .payload(g.payload.as_slice());
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    inflight.push(track(f, generation, 1));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    match inflight.next().await {
                        Some(d) => {
                            if let Some((m, n)) = settle(
                                d,
                                &mut producer,
                                &mut retired,
                                &mut generation,
                                &mut sent,
                                &mut failed,
                            ) {
                                resend(&producer, &m, generation, n, &mut inflight, &mut failed)
                                    .await;
                            }
                        }
                        None => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
                Err((e, _)) => {
                    failed += 1;
                    tracing::warn!(error = %e, index = g.index, "cannot enqueue");
                    break;
                }
            }
        }
        while inflight.len() >= window {
            match inflight.next().await {
                Some(d) => {
                    if let Some((m, n)) = settle(
                        d,
                        &mut producer,
                        &mut retired,
                        &mut generation,
                        &mut sent,
                        &mut failed,
                    ) {
                        resend(&producer, &m, generation, n, &mut inflight, &mut failed).await;
                    }
                }
                None => break,
            }
        }
    }
    while let Some(d) = inflight.next().await {
        if let Some((m, n)) = settle(
            d,
            &mut producer,
            &mut retired,
            &mut generation,
            &mut sent,
            &mut failed,
        ) {
            resend(&producer, &m, generation, n, &mut inflight, &mut failed).await;
        }
    }
    let _ = producer.flush(Duration::from_secs(30));
    drop(retired);
    Ok(ProduceSummary {
        sent,
        failed,
        rebuilds,
        elapsed: start.elapsed(),
    })
}

/// Sends `msg` again with `producer` (its `sends`-th send failed).
async fn resend(
    producer: &FutureProducer,
    msg: &rdkafka::message::OwnedMessage,
    generation: u64,
    sends: u32,
    inflight: &mut futures::stream::FuturesUnordered<futures::future::BoxFuture<'static, Delivery>>,
    failed: &mut u64,
) {
    use rdkafka::Message;
    loop {
        let mut record = FutureRecord::to(msg.topic());
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        if let Some(p) = msg.payload() {
            record = record.payload(p);
        }
        match producer.send_result(record) {
            Ok(f) => {
                inflight.push(Box::pin(async move { (generation, sends + 1, f.await) }));
                return;
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => {
                *failed += 1;
                tracing::warn!(error = %e, "cannot enqueue a resend");
                return;
            }
        }
    }
}
