//! The pipeline-trigger decoder never panics, and accepts only JSON objects within the shape
//! limits (nesting, fields and elements). Events never reach PostgreSQL (they are counted in
//! Redis), so their contents are not restricted further.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamops_worker::handlers::pipeline_trigger::decode_event;
use streamops_worker::handlers::storable::check_shape;

fuzz_target!(|data: &[u8]| {
    if decode_event(data).is_err() {
        return;
    }
    let is_object = std::str::from_utf8(data)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .is_some_and(|v| v.is_object());
    assert!(is_object, "accepted a payload that is not a JSON object: {data:?}");
    assert!(check_shape(data).is_ok(), "accepted a payload beyond the shape limits");
});
