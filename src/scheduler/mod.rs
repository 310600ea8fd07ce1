//! Diffusers-compatible noise schedulers behind one [`Scheduler`] trait.
//!
//! Each file ports one class of `diffusers` v0.42.1 and is named after it:
//! [`euler_discrete`] (EulerDiscreteScheduler), [`euler_ancestral_discrete`]
//! (EulerAncestralDiscreteScheduler), [`ddim`] (DDIMScheduler),
//! [`dpmsolver_multistep`] (DPMSolverMultistepScheduler, DPM-Solver++ 2M) and
//! [`ddpm`] (DDPMScheduler). [`build_scheduler`] picks one by name.
//!
//! # How a pipeline drives a scheduler
//!
//! ```text
//! let mut s = build_scheduler("euler", &SchedulerConfig::from_file(path)?, 0.0)?;
//! s.set_timesteps(n)?;
//! let start = 0;                     // img2img: s.img2img_start(strength)
//! latents = noise * s.init_noise_sigma();      // img2img: s.add_noise(image, noise, start)?
//! for i in start..s.timesteps().len() {
//!     let x = s.scale_model_input(&latents, i)?;
//!     let eps = unet(x, s.timesteps()[i] /* cast, see below */);   // + CFG
//!     let z = if s.needs_noise(i) { Some(draw_noise()) } else { None };
//!     latents = s.step(&eps, i, &latents, z.as_deref())?;
//! }
//! ```
//!
//! * `step_index` is the position in [`Scheduler::timesteps`] (0-based, absolute:
//!   an img2img run starting at `k` calls `step(.., k, ..)` first). Steps must be
//!   taken in increasing order; DPM-Solver keeps the previous model output.
//! * Timesteps are returned as `f64` holding exactly what diffusers holds: float32
//!   values for the Euler schedulers (fractional with Karras sigmas or `linspace`
//!   spacing), integers for DDIM / DDPM / DPM-Solver. diffusers hands the UNet this
//!   tensor unchanged, so a UNet graph taking a float timestep gets `t as f32`,
//!   one taking int64 gets `t as i64` (truncation; exact for the integer ones).
//! * Noise: stochastic samplers (Euler ancestral every step, DDIM with eta > 0 every
//!   step, DDPM while the timestep is > 0) need one standard-normal tensor of the
//!   sample's size per step, passed to [`Scheduler::step`]; [`Scheduler::needs_noise`]
//!   says when, and `step` fails if it is missing. diffusers draws it after the
//!   UNet call of that step, from the pipeline's generator.
//! * img2img: [`img2img_start_index`] is diffusers' `get_timesteps`:
//!   `t_start = n - min(floor(n * strength), n)`; the latents are
//!   `add_noise(image_latents, noise, t_start)` (no `init_noise_sigma` factor) and
//!   the loop runs from `t_start`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

mod class;
pub mod ddim;
pub mod ddpm;
pub mod dpmsolver_multistep;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub(crate) mod schedule;

pub use class::{model_default, ModelDefault, DIFFUSERS_CLASSES};
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpmsolver_multistep::DpmSolverMultistepScheduler;
pub use euler_ancestral_discrete::EulerAncestralDiscreteScheduler;
pub use euler_discrete::EulerDiscreteScheduler;

/// The names [`build_scheduler`] accepts; the first (Euler) is the fallback
/// default for a model whose own class is not ported ([`model_default`]).
pub const SCHEDULER_NAMES: [&str; 6] = [
    "euler",
    "euler_a",
    "ddim",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "ddpm",
];

/// The most training timesteps a config may state. Released models use 1000;
/// the schedule tables are allocated at this length, so without a bound one
/// number in a config could ask for gigabytes.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// `scheduler_config.json` with diffusers' field names. Fields whose diffusers
/// default differs between classes are `Option`s resolved by each scheduler;
/// unknown fields (`_diffusers_version`, `skip_prk_steps`, ...) are ignored.
/// `null` is accepted wherever diffusers accepts `None`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The diffusers class the model was saved with (`_class_name`); it picks
    /// the default scheduler ([`model_default`]).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace`; default `linspace` for Euler and
    /// DPM-Solver, `leading` for DDIM and DDPM.
    pub timestep_spacing: Option<String>,
    pub steps_offset: i64,
    #[serde(deserialize_with = "null_false")]
    pub use_karras_sigmas: bool,
    #[serde(deserialize_with = "null_false")]
    pub use_exponential_sigmas: bool,
    #[serde(deserialize_with = "null_false")]
    pub use_beta_sigmas: bool,
    #[serde(deserialize_with = "null_false")]
    pub use_lu_lambdas: bool,
    #[serde(deserialize_with = "null_false")]
    pub use_flow_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// DDIM / DDPM; default true there.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// DDIM; default true.
    pub set_alpha_to_one: Option<bool>,
    /// Dynamic thresholding is not supported; `true` is refused.
    #[serde(deserialize_with = "null_false")]
    pub thresholding: bool,
    #[serde(deserialize_with = "null_false")]
    pub rescale_betas_zero_snr: bool,
    /// Euler: `linear` (only value supported).
    pub interpolation_type: String,
    /// Euler / DPM-Solver: `zero` or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    #[serde(deserialize_with = "null_false")]
    pub euler_at_final: bool,
    /// DPM-Solver; default true.
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: 1 or 2.
    pub solver_order: usize,
    /// DPM-Solver: `dpmsolver++` only.
    pub algorithm_type: String,
    /// DPM-Solver: `midpoint` or `heun`.
    pub solver_type: String,
    /// DPM-Solver: `None` means `-inf` (also what `-Infinity` in the JSON becomes).
    pub lambda_min_clipped: Option<f64>,
    /// Euler: `discrete` or `continuous`.
    pub timestep_type: String,
    /// DDPM: `fixed_small` (default), `fixed_small_log` or `fixed_large`.
    pub variance_type: Option<String>,
}

fn null_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            timestep_spacing: None,
            steps_offset: 0,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            thresholding: false,
            rescale_betas_zero_snr: false,
            interpolation_type: "linear".into(),
            final_sigmas_type: None,
            euler_at_final: false,
            lower_order_final: None,
            solver_order: 2,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lambda_min_clipped: None,
            timestep_type: "discrete".into(),
            variance_type: None,
        }
    }
}

/// `beta_schedule` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

/// `prediction_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// `timestep_spacing` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

fn bad_field(field: &str, value: &str, allowed: &str) -> Error {
    Error::invalid_model(format!(
        "scheduler config: field `{field}`: unsupported value {value:?} (expected {allowed})"
    ))
}

/// Replaces the bare `NaN`, `Infinity` and `-Infinity` that Python's json module
/// writes (diffusers' DPM-Solver `lambda_min_clipped`) by `null`, outside strings.
fn sanitize_python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else {
            let mut hit = None;
            for tok in ["-Infinity", "Infinity", "NaN"] {
                if rest.starts_with(tok) {
                    hit = Some(tok);
                    break;
                }
            }
            if let Some(tok) = hit {
                out.push_str("null");
                rest = &rest[tok.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`. Errors name the file and, for a value of the
    /// wrong type or an unsupported setting, the field.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| e.context(path.display()))
    }

    /// Parses the JSON text of a scheduler config and validates it.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(&sanitize_python_json(text))
            .map_err(|e| Error::invalid_model(format!("scheduler config: invalid JSON: {e}")))?;
        Self::from_value(value)
    }

    /// Builds from an already parsed JSON object and validates it.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let serde_json::Value::Object(map) = value else {
            return Err(Error::invalid_model("scheduler config: not a JSON object"));
        };
        let cfg: SchedulerConfig =
            match serde_json::from_value(serde_json::Value::Object(map.clone())) {
                Ok(c) => c,
                Err(e) => {
                    // Find the field at fault by parsing each key on its own.
                    for (k, v) in &map {
                        let mut one = serde_json::Map::new();
                        one.insert(k.clone(), v.clone());
                        if let Err(e1) = serde_json::from_value::<SchedulerConfig>(
                            serde_json::Value::Object(one),
                        ) {
                            return Err(Error::invalid_model(format!(
                                "scheduler config: field `{k}`: {e1}"
                            )));
                        }
                    }
                    return Err(Error::invalid_model(format!("scheduler config: {e}")));
                }
            };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the settings every scheduler shares.
    pub fn validate(&self) -> Result<()> {
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&self.num_train_timesteps) {
            return Err(bad_field(
                "num_train_timesteps",
                &self.num_train_timesteps.to_string(),
                &format!("2 to {MAX_TRAIN_TIMESTEPS}"),
            ));
        }
        self.beta_schedule()?;
        self.prediction()?;
        if let Some(s) = &self.timestep_spacing {
            Self::parse_spacing(s)?;
        }
        if self.thresholding {
            return Err(Error::unsupported(
                "scheduler config: field `thresholding`: dynamic thresholding is not supported",
            ));
        }
        Ok(())
    }

    pub fn beta_schedule(&self) -> Result<BetaSchedule> {
        match self.beta_schedule.as_str() {
            "linear" => Ok(BetaSchedule::Linear),
            "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
            "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredCosCapV2),
            v => Err(bad_field(
                "beta_schedule",
                v,
                "linear, scaled_linear or squaredcos_cap_v2",
            )),
        }
    }

    pub fn prediction(&self) -> Result<Prediction> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            "sample" => Ok(Prediction::Sample),
            v => Err(bad_field(
                "prediction_type",
                v,
                "epsilon, v_prediction or sample",
            )),
        }
    }

    fn parse_spacing(s: &str) -> Result<Spacing> {
        match s {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            v => Err(bad_field(
                "timestep_spacing",
                v,
                "leading, trailing or linspace",
            )),
        }
    }

    /// `timestep_spacing`, or `default` (the class's diffusers default) when unset.
    pub fn spacing_or(&self, default: Spacing) -> Result<Spacing> {
        match &self.timestep_spacing {
            Some(s) => Self::parse_spacing(s),
            None => Ok(default),
        }
    }

    /// Refuses the sigma schedules not ported (Euler and DPM-Solver call this; the
    /// other classes have no such fields and ignore them, as diffusers does).
    pub(crate) fn refuse_unported_sigmas(&self) -> Result<()> {
        for (field, on) in [
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("use_flow_sigmas", self.use_flow_sigmas),
        ] {
            if on {
                return Err(Error::unsupported(format!(
                    "scheduler config: field `{field}`: not supported"
                )));
            }
        }
        Ok(())
    }

    /// `final_sigmas_type` is `sigma_min` (vs `zero`, the default).
    pub(crate) fn final_sigma_min(&self) -> Result<bool> {
        match self.final_sigmas_type.as_deref() {
            None | Some("zero") => Ok(false),
            Some("sigma_min") => Ok(true),
            Some(v) => Err(bad_field("final_sigmas_type", v, "zero or sigma_min")),
        }
    }
}

/// What one [`Scheduler::step`] produces, as diffusers' scheduler outputs do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// The sample for the next step.
    pub prev_sample: Vec<f32>,
    /// The step's data prediction x0 (diffusers' `pred_original_sample`; for
    /// DPM-Solver its converted model output). A cheap per-step preview.
    pub pred_original_sample: Vec<f32>,
}

/// One scheduler step worked out as a linear map, element by element:
///
/// ```text
/// x0   = clip(x0_sample * sample + x0_model * model_output)
/// prev = prev_sample * sample + prev_model * model_output + prev_x0 * x0
///      + prev_history * history + prev_noise * noise
/// ```
///
/// `history` is the previous step's x0 (DPM-Solver's second order), `noise` the
/// step's standard-normal draw, and `clip` the `clip_sample` range of DDIM and
/// DDPM. Every supported diffusers update has this form once its scalars are
/// worked out, so the same coefficients drive the host loop ([`LinearStep::apply`])
/// and the step graph that keeps the latents on the device
/// (`pipeline::step_graph`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinearStep {
    pub x0_sample: f64,
    pub x0_model: f64,
    pub clip: Option<f64>,
    pub prev_sample: f64,
    pub prev_model: f64,
    pub prev_x0: f64,
    pub prev_history: f64,
    pub prev_noise: f64,
}

impl LinearStep {
    /// x0 from `(x0_sample, x0_model)` for a prediction type whose data
    /// prediction is `x0 = (sample - sigma * eps) / alpha` (epsilon),
    /// `alpha * sample - sigma * v` (v) or the output itself (sample), with
    /// `alpha^2 + sigma^2 = 1` in the VP parametrisation used here.
    pub(crate) fn x0_of(pred: Prediction, alpha: f64, sigma: f64) -> (f64, f64) {
        match pred {
            Prediction::Epsilon => (1.0 / alpha, -sigma / alpha),
            Prediction::VPrediction => (alpha, -sigma),
            Prediction::Sample => (0.0, 1.0),
        }
    }

    /// Evaluates the step on host slices (in `f64`). `history` and `noise` are
    /// required where their coefficients are non-zero.
    pub fn apply(
        &self,
        model_output: &[f32],
        sample: &[f32],
        history: Option<&[f32]>,
        noise: Option<&[f32]>,
    ) -> Result<StepOutput> {
        let n = sample.len();
        check_len("model_output", model_output.len(), n)?;
        let h = required(history, self.prev_history, "the previous step's x0", n)?;
        let z = required(noise, self.prev_noise, "noise", n)?;
        let mut out = StepOutput {
            prev_sample: Vec::with_capacity(n),
            pred_original_sample: Vec::with_capacity(n),
        };
        for i in 0..n {
            let (x, m) = (f64::from(sample[i]), f64::from(model_output[i]));
            let mut x0 = self.x0_sample * x + self.x0_model * m;
            if let Some(r) = self.clip {
                x0 = x0.clamp(-r, r);
            }
            let mut prev = self.prev_sample * x + self.prev_model * m + self.prev_x0 * x0;
            if let Some(h) = h {
                prev += self.prev_history * f64::from(h[i]);
            }
            if let Some(z) = z {
                prev += self.prev_noise * f64::from(z[i]);
            }
            out.prev_sample.push(prev as f32);
            out.pred_original_sample.push(x0 as f32);
        }
        Ok(out)
    }
}

/// One diffusers scheduler. Samples are flat `f32` slices in the latent layout
/// (NCHW); the math runs in `f64`.
pub trait Scheduler: Send {
    /// Our name (`euler`, `euler_a`, `ddim`, `dpmpp_2m`, `dpmpp_2m_karras`, `ddpm`).
    fn name(&self) -> &'static str;
    /// The config this scheduler was built from.
    fn config(&self) -> &SchedulerConfig;
    /// Builds the inference schedule for `num_inference_steps` steps and resets
    /// any multistep state and the begin index.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The schedule: the UNet's timestep at each step (see the module docs for the cast).
    fn timesteps(&self) -> &[f64];
    /// The sigma schedule (`timesteps().len() + 1` values, ending with the final
    /// sigma), or `None` for schedulers without one (DDIM, DDPM).
    fn sigmas(&self) -> Option<&[f64]>;
    /// Standard deviation of the initial noise: multiply `N(0, 1)` noise by it for
    /// text-to-image.
    fn init_noise_sigma(&self) -> f64;
    /// The factor the UNet input is scaled by at `step_index` (1 except for the
    /// Euler family: `1 / sqrt(sigma^2 + 1)`).
    fn input_scale(&self, step_index: usize) -> Result<f64>;
    /// The UNet input for step `step_index`: `sample * input_scale(step_index)`.
    fn scale_model_input(&self, sample: &[f32], step_index: usize) -> Result<Vec<f32>> {
        let k = self.input_scale(step_index)?;
        Ok(sample.iter().map(|&x| (f64::from(x) * k) as f32).collect())
    }
    /// Step `step_index` as a [`LinearStep`]. This advances multistep state as
    /// [`step`](Self::step) does, so call one or the other once per step, in order.
    fn linear_step(&mut self, step_index: usize) -> Result<LinearStep>;
    /// One denoising step from `sample` at `step_index` to the previous sample.
    /// `noise` (standard normal, same size) is required when
    /// [`needs_noise`](Self::needs_noise) is true and ignored otherwise.
    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        noise: Option<&[f32]>,
    ) -> Result<StepOutput> {
        check_len("model_output", model_output.len(), sample.len())?;
        let noise = if self.needs_noise(step_index) {
            Some(require_noise(self.name(), step_index, noise, sample.len())?)
        } else {
            None
        };
        let out =
            self.linear_step(step_index)?
                .apply(model_output, sample, self.history(), noise)?;
        self.keep_history(&out.pred_original_sample);
        Ok(out)
    }
    /// The previous step's x0, for multistep schedulers stepped through
    /// [`step`](Self::step) (DPM-Solver's second order); `None` for the rest.
    fn history(&self) -> Option<&[f32]> {
        None
    }
    /// Keeps this step's x0 for the next [`step`](Self::step), where needed.
    fn keep_history(&mut self, _x0: &[f32]) {}
    /// Noises `original` to the level of step `step_index` (img2img start).
    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>>;
    /// Model evaluations per step (1 for all schedulers here).
    fn order(&self) -> usize {
        1
    }
    /// Whether [`step`](Self::step) consumes noise at this step (diffusers draws it then).
    fn needs_noise(&self, step_index: usize) -> bool;
    /// diffusers' `set_begin_index`: the first step an img2img run takes. The steps
    /// still take absolute indices; this resets multistep state.
    fn set_begin_index(&mut self, begin_index: usize);
    /// The begin index (0 unless set).
    fn begin_index(&self) -> usize;
    /// diffusers' img2img `get_timesteps`: computes the start index for `strength`
    /// in `[0, 1]`, sets it as the begin index and returns it.
    fn img2img_start(&mut self, strength: f64) -> Result<usize> {
        let idx = img2img_start_index(self.timesteps().len(), strength, self.order())?;
        self.set_begin_index(idx);
        Ok(idx)
    }
}

/// `get_timesteps` of the diffusers img2img pipelines:
/// `init = min(floor(n * strength), n)`, `t_start = max(n - init, 0) * order`.
pub fn img2img_start_index(
    num_inference_steps: usize,
    strength: f64,
    order: usize,
) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::invalid_argument(format!(
            "strength must be in [0, 1], got {strength}"
        )));
    }
    let n = num_inference_steps;
    let init = ((n as f64 * strength) as usize).min(n);
    Ok(n.saturating_sub(init) * order)
}

/// Builds a scheduler by name: `euler` (Karras sigmas as the config says),
/// `euler_a`, `ddim`, `dpmpp_2m` (forces `use_karras_sigmas = false`),
/// `dpmpp_2m_karras` (forces `use_karras_sigmas = true`) or `ddpm`. Like
/// diffusers' `from_config`, each class ignores the config fields it does not
/// have. `eta` is DDIM's (0 = deterministic); the other schedulers ignore it.
/// `set_timesteps` must be called before stepping.
pub fn build_scheduler(
    name: &str,
    config: &SchedulerConfig,
    eta: f64,
) -> Result<Box<dyn Scheduler>> {
    config.validate()?;
    Ok(match name {
        "euler" => Box::new(EulerDiscreteScheduler::new(config.clone())?),
        "euler_a" => Box::new(EulerAncestralDiscreteScheduler::new(config.clone())?),
        "ddim" => Box::new(DdimScheduler::new(config.clone(), eta)?),
        "dpmpp_2m" => {
            let mut c = config.clone();
            c.use_karras_sigmas = false;
            Box::new(DpmSolverMultistepScheduler::new(c, "dpmpp_2m")?)
        }
        "dpmpp_2m_karras" => {
            let mut c = config.clone();
            c.use_karras_sigmas = true;
            Box::new(DpmSolverMultistepScheduler::new(c, "dpmpp_2m_karras")?)
        }
        "ddpm" => Box::new(DdpmScheduler::new(config.clone())?),
        other => {
            return Err(Error::invalid_argument(format!(
                "unknown scheduler {other:?}; valid names: {}",
                SCHEDULER_NAMES.join(", ")
            )))
        }
    })
}

/// The [`SCHEDULER_NAMES`] entry that ports diffusers class `class` as
/// `config` sets it up, if any.
pub(crate) fn name_for_class(class: &str, config: &SchedulerConfig) -> Option<&'static str> {
    Some(match class {
        "EulerDiscreteScheduler" => "euler",
        "EulerAncestralDiscreteScheduler" => "euler_a",
        "DDIMScheduler" => "ddim",
        "DPMSolverMultistepScheduler" if config.use_karras_sigmas => "dpmpp_2m_karras",
        "DPMSolverMultistepScheduler" => "dpmpp_2m",
        "DDPMScheduler" => "ddpm",
        _ => return None,
    })
}

// ---- helpers shared by the scheduler files ----

/// `v` where its coefficient is non-zero (then it must be given, of length `n`).
fn required<'a>(
    v: Option<&'a [f32]>,
    coef: f64,
    what: &str,
    n: usize,
) -> Result<Option<&'a [f32]>> {
    if coef == 0.0 {
        return Ok(None);
    }
    let v = v.ok_or_else(|| {
        Error::invalid_argument(format!("this step needs {what}, none was given"))
    })?;
    check_len(what, v.len(), n)?;
    Ok(Some(v))
}

pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::invalid_argument(format!(
            "{what} has {got} values, the sample has {want}"
        )));
    }
    Ok(())
}

pub(crate) fn check_step(name: &str, step_index: usize, n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid_argument(format!(
            "{name}: set_timesteps must be called before stepping"
        )));
    }
    if step_index >= n {
        return Err(Error::invalid_argument(format!(
            "{name}: step index {step_index} out of range (schedule has {n} steps)"
        )));
    }
    Ok(())
}

pub(crate) fn require_noise<'a>(
    name: &str,
    step_index: usize,
    noise: Option<&'a [f32]>,
    len: usize,
) -> Result<&'a [f32]> {
    let z = noise.ok_or_else(|| {
        Error::invalid_argument(format!(
            "{name}: step {step_index} is stochastic and needs a noise tensor, none was given"
        ))
    })?;
    check_len("noise", z.len(), len)?;
    Ok(z)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run through the scheduler_config fuzz target, this config made the
    /// first scheduler built from it allocate 4 GB of beta tables and abort.
    #[test]
    fn huge_num_train_timesteps_is_refused() {
        let err = SchedulerConfig::from_json_str(r#"{"num_train_timesteps": 1000000000}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("num_train_timesteps") && err.contains("1000000000"),
            "{err}"
        );
        assert!(err.contains("100000"), "{err}");
    }

    #[test]
    fn train_timesteps_limit_is_inclusive() {
        let cfg = |n: usize| format!(r#"{{"num_train_timesteps": {n}}}"#);
        let mut s = build_scheduler(
            "euler",
            &SchedulerConfig::from_json_str(&cfg(MAX_TRAIN_TIMESTEPS)).unwrap(),
            0.0,
        )
        .unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps().len(), 4);
        assert!(SchedulerConfig::from_json_str(&cfg(MAX_TRAIN_TIMESTEPS + 1)).is_err());
    }
}
