//! Shared helpers for the integration tests that run real graphs: one CPU
//! runtime per test binary, golden file reading, and tolerance checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::ArrayD;
use spo_runtime::{Options, Runtime};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The CPU runtime. ONNX Runtime is found through SPO_ORT_LIBRARY (set by
/// `make test`), or the other documented places.
pub fn runtime() -> Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let o = Options::from_pairs([("ep", "cpu")]).unwrap();
        Runtime::new(&o, Default::default()).unwrap_or_else(|e| {
            panic!("{e}\n(run through `make test`, which fetches ONNX Runtime)")
        })
    })
    .clone()
}

pub fn read_npy(path: &Path) -> ArrayD<f32> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    <ArrayD<f32> as ndarray_npy::ReadNpyExt>::read_npy(f)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let t = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Python's json writes -Infinity / NaN (e.g. lambda_min_clipped); those
    // fields are unused here, so read them as null.
    let t = t
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest |a - b| and the largest |b|, after checking the shapes agree.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let m = b.iter().map(|v| v.abs()).fold(0.0, f32::max);
    (d, m)
}
