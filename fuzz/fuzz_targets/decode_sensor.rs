//! The sensor decoder never panics, and whatever it accepts can be written: the machine id holds
//! no U+0000, and the values are a JSON object that `jsonb` accepts (no key or string with
//! U+0000, whose escape `\u0000` jsonb refuses; only finite numbers). `worker/tests/fuzz_corpus.rs`
//! writes the corpus through PostgreSQL itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamops_worker::handlers::sensor::decode_reading;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode_reading(data) {
        assert!(!r.machine_id.contains('\0'), "accepted a NUL in machine_id: {data:?}");
        assert!(
            !r.values.contains("\\u0000"),
            "accepted values jsonb refuses: {}",
            r.values
        );
        let values: serde_json::Value =
            serde_json::from_str(&r.values).expect("the values are JSON");
        let object = values.as_object().expect("the values are an object");
        for (name, v) in object {
            assert!(!name.contains('\0'), "accepted a NUL in a sensor name");
            assert!(
                v.as_f64().is_some_and(f64::is_finite),
                "accepted a non-finite value for {name:?}: {v}"
            );
        }
    }
});
