//! The moving-average decoder never panics, and what it accepts is a valid price event.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamops_worker::handlers::moving_average::decode_price;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = decode_price(data) {
        assert!(p.price.is_finite() && p.price > 0.0, "accepted price {}", p.price);
        assert!(!p.symbol.is_empty(), "accepted an empty symbol");
    }
});
