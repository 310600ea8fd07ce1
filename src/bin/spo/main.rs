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
use spo_runtime::limits::Limits;
use spo_runtime::lora::ModelGraphs;
use spo_runtime::model::{npy, tensors};
use spo_runtime::pipeline::{JobSpec, Lora, LoraMode, Pipeline};
use spo_runtime::runtime::{LogLevel, Logger};
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
    /// Execution providers in order of preference [default: cuda,cpu, where a
    /// CUDA provider missing from the loaded ONNX Runtime is skipped quietly;
    /// named here, it is skipped with a warning].
    #[arg(long)]
    ep: Option<String>,
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
        /// The model folder (diffusers/optimum ONNX layout).
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
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
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
        /// The LoRA file (.safetensors).
        file: PathBuf,
        /// The model folder whose modules the LoRA is resolved against.
        #[arg(long)]
        model: PathBuf,
    },
}

/// Generation settings are job options (see `spo_job_create`), passed as
/// text and parsed by the library exactly as for a C caller, so both refuse
/// the same values with the same messages; unset ones take the library's
/// defaults. Errors name the option key (`--guidance-rescale` is
/// `guidance_rescale`).
#[derive(Args)]
struct Generate {
    /// The model folder (diffusers/optimum ONNX layout: model_index.json, unet/, ...).
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Negative prompt; without it SDXL uses zero embeddings (force_zeros_for_empty_prompt).
    #[arg(long)]
    negative: Option<String>,
    /// Denoising steps [default: 30] (img2img runs the last `strength` part of them).
    #[arg(long)]
    steps: Option<String>,
    /// Classifier-free guidance scale in [0, 100] [default: 5] (CFG is off at or below 1).
    #[arg(long, allow_hyphen_values = true)]
    guidance: Option<String>,
    /// diffusers' guidance_rescale, in [0, 1] [default: 0].
    #[arg(long, allow_hyphen_values = true)]
    guidance_rescale: Option<String>,
    /// euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras, ddpm (default: the
    /// model's scheduler_config.json class when ported, else euler).
    #[arg(long)]
    scheduler: Option<String>,
    /// DDIM eta in [0, 1] [default: 0].
    #[arg(long, allow_hyphen_values = true)]
    eta: Option<String>,
    /// Random seed of the initial latents and the per-step noise [default: 0].
    #[arg(long)]
    seed: Option<String>,
    /// Noise generator: torch-cpu (the default) matches torch.Generator("cpu").manual_seed(seed).
    #[arg(long)]
    generator: Option<String>,
    /// Image width in pixels [default: the model's own size].
    #[arg(long)]
    width: Option<String>,
    /// Image height in pixels [default: the model's own size].
    #[arg(long)]
    height: Option<String>,
    /// Images per prompt [default: 1]; more than one writes OUT_1.png, OUT_2.png, ...
    #[arg(long)]
    num_images: Option<String>,
    /// Skip this many final CLIP layers (diffusers' clip_skip).
    #[arg(long)]
    clip_skip: Option<String>,
    /// Prompts over 75 tokens: truncate (diffusers) or chunks (A1111-style windows).
    #[arg(long)]
    long_prompt: Option<String>,
    /// Where guidance and the scheduler update run: auto (graph on CUDA, host
    /// on CPU), graph (beside the UNet, latents stay on its device) or host.
    #[arg(long)]
    step_math: Option<String>,
    /// A PNG to start from (image-to-image).
    #[arg(long)]
    init_image: Option<String>,
    /// img2img: the share of the schedule re-run, in [0, 1]; needs --init-image.
    #[arg(long, allow_hyphen_values = true)]
    strength: Option<String>,
    /// Initial latents (.npy, [num_images, C, h, w]): the tensor diffusers takes as `latents=`.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Per-step noise (.npy, [steps, num_images, C, h, w]) for stochastic schedulers.
    #[arg(long)]
    noise: Option<PathBuf>,
    /// Write the final latents (diffusers' output_type="latent") as .npy.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// The PNG to write (more images get _1, _2, ... before the extension).
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
    if let Some(ep) = &args.ep {
        o.set("ep", ep)?;
    }
    o.set("ep.strict", if args.ep_strict { "true" } else { "false" })?;
    if let Some(t) = args.threads {
        o.set("threads.intra", &t.to_string())?;
    }
    Runtime::new(&o, logger)
}

/// The job options the command line sets, in `spo_job_create`'s keys.
fn job_spec(g: &Generate, limits: &Limits) -> Result<JobSpec> {
    let pairs = [
        ("prompt", &g.prompt),
        ("negative_prompt", &g.negative),
        ("steps", &g.steps),
        ("guidance", &g.guidance),
        ("guidance_rescale", &g.guidance_rescale),
        ("scheduler", &g.scheduler),
        ("eta", &g.eta),
        ("seed", &g.seed),
        ("generator", &g.generator),
        ("width", &g.width),
        ("height", &g.height),
        ("num_images", &g.num_images),
        ("clip_skip", &g.clip_skip),
        ("long_prompt", &g.long_prompt),
        ("step_math", &g.step_math),
        ("init_image", &g.init_image),
        ("strength", &g.strength),
    ];
    let mut o = Options::new();
    for (key, value) in pairs {
        if let Some(v) = value {
            o.set(key, v)?;
        }
    }
    let mut spec = JobSpec::from_options(&o)?;
    let read = |p: &Path| npy::read_f32(p, limits);
    spec.init_latents = g.init_latents.as_deref().map(read).transpose()?;
    spec.step_noise = g.noise.as_deref().map(read).transpose()?;
    Ok(spec)
}

/// `FILE` or `FILE:MULTIPLIER`; a file whose own name has a colon is taken whole.
fn lora_spec(spec: &str) -> Result<(PathBuf, f32)> {
    let whole = Path::new(spec);
    match spec.rsplit_once(':') {
        Some((path, m)) if !whole.is_file() => {
            let mult = m.trim().parse::<f32>().ok().filter(|v| v.is_finite());
            let mult = mult.ok_or_else(|| {
                Error::invalid_argument(format!(
                    "--lora '{spec}': '{m}' is not a finite multiplier (use FILE or FILE:MULTIPLIER)"
                ))
            })?;
            Ok((PathBuf::from(path), mult))
        }
        _ => Ok((whole.to_owned(), 1.0)),
    }
}

/// Refuses an output the run could not write, before the run: not .png, a
/// folder, or a folder that is missing or not writable.
fn check_output(flag: &str, path: &Path, ext: &str) -> Result<()> {
    let bad = |why: String| Error::invalid_argument(format!("{flag} {}: {why}", path.display()));
    let got = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !got.eq_ignore_ascii_case(ext) {
        return Err(bad(format!(
            "only .{ext} is written; name the file *.{ext}"
        )));
    }
    if path.is_dir() {
        return Err(bad("is a folder".into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(bad(format!("{} is not an existing folder", dir.display())));
    }
    // Opening is the only honest test (permissions, read-only mounts, root):
    // an existing file is opened for writing without truncation, a new one
    // is created and removed again.
    let probe = if path.exists() {
        std::fs::OpenOptions::new().write(true).open(path).map(drop)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|_| std::fs::remove_file(path))
    };
    probe.map_err(|e| bad(format!("cannot be written: {e}")))
}

fn generate(g: Generate) -> Result<()> {
    let t_start = std::time::Instant::now();
    let rt = runtime(&g.rt)?;
    let spec = job_spec(&g, rt.limits())?;
    check_output("--out", &g.out, "png")?;
    if let Some(p) = &g.save_latents {
        check_output("--save-latents", p, "npy")?;
    }
    let loras: Vec<(PathBuf, f32)> = g
        .loras
        .iter()
        .map(|s| lora_spec(s))
        .collect::<Result<_>>()?;
    let mode = LoraMode::parse(&g.lora_mode).ok_or_else(|| {
        Error::invalid_argument(format!(
            "--lora-mode '{}': use auto, merge or slots",
            g.lora_mode
        ))
    })?;
    let pipeline = Pipeline::load(&rt, &g.model, &Options::new())?;
    if !loras.is_empty() {
        let list = loras
            .iter()
            .map(|(p, m)| Ok((Lora::open_limited(p, rt.limits())?, *m)))
            .collect::<Result<Vec<_>>>()?;
        pipeline.set_loras(&list, mode)?;
    }
    let mut job = pipeline.job(spec)?;
    let t0 = std::time::Instant::now();
    let load_time = t0 - t_start;
    run_with_progress(&mut job)?;
    let generate_time = t0.elapsed();
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
            "wrote {} ({}x{}) in {:.2}s: {:.2}s loading the model and LoRAs, {:.2}s generating",
            path.display(),
            img.width,
            img.height,
            t_start.elapsed().as_secs_f64(),
            load_time.as_secs_f64(),
            generate_time.as_secs_f64()
        );
    }
    Ok(())
}

/// Runs a job to the end, with a progress bar on a terminal.
fn run_with_progress(job: &mut spo_runtime::pipeline::Job) -> Result<()> {
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
    job.run()?;
    if let Some(b) = bar {
        b.finish_and_clear();
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
    if !r.duplicates.is_empty() {
        println!("\nduplicate {} key(s):", r.duplicates.len());
        for (_, why) in &r.duplicates {
            println!("  {why}");
        }
    }
    // Exits with the error (naming both keys) when the LoRA cannot be applied.
    r.into_checked(false).map(|_| ())
}

fn grad(g: Grad) -> Result<()> {
    if !(g.fd_step.is_finite() && g.fd_step > 0.0) {
        return Err(Error::invalid_argument(format!(
            "--fd-step {}: the step must be a finite number above 0",
            g.fd_step
        )));
    }
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
