//! The fraud decoder never panics on any payload.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamops_worker::handlers::fraud::decode_transaction;

fuzz_target!(|data: &[u8]| {
    let reference = chrono::DateTime::from_timestamp(1_710_930_600, 0).unwrap_or_default();
    let _ = decode_transaction(data, reference);
});
