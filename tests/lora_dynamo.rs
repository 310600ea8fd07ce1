//! The pipeline on UNets from the dynamo exporter (issues #3 and #5):
//! tests/fixtures/tiny-{sd15,sdxl}-dynamo/unet, `spo_onnx.export --dynamo` of the
//! same tiny weights as tests/fixtures/tiny-{sd15,sdxl} (written by
//! `python -m spo_onnx.fixtures --only tiny-sd15-dynamo --only tiny-sdxl-dynamo`);
//! the text encoders, VAE, tokenizers and scheduler are the TorchScript ones.
//! On SDXL the LoRA goldens include the kohya SGM key form.
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
use spo_runtime::lora::{GraphTargets, WeightLayout};
use spo_runtime::model::onnx_proto::ModelProto;
use spo_runtime::model::OnnxGraph;
use spo_runtime::pipeline::{Pipeline, StepMath};
use spo_runtime::Options;

const MODELS: [&str; 2] = ["tiny-sd15", "tiny-sdxl"];

fn unet(model: &str) -> String {
    format!("{model}-dynamo/unet")
}

fn load(model: &str) -> (SwappedModel, Pipeline) {
    let m = SwappedModel::new(model, "unet", &unet(model));
    let p = Pipeline::load(&runtime(), &m.dir, &Options::new()).unwrap();
    (m, p)
}

/// The diffusers UNet weights (`<module>.weight` -> (shape, values)).
fn diffusers_unet(model: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let path = fixture(&format!(
        "diffusers/{model}/unet/diffusion_pytorch_model.safetensors"
    ));
    read_safetensors_f32(&path)
        .into_iter()
        .filter(|(k, _)| k.ends_with(".weight"))
        .collect()
}

/// The graph alone (no manifest) gives every Linear/Conv2d of the UNet, each
/// with the diffusers weight values, and agrees with lora_targets.json.
#[test]
fn dynamo_targets_from_name_scopes() {
    for model in MODELS {
        targets_from_name_scopes(model);
    }
}

fn targets_from_name_scopes(model: &str) {
    let dir = fixture(&unet(model));
    let path = dir.join("model.onnx");
    let bytes = std::fs::read(&path).unwrap();
    let proto = ModelProto::decode(&bytes[..]).unwrap();
    let graph = proto.graph.as_ref().unwrap();
    assert!(
        graph.node.iter().any(|n| n
            .metadata_props
            .iter()
            .any(|p| p.key == "pkg.torch.onnx.name_scopes")),
        "no dynamo name scopes in {}",
        path.display()
    );
    let g = OnnxGraph::from_bytes(&bytes, &path).unwrap();
    let discovered = GraphTargets::discover(&g).unwrap();
    let targets = discovered.lora_targets().unwrap();
    let manifest = read_json(&dir.join("lora_targets.json"));
    let modules = manifest["modules"].as_array().unwrap();
    assert!(manifest["missing"].as_array().unwrap().is_empty());
    let weights = diffusers_unet(model);
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
    eprintln!("{model} dynamo UNet: {} targets {layouts:?}", targets.len());
}

#[test]
fn dynamo_unet_matches_diffusers() {
    for model in MODELS {
        let (_m, p) = load(model);
        check_golden_cases(
            &format!("{model} (dynamo UNet)"),
            model,
            &p,
            StepMath::Graph,
        );
    }
}

#[test]
fn dynamo_unet_lora_matches_diffusers_fuse() {
    for model in MODELS {
        let (_m, p) = load(model);
        check_lora_goldens(&format!("{model} (dynamo UNet)"), model, &p, true);
    }
}
