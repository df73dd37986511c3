//! Spec → worker configuration: any manifest text either fails with an error or derives a
//! configuration that renders and parses back unchanged. Nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use streamops_crds::config::{stream_consumer_from_manifest, WorkerConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(sc) = stream_consumer_from_manifest(text) else { return };
    if let Ok(cfg) = WorkerConfig::from_resource(&sc) {
        let yaml = cfg.to_yaml().expect("a derived configuration renders");
        let back = WorkerConfig::from_yaml(&yaml).expect("a rendered configuration parses");
        assert_eq!(back, cfg);
    }
});
