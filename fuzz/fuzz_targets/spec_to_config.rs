//! Spec → worker configuration: any manifest text either fails with an error or derives a
//! configuration that renders and parses back unchanged. Nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    streamops_fuzz::oracle::spec_to_config(data);
});
