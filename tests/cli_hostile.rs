//! Hostile input through the `spo` binary: every case must exit with status 1
//! (never a panic's 101 or a signal's 134/137), within 60 s, under a 4 GiB
//! address-space limit (`ulimit -v`), with a message that names the value,
//! key or file at fault. The expected words come from the inputs, not from
//! the code's own output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ndarray::{ArrayD, IxDyn};
use spo_runtime::model::tensors;

/// Every case finishes within this (the tiny models load in about a second).
const LIMIT: Duration = Duration::from_secs(60);
/// `ulimit -v` in KiB: 4 GiB.
const ULIMIT_V_KIB: u64 = 4 << 20;

struct Scratch(PathBuf);

impl Scratch {
    /// A folder of its own per test (tests of one binary run in parallel).
    fn new(test: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("spo-cli-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
    fn npy(&self, name: &str, shape: &[usize], poison: bool) -> String {
        let mut a = ArrayD::<f32>::zeros(IxDyn(shape));
        if poison {
            a.as_slice_mut().unwrap()[3] = f32::NAN;
        }
        let path = self.path(name);
        let f = std::fs::File::create(&path).unwrap();
        ndarray_npy::WriteNpyExt::write_npy(&a, f).unwrap();
        path
    }
    fn lora(&self, name: &str, edit: impl FnOnce(&mut tensors::NamedTensors)) -> String {
        let mut t = tensors::read(&lora_a()).unwrap();
        edit(&mut t);
        let path = self.path(name);
        tensors::write(Path::new(&path), &t).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lora_a() -> PathBuf {
    fixture("lora/tiny-sd15/lora_a/kohya_flat.safetensors")
}

const KEY: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k";
const ALIAS: &str = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";

/// Runs `spo args...` under the limits; returns stderr after checking the
/// exit status and time.
fn spo_fails(args: &[String], cwd: &Path) -> String {
    let t0 = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {ULIMIT_V_KIB} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_spo"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: {:?}\n{stderr}",
        out.status
    );
    assert!(took < LIMIT, "{args:?} took {took:?}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    stderr
}

fn generate(model: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["generate", "--ep", "cpu", "--model"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push(fixture(model).display().to_string());
    if !extra.contains(&"--steps") {
        v.extend(["--steps".into(), "2".into()]);
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn hostile_generate_arguments_fail_cleanly_and_name_the_culprit() {
    let s = Scratch::new("generate");
    let wrong_shape = s.npy("wrong_shape.npy", &[4, 8, 8], false);
    let nan_latents = s.npy("nan_latents.npy", &[1, 4, 8, 8], true);
    let nan_noise = s.npy("nan_noise.npy", &[2, 1, 4, 8, 8], true);
    let nan_lora = s.lora("nan.safetensors", |t| {
        t.get_mut(&format!("{KEY}.lora_up.weight")).unwrap()[[0, 0]] = f32::INFINITY;
    });
    let dup_lora = s.lora("dup.safetensors", |t| {
        for part in ["lora_down.weight", "lora_up.weight", "alpha"] {
            let v = t[&format!("{KEY}.{part}")].clone();
            t.insert(format!("{ALIAS}.{part}"), v);
        }
    });
    let lora = lora_a().display().to_string();
    let bad_mult = format!("{lora}:abc");
    let huge_mult = format!("{lora}:1e30");
    let nan_mult = format!("{lora}:nan");
    let missing_dir = s.path("no/such/dir/x.png");
    let file_as_dir = format!("{nan_latents}/x.png");
    let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        (
            "tiny-sd15",
            vec!["--guidance", "nan"],
            vec!["'guidance'", "'nan'"],
        ),
        (
            "tiny-sd15",
            vec!["--guidance", "-inf"],
            vec!["'guidance'", "'-inf'"],
        ),
        (
            "tiny-sdxl",
            vec!["--guidance-rescale", "nan"],
            vec!["'guidance_rescale'", "'nan'"],
        ),
        (
            "tiny-sd15",
            vec!["--eta", "1e30"],
            vec!["'eta'", "1e30", "[0, 1]"],
        ),
        ("tiny-sd15", vec!["--steps", "0"], vec!["'steps'", "0"]),
        (
            "tiny-sd15",
            vec!["--scheduler", "warp"],
            vec!["'scheduler'", "warp"],
        ),
        (
            "tiny-sd15",
            vec!["--strength", "0.5"],
            vec!["'strength'", "0.5", "init_image"],
        ),
        (
            "tiny-sd15",
            vec![
                "--strength",
                "0.05",
                "--steps",
                "10",
                "--init-image",
                "x.png",
            ],
            vec!["'strength'", "0.05", "10 steps"],
        ),
        (
            "tiny-sd15",
            vec!["--width", "8"],
            vec!["8x64", "multiples of 64"],
        ),
        (
            "tiny-sd15",
            vec!["--clip-skip", "3"],
            vec!["'clip_skip': 3", "at most 2"],
        ),
        (
            "tiny-sd15",
            vec!["--init-latents", &wrong_shape],
            vec!["[4, 8, 8]", "[1, 4, 8, 8]"],
        ),
        (
            "tiny-sd15",
            vec!["--init-latents", &nan_latents],
            vec![&nan_latents, "NaN"],
        ),
        (
            "tiny-sd15",
            vec!["--noise", &nan_noise],
            vec![&nan_noise, "NaN"],
        ),
        (
            "tiny-sd15",
            vec!["--lora", &bad_mult],
            vec!["'abc'", "MULTIPLIER"],
        ),
        (
            "tiny-sd15",
            vec!["--lora", &nan_mult],
            vec!["'nan'", "MULTIPLIER"],
        ),
        (
            "tiny-sd15",
            vec!["--lora", &nan_lora],
            vec![&nan_lora, KEY, "infinite"],
        ),
        ("tiny-sd15", vec!["--lora", &dup_lora], vec![KEY, ALIAS]),
        (
            "tiny-sd15",
            vec!["--lora", &huge_mult],
            vec!["denoising step 1 of 2", "unet", "LoRA"],
        ),
        ("tiny-sd15", vec!["--out", "x.jpg"], vec!["x.jpg", ".png"]),
        (
            "tiny-sd15",
            vec!["--out", &missing_dir],
            vec![&missing_dir, "not an existing folder"],
        ),
        (
            "tiny-sd15",
            vec!["--out", &file_as_dir],
            vec![&file_as_dir, "not an existing folder"],
        ),
        (
            "tiny-sd15",
            vec!["--save-latents", "l.txt"],
            vec!["l.txt", ".npy"],
        ),
    ];
    for (model, extra, want) in &cases {
        let err = spo_fails(&generate(model, extra), &s.0);
        for w in want {
            assert!(err.contains(w), "{extra:?}: '{w}' not in:\n{err}");
        }
        // Nothing is blamed on a component that did not fail, and ONNX
        // Runtime's own kernel errors never reach the user.
        assert!(
            !err.contains("vae_decoder") && !err.contains("Concat"),
            "{extra:?}:\n{err}"
        );
        assert_eq!(err.matches("error:").count(), 1, "{extra:?}:\n{err}");
    }
    assert!(
        !s.0.join("x.jpg").exists() && !s.0.join("out.png").exists(),
        "a refused run wrote an image"
    );
}

#[test]
fn grad_refuses_a_meaningless_finite_difference_step() {
    let s = Scratch::new("grad");
    let train = fixture("train/tiny-sd15").display().to_string();
    for step in ["nan", "-1e-3", "0"] {
        let args: Vec<String> = [
            "grad",
            "--train-dir",
            &train,
            "--fd-directions",
            "1",
            "--fd-step",
            step,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let err = spo_fails(&args, &s.0);
        assert!(
            err.contains("--fd-step") && err.contains("above 0"),
            "{step}: {err}"
        );
    }
}

#[test]
fn a_bad_output_is_refused_before_the_model_is_read() {
    let s = Scratch::new("out-first");
    // The model folder does not exist: the --out error must come first.
    let args: Vec<String> = ["generate", "--model", "/no/such/model", "--out", "x.webp"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let err = spo_fails(&args, &s.0);
    assert!(
        err.contains("x.webp") && !err.contains("/no/such/model"),
        "{err}"
    );
}

#[test]
fn hostile_models_and_loras_fail_cleanly() {
    let s = Scratch::new("models");
    let unknown = SwappedModel::with_scheduler_config("tiny-sd15", |c| {
        c["_class_name"] = "WarpDriveScheduler".into();
    });
    let model = unknown.dir.display().to_string();
    let args: Vec<String> = ["generate", "--ep", "cpu", "--model", &model]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let err = spo_fails(&args, &s.0);
    assert!(err.contains("'WarpDriveScheduler'"), "{err}");
    assert_eq!(err.matches("scheduler_config.json").count(), 1, "{err}");

    let nan_lora = s.lora("nan.safetensors", |t| {
        t.get_mut(&format!("{KEY}.lora_down.weight")).unwrap()[[0, 0]] = f32::NAN;
    });
    let sd15 = fixture("tiny-sd15").display().to_string();
    let inspect = |file: &str| -> Vec<String> {
        ["lora", "inspect", file, "--model", &sd15]
            .iter()
            .map(|a| a.to_string())
            .collect()
    };
    let err = spo_fails(&inspect(&nan_lora), &s.0);
    assert!(
        err.contains(&nan_lora) && err.contains(KEY) && err.contains("NaN"),
        "{err}"
    );
    let dup = s.lora("dup.safetensors", |t| {
        for part in ["lora_down.weight", "lora_up.weight", "alpha"] {
            let v = t[&format!("{KEY}.{part}")].clone();
            t.insert(format!("{ALIAS}.{part}"), v);
        }
    });
    let err = spo_fails(&inspect(&dup), &s.0);
    assert!(err.contains(KEY) && err.contains(ALIAS), "{err}");
}

/// A 1x1 RGB PNG whose header (CRC fixed) claims 100000x100000 pixels: a
/// 69-byte file that asks a naive decoder for 30 GB.
const HUGE_PNG: [u8; 69] = [
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x01, 0x86, 0xa0, 0x00, 0x01, 0x86, 0xa0, 0x08, 0x02, 0x00, 0x00, 0x00, 0x27, 0x30, 0x9c,
    0x9f, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60, 0x60, 0x60, 0x00,
    0x00, 0x00, 0x04, 0x00, 0x01, 0xf6, 0x17, 0x38, 0x55, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

/// The sizes, files and thread counts that used to abort or hang the process
/// (Rust's out-of-memory abort is exit 134) are refused before any
/// allocation, within the 4 GiB address-space limit, naming value and option.
#[test]
fn oversized_requests_are_refused_before_allocating() {
    let s = Scratch::new("limits");
    let png = s.path("huge.png");
    std::fs::write(&png, HUGE_PNG).unwrap();
    // A .npy header that claims (100000, 100000, 4, 8) float32 (1.28 TB) over 1 KB.
    let npy = s.path("lie.npy");
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 4, 8), }";
    let mut bytes = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
    bytes.extend_from_slice(format!("{dict:<117}\n").as_bytes());
    bytes.extend_from_slice(&[0u8; 1024]);
    std::fs::write(&npy, bytes).unwrap();
    // The npy fuzz target's two finds: unclosed brackets nested 13 deep
    // (exponential in ndarray-npy's header grammar: this 128-byte file took
    // 3.3 s, a longer one never ends) and a zero axis beside axes that
    // overflow (a panic inside ndarray-npy).
    let deep = s.path("deep.npy");
    let mut bytes = b"\x93NUMPY\x01\x00\x76\x00{'shape': ".to_vec();
    bytes.extend(b"[  (1, (".repeat(13));
    bytes.resize(128, b' ');
    std::fs::write(&deep, bytes).unwrap();
    let zero = s.path("zero.npy");
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 375952003759528102, 32), }";
    let mut bytes = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
    bytes.extend_from_slice(format!("{dict:<117}\n").as_bytes());
    std::fs::write(&zero, bytes).unwrap();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--init-latents", &deep],
            vec!["deep.npy", "more than 3 deep"],
        ),
        (vec!["--noise", &zero], vec!["zero.npy", "too large"]),
        (
            vec!["--width", "100000", "--height", "100000"],
            vec!["100000", "limits.max_side"],
        ),
        (
            vec!["--width", "4294967288", "--height", "4294967288"],
            vec!["4294967288", "limits.max_side"],
        ),
        (
            vec!["--width", "8192", "--height", "16384"],
            vec!["134217728 pixels", "limits.max_pixels"],
        ),
        (
            vec!["--num-images", "100000"],
            vec!["100000", "limits.max_batch"],
        ),
        (
            vec!["--steps", "1000000"],
            vec!["1000000", "limits.max_steps"],
        ),
        (
            vec!["--init-image", &png, "--strength", "0.5"],
            vec!["huge.png", "100000", "limits.max_side"],
        ),
        (vec!["--init-latents", &npy], vec!["lie.npy"]),
        (vec!["--noise", &npy], vec!["lie.npy"]),
        (
            vec!["--lora", "/dev/zero"],
            vec!["/dev/zero", "not a regular file"],
        ),
        (
            vec!["--threads", "1000000"],
            vec!["1000000", "limits.max_threads"],
        ),
    ];
    for (extra, want) in &cases {
        let err = spo_fails(&generate("tiny-sd15", extra), &s.0);
        for w in want {
            assert!(err.contains(w), "{extra:?}: '{w}' not in:\n{err}");
        }
    }
}
