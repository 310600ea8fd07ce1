//! The gradient runner against independent references: PyTorch autograd on
//! the diffusers UNet with a peft LoRA (goldens from
//! `onnx/spo_onnx/goldens/grad.py`), and directional finite differences
//! through the forward graph. Plus the errors a caller can provoke.

mod common;

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use spo_runtime::model::tensors::{self, NamedTensors};
use spo_runtime::train::{check, GradRunner, TrainManifest};
use spo_runtime::ErrorCode;

fn case_dir(model: &str) -> PathBuf {
    common::fixture(&format!("train/{model}"))
}

fn load_case(model: &str) -> (NamedTensors, NamedTensors) {
    let d = case_dir(model);
    let inputs = tensors::read(&d.join("inputs.safetensors")).unwrap();
    let expected = tensors::read(&d.join("expected.safetensors")).unwrap();
    (inputs, expected)
}

/// Worst error of the gradients: per tensor relative to that tensor's largest
/// entry (`per_tensor`), and relative to the largest gradient of all (`global`).
/// A tensor whose reference is exactly zero (attention over one token has no
/// query/key gradient) counts in `global` only.
struct GradError {
    per_tensor: f32,
    global: f32,
    worst_key: String,
}

fn grad_error(got: &NamedTensors, expected: &NamedTensors) -> GradError {
    let global_max = expected
        .iter()
        .filter(|(k, _)| *k != "out_sample")
        .map(|(_, v)| v.iter().fold(0f32, |m, x| m.max(x.abs())))
        .fold(0f32, f32::max);
    let mut e = GradError {
        per_tensor: 0.0,
        global: 0.0,
        worst_key: String::new(),
    };
    for (k, want) in expected.iter().filter(|(k, _)| *k != "out_sample") {
        let have = got.get(k).unwrap_or_else(|| panic!("no gradient for {k}"));
        let (d, m) = common::max_abs_diff(
            have.as_slice().unwrap(),
            want.as_standard_layout().as_slice().unwrap(),
        );
        e.global = e.global.max(d / global_max);
        if m > 0.0 && d / m > e.per_tensor {
            e.per_tensor = d / m;
            e.worst_key = k.clone();
        }
    }
    e
}

fn run(graphs: &Path, inputs: &NamedTensors) -> (GradRunner, NamedTensors) {
    let mut r = GradRunner::open(&common::runtime(), graphs).unwrap();
    let out = r.run_contract("inputs", inputs.clone()).unwrap();
    (r, out)
}

fn check_out_sample(got: &NamedTensors, expected: &NamedTensors, tol: f32) {
    let (d, m) = common::max_abs_diff(
        got["out_sample"].as_slice().unwrap(),
        expected["out_sample"].as_slice().unwrap(),
    );
    assert!(d / m <= tol, "out_sample: relative error {}", d / m);
}

/// Worst relative error of the gradients' directional derivative against
/// finite differences through the forward graph, over three random
/// directions. The step suits each model: the random tiny SDXL (ten-layer
/// transformer stacks, LoRA of std 0.2) bends sharply beyond ~1e-4.
fn finite_difference(
    r: &mut GradRunner,
    inputs: &NamedTensors,
    grads: &NamedTensors,
    step: f32,
) -> f64 {
    (1..=3)
        .map(|seed| {
            check::directional(r, inputs, grads, seed, step)
                .unwrap()
                .relative_error()
        })
        .fold(0.0, f64::max)
}

/// One model's K=1 folder against autograd (1e-4 of each tensor's largest
/// gradient) and finite differences (1e-2); returns the runner.
fn check_against_references(model: &str, fd_step: f32) -> GradRunner {
    let (inputs, expected) = load_case(model);
    let (mut r, got) = run(&case_dir(model).join("graphs"), &inputs);
    check_out_sample(&got, &expected, 1e-5);
    let e = grad_error(&got, &expected);
    println!(
        "{model}: per-tensor {:.2e} ({}), global {:.2e}",
        e.per_tensor, e.worst_key, e.global
    );
    assert!(e.per_tensor <= 1e-4, "worst {}", e.worst_key);
    let fd = finite_difference(&mut r, &inputs, &got, fd_step);
    println!("{model}: directional finite difference {fd:.2e}");
    assert!(fd <= 1e-2);
    r
}

#[test]
fn tiny_sd15_matches_autograd_and_finite_differences() {
    check_against_references("tiny-sd15", 1e-3);
}

#[test]
fn tiny_sdxl_matches_autograd_and_finite_differences() {
    let r = check_against_references("tiny-sdxl", 1e-4);
    // The folder fits the UNet it was built from, and not the other model's.
    let rt = common::runtime();
    r.check_model(&rt, &common::fixture("tiny-sdxl")).unwrap();
    let e = r
        .check_model(&rt, &common::fixture("tiny-sd15"))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidModel);
    assert!(e.message.contains("encoder_hidden_states"), "{e}");
}

#[test]
fn dynamo_export_matches_autograd() {
    let (inputs, expected) = load_case("tiny-sd15");
    let (_, got) = run(&case_dir("tiny-sd15").join("graphs-dynamo"), &inputs);
    check_out_sample(&got, &expected, 1e-5);
    let e = grad_error(&got, &expected);
    println!("dynamo: per-tensor {:.2e} ({})", e.per_tensor, e.worst_key);
    assert!(e.per_tensor <= 1e-4, "worst {}", e.worst_key);
}

/// fp16 base weights (fp32 LoRA and gradients) against the fp32 reference:
/// within 1e-2 of the largest gradient.
#[test]
fn fp16_base_weights_within_1e2_of_fp32_autograd() {
    let (inputs, expected) = load_case("tiny-sd15");
    let (_, got) = run(&case_dir("tiny-sd15").join("graphs-fp16"), &inputs);
    check_out_sample(&got, &expected, 1e-2);
    let e = grad_error(&got, &expected);
    println!(
        "fp16: global {:.2e}, per-tensor {:.2e} ({})",
        e.global, e.per_tensor, e.worst_key
    );
    assert!(e.global <= 1e-2);
}

#[test]
fn gradients_accumulate_until_zeroed() {
    let (inputs, _) = load_case("tiny-sd15");
    let (mut r, once) = run(&case_dir("tiny-sd15").join("graphs"), &inputs);
    let cot = inputs["cotangent"].clone();
    // A second backward of the same forward doubles every gradient.
    r.backward(&cot).unwrap();
    assert_eq!(r.accumulated(), 2);
    let twice = r.grads().unwrap();
    for (k, g) in &once {
        if k == "out_sample" {
            continue;
        }
        let want = g.mapv(|v| 2.0 * v);
        let (d, m) = common::max_abs_diff(twice[k].as_slice().unwrap(), want.as_slice().unwrap());
        assert!(d <= 1e-6 * m.max(1e-3), "{k}: {d} of {m}");
    }
    r.zero_grad().unwrap();
    assert!(r
        .grads()
        .unwrap()
        .values()
        .all(|g| g.iter().all(|v| *v == 0.0)));
}

#[test]
fn bad_inputs_are_named_errors() {
    let (inputs, _) = load_case("tiny-sd15");
    let mut r =
        GradRunner::open(&common::runtime(), &case_dir("tiny-sd15").join("graphs")).unwrap();
    let key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight";

    let mut missing = inputs.clone();
    missing.remove(key);
    let e = r.run_contract("IN", missing).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(
        e.message.contains(key) && e.message.contains("missing"),
        "{e}"
    );

    let mut extra = inputs.clone();
    extra.insert("text_embeds".into(), ArrayD::zeros(vec![2, 8]));
    let e = r.run_contract("IN", extra).unwrap_err();
    assert!(e.message.contains("unexpected tensor 'text_embeds'"), "{e}");

    let mut wrong = inputs.clone();
    wrong.insert(key.into(), ArrayD::zeros(vec![4, 9]));
    let e = r.run_contract("IN", wrong).unwrap_err();
    assert!(
        e.message.contains(key) && e.message.contains("[4, 9]") && e.message.contains("[4, 8]"),
        "{e}"
    );

    let mut cot = inputs.clone();
    cot.insert("cotangent".into(), ArrayD::zeros(vec![1, 4, 8, 8]));
    let e = r.run_contract("IN", cot).unwrap_err();
    assert!(e.message.contains("cotangent"), "{e}");

    // A backward with no forward for the current parameters.
    let params: NamedTensors = r
        .manifest()
        .params
        .iter()
        .map(|p| (p.key.clone(), inputs[&p.key].clone()))
        .collect();
    r.set_params(&params).unwrap();
    let e = r.backward(&inputs["cotangent"]).unwrap_err();
    assert!(e.message.contains("forward"), "{e}");

    // A training folder built for another UNet.
    let e = r
        .check_model(&common::runtime(), &common::fixture("tiny-sdxl"))
        .unwrap_err();
    assert!(
        e.message.contains("text_embeds") || e.message.contains("encoder_hidden_states"),
        "{e}"
    );
}

/// A hostile or broken manifest is refused with a message naming the problem,
/// before any graph is loaded.
#[test]
fn bad_manifests_are_named_errors() {
    let src = case_dir("tiny-sd15").join("graphs/train_manifest.json");
    let text = std::fs::read_to_string(&src).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dir = std::env::temp_dir().join(format!("spo-train-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rt = common::runtime();
    let expect = |v: &serde_json::Value, needle: &str| {
        std::fs::write(dir.join("train_manifest.json"), v.to_string()).unwrap();
        let e = GradRunner::open(&rt, &dir).err().expect("refused");
        assert!(e.message.contains(needle), "wanted '{needle}' in: {e}");
    };
    v["segments"][0]["forward"] = "../../etc/passwd".into();
    expect(&v, "not a plain file name");
    v["segments"][0]["forward"] = "forward.onnx".into();
    v["format"] = 9.into();
    expect(&v, "format 9");
    v["format"] = 1.into();
    v["params"][0]["shape"] = serde_json::json!([4, 0]);
    expect(&v, "empty");
    v["params"][0]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]);
    expect(&v, "over");
    v["params"][0]["shape"] = serde_json::json!([3, 8]);
    expect(&v, "rank-4");
    std::fs::write(dir.join("train_manifest.json"), &text[..text.len() / 2]).unwrap();
    let e = GradRunner::open(&rt, &dir).err().expect("refused");
    assert!(e.message.contains("not a training manifest"), "{e}");
    // The graphs are missing from this folder.
    std::fs::write(dir.join("train_manifest.json"), &text).unwrap();
    let e = GradRunner::open(&rt, &dir).err().expect("refused");
    assert!(e.message.contains("forward.onnx"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `spo grad` end to end: files in, files out, and a named error for a bad key.
#[test]
fn spo_grad_cli() {
    let d = case_dir("tiny-sd15");
    let out = std::env::temp_dir().join(format!("spo-grad-{}.safetensors", std::process::id()));
    let run = |inputs: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spo"))
            .args(["grad", "--ep", "cpu", "--train-dir"])
            .arg(d.join("graphs"))
            .arg("--inputs")
            .arg(inputs)
            .arg("--out")
            .arg(&out)
            .arg("--model")
            .arg(common::fixture("tiny-sd15"))
            .output()
            .unwrap()
    };
    let o = run(&d.join("inputs.safetensors"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = tensors::read(&out).unwrap();
    let expected = tensors::read(&d.join("expected.safetensors")).unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(grad_error(&got, &expected).per_tensor <= 1e-4);
    // A wrong shape names the key and both shapes; nothing is written.
    std::fs::remove_file(&out).unwrap();
    let mut bad = tensors::read(&d.join("inputs.safetensors")).unwrap();
    bad.insert("sample".into(), ArrayD::zeros(vec![2, 4, 8, 9]));
    let bad_path = out.with_extension("in.safetensors");
    tensors::write(&bad_path, &bad).unwrap();
    let o = run(&bad_path);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("'sample'") && err.contains("[2, 4, 8, 9]") && err.contains("[2, 4, 8, 8]"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::remove_file(&bad_path).ok();
}

/// Three segments chained in Rust, with the first two recomputed from their
/// saved inputs during the backward (gradient checkpointing), give what one
/// segment gives.
#[test]
fn segments_equal_one_segment() {
    let (inputs, expected) = load_case("tiny-sd15");
    let (_, one) = run(&case_dir("tiny-sd15").join("graphs"), &inputs);
    let (r, three) = run(&case_dir("tiny-sd15").join("graphs-seg3"), &inputs);
    assert_eq!(r.manifest().segments.len(), 3);
    // Gradient graphs are built without ONNX Runtime's layout rewrites
    // (`Graph::load_training`), so the cuts change no kernel: measured
    // bit-identical. With them it was 1.1e-6; the bound is the 1e-6,
    // on the norm of the difference over all gradients (relative to their
    // norm), on the largest difference, and on the output.
    let (mut diff, mut norm) = (0f64, 0f64);
    for (k, a) in one.iter().filter(|(k, _)| *k != "out_sample") {
        for (x, y) in three[k].iter().zip(a) {
            diff += ((x - y) as f64).powi(2);
            norm += (*y as f64).powi(2);
        }
    }
    let rel = (diff / norm).sqrt();
    let e = grad_error(&three, &one);
    let (d, m) = common::max_abs_diff(
        three["out_sample"].as_slice().unwrap(),
        one["out_sample"].as_slice().unwrap(),
    );
    println!(
        "3 segments vs 1: gradients {rel:.2e} in norm (largest difference {:.2e} of the largest \
         gradient), out_sample {:.2e}",
        e.global,
        d / m
    );
    assert!(rel <= 1e-6 && e.global <= 1e-6 && d / m <= 1e-6);
    assert!(grad_error(&three, &expected).per_tensor <= 1e-4);
}

/// Seeded mutations of a real manifest and a real input file (byte flips,
/// truncations, inserted digits) give a manifest, tensors or an error: never
/// a panic. The fuzz targets `train_manifest` and `named_tensors` do the same
/// under libFuzzer.
#[test]
fn mutated_manifests_and_inputs_never_panic() {
    let d = case_dir("tiny-sd15");
    let text = std::fs::read(d.join("graphs/train_manifest.json")).unwrap();
    let bytes = std::fs::read(d.join("inputs.safetensors")).unwrap();
    let mut rng = check::Rng::new(11);
    let mut pick = |n: usize| ((rng.normal().abs() * 1e6) as usize) % n.max(1);
    let (mut parsed, mut refused) = (0, 0);
    for i in 0..3000 {
        let (src, digits): (&[u8], &[u8]) = if i % 2 == 0 {
            (&text, b"0123456789-e.")
        } else {
            (&bytes, &[0u8, 0xff, 0x7f, b'{', b'"'])
        };
        let mut m = src.to_vec();
        for _ in 0..1 + pick(4) {
            match pick(3) {
                0 => {
                    let at = pick(m.len());
                    m[at] = digits[pick(digits.len())];
                }
                1 => m.truncate(pick(m.len())),
                _ => {
                    let at = pick(m.len());
                    m.insert(at, digits[pick(digits.len())]);
                }
            }
        }
        let ok = if i % 2 == 0 {
            std::str::from_utf8(&m)
                .ok()
                .is_some_and(|t| TrainManifest::from_json(t).is_ok())
        } else {
            tensors::from_bytes(&m, "mutated").is_ok()
        };
        if ok {
            parsed += 1
        } else {
            refused += 1
        }
    }
    println!("3000 mutations: {parsed} parsed, {refused} refused");
    assert!(refused > 0);
}
