//! Merge results against references computed in PyTorch: PEFT's own `merge()`
//! for plain LoRA (`expected_lora.safetensors`), numpy formulas for
//! LoCon / LoHa / LoKr / DoRA (`expected_lycoris.safetensors`, multiplier 0.8).
//! Tolerance: max |got - expected| <= 1e-5 * max(1, max |expected|) per weight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use spo_runtime::lora::WeightLayout;
use spo_runtime::lora::{
    merge, merged_overrides, Component, LoraFile, LoraFormat, MergeOptions, ModelGraphs,
    OverrideData, UnetDialect, UnetLayout,
};
use spo_runtime::model::OnnxGraph;

mod common;

use common::read_safetensors_f32;

const REL_TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora-unit")
}

fn layout() -> UnetLayout {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_unet/params.json")).unwrap(),
    )
    .unwrap();
    UnetLayout::from_config(&v["config"]).unwrap()
}

fn model(sub: &str) -> ModelGraphs {
    let dir = fixtures().join("tiny_unet").join(sub);
    let g = OnnxGraph::open(dir.join("model.onnx")).unwrap();
    ModelGraphs::from_graphs(&dir, BTreeMap::from([(Component::Unet, g)]), Some(layout())).unwrap()
}

fn torch_order(layout: WeightLayout, dims: &[usize], v: &[f32]) -> Vec<f32> {
    if layout != WeightLayout::LinearInOut {
        return v.to_vec();
    }
    let (i, o) = (dims[0], dims[1]);
    let mut t = vec![0.0; v.len()];
    for a in 0..i {
        for b in 0..o {
            t[b * i + a] = v[a * o + b];
        }
    }
    t
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= REL_TOL * scale,
        "{what}: max abs err {err} (scale {scale})"
    );
}

/// Merges `loras` into `sub` and compares every override with `expected`;
/// returns how many weights were compared.
fn check(
    sub: &str,
    loras: &[(&LoraFile, f32)],
    expected: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    only: Option<&dyn Fn(&str) -> bool>,
) -> usize {
    let m = model(sub);
    let out = merged_overrides(&m, loras, MergeOptions { strict: true }).unwrap();
    let targets = &m.targets.sets[&Component::Unet].targets;
    let mut n = 0;
    for t in targets.values() {
        let key = format!("{}.weight", t.module);
        let Some((_, want)) = expected.get(&key) else {
            continue;
        };
        if let Some(f) = only {
            if !f(&t.module) {
                continue;
            }
        }
        let o = out
            .overrides
            .get(&(Component::Unet, t.initializer.clone()))
            .unwrap_or_else(|| panic!("{sub}: no override for {key}"));
        let OverrideData::F32(v) = &o.data else {
            panic!("fp32 model")
        };
        assert_close(
            &format!("{sub} {key}"),
            &torch_order(t.layout, &o.dims, v),
            want,
        );
        n += 1;
    }
    n
}

#[test]
fn plain_lora_all_formats_match_peft_merge() {
    let expected = read_safetensors_f32(&fixtures().join("expected_lora.safetensors"));
    let files = [
        (
            "kohya_flat.safetensors",
            LoraFormat::Kohya,
            UnetDialect::Diffusers,
        ),
        ("kohya_sgm.safetensors", LoraFormat::Kohya, UnetDialect::Sgm),
        (
            "peft/adapter_model.safetensors",
            LoraFormat::Peft,
            UnetDialect::Diffusers,
        ),
        (
            "diffusers_old.safetensors",
            LoraFormat::Diffusers,
            UnetDialect::Diffusers,
        ),
    ];
    for (f, format, dialect) in files {
        let l = LoraFile::open(fixtures().join(f)).unwrap();
        assert_eq!((l.format, l.dialect), (format, dialect), "{f}");
        assert_eq!(l.modules.len(), expected.len(), "{f}");
        for m in l.modules.values() {
            assert_eq!(m.scale(), 0.5, "{f}: alpha 2 / rank 4");
        }
        for sub in ["ts", "fqn", "dynamo"] {
            let n = check(sub, &[(&l, 1.0)], &expected, None);
            assert_eq!(n, expected.len(), "{f} on {sub}");
        }
    }
}

#[test]
fn several_loras_sum() {
    let expected = read_safetensors_f32(&fixtures().join("expected_lora.safetensors"));
    let a = LoraFile::open(fixtures().join("kohya_sgm.safetensors")).unwrap();
    let b = LoraFile::open(fixtures().join("peft/adapter_model.safetensors")).unwrap();
    let c = LoraFile::open(fixtures().join("kohya_flat.safetensors")).unwrap();
    let n = check("ts", &[(&a, 0.25), (&b, 0.5), (&c, 0.25)], &expected, None);
    assert_eq!(n, expected.len());
}

#[test]
fn attn_processor_form() {
    let expected = read_safetensors_f32(&fixtures().join("expected_lora.safetensors"));
    let l = LoraFile::open(fixtures().join("attn_procs.safetensors")).unwrap();
    assert_eq!(l.format, LoraFormat::Diffusers);
    let is_attn = |m: &str| {
        m.ends_with(".to_q")
            || m.ends_with(".to_k")
            || m.ends_with(".to_v")
            || m.ends_with(".to_out.0")
    };
    let n = check("ts", &[(&l, 1.0)], &expected, Some(&is_attn));
    assert_eq!(n, l.modules.len());
    assert!(n > 40, "{n}");
}

#[test]
fn lycoris_kinds_match_numpy() {
    let expected = read_safetensors_f32(&fixtures().join("expected_lycoris.safetensors"));
    let l = LoraFile::open(fixtures().join("lycoris.safetensors")).unwrap();
    let kinds: Vec<&str> = l.modules.values().map(|m| m.kind.name()).collect();
    for k in ["lora", "locon-tucker", "loha", "lokr"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    assert_eq!(
        l.modules
            .values()
            .filter(|m| m.dora_scale.is_some())
            .count(),
        2
    );
    for sub in ["ts", "dynamo"] {
        let n = check(sub, &[(&l, 0.8)], &expected, None);
        assert_eq!(n, expected.len(), "{sub}");
    }
}

#[test]
fn unmatched_keys_are_reported() {
    let l = LoraFile::open(fixtures().join("kohya_flat.safetensors")).unwrap();
    let mut l2 = l.clone();
    let m = l2.modules.values().next().unwrap().clone();
    l2.modules
        .insert("lora_unet_down_blocks_9_attentions_0_proj_in".into(), m);
    let res = spo_runtime::lora::resolve(&l2, &model("ts").targets);
    assert_eq!(res.unmatched.len(), 1);
    assert_eq!(res.matched.len(), l.modules.len());
    let e = res.into_strict().unwrap_err();
    assert_eq!(e.code, spo_runtime::ErrorCode::InvalidLora);
    assert!(
        e.message.contains("kohya_flat.safetensors") && e.message.contains("down_blocks_9"),
        "{e}"
    );
    // non-strict merge keeps going and reports
    let out = merged_overrides(&model("ts"), &[(&l2, 1.0)], MergeOptions::default()).unwrap();
    assert_eq!(out.resolutions[0].unmatched.len(), 1);
}

#[test]
fn f16_cast_clamps() {
    let v = merge::to_f16_clamped(&[1e6, -1e6, 1.5, f32::NAN]).unwrap();
    assert_eq!(v[0].to_f32(), 65504.0);
    assert_eq!(v[1].to_f32(), -65504.0);
    assert_eq!(v[2].to_f32(), 1.5);
    assert!(v[3].is_nan());
}

#[test]
fn fp16_model_gets_f16_overrides() {
    use prost::Message;
    use spo_runtime::model::onnx_proto::{data_type, ModelProto};
    let src = fixtures().join("tiny_unet/ts/model.onnx");
    let g = OnnxGraph::open(&src).unwrap();
    let mut m = ModelProto::decode(&std::fs::read(&src).unwrap()[..]).unwrap();
    for t in &mut m.graph.as_mut().unwrap().initializer {
        if t.data_type == data_type::FLOAT {
            let (_, v) = g.read_f32(&t.name).unwrap();
            t.data_type = data_type::FLOAT16;
            t.external_data.clear();
            t.data_location = 0;
            t.raw_data = merge::to_f16_clamped(&v)
                .unwrap()
                .iter()
                .flat_map(|h| h.to_le_bytes())
                .collect();
        }
    }
    let dir = std::env::temp_dir().join(format!("spo-lora-merge-f16-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("unet")).unwrap();
    std::fs::write(dir.join("unet/model.onnx"), m.encode_to_vec()).unwrap();
    let model = ModelGraphs::open(&dir).unwrap();
    let l = LoraFile::open(fixtures().join("kohya_flat.safetensors")).unwrap();
    let out = merged_overrides(&model, &[(&l, 1.0)], MergeOptions { strict: true }).unwrap();
    let expected = read_safetensors_f32(&fixtures().join("expected_lora.safetensors"));
    for t in model.targets.sets[&Component::Unet].targets.values() {
        let o = &out.overrides[&(Component::Unet, t.initializer.clone())];
        let OverrideData::F16(v) = &o.data else {
            panic!("f16 expected")
        };
        let got: Vec<f32> = v.iter().map(|h| h.to_f32()).collect();
        let want = &expected[&format!("{}.weight", t.module)].1;
        // f16 base weights + f16 rounding of the result: 2e-3 relative
        let got = torch_order(t.layout, &o.dims, &got);
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 2e-3 * scale, "{}: {err}", t.module);
    }
}
