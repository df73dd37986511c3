//! PostgreSQL side of the fraud handler.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::FraudItem;
use crate::handlers::{Decoded, HandlerError};

/// Rows written by one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Transactions inserted.
    pub transactions: u64,
    /// Transactions skipped because their id was already stored.
    pub duplicates: u64,
    /// Of the inserted ones, those flagged as fraud.
    pub flagged: u64,
}

/// Inserts the batch's transactions and predictions inside the caller's transaction. A
/// transaction whose id is already stored (with its prediction) is skipped, as is a second
/// occurrence of an id within the batch: the first one wins.
pub async fn write_batch(
    conn: &mut PgConnection,
    items: &[Decoded<FraudItem>],
    threshold: f64,
) -> Result<Written, HandlerError> {
    if items.is_empty() {
        return Ok(Written::default());
    }
    let n = items.len();
    let mut ids = Vec::with_capacity(n);
    let mut accounts = Vec::with_capacity(n);
    let mut merchants = Vec::with_capacity(n);
    let mut categories: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut amounts = Vec::with_capacity(n);
    let mut currencies = Vec::with_capacity(n);
    let mut countries: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut card_present: Vec<Option<bool>> = Vec::with_capacity(n);
    let mut times: Vec<DateTime<Utc>> = Vec::with_capacity(n);
    let mut topics: Vec<&str> = Vec::with_capacity(n);
    let mut partitions = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n);
    let mut scores = Vec::with_capacity(n);
    let mut flags = Vec::with_capacity(n);
    let mut versions: Vec<&str> = Vec::with_capacity(n);
    for d in items {
        let t = &d.item.transaction;
        let p = d.item.prediction.as_ref().ok_or_else(|| {
            HandlerError::Fatal(format!(
                "transaction {:?} reached write without a prediction",
                t.transaction_id
            ))
        })?;
        ids.push(t.transaction_id.as_str());
        accounts.push(t.account_id.as_str());
        merchants.push(t.merchant.as_str());
        categories.push(t.merchant_category.as_deref());
        amounts.push(t.amount);
        currencies.push(t.currency.as_str());
        countries.push(t.country.as_deref());
        card_present.push(t.card_present);
        times.push(t.timestamp);
        topics.push(&d.pos.topic);
        partitions.push(d.pos.partition);
        offsets.push(d.pos.offset);
        scores.push(p.score);
        flags.push(p.score >= threshold);
        versions.push(&p.model_version);
    }

    // RETURNING tells which ids were new; only their predictions are written.
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO transactions (transaction_id, account_id, merchant, merchant_category, amount, \
             currency, country, card_present, transaction_time, source_topic, source_partition, \
             source_offset) \
         SELECT u.id, u.acc, u.m, u.cat, u.amt::numeric(20, 4), u.cur, u.cty, u.cp, u.ts, u.t, u.p, u.o \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[], \
                     $7::text[], $8::bool[], $9::timestamptz[], $10::text[], $11::int4[], $12::int8[]) \
              WITH ORDINALITY AS u(id, acc, m, cat, amt, cur, cty, cp, ts, t, p, o, n) \
         ORDER BY u.n \
         ON CONFLICT (transaction_id) DO NOTHING \
         RETURNING transaction_id",
    )
    .bind(&ids)
    .bind(&accounts)
    .bind(&merchants)
    .bind(&categories)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&countries)
    .bind(&card_present)
    .bind(&times)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_all(&mut *conn)
    .await?;

    let mut new_ids = std::collections::HashSet::with_capacity(inserted.len());
    new_ids.extend(inserted.iter().map(String::as_str));
    let mut p_ids = Vec::with_capacity(inserted.len());
    let mut p_scores = Vec::with_capacity(inserted.len());
    let mut p_flags = Vec::with_capacity(inserted.len());
    let mut p_versions = Vec::with_capacity(inserted.len());
    for i in 0..n {
        // `remove` keeps only the first occurrence of an id of the batch.
        if new_ids.remove(ids[i]) {
            p_ids.push(ids[i]);
            p_scores.push(scores[i]);
            p_flags.push(flags[i]);
            p_versions.push(versions[i]);
        }
    }
    if !p_ids.is_empty() {
        sqlx::query(
            "INSERT INTO predictions (transaction_id, fraud_score, is_fraud, threshold, model_version) \
             SELECT u.id, u.s, u.f, $5, u.v \
             FROM UNNEST($1::text[], $2::float8[], $3::bool[], $4::text[]) AS u(id, s, f, v) \
             ON CONFLICT (transaction_id) DO NOTHING",
        )
        .bind(&p_ids)
        .bind(&p_scores)
        .bind(&p_flags)
        .bind(&p_versions)
        .bind(threshold)
        .execute(&mut *conn)
        .await?;
    }
    Ok(Written {
        transactions: p_ids.len() as u64,
        duplicates: (n - p_ids.len()) as u64,
        flagged: p_flags.iter().filter(|f| **f).count() as u64,
    })
}
