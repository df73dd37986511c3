//! The pipeline-trigger decoder never panics, and accepts only JSON objects within the shape
//! limits (nesting, fields and elements). Events never reach PostgreSQL (they are counted in
//! Redis), so their contents are not restricted further.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    streamops_fuzz::oracle::pipeline_event(data);
});
