//! Any byte string given as a named-tensor safetensors file (`spo grad
//! --inputs`, checkpoints) must yield float32 tensors or an Error, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spo_runtime::model::tensors;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = tensors::from_bytes(data, "fuzz.safetensors") {
        for a in t.values() {
            assert_eq!(a.len(), a.shape().iter().product::<usize>());
        }
    }
});
