//! `spo`: the command-line front end, written on the Rust API.
//!
//!   spo generate --model DIR --prompt "..." [--out out.png] ...
//!   spo info --model DIR
//!   spo train --model DIR --train-dir DIR --spm DIR --prompts FILE --out LORA
//!   spo score --spm DIR --prompt "..." IMAGE.png...

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use ndarray::ArrayD;
use spo_runtime::lora::ModelGraphs;
use spo_runtime::model::tensors;
use spo_runtime::pipeline::{JobSpec, Lora, LoraMode, Pipeline, StepMath};
use spo_runtime::runtime::{LogLevel, Logger};
use spo_runtime::text::LongPrompt;
use spo_runtime::train::{check, GradRunner};
use spo_runtime::{Error, Options, Result, Runtime};

mod train;

#[derive(Parser)]
#[command(
    name = "spo",
    version,
    about = "SDXL / SD 1.5 on ONNX Runtime, with runtime LoRA and SPO"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct RuntimeArgs {
    /// Execution providers in order of preference.
    #[arg(long, default_value = "cuda,cpu")]
    ep: String,
    /// Fail instead of falling back when a provider is unavailable.
    #[arg(long)]
    ep_strict: bool,
    /// Print informational log messages.
    #[arg(long, short)]
    verbose: bool,
    /// ONNX Runtime's intra-op threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Text-to-image or image-to-image.
    Generate(Box<Generate>),
    /// LoRA tools.
    Lora {
        #[command(subcommand)]
        command: LoraCommand,
    },
    /// Run a training folder's gradient graphs on given tensors: the UNet
    /// inputs, `cotangent` and the LoRA (PEFT keys) in; `out_sample` and the
    /// LoRA gradients of sum(cotangent * out_sample) out.
    Grad(Box<Grad>),
    /// Fine-tune a LoRA with SPO (step-aware preference optimization).
    Train(Box<train::Train>),
    /// Score PNG images with a preference model.
    Score(Box<train::Score>),
    /// Print a model folder's components, dtypes, shapes and providers.
    Info {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        rt: RuntimeArgs,
    },
}

#[derive(Args)]
struct Grad {
    /// A training folder (train_manifest.json and its graphs).
    #[arg(long)]
    train_dir: PathBuf,
    /// safetensors with the UNet inputs, `cotangent` and the LoRA parameters
    /// (default: seeded random ones of the manifest's shapes).
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Where to write `out_sample` and the gradients (safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also check the training folder against this model folder's UNet.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Check the gradients along N random directions by finite differences.
    #[arg(long, default_value_t = 0)]
    fd_directions: u32,
    /// The finite-difference step (times a unit normal per parameter); too
    /// large a step shows curvature, too small one float round-off.
    #[arg(long, default_value_t = 1e-3)]
    fd_step: f32,
    /// Seed of the random inputs and directions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    rt: RuntimeArgs,
}

#[derive(Subcommand)]
enum LoraCommand {
    /// Print a LoRA's format, dialect, rank and alpha, every module it matches
    /// in the model and every key it does not.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        model: PathBuf,
    },
}

#[derive(Args)]
struct Generate {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "")]
    prompt: String,
    /// Negative prompt; without it SDXL uses zero embeddings (force_zeros_for_empty_prompt).
    #[arg(long)]
    negative: Option<String>,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    #[arg(long, default_value_t = 0.0)]
    guidance_rescale: f64,
    /// euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras, ddpm
    #[arg(long, default_value = "euler")]
    scheduler: String,
    /// DDIM eta.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Noise generator: torch-cpu (the default) matches torch.Generator("cpu").manual_seed(seed).
    #[arg(long, default_value = "torch-cpu")]
    generator: String,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Skip this many final CLIP layers (diffusers' clip_skip).
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Prompts over 75 tokens: truncate (diffusers) or chunks (A1111-style windows).
    #[arg(long, default_value = "truncate")]
    long_prompt: String,
    /// Where guidance and the scheduler update run: auto (graph on CUDA, host
    /// on CPU), graph (beside the UNet, latents stay on its device) or host.
    #[arg(long, default_value = "auto")]
    step_math: String,
    #[arg(long)]
    init_image: Option<PathBuf>,
    #[arg(long, default_value_t = 0.6)]
    strength: f64,
    /// Initial latents (.npy): the tensor diffusers takes as `latents=`.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Per-step noise (.npy, [steps, B, C, h, w]) for stochastic schedulers.
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Write the final latents (diffusers' output_type="latent") as .npy.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
    /// A LoRA to apply, FILE or FILE:MULTIPLIER (repeatable).
    #[arg(long = "lora")]
    loras: Vec<String>,
    /// How LoRAs are applied: auto, merge or slots.
    #[arg(long, default_value = "auto")]
    lora_mode: String,
    #[command(flatten)]
    rt: RuntimeArgs,
}

fn runtime(args: &RuntimeArgs) -> Result<Runtime> {
    let logger = Logger::default();
    let level = if args.verbose {
        LogLevel::Info
    } else {
        LogLevel::Warn
    };
    logger.set(
        level,
        Some(Arc::new(|l: LogLevel, m: &str| eprintln!("[{l:?}] {m}"))),
    );
    let mut o = Options::new();
    o.set("ep", &args.ep)?;
    o.set("ep.strict", if args.ep_strict { "true" } else { "false" })?;
    if let Some(t) = args.threads {
        o.set("threads.intra", &t.to_string())?;
    }
    Runtime::new(&o, logger)
}

fn read_npy(path: &Path) -> Result<ArrayD<f32>> {
    spo_runtime::pipeline::npy::read(path)
}

fn generate(g: Generate) -> Result<()> {
    let rt = runtime(&g.rt)?;
    let pipeline = Pipeline::load(&rt, &g.model, &Options::new())?;
    if !g.loras.is_empty() {
        let mode = LoraMode::parse(&g.lora_mode).ok_or_else(|| {
            Error::invalid_argument(format!(
                "--lora-mode '{}': use auto, merge or slots",
                g.lora_mode
            ))
        })?;
        let mut list = Vec::new();
        for spec in &g.loras {
            let (path, mult) = match spec.rsplit_once(':') {
                Some((p, m)) if m.parse::<f32>().is_ok() => (p, m.parse::<f32>().unwrap_or(1.0)),
                _ => (spec.as_str(), 1.0),
            };
            list.push((Lora::open(Path::new(path))?, mult));
        }
        pipeline.set_loras(&list, mode)?;
    }
    let mut spec = JobSpec {
        prompt: g.prompt,
        negative_prompt: g.negative,
        width: g.width,
        height: g.height,
        steps: g.steps,
        guidance: g.guidance,
        guidance_rescale: g.guidance_rescale,
        scheduler: g.scheduler,
        eta: g.eta,
        seed: g.seed,
        num_images: g.num_images,
        clip_skip: g.clip_skip,
        long_prompt: LongPrompt::parse(&g.long_prompt).ok_or_else(|| {
            Error::invalid_argument(format!(
                "--long-prompt '{}': use truncate or chunks",
                g.long_prompt
            ))
        })?,
        step_math: StepMath::parse(&g.step_math).ok_or_else(|| {
            Error::invalid_argument(format!(
                "--step-math '{}': use auto, graph or host",
                g.step_math
            ))
        })?,
        init_image: g.init_image,
        strength: g.strength,
        ..JobSpec::default()
    };
    if g.generator != "torch-cpu" {
        return Err(Error::invalid_argument(format!(
            "--generator '{}': only torch-cpu is available",
            g.generator
        )));
    }
    if let Some(p) = &g.init_latents {
        spec.init_latents = Some(read_npy(p)?.iter().copied().collect());
    }
    if let Some(p) = &g.noise {
        let a = read_npy(p)?;
        spec.step_noise = Some(
            a.outer_iter()
                .map(|s| s.iter().copied().collect())
                .collect(),
        );
    }
    let mut job = pipeline.job(spec)?;
    let total = job.total_steps() as u64;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps {elapsed_precise}")
                .expect("template"),
        );
        b
    });
    let b2 = bar.clone();
    job.set_progress(Some(Box::new(move |done, _| {
        if let Some(b) = &b2 {
            b.set_position(done as u64);
        }
        true
    })));
    let t0 = std::time::Instant::now();
    job.run()?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(p) = &g.save_latents {
        let l = job.latents().expect("done");
        let f = std::fs::File::create(p).map_err(|e| Error::io(p, e))?;
        ndarray_npy::WriteNpyExt::write_npy(&l, f)
            .map_err(|e| Error::io(p, std::io::Error::other(e)))?;
    }
    let images = job.take_images()?;
    for (i, img) in images.iter().enumerate() {
        let path = if i == 0 {
            g.out.clone()
        } else {
            let stem = g.out.file_stem().unwrap_or_default().to_string_lossy();
            g.out.with_file_name(format!("{stem}_{i}.png"))
        };
        img.write_png(&path)?;
        println!(
            "wrote {} ({}x{}) in {:.2}s",
            path.display(),
            img.width,
            img.height,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn info(model: &Path, args: &RuntimeArgs) -> Result<()> {
    let rt = runtime(args)?;
    let p = Pipeline::load(&rt, model, &Options::new())?;
    for key in ["ort.version", "ort.library_path", "ep.active"] {
        println!("{key:<20} {}", rt.info(key).unwrap_or_default());
    }
    for key in p.info_keys() {
        println!("{key:<20} {}", p.info(&key).unwrap_or_default());
    }
    Ok(())
}

fn lora_inspect(file: &Path, model: &Path) -> Result<()> {
    let lora = Lora::open(file)?;
    for key in Lora::INFO_KEYS {
        println!("{key:<10} {}", lora.info(key).unwrap_or_default());
    }
    let graphs = ModelGraphs::open(model)?;
    let r = spo_runtime::lora::resolve(&lora.0, &graphs.targets);
    println!("\nmatched {} module(s):", r.matched.len());
    for m in &r.matched {
        println!(
            "  {:<60} -> {:?} {} ({}) {:?}",
            m.key, m.component, m.module, m.initializer, m.shape
        );
    }
    println!("\nunmatched {} key(s):", r.unmatched.len());
    for (k, why) in &r.unmatched {
        println!("  {k}: {why}");
    }
    Ok(())
}

fn grad(g: Grad) -> Result<()> {
    let rt = runtime(&g.rt)?;
    let t0 = std::time::Instant::now();
    let mut runner = GradRunner::open(&rt, &g.train_dir)?;
    println!(
        "loaded {} in {:.2}s",
        g.train_dir.display(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(model) = &g.model {
        runner.check_model(&rt, model)?;
    }
    let inputs = match &g.inputs {
        Some(path) => tensors::read(path)?,
        None => check::random_inputs(&runner, g.seed, 0.05),
    };
    let what = g
        .inputs
        .as_ref()
        .map_or("random inputs".into(), |p| p.display().to_string());
    let t1 = std::time::Instant::now();
    let result = runner.run_contract(&what, inputs.clone())?;
    println!(
        "forward+backward: {} gradients in {:.2}s",
        result.len() - 1,
        t1.elapsed().as_secs_f64()
    );
    if let Some(out) = &g.out {
        tensors::write(out, &result)?;
        println!("wrote {}", out.display());
    }
    for k in 0..g.fd_directions {
        let c = check::directional(
            &mut runner,
            &inputs,
            &result,
            g.seed + 1 + k as u64,
            g.fd_step,
        )?;
        println!(
            "direction {k}: gradient {:.6e}, finite differences {:.6e}, relative error {:.2e}",
            c.analytic,
            c.numeric,
            c.relative_error()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    // A closed pipe (`spo lora inspect ... | head`) ends the process quietly,
    // as for other command-line tools, instead of panicking in println!.
    // SAFETY: called first thing, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Generate(g) => generate(*g),
        Command::Info { model, rt } => info(&model, &rt),
        Command::Grad(g) => grad(*g),
        Command::Train(t) => train::run(*t),
        Command::Score(s) => train::score(*s),
        Command::Lora {
            command: LoraCommand::Inspect { file, model },
        } => lora_inspect(&file, &model),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
