//! One SPO training pass on the tiny SDXL model against PyTorch
//! (`python -m spo_onnx.goldens.spo_update`): the same pairs, conditioning
//! and initial LoRA must give the same LoRA after two mini-batches of AdamW
//! (the official loss with CFG, the DDIM mean, the clamp, gradient-norm
//! clipping), and the same losses and gradient norms. Ratios leave the clamp
//! in the second mini-batch and clipping bites there.

mod common;

use common::*;
use ndarray::ArrayD;
use spo_runtime::model::tensors::{self, NamedTensors};
use spo_runtime::pipeline::Pipeline;
use spo_runtime::train::optim::AdamW;
use spo_runtime::train::sampler::Pair;
use spo_runtime::train::{Preset, TrainConfig, TrainState, Trainer, TrainerSpec};
use spo_runtime::Options;

fn golden() -> (serde_json::Value, NamedTensors) {
    let dir = fixture("goldens/spo_update");
    (
        read_json(&dir.join("index.json")),
        tensors::read(&dir.join("tensors.safetensors")).unwrap(),
    )
}

fn with_prefix(t: &NamedTensors, prefix: &str) -> NamedTensors {
    t.iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_owned(), v.clone())))
        .collect()
}

fn config(index: &serde_json::Value) -> TrainConfig {
    let c = &index["config"];
    let f = |k: &str| c[k].as_f64().unwrap();
    TrainConfig {
        steps: c["steps"].as_u64().unwrap() as usize,
        eta: f("eta"),
        guidance: f("guidance"),
        beta: f("beta"),
        clip: f("clip"),
        lr: f("lr"),
        adam_beta1: c["betas"][0].as_f64().unwrap(),
        adam_beta2: c["betas"][1].as_f64().unwrap(),
        weight_decay: f("weight_decay"),
        adam_eps: f("eps"),
        max_grad_norm: f("max_grad_norm"),
        clip_grad: true,
        batch: c["batch"].as_u64().unwrap() as usize,
        grad_accum: 1,
        ..TrainConfig::preset(Preset::Toy)
    }
}

#[test]
fn one_pass_matches_pytorch() {
    let (index, t) = golden();
    let rt = runtime();
    let pipeline = Pipeline::load(&rt, &fixture("tiny-sdxl"), &Options::new()).unwrap();
    let spec = TrainerSpec {
        train_dir: fixture("train/tiny-sdxl/graphs"),
        preference: fixture("preference/colour"),
        config: config(&index),
    };
    let mut trainer = Trainer::new(&pipeline, spec).unwrap();
    let init = with_prefix(&t, "init.");
    let adam = AdamW::new(trainer.config().adamw(), &init).unwrap();
    trainer
        .restore(
            TrainState {
                params: init,
                adam,
                round: 0,
            },
            0,
        )
        .unwrap();
    let conds: Vec<NamedTensors> = (0..2)
        .map(|i| with_prefix(&t, &format!("cond.{i}.")))
        .collect();
    let pairs: Vec<Pair> = index["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let get = |side: &str, what: &str| t[&format!("pair.{i}.{side}.{what}")].clone();
            Pair {
                prompt: p["prompt"].as_u64().unwrap() as usize,
                step: p["step"].as_u64().unwrap() as usize,
                x_t: [get("win", "x_t"), get("lose", "x_t")],
                x_prev: [get("win", "x_prev"), get("lose", "x_prev")],
            }
        })
        .collect();
    let m = trainer.update(&pairs, &conds).unwrap();
    let updates = index["updates"].as_array().unwrap();
    let mean = |k: &str| {
        updates.iter().map(|u| u[k].as_f64().unwrap()).sum::<f64>() / updates.len() as f64
    };
    println!(
        "loss {} (torch {}), mean |g| {} (torch {}), clamped {}",
        m.loss,
        mean("loss"),
        m.grad_norm,
        mean("grad_norm"),
        m.clamp_fraction
    );
    assert_eq!(m.updates, 2);
    assert!((m.loss - mean("loss")).abs() < 1e-4, "loss");
    assert!(
        (m.grad_norm / mean("grad_norm") - 1.0).abs() < 1e-3,
        "grad norm"
    );
    // One branch of eight leaves the clamp (the second mini-batch's).
    assert!(
        (m.clamp_fraction - 0.125).abs() < 1e-9,
        "{}",
        m.clamp_fraction
    );
    let want = with_prefix(&t, "after.1.");
    let init = with_prefix(&t, "init.");
    let lr = index["config"]["lr"].as_f64().unwrap() as f32;
    let mut worst = 0f32;
    for (k, w) in &want {
        let got: &ArrayD<f32> = &trainer.state().params[k];
        let (d, _) = max_abs_diff(got.as_slice().unwrap(), w.as_slice().unwrap());
        worst = worst.max(d);
        // The update moved the parameter (the comparison is not of a no-op).
        assert!(max_abs_diff(w.as_slice().unwrap(), init[k].as_slice().unwrap()).0 > 0.1 * lr);
    }
    // PyTorch itself in float32 differs from float64 by `floor`: the tiny
    // random UNet amplifies rounding.
    let floor = index["float32_floor"].as_f64().unwrap() as f32;
    println!("largest parameter difference {worst:.3e} (lr {lr}, torch float32 {floor:.3e})");
    assert!(worst <= 3.0 * floor, "LoRA differs by {worst}");
}
