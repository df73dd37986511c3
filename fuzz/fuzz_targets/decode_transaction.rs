//! The fraud decoder never panics, and whatever it accepts can be written: no text column holds
//! U+0000, the amount fits `NUMERIC(20, 4)` and the check `amount > 0`, the currency fits
//! `CHAR(3)` and the country `CHAR(2)`. `worker/tests/fuzz_corpus.rs` writes the corpus through
//! PostgreSQL itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamops_worker::handlers::fraud::decode_transaction;

fuzz_target!(|data: &[u8]| {
    let reference = chrono::DateTime::from_timestamp(1_710_930_600, 0).unwrap_or_default();
    if let Ok(t) = decode_transaction(data, reference) {
        for (field, text) in [
            ("transaction_id", Some(t.transaction_id.as_str())),
            ("account_id", Some(t.account_id.as_str())),
            ("merchant", Some(t.merchant.as_str())),
            ("merchant_category", t.merchant_category.as_deref()),
            ("currency", Some(t.currency.as_str())),
            ("country", t.country.as_deref()),
        ] {
            assert!(
                !text.is_some_and(|s| s.contains('\0')),
                "accepted a NUL in {field}: {data:?}"
            );
        }
        assert!(
            t.amount.is_finite() && t.amount > 0.0 && t.amount < 1e16,
            "accepted amount {}",
            t.amount
        );
        assert_eq!(t.currency.chars().count(), 3, "currency {:?}", t.currency);
        if let Some(c) = &t.country {
            assert_eq!(c.chars().count(), 2, "country {c:?}");
        }
    }
});
