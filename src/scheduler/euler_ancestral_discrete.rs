//! Euler ancestral sampler: an Euler step to `sigma_down` plus fresh noise of
//! standard deviation `sigma_up`.
//!
//! Port of `EulerAncestralDiscreteScheduler` in
//! `diffusers/src/diffusers/schedulers/scheduling_euler_ancestral_discrete.py` at
//! v0.42.1 (`set_timesteps`, `scale_model_input`, `step`, `add_noise`). Like
//! diffusers it draws noise at every step, the last included (where
//! `sigma_up = 0`), so [`Scheduler::needs_noise`] is always true. The class has
//! no Karras option; `use_karras_sigmas` in the config is ignored, as in diffusers.

use super::schedule::{self, f32r, TrainScheduleOpts};
use super::{check_len, check_step, LinearStep, Prediction, Scheduler, SchedulerConfig, Spacing};
use crate::error::{Error, Result};

/// diffusers `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    config: SchedulerConfig,
    pred: Prediction,
    spacing: Spacing,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    begin_index: usize,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.validate()?;
        let pred = config.prediction()?;
        if pred == Prediction::Sample {
            return Err(Error::unsupported(
                "scheduler config: field `prediction_type`: \"sample\" is not implemented for euler_a (as in diffusers)",
            ));
        }
        let ac = schedule::alphas_cumprod(
            &config,
            TrainScheduleOpts {
                zero_snr_floor: true,
            },
        )?;
        Ok(EulerAncestralDiscreteScheduler {
            pred,
            spacing: config.spacing_or(Spacing::Linspace)?,
            config,
            train_sigmas: schedule::train_sigmas(&ac),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            begin_index: 0,
        })
    }

    /// `(sigma_up, sigma_down)` of the step from `step_index`.
    fn up_down(&self, step_index: usize) -> (f64, f64) {
        let from = self.sigmas[step_index];
        let to = self.sigmas[step_index + 1];
        let up = (to * to * (from * from - to * to) / (from * from))
            .max(0.0)
            .sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        (up, down)
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn name(&self) -> &'static str {
        "euler_a"
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::invalid_argument(
                "num_inference_steps must be at least 1",
            ));
        }
        self.timesteps = schedule::spacing_float(&self.config, self.spacing, n);
        let mut sigmas: Vec<f64> = self
            .timesteps
            .iter()
            .map(|&t| f32r(schedule::interp_index(t, &self.train_sigmas)))
            .collect();
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.begin_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = if self.sigmas.is_empty() {
            self.train_sigmas.iter().copied().fold(0.0, f64::max)
        } else {
            self.sigmas.iter().copied().fold(0.0, f64::max)
        };
        match self.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => f32r((max * max + 1.0).sqrt()),
        }
    }

    fn input_scale(&self, step_index: usize) -> Result<f64> {
        check_step("euler_a", step_index, self.timesteps.len())?;
        let s = self.sigmas[step_index];
        Ok(1.0 / (s * s + 1.0).sqrt())
    }

    fn linear_step(&mut self, step_index: usize) -> Result<LinearStep> {
        check_step("euler_a", step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        let (up, down) = self.up_down(step_index);
        let dt = down - sigma;
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let (x0_sample, x0_model) = match self.pred {
            Prediction::VPrediction => (alpha * alpha, -sigma * alpha),
            _ => (1.0, -sigma),
        };
        // prev = x + (x - x0) / sigma * dt + noise * sigma_up
        Ok(LinearStep {
            x0_sample,
            x0_model,
            prev_sample: 1.0 + dt / sigma,
            prev_x0: -dt / sigma,
            prev_noise: up,
            ..LinearStep::default()
        })
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        check_step("euler_a", step_index, self.timesteps.len())?;
        check_len("noise", noise.len(), original.len())?;
        let s = self.sigmas[step_index];
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&o, &z)| (f64::from(o) + f64::from(z) * s) as f32)
            .collect())
    }

    fn needs_noise(&self, _step_index: usize) -> bool {
        true
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = begin_index;
    }

    fn begin_index(&self) -> usize {
        self.begin_index
    }
}
