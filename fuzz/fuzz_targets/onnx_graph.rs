//! Any byte string given to the ONNX graph reader must yield a graph or an Error,
//! never a panic; every recovered target's data read must not panic either.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spo_runtime::lora::GraphTargets;
use spo_runtime::model::OnnxGraph;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = OnnxGraph::from_bytes(data, Path::new("/nonexistent-spo-fuzz/model.onnx")) else {
        return;
    };
    let Ok(targets) = GraphTargets::discover(&g) else {
        return;
    };
    let _ = targets.lora_targets();
    for t in targets.all().values() {
        let _ = g.read_f32(&t.initializer);
        let _ = t.torch_shape();
    }
});
