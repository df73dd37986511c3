//! PostgreSQL side of the fraud handler.
//!
//! A batch goes in by binary `COPY` (the fast path) under a savepoint
//! ([`copy_or_insert`]). `COPY` cannot skip a transaction id that is already stored, so if the
//! batch holds one (or holds the same id twice), it is rolled back to the savepoint and written
//! with `INSERT ... ON CONFLICT DO NOTHING`, which keeps the first occurrence.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::{FraudItem, Transaction};
use crate::copy::{copy_or_insert, BinaryCopy, CopyOrInsert};
use crate::handlers::{Decoded, HandlerError, Position};

/// Decimal places of `transactions.amount` (`NUMERIC(20, 4)`).
pub const AMOUNT_SCALE: usize = 4;

/// An amount rounded to [`AMOUNT_SCALE`] decimals, as decimal text (both write paths round the
/// same way).
pub fn amount_text(amount: f64) -> String {
    format!("{:.*}", AMOUNT_SCALE, amount)
}

/// PostgreSQL's binary `numeric` encoding of [`amount_text`]`(amount)`.
pub fn amount_numeric(amount: f64) -> Vec<u8> {
    let text = amount_text(amount.abs());
    let (int, frac) = text.split_once('.').unwrap_or((&text, "0"));
    let int = int.trim_start_matches('0');
    // Base-10000 digits, most significant first: the integer part in groups of four from the
    // right, then the four decimals.
    let padded = format!("{}{int}", "0".repeat((4 - int.len() % 4) % 4));
    let mut digits: Vec<i16> = padded
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |n, d| n * 10 + i16::from(d - b'0')))
        .collect();
    let mut weight = digits.len() as i16 - 1;
    digits.push(frac.bytes().fold(0i16, |n, d| n * 10 + i16::from(d - b'0')));
    while digits.last() == Some(&0) {
        digits.pop();
    }
    while digits.first() == Some(&0) {
        digits.remove(0);
        weight -= 1;
    }
    if digits.is_empty() {
        weight = 0;
    }
    let sign: u16 = if amount < 0.0 && !digits.is_empty() {
        0x4000
    } else {
        0
    };
    let mut out = Vec::with_capacity(8 + 2 * digits.len());
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(AMOUNT_SCALE as u16).to_be_bytes());
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out
}

/// Binary `COPY` of `transactions`, in the column order of [`transaction_row`].
pub const TRANSACTIONS_COPY: &str = "COPY transactions (transaction_id, account_id, merchant, \
    merchant_category, amount, currency, country, card_present, transaction_time, source_topic, \
    source_partition, source_offset) FROM STDIN (FORMAT binary)";
/// Binary `COPY` of `predictions`, in the column order of [`prediction_row`].
pub const PREDICTIONS_COPY: &str = "COPY predictions (transaction_id, fraud_score, is_fraud, \
    threshold, model_version) FROM STDIN (FORMAT binary)";

/// Appends one `transactions` row (see [`TRANSACTIONS_COPY`]) for `t`, read from `pos`.
pub fn transaction_row(copy: &mut BinaryCopy, t: &Transaction, pos: &Position) {
    let mut row = copy.row();
    row.text(&t.transaction_id)
        .text(&t.account_id)
        .text(&t.merchant)
        .opt_text(t.merchant_category.as_deref())
        .bytea(&amount_numeric(t.amount))
        .text(&t.currency)
        .opt_text(t.country.as_deref());
    match t.card_present {
        Some(b) => row.bool(b),
        None => row.null(),
    };
    row.timestamptz(t.timestamp)
        .text(&pos.topic)
        .int4(pos.partition)
        .int8(pos.offset);
}

/// Appends one `predictions` row (see [`PREDICTIONS_COPY`]); returns `is_fraud`
/// (`score >= threshold`).
pub fn prediction_row(
    copy: &mut BinaryCopy,
    transaction_id: &str,
    score: f64,
    threshold: f64,
    model_version: &str,
) -> bool {
    let is_fraud = score >= threshold;
    copy.row()
        .text(transaction_id)
        .float8(score)
        .bool(is_fraud)
        .float8(threshold)
        .text(model_version);
    is_fraud
}

/// The fast path's rows: `transactions` and `predictions` as binary COPY buffers, with the number
/// flagged as fraud.
fn copy_rows(items: &[Decoded<FraudItem>], threshold: f64) -> (BinaryCopy, BinaryCopy, u64) {
    let mut txs = BinaryCopy::with_capacity(12, items.len() * 200);
    let mut preds = BinaryCopy::with_capacity(5, items.len() * 80);
    let mut flagged = 0;
    for d in items {
        let t = &d.item.transaction;
        let Some(p) = d.item.prediction.as_ref() else {
            continue;
        };
        transaction_row(&mut txs, t, &d.pos);
        let is_fraud = prediction_row(
            &mut preds,
            &t.transaction_id,
            p.score,
            threshold,
            &p.model_version,
        );
        flagged += u64::from(is_fraud);
    }
    (txs, preds, flagged)
}

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
    if let Some(d) = items.iter().find(|d| d.item.prediction.is_none()) {
        return Err(HandlerError::Fatal(format!(
            "transaction {:?} reached write without a prediction",
            d.item.transaction.transaction_id
        )));
    }
    let (txs, preds, flagged) = copy_rows(items, threshold);
    let written = copy_or_insert(
        conn,
        "fraud_copy",
        vec![(txs, TRANSACTIONS_COPY), (preds, PREDICTIONS_COPY)],
        |conn| insert_batch(conn, items, threshold),
    )
    .await?;
    Ok(match written {
        CopyOrInsert::Copied(loaded) => Written {
            transactions: loaded.first().copied().unwrap_or(0),
            duplicates: 0,
            flagged,
        },
        CopyOrInsert::Inserted(written) => written,
    })
}

/// The slow path: `INSERT ... ON CONFLICT DO NOTHING`, keeping the first occurrence of each id.
async fn insert_batch(
    conn: &mut PgConnection,
    items: &[Decoded<FraudItem>],
    threshold: f64,
) -> Result<Written, HandlerError> {
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
        amounts.push(amount_text(t.amount));
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
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
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

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: i16, weight: i16, sign: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ndigits.to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&sign.to_be_bytes());
        v.extend_from_slice(&4u16.to_be_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn amounts_encode_as_base_10000_numerics_with_four_decimals() {
        assert_eq!(amount_numeric(129.99), numeric(2, 0, 0, &[129, 9900]));
        assert_eq!(amount_numeric(0.5), numeric(1, -1, 0, &[5000]));
        assert_eq!(amount_numeric(10_000.0), numeric(1, 1, 0, &[1]));
        assert_eq!(amount_numeric(1_000_000_000.0), numeric(1, 2, 0, &[10]));
        assert_eq!(
            amount_numeric(12_345.000_1),
            numeric(3, 1, 0, &[1, 2345, 1])
        );
        assert_eq!(amount_numeric(0.0001), numeric(1, -1, 0, &[1]));
        assert_eq!(amount_numeric(0.0), numeric(0, 0, 0, &[]));
    }

    #[test]
    fn amounts_are_rounded_to_four_decimals() {
        assert_eq!(amount_text(1.23456), "1.2346");
        assert_eq!(amount_numeric(1.23456), amount_numeric(1.2346));
    }
}
