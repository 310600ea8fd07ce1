//! `spo train`: SPO fine-tuning of a LoRA from a prompts file, with a
//! progress line, a JSON-lines metrics log and resumable checkpoints; and
//! `spo score`: a preference model's scores of image files.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use spo_runtime::limits::Limits;
use spo_runtime::lora::LoraDialect;
use spo_runtime::pipeline::{Image, Pipeline};
use spo_runtime::train::preference::PreferenceModel;
use spo_runtime::train::{checkpoint, RoundMetrics, Trainer, TrainerSpec};
use spo_runtime::{Error, Options, Result};

use crate::RuntimeArgs;

/// Prompts a file may hold.
const MAX_PROMPTS: usize = 1 << 20;
/// The checkpoint file inside `--checkpoint-dir`.
const CHECKPOINT: &str = "checkpoint.safetensors";

#[derive(Args)]
pub struct Train {
    /// The model folder (its UNet is the one the training folder was made from).
    #[arg(long)]
    model: PathBuf,
    /// The training folder (spo_onnx.export.train).
    #[arg(long)]
    train_dir: PathBuf,
    /// The preference model: its folder, or its model.onnx.
    #[arg(long)]
    spm: PathBuf,
    /// Prompts, one per line (blank lines and lines starting with # skipped).
    #[arg(long)]
    prompts: PathBuf,
    /// Where the LoRA goes.
    #[arg(long)]
    out: PathBuf,
    /// sdxl (the official SDXL settings), sd15 or toy.
    #[arg(long, default_value = "sdxl")]
    preset: String,
    /// Passes over the prompts.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after this many rounds in all (default: the epochs' rounds).
    #[arg(long)]
    rounds: Option<u64>,
    /// A trainer setting over the preset, NAME=VALUE (repeatable), e.g.
    /// lr=1e-4, pool=4, grad_clip=official.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Save a checkpoint here every --checkpoint-every rounds and at the end.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Rounds between two checkpoints (with --checkpoint-dir).
    #[arg(long, default_value_t = 10)]
    checkpoint_every: u64,
    /// Continue from the checkpoint in this folder.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// webui (kohya names, what A1111 and ComfyUI load) or diffusers.
    #[arg(long, default_value = "webui")]
    format: String,
    /// The metrics log (JSON lines; default: OUT with .metrics.jsonl).
    #[arg(long)]
    metrics_log: Option<PathBuf>,
    #[command(flatten)]
    rt: RuntimeArgs,
}

#[derive(Args)]
pub struct Score {
    /// The preference model: its folder, or its model.onnx.
    #[arg(long)]
    spm: PathBuf,
    /// The prompt the images are judged against.
    #[arg(long)]
    prompt: String,
    /// The denoising timestep the images stand for (0: final images).
    #[arg(long, default_value_t = 0)]
    timestep: i64,
    /// PNG files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    rt: RuntimeArgs,
}

/// A preference model's folder from `--spm` (the folder or its graph).
fn spm_dir(spm: &Path) -> PathBuf {
    if spm.is_file() {
        spm.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        spm.to_path_buf()
    }
}

/// Prints "score<TAB>path" per image.
pub fn score(s: Score) -> Result<()> {
    let rt = crate::runtime(&s.rt)?;
    let mut model = PreferenceModel::open(&rt, &spm_dir(&s.spm))?;
    for path in &s.images {
        let image = Image::read_png(path)?.to_tensor()?;
        let v = model.score(&image, &[s.timestep], &[s.prompt.as_str()])?;
        println!("{}\t{}", v[0], path.display());
    }
    Ok(())
}

fn options(t: &Train) -> Result<Options> {
    let spm = spm_dir(&t.spm);
    let mut o = Options::new();
    o.set("train.dir", &t.train_dir.to_string_lossy())?;
    o.set("train.preference", &spm.to_string_lossy())?;
    o.set("train.preset", &t.preset)?;
    for s in &t.sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| Error::invalid_argument(format!("--set '{s}': expected NAME=VALUE")))?;
        o.set(&format!("train.{}", k.trim()), v.trim())?;
    }
    Ok(o)
}

fn read_prompts(path: &Path, limits: &Limits) -> Result<Vec<String>> {
    let text = limits.read_text(path)?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(Error::invalid_argument(format!(
            "{}: {} prompts; 1 to {MAX_PROMPTS} are needed",
            path.display(),
            prompts.len()
        )));
    }
    Ok(prompts)
}

pub fn run(t: Train) -> Result<()> {
    let dialect = LoraDialect::parse(&t.format).ok_or_else(|| {
        Error::invalid_argument(format!("--format '{}': use webui or diffusers", t.format))
    })?;
    let spec = TrainerSpec::from_options(&options(&t)?)?;
    let rt = crate::runtime(&t.rt)?;
    let prompts = read_prompts(&t.prompts, rt.limits())?;
    let pipeline = Pipeline::load(&rt, &t.model, &Options::new())?;
    let mut trainer = Trainer::new(&pipeline, spec)?;
    if let Some(dir) = &t.resume {
        checkpoint::load(&mut trainer, &dir.join(CHECKPOINT))?;
    }
    let per_round = trainer.config().prompts_per_round.min(prompts.len());
    let rounds_per_epoch = prompts.len().div_ceil(per_round) as u64;
    let total = t.rounds.unwrap_or(rounds_per_epoch * t.epochs as u64);
    let log_path = t
        .metrics_log
        .clone()
        .unwrap_or_else(|| t.out.with_extension("metrics.jsonl"));
    let mut log = open_log(&log_path, t.resume.is_some())?;
    let tty = std::io::stderr().is_terminal();
    while trainer.state().round < total {
        let r = trainer.state().round;
        let start = (r % rounds_per_epoch) as usize * per_round;
        let batch: Vec<&str> = prompts[start..(start + per_round).min(prompts.len())]
            .iter()
            .map(String::as_str)
            .collect();
        let m = trainer.step(&batch)?;
        writeln!(log, "{}", metrics_json(&m)).map_err(|e| Error::io(&log_path, e))?;
        report(&m, total, tty);
        let done = trainer.state().round;
        if let Some(dir) = &t.checkpoint_dir {
            if done % t.checkpoint_every.max(1) == 0 || done == total {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                checkpoint::save(&trainer, &dir.join(CHECKPOINT))?;
            }
        }
    }
    if tty {
        eprintln!();
    }
    trainer.save_lora(&t.out, dialect)?;
    println!(
        "wrote {} ({} rounds)",
        t.out.display(),
        trainer.state().round
    );
    Ok(())
}

fn open_log(path: &Path, append: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

fn metrics_json(m: &RoundMetrics) -> String {
    serde_json::to_string(m).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// One line per round: rewritten in place on a terminal.
fn report(m: &RoundMetrics, total: u64, tty: bool) {
    let line = format!(
        "round {}/{total}: loss {:.4}  pairs {}  accepted {:.0}%  score {:.3} (gap {:.3})  \
         |g| {:.3e}  clamped {:.0}%  [{:.1}s sample, {:.1}s score, {:.1}s fwd, {:.1}s bwd]",
        m.round + 1,
        m.loss,
        m.pairs,
        100.0 * m.accepted_ratio,
        m.score_mean,
        m.score_gap,
        m.grad_norm,
        100.0 * m.clamp_fraction,
        m.time_sampling,
        m.time_scoring,
        m.time_forward,
        m.time_backward
    );
    if tty {
        eprint!("\r\x1b[2K{line}");
    } else {
        eprintln!("{line}");
    }
}
