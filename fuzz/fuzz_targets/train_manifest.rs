//! Any text given as a train_manifest.json must yield a checked manifest or
//! an Error, never a panic; a manifest that passes has bounded shapes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spo_runtime::train::TrainManifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = TrainManifest::from_json(text) {
        let _ = m.output_shape();
        let total: usize = m
            .params
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum();
        assert!(total <= 1 << 30);
    }
});
