//! Any scheduler_config.json text must give a validated SchedulerConfig or an
//! Error, never a panic; every scheduler built from a config that passes must
//! then schedule and step a few steps with finite inputs without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spo_runtime::scheduler::{build_scheduler, SchedulerConfig, SCHEDULER_NAMES};

/// Steps, sample size: small, so that a slow config shows as a timeout of its
/// own making and not of the fuzz driver's.
const STEPS: [usize; 3] = [1, 4, 30];
const N: usize = 4;

fn run(name: &str, cfg: &SchedulerConfig, steps: usize) {
    let Ok(mut s) = build_scheduler(name, cfg, 0.5) else {
        return;
    };
    if s.set_timesteps(steps).is_err() {
        return;
    }
    let _ = s.init_noise_sigma();
    let mut sample = vec![0.5f32; N];
    let noise = vec![-0.25f32; N];
    let _ = s.add_noise(&sample, &noise, 0);
    let Ok(start) = s.img2img_start(0.6) else {
        return;
    };
    for i in start..s.timesteps().len() {
        let Ok(x) = s.scale_model_input(&sample, i) else {
            return;
        };
        match s.step(&x, i, &sample, Some(&noise)) {
            Ok(out) => sample = out.prev_sample,
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = SchedulerConfig::from_json_str(text) else {
        return;
    };
    let steps = STEPS[data.len() % STEPS.len()];
    for name in SCHEDULER_NAMES {
        run(name, &cfg, steps);
    }
});
