//! Euler sampler (Karras et al. 2022, Algorithm 2 without churn).
//!
//! Port of `EulerDiscreteScheduler` in
//! `diffusers/src/diffusers/schedulers/scheduling_euler_discrete.py` at v0.42.1:
//! `set_timesteps` (linspace / leading / trailing spacing, linear sigma
//! interpolation, Karras sigmas, `final_sigmas_type`, continuous v-prediction
//! timesteps), `scale_model_input`, `step` with `s_churn = 0` (deterministic) and
//! `add_noise`. Exponential / beta sigmas and `log_linear` interpolation are refused.

use super::schedule::{self, f32r, TrainScheduleOpts};
use super::{check_len, check_step, LinearStep, Prediction, Scheduler, SchedulerConfig, Spacing};
use crate::error::{Error, Result};

/// diffusers `EulerDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: SchedulerConfig,
    pred: Prediction,
    spacing: Spacing,
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    begin_index: usize,
}

impl EulerDiscreteScheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.validate()?;
        config.refuse_unported_sigmas()?;
        if config.interpolation_type != "linear" {
            return Err(Error::unsupported(format!(
                "scheduler config: field `interpolation_type`: {:?} is not supported (only \"linear\")",
                config.interpolation_type
            )));
        }
        if !matches!(config.timestep_type.as_str(), "discrete" | "continuous") {
            return Err(Error::invalid_model(format!(
                "scheduler config: field `timestep_type`: unsupported value {:?}",
                config.timestep_type
            )));
        }
        config.final_sigma_min()?;
        let alphas_cumprod = schedule::alphas_cumprod(
            &config,
            TrainScheduleOpts {
                zero_snr_floor: true,
            },
        )?;
        let train_sigmas = schedule::train_sigmas(&alphas_cumprod);
        Ok(EulerDiscreteScheduler {
            pred: config.prediction()?,
            spacing: config.spacing_or(Spacing::Linspace)?,
            config,
            alphas_cumprod,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            begin_index: 0,
        })
    }

    fn continuous_v(&self) -> bool {
        self.config.timestep_type == "continuous" && self.pred == Prediction::VPrediction
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn name(&self) -> &'static str {
        "euler"
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
        let mut timesteps = schedule::spacing_float(&self.config, self.spacing, n);
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| schedule::interp_index(t, &self.train_sigmas))
            .collect();
        if self.config.use_karras_sigmas {
            let log_sigmas = schedule::log_sigmas_f32(&self.train_sigmas);
            let smin = self
                .config
                .sigma_min
                .unwrap_or_else(|| *sigmas.last().expect("n >= 1"));
            let smax = self.config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = schedule::karras_sigmas(smin, smax, n);
            timesteps = sigmas
                .iter()
                .map(|&s| f32r(schedule::sigma_to_t(s, &log_sigmas)))
                .collect();
        }
        let last = if self.config.final_sigma_min()? {
            let a = self.alphas_cumprod[0];
            f64::from(((1.0f32 - a) / a).sqrt())
        } else {
            0.0
        };
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
        if self.continuous_v() {
            timesteps = sigmas[..n].iter().map(|&s| f32r(0.25 * s.ln())).collect();
        }
        self.timesteps = timesteps;
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
        check_step("euler", step_index, self.timesteps.len())?;
        let s = self.sigmas[step_index];
        Ok(1.0 / (s * s + 1.0).sqrt())
    }

    fn linear_step(&mut self, step_index: usize) -> Result<LinearStep> {
        check_step("euler", step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        let dt = self.sigmas[step_index + 1] - sigma;
        // derivative d = (x - x0) / sigma; prev = x + d * dt
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let (x0_sample, x0_model) = match self.pred {
            // x0 = x - sigma * eps (the Euler family's sample is the VE one)
            Prediction::Epsilon => (1.0, -sigma),
            // x0 = v * (-sigma / sqrt(c)) + x / c, c = sigma^2 + 1
            Prediction::VPrediction => (alpha * alpha, -sigma * alpha),
            Prediction::Sample => (0.0, 1.0),
        };
        Ok(LinearStep {
            x0_sample,
            x0_model,
            prev_sample: 1.0 + dt / sigma,
            prev_x0: -dt / sigma,
            ..LinearStep::default()
        })
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        check_step("euler", step_index, self.timesteps.len())?;
        check_len("noise", noise.len(), original.len())?;
        let s = self.sigmas[step_index];
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&o, &z)| (f64::from(o) + f64::from(z) * s) as f32)
            .collect())
    }

    fn needs_noise(&self, _step_index: usize) -> bool {
        false
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = begin_index;
    }

    fn begin_index(&self) -> usize {
        self.begin_index
    }
}
