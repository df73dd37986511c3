//! The sensor decoder never panics, gives every rejection a reason, and whatever it accepts can
//! be written (see `streamops_fuzz::oracle::sensor`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    streamops_fuzz::oracle::sensor(data);
});
