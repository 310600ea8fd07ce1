//! Every scheduler against diffusers 0.42.1 goldens
//! (`tests/fixtures/goldens/scheduler/*.json`, written by
//! `onnx/spo_onnx/goldens/units.py`).
//!
//! Each golden holds the schedule and a full sampling trajectory driven by the
//! deterministic "model" `model_output = 0.5 * scaled_sample * cos(t / 300) + 0.1`
//! (`scaled_sample = scale_model_input(sample, t)`, `t` the float timestep) and,
//! for stochastic samplers, the noise diffusers consumed at each step. The Rust
//! scheduler runs the same loop on its own outputs (no teacher forcing).
//!
//! Tolerances: timesteps |a - b| <= 1e-3 (all are float32 values; most match
//! exactly); sigmas, init_noise_sigma and every trajectory / model-output value
//! |a - b| <= TOL * (1 + |b|) with TOL = 1e-5, except for zero-terminal-SNR
//! schedules (`rescale_betas_zero_snr`), which get TOL_ZERO_SNR = 1e-4: their first
//! sigma is ~4096, where diffusers' float32 step (and torch's float32 `sqrt`, which
//! gives 4096.0 for sqrt(16777215) against the correctly rounded 4095.99976)
//! loses ~3e-5 relative; our float64 step is the more accurate one there.

use std::path::{Path, PathBuf};

use spo_runtime::scheduler::{
    build_scheduler, img2img_start_index, SchedulerConfig, SCHEDULER_NAMES,
};
use spo_runtime::ErrorCode;

const TOL: f64 = 1e-5;
const TOL_ZERO_SNR: f64 = 1e-4;

#[derive(serde::Deserialize)]
struct Img2Img {
    strength: f64,
    begin_index: usize,
    original: Vec<f32>,
    noise: Vec<f32>,
    noised: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Golden {
    case: String,
    name: String,
    eta: f64,
    config: serde_json::Value,
    steps: usize,
    timesteps: Vec<f64>,
    sigmas: Option<Vec<f64>>,
    init_noise_sigma: f64,
    begin_index: usize,
    img2img: Option<Img2Img>,
    sample0: Vec<f32>,
    noise: Option<Vec<Option<Vec<f32>>>>,
    model_outputs: Vec<Vec<f64>>,
    trajectory: Vec<Vec<f64>>,
    /// diffusers' `pred_original_sample` per step (DPM-Solver: its converted
    /// model output), the x0 the job preview reports.
    pred_original: Vec<Vec<f64>>,
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens/scheduler")
}

fn goldens() -> Vec<(PathBuf, String)> {
    let mut v: Vec<(PathBuf, String)> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    v.sort();
    v
}

/// Largest `|a - b| / (1 + |b|)` over the pairs.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&a, &b)| (f64::from(a) - b).abs() / (1.0 + b.abs()))
        .fold(0.0, f64::max)
}

/// Runs one golden; returns the worst relative error seen and whether the case
/// has a zero-terminal-SNR schedule.
fn run_golden(text: &str) -> Result<(f64, bool), String> {
    // The goldens are Python json: DPM-Solver configs hold `-Infinity`.
    let g: Golden =
        serde_json::from_str(&text.replace("-Infinity", "null")).map_err(|e| e.to_string())?;
    let cfg = SchedulerConfig::from_json_str(&serde_json::to_string(&g.config).unwrap())
        .map_err(|e| format!("config: {e}"))?;
    let mut s = build_scheduler(&g.name, &cfg, g.eta).map_err(|e| format!("build: {e}"))?;
    let tol = if cfg.rescale_betas_zero_snr {
        TOL_ZERO_SNR
    } else {
        TOL
    };
    s.set_timesteps(g.steps).map_err(|e| e.to_string())?;
    let mut worst = 0.0f64;

    if s.timesteps().len() != g.timesteps.len() {
        return Err(format!(
            "timesteps {:?} vs golden {:?}",
            s.timesteps(),
            g.timesteps
        ));
    }
    for (a, b) in s.timesteps().iter().zip(&g.timesteps) {
        if (a - b).abs() > 1e-3 {
            return Err(format!(
                "timesteps {:?} vs golden {:?}",
                s.timesteps(),
                g.timesteps
            ));
        }
    }
    match (&g.sigmas, s.sigmas()) {
        (None, None) => {}
        (Some(want), Some(got)) => {
            if got.len() != want.len() {
                return Err(format!("sigmas {got:?} vs golden {want:?}"));
            }
            for (a, b) in got.iter().zip(want) {
                let e = (a - b).abs() / (1.0 + b.abs());
                worst = worst.max(e);
                if e > tol {
                    return Err(format!("sigmas {got:?} vs golden {want:?}"));
                }
            }
        }
        (w, g2) => {
            return Err(format!(
                "sigmas presence differs: golden {w:?}, ours {g2:?}"
            ))
        }
    }
    let e = (s.init_noise_sigma() - g.init_noise_sigma).abs() / (1.0 + g.init_noise_sigma.abs());
    if e > tol {
        return Err(format!(
            "init_noise_sigma {} vs {}",
            s.init_noise_sigma(),
            g.init_noise_sigma
        ));
    }

    let mut sample: Vec<f32> = g.sample0.clone();
    let begin = if let Some(i2i) = &g.img2img {
        let b = s.img2img_start(i2i.strength).map_err(|e| e.to_string())?;
        if b != i2i.begin_index || b != g.begin_index {
            return Err(format!("img2img start {b} vs golden {}", i2i.begin_index));
        }
        let noised = s
            .add_noise(&i2i.original, &i2i.noise, b)
            .map_err(|e| e.to_string())?;
        let e = rel_err(&noised, &i2i.noised);
        worst = worst.max(e);
        if e > tol {
            return Err(format!("add_noise differs by {e:e}"));
        }
        sample = noised;
        b
    } else {
        0
    };
    if g.trajectory.len() != g.timesteps.len() - begin {
        return Err("golden trajectory length".into());
    }
    for (k, i) in (begin..g.timesteps.len()).enumerate() {
        let t = s.timesteps()[i];
        let scaled = s.scale_model_input(&sample, i).map_err(|e| e.to_string())?;
        let mo: Vec<f32> = scaled
            .iter()
            .map(|&x| (0.5 * f64::from(x) * (t / 300.0).cos() + 0.1) as f32)
            .collect();
        let e = rel_err(&mo, &g.model_outputs[k]);
        worst = worst.max(e);
        if e > tol {
            return Err(format!("model output at step {i} differs by {e:e}"));
        }
        let golden_noise = g.noise.as_ref().and_then(|n| n[k].clone());
        if s.needs_noise(i) != golden_noise.is_some() {
            return Err(format!(
                "needs_noise({i}) = {}, diffusers drew noise: {}",
                s.needs_noise(i),
                golden_noise.is_some()
            ));
        }
        let out = s
            .step(&mo, i, &sample, golden_noise.as_deref())
            .map_err(|e| format!("step {i}: {e}"))?;
        let e = rel_err(&out.pred_original_sample, &g.pred_original[k]);
        worst = worst.max(e);
        if e > tol {
            return Err(format!("x0 at step {i} (t = {t}) differs by {e:e}"));
        }
        sample = out.prev_sample;
        let e = rel_err(&sample, &g.trajectory[k]);
        worst = worst.max(e);
        if e > tol {
            return Err(format!(
                "step {i} (t = {t}) differs by {e:e}\n  got  {:?}\n  want {:?}",
                &sample[..4],
                &g.trajectory[k][..4]
            ));
        }
    }
    Ok((worst, cfg.rescale_betas_zero_snr))
}

#[test]
fn all_goldens_match_diffusers() {
    let files = goldens();
    assert!(files.len() >= 50, "only {} goldens", files.len());
    let mut failures = Vec::new();
    let (mut worst, mut worst_zero_snr) = (0.0f64, 0.0f64);
    let mut names = std::collections::BTreeSet::new();
    for (path, text) in &files {
        let g: serde_json::Value =
            serde_json::from_str(&text.replace("-Infinity", "null")).unwrap();
        names.insert(g["name"].as_str().unwrap().to_owned());
        match run_golden(text) {
            Ok((w, false)) => worst = worst.max(w),
            Ok((w, true)) => worst_zero_snr = worst_zero_snr.max(w),
            Err(e) => failures.push(format!(
                "{}: {e}",
                path.file_name().unwrap().to_string_lossy()
            )),
        }
    }
    eprintln!(
        "{} goldens, worst relative error {worst:e} (zero-terminal-SNR cases: {worst_zero_snr:e})",
        files.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    for n in SCHEDULER_NAMES {
        assert!(names.contains(n), "no golden for {n}");
    }
}

#[test]
fn golden_case_names_are_unique() {
    let mut seen = std::collections::HashSet::new();
    for (_, text) in goldens() {
        let g: Golden = serde_json::from_str(&text.replace("-Infinity", "null")).unwrap();
        assert!(seen.insert(g.case.clone()), "duplicate {}", g.case);
    }
}

#[test]
fn unknown_scheduler_lists_valid_names() {
    let e = build_scheduler("heun", &SchedulerConfig::default(), 0.0)
        .err()
        .unwrap();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    for n in SCHEDULER_NAMES {
        assert!(e.message.contains(n), "{}", e.message);
    }
}

#[test]
fn stochastic_step_without_noise_fails() {
    let x = vec![0.5f32; 16];
    for (name, eta) in [("euler_a", 0.0), ("ddim", 1.0), ("ddpm", 0.0)] {
        let mut s = build_scheduler(name, &SchedulerConfig::default(), eta).unwrap();
        s.set_timesteps(10).unwrap();
        assert!(s.needs_noise(0), "{name}");
        let e = s.step(&x, 0, &x, None).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{name}");
        assert!(e.message.contains("noise"), "{}", e.message);
        // With noise it works.
        s.step(&x, 0, &x, Some(&x)).unwrap();
    }
    for name in ["euler", "dpmpp_2m", "dpmpp_2m_karras", "ddim"] {
        let mut s = build_scheduler(name, &SchedulerConfig::default(), 0.0).unwrap();
        s.set_timesteps(10).unwrap();
        assert!(!s.needs_noise(0), "{name}");
        s.step(&x, 0, &x, None).unwrap();
    }
    // DDPM's last step (t = 0) draws no noise.
    let mut s = build_scheduler("ddpm", &SchedulerConfig::default(), 0.0).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(s.timesteps()[9], 0.0);
    assert!(!s.needs_noise(9));
}

#[test]
fn step_before_set_timesteps_and_bad_lengths_fail() {
    let x = vec![0.0f32; 16];
    let mut s = build_scheduler("euler", &SchedulerConfig::default(), 0.0).unwrap();
    assert!(s.step(&x, 0, &x, None).is_err());
    s.set_timesteps(4).unwrap();
    assert!(s.step(&x[..8], 0, &x, None).is_err());
    assert!(s.step(&x, 4, &x, None).is_err());
}

#[test]
fn dpm_steps_must_be_in_order() {
    let x = vec![0.1f32; 16];
    let mut s = build_scheduler("dpmpp_2m", &SchedulerConfig::default(), 0.0).unwrap();
    s.set_timesteps(10).unwrap();
    s.step(&x, 0, &x, None).unwrap();
    let e = s.step(&x, 2, &x, None).unwrap_err();
    assert!(e.message.contains("in order"), "{}", e.message);
    s.set_begin_index(2);
    s.step(&x, 2, &x, None).unwrap();
}

#[test]
fn malformed_config_names_file_and_field() {
    let dir = std::env::temp_dir().join(format!("spo-sched-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("scheduler_config.json");

    std::fs::write(
        &p,
        r#"{"_class_name": "EulerDiscreteScheduler", "beta_start": "abc"}"#,
    )
    .unwrap();
    let e = SchedulerConfig::from_file(&p).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidModel);
    assert!(e.message.contains("scheduler_config.json"), "{}", e.message);
    assert!(e.message.contains("beta_start"), "{}", e.message);

    std::fs::write(&p, r#"{"beta_schedule": "cosine"}"#).unwrap();
    let e = SchedulerConfig::from_file(&p).unwrap_err();
    assert!(
        e.message.contains("scheduler_config.json") && e.message.contains("beta_schedule"),
        "{}",
        e.message
    );

    std::fs::write(&p, r#"{"timestep_spacing": "sometimes"}"#).unwrap();
    let e = SchedulerConfig::from_file(&p).unwrap_err();
    assert!(e.message.contains("timestep_spacing"), "{}", e.message);

    std::fs::write(&p, r#"{"thresholding": true}"#).unwrap();
    let e = SchedulerConfig::from_file(&p).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unsupported);
    assert!(e.message.contains("thresholding"), "{}", e.message);

    std::fs::write(&p, "{not json").unwrap();
    let e = SchedulerConfig::from_file(&p).unwrap_err();
    assert!(e.message.contains("scheduler_config.json"), "{}", e.message);

    let e = SchedulerConfig::from_file(dir.join("missing.json")).unwrap_err();
    assert_eq!(e.code, ErrorCode::Io);
    assert!(e.message.contains("missing.json"), "{}", e.message);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn real_world_configs_parse() {
    // SD 1.5 (PNDM class name, extra keys) and an SDXL Euler config.
    let sd15 = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
        "clip_sample": false}"#;
    let c = SchedulerConfig::from_json_str(sd15).unwrap();
    assert_eq!(c.steps_offset, 1);
    let mut s = build_scheduler("ddim", &c, 0.0).unwrap();
    s.set_timesteps(50).unwrap();
    assert_eq!(s.timesteps()[0], 981.0);
    let mut s = build_scheduler("euler", &c, 0.0).unwrap();
    s.set_timesteps(50).unwrap();
    assert_eq!(s.timesteps()[0], 999.0); // Euler's default spacing is linspace

    let sdxl = r#"{"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
        "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "sample_max_value": 1.0, "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
        "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false,
        "lambda_min_clipped": -Infinity}"#;
    let c = SchedulerConfig::from_json_str(sdxl).unwrap();
    assert_eq!(c.lambda_min_clipped, None);
    let mut s = build_scheduler("euler", &c, 0.0).unwrap();
    s.set_timesteps(30).unwrap();
    assert_eq!(s.timesteps()[0], 958.0); // 29 * (1000 // 30) + 1
                                         // "leading": sqrt(sigma_max^2 + 1), sigma_max being the sigma of t = 958, not 999.
    let s0 = s.sigmas().unwrap()[0];
    assert!((s.init_noise_sigma() - (s0 * s0 + 1.0).sqrt()).abs() < 1e-5);
    assert!(
        (s.init_noise_sigma() - 11.5203).abs() < 1e-3,
        "{}",
        s.init_noise_sigma()
    );
}

#[test]
fn img2img_start_matches_get_timesteps() {
    assert_eq!(img2img_start_index(20, 0.6, 1).unwrap(), 8);
    assert_eq!(img2img_start_index(30, 0.75, 1).unwrap(), 8); // int(22.5) = 22
    assert_eq!(img2img_start_index(10, 1.0, 1).unwrap(), 0);
    assert_eq!(img2img_start_index(10, 0.0, 1).unwrap(), 10);
    assert!(img2img_start_index(10, 1.5, 1).is_err());
}

#[test]
fn names_fix_karras_and_ignore_foreign_fields() {
    let cfg = SchedulerConfig {
        use_karras_sigmas: true,
        ..SchedulerConfig::default()
    };
    let mut plain = build_scheduler("dpmpp_2m", &cfg, 0.0).unwrap();
    let mut karras = build_scheduler("dpmpp_2m_karras", &SchedulerConfig::default(), 0.0).unwrap();
    plain.set_timesteps(10).unwrap();
    karras.set_timesteps(10).unwrap();
    assert_eq!(plain.timesteps()[1], 899.0); // linspace, not Karras
    assert_eq!(karras.timesteps()[1], 937.0);
    // Euler ancestral, DDIM and DDPM have no Karras option and ignore it.
    for name in ["euler_a", "ddim", "ddpm"] {
        build_scheduler(name, &cfg, 0.0).unwrap();
    }
}
