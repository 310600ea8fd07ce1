//! Any byte string given to the ONNX graph reader must yield a graph or an Error,
//! never a panic; every recovered target's data read must not panic either.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spo_runtime::model::OnnxGraph;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = OnnxGraph::from_bytes(data, Path::new("/nonexistent-spo-fuzz/model.onnx")) else {
        return;
    };
    let _ = g.lora_targets();
    for t in g.targets().values() {
        let _ = g.read_f32(&t.initializer);
        let _ = t.torch_shape();
    }
});
