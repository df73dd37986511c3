//! `streamops-worker produce`: sends generated events (see [`crate::generate`]) with a reliable,
//! batching producer (`acks=all`, idempotence, retries, snappy), waits for every delivery and
//! reports the rate.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::generate::{GenOptions, Generator};
use crate::kafka::KafkaClientSettings;

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
            "sent={} failed={} elapsed={:.3}s rate={:.0} msg/s",
            self.sent,
            self.failed,
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
    // A load generator waits out a slow or restarting broker (the chaos suite cuts and restarts
    // it) rather than failing messages: with idempotence, a timed-out message makes librdkafka
    // bump the producer epoch and fail what is still in flight.
    .set("message.timeout.ms", "300000")
    .set("batch.num.messages", "10000")
    .set("batch.size", "1000000")
    .set("linger.ms", "5");
    cfg
}

/// Produces `opts.count` generated events to `opts.topic`.
pub async fn produce(
    settings: &KafkaClientSettings,
    opts: &ProduceOptions,
) -> Result<ProduceSummary, KafkaError> {
    let producer = producer(settings, opts.gen.max_message_bytes)?;
    let start = Instant::now();
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut sent = 0u64;
    let mut failed = 0u64;
    let window = 100_000;
    use futures::StreamExt;
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
                    inflight.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    match inflight.next().await {
                        Some(Ok(Ok(_))) => sent += 1,
                        Some(Ok(Err((e, _)))) => {
                            failed += 1;
                            tracing::warn!(error = %e, "delivery failed");
                        }
                        Some(Err(_)) => failed += 1,
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
                Some(Ok(Ok(_))) => sent += 1,
                Some(Ok(Err((e, _)))) => {
                    failed += 1;
                    tracing::warn!(error = %e, "delivery failed");
                }
                Some(Err(_)) => failed += 1,
                None => break,
            }
        }
    }
    while let Some(r) = inflight.next().await {
        match r {
            Ok(Ok(_)) => sent += 1,
            Ok(Err((e, _))) => {
                failed += 1;
                tracing::warn!(error = %e, "delivery failed");
            }
            Err(_) => failed += 1,
        }
    }
    let _ = producer.flush(Duration::from_secs(30));
    Ok(ProduceSummary {
        sent,
        failed,
        elapsed: start.elapsed(),
    })
}
