//! The settings of one generation job, and the one place they are parsed and
//! checked: the C API (`spo_job_create`), the CLI and Rust callers all go
//! through [`JobSpec::from_options`] and [`JobSpec::validate`], so a value is
//! refused the same way, with the same message, whichever door it came in by.

use std::path::PathBuf;

use ndarray::ArrayD;

use crate::error::{Error, ErrorCode, Result};
use crate::options::Options;
use crate::text::LongPrompt;

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
    /// Classifier-free guidance scale in [0, 100]; at or below 1 CFG is off.
    pub guidance: f64,
    /// diffusers' `guidance_rescale` (phi) in [0, 1].
    pub guidance_rescale: f64,
    /// A name of [`crate::scheduler::SCHEDULER_NAMES`]; `None` = the model's
    /// own (pipeline info `scheduler.default`).
    pub scheduler: Option<String>,
    /// DDIM's eta in [0, 1]: 0 is deterministic DDIM, 1 the DDPM posterior
    /// variance. Above 1 diffusers' `sqrt(1 - alpha_prev - sigma^2)` turns
    /// NaN, so larger values mean nothing. Other schedulers ignore it.
    pub eta: f64,
    pub seed: u64,
    pub num_images: usize,
    pub clip_skip: usize,
    pub init_image: Option<PathBuf>,
    /// img2img: the share of the schedule re-run, in [0, 1].
    pub strength: f64,
    /// SDXL micro-conditioning as (h, w); default: the output size.
    pub original_size: Option<(usize, usize)>,
    pub crops_coords_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
    /// The tensor diffusers takes as `latents=` (unit variance, before
    /// `init_noise_sigma`), shaped `[num_images, C, h, w]`; for img2img, the
    /// noise added to the image latents.
    pub init_latents: Option<ArrayD<f32>>,
    /// Per-step noise for stochastic schedulers, `[steps, num_images, C, h, w]`;
    /// entry `k` is the noise of the job's `k`-th step.
    pub step_noise: Option<ArrayD<f32>>,
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
            scheduler: None,
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

fn bad_value(key: &str, message: String) -> Error {
    Error::new(
        ErrorCode::InvalidOptionValue,
        format!("option '{key}': {message}"),
    )
}

/// Fails unless `lo <= v <= hi` (which also refuses NaN).
fn in_range(key: &str, v: f64, lo: f64, hi: f64, why: &str) -> Result<()> {
    if v >= lo && v <= hi {
        Ok(())
    } else {
        // `{:?}` keeps 1e30 short where `{}` would spell out 31 digits.
        Err(bad_value(key, format!("{v:?} is not in [{lo}, {hi}]{why}")))
    }
}

/// How many of `values` are NaN or infinite.
pub fn count_non_finite<'a>(values: impl IntoIterator<Item = &'a f32>) -> usize {
    values.into_iter().filter(|v| !v.is_finite()).count()
}

impl JobSpec {
    /// Reads the job keys of `spo_job_create`: prompt, negative_prompt, width,
    /// height, steps, guidance, guidance_rescale, scheduler, eta, seed, generator
    /// (`torch-cpu`, the default), num_images, clip_skip, init_image, strength,
    /// original_size / target_size ("HxW"), crops_coords_top_left ("TOP,LEFT"),
    /// step_math (`auto`, the default, `graph` or `host`), long_prompt (`truncate`, the
    /// default, or `chunks`). Then [`JobSpec::validate`]s the result.
    pub fn from_options(o: &Options) -> Result<JobSpec> {
        o.check_consumer("job", "spo_job_create")?;
        let mut s = JobSpec::default();
        let size = |k: &str| o.u64(k).map(|v| v.map(|v| v as usize));
        s.prompt = o.get("prompt").unwrap_or_default().to_owned();
        s.negative_prompt = o.get("negative_prompt").map(str::to_owned);
        s.width = size("width")?;
        s.height = size("height")?;
        s.steps = size("steps")?.unwrap_or(s.steps);
        s.guidance = o.f64("guidance")?.unwrap_or(s.guidance);
        s.guidance_rescale = o.f64("guidance_rescale")?.unwrap_or(s.guidance_rescale);
        s.scheduler = o.get("scheduler").map(str::to_owned);
        s.eta = o.f64("eta")?.unwrap_or(s.eta);
        s.seed = o.u64("seed")?.unwrap_or(s.seed);
        if let Some(g) = o.get("generator") {
            if g != "torch-cpu" && g != "default" {
                return Err(bad_value(
                    "generator",
                    format!("'{g}' is not torch-cpu or default"),
                ));
            }
        }
        s.num_images = size("num_images")?.unwrap_or(s.num_images);
        s.clip_skip = size("clip_skip")?.unwrap_or(s.clip_skip);
        s.init_image = o.get("init_image").map(PathBuf::from);
        if let Some(v) = o.f64("strength")? {
            if s.init_image.is_none() {
                return Err(bad_value(
                    "strength",
                    format!("{v} is given without 'init_image'; strength is the share of an init image that img2img re-noises"),
                ));
            }
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
        s.validate()?;
        Ok(s)
    }

    /// Checks what does not depend on the model: ranges, finiteness, and
    /// that img2img runs at least one step. [`crate::pipeline::Pipeline::job`]
    /// calls it; the model-dependent checks (size, tensor shapes, scheduler
    /// name) follow there.
    /// The upper bounds of steps and num_images are the runtime's limits
    /// (`limits.max_steps`, `limits.max_batch`), checked when the job is made.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(bad_value(
                "steps",
                "0 is not a number of steps; use 1 or more".into(),
            ));
        }
        if self.num_images == 0 {
            return Err(bad_value("num_images", "0 images; use 1 or more".into()));
        }
        in_range(
            "guidance",
            self.guidance,
            0.0,
            100.0,
            " (at or below 1 CFG is off)",
        )?;
        in_range("guidance_rescale", self.guidance_rescale, 0.0, 1.0, "")?;
        in_range(
            "eta",
            self.eta,
            0.0,
            1.0,
            " (0 is deterministic DDIM, 1 the DDPM variance)",
        )?;
        in_range("strength", self.strength, 0.0, 1.0, "")?;
        if self.init_image.is_some() && (self.steps as f64 * self.strength) as usize == 0 {
            return Err(bad_value(
                "strength",
                format!(
                    "{} of {} steps runs no denoising step (img2img runs floor(steps x strength)); \
                     use strength >= {} or more steps",
                    self.strength,
                    self.steps,
                    1.0 / self.steps as f64
                ),
            ));
        }
        for (key, t) in [
            ("init_latents", &self.init_latents),
            ("step_noise", &self.step_noise),
        ] {
            let bad = t.as_ref().map_or(0, |t| count_non_finite(t.iter()));
            if bad > 0 {
                let n = t.as_ref().map_or(0, |t| t.len());
                return Err(Error::invalid_argument(format!(
                    "{key}: {bad} of {n} values are NaN or infinite"
                )));
            }
        }
        Ok(())
    }
}
