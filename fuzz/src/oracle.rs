//! What every fuzz target checks about one input, shared with `worker/tests/fuzz_corpus.rs` (which
//! includes this file with `#[path]`), so the committed corpus is replayed in the normal test suite
//! against exactly the assertions the fuzzer ran.
//!
//! Each function decodes one input and panics when a rule is broken:
//! - the decoder never panics, on any bytes;
//! - a rejection carries a reason (non-empty, no U+0000, so the error topic and its table can
//!   hold it);
//! - whatever the decoder accepts can be written: no U+0000 in a `text` or `jsonb` value, numbers
//!   finite and within the column's range, times within `timestamptz`.
//!
//! It returns what the decoder accepted, so the corpus test can write it through PostgreSQL.

use chrono::{DateTime, Datelike, Utc};
use streamops_worker::handlers::fraud::{
    amount_numeric, amount_text, decode_transaction, Transaction,
};
use streamops_worker::handlers::moving_average::{decode_price, PricePoint, MAX_PRICE};
use streamops_worker::handlers::pipeline_trigger::decode_event;
use streamops_worker::handlers::sensor::{decode_reading, Reading};
use streamops_worker::handlers::storable::check_shape;
use streamops_worker::handlers::Rejection;

/// The record timestamp the `decode_transaction` target decodes against (2024-03-20T10:30:00Z).
pub const REFERENCE_S: i64 = 1_710_930_600;

/// The reference time of the `decode_transaction` target.
pub fn reference() -> DateTime<Utc> {
    DateTime::from_timestamp(REFERENCE_S, 0).unwrap_or_default()
}

fn reason<T>(result: Result<T, Rejection>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(r) => {
            assert!(
                !r.detail.is_empty(),
                "a {:?} rejection without a reason",
                r.kind
            );
            assert!(
                !r.detail.contains('\0'),
                "a rejection reason holds U+0000: {:?}",
                r.detail
            );
            None
        }
    }
}

fn no_nul(field: &str, text: Option<&str>, data: &[u8]) {
    assert!(
        !text.is_some_and(|t| t.contains('\0')),
        "accepted a U+0000 in {field}: {:?}",
        String::from_utf8_lossy(data)
    );
}

/// `timestamptz` holds 4713 BC to 294276 AD.
fn storable_time(field: &str, t: &DateTime<Utc>) {
    let year = t.year();
    assert!(
        (-4712..=294_275).contains(&year),
        "accepted year {year} in {field}"
    );
}

/// `decode_price`: a finite price in (0, [`MAX_PRICE`]], a non-empty symbol, no U+0000, a
/// storable time.
pub fn price(data: &[u8]) -> Option<PricePoint> {
    let p = reason(decode_price(data))?;
    assert!(
        p.price.is_finite() && p.price > 0.0 && p.price <= MAX_PRICE,
        "accepted price {}",
        p.price
    );
    assert!(!p.symbol.is_empty(), "accepted an empty symbol");
    no_nul("symbol", Some(&p.symbol), data);
    no_nul("source", p.source.as_deref(), data);
    no_nul("raw_response_id", p.raw_response_id.as_deref(), data);
    storable_time("timestamp", &p.event_time);
    Some(p)
}

/// `decode_reading`: the machine id holds no U+0000, and the values are a JSON object `jsonb`
/// accepts (no key holding U+0000, whose escape `\u0000` jsonb refuses; only finite numbers).
pub fn sensor(data: &[u8]) -> Option<Reading> {
    let r = reason(decode_reading(data))?;
    no_nul("machine_id", Some(&r.machine_id), data);
    // Checked on the parsed values, not their text: `"a\\u0000"` (an escaped backslash, then
    // `u0000`) is no NUL, and jsonb stores it.
    let values: serde_json::Value = serde_json::from_str(&r.values).expect("the values are JSON");
    let object = values.as_object().expect("the values are an object");
    for (name, v) in object {
        assert!(!name.contains('\0'), "accepted a U+0000 in a sensor name");
        assert!(
            v.as_f64().is_some_and(f64::is_finite),
            "accepted a non-finite value for {name:?}: {v}"
        );
    }
    storable_time("timestamp", &r.timestamp);
    Some(r)
}

/// `decode_transaction` against `reference`: no text column holds U+0000, the amount fits
/// `NUMERIC(20, 4)` and `amount > 0` and its binary `numeric` encoding spells the same number as
/// its text, the currency fits `CHAR(3)` and the country `CHAR(2)`.
pub fn transaction(data: &[u8], reference: DateTime<Utc>) -> Option<Transaction> {
    let t = reason(decode_transaction(data, reference))?;
    for (field, text) in [
        ("transaction_id", Some(t.transaction_id.as_str())),
        ("account_id", Some(t.account_id.as_str())),
        ("merchant", Some(t.merchant.as_str())),
        ("merchant_category", t.merchant_category.as_deref()),
        ("currency", Some(t.currency.as_str())),
        ("country", t.country.as_deref()),
    ] {
        no_nul(field, text, data);
    }
    assert!(
        t.amount.is_finite() && t.amount > 0.0 && t.amount < 1e16,
        "accepted amount {}",
        t.amount
    );
    assert_eq!(
        numeric_text(&amount_numeric(t.amount)),
        amount_text(t.amount),
        "the binary numeric of amount {} differs from its text",
        t.amount
    );
    assert_eq!(t.currency.chars().count(), 3, "currency {:?}", t.currency);
    if let Some(c) = &t.country {
        assert_eq!(c.chars().count(), 2, "country {c:?}");
    }
    storable_time("timestamp", &t.timestamp);
    Some(t)
}

/// A Kafka record as the fraud handler decodes it: the first 8 bytes are the record timestamp
/// (milliseconds, little-endian; any i64, as a producer may set it), the rest is the value. The
/// handler turns the timestamp into the reference time as here.
pub fn transaction_record(data: &[u8]) -> Option<Transaction> {
    let (ts, value) = data.split_first_chunk::<8>()?;
    let reference =
        DateTime::<Utc>::from_timestamp_millis(i64::from_le_bytes(*ts)).unwrap_or_else(reference);
    transaction(value, reference)
}

/// The text of PostgreSQL's binary `numeric` (scale 4, non-negative), as `amount_text` writes it.
fn numeric_text(bin: &[u8]) -> String {
    let word = |i: usize| u16::from_be_bytes([bin[2 * i], bin[2 * i + 1]]);
    let ndigits = word(0) as usize;
    let weight = word(1) as i16;
    assert_eq!(word(2), 0, "a negative amount");
    assert_eq!(word(3), 4, "the scale of amount");
    assert_eq!(bin.len(), 8 + 2 * ndigits, "numeric length");
    // The value in units of 10^-4: digit i is worth 10000^(weight - i + 1) units.
    let mut units: u128 = 0;
    for i in 0..ndigits {
        let d = word(4 + i);
        assert!(d < 10_000, "base-10000 digit {d}");
        let exp = i32::from(weight) - i as i32 + 1;
        assert!((0..=8).contains(&exp), "digit {i} at weight {weight}");
        units += u128::from(d) * 10_000u128.pow(exp as u32);
    }
    format!("{}.{:04}", units / 10_000, units % 10_000)
}

/// `decode_event` (pipeline trigger): accepts only JSON objects within the shape limits.
pub fn pipeline_event(data: &[u8]) -> bool {
    if reason(decode_event(data)).is_none() {
        return false;
    }
    let is_object = std::str::from_utf8(data)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .is_some_and(|v| v.is_object());
    assert!(
        is_object,
        "accepted a value that is not a JSON object: {data:?}"
    );
    assert!(
        check_shape(data).is_ok(),
        "accepted a value beyond the shape limits"
    );
    true
}

/// Spec → worker configuration: any manifest text either fails with an error or derives a
/// configuration that renders and parses back unchanged.
pub fn spec_to_config(data: &[u8]) -> bool {
    use streamops_crds::config::{stream_consumer_from_manifest, WorkerConfig};
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(sc) = stream_consumer_from_manifest(text) else {
        return false;
    };
    let Ok(cfg) = WorkerConfig::from_resource(&sc) else {
        return false;
    };
    let yaml = cfg.to_yaml().expect("a derived configuration renders");
    let back = WorkerConfig::from_yaml(&yaml).expect("a rendered configuration parses");
    assert_eq!(back, cfg);
    true
}
