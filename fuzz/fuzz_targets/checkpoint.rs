//! Any byte string given as a trainer checkpoint must parse into its parts
//! or give an Error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spo_runtime::train::checkpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = checkpoint::parse(data, "fuzz.safetensors") {
        for a in s.params.values().chain(s.moment_1.values()) {
            assert_eq!(a.len(), a.shape().iter().product::<usize>());
        }
    }
});
