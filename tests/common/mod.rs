//! Shared helpers for the integration tests that run real graphs: one CPU
//! runtime per test binary, golden file reading, and tolerance checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::ArrayD;
use spo_runtime::pipeline::JobSpec;
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

/// The job of a golden case (see onnx/DESIGN.md): explicit initial latents and
/// per-step noise, so no RNG parity is involved.
pub fn spec_for(dir: &std::path::Path, c: &serde_json::Value) -> JobSpec {
    let mut s = JobSpec {
        prompt: c["prompt"].as_str().unwrap().to_owned(),
        negative_prompt: c["negative_prompt"].as_str().map(str::to_owned),
        width: Some(c["width"].as_u64().unwrap() as usize),
        height: Some(c["height"].as_u64().unwrap() as usize),
        steps: c["steps"].as_u64().unwrap() as usize,
        guidance: c["guidance"].as_f64().unwrap(),
        guidance_rescale: c["guidance_rescale"].as_f64().unwrap_or(0.0),
        scheduler: c["scheduler"].as_str().unwrap().to_owned(),
        eta: c["eta"].as_f64().unwrap_or(0.0),
        num_images: c["num_images"].as_u64().unwrap_or(1) as usize,
        ..JobSpec::default()
    };
    s.init_latents = Some(
        read_npy(&dir.join(c["init_latents"].as_str().unwrap()))
            .iter()
            .copied()
            .collect(),
    );
    if let Some(n) = c["noise"].as_str() {
        let a = read_npy(&dir.join(n));
        s.step_noise = Some(
            a.outer_iter()
                .map(|x| x.iter().copied().collect())
                .collect(),
        );
    }
    if let Some(img) = c["init_image"].as_str() {
        s.init_image = Some(dir.join(img));
        s.strength = c["strength"].as_f64().unwrap();
    }
    s
}

/// A model folder in the temp dir: fixture `base` with `component` replaced by
/// fixture `replacement`, assembled from symlinks (one per test process and
/// replacement, so parallel tests do not share it).
pub fn swapped_model(base: &str, component: &str, replacement: &str) -> PathBuf {
    let tag = replacement.replace('/', "-");
    let dir = std::env::temp_dir().join(format!("spo-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(base)).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let src = if name == component {
            fixture(replacement)
        } else {
            e.path()
        };
        std::os::unix::fs::symlink(src, dir.join(name)).unwrap();
    }
    dir
}
