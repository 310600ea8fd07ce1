//! Measures what the denoising loop costs on top of the UNet itself.
//!
//!   cargo run --release --example bench_pipeline -- [--model DIR] [--steps N]
//!       [--repeats R] [--ep cpu] [--threads T] [--raw] [--interleave repeat|step]
//!       [--step-math auto|graph|host]
//!
//! In one process, over R repeats, it interleaves (by default block by block,
//! alternating which goes first; `--interleave step`: call by call):
//! (a) `Graph::run` on a UNet session of its own (loaded from the same file as
//!     the pipeline's, on the same runtime: same execution providers, same
//!     thread settings), with fixed inputs of the shapes the pipeline uses;
//! (b) one `Job::step` of a real job of N steps.
//!
//! Steps 2..N-1 of the job are pure denoising steps; the first also encodes the
//! prompts and draws the latents, the last also decodes, so those two are
//! reported apart. With `--raw` a third session (plain `ort::Session`, zero-copy
//! inputs and outputs) splits the overhead into `Graph::run` conversions and
//! the pipeline's own work. The last line, `overhead_pct=<x>`, is for scripts.
//!
//! Each session has its own intra-op thread pool, whose threads spin for a
//! while after a call; call-by-call interleaving therefore makes every call
//! compete with the previous session's spinning threads, which a real job never
//! does. The block mode keeps that to one call per block.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{ArrayD, Axis, IxDyn};
use ort::session::Session;
use ort::value::TensorRef;
use spo_runtime::model::ModelFolder;
use spo_runtime::pipeline::rng::TorchRng;
use spo_runtime::pipeline::{JobSpec, Pipeline, Status, StepMath};
use spo_runtime::runtime::session::{DType, Graph, Input};
use spo_runtime::runtime::{LogLevel, Logger};
use spo_runtime::scheduler::{build_scheduler, Scheduler, SchedulerConfig};
use spo_runtime::text::LongPrompt;
use spo_runtime::{Error, Options, Result, Runtime};

/// The scheduler of the bare loop and of the job it is timed against.
const BARE_SCHEDULER: &str = "euler";

const GUIDANCE: f64 = 5.0;
const SEED: u64 = 42;
const PROMPT: &str = "a red fox in the snow, oil painting";

struct Args {
    model: PathBuf,
    steps: usize,
    repeats: usize,
    ep: String,
    threads: Option<usize>,
    raw: bool,
    /// Interleave call by call instead of block by block.
    fine: bool,
    /// The job's loop (`JobSpec::step_math`).
    step_math: StepMath,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_pipeline [--model DIR] [--steps N] [--repeats R] [--ep LIST] [--threads T] [--raw] [--interleave repeat|step] [--step-math auto|graph|host]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        model: PathBuf::from("tests/fixtures/tiny-sdxl"),
        steps: 20,
        repeats: 5,
        ep: "cpu".into(),
        threads: None,
        raw: false,
        fine: false,
        step_math: StepMath::Auto,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(value()),
            "--steps" => a.steps = value().parse().unwrap_or_else(|_| usage()),
            "--repeats" => a.repeats = value().parse().unwrap_or_else(|_| usage()),
            "--ep" => a.ep = value(),
            "--threads" => a.threads = Some(value().parse().unwrap_or_else(|_| usage())),
            "--raw" => a.raw = true,
            "--step-math" => a.step_math = StepMath::parse(&value()).unwrap_or_else(|| usage()),
            "--interleave" => match value().as_str() {
                "step" => a.fine = true,
                "repeat" => a.fine = false,
                _ => usage(),
            },
            _ => usage(),
        }
    }
    if a.steps < 3 || a.repeats == 0 {
        eprintln!("bench_pipeline: needs --steps >= 3 and --repeats >= 1");
        std::process::exit(2);
    }
    a
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2
    }
}

/// CPU time of the calling thread. With `--threads 1` ONNX Runtime runs the
/// graph on the calling thread, so this counts the work of a call without the
/// time spent waiting for a core on a busy machine.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clock id is a Linux constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The bare side: the job's denoising trajectory replayed outside the pipeline
/// (same scheduler config, same seed, same conditioning), so every timed
/// `Graph::run` gets exactly the values the job's UNet call gets at that step.
struct UnetInputs {
    sample: ArrayD<f32>,
    timestep: Input,
    ehs: ArrayD<f32>,
    text_embeds: Option<ArrayD<f32>>,
    time_ids: Option<ArrayD<f32>>,
}

struct BareLoop {
    config: SchedulerConfig,
    scheduler: Box<dyn Scheduler>,
    steps: usize,
    shape: Vec<usize>,
    ts_shape: Vec<usize>,
    ts_int: bool,
    latents: Vec<f32>,
    index: usize,
    x: UnetInputs,
    /// Mean |x| of the last finished trajectory's latents.
    final_mean_abs: f32,
}

fn cat(a: &ArrayD<f32>, b: &ArrayD<f32>) -> ArrayD<f32> {
    ndarray::concatenate(Axis(0), &[a.view(), b.view()]).expect("same shapes")
}

impl BareLoop {
    fn new(
        unet: &Graph,
        pipeline: &Pipeline,
        folder: &ModelFolder,
        shape: &[usize],
        steps: usize,
    ) -> Result<BareLoop> {
        let rows = 2 * shape[0];
        let ts = unet.require_input("timestep")?;
        let ts_shape: Vec<usize> = if ts.shape.is_empty() {
            vec![]
        } else {
            vec![ts.fixed_dim(0).unwrap_or(rows)]
        };
        let ts_int = matches!(ts.dtype, DType::I64 | DType::I32);
        let (pos, neg) = pipeline.encode_prompts(PROMPT, None, true, 0, LongPrompt::Truncate)?;
        let neg = neg.expect("cfg");
        let (text_embeds, time_ids) = match (&pos.pooled, &neg.pooled) {
            (Some(p), Some(n)) => {
                // The job's size is the model's default size ("WxH").
                let size = pipeline.info("default_size").unwrap_or_default();
                let (w, h) = size
                    .split_once('x')
                    .and_then(|(w, h)| Some((w.parse::<f32>().ok()?, h.parse::<f32>().ok()?)))
                    .ok_or_else(|| Error::invalid_model(format!("default_size '{size}'")))?;
                let ids = [h, w, 0.0, 0.0, h, w].repeat(rows);
                (
                    Some(cat(n, p)),
                    Some(ArrayD::from_shape_vec(IxDyn(&[rows, 6]), ids).expect("6 ids")),
                )
            }
            _ => (None, None),
        };
        let config = SchedulerConfig::from_file(folder.scheduler_config())?;
        let scheduler = build_scheduler(BARE_SCHEDULER, &config, 0.0)?;
        let mut bare = BareLoop {
            config,
            scheduler,
            steps,
            shape: shape.to_vec(),
            ts_shape,
            ts_int,
            latents: Vec::new(),
            index: 0,
            x: UnetInputs {
                sample: ArrayD::zeros(IxDyn(&[0])),
                timestep: Input::F32(ArrayD::zeros(IxDyn(&[0]))),
                ehs: cat(&neg.embeds, &pos.embeds),
                text_embeds,
                time_ids,
            },
            final_mean_abs: f32::NAN,
        };
        bare.restart()?;
        Ok(bare)
    }

    /// A new trajectory: the job's seed and scheduler.
    fn restart(&mut self) -> Result<()> {
        self.scheduler = build_scheduler(BARE_SCHEDULER, &self.config, 0.0)?;
        self.scheduler.set_timesteps(self.steps)?;
        let n: usize = self.shape.iter().product();
        let sigma = self.scheduler.init_noise_sigma() as f32;
        self.latents = TorchRng::new(SEED)
            .randn(n)
            .iter()
            .map(|v| v * sigma)
            .collect();
        self.index = 0;
        Ok(())
    }

    /// Sets the inputs of step `index`; true for a pure denoising step
    /// (neither the first nor the last), the ones compared with the job.
    fn prepare(&mut self) -> Result<bool> {
        let i = self.index;
        let t = self.scheduler.timesteps()[i];
        let scaled = self.scheduler.scale_model_input(&self.latents, i)?;
        let one = ArrayD::from_shape_vec(IxDyn(&self.shape), scaled).expect("shape");
        self.x.sample = cat(&one, &one);
        let n: usize = self.ts_shape.iter().product();
        let shape = IxDyn(&self.ts_shape);
        self.x.timestep = if self.ts_int {
            Input::I64(ArrayD::from_shape_vec(shape, vec![t.round() as i64; n]).expect("shape"))
        } else {
            Input::F32(ArrayD::from_shape_vec(shape, vec![t as f32; n]).expect("shape"))
        };
        Ok(i > 0 && i + 1 < self.steps)
    }

    /// Applies guidance and the scheduler step to the UNet output.
    fn finish(&mut self, out: &ArrayD<f32>) -> Result<()> {
        let half = out.len() / 2;
        let flat = out.as_standard_layout();
        let flat = flat.as_slice().expect("contiguous");
        let g = GUIDANCE as f32;
        let guided: Vec<f32> = (0..half)
            .map(|k| flat[k] + (flat[half + k] - flat[k]) * g)
            .collect();
        self.latents = self
            .scheduler
            .step(&guided, self.index, &self.latents, None)?
            .prev_sample;
        self.index += 1;
        if self.index == self.steps {
            let n = self.latents.len() as f32;
            self.final_mean_abs = self.latents.iter().map(|v| v.abs()).sum::<f32>() / n;
            self.restart()?;
        }
        Ok(())
    }

    /// A fresh owned input list (`Graph::run` consumes its inputs).
    fn list(&self) -> Vec<(&'static str, Input)> {
        let x = &self.x;
        let timestep = match &x.timestep {
            Input::F32(a) => Input::F32(a.clone()),
            Input::I64(a) => Input::I64(a.clone()),
        };
        let mut v = vec![
            ("sample", Input::F32(x.sample.clone())),
            ("timestep", timestep),
            ("encoder_hidden_states", Input::F32(x.ehs.clone())),
        ];
        if let Some(t) = &x.text_embeds {
            v.push(("text_embeds", Input::F32(t.clone())));
        }
        if let Some(t) = &x.time_ids {
            v.push(("time_ids", Input::F32(t.clone())));
        }
        v
    }
}

/// A plain ONNX Runtime session: borrowed inputs, the output read in place.
fn raw_call(session: &mut Session, x: &UnetInputs) -> Result<(Duration, Duration)> {
    let mut inputs = ort::inputs![
        "sample" => TensorRef::from_array_view(&x.sample)?,
        "encoder_hidden_states" => TensorRef::from_array_view(&x.ehs)?,
    ];
    match &x.timestep {
        Input::F32(a) => inputs.push(("timestep".into(), TensorRef::from_array_view(a)?.into())),
        Input::I64(a) => inputs.push(("timestep".into(), TensorRef::from_array_view(a)?.into())),
    }
    if let Some(t) = &x.text_embeds {
        inputs.push(("text_embeds".into(), TensorRef::from_array_view(t)?.into()));
    }
    if let Some(t) = &x.time_ids {
        inputs.push(("time_ids".into(), TensorRef::from_array_view(t)?.into()));
    }
    let (c0, t0) = (thread_cpu(), Instant::now());
    let out = session.run(inputs)?;
    let sum: f32 = out["out_sample"].try_extract_array::<f32>()?.iter().sum();
    let d = (t0.elapsed(), thread_cpu() - c0);
    std::hint::black_box(sum);
    Ok(d)
}

/// (a) one step of the replayed trajectory: one bare UNet call through
/// `Graph::run` (inputs built outside the timing), then, with `--raw`, the same
/// inputs through the plain session. Only pure denoising steps are recorded.
fn bare_once(
    unet: &mut Graph,
    raw: Option<&mut Session>,
    bare: &mut BareLoop,
    s: &mut Samples,
) -> Result<()> {
    let record = bare.prepare()?;
    let inputs = bare.list();
    let (c, t) = (thread_cpu(), Instant::now());
    let mut out = unet.run(inputs, &["out_sample"], None)?;
    let (wall, cpu) = (t.elapsed(), thread_cpu() - c);
    if record {
        s.bare.push(wall);
        s.bare_cpu.push(cpu);
    }
    if let Some(session) = raw {
        let (wall, cpu) = raw_call(session, &bare.x)?;
        if record {
            s.raw.push(wall);
            s.raw_cpu.push(cpu);
        }
    }
    bare.finish(&out.remove(0))
}

#[derive(Default)]
struct Samples {
    bare: Vec<Duration>,
    raw: Vec<Duration>,
    step: Vec<Duration>,
    /// Thread CPU time of the same calls.
    bare_cpu: Vec<Duration>,
    raw_cpu: Vec<Duration>,
    step_cpu: Vec<Duration>,
    first: Vec<Duration>,
    last: Vec<Duration>,
    end_to_end: Vec<Duration>,
}

fn main() {
    if let Err(e) = run(parse_args()) {
        eprintln!("bench_pipeline: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let logger = Logger::default();
    logger.set(
        LogLevel::Warn,
        Some(Arc::new(|l: LogLevel, m: &str| eprintln!("[{l:?}] {m}"))),
    );
    let mut o = Options::new();
    o.set("ep", &args.ep)?;
    if let Some(t) = args.threads {
        o.set("threads.intra", &t.to_string())?;
    }
    let rt = Runtime::new(&o, logger)?;
    let folder = ModelFolder::open(&args.model)?;
    let unet_path = folder.graph("unet");

    let t = Instant::now();
    let pipeline = Pipeline::load(&rt, &args.model, &Options::new())?;
    let load_pipeline = t.elapsed();
    let t = Instant::now();
    let mut unet = Graph::load(&rt, "unet", &unet_path)?;
    let load_unet = t.elapsed();
    let mut raw = if args.raw {
        Some(
            rt.session_builder()?
                .commit_from_file(&unet_path)
                .map_err(|e| Error::invalid_model(format!("raw unet session: {e}")))?,
        )
    } else {
        None
    };

    let spec = || JobSpec {
        prompt: PROMPT.into(),
        steps: args.steps,
        guidance: GUIDANCE,
        // The bare loop runs Euler; the job must too, whatever the model says.
        scheduler: Some(BARE_SCHEDULER.into()),
        seed: SEED,
        step_math: args.step_math,
        ..JobSpec::default()
    };
    // Warm-up job: first-run allocations, and the latent shape the pipeline uses.
    let mut job = pipeline.job(spec())?;
    job.run()?;
    let final_latents = job.latents().expect("done");
    let latent = final_latents.shape().to_vec();
    let mean_abs = final_latents.mapv(f32::abs).mean().unwrap_or(f32::NAN);
    drop(job);
    let mut bare = BareLoop::new(&unet, &pipeline, &folder, &latent, args.steps)?;
    let mut warm = Samples::default();
    for _ in 0..args.steps {
        bare_once(&mut unet, raw.as_mut(), &mut bare, &mut warm)?;
    }

    let mut s = Samples::default();
    for r in 0..args.repeats {
        // Block mode alternates which side goes first; step mode alternates per call.
        let bare_first = r % 2 == 0;
        if !args.fine && bare_first {
            for _ in 0..args.steps {
                bare_once(&mut unet, raw.as_mut(), &mut bare, &mut s)?;
            }
        }
        let mut e2e = Duration::ZERO;
        let t = Instant::now();
        let mut job = pipeline.job(spec())?;
        e2e += t.elapsed();
        let mut i = 0;
        loop {
            if args.fine {
                bare_once(&mut unet, raw.as_mut(), &mut bare, &mut s)?;
            }
            // (b) one step of the job.
            let (c, t) = (thread_cpu(), Instant::now());
            let status = job.step()?;
            let d = t.elapsed();
            let cpu = thread_cpu() - c;
            e2e += d;
            match (i, status) {
                (0, _) => s.first.push(d),
                (_, Status::Done) => s.last.push(d),
                _ => {
                    s.step.push(d);
                    s.step_cpu.push(cpu);
                }
            }
            i += 1;
            if status == Status::Done {
                break;
            }
        }
        let t = Instant::now();
        let images = job.take_images()?;
        drop(job);
        e2e += t.elapsed();
        std::hint::black_box(images);
        s.end_to_end.push(e2e);
        if !args.fine && !bare_first {
            for _ in 0..args.steps {
                bare_once(&mut unet, raw.as_mut(), &mut bare, &mut s)?;
            }
        }
    }
    println!(
        "latents    mean |x| {mean_abs:.6} (job), {:.6} (bare replay; must match) -- compare with the Python baseline",
        bare.final_mean_abs
    );
    report(&args, &rt, &pipeline, &latent, &s, load_pipeline, load_unet);
    Ok(())
}

fn report(
    args: &Args,
    rt: &Runtime,
    pipeline: &Pipeline,
    latent: &[usize],
    s: &Samples,
    load_pipeline: Duration,
    load_unet: Duration,
) {
    let bare = median(&s.bare);
    let step = median(&s.step);
    let overhead = us(step) - us(bare);
    let pct = 100.0 * overhead / us(bare);
    let threads = args
        .threads
        .map_or("ORT default".to_owned(), |t| t.to_string());
    println!(
        "model      {} ({}), {} steps, guidance {GUIDANCE}, step math {:?}, {} repeats, interleaved by {}",
        args.model.display(),
        pipeline.kind().name(),
        args.steps,
        args.step_math,
        args.repeats,
        if args.fine { "step" } else { "repeat" }
    );
    println!(
        "shapes     image {}, latents {latent:?}, UNet batch {} (CFG)",
        pipeline.info("default_size").unwrap_or_default(),
        2 * latent[0]
    );
    println!(
        "runtime    ORT {} | EP {} | intra threads {threads} -- the pipeline's UNet and the bare UNet \
         are sessions on the same Runtime: same EP, same thread settings",
        rt.info("ort.version").unwrap_or_default(),
        rt.info("ep.active").unwrap_or_default(),
    );
    println!(
        "load       pipeline {:.2} s, bare UNet session {:.2} s",
        load_pipeline.as_secs_f64(),
        load_unet.as_secs_f64()
    );
    println!(
        "bare UNet  Graph::run median {:.1} us  (min {:.1} us, n={}, steps 2..N-1 of the replay)",
        us(bare),
        us(*s.bare.iter().min().expect("samples")),
        s.bare.len()
    );
    if !s.raw.is_empty() {
        let raw = median(&s.raw);
        println!(
            "raw UNet   ort::Session::run (zero-copy) median {:.1} us; Graph::run adds {:.1} us ({:.2}%)",
            us(raw),
            us(bare) - us(raw),
            100.0 * (us(bare) - us(raw)) / us(raw)
        );
    }
    println!(
        "loop step  Job::step median {:.1} us  (min {:.1} us, n={}, steps 2..N-1)",
        us(step),
        us(*s.step.iter().min().expect("samples")),
        s.step.len()
    );
    println!("overhead   {overhead:.1} us per step = {pct:.2}% of the UNet call (target < 2%)");
    let (bare_cpu, step_cpu) = (median(&s.bare_cpu), median(&s.step_cpu));
    let cpu_overhead = us(step_cpu) - us(bare_cpu);
    let cpu_pct = 100.0 * cpu_overhead / us(bare_cpu);
    println!(
        "thread CPU bare {:.1} us, step {:.1} us -> overhead {cpu_overhead:.1} us = {cpu_pct:.2}%{}",
        us(bare_cpu),
        us(step_cpu),
        if args.threads == Some(1) {
            " (with --threads 1 the whole graph runs on this thread: robust to a busy machine)"
        } else {
            " (only the calling thread's share; use --threads 1 for a full count)"
        }
    );
    if !s.raw_cpu.is_empty() {
        let raw_cpu = median(&s.raw_cpu);
        println!(
            "thread CPU raw {:.1} us; Graph::run adds {:.1} us ({:.2}%)",
            us(raw_cpu),
            us(bare_cpu) - us(raw_cpu),
            100.0 * (us(bare_cpu) - us(raw_cpu)) / us(raw_cpu)
        );
    }
    println!(
        "first step {:.2} ms median -> prompt encode + latents ~ {:.2} ms",
        ms(median(&s.first)),
        ms(median(&s.first)) - ms(step)
    );
    println!(
        "last step  {:.2} ms median -> VAE decode ~ {:.2} ms",
        ms(median(&s.last)),
        ms(median(&s.last)) - ms(step)
    );
    let e2e: Vec<Duration> = s.end_to_end.clone();
    println!(
        "end-to-end {:.4} s median (job creation .. images, load excluded; min {:.4} s)",
        median(&e2e).as_secs_f64(),
        e2e.iter().min().copied().unwrap_or_default().as_secs_f64()
    );
    println!("peak RSS   {:.1} MiB (VmHWM)", peak_rss_mib());
    println!("e2e_s={:.6}", median(&e2e).as_secs_f64());
    println!("overhead_pct={pct:.3}");
}
