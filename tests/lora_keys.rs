//! Full-size key resolution against `sdxl_structure.json` (every Linear / Conv2d of
//! the SDXL UNet and both text encoders, built by diffusers/transformers on the
//! meta device): the 722 default kohya targets and the 560 SPO attention targets
//! in the diffusers-flat and SGM dialects (SGM names derived independently in
//! Python), LoCon resnet/sampler names, text encoders, PEFT prefixes, and an
//! SD 1.5 LoRA on SDXL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use spo_runtime::lora::{
    resolve, Component, LoraFile, LoraFormat, LoraKind, LoraModule, ModelTargets, TargetSet,
    Tensor, UnetDialect, UnetLayout,
};
use spo_runtime::lora::{WeightLayout, WeightTarget};
use spo_runtime::ErrorCode;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora-unit")
}

fn structure() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("sdxl_structure.json")).unwrap())
        .unwrap()
}

fn set(comp: Component, v: &serde_json::Value, layout: Option<UnetLayout>) -> TargetSet {
    let targets = v["modules"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, m)| {
            let shape: Vec<usize> = m["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let layout = if m["kind"] == "Conv2d" {
                WeightLayout::ConvOIHW
            } else {
                WeightLayout::LinearOutIn
            };
            let t = WeightTarget {
                module: k.clone(),
                initializer: format!("{k}.weight"),
                layout,
                shape,
                op_type: String::new(),
                node: String::new(),
            };
            (k.clone(), t)
        })
        .collect();
    TargetSet {
        component: comp,
        targets,
        layout,
    }
}

fn sdxl(layout_from_config: bool) -> ModelTargets {
    let s = structure();
    let layout = layout_from_config.then(|| UnetLayout::from_config(&s["unet"]["config"]).unwrap());
    ModelTargets::new(vec![
        set(Component::Unet, &s["unet"], layout),
        set(Component::TextEncoder, &s["text_encoder"], None),
        set(Component::TextEncoder2, &s["text_encoder_2"], None),
    ])
}

fn strs(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn shape_of(s: &serde_json::Value, comp: &str, module: &str) -> Vec<usize> {
    s[comp]["modules"][module]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

/// A rank-1 LoRA module fitting a weight of PyTorch shape `shape`.
fn rank1(shape: &[usize]) -> LoraModule {
    let (out, inn) = (shape[0], shape[1]);
    let k: Vec<usize> = shape[2..].to_vec();
    let mut dshape = vec![1, inn];
    dshape.extend(&k);
    let mut ushape = vec![out, 1];
    ushape.extend(k.iter().map(|_| 1));
    let dn: usize = dshape.iter().product();
    LoraModule {
        kind: LoraKind::Lora {
            down: Tensor::new(dshape, vec![0.0; dn]),
            up: Tensor::new(ushape, vec![0.0; out]),
            mid: None,
        },
        alpha: Some(1.0),
        rank: Some(1),
        dora_scale: None,
    }
}

fn lora(name: &str, keys: &[String], shapes: &[Vec<usize>]) -> LoraFile {
    LoraFile {
        path: PathBuf::from(name),
        format: LoraFormat::Kohya,
        dialect: UnetDialect::Unknown,
        modules: keys
            .iter()
            .zip(shapes)
            .map(|(k, s)| (k.clone(), rank1(s)))
            .collect(),
        metadata: BTreeMap::new(),
    }
}

fn check_list(targets: &ModelTargets, comp: Component, keys: &[String], modules: &[String]) {
    let s = structure();
    let folder = comp.folder();
    let shapes: Vec<Vec<usize>> = modules.iter().map(|m| shape_of(&s, folder, m)).collect();
    let l = lora("list.safetensors", keys, &shapes);
    let res = resolve(&l, targets);
    assert!(
        res.unmatched.is_empty(),
        "{:?}",
        &res.unmatched[..res.unmatched.len().min(5)]
    );
    assert_eq!(res.matched.len(), keys.len());
    let want: BTreeMap<&String, &String> = keys.iter().zip(modules).collect();
    for m in &res.matched {
        assert_eq!(m.component, comp);
        assert_eq!(&m.module, want[&m.key], "{}", m.key);
        assert_eq!(m.shape, shape_of(&s, folder, &m.module));
    }
}

#[test]
fn kohya_722_and_spo_560_both_dialects() {
    let s = structure();
    for from_config in [true, false] {
        let t = sdxl(from_config);
        for list in ["kohya_722", "spo_560"] {
            let modules = strs(&s[list]["modules"]);
            for dialect in ["flat", "sgm"] {
                let keys = strs(&s[list][dialect]);
                assert_eq!(keys.len(), if list == "kohya_722" { 722 } else { 560 });
                check_list(&t, Component::Unet, &keys, &modules);
            }
            // diffusers / PEFT spellings of the same modules
            let peft: Vec<String> = modules.iter().map(|m| format!("unet.{m}")).collect();
            check_list(&t, Component::Unet, &peft, &modules);
            let base: Vec<String> = modules
                .iter()
                .map(|m| format!("base_model.model.{m}"))
                .collect();
            check_list(&t, Component::Unet, &base, &modules);
        }
    }
}

#[test]
fn locon_resnets_and_samplers_sgm() {
    let s = structure();
    let t = sdxl(true);
    check_list(
        &t,
        Component::Unet,
        &strs(&s["locon_unet"]["sgm"]),
        &strs(&s["locon_unet"]["modules"]),
    );
    // embeddings and in/out convs (reference table §1)
    for (k, m) in [
        ("lora_unet_time_embed_0", "time_embedding.linear_1"),
        ("lora_unet_time_embed_2", "time_embedding.linear_2"),
        ("lora_unet_label_emb_0_0", "add_embedding.linear_1"),
        ("lora_unet_label_emb_0_2", "add_embedding.linear_2"),
        ("lora_unet_input_blocks_0_0", "conv_in"),
        ("lora_unet_out_2", "conv_out"),
        (
            "lora_unet_input_blocks_3_0_op",
            "down_blocks.0.downsamplers.0.conv",
        ),
        (
            "lora_unet_output_blocks_2_2_conv",
            "up_blocks.0.upsamplers.0.conv",
        ),
        (
            "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q",
            "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q",
        ),
        (
            "lora_unet_middle_block_1_proj_in",
            "mid_block.attentions.0.proj_in",
        ),
        (
            "lora_unet_input_blocks_8_1_proj_out",
            "down_blocks.2.attentions.1.proj_out",
        ),
    ] {
        assert_eq!(t.table().resolve(k), Ok((Component::Unet, m)), "{k}");
    }
}

#[test]
fn text_encoders() {
    let s = structure();
    let t = sdxl(true);
    check_list(
        &t,
        Component::TextEncoder,
        &strs(&s["te1"]["kohya"]),
        &strs(&s["te1"]["modules"]),
    );
    check_list(
        &t,
        Component::TextEncoder2,
        &strs(&s["te2"]["kohya"]),
        &strs(&s["te2"]["modules"]),
    );
    // whichever root the structure has, both spellings resolve to it
    let q = |te: &str| {
        strs(&s[te]["modules"])
            .into_iter()
            .find(|m| m.ends_with("layers.0.self_attn.q_proj"))
            .unwrap()
    };
    let (m, m2) = (q("te1"), q("te2"));
    let (m, m2) = (m.as_str(), m2.as_str());
    for k in [
        "text_model.encoder.layers.0.self_attn.q_proj",
        "encoder.layers.0.self_attn.q_proj",
    ] {
        assert_eq!(
            t.table().resolve(&format!("text_encoder.{k}")),
            Ok((Component::TextEncoder, m))
        );
        assert_eq!(
            t.table().resolve(&format!("text_encoder_2.{k}")),
            Ok((Component::TextEncoder2, m2))
        );
    }
    assert_eq!(
        t.table()
            .resolve("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
        Ok((Component::TextEncoder, m))
    );
    // a bare TE path exists in both encoders: ambiguous, reported as such
    assert!(t.table().resolve(m).unwrap_err().contains("ambiguous"));
}

#[test]
fn sd15_layout_sgm_names() {
    let s = structure();
    let layout = UnetLayout::from_config(&s["sd15_unet"]["config"]).unwrap();
    let t = ModelTargets::new(vec![set(
        Component::Unet,
        &s["sd15_unet"],
        Some(layout.clone()),
    )]);
    for (k, m) in [
        (
            "lora_unet_input_blocks_1_1_proj_in",
            "down_blocks.0.attentions.0.proj_in",
        ),
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        (
            "lora_unet_input_blocks_11_0_in_layers_2",
            "down_blocks.3.resnets.1.conv1",
        ),
        (
            "lora_unet_output_blocks_2_1_conv",
            "up_blocks.0.upsamplers.0.conv",
        ),
        (
            "lora_unet_output_blocks_5_2_conv",
            "up_blocks.1.upsamplers.0.conv",
        ),
        (
            "lora_unet_output_blocks_11_1_proj_out",
            "up_blocks.3.attentions.2.proj_out",
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        ),
    ] {
        assert_eq!(t.table().resolve(k), Ok((Component::Unet, m)), "{k}");
    }
    // inferred layout equals the config layout
    let inferred = UnetLayout::infer(
        s["sd15_unet"]["modules"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str),
    )
    .unwrap();
    assert_eq!(inferred, layout);
}

#[test]
fn sd15_lora_on_sdxl_fails_clearly() {
    let s = structure();
    let sd15: Vec<String> = s["sd15_unet"]["modules"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.ends_with("attn2.to_k") || k.starts_with("down_blocks.0.attentions"))
        .cloned()
        .collect();
    let shapes: Vec<Vec<usize>> = sd15.iter().map(|m| shape_of(&s, "sd15_unet", m)).collect();
    let keys: Vec<String> = sd15
        .iter()
        .map(|m| format!("lora_unet_{}", m.replace('.', "_")))
        .collect();
    let l = lora("sd15_style.safetensors", &keys, &shapes);
    let res = resolve(&l, &sdxl(true));
    // SD 1.5 cross-attention (768 context) and level-0 attentions do not exist / fit in SDXL
    assert!(res.matched.is_empty(), "{:?}", res.matched.first());
    let k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k";
    let why = &res.unmatched.iter().find(|(key, _)| key == k).unwrap().1;
    assert!(
        why.contains("shape mismatch") && why.contains("768") && why.contains("2048"),
        "{why}"
    );
    let k0 = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let why0 = &res.unmatched.iter().find(|(key, _)| key == k0).unwrap().1;
    assert!(why0.contains("no module"), "{why0}");
    let e = res.into_strict().unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidLora);
    assert!(e.message.contains("sd15_style.safetensors"), "{e}");
}
