//! A generation job: the settings it was created with, and a state machine that
//! advances one denoising step per [`Job::step`], so a host can spread an image
//! over several frames. The first step encodes the prompts and draws the initial
//! latents; the last step also decodes the images.

use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use ort::session::RunOptions;

use super::denoise::{self, repeat_batch, Conditioning};
use super::image::Image;
use super::job_spec::count_non_finite;
pub use super::job_spec::{JobSpec, StepMath};
use super::preview::PreviewSlot;
use super::resident::{ResidentLoop, StepInputs};
use super::rng::TorchRng;
use super::step_graph;
use super::{BusyGuard, Models, Pipeline};
use crate::error::{Error, ErrorCode, Result};
use crate::limits::{self, Limits};
use crate::memory;
use crate::model::ModelKind;
use crate::runtime::session::Graph;
use crate::scheduler::{build_scheduler, Scheduler};
use crate::text::PromptEmbeds;

/// Checks the size, steps and batch of a job against `limits` before anything
/// is allocated for it.
fn check_request(limits: &Limits, spec: &JobSpec, w: usize, h: usize) -> Result<()> {
    limits.check_size("", w as u64, h as u64)?;
    limits::check(
        "steps",
        spec.steps as u64,
        limits.max_steps,
        limits::MAX_STEPS,
    )?;
    limits::check(
        "num_images",
        spec.num_images as u64,
        limits.max_batch,
        limits::MAX_BATCH,
    )
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
///
/// A cancel is two things, so it is prompt wherever it lands: the flag, read
/// before and after every step, and `RunOptions::terminate` on the run
/// options every model call of the job uses, which ONNX Runtime checks
/// between the nodes of a running graph. So a cancel waits at most for one
/// node, not one step: measured on tests/fixtures/tiny-sd15 (64x64, 1000
/// steps, cancelled from another thread after the first progress callback),
/// `spo_job_run` returned 0.00 s after the cancel natively and 0.00-0.03 s
/// under valgrind (default scheduler; a canceller blocking on a condition
/// variable or busy-waiting alike), after one step. `spo_job_cancel` takes no
/// lock, so nothing here waits for the running step; a report of a cancel
/// that did not end a job under valgrind did not reproduce on this path.
/// tests/c/pipeline.c bounds the time from cancel to return.
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

/// `[num_images, C, h, w]` of the job's latents; refuses a size the VAE or
/// the UNet cannot take, before any graph runs into it.
fn latent_shape(inner: &super::Inner, spec: &JobSpec, limits: &Limits) -> Result<[usize; 4]> {
    let (dh, dw) = inner.default_size;
    let (h, w) = (spec.height.unwrap_or(dh), spec.width.unwrap_or(dw));
    check_request(limits, spec, w, h)?;
    let f = inner.vae_factor * inner.latent_multiple;
    if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
        return Err(Error::new(
            ErrorCode::InvalidOptionValue,
            format!(
                "option 'width'/'height': {w}x{h} must be positive multiples of {f} for this \
                 model (VAE factor {} x UNet down-sampling {})",
                inner.vae_factor, inner.latent_multiple
            ),
        ));
    }
    let f = inner.vae_factor;
    Ok([spec.num_images, inner.latent_channels, h / f, w / f])
}

/// Init latents must be exactly `shape`; step noise `[k, ..shape]` with an
/// entry for every stochastic step the job runs. Only the element count
/// matching would let a transposed or wrong-size tensor through.
fn check_tensors(
    spec: &JobSpec,
    shape: [usize; 4],
    scheduler: &dyn Scheduler,
    start: usize,
) -> Result<()> {
    if let Some(l) = &spec.init_latents {
        if l.shape() != shape {
            return Err(Error::invalid_argument(format!(
                "init_latents are shaped {:?}; this job needs {shape:?} \
                 [num_images, channels, height/8, width/8]",
                l.shape()
            )));
        }
    }
    if let Some(z) = &spec.step_noise {
        let n = scheduler.timesteps().len();
        let needed = (start..n)
            .filter(|&i| scheduler.needs_noise(i))
            .map(|i| i - start + 1)
            .max()
            .unwrap_or(0);
        if z.ndim() != 5 || z.shape()[1..] != shape || z.shape()[0] < needed {
            return Err(Error::invalid_argument(format!(
                "step_noise is shaped {:?}; this job needs [k, {}, {}, {}, {}] with k >= {needed}",
                z.shape(),
                shape[0],
                shape[1],
                shape[2],
                shape[3]
            )));
        }
    }
    Ok(())
}

/// A UNet output with NaN/inf poisons every later step and would surface
/// only at the VAE; fail where it starts (`what` names the step), with the
/// likely causes.
fn require_finite_unet(
    pipeline: &Pipeline,
    what: &str,
    values: &ndarray::ArrayViewD<f32>,
) -> Result<()> {
    let bad = count_non_finite(values.iter());
    if bad == 0 {
        return Ok(());
    }
    let lora = if pipeline.inner.lora.lock().is_active() {
        ", or a LoRA whose weights or multiplier are too large"
    } else {
        ""
    };
    Err(Error::invalid_model(format!(
        "{what} holds {bad} NaN or infinite values of {}; likely causes: an fp16 unet \
         overflowing (try an fp32 unet or a lower guidance){lora}",
        values.len()
    )))
}

impl Job {
    pub(crate) fn new(pipeline: Pipeline, spec: JobSpec, busy: BusyGuard) -> Result<Job> {
        spec.validate()?;
        let inner = &pipeline.inner;
        let limits = inner.runtime.limits();
        let shape = latent_shape(inner, &spec, limits)?;
        if spec.init_image.is_some() && inner.models.lock().vae_encoder.is_none() {
            return Err(Error::invalid_model(format!(
                "init_image needs {}, which the model folder lacks",
                inner.folder.graph("vae_encoder").display()
            )));
        }
        let name = spec.scheduler.as_deref().unwrap_or(inner.default_scheduler);
        let mut scheduler =
            build_scheduler(name, &inner.scheduler_config, spec.eta).map_err(|e| {
                Error::new(
                    ErrorCode::InvalidOptionValue,
                    format!("option 'scheduler': {}", e.message),
                )
            })?;
        scheduler.set_timesteps(spec.steps)?;
        if let Some(path) = &spec.init_image {
            let f = inner.vae_factor;
            Image::check_png(path, limits, (shape[3] * f, shape[2] * f))?;
        }
        let start = if spec.init_image.is_some() {
            scheduler.img2img_start(spec.strength)?
        } else {
            0
        };
        check_tensors(&spec, shape, scheduler.as_ref(), start)?;
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
        match &self.state {
            State::Done => {}
            State::Failed(Error {
                code: ErrorCode::Cancelled,
                ..
            }) => {
                return Err(Error::invalid_argument(
                    "the job was cancelled, so it has no images",
                ))
            }
            _ if self.cancel.is_cancelled() => {
                return Err(Error::invalid_argument(
                    "the job was cancelled, so it has no images",
                ))
            }
            State::Failed(e) => {
                return Err(Error::invalid_argument(format!(
                    "the job failed, so it has no images: {e}"
                )))
            }
            _ => {
                return Err(Error::invalid_argument(
                    "the job has not finished; run it to the end first",
                ))
            }
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
        // The resident loop keeps the UNet output on the device; its damage
        // shows here, before the VAE could be blamed for it.
        let latents = ndarray::aview1(&self.latents).into_dyn();
        require_finite_unet(&pipeline, "after denoising, the latents", &latents)?;
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
        let what = format!(
            "denoising step {done} of {}: the unet output",
            self.total_steps()
        );
        require_finite_unet(&self.pipeline, &what, &noise_pred.view())?;
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
            // The shape was checked against every stochastic step in `new`.
            Some(z) => memory::collect(
                n,
                z.index_axis(ndarray::Axis(0), i - self.start)
                    .iter()
                    .copied(),
                "the step noise",
            ),
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
            let p = repeat_batch(&f(&pos), b)?;
            match &neg {
                Some(n) => denoise::cat_batch(&[&repeat_batch(&f(n), b)?, &p]),
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
                let mut init = repeat_batch(&mean, b)?;
                init.mapv_inplace(|v| {
                    ((v as f64 - f.vae_shift_factor) * f.vae_scaling_factor) as f32
                });
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
