//! The offsets table (`streamops_offsets`): PostgreSQL is the source of truth for where each
//! partition resumes. Every batch moves its partitions' `next_offset` forward with a
//! compare-and-set in the batch's own transaction, which fences zombies and rebalance races.

use std::collections::HashMap;

use sqlx::PgConnection;

use crate::handlers::TopicPartition;

/// Stored `next_offset` of each partition of `topics` for `group` (partitions without a row are
/// absent).
pub async fn load(
    conn: &mut PgConnection,
    group: &str,
    partitions: &[TopicPartition],
) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
    if partitions.is_empty() {
        return Ok(HashMap::new());
    }
    let topics: Vec<&str> = partitions.iter().map(|tp| &*tp.topic).collect();
    let parts: Vec<i32> = partitions.iter().map(|tp| tp.partition).collect();
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT o.topic, o.partition, o.next_offset
           FROM streamops_offsets o
           JOIN UNNEST($2::text[], $3::int4[]) AS w(topic, partition)
             ON o.topic = w.topic AND o.partition = w.partition
          WHERE o.consumer_group = $1",
    )
    .bind(group)
    .bind(&topics)
    .bind(&parts)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for (topic, partition, next) in rows {
        if let Some(tp) = partitions
            .iter()
            .find(|tp| *tp.topic == *topic && tp.partition == partition)
        {
            out.insert(tp.clone(), next);
        }
    }
    Ok(out)
}

/// The result of a compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cas {
    /// The row moved from the expected value to the new one.
    Applied,
    /// The stored value was not the expected one: another writer got there first.
    Conflict,
}

/// Moves `tp`'s `next_offset` from `expected` (None: no row yet) to `next`, in the caller's
/// transaction. Exactly one row must be affected, otherwise [`Cas::Conflict`].
pub async fn compare_and_set(
    conn: &mut PgConnection,
    group: &str,
    tp: &TopicPartition,
    expected: Option<i64>,
    next: i64,
) -> Result<Cas, sqlx::Error> {
    let result = match expected {
        Some(expected) => {
            sqlx::query(
                "UPDATE streamops_offsets SET next_offset = $5, updated_at = now()
                  WHERE consumer_group = $1 AND topic = $2 AND partition = $3
                    AND next_offset = $4",
            )
            .bind(group)
            .bind(&*tp.topic)
            .bind(tp.partition)
            .bind(expected)
            .bind(next)
            .execute(&mut *conn)
            .await?
        }
        None => {
            sqlx::query(
                "INSERT INTO streamops_offsets (consumer_group, topic, partition, next_offset)
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(group)
            .bind(&*tp.topic)
            .bind(tp.partition)
            .bind(next)
            .execute(&mut *conn)
            .await?
        }
    };
    Ok(if result.rows_affected() == 1 {
        Cas::Applied
    } else {
        Cas::Conflict
    })
}
