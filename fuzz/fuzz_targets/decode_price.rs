//! The moving-average decoder never panics, and whatever it accepts can be written: a valid price
//! event (finite price in range, non-empty symbol) whose text columns hold nothing PostgreSQL
//! refuses (no U+0000) and whose time fits `timestamptz`. `worker/tests/fuzz_corpus.rs` writes the
//! corpus through PostgreSQL itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamops_worker::handlers::moving_average::{decode_price, MAX_PRICE};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode_price(data) {
        assert!(
            p.price.is_finite() && p.price > 0.0 && p.price <= MAX_PRICE,
            "accepted price {}",
            p.price
        );
        assert!(!p.symbol.is_empty(), "accepted an empty symbol");
        for (field, text) in [
            ("symbol", Some(p.symbol.as_str())),
            ("source", p.source.as_deref()),
            ("raw_response_id", p.raw_response_id.as_deref()),
        ] {
            assert!(
                !text.is_some_and(|t| t.contains('\0')),
                "accepted a NUL in {field}: {data:?}"
            );
        }
        // timestamptz holds 4713 BC to 294276 AD.
        let year = chrono::Datelike::year(&p.event_time);
        assert!((-4712..=294_275).contains(&year), "accepted year {year}");
    }
});
