//! The two loops (`step_math=graph`, the resident step graph, and `host`) on
//! an fp16 UNet (tests/fixtures/tiny-sd15-fp16: the tiny-sd15 UNet exported
//! in fp16 by `spo_onnx.fixtures --only tiny-sd15-fp16`), against the fp32
//! diffusers goldens of tiny-sd15. This exercises the step graph's fp16
//! casts, which the fp32 fixtures never reach.
//!
//! Tolerance: the fp16 UNet rounds its weights and activations to 11-bit
//! mantissas, so the final latents may drift from the fp32 goldens by a few
//! 1e-3 relative over 4-6 steps (measured: 1.4e-3);
//! FP16_TOL is 1e-2 relative to max(1, |golden|max). Both loops must also
//! agree with each other far more tightly than with the goldens (LOOP_TOL):
//! they see the same fp16 UNet outputs up to the rounding of the step math.

mod common;

use common::*;
use spo_runtime::pipeline::{JobSpec, Pipeline, StepMath};
use spo_runtime::Options;

const FP16_TOL: f32 = 1e-2;
const LOOP_TOL: f32 = 5e-3;

#[test]
fn fp16_unet_both_loops_match_diffusers() {
    let model = SwappedModel::new("tiny-sd15", "unet", "tiny-sd15-fp16/unet");
    let p = Pipeline::load(&runtime(), &model.dir, &Options::new()).unwrap();
    assert!(
        p.info("io.unet").unwrap().contains("sample float16"),
        "{}",
        p.info("io.unet").unwrap()
    );
    let dir = fixture("goldens/tiny-sd15");
    let index = read_json(&dir.join("index.json"));
    let mut worst = (0.0f32, 0.0f32);
    for c in index["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let want = read_npy(&dir.join(c["latents"].as_str().unwrap()));
        let mut got = Vec::new();
        for step_math in [StepMath::Graph, StepMath::Host] {
            let mut job = p
                .job(JobSpec {
                    step_math,
                    ..spec_for(&dir, c)
                })
                .unwrap();
            job.run()
                .unwrap_or_else(|e| panic!("{name} {step_math:?}: {e}"));
            assert_eq!(job.is_resident(), step_math == StepMath::Graph);
            let l = job.latents().unwrap();
            let (d, m) = max_abs_diff(l.as_slice().unwrap(), want.as_slice().unwrap());
            let rel = d / m.max(1.0);
            worst.0 = worst.0.max(rel);
            assert!(
                rel <= FP16_TOL,
                "{name} {step_math:?}: fp16 latents off diffusers fp32 by {rel:.2e} relative"
            );
            got.push(l);
        }
        let (d, m) = max_abs_diff(got[0].as_slice().unwrap(), got[1].as_slice().unwrap());
        worst.1 = worst.1.max(d / m.max(1.0));
        assert!(
            d <= LOOP_TOL * m.max(1.0),
            "{name}: graph and host loops differ by {d:.2e}"
        );
    }
    eprintln!(
        "fp16 UNet: worst relative diff to the fp32 goldens {:.2e}, between the loops {:.2e}",
        worst.0, worst.1
    );
}
