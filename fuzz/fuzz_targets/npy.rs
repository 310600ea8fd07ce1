//! Any byte string given as a `.npy` file (`spo --init-latents`, `--noise`)
//! must read as a float32 array or give an Error, never a panic or an
//! allocation that the file's size does not back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spo_runtime::model::npy;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = npy::parse_f32(data, "fuzz.npy") {
        assert_eq!(a.len(), a.shape().iter().product::<usize>());
        assert!(a.len() * 4 <= data.len());
    }
});
