//! SPO's step math and optimizer against a PyTorch reference
//! (`onnx/spo_onnx/goldens/spo.py`): diffusers' DDIMScheduler for the step
//! variance, torch autograd for the loss's cotangent with respect to the UNet
//! outputs, torch.optim.AdamW and clip_grad_norm_ for the optimizer.

mod common;

use ndarray::{ArrayD, Axis};
use spo_runtime::model::tensors::{self, NamedTensors};
use spo_runtime::train::optim::{clip_gradients, AdamW, AdamWConfig, Clip};
use spo_runtime::train::spo::{pair_loss, Branch, DdimStep, LossConfig};

fn goldens() -> (serde_json::Value, NamedTensors) {
    let d = common::fixture("goldens/spo");
    (
        common::read_json(&d.join("index.json")),
        tensors::read(&d.join("tensors.safetensors")).unwrap(),
    )
}

fn rel(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    let (d, m) = common::max_abs_diff(
        a.as_standard_layout().as_slice().unwrap(),
        b.as_standard_layout().as_slice().unwrap(),
    );
    if m > 0.0 {
        d / m
    } else {
        d
    }
}

#[test]
fn loss_and_cotangent_match_torch_autograd() {
    let (index, t) = goldens();
    for case in index["loss"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let f = |k: &str| case[k].as_f64().unwrap();
        let step = DdimStep::new(f("alpha_bar_t"), f("alpha_bar_prev"), f("eta")).unwrap();
        // diffusers computes the variance in float32.
        assert!(
            (step.sigma - f("sigma")).abs() <= 1e-6 * f("sigma"),
            "{name}: sigma"
        );
        let cfg = LossConfig {
            beta: f("beta"),
            clip: f("clip"),
            guidance: f("guidance") as f32,
        };
        let g = |k: &str| t[&format!("{name}.{k}")].clone();
        let (x_t, x_prev, eu, ec, ru, rc) = (
            g("x_t"),
            g("x_prev"),
            g("eps_u"),
            g("eps_c"),
            g("ref_u"),
            g("ref_c"),
        );
        let branch = |i: usize| Branch {
            x_t: x_t.index_axis(Axis(0), i),
            x_prev: x_prev.index_axis(Axis(0), i),
            eps_u: eu.index_axis(Axis(0), i),
            eps_c: ec.index_axis(Axis(0), i),
            ref_u: ru.index_axis(Axis(0), i),
            ref_c: rc.index_axis(Axis(0), i),
        };
        let out = pair_loss(&step, &cfg, &branch(0), &branch(1), 1).unwrap();
        let want_lr: Vec<f64> = case["log_ratio"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (have, want) in out.log_ratio.iter().zip(&want_lr) {
            // The inputs are float32 copies of torch's float64 tensors.
            assert!(
                (have - want).abs() <= 1e-5 * want.abs().max(1e-2),
                "{name}: log r {have} vs {want}"
            );
        }
        assert!(
            (out.loss - f("loss")).abs() <= 1e-5,
            "{name}: loss {} vs {}",
            out.loss,
            f("loss")
        );
        let (cu, cc) = (g("cot_u"), g("cot_c"));
        for i in 0..2 {
            let eu = rel(&out.cot_u[i], &cu.index_axis(Axis(0), i).to_owned());
            let ec = rel(&out.cot_c[i], &cc.index_axis(Axis(0), i).to_owned());
            println!("{name} branch {i}: cotangent error u {eu:.2e} c {ec:.2e}");
            assert!(eu <= 1e-4 && ec <= 1e-4, "{name} branch {i}");
        }
        if name == "win_clamped" {
            // The win ratio left the clamp: no gradient through it.
            assert!(out.cot_u[0].iter().all(|v| *v == 0.0));
            assert!(out.cot_u[1].iter().any(|v| *v != 0.0));
        }
    }
}

fn adamw_run(t: &NamedTensors, cfg: &serde_json::Value, tag: &str, clip: Clip) {
    let f = |k: &str| cfg[k].as_f64().unwrap();
    let mut params: NamedTensors = ["a", "b"]
        .iter()
        .map(|k| (k.to_string(), t[&format!("adamw.init.{k}")].clone()))
        .collect();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: f("lr"),
            beta1: cfg["betas"][0].as_f64().unwrap(),
            beta2: cfg["betas"][1].as_f64().unwrap(),
            weight_decay: f("weight_decay"),
            eps: f("eps"),
        },
        &params,
    )
    .unwrap();
    for step in 0..cfg["steps"].as_u64().unwrap() {
        let mut grads: NamedTensors = ["a", "b"]
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    t[&format!("adamw.{tag}.{step}.grad.{k}")].clone(),
                )
            })
            .collect();
        let norm = clip_gradients(&mut grads, clip);
        assert!(norm > 1.0, "the golden's gradients are meant to be clipped");
        opt.update(&mut params, &grads).unwrap();
        for k in ["a", "b"] {
            let want = &t[&format!("adamw.{tag}.{step}.param.{k}")];
            let e = rel(&params[k], want);
            assert!(e <= 1e-6, "{tag} step {step} '{k}': {e:.2e}");
        }
    }
}

#[test]
fn adamw_and_clipping_match_torch() {
    let (index, t) = goldens();
    adamw_run(&t, &index["adamw"]["noclip"], "noclip", Clip::OfficialNoOp);
    adamw_run(&t, &index["adamw"]["clip"], "clip", Clip::Norm(1.0));
}

#[test]
fn bad_inputs_are_errors() {
    assert!(DdimStep::new(1.5, 0.5, 1.0).is_err());
    assert!(DdimStep::new(0.5, 0.6, f64::NAN).is_err());
    let step = DdimStep::new(0.5, 0.6, 0.0).unwrap();
    let z = ArrayD::<f32>::zeros(vec![4, 2, 2]);
    let b = Branch {
        x_t: z.view(),
        x_prev: z.view(),
        eps_u: z.view(),
        eps_c: z.view(),
        ref_u: z.view(),
        ref_c: z.view(),
    };
    let cfg = LossConfig {
        beta: 10.0,
        clip: 0.1,
        guidance: 5.0,
    };
    let e = pair_loss(&step, &cfg, &b, &b, 1).unwrap_err();
    assert!(e.message.contains("eta"), "{e}");
    let cfg_bad = AdamWConfig {
        lr: -1.0,
        beta1: 0.9,
        beta2: 0.999,
        weight_decay: 0.0,
        eps: 1e-8,
    };
    assert!(AdamW::new(cfg_bad, &NamedTensors::new()).is_err());
}
