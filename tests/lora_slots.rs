//! Hot-swap (slots) mode: a tiny SD 1.5 UNet exported with `--lora-slots 4`
//! (tests/fixtures/tiny-sd15-slots/unet; the other components are the plain
//! tiny-sd15 ones). Adapters are fed as inputs, so switching costs no session
//! rebuild, and the result must equal diffusers' fused-LoRA golden.

mod common;

use common::*;
use spo_runtime::pipeline::{Lora, LoraMode, Pipeline};
use spo_runtime::{ErrorCode, Options};

#[test]
fn slots_match_diffusers_and_switch_without_rebuild() {
    // Its own runtime, so the session counter sees only this test.
    let rt = spo_runtime::Runtime::new(
        &Options::from_pairs([("ep", "cpu")]).unwrap(),
        Default::default(),
    )
    .unwrap();
    let model = SwappedModel::new("tiny-sd15", "unet", "tiny-sd15-slots/unet");
    let p = Pipeline::load(&rt, &model.dir, &Options::new()).unwrap();
    let gdir = fixture("goldens/tiny-sd15");
    let index = read_json(&gdir.join("index.json"));
    let entry = index["lora"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "lora_b_x1.0")
        .expect("lora_b_x1.0 golden");
    let b = Lora::open(&fixture("lora/tiny-sd15/lora_b/kohya_flat.safetensors")).unwrap();

    let built = rt.sessions_built();
    let t = std::time::Instant::now();
    p.set_loras(&[(b.clone(), 1.0)], LoraMode::Auto).unwrap();
    let switch = t.elapsed();
    assert_eq!(p.info("lora.mode").as_deref(), Some("slots"));
    assert_eq!(
        rt.sessions_built(),
        built,
        "slots mode must not rebuild sessions"
    );
    let got = run_case(&p, &gdir, &entry["case"]);
    let want = read_npy(&gdir.join(entry["latents"].as_str().unwrap()));
    let (d, m) = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(
        d <= 1e-4 * m.max(1.0),
        "slots vs diffusers fuse: max diff {d}"
    );

    // Back to no LoRA: the zero defaults give the base model.
    p.set_loras(&[], LoraMode::Slots).unwrap();
    assert_eq!(rt.sessions_built(), built);
    let base = read_npy(&gdir.join(entry["base_latents"].as_str().unwrap()));
    let got = run_case(&p, &gdir, &entry["case"]);
    let (d, m) = max_abs_diff(got.as_slice().unwrap(), base.as_slice().unwrap());
    assert!(
        d <= 1e-4 * m.max(1.0),
        "slots with no LoRA vs base: max diff {d}"
    );
    // The same switch in merge mode rebuilds the UNet session: the hot-swap
    // benchmark (printed with --nocapture).
    let t = std::time::Instant::now();
    p.set_loras(&[(b.clone(), 1.0)], LoraMode::Merge).unwrap();
    let merge_switch = t.elapsed();
    assert_eq!(rt.sessions_built(), built + 1);
    eprintln!(
        "LoRA switch: slots {switch:?} (no rebuild), merge {merge_switch:?} (1 session rebuilt)"
    );

    // Text-encoder modules have no slot: refused, naming the key, state kept.
    let a = Lora::open(&fixture("lora/tiny-sd15/lora_a/kohya_flat.safetensors")).unwrap();
    let e = p.set_loras(&[(a, 1.0)], LoraMode::Slots).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidLora, "{e}");
    assert!(
        e.message.contains("no LoRA slot") && e.message.contains("lora_te"),
        "{e}"
    );
}
