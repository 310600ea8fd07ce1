//! LoRA file parsing: alpha sources and dtypes, and hostile files (each a clear
//! `InvalidLora` naming the file and, where there is one, the key and shape).

use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use spo_runtime::lora::{LoraFile, LoraFormat, LoraKind};
use spo_runtime::ErrorCode;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora-unit")
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serialises `(key, dtype, shape, bytes)` tensors.
fn st(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn parse(name: &str, bytes: &[u8]) -> spo_runtime::Result<LoraFile> {
    LoraFile::from_bytes(bytes, Path::new(name), None)
}

fn expect_err(name: &str, bytes: &[u8], needles: &[&str]) {
    let e = parse(name, bytes).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidLora, "{e}");
    assert!(e.message.contains(name), "file not named: {e}");
    for n in needles {
        assert!(e.message.contains(n), "'{n}' missing from: {e}");
    }
}

fn good_pair(k: &str) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    vec![
        (
            format!("{k}.lora_down.weight"),
            Dtype::F32,
            vec![4, 8],
            f32s(&[0.1; 32]),
        ),
        (
            format!("{k}.lora_up.weight"),
            Dtype::F32,
            vec![8, 4],
            f32s(&[0.1; 32]),
        ),
    ]
}

fn owned(v: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let r: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = v
        .iter()
        .map(|(k, d, s, b)| (k.as_str(), *d, s.clone(), b.clone()))
        .collect();
    st(&r)
}

#[test]
fn alpha_sources_and_dtypes() {
    // F16 per-key alpha, I64 alpha, BF16 alpha, metadata, adapter_config.json: all 2 / rank 4
    for f in [
        "kohya_flat.safetensors",
        "kohya_sgm.safetensors",
        "attn_procs.safetensors",
        "diffusers_old.safetensors",
        "peft/adapter_model.safetensors",
    ] {
        let l = LoraFile::open(fixtures().join(f)).unwrap();
        assert!(
            l.modules
                .values()
                .all(|m| m.alpha == Some(2.0) && m.rank == Some(4) && m.scale() == 0.5),
            "{f}"
        );
    }
    // no alpha anywhere: scale 1
    let b = owned(&good_pair("unet.conv_in"));
    let l = parse("noalpha.safetensors", &b).unwrap();
    assert_eq!(l.format, LoraFormat::Diffusers);
    assert_eq!(l.modules["unet.conv_in"].scale(), 1.0);
    // alpha 0 means alpha = rank
    let mut v = good_pair("lora_unet_conv_in");
    v.push((
        "lora_unet_conv_in.alpha".into(),
        Dtype::F32,
        vec![],
        f32s(&[0.0]),
    ));
    assert_eq!(
        parse("zero.safetensors", &owned(&v)).unwrap().modules["lora_unet_conv_in"].scale(),
        1.0
    );
    // PEFT alpha from a given adapter config, rslora
    let v = vec![
        (
            "base_model.model.conv_in.lora_A.weight".to_string(),
            Dtype::F32,
            vec![4, 8],
            f32s(&[0.1; 32]),
        ),
        (
            "base_model.model.conv_in.lora_B.weight".to_string(),
            Dtype::F32,
            vec![8, 4],
            f32s(&[0.1; 32]),
        ),
    ];
    let cfg = serde_json::json!({"r": 4, "lora_alpha": 8, "use_rslora": true});
    let l = LoraFile::from_bytes(&owned(&v), Path::new("rs.safetensors"), Some(&cfg)).unwrap();
    assert!((l.modules["base_model.model.conv_in"].scale() - 8.0 / 2.0).abs() < 1e-6);
}

#[test]
fn lycoris_kinds_parse() {
    let l = LoraFile::open(fixtures().join("lycoris.safetensors")).unwrap();
    let m = &l.modules["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v"];
    assert!(matches!(m.kind, LoraKind::LoKr { .. }));
    assert_eq!(m.rank, None, "full LoKr factors: no alpha scaling");
    assert_eq!(m.scale(), 1.0);
}

#[test]
fn empty_and_short_files() {
    expect_err("empty.safetensors", &[], &["empty"]);
    expect_err("short.safetensors", &[1, 2, 3], &["too short"]);
}

#[test]
fn header_length_beyond_file() {
    let mut b = 1_000_000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    expect_err("hdr.safetensors", &b, &["header length 1000000", "beyond"]);
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    expect_err("hdrmax.safetensors", &b, &["beyond"]);
}

#[test]
fn truncated_file() {
    let b = std::fs::read(fixtures().join("kohya_flat.safetensors")).unwrap();
    expect_err("trunc.safetensors", &b[..b.len() - 100], &[]);
    expect_err("trunc2.safetensors", &b[..20], &[]);
}

#[test]
fn down_up_shape_mismatch() {
    let v = vec![
        (
            "lora_unet_conv_in.lora_down.weight".to_string(),
            Dtype::F32,
            vec![4, 8],
            f32s(&[0.1; 32]),
        ),
        (
            "lora_unet_conv_in.lora_up.weight".to_string(),
            Dtype::F32,
            vec![8, 3],
            f32s(&[0.1; 24]),
        ),
    ];
    expect_err(
        "mismatch.safetensors",
        &owned(&v),
        &["lora_unet_conv_in", "[4, 8]", "[8, 3]"],
    );
}

#[test]
fn nan_and_inf_alpha() {
    for a in [f32::NAN, f32::INFINITY] {
        let mut v = good_pair("lora_unet_conv_in");
        v.push((
            "lora_unet_conv_in.alpha".into(),
            Dtype::F32,
            vec![],
            f32s(&[a]),
        ));
        expect_err(
            "nan.safetensors",
            &owned(&v),
            &["lora_unet_conv_in.alpha", "finite"],
        );
    }
}

#[test]
fn rank_zero() {
    let v = vec![
        (
            "lora_unet_conv_in.lora_down.weight".to_string(),
            Dtype::F32,
            vec![0, 8],
            vec![],
        ),
        (
            "lora_unet_conv_in.lora_up.weight".to_string(),
            Dtype::F32,
            vec![8, 0],
            vec![],
        ),
    ];
    expect_err(
        "rank0.safetensors",
        &owned(&v),
        &["lora_unet_conv_in.lora_", "[0, 8]"],
    );
}

#[test]
fn unknown_suffix_and_missing_parts() {
    let mut v = good_pair("lora_unet_conv_in");
    v.push((
        "lora_unet_conv_in.weird_thing".into(),
        Dtype::F32,
        vec![2],
        f32s(&[0.0; 2]),
    ));
    expect_err(
        "unknown.safetensors",
        &owned(&v),
        &["lora_unet_conv_in.weird_thing", "[2]", "unknown suffix"],
    );
    let v = vec![(
        "lora_unet_conv_in.lora_down.weight".to_string(),
        Dtype::F32,
        vec![4, 8],
        f32s(&[0.1; 32]),
    )];
    expect_err("half.safetensors", &owned(&v), &["lora_unet_conv_in", "up"]);
    let v = vec![(
        "lora_unet_conv_in.alpha".to_string(),
        Dtype::F32,
        vec![],
        f32s(&[1.0]),
    )];
    expect_err("alphaonly.safetensors", &owned(&v), &["lora_unet_conv_in"]);
    // integer weights are refused
    let v = vec![
        (
            "lora_unet_conv_in.lora_down.weight".to_string(),
            Dtype::I64,
            vec![1, 1],
            1i64.to_le_bytes().to_vec(),
        ),
        (
            "lora_unet_conv_in.lora_up.weight".to_string(),
            Dtype::F32,
            vec![1, 1],
            f32s(&[0.1]),
        ),
    ];
    expect_err(
        "int.safetensors",
        &owned(&v),
        &["lora_unet_conv_in.lora_down.weight", "dtype"],
    );
}
