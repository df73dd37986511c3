//! PostgreSQL side of the sensor handler: loading machine state and writing a batch plan. Every
//! statement works on whole batches (binary `COPY`, or `UNNEST` of arrays), so a batch costs a
//! handful of round trips whatever its size.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use super::episodes::{BatchPlan, Link, MachineState, OpenFailure, ReadingRow};
use crate::copy::{copy_or_insert, BinaryCopy};
use crate::handlers::Position;

/// Loads the state of the given machines, as committed: dates, and the open episode if any.
/// Machines never seen are absent from the result.
pub async fn load_states(
    conn: &mut PgConnection,
    machines: &[String],
) -> Result<HashMap<String, MachineState>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT m.machine_id, m.first_seen, m.last_seen, \
                m.applied_topic, m.applied_partition, m.applied_offset, \
                f.failure_id, f.started_at, f.opened_topic, f.opened_partition, f.opened_offset \
         FROM machines m \
         LEFT JOIN failures f ON f.machine_id = m.machine_id AND f.active \
         WHERE m.machine_id = ANY($1)",
    )
    .bind(machines)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let failure_id: Option<String> = row.try_get("failure_id")?;
        let open = match failure_id {
            Some(id) => {
                let topic: String = row.try_get("opened_topic")?;
                Some(OpenFailure {
                    id,
                    started_at: row.try_get("started_at")?,
                    opened_by: Position {
                        topic: Arc::from(topic),
                        partition: row.try_get("opened_partition")?,
                        offset: row.try_get("opened_offset")?,
                    },
                })
            }
            None => None,
        };
        let applied_topic: String = row.try_get("applied_topic")?;
        out.insert(
            row.try_get("machine_id")?,
            MachineState {
                first_seen: row.try_get("first_seen")?,
                last_seen: row.try_get("last_seen")?,
                open,
                last_applied: Some(Position {
                    topic: Arc::from(applied_topic),
                    partition: row.try_get("applied_partition")?,
                    offset: row.try_get("applied_offset")?,
                }),
            },
        );
    }
    Ok(out)
}

/// The episode an in-order reading links to.
fn link_of(r: &ReadingRow) -> Option<&str> {
    match &r.link {
        Link::Failure(id) => Some(id),
        Link::None | Link::Lookup => None,
    }
}

/// Column arrays of a set of readings.
#[derive(Default)]
struct ReadingColumns {
    topics: Vec<String>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    machines: Vec<String>,
    times: Vec<DateTime<Utc>>,
    values: Vec<String>,
    failures: Vec<bool>,
    links: Vec<Option<String>>,
}

impl ReadingColumns {
    fn of(rows: &[&ReadingRow]) -> Self {
        let mut c = Self::default();
        for r in rows {
            c.push(r, link_of(r).map(str::to_string));
        }
        c
    }

    fn push(&mut self, r: &ReadingRow, link: Option<String>) {
        self.topics.push(r.pos.topic.to_string());
        self.partitions.push(r.pos.partition);
        self.offsets.push(r.pos.offset);
        self.machines.push(r.machine_id.clone());
        self.times.push(r.timestamp);
        self.values.push(r.values.clone());
        self.failures.push(r.failure);
        self.links.push(link);
    }

    /// Binds `$1` to `$7`: topics, partitions, offsets, machines, times, values, failures.
    fn bind<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        query
            .bind(&self.topics)
            .bind(&self.partitions)
            .bind(&self.offsets)
            .bind(&self.machines)
            .bind(&self.times)
            .bind(&self.values)
            .bind(&self.failures)
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binary `COPY` of `sensor_readings`, in the column order of [`reading_row`].
pub const READINGS_COPY: &str = "COPY sensor_readings (source_topic, source_partition, \
    source_offset, machine_id, reading_time, sensor_values, failure, failure_id, late) \
    FROM STDIN (FORMAT binary)";

/// Appends one `sensor_readings` row (see [`READINGS_COPY`]) for `r`: linked to its episode if it
/// is in order and has one, `late` if its episode is looked up by timestamp.
pub fn reading_row(copy: &mut BinaryCopy, r: &ReadingRow) {
    copy.row()
        .text(&r.pos.topic)
        .int4(r.pos.partition)
        .int8(r.pos.offset)
        .text(&r.machine_id)
        .timestamptz(r.timestamp)
        .jsonb(&r.values)
        .bool(r.failure)
        .opt_text(link_of(r))
        .bool(matches!(r.link, Link::Lookup));
}

/// In-order readings go in by binary COPY, the fast path. COPY cannot skip rows already stored,
/// so it runs under a savepoint ([`copy_or_insert`]): should the batch hold a reading stored
/// before (a replay of committed messages, which the pipeline's offsets normally rule out), it is
/// rolled back to the savepoint and the rows are inserted with `ON CONFLICT DO NOTHING` instead.
async fn insert_in_order(conn: &mut PgConnection, rows: &[&ReadingRow]) -> Result<(), sqlx::Error> {
    let mut copy = BinaryCopy::with_capacity(9, rows.len() * 160);
    for r in rows {
        reading_row(&mut copy, r);
    }
    copy_or_insert(
        conn,
        "sensor_readings_copy",
        vec![(copy, READINGS_COPY)],
        |conn| insert_in_order_on_conflict(conn, rows),
    )
    .await?;
    Ok(())
}

/// The slow path of [`insert_in_order`]: `INSERT ... ON CONFLICT DO NOTHING`.
async fn insert_in_order_on_conflict(
    conn: &mut PgConnection,
    rows: &[&ReadingRow],
) -> Result<(), sqlx::Error> {
    tracing::warn!("sensor readings already stored in this batch; inserting the others");
    let c = ReadingColumns::of(rows);
    c.bind(sqlx::query(
        "INSERT INTO sensor_readings (source_topic, source_partition, source_offset, \
             machine_id, reading_time, sensor_values, failure, failure_id, late) \
         SELECT u.t, u.p, u.o, u.m, u.ts, u.v::jsonb, u.f, u.l, FALSE \
         FROM UNNEST($1::text[], $2::int4[], $3::int8[], $4::text[], $5::timestamptz[], \
                     $6::text[], $7::bool[], $8::text[]) AS u(t, p, o, m, ts, v, f, l) \
         ON CONFLICT DO NOTHING",
    ))
    .bind(&c.links)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Writes a batch plan inside the caller's transaction: machines, then episodes, then readings
/// (in-order readings with their episode, late readings linked to the episode containing their
/// timestamp). Readings already stored (same source position) are left alone, so even a replay of
/// committed messages changes nothing (see [`insert_in_order`]).
pub async fn write_plan(conn: &mut PgConnection, plan: &BatchPlan) -> Result<(), sqlx::Error> {
    if plan.readings.is_empty() {
        return Ok(());
    }

    // Machines, in id order so concurrent writers lock rows in the same order.
    let mut machines: Vec<(&String, &MachineState)> = plan.machines.iter().collect();
    machines.sort_by(|a, b| a.0.cmp(b.0));
    let ids: Vec<&str> = machines.iter().map(|(id, _)| id.as_str()).collect();
    let first: Vec<DateTime<Utc>> = machines.iter().map(|(_, s)| s.first_seen).collect();
    let last: Vec<DateTime<Utc>> = machines.iter().map(|(_, s)| s.last_seen).collect();
    let applied: Vec<Option<&Position>> = machines
        .iter()
        .map(|(_, s)| s.last_applied.as_ref())
        .collect();
    let a_topic: Vec<Option<&str>> = applied.iter().map(|p| p.map(|p| &*p.topic)).collect();
    let a_part: Vec<Option<i32>> = applied.iter().map(|p| p.map(|p| p.partition)).collect();
    let a_off: Vec<Option<i64>> = applied.iter().map(|p| p.map(|p| p.offset)).collect();
    sqlx::query(
        "INSERT INTO machines (machine_id, first_seen, last_seen, applied_topic, \
             applied_partition, applied_offset) \
         SELECT * FROM UNNEST($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[], \
                              $5::int4[], $6::int8[]) \
         ON CONFLICT (machine_id) DO UPDATE \
         SET first_seen = EXCLUDED.first_seen, last_seen = EXCLUDED.last_seen, \
             applied_topic = EXCLUDED.applied_topic, \
             applied_partition = EXCLUDED.applied_partition, \
             applied_offset = EXCLUDED.applied_offset",
    )
    .bind(&ids)
    .bind(&first)
    .bind(&last)
    .bind(&a_topic)
    .bind(&a_part)
    .bind(&a_off)
    .execute(&mut *conn)
    .await?;

    if !plan.failures.is_empty() {
        let f = &plan.failures;
        let ids: Vec<&str> = f.iter().map(|r| r.id.as_str()).collect();
        let machines: Vec<&str> = f.iter().map(|r| r.machine_id.as_str()).collect();
        let started: Vec<DateTime<Utc>> = f.iter().map(|r| r.started_at).collect();
        let ended: Vec<Option<DateTime<Utc>>> = f.iter().map(|r| r.ended_at).collect();
        let o_topic: Vec<&str> = f.iter().map(|r| &*r.opened_by.topic).collect();
        let o_part: Vec<i32> = f.iter().map(|r| r.opened_by.partition).collect();
        let o_off: Vec<i64> = f.iter().map(|r| r.opened_by.offset).collect();
        let c_topic: Vec<Option<&str>> = f
            .iter()
            .map(|r| r.closed_by.as_ref().map(|p| &*p.topic))
            .collect();
        let c_part: Vec<Option<i32>> = f
            .iter()
            .map(|r| r.closed_by.as_ref().map(|p| p.partition))
            .collect();
        let c_off: Vec<Option<i64>> = f
            .iter()
            .map(|r| r.closed_by.as_ref().map(|p| p.offset))
            .collect();
        sqlx::query(
            "INSERT INTO failures (failure_id, machine_id, started_at, ended_at, active, \
                 opened_topic, opened_partition, opened_offset, \
                 closed_topic, closed_partition, closed_offset) \
             SELECT u.id, u.m, u.s, u.e, u.e IS NULL, u.ot, u.op, u.oo, u.ct, u.cp, u.co \
             FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], \
                         $5::text[], $6::int4[], $7::int8[], $8::text[], $9::int4[], $10::int8[]) \
                  WITH ORDINALITY AS u(id, m, s, e, ot, op, oo, ct, cp, co, n) \
             ORDER BY u.n \
             ON CONFLICT (failure_id) DO UPDATE \
             SET ended_at = EXCLUDED.ended_at, active = EXCLUDED.active, \
                 closed_topic = EXCLUDED.closed_topic, closed_partition = EXCLUDED.closed_partition, \
                 closed_offset = EXCLUDED.closed_offset",
        )
        .bind(&ids)
        .bind(&machines)
        .bind(&started)
        .bind(&ended)
        .bind(&o_topic)
        .bind(&o_part)
        .bind(&o_off)
        .bind(&c_topic)
        .bind(&c_part)
        .bind(&c_off)
        .execute(&mut *conn)
        .await?;
    }

    let (in_order, late): (Vec<&ReadingRow>, Vec<&ReadingRow>) = plan
        .readings
        .iter()
        .partition(|r| !matches!(r.link, Link::Lookup));
    if !in_order.is_empty() {
        insert_in_order(conn, &in_order).await?;
    }
    let late = ReadingColumns::of(&late);
    if !late.offsets.is_empty() {
        let c = &late;
        c.bind(sqlx::query(
            "INSERT INTO sensor_readings (source_topic, source_partition, source_offset, machine_id, \
                 reading_time, sensor_values, failure, failure_id, late) \
             SELECT u.t, u.p, u.o, u.m, u.ts, u.v::jsonb, u.f, \
                    (SELECT f.failure_id FROM failures f \
                     WHERE f.machine_id = u.m AND f.started_at <= u.ts \
                       AND (f.ended_at IS NULL OR f.ended_at > u.ts) \
                     ORDER BY f.started_at DESC LIMIT 1), \
                    TRUE \
             FROM UNNEST($1::text[], $2::int4[], $3::int8[], $4::text[], $5::timestamptz[], \
                         $6::text[], $7::bool[]) AS u(t, p, o, m, ts, v, f) \
             ON CONFLICT DO NOTHING",
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
