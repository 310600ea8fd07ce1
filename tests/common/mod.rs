//! Shared helpers for the integration tests that run real graphs: one CPU
//! runtime per test binary, golden file reading, and tolerance checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::ArrayD;
use spo_runtime::pipeline::JobSpec;
use spo_runtime::{Options, Runtime};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The CPU runtime. ONNX Runtime is found through SPO_ORT_LIBRARY (set by
/// `make test`), or the other documented places.
pub fn runtime() -> Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let o = Options::from_pairs([("ep", "cpu")]).unwrap();
        Runtime::new(&o, Default::default()).unwrap_or_else(|e| {
            panic!("{e}\n(run through `make test`, which fetches ONNX Runtime)")
        })
    })
    .clone()
}

pub fn read_npy(path: &Path) -> ArrayD<f32> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    <ArrayD<f32> as ndarray_npy::ReadNpyExt>::read_npy(f)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let t = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Python's json writes -Infinity / NaN (e.g. lambda_min_clipped); those
    // fields are unused here, so read them as null.
    let t = t
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest |a - b| and the largest |b|, after checking the shapes agree.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let m = b.iter().map(|v| v.abs()).fold(0.0, f32::max);
    (d, m)
}

/// The job of a golden case (see onnx/DESIGN.md): explicit initial latents and
/// per-step noise, so no RNG parity is involved.
pub fn spec_for(dir: &std::path::Path, c: &serde_json::Value) -> JobSpec {
    let mut s = JobSpec {
        prompt: c["prompt"].as_str().unwrap().to_owned(),
        negative_prompt: c["negative_prompt"].as_str().map(str::to_owned),
        width: Some(c["width"].as_u64().unwrap() as usize),
        height: Some(c["height"].as_u64().unwrap() as usize),
        steps: c["steps"].as_u64().unwrap() as usize,
        guidance: c["guidance"].as_f64().unwrap(),
        guidance_rescale: c["guidance_rescale"].as_f64().unwrap_or(0.0),
        scheduler: Some(c["scheduler"].as_str().unwrap().to_owned()),
        eta: c["eta"].as_f64().unwrap_or(0.0),
        num_images: c["num_images"].as_u64().unwrap_or(1) as usize,
        clip_skip: c["clip_skip"].as_u64().unwrap_or(0) as usize,
        ..JobSpec::default()
    };
    s.init_latents = Some(read_npy(&dir.join(c["init_latents"].as_str().unwrap())));
    if let Some(n) = c["noise"].as_str() {
        s.step_noise = Some(read_npy(&dir.join(n)));
    }
    if c["long_prompt"] == "chunks" {
        s.long_prompt = spo_runtime::text::LongPrompt::Chunks;
    }
    if let Some(img) = c["init_image"].as_str() {
        s.init_image = Some(dir.join(img));
        s.strength = c["strength"].as_f64().unwrap();
    }
    s
}

/// Final latents: 1e-4 absolute, scaled by max(1, |golden|max) (fp32 ONNX vs
/// torch kernels accumulated over 4-6 steps; see tests/pipeline_goldens.rs).
pub const LATENT_TOL: f32 = 1e-4;
/// Decoded 8-bit images: 1 level per channel (rounding at the 0.5 boundary).
pub const IMAGE_TOL: u8 = 1;

/// A model folder assembled from symlinks: the fixture `base` with its
/// `component` replaced by the fixture folder `replacement` (e.g. `unet` by
/// `tiny-sd15-slots/unet`). The folder is removed on drop.
pub struct SwappedModel {
    pub dir: PathBuf,
}

impl SwappedModel {
    pub fn new(base: &str, component: &str, replacement: &str) -> SwappedModel {
        // Unique per process and call: tests of one binary run in parallel.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spo-{}-{}-{}",
            replacement.replace('/', "_"),
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(fixture(base)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            let src = if name == component {
                fixture(replacement)
            } else {
                e.path()
            };
            std::os::unix::fs::symlink(src, dir.join(name)).unwrap();
        }
        SwappedModel { dir }
    }
}

impl SwappedModel {
    /// The fixture `base` with `scheduler/scheduler_config.json` replaced by
    /// `edit` applied to the fixture's own config.
    pub fn with_scheduler_config(
        base: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> SwappedModel {
        let mut config = read_json(&fixture(&format!("{base}/scheduler/scheduler_config.json")));
        edit(&mut config);
        let m = SwappedModel::new(base, "scheduler", base);
        let sched = m.dir.join("scheduler");
        std::fs::remove_file(&sched).unwrap();
        std::fs::create_dir(&sched).unwrap();
        let text = serde_json::to_string_pretty(&config).unwrap();
        std::fs::write(sched.join("scheduler_config.json"), text).unwrap();
        m
    }
}

impl Drop for SwappedModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the golden case `c` of `dir` and returns the final latents.
pub fn run_case(
    p: &spo_runtime::pipeline::Pipeline,
    dir: &Path,
    c: &serde_json::Value,
) -> ArrayD<f32> {
    let mut job = p.job(spec_for(dir, c)).unwrap();
    job.run().unwrap();
    job.latents().unwrap()
}

/// Every pipeline case of the goldens `goldens/<model>` (index.json "cases"):
/// final latents within LATENT_TOL and the decoded image within IMAGE_TOL.
/// `label` names the model under test in messages.
/// `step_math` picks the loop (the resident step graph or the host reference).
pub fn check_golden_cases(
    label: &str,
    model: &str,
    p: &spo_runtime::pipeline::Pipeline,
    step_math: spo_runtime::pipeline::StepMath,
) {
    use spo_runtime::pipeline::Image;

    let dir = fixture(&format!("goldens/{model}"));
    let index = read_json(&dir.join("index.json"));
    let mut failures = Vec::new();
    let mut worst = (0.0f32, 0u8);
    for c in index["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let spec = JobSpec {
            step_math,
            ..spec_for(&dir, c)
        };
        let mut job = p.job(spec).unwrap();
        // The x0 preview is in place, for the step just done, when progress runs.
        let slot = job.preview_slot();
        job.set_progress(Some(Box::new(move |done, _| {
            slot.info().is_some_and(|(step, _)| step == done)
        })));
        job.run().unwrap_or_else(|e| panic!("{label} {name}: {e}"));
        assert_eq!(
            job.is_resident(),
            step_math == spo_runtime::pipeline::StepMath::Graph,
            "{label} {name}: the loop that ran"
        );
        let got = job.latents().unwrap();
        let want = read_npy(&dir.join(c["latents"].as_str().unwrap()));
        assert_eq!(got.shape(), want.shape(), "{label} {name} latent shape");
        let (d, m) = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
        let tol = LATENT_TOL * m.max(1.0);
        // Every scheduler here but DDIM (whose final alpha is alphas_cumprod[0]
        // with set_alpha_to_one=false) ends at noise level 0, where the last
        // step's x0 is the final sample: diffusers' latents check the preview.
        let preview = job.preview_slot().get().unwrap().unwrap();
        assert_eq!(preview.step, job.total_steps(), "{name} preview step");
        assert_eq!(&preview.shape[..], want.shape(), "{name} preview shape");
        if c["scheduler"] != "ddim" {
            let (dp, _) = max_abs_diff(&preview.latents, want.as_slice().unwrap());
            if dp > tol {
                failures.push(format!(
                    "{name}: last x0 preview off the final latents by {dp:.2e}"
                ));
            }
        }
        let images = job.take_images().unwrap();
        let golden = Image::read_png(&dir.join(c["image"].as_str().unwrap())).unwrap();
        let img_d = images[0]
            .rgb
            .iter()
            .zip(&golden.rgb)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(255);
        // Further images (num_images > 1) against diffusers' float output,
        // quantised as its numpy_to_pil does; single-image cases have only the PNG.
        let num_images = c["num_images"].as_u64().unwrap_or(1) as usize;
        assert_eq!(images.len(), num_images, "{name} image count");
        let want_images = match c["image_f32"].as_str() {
            Some(f) => {
                let a = read_npy(&dir.join(f));
                assert_eq!(a.shape()[0], num_images, "{name} image_f32 count");
                a
            }
            None => {
                assert_eq!(num_images, 1, "{name}: multi-image case without image_f32");
                ndarray::ArrayD::zeros(ndarray::IxDyn(&[0]))
            }
        };
        let mut img_d = img_d;
        for (img, want) in images.iter().zip(want_images.outer_iter()).skip(1) {
            let d = img
                .rgb
                .iter()
                .zip(want.iter())
                .map(|(a, b)| a.abs_diff((b * 255.0).round() as u8))
                .max()
                .unwrap_or(255);
            img_d = img_d.max(d);
        }
        worst = (worst.0.max(d / m.max(1.0)), worst.1.max(img_d));
        if d > tol
            || img_d > IMAGE_TOL
            || (images[0].width, images[0].height) != (golden.width, golden.height)
        {
            failures.push(format!(
                "{name}: latents max diff {d:.2e} (tol {tol:.2e}), image max diff {img_d}"
            ));
        }
    }
    eprintln!(
        "{label} ({step_math:?} step math): {} cases, worst relative latent diff {:.2e}, worst pixel diff {}",
        index["cases"].as_array().unwrap().len(),
        worst.0,
        worst.1
    );
    assert!(
        failures.is_empty(),
        "{label} cases off the diffusers goldens:\n{}",
        failures.join("\n")
    );
}

/// Every LoRA golden of `goldens/<model>` (index.json "lora": diffusers
/// `load_lora_weights` + `fuse_lora`) in merge mode, in every key form the
/// entry has (only the kohya diffusers-flat form after the first entry unless
/// `all_forms_for_every_entry`); then removing the LoRAs must give the base
/// latents back. Tolerance: LATENT_TOL on the final latents.
pub fn check_lora_goldens(
    label: &str,
    model: &str,
    p: &spo_runtime::pipeline::Pipeline,
    all_forms_for_every_entry: bool,
) {
    use spo_runtime::pipeline::{Lora, LoraMode};

    let gdir = fixture(&format!("goldens/{model}"));
    let index = read_json(&gdir.join("index.json"));
    let entries = index["lora"].as_array().unwrap();
    assert!(!entries.is_empty(), "{label}: no LoRA goldens");
    let mut failures = Vec::new();
    let mut worst = 0f32;
    let mut checked = 0;
    for (i, e) in entries.iter().enumerate() {
        let name = e["name"].as_str().unwrap();
        let mults: Vec<f32> = serde_json::from_value(e["multipliers"].clone()).unwrap();
        let want = read_npy(&gdir.join(e["latents"].as_str().unwrap()));
        for (form, files) in e["files"].as_object().unwrap() {
            // A form the exporter could not write for this model (kohya SGM names
            // exist for SDXL only) is null.
            if files.is_null()
                || files.as_array().unwrap().iter().any(|f| f.is_null())
                || (!all_forms_for_every_entry && i > 0 && form != "kohya_flat")
            {
                continue;
            }
            let loras: Vec<(Lora, f32)> = files
                .as_array()
                .unwrap()
                .iter()
                .zip(&mults)
                .map(|(f, m)| (Lora::open(&fixture(f.as_str().unwrap())).unwrap(), *m))
                .collect();
            let res = p
                .set_loras(&loras, LoraMode::Merge)
                .unwrap_or_else(|e| panic!("{label} {name} {form}: {e}"));
            assert!(
                res.iter().all(|r| r.unmatched.is_empty()),
                "{label} {name} {form}: unmatched keys"
            );
            assert_eq!(p.info("lora.mode").as_deref(), Some("merge"));
            let got = run_case(p, &gdir, &e["case"]);
            let (d, m) = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
            worst = worst.max(d / m.max(1.0));
            checked += 1;
            if d > LATENT_TOL * m.max(1.0) {
                failures.push(format!("{name} [{form}]: max diff {d:.2e}"));
            }
        }
    }
    // Removing every LoRA gives the base model back.
    p.set_loras(&[], LoraMode::Merge).unwrap();
    assert_eq!(p.info("lora.mode").as_deref(), Some("none"));
    let base = read_npy(&gdir.join(entries[0]["base_latents"].as_str().unwrap()));
    let got = run_case(p, &gdir, &entries[0]["case"]);
    let (d, m) = max_abs_diff(got.as_slice().unwrap(), base.as_slice().unwrap());
    assert!(
        d <= LATENT_TOL * m.max(1.0),
        "{label}: base after removing LoRAs off by {d}"
    );
    eprintln!(
        "{label}: {} LoRA goldens, {checked} (entry, key form) runs, worst relative latent diff {worst:.2e}",
        entries.len()
    );
    assert!(
        failures.is_empty(),
        "{label} LoRA cases off the diffusers goldens:\n{}",
        failures.join("\n")
    );
}

/// Weight values stored with `layout` (dims `stored`) re-ordered to PyTorch's
/// `[out, in, (kh, kw)]` layout.
pub fn to_torch_layout(
    layout: spo_runtime::lora::WeightLayout,
    stored: &[usize],
    v: &[f32],
) -> Vec<f32> {
    match layout {
        spo_runtime::lora::WeightLayout::LinearInOut => {
            let (i, o) = (stored[0], stored[1]);
            let mut t = vec![0.0; v.len()];
            for a in 0..i {
                for b in 0..o {
                    t[b * i + a] = v[a * o + b];
                }
            }
            t
        }
        _ => v.to_vec(),
    }
}

/// Every F32 tensor of a safetensors file: name -> (shape, values).
pub fn read_safetensors_f32(
    path: &Path,
) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{k}");
            let d = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, (v.shape().to_vec(), d))
        })
        .collect()
}
