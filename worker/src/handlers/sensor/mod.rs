//! The `sensor` handler (seed 002): machine sensor readings and failure episodes into PostgreSQL.
//!
//! # Message
//! One JSON object per Kafka message, keyed by machine id (so each machine's readings stay in one
//! partition, in order):
//!
//! ```json
//! {"machine_id": "m-7", "timestamp": "2024-03-20T10:30:00Z",
//!  "readings": {"temperature": 71.2, "vibration": 0.03}, "failure": false}
//! ```
//!
//! | field | type | rule |
//! |---|---|---|
//! | `machine_id` | string | required; 1-128 bytes, not blank, no control characters |
//! | `timestamp` | string | required; RFC 3339, or ISO 8601 without offset (read as UTC); years 1970-9999 |
//! | `readings` | object | required; at most 256 entries, sensor name (1-64 bytes, no U+0000) -> finite number |
//! | `failure` | boolean | required; whether the machine reports a failure |
//!
//! A message nested deeper than 32 levels or with more than 4096 fields and elements is
//! `too_complex`; a sensor name holding U+0000 (`\u0000`, which jsonb refuses) is `unstorable`
//! (see [`storable`](super::storable)). Other fields are ignored. A message breaking a rule goes to the error topic with the reason
//! (`missing_field`, `wrong_type`, `invalid_value`, `invalid_json`, ...) and the field named in
//! the detail.
//!
//! # Tables (migration `0003_sensor.sql`)
//! - `machines`: `first_seen` (earliest reading timestamp) and `last_seen` (latest), and the
//!   source position of the last reading applied.
//! - `sensor_readings`: one row per message, keyed by source topic/partition/offset, with the
//!   values as JSONB, the failure flag, the episode it belongs to (`failure_id`) and `late`.
//! - `failures`: one row per episode: `started_at`, `ended_at` (NULL while open), `active`, and
//!   the positions of the readings that opened and closed it. The id is `topic:partition:offset`
//!   of the opening reading, so it is the same in every run.
//!
//! # Episodes
//! An episode opens on a machine's first failing reading and closes on its first healthy reading
//! after that; the failing readings in between link to it, the closing (healthy) reading does
//! not: an episode covers `[started_at, ended_at)`.
//!
//! # Out-of-order readings
//! A reading whose timestamp is *older* than the machine's latest reading so far (`last_seen`) is
//! **late**. The rule:
//! - it is stored (`late = true`): nothing is dropped;
//! - it never opens, extends or closes an episode, and never moves `last_seen` (it may lower
//!   `first_seen`);
//! - it links to the machine's episode whose interval `[started_at, ended_at)` contains its
//!   timestamp, if there is one, else to none.
//!
//! A reading with the *same* timestamp as `last_seen` is in order. So the failure history is the
//! one the in-order readings describe, and late data is kept and attributed without rewriting it.
//! Processing order is the partition order, so the outcome is deterministic.
//!
//! # Exactly-once
//! `write` runs in the pipeline's transaction, which also stores the offsets. Machine state (dates
//! and open episode) is cached per machine with the partition it came from, and loaded from
//! PostgreSQL inside the transaction for machines not cached: on partition assignment, after a
//! restart, and after `reset` (a failed transaction). The cache only takes a batch's new state once
//! that batch committed. Readings use their source position as primary key, and each machine
//! records the position of the last reading applied (`machines.applied_*`): a reading at or below
//! it is a replay and is skipped, so even a replay of committed messages (which the pipeline's
//! offsets already rule out) changes nothing. The tables are identical whether the stream ran in
//! one go or through restarts and rebalances. The one requirement is the one Kafka ordering needs anyway:
//! all readings of a machine are in one partition (key = machine id).

mod episodes;
mod reading;
mod store;

use std::collections::{HashMap, HashSet};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use streamops_crds::v1alpha1::SensorSettings;
use streamops_crds::HandlerKind;
use tracing::debug;

pub use episodes::{failure_id, plan_batch, BatchPlan, Link, MachineState};
pub use reading::{decode_reading, Reading};
pub use store::{reading_row, READINGS_COPY};

use super::{
    Decoded, HandlerContext, HandlerError, MessageHandler, RawMessage, Rejection, TopicPartition,
};

/// The sensor handler's metrics.
#[derive(Clone)]
struct SensorMetrics {
    readings: IntCounterVec,
    opened: IntCounter,
    closed: IntCounter,
    cached: IntGauge,
    loaded: IntCounter,
}

impl SensorMetrics {
    fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            readings: IntCounterVec::new(
                Opts::new(
                    "streamops_sensor_readings_total",
                    "Sensor readings committed, by arrival order (in_order or late).",
                ),
                &["order"],
            )?,
            opened: IntCounter::new(
                "streamops_sensor_failures_opened_total",
                "Failure episodes opened (committed).",
            )?,
            closed: IntCounter::new(
                "streamops_sensor_failures_closed_total",
                "Failure episodes closed (committed).",
            )?,
            cached: IntGauge::new(
                "streamops_sensor_machines_cached",
                "Machines whose state this worker holds in memory.",
            )?,
            loaded: IntCounter::new(
                "streamops_sensor_state_loads_total",
                "Machine states looked up in PostgreSQL (after assignment, restart or reset).",
            )?,
        };
        registry.register(Box::new(m.readings.clone()))?;
        registry.register(Box::new(m.opened.clone()))?;
        registry.register(Box::new(m.closed.clone()))?;
        registry.register(Box::new(m.cached.clone()))?;
        registry.register(Box::new(m.loaded.clone()))?;
        Ok(m)
    }
}

struct Cached {
    state: MachineState,
    partition: TopicPartition,
}

/// What the last `write` computed, applied to the cache once its transaction commits.
#[derive(Default)]
struct Staged {
    machines: Vec<(String, MachineState, TopicPartition)>,
    in_order: u64,
    late: u64,
    opened: u64,
    closed: u64,
}

/// The sensor handler.
pub struct SensorHandler {
    cache: HashMap<String, Cached>,
    staged: Option<Staged>,
    metrics: SensorMetrics,
}

impl SensorHandler {
    /// Builds the handler and registers its metrics on the context's registry.
    pub fn new(ctx: &HandlerContext, _settings: &SensorSettings) -> Result<Self, HandlerError> {
        let metrics = SensorMetrics::register(&ctx.registry)
            .map_err(|e| HandlerError::Fatal(format!("cannot register sensor metrics: {e}")))?;
        Ok(Self {
            cache: HashMap::new(),
            staged: None,
            metrics,
        })
    }

    /// Machines whose state is held in memory (for tests and metrics).
    pub fn cached_machines(&self) -> usize {
        self.cache.len()
    }
}

impl MessageHandler for SensorHandler {
    type Item = Reading;

    fn kind(&self) -> HandlerKind {
        HandlerKind::Sensor
    }

    fn decode(&self, msg: &RawMessage) -> Result<Reading, Rejection> {
        // The pipeline rejects empty values before decoding; an absent one reads as empty JSON.
        decode_reading(msg.payload.as_deref().unwrap_or_default())
    }

    async fn write(
        &mut self,
        tx: &mut sqlx::PgConnection,
        items: &[Decoded<Reading>],
    ) -> Result<(), HandlerError> {
        self.staged = None;
        if items.is_empty() {
            return Ok(());
        }
        // The batch's machines, with the partition of their last reading.
        let mut partition_of: HashMap<&str, TopicPartition> = HashMap::new();
        for d in items {
            partition_of.insert(
                d.item.machine_id.as_str(),
                TopicPartition {
                    topic: d.pos.topic.clone(),
                    partition: d.pos.partition,
                },
            );
        }
        let mut states: HashMap<String, MachineState> = HashMap::with_capacity(partition_of.len());
        let mut missing: Vec<String> = Vec::new();
        for id in partition_of.keys() {
            match self.cache.get(*id) {
                Some(c) => {
                    states.insert((*id).to_string(), c.state.clone());
                }
                None => missing.push((*id).to_string()),
            }
        }
        if !missing.is_empty() {
            missing.sort();
            let loaded = store::load_states(tx, &missing).await?;
            debug!(
                asked = missing.len(),
                found = loaded.len(),
                "loaded machine state from PostgreSQL"
            );
            self.metrics.loaded.inc_by(missing.len() as u64);
            states.extend(loaded);
        }

        let plan = plan_batch(&mut states, items);
        store::write_plan(tx, &plan).await?;

        let late = plan.late;
        self.staged = Some(Staged {
            machines: plan
                .machines
                .into_iter()
                .filter_map(|(id, s)| {
                    let tp = partition_of.get(id.as_str())?.clone();
                    Some((id, s, tp))
                })
                .collect(),
            in_order: items.len() as u64 - late,
            late,
            opened: plan.opened,
            closed: plan.closed,
        });
        Ok(())
    }

    async fn committed(&mut self) -> Result<(), HandlerError> {
        if let Some(s) = self.staged.take() {
            for (id, state, partition) in s.machines {
                self.cache.insert(id, Cached { state, partition });
            }
            self.metrics
                .readings
                .with_label_values(&["in_order"])
                .inc_by(s.in_order);
            self.metrics
                .readings
                .with_label_values(&["late"])
                .inc_by(s.late);
            self.metrics.opened.inc_by(s.opened);
            self.metrics.closed.inc_by(s.closed);
            self.metrics.cached.set(self.cache.len() as i64);
        }
        Ok(())
    }

    fn revoke(&mut self, partitions: &[TopicPartition]) {
        let revoked: HashSet<&TopicPartition> = partitions.iter().collect();
        self.cache.retain(|_, c| !revoked.contains(&c.partition));
        if let Some(s) = &mut self.staged {
            s.machines.retain(|(_, _, tp)| !revoked.contains(tp));
        }
        self.metrics.cached.set(self.cache.len() as i64);
    }

    fn reset(&mut self) {
        self.cache.clear();
        self.staged = None;
        self.metrics.cached.set(0);
    }
}
