//! The transaction message and its validation. The schema is documented in the `fraud` module.

use chrono::{DateTime, Duration, Utc};

use crate::handlers::json_fields::{
    check_id, opt_bool, opt_str, parse_object, parse_timestamp, req_f64, req_str,
};
use crate::handlers::{RejectKind, Rejection};
use crate::scorer::api::ScoreInput;

/// Longest accepted id (`transaction_id`, `account_id`), in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// Longest accepted merchant and merchant category, in bytes.
pub const MAX_MERCHANT_BYTES: usize = 128;
/// Largest accepted amount, in major units of any currency.
pub const MAX_AMOUNT: f64 = 1_000_000_000.0;
/// Smallest accepted amount: one ten-thousandth of a major unit.
pub const MIN_AMOUNT: f64 = 0.0001;
/// How far a transaction's timestamp may lie after the Kafka record's timestamp.
pub const MAX_FUTURE_HOURS: i64 = 24;

/// Active ISO 4217 currency codes usable in a payment (funds, metals, testing and "no currency"
/// codes are left out), sorted.
pub const CURRENCIES: [&str; 157] = [
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD",
    "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ",
    "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD",
    "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR",
    "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR",
    "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN",
    "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR",
    "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB",
    "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS",
    "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
    "ZWL",
];

/// Whether `code` is an accepted ISO 4217 currency code.
pub fn is_currency(code: &str) -> bool {
    CURRENCIES.binary_search(&code).is_ok()
}

/// A valid transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    /// Unique id; the idempotency key of the `transactions` table.
    pub transaction_id: String,
    /// Account (card holder).
    pub account_id: String,
    /// Merchant name or id.
    pub merchant: String,
    /// Merchant category, if given.
    pub merchant_category: Option<String>,
    /// Amount in major units of `currency`, in `[MIN_AMOUNT, MAX_AMOUNT]`.
    pub amount: f64,
    /// ISO 4217 code.
    pub currency: String,
    /// ISO 3166-1 alpha-2 country, if given.
    pub country: Option<String>,
    /// Whether the card was present, if given.
    pub card_present: Option<bool>,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
}

impl Transaction {
    /// The scoring request entry for this transaction.
    pub fn score_input(&self) -> ScoreInput {
        ScoreInput {
            transaction_id: self.transaction_id.clone(),
            account_id: self.account_id.clone(),
            merchant: self.merchant.clone(),
            amount: self.amount,
            currency: self.currency.clone(),
            timestamp: self
                .timestamp
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        }
    }
}

fn invalid(detail: String) -> Rejection {
    Rejection::new(RejectKind::InvalidValue, detail)
}

/// Decodes and validates one transaction. `reference` is the Kafka record's timestamp (or the
/// current time when the record has none): the transaction may not lie more than
/// [`MAX_FUTURE_HOURS`] after it. Using the record's timestamp keeps the check the same on every
/// replay.
pub fn decode_transaction(
    payload: &[u8],
    reference: DateTime<Utc>,
) -> Result<Transaction, Rejection> {
    let obj = parse_object(payload)?;
    let transaction_id = check_id(
        "transaction_id",
        req_str(&obj, &["transaction_id", "id"])?,
        MAX_ID_BYTES,
    )?;
    let account_id = check_id(
        "account_id",
        req_str(&obj, &["account_id", "user_id", "customer_id"])?,
        MAX_ID_BYTES,
    )?;
    let merchant = check_id(
        "merchant",
        req_str(&obj, &["merchant", "merchant_id", "merchant_name"])?,
        MAX_MERCHANT_BYTES,
    )?;
    let merchant_category = opt_str(&obj, &["merchant_category"])?
        .map(|c| check_id("merchant_category", c, MAX_MERCHANT_BYTES))
        .transpose()?;

    let amount = req_f64(&obj, &["amount"])?;
    if amount <= 0.0 {
        return Err(invalid(format!(
            "field `amount` must be positive, got {amount}"
        )));
    }
    if !(MIN_AMOUNT..=MAX_AMOUNT).contains(&amount) {
        return Err(invalid(format!(
            "field `amount` must lie between {MIN_AMOUNT} and {MAX_AMOUNT}, got {amount}"
        )));
    }

    let currency = req_str(&obj, &["currency"])?;
    if !(currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase())) {
        return Err(invalid(format!(
            "field `currency` must be an ISO 4217 code of three uppercase letters, got {currency:?}"
        )));
    }
    if !is_currency(currency) {
        return Err(invalid(format!(
            "field `currency` is not a known ISO 4217 currency: {currency:?}"
        )));
    }

    let country = opt_str(&obj, &["country"])?;
    if let Some(c) = country {
        if !(c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase())) {
            return Err(invalid(format!(
                "field `country` must be an ISO 3166-1 alpha-2 code, got {c:?}"
            )));
        }
    }
    let card_present = opt_bool(&obj, &["card_present"])?;

    let timestamp = parse_timestamp(
        "timestamp",
        req_str(&obj, &["timestamp", "transaction_time"])?,
        false,
    )?;
    // The record timestamp is set by the producer: within a day of the last time chrono can
    // represent, the bound saturates instead of overflowing (found by fuzzing).
    let latest = reference
        .checked_add_signed(Duration::hours(MAX_FUTURE_HOURS))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if timestamp > latest {
        return Err(invalid(format!(
            "field `timestamp` lies more than {MAX_FUTURE_HOURS} hours after the record's timestamp ({}): {}",
            reference.to_rfc3339(),
            timestamp.to_rfc3339()
        )));
    }

    Ok(Transaction {
        transaction_id: transaction_id.to_string(),
        account_id: account_id.to_string(),
        merchant: merchant.to_string(),
        merchant_category: merchant_category.map(str::to_string),
        amount,
        currency: currency.to_string(),
        country: country.map(str::to_string),
        card_present,
        timestamp,
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 3, 20, 12, 0, 0).unwrap()
    }

    const VALID: &str = r#"{"transaction_id": "6f1c2d0e-1", "account_id": "acc-1042", "merchant": "Corner Grocery", "amount": 129.99, "currency": "USD", "timestamp": "2024-03-20T10:30:00Z"}"#;

    fn decode(s: &str) -> Result<Transaction, Rejection> {
        decode_transaction(s.as_bytes(), now())
    }

    fn with(field: &str, value: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(VALID).unwrap();
        v[field] = value;
        v.to_string()
    }

    fn without(field: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(VALID).unwrap();
        v.as_object_mut().unwrap().remove(field);
        v.to_string()
    }

    #[test]
    fn a_record_stamped_within_a_day_of_the_last_representable_time_decodes_without_overflow() {
        let end = DateTime::<Utc>::MAX_UTC;
        assert!(decode_transaction(VALID.as_bytes(), end).is_ok());
        let late = DateTime::<Utc>::from_timestamp_millis(end.timestamp_millis() - 50_000).unwrap();
        assert!(decode_transaction(VALID.as_bytes(), late).is_ok());
    }

    #[test]
    fn currency_table_is_sorted_and_unique() {
        assert!(CURRENCIES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn valid_transaction_decodes() {
        let t = decode(VALID).unwrap();
        assert_eq!(t.transaction_id, "6f1c2d0e-1");
        assert_eq!(t.amount, 129.99);
        assert_eq!(t.currency, "USD");
        assert_eq!(t.score_input().timestamp, "2024-03-20T10:30:00Z");
    }

    #[test]
    fn aliases_id_user_id_and_merchant_id_are_accepted() {
        let t = decode(
            r#"{"id": "t1", "user_id": "u1", "merchant_id": "m1", "amount": 1, "currency": "EUR", "timestamp": "2024-03-20T10:30:00+01:00"}"#,
        )
        .unwrap();
        assert_eq!(
            (
                t.transaction_id.as_str(),
                t.account_id.as_str(),
                t.merchant.as_str()
            ),
            ("t1", "u1", "m1")
        );
    }

    #[test]
    fn each_required_field_is_reported_missing() {
        for f in [
            "transaction_id",
            "account_id",
            "merchant",
            "amount",
            "currency",
            "timestamp",
        ] {
            let r = decode(&without(f)).unwrap_err();
            assert_eq!(r.kind, RejectKind::MissingField, "{f}");
            assert_eq!(r.detail, format!("missing field `{f}`"));
        }
    }

    #[test]
    fn zero_negative_and_huge_amounts_are_invalid() {
        for a in [0.0, -5.0, 2e9, 0.00001] {
            let r = decode(&with("amount", serde_json::json!(a))).unwrap_err();
            assert_eq!(r.kind, RejectKind::InvalidValue, "{a}");
            assert!(r.detail.contains("`amount`"), "{}", r.detail);
        }
    }

    #[test]
    fn amount_as_string_is_a_wrong_type() {
        let r = decode(&with("amount", serde_json::json!("12.5"))).unwrap_err();
        assert_eq!(r.kind, RejectKind::WrongType);
    }

    #[test]
    fn lowercase_and_unknown_currencies_are_invalid() {
        let r = decode(&with("currency", serde_json::json!("usd"))).unwrap_err();
        assert!(r.detail.contains("three uppercase letters"), "{}", r.detail);
        let r = decode(&with("currency", serde_json::json!("ABC"))).unwrap_err();
        assert!(r.detail.contains("not a known ISO 4217"), "{}", r.detail);
        let r = decode(&with("currency", serde_json::json!("XXX"))).unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidValue);
    }

    #[test]
    fn empty_and_overlong_ids_are_invalid() {
        let r = decode(&with("transaction_id", serde_json::json!(""))).unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidValue);
        let r = decode(&with("account_id", serde_json::json!("x".repeat(65)))).unwrap_err();
        assert!(r.detail.contains("at most 64"), "{}", r.detail);
    }

    #[test]
    fn timestamp_without_offset_is_not_rfc3339() {
        let r = decode(&with("timestamp", serde_json::json!("2024-03-20T10:30:00"))).unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidValue);
        assert!(r.detail.contains("RFC 3339"), "{}", r.detail);
    }

    #[test]
    fn timestamp_more_than_a_day_after_the_record_is_invalid() {
        assert!(decode(&with(
            "timestamp",
            serde_json::json!("2024-03-21T11:59:00Z")
        ))
        .is_ok());
        let r = decode(&with(
            "timestamp",
            serde_json::json!("2024-03-21T12:00:01Z"),
        ))
        .unwrap_err();
        assert!(r.detail.contains("24 hours"), "{}", r.detail);
    }

    #[test]
    fn nul_escapes_in_stored_strings_are_rejected() {
        for field in [
            "transaction_id",
            "account_id",
            "merchant",
            "merchant_category",
        ] {
            let r = decode(&with(field, serde_json::json!("a\u{0}b"))).unwrap_err();
            assert_eq!(r.kind, RejectKind::InvalidValue, "{field}");
            assert!(!r.detail.contains('\0'), "{}", r.detail);
        }
        for field in ["currency", "country"] {
            let r = decode(&with(field, serde_json::json!("U\u{0}"))).unwrap_err();
            assert_eq!(r.kind, RejectKind::InvalidValue, "{field}");
            assert!(!r.detail.contains('\0'), "{}", r.detail);
        }
    }

    #[test]
    fn lone_surrogates_and_deep_nesting_are_rejected() {
        let r = decode(&VALID.replace("Corner Grocery", "\\udbff")).unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidJson);
        let deep = format!("{}{}", "[".repeat(33), "]".repeat(33));
        let r = decode(&with("extra", serde_json::from_str(&deep).unwrap())).unwrap_err();
        assert_eq!(r.kind, RejectKind::TooComplex);
    }

    #[test]
    fn bad_optional_fields_are_rejected() {
        let r = decode(&with("country", serde_json::json!("usa"))).unwrap_err();
        assert_eq!(r.kind, RejectKind::InvalidValue);
        let r = decode(&with("card_present", serde_json::json!("yes"))).unwrap_err();
        assert_eq!(r.kind, RejectKind::WrongType);
    }
}
