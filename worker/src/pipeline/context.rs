//! The consumer context: positions every assigned partition at the offset stored in PostgreSQL
//! before fetching starts, tells the pipeline about assignments and revocations, and turns
//! librdkafka statistics into the lag gauge and each owned partition's fetchability
//! ([`super::fetchability`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use sqlx::PgPool;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::gaps;
use crate::handlers::TopicPartition;
use crate::metrics::Metrics;
use crate::offsets;
use crate::pipeline::fetchability::{classify, up_brokers, PartitionFetch};
use crate::pipeline::state::{Health, Ownership};

type GapNotes = HashMap<TopicPartition, streamops_crds::gap::GapNote>;

/// A change of this worker's assignment, in the order the rebalance callback saw it.
#[derive(Debug, Clone)]
pub enum RebalanceEvent {
    /// Partitions added, each with its new assignment epoch.
    Assigned(Vec<(TopicPartition, u64)>),
    /// Partitions taken away (or lost).
    Revoked(Vec<TopicPartition>),
}

/// The librdkafka context of the pipeline's consumer.
pub struct PipelineConsumerContext {
    pub(crate) group: String,
    pub(crate) pool: PgPool,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) ownership: Arc<Ownership>,
    pub(crate) health: Arc<Health>,
    pub(crate) metrics: Metrics,
    pub(crate) events: UnboundedSender<RebalanceEvent>,
    pub(crate) shutdown: CancellationToken,
    /// Where a partition without an offset stored in PostgreSQL starts (see [`unstored_start`]).
    unstored_start: Offset,
    topics: std::sync::Mutex<Vec<Arc<str>>>,
}

/// Where a partition starts when PostgreSQL has no offset for it (nothing of it was ever applied
/// by this group): the beginning for `autoOffsetReset: earliest`, the end for `latest`. Set
/// explicitly, instead of leaving librdkafka to ask the group coordinator for a committed offset
/// and fall back to `auto.offset.reset`: PostgreSQL is the source of truth (the advisory commits
/// to Kafka only ever repeat offsets applied there, so the answer would be the same), and in
/// librdkafka 2.12 a partition whose committed-offset fetch at assignment fails (`NotCoordinator`
/// while the coordinator moves, right after a broker restart) is never fetched at all: seen in the
/// chaos suite, a worker held its partition for minutes without reading a message.
pub fn unstored_start(reset: streamops_crds::v1alpha1::AutoOffsetReset) -> Offset {
    match reset {
        streamops_crds::v1alpha1::AutoOffsetReset::Earliest => Offset::Beginning,
        streamops_crds::v1alpha1::AutoOffsetReset::Latest => Offset::End,
    }
}

impl PipelineConsumerContext {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        group: String,
        pool: PgPool,
        runtime: tokio::runtime::Handle,
        ownership: Arc<Ownership>,
        health: Arc<Health>,
        metrics: Metrics,
        events: UnboundedSender<RebalanceEvent>,
        shutdown: CancellationToken,
        unstored_start: Offset,
    ) -> Self {
        Self {
            group,
            pool,
            runtime,
            ownership,
            health,
            metrics,
            events,
            shutdown,
            unstored_start,
            topics: Default::default(),
        }
    }

    /// One shared `Arc<str>` per topic name, so messages do not allocate their topic.
    pub(crate) fn intern(&self, topic: &str) -> Arc<str> {
        let mut g = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = g.iter().find(|t| &***t == topic) {
            return t.clone();
        }
        let t: Arc<str> = Arc::from(topic);
        g.push(t.clone());
        t
    }

    /// The partition's high watermark from the latest statistics, if reported while owned.
    pub(crate) fn high_watermark(&self, tp: &TopicPartition) -> Option<i64> {
        self.ownership.get(tp).and_then(|o| o.high_watermark)
    }

    fn partitions_of(&self, tpl: &TopicPartitionList) -> Vec<TopicPartition> {
        tpl.elements()
            .iter()
            .map(|e| TopicPartition {
                topic: self.intern(e.topic()),
                partition: e.partition(),
            })
            .collect()
    }

    /// Reads the stored offsets and the partitions' recent offset gaps (reported again with the
    /// advisory commits), retrying with backoff while PostgreSQL is unreachable. Runs on the task
    /// polling the consumer, so it blocks that task in place (multi-thread runtime).
    fn load_offsets(&self, parts: &[TopicPartition]) -> (HashMap<TopicPartition, i64>, GapNotes) {
        let fut = async {
            let mut backoff = Backoff::default_worker();
            loop {
                let result = async {
                    let mut conn = self.pool.acquire().await?;
                    let stored = offsets::load(&mut conn, &self.group, parts).await?;
                    let gaps = gaps::load_recent(&mut conn, &self.group, parts).await?;
                    Ok::<_, sqlx::Error>((stored, gaps))
                }
                .await;
                match result {
                    Ok(map) => {
                        if backoff.attempts() > 0 {
                            self.health.set_outage(false);
                            self.metrics.in_outage.set(0);
                        }
                        return map;
                    }
                    Err(e) => {
                        if backoff.attempts() == 0 {
                            self.health.set_outage(true);
                            self.metrics.outages.inc();
                            self.metrics.in_outage.set(1);
                        }
                        self.metrics
                            .retries
                            .with_label_values(&["offsets_read"])
                            .inc();
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                            "cannot read stored offsets for the assignment; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = self.shutdown.cancelled() => {
                                tracing::warn!("shutting down before the stored offsets could be read");
                                return Default::default();
                            }
                        }
                    }
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.runtime.block_on(fut))
            }
            // Not on a runtime thread (or a current-thread runtime): run the query on a scoped
            // thread that enters the runtime.
            _ => std::thread::scope(|s| {
                s.spawn(|| self.runtime.block_on(fut))
                    .join()
                    .unwrap_or_default()
            }),
        }
    }

    fn on_assign(&self, tpl: &mut TopicPartitionList) {
        let parts = self.partitions_of(tpl);
        let (stored, mut gap_notes) = self.load_offsets(&parts);
        let mut assigned = Vec::with_capacity(parts.len());
        for tp in parts {
            let next = stored.get(&tp).copied();
            let start = next.map_or(self.unstored_start, Offset::Offset);
            if let Err(e) = tpl.set_partition_offset(&tp.topic, tp.partition, start) {
                tracing::error!(topic = %tp.topic, partition = tp.partition, error = %e,
                    "cannot position the partition at its start");
            }
            tracing::info!(topic = %tp.topic, partition = tp.partition,
                stored_next_offset = ?next, "partition assigned");
            let epoch = self.ownership.assign(tp.clone(), next);
            if let Some(note) = gap_notes.remove(&tp) {
                self.ownership.set_gap(&tp, epoch, note);
            }
            assigned.push((tp, epoch));
        }
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        self.metrics
            .assigned_partitions
            .set(self.ownership.len() as i64);
        let _ = self.events.send(RebalanceEvent::Assigned(assigned));
        self.health.set_joined();
    }

    /// Records, for each owned partition in `fetch`, whether librdkafka can fetch it (see
    /// [`crate::pipeline::fetchability`]); logs when one becomes unfetchable or fetchable again.
    fn record_fetchability(&self, fetch: &[PartitionFetch], up: &BTreeSet<i32>) {
        let now = Instant::now();
        for (p, why) in classify(fetch, up, |tp| self.ownership.get(tp).is_some()) {
            let before = self.ownership.get(&p.tp).and_then(|o| o.unfetchable);
            match (before, why) {
                (None, Some(why)) => {
                    tracing::info!(topic = %p.tp.topic, partition = p.tp.partition,
                        broker = p.broker, leader = p.leader, fetch_state = %p.fetch_state,
                        reason = %why, "owned partition not fetchable")
                }
                (Some((_, since)), None) => {
                    tracing::info!(topic = %p.tp.topic, partition = p.tp.partition,
                        broker = p.broker, leader = p.leader,
                        after_s = now.saturating_duration_since(since).as_secs(),
                        "owned partition fetchable again")
                }
                _ => {}
            }
            self.ownership.set_unfetchable(&p.tp, why, now);
        }
    }

    fn on_revoke(&self, tpl: &TopicPartitionList) {
        let parts = self.partitions_of(tpl);
        for tp in &parts {
            self.ownership.revoke(tp);
            let _ = self
                .metrics
                .partition_lag
                .remove_label_values(&[&*tp.topic, tp.partition.to_string().as_str()]);
            tracing::info!(topic = %tp.topic, partition = tp.partition, "partition revoked");
        }
        self.metrics.rebalances.with_label_values(&["revoke"]).inc();
        self.metrics
            .assigned_partitions
            .set(self.ownership.len() as i64);
        let _ = self.events.send(RebalanceEvent::Revoked(parts));
    }
}

impl ClientContext for PipelineConsumerContext {
    fn stats(&self, stats: Statistics) {
        if stats.brokers.values().any(|b| b.state == "UP") {
            self.health.set_kafka_down(false);
        }
        if let Some(cg) = &stats.cgrp {
            if cg.join_state == "steady" {
                self.health.set_joined();
            }
        }
        let mut fetch = Vec::new();
        for (name, topic) in &stats.topics {
            for (p, part) in &topic.partitions {
                if *p < 0 {
                    continue;
                }
                let tp = TopicPartition {
                    topic: self.intern(name),
                    partition: *p,
                };
                fetch.push(PartitionFetch {
                    tp: tp.clone(),
                    broker: part.broker,
                    leader: part.leader,
                    fetch_state: part.fetch_state.clone(),
                });
                self.ownership.set_high_watermark(&tp, part.hi_offset);
                // librdkafka's committed offset of the partition: moved by every commit the
                // coordinator acknowledged (the outcome of a manual asynchronous commit reaches
                // no callback under the event API rdkafka uses, so this is how the worker learns
                // it); the poll loop's commit check compares it with the applied offset.
                self.ownership
                    .set_kafka_committed(&tp, Some(part.committed_offset).filter(|o| *o >= 0));
                if self.ownership.get(&tp).is_some() && part.consumer_lag >= 0 {
                    self.metrics
                        .partition_lag
                        .with_label_values(&[name.as_str(), &p.to_string()])
                        .set(part.consumer_lag);
                }
            }
        }
        self.record_fetchability(&fetch, &up_brokers(&stats));
    }

    /// librdkafka's log lines, to tracing (target `librdkafka`, as rdkafka's default does).
    /// COMMITFAIL, an advisory commit the coordinator refused (during a rebalance:
    /// REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID), is counted in
    /// `streamops_kafka_commit_failures_total`; the poll loop's commit check sends it again.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if fac == "COMMITFAIL" {
            self.metrics.kafka_commit_failures.inc();
        }
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            self.health.set_kafka_down(true);
        }
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for PipelineConsumerContext {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            base_consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(tpl);
                let result = if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if base_consumer.assignment_lost() {
                    tracing::warn!("assignment lost (session timed out or fenced)");
                }
                self.on_revoke(tpl);
                let result = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
            other => {
                self.metrics.rebalances.with_label_values(&["error"]).inc();
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                let all = base_consumer.assignment().unwrap_or_default();
                self.on_revoke(&all);
                if let Err(e) = base_consumer.unassign() {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamops_crds::v1alpha1::AutoOffsetReset;

    #[test]
    fn a_partition_without_a_stored_offset_starts_where_auto_offset_reset_says_without_asking_the_coordinator(
    ) {
        assert_eq!(unstored_start(AutoOffsetReset::Earliest), Offset::Beginning);
        assert_eq!(unstored_start(AutoOffsetReset::Latest), Offset::End);
    }
}
