//! DDPM ancestral sampling (Ho et al. 2020).
//!
//! Port of `DDPMScheduler` in
//! `diffusers/src/diffusers/schedulers/scheduling_ddpm.py` at v0.42.1
//! (`set_timesteps`, `previous_timestep`, `_get_variance`, `step`, `add_noise`)
//! for the variance types `fixed_small` (default), `fixed_small_log` and
//! `fixed_large`. The previous timestep is the next entry of the schedule
//! (-1 after the last); noise is drawn whenever the current timestep is > 0.

use super::schedule::{self, TrainScheduleOpts};
use super::{check_len, check_step, LinearStep, Prediction, Scheduler, SchedulerConfig, Spacing};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    Small,
    SmallLog,
    Large,
}

/// diffusers `DDPMScheduler`.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: SchedulerConfig,
    pred: Prediction,
    spacing: Spacing,
    variance: Variance,
    clip_sample: bool,
    alphas_cumprod: Vec<f32>,
    int_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    begin_index: usize,
}

impl DdpmScheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.validate()?;
        let variance = match config.variance_type.as_deref() {
            None | Some("fixed_small") => Variance::Small,
            Some("fixed_small_log") => Variance::SmallLog,
            Some("fixed_large") => Variance::Large,
            Some(v) => {
                return Err(Error::unsupported(format!(
                    "scheduler config: field `variance_type`: {v:?} is not supported by ddpm \
                     (fixed_small, fixed_small_log or fixed_large)"
                )))
            }
        };
        let alphas_cumprod = schedule::alphas_cumprod(
            &config,
            TrainScheduleOpts {
                zero_snr_floor: false,
            },
        )?;
        Ok(DdpmScheduler {
            pred: config.prediction()?,
            spacing: config.spacing_or(Spacing::Leading)?,
            clip_sample: config.clip_sample.unwrap_or(true),
            variance,
            config,
            alphas_cumprod,
            int_timesteps: Vec::new(),
            timesteps: Vec::new(),
            begin_index: 0,
        })
    }

    fn alpha_at(&self, t: i64) -> Result<f64> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i))
            .map(|&a| f64::from(a))
            .ok_or_else(|| {
                Error::invalid_model(format!("ddpm: timestep {t} outside the training schedule"))
            })
    }
}

impl Scheduler for DdpmScheduler {
    fn name(&self) -> &'static str {
        "ddpm"
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        if n == 0 || n > self.config.num_train_timesteps {
            return Err(Error::invalid_argument(format!(
                "ddpm: num_inference_steps must be in 1..={}, got {n}",
                self.config.num_train_timesteps
            )));
        }
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
        check_step("ddpm", step_index, self.timesteps.len())?;
        Ok(1.0)
    }

    fn linear_step(&mut self, step_index: usize) -> Result<LinearStep> {
        check_step("ddpm", step_index, self.timesteps.len())?;
        let t = self.int_timesteps[step_index];
        let prev_t = self
            .int_timesteps
            .get(step_index + 1)
            .copied()
            .unwrap_or(-1);
        let a_t = self.alpha_at(t)?;
        let a_prev = if prev_t >= 0 {
            self.alpha_at(prev_t)?
        } else {
            1.0
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let std = {
            let small = (b_prev / b_t * cur_beta).max(1e-20);
            match self.variance {
                Variance::Small => small.sqrt(),
                Variance::SmallLog => (0.5 * small.ln()).exp(),
                Variance::Large => cur_beta.sqrt(),
            }
        };
        let (x0_sample, x0_model) = LinearStep::x0_of(self.pred, a_t.sqrt(), b_t.sqrt());
        // prev = x0_coef * x0 + x_coef * x + std * noise (noise while t > 0)
        Ok(LinearStep {
            x0_sample,
            x0_model,
            clip: self.clip_sample.then_some(self.config.clip_sample_range),
            prev_sample: cur_alpha.sqrt() * b_prev / b_t,
            prev_x0: a_prev.sqrt() * cur_beta / b_t,
            prev_noise: if t > 0 { std } else { 0.0 },
            ..LinearStep::default()
        })
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        check_step("ddpm", step_index, self.timesteps.len())?;
        check_len("noise", noise.len(), original.len())?;
        let a = self.alpha_at(self.int_timesteps[step_index])?;
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&o, &z)| (sa * f64::from(o) + sb * f64::from(z)) as f32)
            .collect())
    }

    fn needs_noise(&self, step_index: usize) -> bool {
        self.int_timesteps.get(step_index).is_some_and(|&t| t > 0)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = begin_index;
    }

    fn begin_index(&self) -> usize {
        self.begin_index
    }
}
