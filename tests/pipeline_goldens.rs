//! The pipeline against diffusers goldens (tests/fixtures/goldens/<model>/,
//! written by onnx/spo_onnx/goldens/pipeline.py from the diffusers torch pipelines on the
//! same tiny weights). Every case runs our full path: tokenizer, ONNX text
//! encoders, scheduler, ONNX UNet with CFG, VAE decode.
//!
//! Tolerances: the ONNX graphs are fp32 exports of the same torch modules, so
//! embeddings agree to 1e-4 absolute; final latents to 1e-4 absolute (scaled by
//! max(1, |golden|max), the error of fp32 ONNX vs torch kernels accumulated over
//! 4-6 steps; measured: 1.5e-6); decoded 8-bit images to 1 level per channel
//! (rounding at the 0.5 boundary).

mod common;

use common::*;
use spo_runtime::pipeline::rng::TorchRng;
use spo_runtime::pipeline::{Pipeline, StepMath};
use spo_runtime::text::{ClipTokenizer, LongPrompt};
use spo_runtime::Options;

// LATENT_TOL and IMAGE_TOL are in common (shared with the LoRA and
// dynamo-UNet tests).
const EMBED_TOL: f32 = 1e-4;

fn golden_dir(model: &str) -> std::path::PathBuf {
    fixture(&format!("goldens/{model}"))
}

fn load(model: &str) -> (Pipeline, serde_json::Value) {
    let p = Pipeline::load(&runtime(), &fixture(model), &Options::new()).unwrap();
    (p, read_json(&golden_dir(model).join("index.json")))
}

fn tokenizer_ids(model: &str, index: &serde_json::Value) {
    let t1 = ClipTokenizer::from_dir(fixture(model).join("tokenizer")).unwrap();
    let t2 = fixture(model).join("tokenizer_2");
    let t2 = t2.is_dir().then(|| ClipTokenizer::from_dir(&t2).unwrap());
    let cases = index["tokenizer"].as_array().unwrap();
    assert!(
        cases.len() >= 50,
        "golden corpus has only {} texts",
        cases.len()
    );
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<i64> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(
            t1.encode_padded(text, 77),
            want,
            "{model} tokenizer: {text:?}"
        );
        if let Some(t2) = &t2 {
            let want: Vec<i64> = serde_json::from_value(c["ids_2"].clone()).unwrap();
            assert_eq!(
                t2.encode_padded(text, 77),
                want,
                "{model} tokenizer_2: {text:?}"
            );
        }
    }
}

fn embeddings(model: &str, p: &Pipeline, index: &serde_json::Value) {
    let dir = golden_dir(model);
    for e in index["embeddings"].as_array().unwrap() {
        let prompt = e["prompt"].as_str().unwrap();
        let neg = e["negative_prompt"].as_str();
        let (pos, negv) = p
            .encode_prompts(prompt, neg, true, 0, LongPrompt::Truncate)
            .unwrap();
        let negv = negv.unwrap();
        let check = |name: &str, got: &ndarray::ArrayD<f32>| {
            let want = read_npy(&dir.join(e[name].as_str().unwrap()));
            assert_eq!(
                got.shape(),
                want.shape(),
                "{model} {name} shape for {prompt:?}"
            );
            let (d, _) = max_abs_diff(
                got.as_standard_layout().as_slice().unwrap(),
                want.as_slice().unwrap(),
            );
            assert!(
                d <= EMBED_TOL,
                "{model} {name} for {prompt:?}/{neg:?}: max diff {d}"
            );
        };
        check("prompt_embeds", &pos.embeds);
        check("negative_prompt_embeds", &negv.embeds);
        if let Some(pooled) = &pos.pooled {
            check("pooled_prompt_embeds", pooled);
            check(
                "negative_pooled_prompt_embeds",
                negv.pooled.as_ref().unwrap(),
            );
        }
    }
}

fn run_model(model: &str) {
    let (p, index) = load(model);
    tokenizer_ids(model, &index);
    embeddings(model, &p, &index);
    check_golden_cases(model, model, &p, StepMath::Graph);
}

#[test]
fn tiny_sdxl_matches_diffusers() {
    run_model("tiny-sdxl");
}

#[test]
fn tiny_sd15_matches_diffusers() {
    run_model("tiny-sd15");
}

/// The host loop (f64 scheduler math on host arrays) against the same goldens.
#[test]
fn host_step_math_matches_diffusers() {
    for model in ["tiny-sd15", "tiny-sdxl"] {
        let (p, _) = load(model);
        check_golden_cases(model, model, &p, StepMath::Host);
    }
}

/// Seeded noise equals torch.randn with torch.Generator("cpu").manual_seed(seed).
#[test]
fn torch_cpu_generator_parity() {
    let index = read_json(&golden_dir("tiny-sdxl").join("index.json"));
    for r in index["rng"].as_array().unwrap() {
        let seed = r["seed"].as_u64().unwrap();
        let want: Vec<f32> = serde_json::from_value(r["randn16"].clone()).unwrap();
        let got = TorchRng::new(seed).randn(16);
        let (d, _) = max_abs_diff(&got, &want);
        assert!(d <= 1e-6, "seed {seed}: randn(16) max diff {d}");
        let shape: Vec<usize> = serde_json::from_value(r["latents_shape"].clone()).unwrap();
        let want = read_npy(&golden_dir("tiny-sdxl").join(r["latents_randn"].as_str().unwrap()));
        let got = TorchRng::new(seed).randn(shape.iter().product());
        let (d, _) = max_abs_diff(&got, want.as_slice().unwrap());
        assert!(d <= 1e-5, "seed {seed}: latents {shape:?} max diff {d}");
    }
}
