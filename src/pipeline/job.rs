//! A generation job: the settings it was created with, and a state machine that
//! advances one denoising step per [`Job::step`], so a host can spread an image
//! over several frames. The first step encodes the prompts and draws the initial
//! latents; the last step also decodes the images.

use std::collections::hash_map::Entry;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use ort::session::RunOptions;

use super::denoise::{self, repeat_batch, Conditioning};
use super::image::Image;
use super::preview::PreviewSlot;
use super::resident::{ResidentLoop, StepInputs};
use super::rng::TorchRng;
use super::step_graph;
use super::{BusyGuard, Models, Pipeline};
use crate::error::{Error, ErrorCode, Result};
use crate::limits::{self, Limits};
use crate::memory;
use crate::model::ModelKind;
use crate::options::Options;
use crate::runtime::session::Graph;
use crate::scheduler::{build_scheduler, Scheduler};
use crate::text::{LongPrompt, PromptEmbeds};

/// Settings of one job. Built from options (`JobSpec::from_options`) or directly.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub prompt: String,
    /// `None` = no negative prompt (SDXL then uses zeros when the model says
    /// `force_zeros_for_empty_prompt`); `Some("")` encodes the empty string, as diffusers does.
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: usize,
    pub guidance: f64,
    pub guidance_rescale: f64,
    pub scheduler: String,
    pub eta: f64,
    pub seed: u64,
    pub num_images: usize,
    pub clip_skip: usize,
    pub init_image: Option<PathBuf>,
    pub strength: f64,
    /// SDXL micro-conditioning as (h, w); default: the output size.
    pub original_size: Option<(usize, usize)>,
    pub crops_coords_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
    /// The tensor diffusers takes as `latents=` (unit variance, before
    /// `init_noise_sigma`); for img2img, the noise added to the image latents.
    pub init_latents: Option<Vec<f32>>,
    /// Per-step noise for stochastic schedulers, in the order steps consume it.
    pub step_noise: Option<Vec<Vec<f32>>>,
    /// Where the per-step math runs (option `step_math`).
    pub step_math: StepMath,
    /// Prompts longer than one 77-token window: truncated (diffusers, the
    /// default) or encoded in windows (option `long_prompt=chunks`).
    pub long_prompt: LongPrompt,
}

/// Where guidance and the scheduler update run between UNet calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepMath {
    /// `Graph` when the UNet runs on CUDA, `Host` otherwise. On the CPU
    /// provider the latents live in host memory either way, and the step
    /// graph's extra session run (about 50 us of dispatch for its ~30 nodes)
    /// costs more than the host math on the tiny fixtures; on a GPU the
    /// graph saves two PCIe transfers and the host round trip per step.
    #[default]
    Auto,
    /// As a small ONNX graph beside the UNet, so the latents stay in ONNX
    /// Runtime values (device memory under CUDA) for the whole loop. Falls
    /// back to `Host` where the UNet is fed row by row (a fixed batch smaller
    /// than the job's).
    Graph,
    /// In Rust on host arrays (f64 arithmetic), the reference path.
    Host,
}

impl StepMath {
    /// `auto`, `graph` or `host`.
    pub fn parse(s: &str) -> Option<StepMath> {
        match s {
            "auto" => Some(StepMath::Auto),
            "graph" => Some(StepMath::Graph),
            "host" => Some(StepMath::Host),
            _ => None,
        }
    }
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            prompt: String::new(),
            negative_prompt: None,
            width: None,
            height: None,
            steps: 30,
            guidance: 5.0,
            guidance_rescale: 0.0,
            scheduler: "euler".into(),
            eta: 0.0,
            seed: 0,
            num_images: 1,
            clip_skip: 0,
            init_image: None,
            strength: 0.6,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            init_latents: None,
            step_noise: None,
            step_math: StepMath::Auto,
            long_prompt: LongPrompt::Truncate,
        }
    }
}

fn parse_pair(v: &str) -> Option<(usize, usize)> {
    let (a, b) = v.split_once(['x', ','])?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl JobSpec {
    /// Reads the job keys of `spo_job_create`: prompt, negative_prompt, width,
    /// height, steps, guidance, guidance_rescale, scheduler, eta, seed, generator
    /// (`torch-cpu`, the default), num_images, clip_skip, init_image, strength,
    /// original_size / target_size ("HxW"), crops_coords_top_left ("TOP,LEFT"),
    /// step_math (`auto`, the default, `graph` or `host`), long_prompt (`truncate`, the
    /// default, or `chunks`).
    pub fn from_options(o: &Options) -> Result<JobSpec> {
        o.check_consumer("job", "spo_job_create")?;
        let mut s = JobSpec::default();
        let size = |k: &str| o.u64(k).map(|v| v.map(|v| v as usize));
        s.prompt = o.get("prompt").unwrap_or_default().to_owned();
        s.negative_prompt = o.get("negative_prompt").map(str::to_owned);
        s.width = size("width")?;
        s.height = size("height")?;
        if let Some(v) = size("steps")? {
            s.steps = v;
        }
        if let Some(v) = o.f64("guidance")? {
            s.guidance = v;
        }
        if let Some(v) = o.f64("guidance_rescale")? {
            s.guidance_rescale = v;
        }
        if let Some(v) = o.get("scheduler") {
            s.scheduler = v.to_owned();
        }
        if let Some(v) = o.f64("eta")? {
            s.eta = v;
        }
        if let Some(v) = o.u64("seed")? {
            s.seed = v;
        }
        if let Some(g) = o.get("generator") {
            if g != "torch-cpu" && g != "default" {
                return Err(Error::new(
                    ErrorCode::InvalidOptionValue,
                    format!("option 'generator': '{g}' is not torch-cpu or default"),
                ));
            }
        }
        if let Some(v) = size("num_images")? {
            s.num_images = v;
        }
        if let Some(v) = size("clip_skip")? {
            s.clip_skip = v;
        }
        s.init_image = o.get("init_image").map(PathBuf::from);
        if let Some(v) = o.f64("strength")? {
            s.strength = v;
        }
        s.original_size = o.parse("original_size", "HxW", parse_pair)?;
        s.target_size = o.parse("target_size", "HxW", parse_pair)?;
        if let Some(v) = o.parse("crops_coords_top_left", "TOP,LEFT", parse_pair)? {
            s.crops_coords_top_left = v;
        }
        if let Some(v) = o.parse("long_prompt", "truncate or chunks", LongPrompt::parse)? {
            s.long_prompt = v;
        }
        if let Some(v) = o.parse("step_math", "auto, graph or host", StepMath::parse)? {
            s.step_math = v;
        }
        Ok(s)
    }
}

/// Checks the size, steps and batch of a job against `limits` before anything
/// is allocated for it.
fn check_request(limits: &Limits, spec: &JobSpec, w: usize, h: usize, f: usize) -> Result<()> {
    limits.check_size("", w as u64, h as u64)?;
    if h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
        return Err(Error::new(
            ErrorCode::InvalidOptionValue,
            format!("width/height {w}x{h} must be positive multiples of {f}"),
        ));
    }
    limits::check(
        "steps",
        spec.steps as u64,
        limits.max_steps,
        limits::MAX_STEPS,
    )?;
    if spec.steps == 0 {
        return Err(Error::new(
            ErrorCode::InvalidOptionValue,
            "option 'steps': 0 is not a number of steps; use 1 or more",
        ));
    }
    let b = spec.num_images as u64;
    limits::check("num_images", b, limits.max_batch, limits::MAX_BATCH)?;
    if b == 0 {
        return Err(Error::new(
            ErrorCode::InvalidOptionValue,
            "option 'num_images': 0 images; use 1 or more",
        ));
    }
    Ok(())
}

/// Where a job stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `done` of `total` denoising steps are finished.
    Running { done: usize, total: usize },
    /// Images are ready.
    Done,
}

/// Cancels a job from any thread, including an ONNX Runtime call in flight.
pub struct CancelToken {
    flag: AtomicBool,
    run_options: RunOptions,
}

impl CancelToken {
    pub fn new() -> Result<CancelToken> {
        Ok(CancelToken {
            flag: AtomicBool::new(false),
            run_options: RunOptions::new()?,
        })
    }
    /// The run options that make ONNX Runtime calls cancellable by this token.
    pub fn run_options(&self) -> &RunOptions {
        &self.run_options
    }
    /// Re-arms a token whose cancel was consumed (a trainer lives on after a
    /// cancelled round).
    pub fn reset(&self) -> Result<()> {
        self.flag.store(false, Ordering::Release);
        self.run_options.unterminate()?;
        Ok(())
    }
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        let _ = self.run_options.terminate();
    }
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// Called after each step with (done, total); return `false` to cancel.
pub type ProgressFn = dyn FnMut(usize, usize) -> bool + Send;

enum State {
    New,
    Denoising,
    Done,
    Failed(Error),
}

pub struct Job {
    pipeline: Pipeline,
    spec: JobSpec,
    scheduler: Box<dyn Scheduler>,
    rng: TorchRng,
    state: State,
    /// Absolute scheduler index of the next step, and where img2img started.
    index: usize,
    start: usize,
    shape: [usize; 4],
    latents: Vec<f32>,
    cond: Option<Conditioning>,
    /// The resident loop, when the step math runs as a graph.
    resident: Option<ResidentLoop>,
    cancel: Arc<CancelToken>,
    progress: Option<Box<ProgressFn>>,
    preview: PreviewSlot,
    images: Option<Vec<Image>>,
    busy: BusyGuard,
}

impl Job {
    pub(crate) fn new(pipeline: Pipeline, spec: JobSpec, busy: BusyGuard) -> Result<Job> {
        let inner = &pipeline.inner;
        let (dh, dw) = inner.default_size;
        let (h, w) = (spec.height.unwrap_or(dh), spec.width.unwrap_or(dw));
        let f = inner.vae_factor;
        let limits = inner.runtime.limits();
        check_request(limits, &spec, w, h, f)?;
        if !(0.0..=1.0).contains(&spec.strength) {
            return Err(Error::new(
                ErrorCode::InvalidOptionValue,
                format!("option 'strength': {} is not in [0, 1]", spec.strength),
            ));
        }
        if spec.init_image.is_some() && inner.models.lock().vae_encoder.is_none() {
            return Err(Error::invalid_model(format!(
                "init_image needs {}, which the model folder lacks",
                inner.folder.graph("vae_encoder").display()
            )));
        }
        let mut scheduler = build_scheduler(&spec.scheduler, &inner.scheduler_config, spec.eta)
            .map_err(|e| {
                Error::new(
                    ErrorCode::InvalidOptionValue,
                    format!("option 'scheduler': {}", e.message),
                )
            })?;
        scheduler.set_timesteps(spec.steps)?;
        if let Some(path) = &spec.init_image {
            Image::check_png(path, limits, (w, h))?;
        }
        let shape = [spec.num_images, inner.latent_channels, h / f, w / f];
        // Within the limits this cannot overflow (64 images of 16384² / 64
        // latent pixels), but the limits are the host's to raise.
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| memory::out_of_memory::<f32>(usize::MAX, "the latents"))?;
        if let Some(l) = &spec.init_latents {
            if l.len() != n {
                return Err(Error::invalid_argument(format!(
                    "init latents hold {} values; shape {shape:?} needs {n}",
                    l.len()
                )));
            }
        }
        let start = if spec.init_image.is_some() {
            scheduler.img2img_start(spec.strength)?
        } else {
            0
        };
        Ok(Job {
            rng: TorchRng::new(spec.seed),
            pipeline,
            spec,
            scheduler,
            state: State::New,
            index: start,
            start,
            shape,
            latents: Vec::new(),
            cond: None,
            resident: None,
            cancel: Arc::new(CancelToken::new()?),
            progress: None,
            preview: PreviewSlot::default(),
            images: None,
            busy,
        })
    }

    pub fn cancel_token(&self) -> Arc<CancelToken> {
        self.cancel.clone()
    }

    pub fn set_progress(&mut self, f: Option<Box<ProgressFn>>) {
        self.progress = f;
    }

    /// The x0 preview of the latest step (empty before the first step). It is
    /// updated before the progress callback runs.
    pub fn preview_slot(&self) -> PreviewSlot {
        self.preview.clone()
    }

    /// Whether the loop runs resident (the step graph, see [`StepMath`]); known
    /// after the first step.
    pub fn is_resident(&self) -> bool {
        self.resident.is_some()
    }

    /// Denoising steps this job runs (fewer than `steps` for img2img).
    pub fn total_steps(&self) -> usize {
        self.scheduler.timesteps().len() - self.start
    }

    /// The final latents (what diffusers returns with `output_type="latent"`),
    /// once the job is done.
    pub fn latents(&self) -> Option<ArrayD<f32>> {
        matches!(self.state, State::Done).then(|| {
            ArrayD::from_shape_vec(IxDyn(&self.shape), self.latents.clone()).expect("shape")
        })
    }

    /// Advances one denoising step (the last one also decodes the images).
    pub fn step(&mut self) -> Result<Status> {
        match &self.state {
            State::Done => return Ok(Status::Done),
            State::Failed(e) => return Err(e.clone()),
            _ => {}
        }
        let r = self.advance();
        match &r {
            Ok(Status::Done) => {
                self.state = State::Done;
                self.busy.release();
            }
            Err(e) => {
                self.state = State::Failed(e.clone());
                self.busy.release();
            }
            _ => {}
        }
        r
    }

    /// Runs to the end.
    pub fn run(&mut self) -> Result<()> {
        while self.step()? != Status::Done {}
        Ok(())
    }

    /// Hands over the images of a finished job (once).
    pub fn take_images(&mut self) -> Result<Vec<Image>> {
        if !matches!(self.state, State::Done) {
            return Err(Error::invalid_argument(
                "the job has not finished; run it to the end first",
            ));
        }
        self.images
            .take()
            .ok_or_else(|| Error::invalid_argument("the images of this job were already taken"))
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(Error::new(ErrorCode::Cancelled, "the job was cancelled"))
        } else {
            Ok(())
        }
    }

    fn advance(&mut self) -> Result<Status> {
        self.check_cancel()?;
        let pipeline = self.pipeline.clone();
        let inner = &pipeline.inner;
        if matches!(self.state, State::New) {
            self.prepare()?;
            self.state = State::Denoising;
        }
        let mut models = inner.models.lock();
        let i = self.index;
        let total = self.total_steps();
        let done = i + 1 - self.start;
        if self.resident.is_some() {
            self.resident_step(&mut models, i, done)?;
        } else {
            self.host_step(&mut models.unet, i, done)?;
        }
        self.index += 1;
        if let Some(p) = self.progress.as_mut() {
            if !p(done, total) {
                self.cancel.cancel();
            }
        }
        self.check_cancel()?;
        if self.index < self.scheduler.timesteps().len() {
            return Ok(Status::Running { done, total });
        }
        if let Some(r) = &self.resident {
            self.latents = r.latents()?;
        }
        let f = &inner.folder;
        let scaled = ArrayD::from_shape_vec(IxDyn(&self.shape), self.latents.clone())
            .expect("shape")
            .mapv(|v| (v as f64 / f.vae_scaling_factor + f.vae_shift_factor) as f32);
        let decoded =
            denoise::vae_decode(&mut models.vae_decoder, scaled, &self.cancel.run_options)
                .map_err(|e| self.cancelled_or(e))?;
        self.images = Some(Image::from_decoded(&decoded)?);
        Ok(Status::Done)
    }

    /// One step of the host loop: UNet output and latents through host arrays.
    fn host_step(&mut self, unet: &mut Graph, i: usize, done: usize) -> Result<()> {
        let t = self.scheduler.timesteps()[i];
        let scaled = self.scheduler.scale_model_input(&self.latents, i)?;
        let x = ArrayD::from_shape_vec(IxDyn(&self.shape), scaled).expect("shape");
        let cond = self.cond.as_mut().expect("prepared");
        let noise_pred = denoise::predict_noise(
            unet,
            &x,
            t,
            cond,
            self.spec.guidance,
            self.spec.guidance_rescale,
            &self.cancel.run_options,
        )
        .map_err(|e| self.cancelled_or(e))?;
        let noise = if self.scheduler.needs_noise(i) {
            Some(self.step_noise(i)?)
        } else {
            None
        };
        let pred = noise_pred.as_standard_layout();
        let out = self.scheduler.step(
            pred.as_slice().expect("contiguous"),
            i,
            &self.latents,
            noise.as_deref(),
        )?;
        self.latents = out.prev_sample;
        self.preview
            .publish_host(done, self.shape, out.pred_original_sample);
        Ok(())
    }

    /// One step of the resident loop (see [`ResidentLoop`]).
    fn resident_step(&mut self, models: &mut Models, i: usize, done: usize) -> Result<()> {
        let step = self.scheduler.linear_step(i)?;
        let n = self.scheduler.timesteps().len();
        let next_input_scale = if i + 1 < n {
            self.scheduler.input_scale(i + 1)?
        } else {
            1.0
        };
        let noise = if self.scheduler.needs_noise(i) {
            Some(self.step_noise(i)?)
        } else {
            None
        };
        let inputs = StepInputs {
            timestep: self.scheduler.timesteps()[i],
            step: &step,
            next_input_scale,
            noise,
            done,
        };
        let r = self.resident.as_mut().expect("resident");
        let graph = models
            .step_graphs
            .get_mut(&r.kind())
            .expect("built in prepare");
        let res = r.step(
            &mut models.unet,
            graph,
            self.cond.as_mut().expect("prepared"),
            inputs,
            &self.preview,
            &self.cancel.run_options,
        );
        res.map_err(|e| self.cancelled_or(e))
    }

    fn cancelled_or(&self, e: Error) -> Error {
        if self.cancel.is_cancelled() {
            Error::new(ErrorCode::Cancelled, "the job was cancelled")
        } else {
            e
        }
    }

    fn step_noise(&mut self, i: usize) -> Result<Vec<f32>> {
        let n = self.latents.len();
        match &self.spec.step_noise {
            Some(list) => {
                let k = i - self.start;
                let v = list.get(k).ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "step noise has {} entries; step {k} needs one",
                        list.len()
                    ))
                })?;
                if v.len() != n {
                    return Err(Error::invalid_argument(format!(
                        "step noise {k} holds {} values, latents {n}",
                        v.len()
                    )));
                }
                Ok(v.clone())
            }
            None => self.rng.try_randn(n, "the step noise"),
        }
    }

    /// Encodes prompts, builds the conditioning and draws the initial latents.
    fn prepare(&mut self) -> Result<()> {
        let inner = &self.pipeline.inner;
        let spec = &self.spec;
        let cfg = spec.guidance > 1.0;
        let b = spec.num_images;
        let (pos, neg) = self.pipeline.encode_prompts(
            &spec.prompt,
            spec.negative_prompt.as_deref(),
            cfg,
            spec.clip_skip,
            spec.long_prompt,
        )?;
        let batch = |f: &dyn Fn(&PromptEmbeds) -> ArrayD<f32>| -> Result<ArrayD<f32>> {
            let p = repeat_batch(&f(&pos), b);
            match &neg {
                Some(n) => denoise::cat_batch(&[&repeat_batch(&f(n), b), &p]),
                None => Ok(p),
            }
        };
        let ehs = batch(&|e| e.embeds.clone())?;
        let (text_embeds, time_ids) = if inner.folder.kind == ModelKind::Sdxl {
            let te = batch(&|e| e.pooled.clone().expect("SDXL pooled"))?;
            let (h, w) = (
                self.shape[2] * inner.vae_factor,
                self.shape[3] * inner.vae_factor,
            );
            let o = spec.original_size.unwrap_or((h, w));
            let tg = spec.target_size.unwrap_or((h, w));
            let c = spec.crops_coords_top_left;
            let ids = [o.0, o.1, c.0, c.1, tg.0, tg.1].map(|v| v as f32);
            let rows = if cfg { 2 * b } else { b };
            let t = ArrayD::from_shape_vec(IxDyn(&[rows, 6]), ids.repeat(rows)).expect("6 ids");
            (Some(te), Some(t))
        } else {
            (None, None)
        };
        let mut cond = Conditioning {
            encoder_hidden_states: ehs,
            text_embeds,
            time_ids,
            cfg,
            lora_slots: inner.lora.lock().slot_inputs.clone(),
            binding: None,
        };
        cond.bind(&inner.models.lock().unet)?;
        self.cond = Some(cond);
        let n: usize = self.shape.iter().product();
        let noise = match &spec.init_latents {
            Some(l) => memory::collect(n, l.iter().copied(), "the initial latents")?,
            None => self.rng.try_randn(n, "the initial latents")?,
        };
        self.latents = match &spec.init_image {
            None => {
                let s = self.scheduler.init_noise_sigma() as f32;
                let mut latents = noise;
                latents.iter_mut().for_each(|v| *v *= s);
                latents
            }
            Some(path) => {
                let (h, w) = (
                    self.shape[2] * inner.vae_factor,
                    self.shape[3] * inner.vae_factor,
                );
                let img = Image::read_png_limited(path, inner.runtime.limits(), Some((w, h)))?;
                let mut models = inner.models.lock();
                let vae = models.vae_encoder.as_mut().expect("checked at creation");
                let mean = denoise::vae_encode_mean(
                    vae,
                    img.to_tensor()?,
                    self.shape[1],
                    &self.cancel.run_options,
                )?;
                let f = &inner.folder;
                let init = repeat_batch(&mean, b)
                    .mapv(|v| ((v as f64 - f.vae_shift_factor) * f.vae_scaling_factor) as f32);
                let init = init.as_standard_layout();
                self.scheduler.add_noise(
                    init.as_slice().expect("contiguous"),
                    &noise,
                    self.start,
                )?
            }
        };
        let on_cuda = inner.models.lock().unet.on_cuda();
        if spec.step_math == StepMath::Graph || (spec.step_math == StepMath::Auto && on_cuda) {
            self.start_resident()?;
        }
        Ok(())
    }

    /// Moves the latents into a [`ResidentLoop`] where the UNet takes the
    /// whole batch in one bound call; otherwise the host loop runs.
    fn start_resident(&mut self) -> Result<()> {
        let inner = &self.pipeline.inner;
        let cond = self.cond.as_ref().expect("prepared");
        if cond.binding.is_none() {
            return Ok(());
        }
        let mut models = inner.models.lock();
        let Some(kind) =
            ResidentLoop::kind_for(&models.unet, cond.cfg, self.spec.guidance_rescale > 0.0)?
        else {
            return Ok(());
        };
        let models = &mut *models;
        if let Entry::Vacant(e) = models.step_graphs.entry(kind) {
            e.insert(Graph::load_internal(
                &inner.runtime,
                "step_graph",
                &step_graph::build(kind),
            )?);
        }
        self.resident = Some(ResidentLoop::new(
            &models.unet,
            &models.step_graphs[&kind],
            kind,
            self.shape,
            &self.latents,
            self.scheduler.input_scale(self.start)?,
            self.spec.guidance,
            self.spec.guidance_rescale,
            &self.preview,
        )?);
        Ok(())
    }
}
