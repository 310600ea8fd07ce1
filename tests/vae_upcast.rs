//! The fp32 upcast of an fp16 VAE (diffusers' `force_upcast`), on
//! tests/fixtures/vae-fp16-overflow (written by `spo_onnx.goldens.units --only
//! vae-fp16`): an fp16 decoder whose output passes the fp16 range, and
//! `decoded.npy`, torch's fp32 decode of the same fp16-rounded weights.
//!
//! Tolerance: 1e-5 relative (|a - b| <= 1e-5 * max(1, |golden|max)); the
//! upcast graph computes in fp32 with exactly the golden's weights.

mod common;

use common::*;
use prost::Message;
use spo_runtime::model::onnx_proto::ModelProto;
use spo_runtime::model::{upcast, OnnxGraph};
use spo_runtime::pipeline::denoise::vae_decode;
use spo_runtime::pipeline::{JobSpec, Pipeline};
use spo_runtime::runtime::session::{DType, Graph};
use spo_runtime::{ErrorCode, Options};

const TOL: f32 = 1e-5;

fn decoder_path() -> std::path::PathBuf {
    fixture("vae-fp16-overflow/vae_decoder/model.onnx")
}

fn run_options() -> ort::session::RunOptions {
    ort::session::RunOptions::new().unwrap()
}

#[test]
fn upcast_graph_matches_torch_fp32() {
    let rt = runtime();
    let graph = OnnxGraph::open(decoder_path()).unwrap();
    assert!(upcast::has_fp16_io(&graph));
    let bytes = upcast::fp16_to_fp32(&graph).unwrap();
    let mut vae = Graph::load_from_memory(&rt, "vae_decoder", &decoder_path(), &bytes).unwrap();
    assert_eq!(
        vae.require_input("latent_sample").unwrap().dtype,
        DType::F32
    );
    assert_eq!(vae.require_output(&["sample"]).unwrap().dtype, DType::F32);
    let z = read_npy(&fixture("vae-fp16-overflow/latents.npy"));
    let want = read_npy(&fixture("vae-fp16-overflow/decoded.npy"));
    let got = vae_decode(&mut vae, z, &run_options()).unwrap();
    assert_eq!(got.shape(), want.shape());
    let (d, m) = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
    eprintln!("fp32 upcast vs torch: max diff {d:.3e} (max |golden| {m:.3e})");
    assert!(d <= TOL * m.max(1.0), "max diff {d} against |golden| {m}");
}

#[test]
fn fp16_overflow_is_an_error_naming_the_fix() {
    let mut vae = Graph::load(&runtime(), "vae_decoder", &decoder_path()).unwrap();
    assert_eq!(
        vae.require_input("latent_sample").unwrap().dtype,
        DType::F16
    );
    let z = read_npy(&fixture("vae-fp16-overflow/latents.npy"));
    let e = vae_decode(&mut vae, z, &run_options()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidModel);
    for part in ["vae_decoder", "non-finite", "vae.upcast=always"] {
        assert!(e.message.contains(part), "{}", e.message);
    }
}

/// tiny-sd15 with the overflowing VAE: `auto` follows its config
/// (`force_upcast: true`), `never` keeps fp16 and the job fails cleanly.
#[test]
fn pipeline_upcasts_by_config_and_option() {
    let model = SwappedModel::new("tiny-sd15", "vae_decoder", "vae-fp16-overflow/vae_decoder");
    let dir = &model.dir;
    let rt = runtime();
    let spec = JobSpec {
        prompt: "a lighthouse".into(),
        width: Some(64),
        height: Some(64),
        steps: 1,
        ..JobSpec::default()
    };
    let io = |p: &Pipeline| p.info("io.vae_decoder").unwrap();

    let p = Pipeline::load(&rt, dir, &Options::new()).unwrap();
    assert!(io(&p).contains("latent_sample float32"), "{}", io(&p));
    let mut job = p.job(spec.clone()).unwrap();
    job.run().unwrap();
    assert_eq!(job.take_images().unwrap().len(), 1);
    drop(job);

    let mut o = Options::new();
    o.set("vae.upcast", "never").unwrap();
    let p = Pipeline::load(&rt, dir, &o).unwrap();
    assert!(io(&p).contains("latent_sample float16"), "{}", io(&p));
    let e = p.job(spec.clone()).unwrap().run().unwrap_err();
    assert!(e.message.contains("non-finite"), "{}", e.message);
    // The pipeline is free again after the failed job.
    assert!(p.job(spec).is_ok());

    o.set("vae.upcast", "sometimes").unwrap();
    let e = Pipeline::load(&rt, dir, &o).err().unwrap();
    assert_eq!(e.code, ErrorCode::InvalidOptionValue);
    assert!(e.message.contains("vae.upcast"), "{}", e.message);
}

/// Every field of the model messages is in our schema: decoding and
/// re-encoding an exported graph keeps every byte (field order aside).
#[test]
fn onnx_models_reencode_without_loss() {
    let mut checked = 0;
    for model in ["tiny-sdxl", "tiny-sd15", "vae-fp16-overflow"] {
        for e in std::fs::read_dir(fixture(model)).unwrap() {
            let path = e.unwrap().path().join("model.onnx");
            if !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let m = ModelProto::decode(bytes.as_slice()).unwrap();
            let again = m.encode_to_vec();
            assert_eq!(again.len(), bytes.len(), "{}", path.display());
            assert_eq!(ModelProto::decode(again.as_slice()).unwrap(), m);
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} graphs");
}
