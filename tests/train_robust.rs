//! The trainer under bad input and bad luck, on the tiny SD 1.5 model:
//! - a non-finite loss skips its update and is counted, the LoRA untouched;
//! - a process killed while saving checkpoints (20 times, SIGKILL at random
//!   moments of a save loop) always leaves a loadable checkpoint;
//! - a round cancelled mid-way leaves the trainer as before it.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use spo_runtime::pipeline::Pipeline;
use spo_runtime::train::sampler::Pair;
use spo_runtime::train::{checkpoint, Preset, TrainConfig, Trainer, TrainerSpec};
use spo_runtime::{ErrorCode, Options};

/// A child process of this test binary runs the save loop when this is set.
const CHILD_ENV: &str = "SPO_TEST_CHECKPOINT_CHILD";
/// What the child prints once its save loop starts.
const READY: &str = "spo-checkpoint-child-ready";

fn trainer() -> Trainer {
    let rt = runtime();
    let pipeline = Pipeline::load(&rt, &fixture("tiny-sd15"), &Options::new()).unwrap();
    let config = TrainConfig {
        steps: 3,
        divert_start: 1,
        pool: 2,
        threshold: 0.0,
        ..TrainConfig::preset(Preset::Toy)
    };
    let spec = TrainerSpec {
        train_dir: fixture("train/tiny-sd15/graphs"),
        preference: fixture("preference/colour"),
        config,
    };
    Trainer::new(&pipeline, spec).unwrap()
}

#[test]
fn a_non_finite_loss_skips_the_update() {
    let mut t = trainer();
    let cond = t.condition("a red apple").unwrap();
    let shape = t.latent_shape();
    let x = ndarray::ArrayD::<f32>::from_elem(ndarray::IxDyn(&shape), 0.1);
    let mut bad = x.clone();
    bad[[0, 0, 0, 0]] = f32::NAN;
    let before = t.state().params.clone();
    let pair = Pair {
        prompt: 0,
        step: 1,
        x_t: [x.clone(), x.clone()],
        x_prev: [bad, x.clone()],
    };
    let m = t.update(&[pair], &[cond]).unwrap();
    assert_eq!((m.updates, m.skipped_updates), (0, 1));
    assert!(m.loss.is_nan());
    assert_eq!(
        t.state().params,
        before,
        "a skipped update must not touch the LoRA"
    );
    assert_eq!(t.state().adam.step, 0);
}

#[test]
fn a_cancelled_round_changes_nothing() {
    let mut t = trainer();
    let before = (t.state().params.clone(), t.state().round);
    let mut calls = 0;
    t.set_progress(Some(Box::new(move |_, _| {
        calls += 1;
        calls < 4
    })));
    let e = t.step(&["a red apple", "a blue car"]).unwrap_err();
    assert_eq!(e.code, ErrorCode::Cancelled);
    assert_eq!((t.state().params.clone(), t.state().round), before);
    // The token re-arms: the next round runs.
    t.set_progress(None);
    let m = t.step(&["a red apple"]).unwrap();
    assert_eq!(m.round, 0);
    assert_eq!(t.state().round, 1);
}

/// The child: saves checkpoints of a trained state in a loop until killed.
fn save_loop(path: &Path) {
    let mut t = trainer();
    t.step(&["a red apple"]).unwrap();
    checkpoint::save(&t, path).unwrap();
    println!("{READY}");
    loop {
        checkpoint::save(&t, path).unwrap();
    }
}

#[test]
fn killed_mid_checkpoint_the_previous_one_stays_loadable() {
    let dir = std::env::temp_dir().join(format!("spo-kill-{}", std::process::id()));
    let path: PathBuf = std::env::var_os(CHILD_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("checkpoint.safetensors"));
    if std::env::var_os(CHILD_ENV).is_some() {
        save_loop(&path);
        return;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let mut parent = trainer();
    for kill in 0..20u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "killed_mid_checkpoint_the_previous_one_stays_loadable",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(
            lines.any(|l| l.is_ok_and(|l| l.contains(READY))),
            "the child never got ready"
        );
        // A pseudo-random moment inside the loop of saves.
        std::thread::sleep(Duration::from_micros(1000 + (kill * 7919) % 20000));
        child.kill().unwrap();
        child.wait().unwrap();
        checkpoint::load(&mut parent, &path)
            .unwrap_or_else(|e| panic!("kill {kill}: the checkpoint no longer loads: {e}"));
        assert_eq!(parent.state().round, 1, "kill {kill}");
    }
    // Leftover temporary files are harmless and never read.
    std::fs::remove_dir_all(&dir).ok();
}
