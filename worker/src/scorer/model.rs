//! The reference fraud model: a fixed logistic function, documented in the `scorer` module.

use chrono::{DateTime, Timelike, Utc};

use super::api::ScoreInput;

/// Version reported with every prediction of this model.
pub const MODEL_VERSION: &str = "streamops-logit-v1";

/// Intercept of the logistic function.
pub const INTERCEPT: f64 = -5.2;
/// Weight of `ln(1 + amount in USD)`.
pub const W_AMOUNT: f64 = 0.9;
/// Added for transactions between 00:00 and 05:59 UTC.
pub const W_NIGHT: f64 = 0.8;
/// Added for currencies outside [`USD_RATES`].
pub const W_RARE_CURRENCY: f64 = 0.5;
/// Weight of the merchant risk `fnv1a64(merchant) / 2^64 - 0.5`.
pub const W_MERCHANT: f64 = 1.5;
/// Weight of the account risk `fnv1a64(account_id) / 2^64 - 0.5`.
pub const W_ACCOUNT: f64 = 1.0;

/// Fixed conversion rates (units of the currency per US dollar) of model v1. Amounts in other
/// currencies are taken as dollars, and add [`W_RARE_CURRENCY`].
pub const USD_RATES: [(&str, f64); 16] = [
    ("AUD", 1.5),
    ("BRL", 5.0),
    ("CAD", 1.35),
    ("CHF", 0.9),
    ("CNY", 7.2),
    ("EUR", 0.92),
    ("GBP", 0.79),
    ("HKD", 7.8),
    ("INR", 83.0),
    ("JPY", 150.0),
    ("KRW", 1330.0),
    ("MXN", 17.0),
    ("NOK", 10.5),
    ("SEK", 10.5),
    ("SGD", 1.35),
    ("USD", 1.0),
];

/// 64-bit FNV-1a hash of a string's UTF-8 bytes.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A hash mapped to `[0, 1)`.
fn unit(h: u64) -> f64 {
    // The top 53 bits fit an f64 exactly.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Names of the feature vector sent to a model served over `kserve-v1` or `open-inference-v2`,
/// in order. See [`features`].
pub const FEATURES: [&str; 7] = [
    "amount",
    "log1p_amount_usd",
    "hour_utc",
    "night",
    "rare_currency",
    "merchant_risk",
    "account_risk",
];

/// The feature vector of one transaction, in the order of [`FEATURES`]:
///
/// | # | name | value |
/// |---|---|---|
/// | 0 | `amount` | the amount in major units of its currency |
/// | 1 | `log1p_amount_usd` | `ln(1 + amount / rate)`, `rate` from [`USD_RATES`] (1 for other currencies) |
/// | 2 | `hour_utc` | hour of the timestamp in UTC, 0-23 (12 if unparsable) |
/// | 3 | `night` | 1 if `hour_utc < 6`, else 0 |
/// | 4 | `rare_currency` | 1 if the currency is not in [`USD_RATES`], else 0 |
/// | 5 | `merchant_risk` | `fnv1a64(merchant) / 2^64 - 0.5`, in `[-0.5, 0.5)` |
/// | 6 | `account_risk` | `fnv1a64(account_id) / 2^64 - 0.5`, in `[-0.5, 0.5)` |
///
/// Every value is an IEEE 754 double (`FP64` in the Open Inference Protocol).
pub fn features(input: &ScoreInput) -> [f64; 7] {
    let (rate, rare) = match USD_RATES.iter().find(|(c, _)| *c == input.currency) {
        Some((_, r)) => (*r, 0.0),
        None => (1.0, 1.0),
    };
    let usd = (input.amount / rate).max(0.0);
    let hour = DateTime::parse_from_rfc3339(&input.timestamp)
        .map(|t| t.with_timezone(&Utc).hour())
        .unwrap_or(12);
    let night = if hour < 6 { 1.0 } else { 0.0 };
    [
        input.amount,
        usd.ln_1p(),
        f64::from(hour),
        night,
        rare,
        unit(fnv1a64(&input.merchant)) - 0.5,
        unit(fnv1a64(&input.account_id)) - 0.5,
    ]
}

/// The score of a feature vector (see [`features`]), in `[0, 1]`. Features beyond the known
/// ones are ignored; missing ones count as 0.
pub fn score_features(f: &[f64]) -> f64 {
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
    let z = INTERCEPT
        + W_AMOUNT * at(1)
        + W_NIGHT * at(3)
        + W_RARE_CURRENCY * at(4)
        + W_MERCHANT * at(5)
        + W_ACCOUNT * at(6);
    1.0 / (1.0 + (-z).exp())
}

/// The score of one transaction, in `[0, 1]`. `timestamp` must be RFC 3339; an unparsable one
/// counts as daytime (the service validates timestamps before scoring).
pub fn score(input: &ScoreInput) -> f64 {
    score_features(&features(input))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(amount: f64, currency: &str, ts: &str) -> ScoreInput {
        ScoreInput {
            transaction_id: "t".into(),
            account_id: "acc-1".into(),
            merchant: "Corner Grocery".into(),
            amount,
            currency: currency.into(),
            timestamp: ts.into(),
        }
    }

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn score_is_deterministic_and_a_probability() {
        let a = score(&input(42.0, "USD", "2024-03-20T10:30:00Z"));
        let b = score(&input(42.0, "USD", "2024-03-20T10:30:00Z"));
        assert_eq!(a.to_bits(), b.to_bits());
        assert!((0.0..=1.0).contains(&a));
    }

    #[test]
    fn larger_amounts_score_higher() {
        let small = score(&input(20.0, "USD", "2024-03-20T10:30:00Z"));
        let large = score(&input(20_000.0, "USD", "2024-03-20T10:30:00Z"));
        assert!(large > small, "{large} <= {small}");
        assert!(large > 0.8, "a 20,000 USD purchase scores {large}");
        assert!(small < 0.3, "a 20 USD purchase scores {small}");
    }

    #[test]
    fn night_transactions_score_higher_than_daytime_ones() {
        let day = score(&input(300.0, "USD", "2024-03-20T14:00:00Z"));
        let night = score(&input(300.0, "USD", "2024-03-20T03:00:00Z"));
        assert!(night > day);
    }

    #[test]
    fn amounts_are_converted_to_dollars() {
        let usd = score(&input(100.0, "USD", "2024-03-20T14:00:00Z"));
        let jpy = score(&input(15_000.0, "JPY", "2024-03-20T14:00:00Z"));
        assert!((usd - jpy).abs() < 1e-12);
    }

    #[test]
    fn rare_currencies_score_higher() {
        let usd = score(&input(100.0, "USD", "2024-03-20T14:00:00Z"));
        let isk = score(&input(100.0, "ISK", "2024-03-20T14:00:00Z"));
        assert!(isk > usd);
    }
}
