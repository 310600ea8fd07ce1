//! The preference-model runner against PyTorch (goldens from
//! `onnx/spo_onnx/goldens/preference.py`): the image preparation (centre
//! crop, bicubic resize to 224, CLIP normalisation) and the two toy models'
//! scores through their ONNX graphs, prompts tokenized here.

mod common;

use ndarray::{s, ArrayD};
use spo_runtime::model::tensors;
use spo_runtime::train::preference::{preprocess, PreferenceModel};
use spo_runtime::ErrorCode;

#[test]
fn preprocessing_matches_torch_bicubic() {
    let t = tensors::read(&common::fixture("goldens/preference/tensors.safetensors")).unwrap();
    let got = preprocess(&t["wide"]).unwrap();
    assert_eq!(got.shape(), &[1, 3, 224, 224]);
    let sampled: ArrayD<f32> = got.slice(s![.., .., ..;7, ..;7]).to_owned().into_dyn();
    let (d, m) = common::max_abs_diff(
        sampled.as_standard_layout().as_slice().unwrap(),
        t["wide_pre_every7"].as_slice().unwrap(),
    );
    println!("preprocess: max error {d:.2e} of {m:.2e}");
    assert!(d <= 1e-5 * m);
}

#[test]
fn toy_models_score_like_torch() {
    let index = common::read_json(&common::fixture("goldens/preference/index.json"));
    let t = tensors::read(&common::fixture("goldens/preference/tensors.safetensors")).unwrap();
    let prompts: Vec<&str> = index["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let steps: Vec<i64> = index["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    for kind in ["colour", "sharpness"] {
        let mut m = PreferenceModel::open(
            &common::runtime(),
            &common::fixture(&format!("preference/{kind}")),
        )
        .unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let want: Vec<i64> = index["input_ids"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            assert_eq!(m.input_ids(p), want, "{kind}: ids of '{p}'");
        }
        let got = m.score(&t["images"], &steps, &prompts).unwrap();
        for (g, w) in got.iter().zip(index["scores"][kind].as_array().unwrap()) {
            let w = w.as_f64().unwrap() as f32;
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1e-2),
                "{kind}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn contract_violations_are_named_errors() {
    let rt = common::runtime();
    // A UNet is not a preference model.
    let e = PreferenceModel::open(&rt, &common::fixture("tiny-sd15/unet"))
        .err()
        .unwrap();
    assert_eq!(e.code, ErrorCode::InvalidModel);
    assert!(e.message.contains("image"), "{e}");
    let mut m = PreferenceModel::open(&rt, &common::fixture("preference/colour")).unwrap();
    let img = ArrayD::<f32>::zeros(vec![2, 3, 16, 16]);
    let e = m.score(&img, &[0], &["a", "b"]).unwrap_err();
    assert!(e.message.contains("as many"), "{e}");
    let e = preprocess(&ArrayD::<f32>::zeros(vec![1, 4, 16, 16])).unwrap_err();
    assert!(e.message.contains("[1, 4, 16, 16]"), "{e}");
}
