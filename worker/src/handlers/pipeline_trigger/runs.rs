//! The `pipeline_runs` table.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Row};

use super::trigger::{ms_to_time, trigger_id, Claimed, PartitionRange, Reason, TraceContext};

/// `webhook` or `job`.
pub type Target = &'static str;

/// Records claimed triggers as `pending` (no-op for those already recorded). The conflict target
/// is left open: a concurrent insert of the same trigger may hit either unique index first.
pub async fn record_claimed(
    conn: &mut PgConnection,
    consumer_id: &str,
    target: Target,
    triggers: &[Claimed],
) -> Result<(), sqlx::Error> {
    if triggers.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = triggers
        .iter()
        .map(|t| trigger_id(consumer_id, t.seq))
        .collect();
    let pipelines: Vec<&str> = triggers.iter().map(|t| t.pipeline.as_str()).collect();
    let seqs: Vec<i64> = triggers.iter().map(|t| t.seq as i64).collect();
    let reasons: Vec<&str> = triggers.iter().map(|t| t.reason.as_str()).collect();
    let counts: Vec<i64> = triggers.iter().map(|t| t.event_count as i64).collect();
    let starts: Vec<DateTime<Utc>> = triggers
        .iter()
        .map(|t| ms_to_time(t.window_start_ms))
        .collect();
    let ends: Vec<DateTime<Utc>> = triggers
        .iter()
        .map(|t| ms_to_time(t.window_end_ms))
        .collect();
    let offsets: Vec<String> = triggers
        .iter()
        .map(|t| serde_json::to_string(&t.offsets).unwrap_or_else(|_| "[]".into()))
        .collect();
    let traces: Vec<String> = triggers
        .iter()
        .map(|t| serde_json::to_string(&t.traces).unwrap_or_else(|_| "[]".into()))
        .collect();
    sqlx::query(
        "INSERT INTO pipeline_runs (trigger_id, consumer_id, pipeline_name, seq, reason, event_count, \
             window_start, window_end, target, offsets, traces) \
         SELECT u.id, $1, u.p, u.s, u.r, u.c, u.ws, u.we, $2, u.o::jsonb, u.tr::jsonb \
         FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::text[], $7::int8[], \
                     $8::timestamptz[], $9::timestamptz[], $10::text[], $11::text[]) \
              AS u(id, p, s, r, c, ws, we, o, tr) \
         ON CONFLICT DO NOTHING",
    )
    .bind(consumer_id)
    .bind(target)
    .bind(&ids)
    .bind(&pipelines)
    .bind(&seqs)
    .bind(&reasons)
    .bind(&counts)
    .bind(&starts)
    .bind(&ends)
    .bind(&offsets)
    .bind(&traces)
    .execute(conn)
    .await?;
    Ok(())
}

/// The status of a trigger already `delivered` or `failed`; `None` while it is pending (or not
/// recorded). A worker that took over a trigger whose previous owner recorded the outcome but
/// stopped before it finished the trigger in Redis settles it from this, without sending again.
pub async fn settled(pool: &PgPool, trigger_id: &str) -> Result<Option<String>, sqlx::Error> {
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM pipeline_runs WHERE trigger_id = $1 AND status <> 'pending'",
    )
    .bind(trigger_id)
    .fetch_optional(pool)
    .await?;
    Ok(status)
}

/// Counts one delivery attempt.
pub async fn attempt_started(pool: &PgPool, trigger_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pipeline_runs SET attempts = attempts + 1, updated_at = now() WHERE trigger_id = $1",
    )
    .bind(trigger_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks a trigger delivered (idempotent: the first delivery time is kept).
pub async fn delivered(
    pool: &PgPool,
    trigger_id: &str,
    job_name: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pipeline_runs SET status = 'delivered', job_name = COALESCE($2, job_name), \
             delivered_at = COALESCE(delivered_at, now()), last_error = NULL, updated_at = now() \
         WHERE trigger_id = $1",
    )
    .bind(trigger_id)
    .bind(job_name)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a failed attempt's error; with `give_up`, marks the trigger failed.
pub async fn failed(
    pool: &PgPool,
    trigger_id: &str,
    error: &str,
    give_up: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pipeline_runs SET last_error = $2, \
             status = CASE WHEN $3 AND status <> 'delivered' THEN 'failed' ELSE status END, \
             updated_at = now() \
         WHERE trigger_id = $1",
    )
    .bind(trigger_id)
    .bind(error)
    .bind(give_up)
    .execute(pool)
    .await?;
    Ok(())
}

/// The highest recorded sequence number of a consumer (0 if none).
pub async fn max_seq(pool: &PgPool, consumer_id: &str) -> Result<u64, sqlx::Error> {
    let max: Option<i64> =
        sqlx::query_scalar("SELECT max(seq) FROM pipeline_runs WHERE consumer_id = $1")
            .bind(consumer_id)
            .fetch_one(pool)
            .await?;
    Ok(max.unwrap_or(0).max(0) as u64)
}

/// Triggers recorded as `pending`, by sequence number.
pub async fn pending(pool: &PgPool, consumer_id: &str) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, reason, event_count, window_start, window_end, pipeline_name, offsets, \
                traces \
         FROM pipeline_runs WHERE consumer_id = $1 AND status = 'pending' ORDER BY seq",
    )
    .bind(consumer_id)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let reason: String = r.try_get("reason")?;
        let start: DateTime<Utc> = r.try_get("window_start")?;
        let end: DateTime<Utc> = r.try_get("window_end")?;
        out.push(Claimed {
            seq: r.try_get::<i64, _>("seq")?.max(0) as u64,
            reason: if reason == "time" {
                Reason::Time
            } else {
                Reason::Count
            },
            event_count: r.try_get::<i64, _>("event_count")?.max(0) as u64,
            window_start_ms: start.timestamp_millis(),
            window_end_ms: end.timestamp_millis(),
            pipeline: r.try_get("pipeline_name")?,
            offsets: offsets_of(&r)?,
            traces: traces_of(&r)?,
        });
    }
    Ok(out)
}

/// The `offsets` column of a `pipeline_runs` row.
pub fn offsets_of(r: &sqlx::postgres::PgRow) -> Result<Vec<PartitionRange>, sqlx::Error> {
    let v: sqlx::types::Json<Vec<PartitionRange>> = r.try_get("offsets")?;
    Ok(v.0)
}

/// The `traces` column of a `pipeline_runs` row.
pub fn traces_of(r: &sqlx::postgres::PgRow) -> Result<Vec<TraceContext>, sqlx::Error> {
    let v: sqlx::types::Json<Vec<TraceContext>> = r.try_get("traces")?;
    Ok(v.0)
}

/// One `pipeline_runs` row, as `/consumer/info` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    /// Trigger id.
    pub trigger_id: String,
    /// Sequence number.
    pub sequence: i64,
    /// Pipeline.
    pub pipeline_name: String,
    /// `count` or `time`.
    pub reason: String,
    /// Events in the window.
    pub event_count: i64,
    /// Window start.
    pub window_start: DateTime<Utc>,
    /// Window end.
    pub window_end: DateTime<Utc>,
    /// The window's offset range per partition.
    pub offsets: Vec<PartitionRange>,
    /// `webhook` or `job`.
    pub target: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    /// Delivery attempts.
    pub attempts: i32,
    /// Last delivery error.
    pub last_error: Option<String>,
    /// Job created.
    pub job_name: Option<String>,
    /// When it was delivered.
    pub delivered_at: Option<DateTime<Utc>>,
}

/// The latest recorded run of a consumer.
pub async fn last_run(pool: &PgPool, consumer_id: &str) -> Result<Option<Run>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT trigger_id, seq, pipeline_name, reason, event_count, window_start, window_end, \
                offsets, target, status, attempts, last_error, job_name, delivered_at \
         FROM pipeline_runs WHERE consumer_id = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(consumer_id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(Run {
            trigger_id: r.try_get("trigger_id")?,
            sequence: r.try_get("seq")?,
            pipeline_name: r.try_get("pipeline_name")?,
            reason: r.try_get("reason")?,
            event_count: r.try_get("event_count")?,
            window_start: r.try_get("window_start")?,
            window_end: r.try_get("window_end")?,
            offsets: offsets_of(&r)?,
            target: r.try_get("target")?,
            status: r.try_get("status")?,
            attempts: r.try_get("attempts")?,
            last_error: r.try_get("last_error")?,
            job_name: r.try_get("job_name")?,
            delivered_at: r.try_get("delivered_at")?,
        })
    })
    .transpose()
}

/// Records, in the batch's transaction, the offsets of the valid events a batch counted, per
/// partition (`pipeline_trigger_counted`): a replay needs to know how many events lie before its
/// reset point (see `crate::replay::rebuild`).
pub async fn record_counted<T>(
    conn: &mut PgConnection,
    consumer_id: &str,
    items: &[crate::handlers::Decoded<T>],
) -> Result<(), sqlx::Error> {
    let mut by_partition: std::collections::BTreeMap<(&str, i32), Vec<i64>> =
        std::collections::BTreeMap::new();
    for d in items {
        by_partition
            .entry((&d.pos.topic, d.pos.partition))
            .or_default()
            .push(d.pos.offset);
    }
    for ((topic, partition), offsets) in by_partition {
        sqlx::query(
            "INSERT INTO pipeline_trigger_counted (consumer_id, topic, partition, first_offset, offsets) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(consumer_id)
        .bind(topic)
        .bind(partition)
        .bind(offsets.iter().copied().min().unwrap_or_default())
        .bind(&offsets)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
