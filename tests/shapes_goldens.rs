//! The shapes model (models/shapes-sdxl, the demo's model) against diffusers:
//! tests/fixtures/goldens/shapes-sdxl comes from the trained diffusers pipeline
//! that the committed ONNX folder was exported from
//! (onnx/spo_onnx/goldens/shapes.py). The demo's prompt and sampler, and a
//! held-out caption with a stochastic sampler at a non-square size; the
//! fixtures' tolerances (tests/common).

mod common;

use common::*;
use spo_runtime::pipeline::{Pipeline, StepMath};
use spo_runtime::Options;

#[test]
fn shapes_model_matches_diffusers() {
    let dir = root().join("models/shapes-sdxl");
    let p = Pipeline::load(&runtime(), &dir, &Options::new()).unwrap();
    check_golden_cases("shapes-sdxl", "shapes-sdxl", &p, StepMath::Graph);
}
