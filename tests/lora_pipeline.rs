//! LoRA through the whole pipeline against diffusers' fused-LoRA goldens
//! (onnx/spo_onnx/goldens/lora.py: `load_lora_weights` + `fuse_lora`, then the
//! torch pipeline). Each LoRA is checked in all three key forms (PEFT, kohya
//! diffusers-flat, kohya SGM), at multipliers 1.0 and 0.5 and two at once, on
//! UNet and text encoders. Tolerance: 1e-4 x max(1, |golden|max) on the final
//! latents, as for the base pipeline.
//!
//! On tiny-sdxl, whose UNet session takes ~40 s to build on this machine, the
//! first entry is checked in every key form and the others in the kohya
//! diffusers-flat form only; tiny-sd15 checks every entry in every form.

mod common;

use common::*;
use spo_runtime::pipeline::{Lora, LoraMode, Pipeline};
use spo_runtime::{ErrorCode, Options};

fn check_model(model: &str, all_forms_for_every_entry: bool) {
    let p = Pipeline::load(&runtime(), &fixture(model), &Options::new()).unwrap();
    check_lora_goldens(model, model, &p, all_forms_for_every_entry);
}

#[test]
fn tiny_sdxl_lora_matches_diffusers_fuse() {
    check_model("tiny-sdxl", false);
}

#[test]
fn tiny_sd15_lora_matches_diffusers_fuse() {
    check_model("tiny-sd15", true);
}

/// The same list again rebuilds nothing; a different multiplier rebuilds only
/// the components the LoRA touches (lora_b is UNet-only).
#[test]
fn unchanged_set_rebuilds_nothing() {
    // Its own runtime: the session counter is per runtime, and the other tests
    // of this binary build sessions in parallel on the shared one.
    let rt = spo_runtime::Runtime::new(
        &Options::from_pairs([("ep", "cpu")]).unwrap(),
        Default::default(),
    )
    .unwrap();
    let p = Pipeline::load(&rt, &fixture("tiny-sd15"), &Options::new()).unwrap();
    let b = Lora::open(&fixture("lora/tiny-sd15/lora_b/kohya_flat.safetensors")).unwrap();
    let n0 = rt.sessions_built();
    p.set_loras(&[(b.clone(), 1.0)], LoraMode::Auto).unwrap();
    let n1 = rt.sessions_built();
    assert_eq!(n1 - n0, 1, "a UNet-only LoRA rebuilds the UNet alone");
    p.set_loras(&[(b.clone(), 1.0)], LoraMode::Merge).unwrap();
    assert_eq!(rt.sessions_built(), n1, "the same list must not rebuild");
    p.set_loras(&[(b, 0.5)], LoraMode::Merge).unwrap();
    assert_eq!(rt.sessions_built() - n1, 1);
}

/// A LoRA for another model is refused with a message naming the file, and the
/// pipeline keeps working with what it had.
#[test]
fn wrong_model_lora_is_refused() {
    // An SDXL LoRA on SD 1.5 (the tiny SDXL UNet session is slow to build).
    let p = Pipeline::load(&runtime(), &fixture("tiny-sd15"), &Options::new()).unwrap();
    let xl = Lora::open(&fixture("lora/tiny-sdxl/lora_a/kohya_flat.safetensors")).unwrap();
    let e = p.set_loras(&[(xl, 1.0)], LoraMode::Merge).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidLora, "{e}");
    assert!(e.message.contains("kohya_flat.safetensors"), "{e}");
    assert_eq!(p.info("lora.mode").as_deref(), Some("none"));
    let e = p.set_loras(&[], LoraMode::Slots).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unsupported, "{e}");
}
