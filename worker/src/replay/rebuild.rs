//! What a replay means for each handler's tables: the state at the reset point, so that
//! processing the messages from there again gives exactly the rows of an uninterrupted run.
//! Everything runs in the replay's transaction, after the offsets of record were moved.
//!
//! | handler | at and after the reset point of a partition | restored |
//! |---|---|---|
//! | moving-average | `price_points` and `moving_averages` rows deleted | windows reload from the remaining `price_points` (the handler does that itself) |
//! | sensor | `sensor_readings` deleted; episodes opened there deleted | episodes closed there reopened; each touched machine's `first_seen`, `last_seen` and last applied reading recomputed from its remaining readings (a machine left without readings is deleted) |
//! | fraud | `transactions` first stored there deleted, with their `predictions` | nothing else: the transactions are scored again (the reference scorer is deterministic; a different model version gives that version's scores, as an uninterrupted run with it would) |
//! | pipeline-trigger | the recorded counted offsets there deleted; triggers whose window needs events there (by count, or by a range reaching a reset point), and all later ones, deleted from `pipeline_runs` and from Redis | the Redis counter (offsets per partition, events total, events in the window, sequence, last trigger) as it stood after the last kept trigger; triggers claimed again get the same sequence numbers, so the same trigger ids and webhook `Idempotency-Key`s (Job targets: the same Job names) |
//!
//! Limits, stated rather than hidden: timestamps set from the wall clock (`created_at`,
//! `claimed_at`, `delivered_at`, and pipeline-trigger's window times, which are Redis server
//! time) are those of the replay. A pipeline-trigger time trigger depends on when events arrive,
//! so it is only reproduced by the count that caused it, not by its time. The open
//! pipeline-trigger window comes back with exactly the counted events before the reset points
//! that no kept trigger holds (per partition, first and last offset and count); when a replay
//! moves only some partitions back into a claimed trigger, that window can hold more than
//! `maxEvents`, and the next counted event triggers it with all of them (the payload's count and
//! ranges still agree; no event is in two triggers). Its trace contexts are not restored.
//! Rejected messages are sent to the error topic again (the headers carry their source
//! position).

use std::collections::BTreeMap;

use sqlx::postgres::PgArguments;
use sqlx::query::{Query, QueryScalar};
use sqlx::{PgConnection, Postgres, Row};
use streamops_crds::{Handler, WorkerConfig};

use super::{PartitionOffset, ReplayError};
use crate::handlers::pipeline_trigger::{Claimed, Keys};

/// Restores the handler's tables of `config` to the reset `positions`; adds the rows deleted per
/// table to `deleted`.
pub async fn rebuild(
    tx: &mut PgConnection,
    config: &WorkerConfig,
    redis_url: Option<&str>,
    positions: &[PartitionOffset],
    deleted: &mut BTreeMap<String, u64>,
) -> Result<(), ReplayError> {
    match &config.handler {
        Handler::MovingAverage(_) => moving_average(tx, positions, deleted).await?,
        Handler::Sensor(_) => sensor(tx, positions, deleted).await?,
        Handler::Fraud(_) => fraud(tx, positions, deleted).await?,
        Handler::PipelineTrigger(_) => {
            let url = redis_url.ok_or_else(|| {
                ReplayError::Invalid(
                    "a pipeline-trigger replay needs Redis: set STREAMOPS_REDIS_URL".into(),
                )
            })?;
            pipeline_trigger(tx, config, url, positions, deleted).await?
        }
    }
    Ok(())
}

/// A statement whose `$1`, `$2` and `$3` are the topic, partition and offset of `p`.
fn at<'q>(sql: &'q str, p: &'q PartitionOffset) -> Query<'q, Postgres, PgArguments> {
    sqlx::query(sql)
        .bind(&p.topic)
        .bind(p.partition)
        .bind(p.offset)
}

/// [`at`] for a statement that returns one column.
fn scalars_at<'q, T>(
    sql: &'q str,
    p: &'q PartitionOffset,
) -> QueryScalar<'q, Postgres, T, PgArguments>
where
    (T,): for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    sqlx::query_scalar(sql)
        .bind(&p.topic)
        .bind(p.partition)
        .bind(p.offset)
}

fn add(deleted: &mut BTreeMap<String, u64>, table: &str, n: u64) {
    *deleted.entry(table.to_string()).or_default() += n;
}

/// Deletes the rows of `table` at and after each position (`topic`, `partition`, `offset` are the
/// table's column names).
async fn delete_from(
    tx: &mut PgConnection,
    table: &str,
    cols: (&str, &str, &str),
    positions: &[PartitionOffset],
    deleted: &mut BTreeMap<String, u64>,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "DELETE FROM {table} WHERE {} = $1 AND {} = $2 AND {} >= $3",
        cols.0, cols.1, cols.2
    );
    for p in positions {
        let n = at(&sql, p).execute(&mut *tx).await?.rows_affected();
        add(deleted, table, n);
    }
    Ok(())
}

async fn moving_average(
    tx: &mut PgConnection,
    positions: &[PartitionOffset],
    deleted: &mut BTreeMap<String, u64>,
) -> Result<(), sqlx::Error> {
    let cols = ("topic", "partition", "\"offset\"");
    delete_from(tx, "moving_averages", cols, positions, deleted).await?;
    delete_from(tx, "price_points", cols, positions, deleted).await
}

async fn sensor(
    tx: &mut PgConnection,
    positions: &[PartitionOffset],
    deleted: &mut BTreeMap<String, u64>,
) -> Result<(), sqlx::Error> {
    for p in positions {
        // The machines whose readings go: their state is recomputed below.
        let machines: Vec<String> = scalars_at(
            "WITH gone AS (
                 DELETE FROM sensor_readings
                  WHERE source_topic = $1 AND source_partition = $2 AND source_offset >= $3
              RETURNING machine_id)
             SELECT machine_id FROM gone",
            p,
        )
        .fetch_all(&mut *tx)
        .await?;
        add(deleted, "sensor_readings", machines.len() as u64);
        let mut machines = machines;
        machines.sort();
        machines.dedup();
        let n = at(
            "DELETE FROM failures
              WHERE opened_topic = $1 AND opened_partition = $2 AND opened_offset >= $3",
            p,
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        add(deleted, "failures", n);
        // Episodes that were open at the reset point are open again.
        at(
            "UPDATE failures SET ended_at = NULL, active = TRUE,
                    closed_topic = NULL, closed_partition = NULL, closed_offset = NULL
              WHERE closed_topic = $1 AND closed_partition = $2 AND closed_offset >= $3",
            p,
        )
        .execute(&mut *tx)
        .await?;
        if machines.is_empty() {
            continue;
        }
        // first_seen is the earliest reading received and last_seen the latest (a late reading
        // is by definition older than last_seen), so both follow from the remaining readings;
        // the last applied reading is the last remaining one in partition order.
        sqlx::query(
            "UPDATE machines m
                SET first_seen = r.first_seen, last_seen = r.last_seen,
                    applied_topic = r.topic, applied_partition = r.partition,
                    applied_offset = r.off
               FROM (SELECT s.machine_id,
                            min(s.reading_time) AS first_seen, max(s.reading_time) AS last_seen,
                            (array_agg(s.source_topic ORDER BY s.source_partition = $2 AND s.source_topic = $1, s.source_offset))[count(*)] AS topic,
                            (array_agg(s.source_partition ORDER BY s.source_partition = $2 AND s.source_topic = $1, s.source_offset))[count(*)] AS partition,
                            (array_agg(s.source_offset ORDER BY s.source_partition = $2 AND s.source_topic = $1, s.source_offset))[count(*)] AS off
                       FROM sensor_readings s
                      WHERE s.machine_id = ANY($3)
                      GROUP BY s.machine_id) r
              WHERE m.machine_id = r.machine_id",
        )
        .bind(&p.topic)
        .bind(p.partition)
        .bind(&machines)
        .execute(&mut *tx)
        .await?;
        let n = sqlx::query(
            "DELETE FROM machines m
              WHERE m.machine_id = ANY($1)
                AND NOT EXISTS (SELECT 1 FROM sensor_readings s WHERE s.machine_id = m.machine_id)",
        )
        .bind(&machines)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        add(deleted, "machines", n);
    }
    Ok(())
}

async fn fraud(
    tx: &mut PgConnection,
    positions: &[PartitionOffset],
    deleted: &mut BTreeMap<String, u64>,
) -> Result<(), sqlx::Error> {
    for p in positions {
        let ids: Vec<String> = scalars_at(
            "WITH gone AS (
                 DELETE FROM transactions
                  WHERE source_topic = $1 AND source_partition = $2 AND source_offset >= $3
              RETURNING transaction_id)
             SELECT transaction_id FROM gone",
            p,
        )
        .fetch_all(&mut *tx)
        .await?;
        add(deleted, "transactions", ids.len() as u64);
        let n = sqlx::query("DELETE FROM predictions WHERE transaction_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        add(deleted, "predictions", n);
    }
    Ok(())
}

/// Rewinds the Redis counter of a consumer. KEYS: events, state, offsets, pending, last_trigger,
/// window, window_traces (emptied: the open window's trace contexts are not kept in PostgreSQL,
/// and those of the events counted again join it again). ARGV: seq, window events, events total,
/// last trigger JSON ('' for none), lease key prefix, the number k of the window's partitions, k
/// pairs (`topic:partition`, `first:last:events`), then pairs of (`topic:partition`, last counted
/// offset, -1 for none).
const REWIND_LUA: &str = r#"
local seq = tonumber(ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
redis.call('HSET', KEYS[2], 'seq', ARGV[1], 'events_total', ARGV[3])
redis.call('HDEL', KEYS[2], 'window_start_ms')
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[4] == '' then
  redis.call('DEL', KEYS[5])
else
  redis.call('SET', KEYS[5], ARGV[4])
end
for _, f in ipairs(redis.call('HKEYS', KEYS[4])) do
  if tonumber(f) > seq then redis.call('HDEL', KEYS[4], f) end
end
for s = seq + 1, old do
  redis.call('DEL', ARGV[5] .. s)
end
redis.call('DEL', KEYS[6])
redis.call('DEL', KEYS[7])
local k = tonumber(ARGV[6])
local i = 7
for _ = 1, k do
  redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  if tonumber(ARGV[i + 1]) < 0 then
    redis.call('HDEL', KEYS[3], ARGV[i])
  else
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
return old
"#;

async fn pipeline_trigger(
    tx: &mut PgConnection,
    config: &WorkerConfig,
    redis_url: &str,
    positions: &[PartitionOffset],
    deleted: &mut BTreeMap<String, u64>,
) -> Result<(), ReplayError> {
    let consumer = config.consumer_id.as_str();
    for p in positions {
        let n = sqlx::query(
            "DELETE FROM pipeline_trigger_counted
              WHERE consumer_id = $1 AND topic = $2 AND partition = $3 AND first_offset >= $4",
        )
        .bind(consumer)
        .bind(&p.topic)
        .bind(p.partition)
        .bind(p.offset)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        add(deleted, "pipeline_trigger_counted", n);
        sqlx::query(
            "UPDATE pipeline_trigger_counted
                SET offsets = ARRAY(SELECT o FROM unnest(offsets) AS o WHERE o < $4 ORDER BY o)
              WHERE consumer_id = $1 AND topic = $2 AND partition = $3 AND first_offset < $4",
        )
        .bind(consumer)
        .bind(&p.topic)
        .bind(p.partition)
        .bind(p.offset)
        .execute(&mut *tx)
        .await?;
    }
    // Events counted before the reset point, in every partition.
    let events: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(cardinality(offsets)), 0)::int8 FROM pipeline_trigger_counted
          WHERE consumer_id = $1",
    )
    .bind(consumer)
    .fetch_one(&mut *tx)
    .await?;
    // Triggers are kept while the events they consumed lie before the reset point.
    let runs = sqlx::query(
        "SELECT seq, reason, event_count, window_start, window_end, pipeline_name, offsets
           FROM pipeline_runs WHERE consumer_id = $1 ORDER BY seq FOR UPDATE",
    )
    .bind(consumer)
    .fetch_all(&mut *tx)
    .await?;
    let mut consumed: i64 = 0;
    let mut kept: Option<Claimed> = None;
    // Per partition, the last offset that a kept trigger's window holds.
    let mut windowed: BTreeMap<(String, i32), i64> = BTreeMap::new();
    // Where each partition named by the replay starts again.
    let reset: BTreeMap<(&str, i32), i64> = positions
        .iter()
        .map(|p| ((p.topic.as_str(), p.partition), p.offset))
        .collect();
    for r in &runs {
        let count: i64 = r.try_get("event_count")?;
        if consumed + count > events {
            break;
        }
        // A trigger whose window holds an event at or after a reset point cannot stand, even
        // when enough events lie before the reset points overall (they need not be a prefix of
        // the counting order when only some partitions go back): that event is counted again.
        let ranges = crate::handlers::pipeline_trigger::runs::offsets_of(r)?;
        if ranges.iter().any(|g| {
            reset
                .get(&(g.topic.as_str(), g.partition))
                .is_some_and(|&at| g.last_offset >= at)
        }) {
            break;
        }
        consumed += count;
        let reason: String = r.try_get("reason")?;
        let start: chrono::DateTime<chrono::Utc> = r.try_get("window_start")?;
        let end: chrono::DateTime<chrono::Utc> = r.try_get("window_end")?;
        kept = Some(Claimed {
            seq: r.try_get::<i64, _>("seq")?.max(0) as u64,
            reason: serde_json::from_value(serde_json::Value::String(reason.clone())).map_err(
                |_| ReplayError::Invalid(format!("pipeline_runs holds an unknown reason {reason}")),
            )?,
            event_count: count.max(0) as u64,
            window_start_ms: start.timestamp_millis(),
            window_end_ms: end.timestamp_millis(),
            pipeline: r.try_get("pipeline_name")?,
            offsets: ranges,
            traces: Vec::new(),
        });
        for range in kept.iter().flat_map(|k| &k.offsets) {
            let done = windowed
                .entry((range.topic.clone(), range.partition))
                .or_insert(range.last_offset);
            *done = (*done).max(range.last_offset);
        }
    }
    let kept_seq = kept.as_ref().map_or(0, |k| k.seq);
    let n = sqlx::query("DELETE FROM pipeline_runs WHERE consumer_id = $1 AND seq > $2")
        .bind(consumer)
        .bind(kept_seq as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    add(deleted, "pipeline_runs", n);

    // Redis: every partition of record counts again from its offset of record.
    let stored = sqlx::query(
        "SELECT topic, partition, next_offset FROM streamops_offsets WHERE consumer_group = $1",
    )
    .bind(&config.kafka.group_id)
    .fetch_all(&mut *tx)
    .await?;
    // The open window: per partition, the counted events after the kept triggers' windows.
    let (topics, partitions, done): (Vec<String>, Vec<i32>, Vec<i64>) = windowed
        .into_iter()
        .map(|((t, p), o)| (t, p, o))
        .fold(Default::default(), |(mut a, mut b, mut c), (t, p, o)| {
            a.push(t);
            b.push(p);
            c.push(o);
            (a, b, c)
        });
    let window = sqlx::query(
        "SELECT c.topic, c.partition, min(o)::int8 AS first, max(o)::int8 AS last,
                count(*)::int8 AS events
           FROM pipeline_trigger_counted c
           CROSS JOIN LATERAL unnest(c.offsets) AS o
           LEFT JOIN unnest($2::text[], $3::int4[], $4::int8[]) AS d(topic, partition, done)
             ON d.topic = c.topic AND d.partition = c.partition
          WHERE c.consumer_id = $1 AND o > coalesce(d.done, -1)
          GROUP BY c.topic, c.partition",
    )
    .bind(consumer)
    .bind(&topics)
    .bind(&partitions)
    .bind(&done)
    .fetch_all(&mut *tx)
    .await?;
    let keys = Keys::new(consumer);
    let last_json = match &kept {
        Some(k) => serde_json::to_string(k)
            .map_err(|e| ReplayError::Invalid(format!("cannot encode the last trigger: {e}")))?,
        None => String::new(),
    };
    let script = redis::Script::new(REWIND_LUA);
    let mut inv = script.prepare_invoke();
    inv.key(&keys.events)
        .key(&keys.state)
        .key(&keys.offsets)
        .key(&keys.pending)
        .key(&keys.last_trigger)
        .arg(kept_seq)
        .arg(events - consumed)
        .arg(events)
        .arg(last_json)
        .arg(keys.lease(0).trim_end_matches('0'))
        .arg(window.len())
        .key(&keys.window)
        .key(&keys.window_traces);
    for r in &window {
        let topic: String = r.try_get("topic")?;
        let partition: i32 = r.try_get("partition")?;
        let (first, last, n): (i64, i64, i64) = (
            r.try_get("first")?,
            r.try_get("last")?,
            r.try_get("events")?,
        );
        inv.arg(format!("{topic}:{partition}"))
            .arg(format!("{first}:{last}:{n}"));
    }
    for r in &stored {
        let topic: String = r.try_get("topic")?;
        let partition: i32 = r.try_get("partition")?;
        let next: i64 = r.try_get("next_offset")?;
        inv.arg(format!("{topic}:{partition}")).arg(next - 1);
    }
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let old_seq: i64 = inv.invoke_async(&mut conn).await?;
    tracing::info!(
        consumer,
        events_before = events,
        kept_seq,
        old_seq,
        window_events = events - consumed,
        "pipeline-trigger counter rewound"
    );
    Ok(())
}
