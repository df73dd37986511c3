//! The fraud decoder against any record timestamp a producer may set: the first 8 bytes are the
//! timestamp (ms, little-endian), the rest the value (see
//! `streamops_fuzz::oracle::transaction_record`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    streamops_fuzz::oracle::transaction_record(data);
});
