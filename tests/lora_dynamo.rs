//! The pipeline on a UNet from the dynamo exporter (issues #3 and #5):
//! tests/fixtures/tiny-sd15-dynamo/unet, `spo_onnx.export --dynamo` of the same
//! tiny SD 1.5 weights as tests/fixtures/tiny-sd15 (written by
//! `python -m spo_onnx.fixtures --only tiny-sd15-dynamo`); the text encoder, VAE,
//! tokenizer and scheduler are the TorchScript tiny-sd15 ones.
//!
//! Checked against the same diffusers torch goldens and with the same
//! tolerances as the TorchScript graphs: every pipeline case of
//! tests/pipeline_goldens.rs, and every LoRA golden (three key forms,
//! multipliers 1.0 and 0.5, two LoRAs at once) merged. The LoRA targets are
//! also recovered from the graph alone (the exporter's name-scope metadata,
//! without lora_targets.json) and checked against the diffusers weights.

mod common;

use std::collections::BTreeMap;

use common::*;
use prost::Message;
use spo_runtime::model::onnx_proto::ModelProto;
use spo_runtime::model::{OnnxGraph, WeightLayout};
use spo_runtime::pipeline::Pipeline;
use spo_runtime::Options;

const UNET: &str = "tiny-sd15-dynamo/unet";

fn load() -> (SwappedModel, Pipeline) {
    let model = SwappedModel::new("tiny-sd15", "unet", UNET);
    let p = Pipeline::load(&runtime(), &model.dir, &Options::new()).unwrap();
    (model, p)
}

/// The diffusers UNet weights (`<module>.weight` -> (shape, values)).
fn diffusers_unet() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let path = fixture("diffusers/tiny-sd15/unet/diffusion_pytorch_model.safetensors");
    read_safetensors_f32(&path)
        .into_iter()
        .filter(|(k, _)| k.ends_with(".weight"))
        .collect()
}

/// The graph alone (no manifest) gives every Linear/Conv2d of the UNet, each
/// with the diffusers weight values, and agrees with lora_targets.json.
#[test]
fn dynamo_targets_from_name_scopes() {
    let dir = fixture(UNET);
    let path = dir.join("model.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let model = ModelProto::decode(&bytes[..]).unwrap();
    let graph = model.graph.as_ref().unwrap();
    assert!(
        graph.node.iter().any(|n| n
            .metadata_props
            .iter()
            .any(|p| p.key == "pkg.torch.onnx.name_scopes")),
        "no dynamo name scopes in {}",
        path.display()
    );
    let g = OnnxGraph::from_bytes(&bytes, &path).unwrap();
    let targets = g.lora_targets().unwrap();
    let manifest = read_json(&dir.join("lora_targets.json"));
    let modules = manifest["modules"].as_array().unwrap();
    assert!(manifest["missing"].as_array().unwrap().is_empty());
    let weights = diffusers_unet();
    let mut layouts = BTreeMap::new();
    for e in modules {
        let module = e["module"].as_str().unwrap();
        let t = targets
            .get(module)
            .unwrap_or_else(|| panic!("{module}: not recovered from the graph"));
        assert_eq!(
            t.initializer,
            e["initializer"].as_str().unwrap(),
            "{module}"
        );
        assert_eq!(
            Some(t.layout),
            WeightLayout::parse(e["layout"].as_str().unwrap()),
            "{module}"
        );
        let (shape, want) = &weights[&format!("{module}.weight")];
        assert_eq!(&t.torch_shape(), shape, "{module}");
        let (dims, v) = g.read_f32(&t.initializer).unwrap();
        assert_eq!(
            &to_torch_layout(t.layout, &dims, &v),
            want,
            "{module} values ({:?})",
            t.layout
        );
        *layouts.entry(t.layout.as_str()).or_insert(0) += 1;
    }
    assert_eq!(targets.len(), modules.len(), "extra targets");
    eprintln!("dynamo UNet: {} targets {layouts:?}", targets.len());
}

#[test]
fn dynamo_unet_matches_diffusers() {
    let (_model, p) = load();
    check_golden_cases("tiny-sd15 (dynamo UNet)", "tiny-sd15", &p);
}

#[test]
fn dynamo_unet_lora_matches_diffusers_fuse() {
    let (_model, p) = load();
    check_lora_goldens("tiny-sd15 (dynamo UNet)", "tiny-sd15", &p, true);
}
