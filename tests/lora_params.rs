//! Trained LoRA parameters fed straight to a slots UNet
//! (`Pipeline::set_lora_params`, how the trainer samples with its current
//! LoRA) give what the same parameters give written as a kohya file and
//! merged into the plain UNet (the merge path is checked against diffusers in
//! tests/lora_pipeline.rs); and they cost no session rebuild.

mod common;

use common::*;
use spo_runtime::lora::{write_lora, LoraDialect, LoraOut};
use spo_runtime::model::tensors::NamedTensors;
use spo_runtime::pipeline::{Lora, LoraMode, Pipeline};
use spo_runtime::train::check::Rng;
use spo_runtime::train::TrainManifest;
use spo_runtime::{ErrorCode, Options};

#[test]
fn params_in_slots_equal_the_merged_file() {
    let rt = spo_runtime::Runtime::new(
        &Options::from_pairs([("ep", "cpu")]).unwrap(),
        Default::default(),
    )
    .unwrap();
    let manifest = TrainManifest::open(&fixture("train/tiny-sd15/graphs")).unwrap();
    let mut rng = Rng::new(21);
    let params: NamedTensors = manifest
        .params
        .iter()
        .map(|p| (p.key.clone(), rng.normals(&p.shape, 0.3)))
        .collect();
    let alpha = 8.0;
    let gdir = fixture("goldens/tiny-sd15");
    let index = read_json(&gdir.join("index.json"));
    let case = &index["lora"][0]["case"];

    let file = std::env::temp_dir().join(format!(
        "spo-lora-params-{}.safetensors",
        std::process::id()
    ));
    write_lora(
        &file,
        &params,
        LoraOut {
            rank: manifest.rank,
            alpha,
            dialect: LoraDialect::Kohya,
            layout: None,
        },
    )
    .unwrap();
    let plain = Pipeline::load(&rt, &fixture("tiny-sd15"), &Options::new()).unwrap();
    let base = run_case(&plain, &gdir, case);
    plain
        .set_loras(&[(Lora::open(&file).unwrap(), 1.0)], LoraMode::Merge)
        .unwrap();
    let merged = run_case(&plain, &gdir, case);
    std::fs::remove_file(&file).ok();

    let model = SwappedModel::new("tiny-sd15", "unet", "tiny-sd15-slots/unet");
    let slots = Pipeline::load(&rt, &model.dir, &Options::new()).unwrap();
    let built = rt.sessions_built();
    slots.set_lora_params(&params, alpha).unwrap();
    assert_eq!(
        rt.sessions_built(),
        built,
        "feeding parameters rebuilds nothing"
    );
    assert_eq!(slots.info("lora.mode").as_deref(), Some("slots"));
    let fed = run_case(&slots, &gdir, case);

    let (effect, _) = max_abs_diff(merged.as_slice().unwrap(), base.as_slice().unwrap());
    let (d, m) = max_abs_diff(fed.as_slice().unwrap(), merged.as_slice().unwrap());
    println!("slots vs merged: max diff {d:.2e} of {m:.2e}; LoRA effect {effect:.2e}");
    assert!(
        effect > 1e-2,
        "the LoRA must change the result for the test to mean anything"
    );
    assert!(d <= 1e-4 * m.max(1.0));
}

#[test]
fn params_that_do_not_fit_are_named_errors() {
    let rt = common::runtime();
    let model = SwappedModel::new("tiny-sd15", "unet", "tiny-sd15-slots/unet");
    let p = Pipeline::load(&rt, &model.dir, &Options::new()).unwrap();
    let a = ndarray::ArrayD::<f32>::zeros(vec![4, 8]);
    let b = ndarray::ArrayD::<f32>::zeros(vec![8, 4]);
    let pair = |m: &str| -> NamedTensors {
        [
            (format!("{m}.lora_A.weight"), a.clone()),
            (format!("{m}.lora_B.weight"), b.clone()),
        ]
        .into_iter()
        .collect()
    };
    let e = p.set_lora_params(&pair("conv_in"), 4.0).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidLora);
    assert!(e.message.contains("'conv_in' has no LoRA slot"), "{e}");
    let mut orphan = pair("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q");
    orphan.insert(
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight".into(),
        b.clone(),
    );
    let e = p.set_lora_params(&orphan, 4.0).unwrap_err();
    assert!(e.message.contains("pair"), "{e}");
    // A plain UNet has no slots.
    let plain = Pipeline::load(&rt, &fixture("tiny-sd15"), &Options::new()).unwrap();
    let e = plain.set_lora_params(&pair("x"), 4.0).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unsupported);
}
