//! DDIM (Song et al. 2020), deterministic for `eta = 0`, stochastic otherwise.
//!
//! Port of `DDIMScheduler` in
//! `diffusers/src/diffusers/schedulers/scheduling_ddim.py` at v0.42.1
//! (`set_timesteps`, `_get_variance`, `step` with `use_clipped_model_output =
//! False`, `add_noise`). As in diffusers the previous timestep is always
//! `t - num_train_timesteps // num_inference_steps`, whatever the spacing, and
//! with `eta > 0` noise is drawn at every step (the last included).

use super::schedule::{self, TrainScheduleOpts};
use super::{check_len, check_step, LinearStep, Prediction, Scheduler, SchedulerConfig, Spacing};
use crate::error::{Error, Result};

/// diffusers `DDIMScheduler`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    pred: Prediction,
    spacing: Spacing,
    eta: f64,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    clip_sample: bool,
    num_inference_steps: usize,
    int_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    begin_index: usize,
}

impl DdimScheduler {
    pub fn new(config: SchedulerConfig, eta: f64) -> Result<Self> {
        config.validate()?;
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(Error::invalid_argument(format!(
                "ddim: eta must be >= 0, got {eta}"
            )));
        }
        let alphas_cumprod = schedule::alphas_cumprod(
            &config,
            TrainScheduleOpts {
                zero_snr_floor: false,
            },
        )?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            f64::from(alphas_cumprod[0])
        };
        Ok(DdimScheduler {
            pred: config.prediction()?,
            spacing: config.spacing_or(Spacing::Leading)?,
            clip_sample: config.clip_sample.unwrap_or(true),
            eta,
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: 0,
            int_timesteps: Vec::new(),
            timesteps: Vec::new(),
            begin_index: 0,
        })
    }

    /// The `eta` this scheduler steps with.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// The cumulative alphas of step `step_index` and of its previous
    /// timestep (the final alpha-bar past the schedule's start).
    pub fn alpha_bars(&self, step_index: usize) -> Result<(f64, f64)> {
        check_step("ddim", step_index, self.timesteps.len())?;
        let t = self.int_timesteps[step_index];
        let prev_t = t - (self.config.num_train_timesteps / self.num_inference_steps) as i64;
        let a_prev = if prev_t >= 0 {
            self.alpha_at(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        Ok((self.alpha_at(t)?, a_prev))
    }

    fn alpha_at(&self, t: i64) -> Result<f64> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i))
            .map(|&a| f64::from(a))
            .ok_or_else(|| {
                Error::invalid_model(format!("ddim: timestep {t} outside the training schedule"))
            })
    }
}

impl Scheduler for DdimScheduler {
    fn name(&self) -> &'static str {
        "ddim"
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        if n == 0 || n > self.config.num_train_timesteps {
            return Err(Error::invalid_argument(format!(
                "ddim: num_inference_steps must be in 1..={}, got {n}",
                self.config.num_train_timesteps
            )));
        }
        self.num_inference_steps = n;
        self.int_timesteps = schedule::spacing_int(&self.config, self.spacing, n);
        self.timesteps = self.int_timesteps.iter().map(|&t| t as f64).collect();
        self.begin_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn input_scale(&self, step_index: usize) -> Result<f64> {
        check_step("ddim", step_index, self.timesteps.len())?;
        Ok(1.0)
    }

    fn linear_step(&mut self, step_index: usize) -> Result<LinearStep> {
        let (a_t, a_prev) = self.alpha_bars(step_index)?;
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let b_prev = 1.0 - a_prev;
        let variance = b_prev / b_t * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();
        let dir_coef = (1.0 - a_prev - std_dev * std_dev).max(0.0).sqrt();
        let (x0_sample, x0_model) = LinearStep::x0_of(self.pred, sa, sb);
        // The epsilon that points to x_t (from the unclipped x0, as diffusers'
        // default use_clipped_model_output=False does).
        let (eps_sample, eps_model) = match self.pred {
            Prediction::Epsilon => (0.0, 1.0),
            Prediction::Sample => (1.0 / sb, -sa / sb),
            Prediction::VPrediction => (sb, sa),
        };
        // prev = sqrt(a_prev) * x0 + dir_coef * eps + std_dev * noise
        Ok(LinearStep {
            x0_sample,
            x0_model,
            clip: self.clip_sample.then_some(self.config.clip_sample_range),
            prev_sample: dir_coef * eps_sample,
            prev_model: dir_coef * eps_model,
            prev_x0: a_prev.sqrt(),
            prev_noise: if self.eta > 0.0 { std_dev } else { 0.0 },
            ..LinearStep::default()
        })
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        check_step("ddim", step_index, self.timesteps.len())?;
        check_len("noise", noise.len(), original.len())?;
        let a = self.alpha_at(self.int_timesteps[step_index])?;
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&o, &z)| (sa * f64::from(o) + sb * f64::from(z)) as f32)
            .collect())
    }

    fn needs_noise(&self, _step_index: usize) -> bool {
        self.eta > 0.0
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = begin_index;
    }

    fn begin_index(&self) -> usize {
        self.begin_index
    }
}
