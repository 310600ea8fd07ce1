//! ONNX graph reading against the tiny SDXL-layout UNet exported by
//! `onnx/spo_onnx/fixtures/lora_structure.py` three ways (TorchScript + external data,
//! TorchScript without constant folding, dynamo), cross-checked against the
//! module list and weights PyTorch itself wrote (`params.json`, `weights.safetensors`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use spo_runtime::lora::{GraphTargets, WeightLayout};
use spo_runtime::model::onnx_proto::{data_type, ModelProto, NodeProto, TensorProto};
use spo_runtime::model::OnnxGraph;
use spo_runtime::ErrorCode;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora-unit")
}

fn params() -> BTreeMap<String, (String, Vec<usize>)> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny_unet/params.json")).unwrap(),
    )
    .unwrap();
    v["modules"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, m)| {
            let shape = m["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), (m["kind"].as_str().unwrap().to_string(), shape))
        })
        .collect()
}

fn torch_weights() -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(fixtures().join("tiny_unet/weights.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let d = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, d)
        })
        .collect()
}

fn check_export(sub: &str, expect_inout: bool) {
    let path = fixtures().join("tiny_unet").join(sub).join("model.onnx");
    let g = OnnxGraph::open(&path).unwrap();
    let discovered = GraphTargets::discover(&g).unwrap();
    let targets = discovered.lora_targets().unwrap();
    let params = params();
    let weights = torch_weights();
    assert_eq!(
        targets.len(),
        params.len(),
        "{sub}: extra or missing targets: {:?}",
        targets
            .keys()
            .filter(|k| !params.contains_key(*k))
            .collect::<Vec<_>>()
    );
    let mut inout = 0;
    for (module, (kind, shape)) in &params {
        let t = targets
            .get(module)
            .unwrap_or_else(|| panic!("{sub}: module {module} not recovered"));
        assert_eq!(&t.torch_shape(), shape, "{sub}: {module} shape");
        match kind.as_str() {
            "Conv2d" => assert_eq!(t.layout, WeightLayout::ConvOIHW, "{sub}: {module}"),
            _ => assert_ne!(t.layout, WeightLayout::ConvOIHW, "{sub}: {module}"),
        }
        if t.layout == WeightLayout::LinearInOut {
            inout += 1;
        }
        let (dims, v) = g.read_f32(&t.initializer).unwrap();
        assert_eq!(dims, t.shape);
        let got = common::to_torch_layout(t.layout, &dims, &v);
        assert_eq!(
            &got,
            &weights[&format!("{module}.weight")],
            "{sub}: {module} values ({:?})",
            t.layout
        );
    }
    // 3-D-input Linears become MatMul [in,out] when constant folding runs
    assert_eq!(
        inout > 0,
        expect_inout,
        "{sub}: {inout} LinearInOut targets"
    );
}

#[test]
fn torchscript_external_data() {
    check_export("ts", true);
}

#[test]
fn torchscript_fqn_transpose() {
    check_export("fqn", false);
}

#[test]
fn dynamo_name_scopes() {
    check_export("dynamo", true);
}

fn decode(path: &Path) -> ModelProto {
    ModelProto::decode(&std::fs::read(path).unwrap()[..]).unwrap()
}

#[test]
fn fp16_and_bf16_inline_initializers() {
    let src = fixtures().join("tiny_unet/ts/model.onnx");
    let g = OnnxGraph::open(&src).unwrap();
    let dir = tempdir("fp16");
    for (dt, name) in [(data_type::FLOAT16, "f16"), (data_type::BFLOAT16, "bf16")] {
        let mut m = decode(&src);
        let graph = m.graph.as_mut().unwrap();
        for (i, t) in graph.initializer.iter_mut().enumerate() {
            if t.data_type != data_type::FLOAT {
                continue;
            }
            let (_, v) = g.read_f32(&t.name).unwrap();
            t.data_type = dt;
            t.external_data.clear();
            t.data_location = 0;
            if i % 2 == 0 {
                t.raw_data = v
                    .iter()
                    .flat_map(|x| {
                        if dt == data_type::FLOAT16 {
                            half::f16::from_f32(*x).to_le_bytes()
                        } else {
                            half::bf16::from_f32(*x).to_le_bytes()
                        }
                    })
                    .collect();
            } else {
                // the int32_data spelling
                t.int32_data = v
                    .iter()
                    .map(|x| {
                        if dt == data_type::FLOAT16 {
                            half::f16::from_f32(*x).to_bits() as i32
                        } else {
                            half::bf16::from_f32(*x).to_bits() as i32
                        }
                    })
                    .collect();
            }
        }
        let p = dir.join(format!("{name}.onnx"));
        std::fs::write(&p, m.encode_to_vec()).unwrap();
        let h = OnnxGraph::open(&p).unwrap();
        let (gt, ht) = (
            GraphTargets::discover(&g).unwrap(),
            GraphTargets::discover(&h).unwrap(),
        );
        assert_eq!(ht.all().len(), gt.all().len());
        for t in gt.all().values() {
            let (_, a) = g.read_f32(&t.initializer).unwrap();
            let (_, b) = h.read_f32(&t.initializer).unwrap();
            for (x, y) in a.iter().zip(&b) {
                let r = if dt == data_type::FLOAT16 {
                    half::f16::from_f32(*x).to_f32()
                } else {
                    half::bf16::from_f32(*x).to_f32()
                };
                assert_eq!(r, *y, "{name} {}", t.initializer);
            }
        }
    }
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("spo-lora-graph-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn truncated_empty_and_corrupt_graphs() {
    let src = fixtures().join("tiny_unet/ts/model.onnx");
    let bytes = std::fs::read(&src).unwrap();
    let dir = tempdir("trunc");
    for (name, data) in [
        ("half.onnx", bytes[..bytes.len() / 2].to_vec()),
        ("empty.onnx", vec![]),
        ("garbage.onnx", vec![0xff; 64]),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, &data).unwrap();
        let e = OnnxGraph::open(&p).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidModel, "{name}: {e}");
        assert!(e.message.contains(name), "{e}");
    }
}

#[test]
fn external_data_out_of_range() {
    let src = fixtures().join("tiny_unet/ts/model.onnx");
    let dir = tempdir("ext");
    std::fs::copy(
        fixtures().join("tiny_unet/ts/model.onnx_data"),
        dir.join("model.onnx_data"),
    )
    .unwrap();
    let mut m = decode(&src);
    let init = &mut m.graph.as_mut().unwrap().initializer;
    let victim = init
        .iter()
        .position(|t| t.name == "conv_in.weight")
        .unwrap();
    for kv in &mut init[victim].external_data {
        if kv.key == "offset" {
            kv.value = "999999999".into();
        }
    }
    let escape = init
        .iter()
        .position(|t| t.name == "conv_out.weight")
        .unwrap();
    for kv in &mut init[escape].external_data {
        if kv.key == "location" {
            kv.value = "../../etc/passwd".into();
        }
    }
    let p = dir.join("model.onnx");
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    let g = OnnxGraph::open(&p).unwrap();
    let e = g.read_f32("conv_in.weight").unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidModel);
    assert!(
        e.message.contains("conv_in.weight") && e.message.contains("past the end"),
        "{e}"
    );
    let e = g.read_f32("conv_out.weight").unwrap_err();
    assert!(e.message.contains("leaves the model folder"), "{e}");
    // the untouched tensors still read
    assert!(g.read_f32("down_blocks.0.resnets.0.conv1.weight").is_ok());
}

fn node(op: &str, name: &str, inputs: &[&str], domain: &str) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![format!("{name}_out")],
        name: name.into(),
        op_type: op.into(),
        domain: domain.into(),
        ..Default::default()
    }
}

fn tensor(name: &str, dims: &[i64]) -> TensorProto {
    let n: i64 = dims.iter().product();
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        float_data: vec![0.5; n as usize],
        ..Default::default()
    }
}

fn graph_bytes(nodes: Vec<NodeProto>, inits: Vec<TensorProto>) -> Vec<u8> {
    ModelProto {
        ir_version: 8,
        graph: Some(spo_runtime::model::onnx_proto::GraphProto {
            node: nodes,
            initializer: inits,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn packed_qkv_is_refused_with_export_advice() {
    let scope = "/down_blocks.1/attentions.0/transformer_blocks.0/attn1";
    let cases = [
        graph_bytes(
            vec![node(
                "MatMul",
                &format!("{scope}/MatMul"),
                &["x", "MatMul_QKV_0_weight"],
                "",
            )],
            vec![tensor("MatMul_QKV_0_weight", &[16, 48])],
        ),
        graph_bytes(
            vec![node(
                "MatMul",
                &format!("{scope}/MatMul"),
                &["x", "onnx::MatMul_9"],
                "",
            )],
            vec![tensor("onnx::MatMul_9", &[16, 48])],
        ),
        graph_bytes(
            vec![node(
                "Attention",
                "Attention_0",
                &["x", "attn_w"],
                "com.microsoft",
            )],
            vec![tensor("attn_w", &[16, 48])],
        ),
    ];
    for (i, b) in cases.iter().enumerate() {
        let g = OnnxGraph::from_bytes(b, Path::new("packed/model.onnx")).unwrap();
        let e = GraphTargets::discover(&g)
            .unwrap()
            .lora_targets()
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidModel, "case {i}");
        assert!(
            e.message.contains("spo_onnx.export") && e.message.contains("packed/model.onnx"),
            "{e}"
        );
    }
    // separate projections are fine, float_data inline reads
    let b = graph_bytes(
        vec![
            node(
                "MatMul",
                &format!("{scope}/to_q/MatMul"),
                &["x", "onnx::MatMul_1"],
                "",
            ),
            node(
                "Gemm",
                "/time_embedding/linear_1/Gemm",
                &["t", "time_embedding.linear_1.weight"],
                "",
            ),
        ],
        vec![
            tensor("onnx::MatMul_1", &[16, 16]),
            tensor("time_embedding.linear_1.weight", &[32, 8]),
        ],
    );
    let g = OnnxGraph::from_bytes(&b, Path::new("ok/model.onnx")).unwrap();
    let discovered = GraphTargets::discover(&g).unwrap();
    let t = discovered.lora_targets().unwrap();
    assert_eq!(
        t["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].layout,
        WeightLayout::LinearInOut
    );
    // Gemm without transB stores [in, out]
    assert_eq!(
        t["time_embedding.linear_1"].layout,
        WeightLayout::LinearInOut
    );
    assert_eq!(g.read_f32("onnx::MatMul_1").unwrap().1, vec![0.5; 256]);
}

#[test]
fn torchscript_scope_normalisation() {
    use spo_runtime::lora::targets::{dynamo_scope, torchscript_scope};
    assert_eq!(
        torchscript_scope("/down_blocks.1/attentions.0/transformer_blocks.0/ff/net.0/proj/MatMul")
            .as_deref(),
        Some("down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj")
    );
    assert_eq!(
        torchscript_scope("/input_blocks.1/input_blocks.1.1/proj_in/MatMul").as_deref(),
        Some("input_blocks.1.1.proj_in")
    );
    assert_eq!(torchscript_scope("MatMul_3"), None);
    assert_eq!(
        dynamo_scope("['', 'conv_in', 'conv2d']").as_deref(),
        Some("conv_in")
    );
}

#[test]
fn manifest_cross_check() {
    let dir = tempdir("manifest");
    for f in ["model.onnx", "model.onnx_data"] {
        std::fs::copy(fixtures().join("tiny_unet/ts").join(f), dir.join(f)).unwrap();
    }
    let good = OnnxGraph::open(dir.join("model.onnx")).unwrap();
    let good_targets = GraphTargets::discover(&good).unwrap();
    let t = &good_targets.all()["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"];
    let entry = |layout: &str| {
        format!(
            r#"[{{"module":"{}","initializer":"{}","layout":"{layout}"}}]"#,
            t.module, t.initializer
        )
    };
    let discover = || GraphTargets::discover(&OnnxGraph::open(dir.join("model.onnx")).unwrap());
    std::fs::write(dir.join("lora_targets.json"), entry("LinearInOut")).unwrap();
    discover().unwrap();
    std::fs::write(dir.join("lora_targets.json"), entry("LinearOutIn")).unwrap();
    let e = discover().unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidModel);
    assert!(
        e.message.contains("lora_targets.json") && e.message.contains(&t.module),
        "{e}"
    );
}
