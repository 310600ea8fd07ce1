//! Hostile job settings through the Rust API (the C API and the CLI share
//! this path, `JobSpec::from_options` + `Pipeline::job`): every refusal names
//! the key and value; non-finite numbers are caught where they start; the
//! model's scheduler class is the default. The one numeric check runs a
//! diffusers golden (tests/fixtures/goldens/tiny-sd15, `ddim_cfg1`) with the
//! scheduler left to the model, against diffusers' own DDIM latents.

mod common;

use common::*;
use ndarray::{ArrayD, IxDyn};
use spo_runtime::model::tensors;
use spo_runtime::pipeline::{JobSpec, Lora, LoraMode, Pipeline};
use spo_runtime::{ErrorCode, Options};

fn from_pairs(pairs: &[(&str, &str)]) -> spo_runtime::Result<JobSpec> {
    JobSpec::from_options(&Options::from_pairs(pairs.iter().copied()).unwrap())
}

fn load(dir: &std::path::Path) -> Pipeline {
    Pipeline::load(&runtime(), dir, &Options::new()).unwrap()
}

fn sd15() -> Pipeline {
    load(&fixture("tiny-sd15"))
}

/// Job options as (key, value).
type Pairs<'a> = &'a [(&'a str, &'a str)];

#[test]
fn bad_values_are_refused_naming_key_and_value() {
    let cases: &[(Pairs, &[&str])] = &[
        (&[("guidance", "nan")], &["'guidance'", "nan"]),
        (&[("guidance", "-inf")], &["'guidance'", "-inf"]),
        (&[("guidance", "inf")], &["'guidance'", "inf"]),
        (&[("guidance", "-1")], &["'guidance'", "-1"]),
        (&[("guidance", "1e30")], &["'guidance'", "1e30", "[0, 100]"]),
        (
            &[("guidance_rescale", "nan")],
            &["'guidance_rescale'", "nan"],
        ),
        (
            &[("guidance_rescale", "1.5")],
            &["'guidance_rescale'", "1.5"],
        ),
        (&[("eta", "1e30")], &["'eta'", "1e30", "[0, 1]"]),
        (&[("eta", "-0.1")], &["'eta'", "-0.1"]),
        (&[("strength", "0.5")], &["'strength'", "0.5", "init_image"]),
        (
            &[("strength", "2"), ("init_image", "x.png")],
            &["'strength'", "2"],
        ),
        (
            &[
                ("strength", "0.05"),
                ("steps", "10"),
                ("init_image", "x.png"),
            ],
            &["'strength'", "0.05", "10 steps", "0.1"],
        ),
        (&[("steps", "0")], &["'steps'", "0"]),
        (&[("steps", "-3")], &["'steps'", "-3"]),
        (&[("num_images", "0")], &["'num_images'", "0 images"]),
        (&[("generator", "philox")], &["'generator'", "philox"]),
    ];
    for (pairs, want) in cases {
        let e = from_pairs(pairs).expect_err(&format!("{pairs:?} must be refused"));
        assert_eq!(e.code, ErrorCode::InvalidOptionValue, "{pairs:?}: {e}");
        for w in *want {
            assert!(e.message.contains(w), "{pairs:?}: '{w}' not in: {e}");
        }
    }
    // The edges of every range are accepted.
    from_pairs(&[
        ("guidance", "0"),
        ("guidance_rescale", "1"),
        ("eta", "1"),
        ("strength", "1"),
        ("init_image", "x.png"),
    ])
    .unwrap();
    from_pairs(&[("guidance", "100"), ("eta", "0"), ("guidance_rescale", "0")]).unwrap();
}

#[test]
fn non_finite_tensors_are_refused_before_any_graph_runs() {
    let mut bad = ArrayD::<f32>::zeros(IxDyn(&[1, 4, 8, 8]));
    bad[[0, 1, 2, 3]] = f32::NAN;
    bad[[0, 2, 2, 3]] = f32::INFINITY;
    let spec = JobSpec {
        init_latents: Some(bad.clone()),
        ..JobSpec::default()
    };
    let e = spec.validate().unwrap_err();
    assert!(e.message.contains("init_latents: 2 of 256"), "{e}");
    let spec = JobSpec {
        step_noise: Some(bad.insert_axis(ndarray::Axis(0))),
        ..JobSpec::default()
    };
    let e = spec.validate().unwrap_err();
    assert!(e.message.contains("step_noise: 2 of 256"), "{e}");
}

#[test]
fn tensor_shapes_are_checked_in_full() {
    let p = sd15();
    // The right element count (256) in the wrong shape.
    let spec = JobSpec {
        steps: 2,
        init_latents: Some(ArrayD::zeros(IxDyn(&[4, 8, 8]))),
        ..JobSpec::default()
    };
    let e = p.job(spec).err().unwrap();
    assert!(
        e.message.contains("[4, 8, 8]") && e.message.contains("[1, 4, 8, 8]"),
        "{e}"
    );
    // Too few noise entries for a stochastic scheduler, and a wrong shape.
    for shape in [[1, 1, 4, 8, 8], [2, 1, 4, 8, 4]] {
        let spec = JobSpec {
            steps: 2,
            scheduler: Some("euler_a".into()),
            step_noise: Some(ArrayD::zeros(IxDyn(&shape))),
            ..JobSpec::default()
        };
        let e = p.job(spec).err().unwrap();
        assert!(
            e.message.contains("step_noise") && e.message.contains("k >= 2"),
            "{e}"
        );
    }
}

#[test]
fn sizes_the_unet_cannot_take_are_refused_up_front() {
    let p = sd15();
    // tiny-sd15: VAE factor 8, 4 UNet down blocks (3 halvings): multiples of 64.
    for (w, h) in [(8, 64), (64, 96), (0, 64)] {
        let spec = JobSpec {
            width: Some(w),
            height: Some(h),
            ..JobSpec::default()
        };
        let e = p.job(spec).err().unwrap();
        assert_eq!(e.code, ErrorCode::InvalidOptionValue);
        assert!(
            e.message.contains(&format!("{w}x{h}")) && e.message.contains("multiples of 64"),
            "{e}"
        );
    }
}

#[test]
fn clip_skip_message_names_the_given_value_and_the_limit() {
    let p = sd15();
    let spec = JobSpec {
        steps: 1,
        clip_skip: 3,
        ..JobSpec::default()
    };
    let e = p.job(spec).unwrap().run().unwrap_err();
    assert!(
        e.message.contains("'clip_skip': 3") && e.message.contains("at most 2"),
        "{e}"
    );
}

#[test]
fn take_images_after_cancel_says_cancelled() {
    let p = sd15();
    let mut job = p
        .job(JobSpec {
            steps: 3,
            ..JobSpec::default()
        })
        .unwrap();
    job.set_progress(Some(Box::new(|_, _| false)));
    assert_eq!(job.run().unwrap_err().code, ErrorCode::Cancelled);
    let e = job.take_images().unwrap_err();
    assert!(e.message.contains("cancelled"), "{e}");
}

#[test]
fn the_models_scheduler_class_is_the_default() {
    // tiny-sd15 declares PNDMScheduler (not ported): Euler, said as info.
    assert_eq!(sd15().info("scheduler.default").as_deref(), Some("euler"));
    // A DDIM model runs DDIM without being told: diffusers' DDIM latents.
    let m = SwappedModel::with_scheduler_config("tiny-sd15", |c| {
        c["_class_name"] = "DDIMScheduler".into();
    });
    let p = load(&m.dir);
    assert_eq!(p.info("scheduler.default").as_deref(), Some("ddim"));
    let dir = fixture("goldens/tiny-sd15");
    let index = read_json(&dir.join("index.json"));
    let case = index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ddim_cfg1")
        .unwrap();
    let spec = JobSpec {
        scheduler: None,
        ..spec_for(&dir, case)
    };
    let mut job = p.job(spec).unwrap();
    job.run().unwrap();
    let got = job.latents().unwrap();
    let want = read_npy(&dir.join(case["latents"].as_str().unwrap()));
    let (d, m) = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
    assert!(
        d <= LATENT_TOL * m.max(1.0),
        "ddim by default: max diff {d}"
    );
}

#[test]
fn an_unknown_scheduler_class_is_refused_by_name_and_path_once() {
    let m = SwappedModel::with_scheduler_config("tiny-sd15", |c| {
        c["_class_name"] = "WarpDriveScheduler".into();
    });
    let e = Pipeline::load(&runtime(), &m.dir, &Options::new())
        .err()
        .unwrap();
    assert_eq!(e.code, ErrorCode::InvalidModel);
    assert!(e.message.contains("'WarpDriveScheduler'"), "{e}");
    assert_eq!(e.message.matches("scheduler_config.json").count(), 1, "{e}");
    // A bad field: the path is named once too.
    let m = SwappedModel::with_scheduler_config("tiny-sd15", |c| {
        c["thresholding"] = true.into();
    });
    let e = Pipeline::load(&runtime(), &m.dir, &Options::new())
        .err()
        .unwrap();
    assert_eq!(e.message.matches("scheduler_config.json").count(), 1, "{e}");
    assert!(e.message.contains("thresholding"), "{e}");
}

/// `kohya_flat.safetensors` of lora_a, edited by `edit`, in a temp file.
fn edited_lora(name: &str, edit: impl FnOnce(&mut tensors::NamedTensors)) -> std::path::PathBuf {
    let mut t = tensors::read(&fixture("lora/tiny-sd15/lora_a/kohya_flat.safetensors")).unwrap();
    edit(&mut t);
    let path = std::env::temp_dir().join(format!("spo-{name}-{}.safetensors", std::process::id()));
    tensors::write(&path, &t).unwrap();
    path
}

const KEY: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k";

#[test]
fn a_lora_with_nan_is_refused_at_load_naming_file_and_key() {
    let path = edited_lora("nan", |t| {
        t.get_mut(&format!("{KEY}.lora_up.weight")).unwrap()[[0, 0]] = f32::NAN;
    });
    let e = Lora::open(&path).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(e.code, ErrorCode::InvalidLora);
    assert!(
        e.message.contains(&path.display().to_string())
            && e.message.contains(&format!("'{KEY}.lora_up.weight'"))
            && e.message.contains("1 of its"),
        "{e}"
    );
}

#[test]
fn one_module_in_two_spellings_is_refused_naming_both_keys() {
    // The diffusers (dotted) spelling of the same module, next to the kohya one.
    let alias = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";
    let path = edited_lora("dup", |t| {
        for part in ["lora_down.weight", "lora_up.weight", "alpha"] {
            let v = t[&format!("{KEY}.{part}")].clone();
            t.insert(format!("{alias}.{part}"), v);
        }
    });
    let lora = Lora::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let p = sd15();
    let e = p.set_loras(&[(lora, 1.0)], LoraMode::Merge).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidLora);
    assert!(e.message.contains(KEY) && e.message.contains(alias), "{e}");
}

#[test]
fn a_unet_output_turning_non_finite_fails_its_step() {
    let p = sd15();
    let lora = Lora::open(&fixture("lora/tiny-sd15/lora_a/kohya_flat.safetensors")).unwrap();
    p.set_loras(&[(lora, 1e30)], LoraMode::Merge).unwrap();
    let spec = JobSpec {
        steps: 2,
        ..JobSpec::default()
    };
    let e = p.job(spec).unwrap().run().unwrap_err();
    assert!(
        e.message.contains("denoising step 1 of 2")
            && e.message.contains("unet output")
            && e.message.contains("LoRA")
            && !e.message.contains("vae"),
        "{e}"
    );
}
