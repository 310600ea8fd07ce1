//! Trained LoRA files written in the kohya ("webui") and diffusers dialects
//! load back through the LoRA reader (itself checked against diffusers in
//! tests/lora_pipeline.rs): every module resolves against the UNet it was
//! trained for, and each module's delta is alpha/r * B * A.

mod common;

use ndarray::{ArrayD, Ix2};
use spo_runtime::lora::{
    merge, resolve, write_lora, LoraDialect, LoraFile, LoraOut, ModelGraphs, UnetLayout,
};
use spo_runtime::model::tensors::NamedTensors;
use spo_runtime::train::check::Rng;
use spo_runtime::train::TrainManifest;

/// Random PEFT parameters for every target of the tiny SD 1.5 training folder.
fn params() -> (NamedTensors, usize) {
    let m = TrainManifest::open(&common::fixture("train/tiny-sd15/graphs")).unwrap();
    let mut rng = Rng::new(3);
    let p = m
        .params
        .iter()
        .map(|p| (p.key.clone(), rng.normals(&p.shape, 0.1)))
        .collect();
    (p, m.rank)
}

fn out(rank: usize, alpha: f32, dialect: LoraDialect) -> LoraOut<'static> {
    LoraOut {
        rank,
        alpha,
        dialect,
        layout: None,
    }
}

#[test]
fn both_dialects_load_back_with_their_scale() {
    let (params, rank) = params();
    let alpha = 8.0f32; // rank 4: scale 2
    let graphs = ModelGraphs::open(common::fixture("tiny-sd15")).unwrap();
    let dir = std::env::temp_dir().join(format!("spo-lora-write-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("tiny-sd15/unet/config.json")).unwrap(),
    )
    .unwrap();
    let layout = UnetLayout::from_config(&config).unwrap();
    for (dialect, sgm) in [
        (LoraDialect::Kohya, false),
        (LoraDialect::Kohya, true),
        (LoraDialect::Diffusers, false),
    ] {
        let path = dir.join(format!("{dialect:?}{sgm}.safetensors"));
        let o = LoraOut {
            layout: sgm.then_some(&layout),
            ..out(rank, alpha, dialect)
        };
        write_lora(&path, &params, o).unwrap();
        let file = LoraFile::open(&path).unwrap();
        if sgm {
            // webui names: SGM block numbering, as A1111 and ComfyUI expect.
            let sgm_blocks = ["input_blocks_", "middle_block_", "output_blocks_"];
            assert!(file.modules.keys().all(|k| sgm_blocks
                .iter()
                .any(|b| k.starts_with(&format!("lora_unet_{b}")))));
        }
        let res = resolve(&file, &graphs.targets);
        assert!(res.unmatched.is_empty(), "{dialect:?}: {:?}", res.unmatched);
        assert_eq!(res.matched.len(), params.len() / 2, "{dialect:?}");
        let mut worst = 0f32;
        for m in &res.matched {
            let module = &file.modules[&m.key];
            assert_eq!(
                module.scale(),
                alpha / rank as f32,
                "{dialect:?} {}",
                m.module
            );
            let a = params[&format!("{}.lora_A.weight", m.module)].clone();
            let b = params[&format!("{}.lora_B.weight", m.module)].clone();
            let want = b
                .into_dimensionality::<Ix2>()
                .unwrap()
                .dot(&a.into_dimensionality::<Ix2>().unwrap());
            let t = graphs.targets.target(m.component, &m.module).unwrap();
            let got = merge::delta(module, &t.torch_shape()).unwrap() * module.scale();
            let want: ArrayD<f32> = (want * (alpha / rank as f32)).into_dyn();
            let (d, mx) = common::max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
            worst = worst.max(d / mx);
        }
        assert!(worst <= 1e-6, "{dialect:?}: {worst}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_parameter_sets_are_named_errors() {
    let (params, rank) = params();
    let path =
        std::env::temp_dir().join(format!("spo-lora-bad-{}.safetensors", std::process::id()));
    let key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let mut missing = params.clone();
    missing.remove(&format!("{key}.lora_B.weight"));
    let e = write_lora(&path, &missing, out(rank, 4.0, LoraDialect::Kohya)).unwrap_err();
    assert!(e.message.contains(key) && e.message.contains("no"), "{e}");
    let e = write_lora(&path, &params, out(rank + 1, 4.0, LoraDialect::Kohya)).unwrap_err();
    assert!(e.message.contains("rank-5"), "{e}");
    let mut odd = params.clone();
    odd.insert("unet.conv_in.weight".into(), ArrayD::zeros(vec![2, 2]));
    let e = write_lora(&path, &odd, out(rank, 4.0, LoraDialect::Diffusers)).unwrap_err();
    assert!(e.message.contains("unet.conv_in.weight"), "{e}");
    let e = write_lora(&path, &params, out(rank, f32::NAN, LoraDialect::Diffusers)).unwrap_err();
    assert!(e.message.contains("alpha"), "{e}");
    assert!(!path.exists());
}
