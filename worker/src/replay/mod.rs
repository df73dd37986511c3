//! Replay (issue 17): move a consumer group's offsets of record back (to the earliest offsets, to
//! a timestamp, or to explicit offsets) and rebuild the handler's derived state, so that
//! processing the stream again from there leaves the tables of an uninterrupted run.
//!
//! The sequence, [`run`]:
//! 1. The group must have no live member: a replay is refused, with the members named, while
//!    workers consume (the operator suspends the StreamConsumer first; locally, stop the workers).
//!    With `wait_idle` the command waits that long for the group to empty (a stopped static member
//!    stays listed until its session times out).
//! 2. The target is resolved to one position per partition of the configured topics with the
//!    broker's earliest offsets or its time index ([`resolve`]).
//! 3. One PostgreSQL transaction ([`apply`]): the request id is recorded in `streamops_replays`
//!    (a request already recorded changes nothing: a replay runs once per request); the offsets of
//!    record are set to the positions; the rejections and the handler's rows at and after them are
//!    deleted and its state at the reset point restored ([`rebuild`]).
//! 4. The positions are committed to Kafka for the group (advisory, as the workers do) and the
//!    commit is recorded; a request applied in PostgreSQL whose Kafka commit did not happen (the
//!    run was interrupted after step 3) commits on its next try, and only then.
//!
//! Concurrency with a worker that would still run is fenced by the offsets table: every batch
//! moves `next_offset` by compare-and-set from the value its writer knows, so after a replay the
//! old worker's next commit conflicts and rolls back.

pub mod rebuild;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use streamops_crds::WorkerConfig;

use crate::kafka::KafkaClientSettings;

/// How long a single broker request of the replay may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReplayTarget {
    /// The earliest offset the broker still holds, for every partition.
    Earliest,
    /// The first message of every partition whose timestamp is at or after this (milliseconds
    /// since the epoch); the end of a partition holding none.
    Timestamp(i64),
    /// Explicit offsets; partitions not named keep their offsets of record.
    Offsets(Vec<PartitionOffset>),
}

impl ReplayTarget {
    /// A short description, stored with the request.
    pub fn describe(&self) -> String {
        match self {
            Self::Earliest => "earliest".into(),
            Self::Timestamp(ms) => format!("timestamp:{ms}"),
            Self::Offsets(o) => format!("offsets:{}", o.len()),
        }
    }
}

/// One partition's position.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartitionOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset of the next message to process.
    pub offset: i64,
}

impl std::str::FromStr for PartitionOffset {
    type Err = String;

    /// `topic:partition=offset`.
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not TOPIC:PARTITION=OFFSET");
        let (tp, offset) = s.rsplit_once('=').ok_or_else(err)?;
        let (topic, partition) = tp.rsplit_once(':').ok_or_else(err)?;
        let partition: i32 = partition.trim().parse().map_err(|_| err())?;
        let offset: i64 = offset.trim().parse().map_err(|_| err())?;
        if topic.is_empty() || partition < 0 || offset < 0 {
            return Err(err());
        }
        Ok(Self {
            topic: topic.to_string(),
            partition,
            offset,
        })
    }
}

/// Why a replay did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Workers are consuming: a replay would race them.
    #[error("consumer group {group} has {} live member(s) ({}): suspend the StreamConsumer (spec.suspend: true) or stop its workers first", members.len(), members.join(", "))]
    GroupActive {
        /// The group.
        group: String,
        /// Member ids (client id / host).
        members: Vec<String>,
    },
    /// The request cannot be carried out as given.
    #[error("{0}")]
    Invalid(String),
    /// The broker failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Redis failed (pipeline-trigger).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayOutcome {
    /// The request id.
    pub request_id: String,
    /// Whether this call applied it (false: it had been applied before, nothing changed).
    pub applied_now: bool,
    /// The positions of record after the replay.
    pub positions: Vec<PartitionOffset>,
    /// Rows deleted, per table.
    pub deleted: BTreeMap<String, u64>,
}

fn client(settings: &KafkaClientSettings, group: &str) -> Result<BaseConsumer, ReplayError> {
    let mut c = settings.base();
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("client.id", "streamops-replay");
    Ok(c.create()?)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplayError> + Send + 'static,
) -> Result<T, ReplayError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReplayError::Invalid(format!("broker task failed: {e}")))?
}

/// The live members of `group` (empty when the group is empty or unknown).
pub async fn group_members(
    settings: &KafkaClientSettings,
    group: &str,
) -> Result<Vec<String>, ReplayError> {
    let settings = settings.clone();
    let group = group.to_string();
    blocking(move || {
        let c = client(&settings, &format!("{group}-replay-admin"))?;
        let list = c.fetch_group_list(Some(&group), BROKER_TIMEOUT)?;
        Ok(list
            .groups()
            .iter()
            .filter(|g| g.name() == group)
            .flat_map(|g| g.members())
            .map(|m| format!("{} on {}", m.client_id(), m.client_host()))
            .collect())
    })
    .await
}

/// Refuses while `group` has live members, after waiting up to `wait` for it to empty.
pub async fn ensure_idle(
    settings: &KafkaClientSettings,
    group: &str,
    wait: Duration,
) -> Result<(), ReplayError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let members = group_members(settings, group).await?;
        if members.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ReplayError::GroupActive {
                group: group.to_string(),
                members,
            });
        }
        tracing::info!(
            group,
            members = members.len(),
            "waiting for the consumer group to empty"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Resolves `target` to one position per partition of `topics` (explicit offsets: the named
/// partitions only, checked against the partitions and the offsets the broker holds).
pub async fn resolve(
    settings: &KafkaClientSettings,
    group: &str,
    topics: &[String],
    target: &ReplayTarget,
) -> Result<Vec<PartitionOffset>, ReplayError> {
    let settings = settings.clone();
    let group = group.to_string();
    let topics = topics.to_vec();
    let target = target.clone();
    blocking(move || {
        let c = client(&settings, &group)?;
        let mut partitions: Vec<(String, i32)> = Vec::new();
        for t in &topics {
            let md = c.fetch_metadata(Some(t), BROKER_TIMEOUT)?;
            let Some(mt) = md.topics().iter().find(|x| x.name() == t) else {
                return Err(ReplayError::Invalid(format!("topic {t} does not exist")));
            };
            if mt.partitions().is_empty() {
                return Err(ReplayError::Invalid(format!(
                    "topic {t} does not exist or has no partitions"
                )));
            }
            for p in mt.partitions() {
                partitions.push((t.clone(), p.id()));
            }
        }
        let mut out = Vec::new();
        match &target {
            ReplayTarget::Earliest => {
                for (t, p) in &partitions {
                    let (low, _) = c.fetch_watermarks(t, *p, BROKER_TIMEOUT)?;
                    out.push(PartitionOffset {
                        topic: t.clone(),
                        partition: *p,
                        offset: low.max(0),
                    });
                }
            }
            ReplayTarget::Timestamp(ms) => {
                let mut tpl = TopicPartitionList::new();
                for (t, p) in &partitions {
                    tpl.add_partition_offset(t, *p, Offset::Offset(*ms))?;
                }
                let found = c.offsets_for_times(tpl, BROKER_TIMEOUT)?;
                for e in found.elements() {
                    let offset = match e.offset() {
                        Offset::Offset(o) => o,
                        // No message at or after the timestamp: the end of the partition.
                        _ => c.fetch_watermarks(e.topic(), e.partition(), BROKER_TIMEOUT)?.1,
                    };
                    out.push(PartitionOffset {
                        topic: e.topic().to_string(),
                        partition: e.partition(),
                        offset: offset.max(0),
                    });
                }
            }
            ReplayTarget::Offsets(given) => {
                for g in given {
                    if !partitions
                        .iter()
                        .any(|(t, p)| *t == g.topic && *p == g.partition)
                    {
                        return Err(ReplayError::Invalid(format!(
                            "{}:{} is not a partition of the consumer's topics ({})",
                            g.topic,
                            g.partition,
                            topics.join(", ")
                        )));
                    }
                    let (low, high) = c.fetch_watermarks(&g.topic, g.partition, BROKER_TIMEOUT)?;
                    if g.offset < low || g.offset > high {
                        return Err(ReplayError::Invalid(format!(
                            "offset {} of {}:{} is outside the offsets the broker holds ({low}..={high})",
                            g.offset, g.topic, g.partition
                        )));
                    }
                    out.push(g.clone());
                }
            }
        }
        out.sort();
        out.dedup_by(|a, b| a.topic == b.topic && a.partition == b.partition);
        Ok(out)
    })
    .await
}

/// The offsets of record of `group`, in topic/partition order.
pub async fn stored_offsets(
    pool: &PgPool,
    group: &str,
) -> Result<Vec<PartitionOffset>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT topic, partition, next_offset FROM streamops_offsets
          WHERE consumer_group = $1 ORDER BY topic, partition",
    )
    .bind(group)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(PartitionOffset {
                topic: r.try_get("topic")?,
                partition: r.try_get("partition")?,
                offset: r.try_get("next_offset")?,
            })
        })
        .collect()
}

/// One partition in the listing of `streamops-worker offsets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OffsetRow {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset of record (PostgreSQL): the next message to process; none before the first batch.
    pub stored: Option<i64>,
    /// The broker's end offset (high watermark).
    pub end: Option<i64>,
    /// `end - stored`.
    pub lag: Option<i64>,
}

/// The offsets of record of every partition of the configured topics (and of partitions of
/// record no longer in the topics), with the broker's end offsets.
pub async fn offsets_with_ends(
    pool: &PgPool,
    settings: &KafkaClientSettings,
    config: &WorkerConfig,
) -> Result<Vec<OffsetRow>, ReplayError> {
    let group = config.kafka.group_id.clone();
    let stored = stored_offsets(pool, &group).await?;
    let ends = resolve_ends(settings, &group, &config.kafka.topics).await?;
    let mut rows: BTreeMap<(String, i32), OffsetRow> = BTreeMap::new();
    for e in ends {
        rows.insert(
            (e.topic.clone(), e.partition),
            OffsetRow {
                topic: e.topic,
                partition: e.partition,
                stored: None,
                end: Some(e.offset),
                lag: None,
            },
        );
    }
    for s in stored {
        let row = rows
            .entry((s.topic.clone(), s.partition))
            .or_insert_with(|| OffsetRow {
                topic: s.topic.clone(),
                partition: s.partition,
                stored: None,
                end: None,
                lag: None,
            });
        row.stored = Some(s.offset);
        row.lag = row.end.map(|e| (e - s.offset).max(0));
    }
    Ok(rows.into_values().collect())
}

async fn resolve_ends(
    settings: &KafkaClientSettings,
    group: &str,
    topics: &[String],
) -> Result<Vec<PartitionOffset>, ReplayError> {
    let settings = settings.clone();
    let group = group.to_string();
    let topics = topics.to_vec();
    blocking(move || {
        let c = client(&settings, &group)?;
        let mut out = Vec::new();
        for t in &topics {
            let md = c.fetch_metadata(Some(t), BROKER_TIMEOUT)?;
            for mt in md.topics().iter().filter(|x| x.name() == t) {
                for p in mt.partitions() {
                    let (_, high) = c.fetch_watermarks(t, p.id(), BROKER_TIMEOUT)?;
                    out.push(PartitionOffset {
                        topic: t.clone(),
                        partition: p.id(),
                        offset: high,
                    });
                }
            }
        }
        Ok(out)
    })
    .await
}

/// The replay recorded under `request_id` for `group`, if any.
pub async fn recorded(
    pool: &PgPool,
    group: &str,
    request_id: &str,
) -> Result<Option<ReplayOutcome>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT positions, deleted FROM streamops_replays
          WHERE consumer_group = $1 AND request_id = $2",
    )
    .bind(group)
    .bind(request_id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let positions: sqlx::types::Json<Vec<PartitionOffset>> = row.try_get("positions")?;
    let deleted: sqlx::types::Json<BTreeMap<String, u64>> = row.try_get("deleted")?;
    Ok(Some(ReplayOutcome {
        request_id: request_id.to_string(),
        applied_now: false,
        positions: positions.0,
        deleted: deleted.0,
    }))
}

/// Step 3 of the sequence: in one transaction, records the request, writes `positions` as the
/// offsets of record and rebuilds the handler's tables (see [`rebuild`]). A request already
/// recorded changes nothing and returns what it did then.
pub async fn apply(
    pool: &PgPool,
    config: &WorkerConfig,
    redis_url: Option<&str>,
    request_id: &str,
    target: &ReplayTarget,
    positions: &[PartitionOffset],
) -> Result<ReplayOutcome, ReplayError> {
    let group = config.kafka.group_id.as_str();
    let mut tx = pool.begin().await?;
    // Serialises replays of one group (and waits for a concurrent one to finish).
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('streamops-replay:' || $1))")
        .bind(group)
        .execute(&mut *tx)
        .await?;
    let claimed = sqlx::query(
        "INSERT INTO streamops_replays (consumer_group, request_id, target, positions, deleted)
         VALUES ($1, $2, $3, '[]', '{}') ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(request_id)
    .bind(target.describe())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if claimed == 0 {
        tx.rollback().await?;
        return recorded(pool, group, request_id).await?.ok_or_else(|| {
            ReplayError::Invalid(format!("replay {request_id} vanished while being read"))
        });
    }
    // The offsets of record: every partition named moves to its position; the rows are locked,
    // so a worker committing a batch now waits and then fails its compare-and-set.
    for p in positions {
        sqlx::query(
            "INSERT INTO streamops_offsets (consumer_group, topic, partition, next_offset)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer_group, topic, partition)
             DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        )
        .bind(group)
        .bind(&p.topic)
        .bind(p.partition)
        .bind(p.offset)
        .execute(&mut *tx)
        .await?;
    }
    let mut deleted = BTreeMap::new();
    let mut n = 0;
    for p in positions {
        n += sqlx::query(
            "DELETE FROM streamops_rejections
              WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND \"offset\" >= $4",
        )
        .bind(group)
        .bind(&p.topic)
        .bind(p.partition)
        .bind(p.offset)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    deleted.insert("streamops_rejections".to_string(), n);
    rebuild::rebuild(&mut tx, config, redis_url, positions, &mut deleted).await?;
    sqlx::query(
        "UPDATE streamops_replays SET positions = $3, deleted = $4
          WHERE consumer_group = $1 AND request_id = $2",
    )
    .bind(group)
    .bind(request_id)
    .bind(sqlx::types::Json(positions))
    .bind(sqlx::types::Json(&deleted))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(ReplayOutcome {
        request_id: request_id.to_string(),
        applied_now: true,
        positions: positions.to_vec(),
        deleted,
    })
}

async fn kafka_committed(
    pool: &PgPool,
    group: &str,
    request_id: &str,
) -> Result<bool, sqlx::Error> {
    let at: Option<Option<chrono::DateTime<chrono::Utc>>> = sqlx::query_scalar(
        "SELECT kafka_committed_at FROM streamops_replays
          WHERE consumer_group = $1 AND request_id = $2",
    )
    .bind(group)
    .bind(request_id)
    .fetch_optional(pool)
    .await?;
    Ok(at.flatten().is_some())
}

async fn mark_kafka_committed(
    pool: &PgPool,
    group: &str,
    request_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE streamops_replays SET kafka_committed_at = now()
          WHERE consumer_group = $1 AND request_id = $2",
    )
    .bind(group)
    .bind(request_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Step 4: commits `positions` to Kafka for `group` (advisory; lag tools read it).
pub async fn commit_to_kafka(
    settings: &KafkaClientSettings,
    group: &str,
    positions: &[PartitionOffset],
) -> Result<(), ReplayError> {
    if positions.is_empty() {
        return Ok(());
    }
    let settings = settings.clone();
    let group = group.to_string();
    let positions = positions.to_vec();
    blocking(move || {
        let c = client(&settings, &group)?;
        let mut tpl = TopicPartitionList::new();
        for p in &positions {
            tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.offset))?;
        }
        c.commit(&tpl, CommitMode::Sync)?;
        Ok(())
    })
    .await
}

/// Inputs of [`run`].
pub struct ReplayRequest<'a> {
    /// The worker configuration of the StreamConsumer.
    pub config: &'a WorkerConfig,
    /// Kafka connection settings.
    pub kafka: &'a KafkaClientSettings,
    /// PostgreSQL, migrations applied.
    pub pool: &'a PgPool,
    /// Redis URL (pipeline-trigger).
    pub redis_url: Option<&'a str>,
    /// Unique per request: the same id never runs twice.
    pub request_id: &'a str,
    /// Where to start again.
    pub target: &'a ReplayTarget,
    /// How long to wait for the group to empty before refusing.
    pub wait_idle: Duration,
}

/// The whole sequence (see the module docs).
pub async fn run(req: ReplayRequest<'_>) -> Result<ReplayOutcome, ReplayError> {
    let group = req.config.kafka.group_id.as_str();
    if let Some(done) = recorded(req.pool, group, req.request_id).await? {
        if kafka_committed(req.pool, group, req.request_id).await? {
            tracing::info!(
                request_id = req.request_id,
                "replay already applied; nothing to do"
            );
        } else {
            tracing::info!(
                request_id = req.request_id,
                "replay already applied; its positions still have to be committed to Kafka"
            );
            ensure_idle(req.kafka, group, req.wait_idle).await?;
            commit_to_kafka(req.kafka, group, &done.positions).await?;
            mark_kafka_committed(req.pool, group, req.request_id).await?;
        }
        return Ok(done);
    }
    ensure_idle(req.kafka, group, req.wait_idle).await?;
    let positions = resolve(req.kafka, group, &req.config.kafka.topics, req.target).await?;
    let outcome = apply(
        req.pool,
        req.config,
        req.redis_url,
        req.request_id,
        req.target,
        &positions,
    )
    .await?;
    commit_to_kafka(req.kafka, group, &outcome.positions).await?;
    mark_kafka_committed(req.pool, group, req.request_id).await?;
    tracing::info!(
        request_id = req.request_id,
        applied_now = outcome.applied_now,
        partitions = outcome.positions.len(),
        "replay done"
    );
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_offsets_parse_as_topic_partition_equals_offset() {
        let p: PartitionOffset = "price-events:2=150".parse().unwrap();
        assert_eq!(
            p,
            PartitionOffset {
                topic: "price-events".into(),
                partition: 2,
                offset: 150
            }
        );
        for bad in ["price-events=1", "t:x=1", "t:1=-3", ":1=2", "t:1"] {
            assert!(bad.parse::<PartitionOffset>().is_err(), "{bad}");
        }
    }
}
