//! The sensor decoder never panics on any payload.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamops_worker::handlers::sensor::decode_reading;

fuzz_target!(|data: &[u8]| {
    let _ = decode_reading(data);
});
