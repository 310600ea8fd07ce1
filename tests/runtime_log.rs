//! What a runtime's log sink receives: ONNX Runtime's own messages at our
//! levels and only for the runtime whose sessions produced them, and one
//! clear line about the execution providers instead of a warning per run.

mod common;

use std::sync::Arc;

use common::*;
use parking_lot::Mutex;
use spo_runtime::pipeline::Pipeline;
use spo_runtime::runtime::{LogLevel, Logger};
use spo_runtime::{Options, Runtime};

type Captured = Arc<Mutex<Vec<(LogLevel, String)>>>;

/// A runtime whose sink records everything down to debug.
fn capturing_runtime(pairs: &[(&str, &str)]) -> (Runtime, Captured) {
    let seen: Captured = Default::default();
    let logger = Logger::default();
    let s = seen.clone();
    logger.set(
        LogLevel::Debug,
        Some(Arc::new(move |l: LogLevel, m: &str| {
            s.lock().push((l, m.to_owned()))
        })),
    );
    let rt = Runtime::new(&Options::from_pairs(pairs.iter().copied()).unwrap(), logger).unwrap();
    (rt, seen)
}

const SLOT_NOTE: &str = "appears in graph inputs";

#[test]
fn slot_input_notes_reach_their_runtime_at_debug_only() {
    let (rt, seen) = capturing_runtime(&[("ep", "cpu")]);
    let (plain_rt, plain_seen) = capturing_runtime(&[("ep", "cpu")]);
    let model = SwappedModel::new("tiny-sd15", "unet", "tiny-sd15-slots/unet");
    let _slots = Pipeline::load(&rt, &model.dir, &Options::new()).unwrap();
    let _plain = Pipeline::load(&plain_rt, &fixture("tiny-sd15"), &Options::new()).unwrap();

    let seen = seen.lock();
    let notes: Vec<_> = seen.iter().filter(|(_, m)| m.contains(SLOT_NOTE)).collect();
    // ONNX Runtime notes every LoRA slot input of the UNet (a default that
    // can be overridden): one `down` and one `up` per adapted module.
    assert!(
        notes.len() >= 2 && notes.len() % 2 == 0,
        "expected a pair of notes per slot module, got {}",
        notes.len()
    );
    assert!(
        notes.iter().all(|(_, m)| m.contains("Initializer lora.")),
        "the notes name the slot inputs: {notes:?}"
    );
    assert!(
        notes.iter().all(|(l, _)| *l == LogLevel::Debug),
        "slot notes must arrive at debug level"
    );
    assert!(
        !seen
            .iter()
            .any(|(l, m)| *l <= LogLevel::Warn && m.starts_with("ONNX Runtime (")),
        "no ONNX Runtime warning is expected from these fixtures: {seen:?}"
    );
    assert!(
        !plain_seen.lock().iter().any(|(_, m)| m.contains(SLOT_NOTE)),
        "another runtime's sink received the slots session's messages"
    );
}

#[test]
fn default_providers_say_once_at_info_what_runs() {
    let (rt, seen) = capturing_runtime(&[]);
    let cuda_built = rt.info("ep.available").unwrap().contains("cuda");
    let seen = seen.lock();
    let lines: Vec<_> = seen
        .iter()
        .filter(|(_, m)| m.contains("execution provider"))
        .collect();
    assert_eq!(lines.len(), 1, "one line about providers: {lines:?}");
    let (level, line) = lines[0];
    assert_eq!(*level, LogLevel::Info, "{line}");
    let active = rt.info("ep.active").unwrap();
    assert!(
        line.contains(&format!("execution providers: {active}")),
        "{line}"
    );
    if !cuda_built {
        assert_eq!(active, "cpu");
        assert!(
            line.contains("no CUDA provider"),
            "the line must say why: {line}"
        );
    }
}

#[test]
fn an_explicitly_requested_missing_provider_still_warns() {
    let (rt, seen) = capturing_runtime(&[("ep", "cuda,cpu")]);
    if rt.info("ep.available").unwrap().contains("cuda") {
        return; // CUDA is built in here: nothing is missing to warn about.
    }
    let warned = seen
        .lock()
        .iter()
        .any(|(l, m)| *l == LogLevel::Warn && m.contains("'cuda' is unavailable"));
    assert!(warned, "ep=cuda,cpu on a CPU build must warn");
}

#[test]
fn cli_generate_on_a_slots_model_keeps_stderr_quiet_and_times_the_load() {
    let model = SwappedModel::new("tiny-sd15", "unet", "tiny-sd15-slots/unet");
    let out = std::env::temp_dir().join(format!("spo-log-{}.png", std::process::id()));
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_spo"))
        .args(["generate", "--model"])
        .arg(&model.dir)
        .args(["--prompt", "a lighthouse", "--steps", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&out);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "spo generate failed: {stderr}");
    let cuda_built = common::runtime()
        .info("ep.available")
        .unwrap()
        .contains("cuda");
    if !cuda_built {
        assert!(
            stderr.trim().is_empty(),
            "stderr should be empty, got:\n{stderr}"
        );
    }
    assert!(!stderr.contains(SLOT_NOTE), "slot notes flood stderr");
    assert!(
        stdout.contains("s loading the model") && stdout.contains("s generating"),
        "the timing line must split loading from generating: {stdout}"
    );
}
