//! The pipeline against diffusers goldens (tests/fixtures/goldens/<model>/,
//! written by onnx/spo_onnx/goldens.py from the diffusers torch pipelines on the
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
use spo_runtime::pipeline::{Image, Pipeline};
use spo_runtime::text::ClipTokenizer;
use spo_runtime::Options;

const EMBED_TOL: f32 = 1e-4;
const LATENT_TOL: f32 = 1e-4;
const IMAGE_TOL: u8 = 1;

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
        let (pos, negv) = p.encode_prompts(prompt, neg, true, 0).unwrap();
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

fn cases(model: &str, p: &Pipeline, index: &serde_json::Value) {
    let dir = golden_dir(model);
    let mut failures = Vec::new();
    let mut worst = (0.0f32, 0u8);
    for c in index["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let mut job = p.job(spec_for(&dir, c)).unwrap();
        // The x0 preview is in place, for the step just done, when progress runs.
        let slot = job.preview_slot();
        job.set_progress(Some(Box::new(move |done, _| {
            slot.lock().as_ref().is_some_and(|p| p.step == done)
        })));
        job.run().unwrap_or_else(|e| panic!("{model} {name}: {e}"));
        let got = job.latents().unwrap();
        let want = read_npy(&dir.join(c["latents"].as_str().unwrap()));
        assert_eq!(got.shape(), want.shape(), "{model} {name} latent shape");
        let (d, m) = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
        let tol = LATENT_TOL * m.max(1.0);
        // Every scheduler here but DDIM (whose final alpha is alphas_cumprod[0]
        // with set_alpha_to_one=false) ends at noise level 0, where the last
        // step's x0 is the final sample: diffusers' latents check the preview.
        let preview = job.preview_slot().lock().clone().unwrap();
        assert_eq!(preview.step, job.total_steps(), "{name} preview step");
        assert_eq!(&preview.shape[..], want.shape(), "{name} preview shape");
        if c["scheduler"] != "ddim" {
            let (dp, _) = max_abs_diff(&preview.latents, want.as_slice().unwrap());
            if dp > tol {
                failures.push(format!(
                    "{name}: last x0 preview off the final latents by {dp:.2e}"
                ));
            }
        }
        let images = job.take_images().unwrap();
        let golden = Image::read_png(&dir.join(c["image"].as_str().unwrap())).unwrap();
        let img_d = images[0]
            .rgb
            .iter()
            .zip(&golden.rgb)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(255);
        // Further images (num_images > 1) against diffusers' float output,
        // quantised as its numpy_to_pil does.
        let want_images = read_npy(&dir.join(c["image_f32"].as_str().unwrap()));
        assert_eq!(images.len(), want_images.shape()[0], "{name} image count");
        let mut img_d = img_d;
        for (img, want) in images.iter().zip(want_images.outer_iter()).skip(1) {
            let d = img
                .rgb
                .iter()
                .zip(want.iter())
                .map(|(a, b)| a.abs_diff((b * 255.0).round() as u8))
                .max()
                .unwrap_or(255);
            img_d = img_d.max(d);
        }
        worst = (worst.0.max(d / m.max(1.0)), worst.1.max(img_d));
        if d > tol
            || img_d > IMAGE_TOL
            || (images[0].width, images[0].height) != (golden.width, golden.height)
        {
            failures.push(format!(
                "{name}: latents max diff {d:.2e} (tol {tol:.2e}), image max diff {img_d}"
            ));
        }
    }
    eprintln!(
        "{model}: {} cases, worst relative latent diff {:.2e}, worst pixel diff {}",
        index["cases"].as_array().unwrap().len(),
        worst.0,
        worst.1
    );
    assert!(
        failures.is_empty(),
        "{model} cases off the diffusers goldens:\n{}",
        failures.join("\n")
    );
}

fn run_model(model: &str) {
    let (p, index) = load(model);
    tokenizer_ids(model, &index);
    embeddings(model, &p, &index);
    cases(model, &p, &index);
}

#[test]
fn tiny_sdxl_matches_diffusers() {
    run_model("tiny-sdxl");
}

#[test]
fn tiny_sd15_matches_diffusers() {
    run_model("tiny-sd15");
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
