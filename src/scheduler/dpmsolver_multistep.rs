//! DPM-Solver++ (Lu et al. 2022), multistep, order 2 ("DPM++ 2M"), optionally
//! with Karras sigmas ("DPM++ 2M Karras").
//!
//! Port of `DPMSolverMultistepScheduler` in
//! `diffusers/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py` at
//! v0.42.1 for `algorithm_type = "dpmsolver++"`, `solver_order` 1 or 2,
//! `solver_type` midpoint or heun: `set_timesteps` (spacing, `lambda_min_clipped`,
//! Karras sigmas with rounded timesteps, `final_sigmas_type` zero / sigma_min),
//! `convert_model_output`, the first- and second-order updates, the
//! `lower_order_final` / `euler_at_final` rules and `add_noise`. The SDE variants
//! and order 3 are refused.
//!
//! The scheduler keeps the previous data prediction, so steps must be taken in
//! order; `set_timesteps` and `set_begin_index` clear that state.

use super::schedule::{self, f32r, TrainScheduleOpts};
use super::{
    check_len, check_step, BetaSchedule, LinearStep, Prediction, Scheduler, SchedulerConfig,
    Spacing,
};
use crate::error::{Error, Result};

/// diffusers `DPMSolverMultistepScheduler` (DPM-Solver++ 1S / 2M).
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    name: &'static str,
    config: SchedulerConfig,
    pred: Prediction,
    spacing: Spacing,
    heun: bool,
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    begin_index: usize,
    /// The previous step's data prediction (host stepping through [`Scheduler::step`]).
    last_x0: Option<Vec<f32>>,
    lower_order_nums: usize,
    next_step: Option<usize>,
}

impl DpmSolverMultistepScheduler {
    /// `name` is what [`Scheduler::name`] reports (`dpmpp_2m` or `dpmpp_2m_karras`).
    pub fn new(config: SchedulerConfig, name: &'static str) -> Result<Self> {
        config.validate()?;
        config.refuse_unported_sigmas()?;
        if config.algorithm_type != "dpmsolver++" {
            return Err(Error::unsupported(format!(
                "scheduler config: field `algorithm_type`: {:?} is not supported (only \"dpmsolver++\")",
                config.algorithm_type
            )));
        }
        let heun = match config.solver_type.as_str() {
            "midpoint" => false,
            "heun" => true,
            v => {
                return Err(Error::unsupported(format!(
                "scheduler config: field `solver_type`: {v:?} is not supported (midpoint or heun)"
            )))
            }
        };
        if !(1..=2).contains(&config.solver_order) {
            return Err(Error::unsupported(format!(
                "scheduler config: field `solver_order`: {} is not supported (1 or 2)",
                config.solver_order
            )));
        }
        if let Some(v) = config.variance_type.as_deref() {
            return Err(Error::unsupported(format!(
                "scheduler config: field `variance_type`: {v:?} is not supported by dpmpp_2m"
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
        Ok(DpmSolverMultistepScheduler {
            name,
            pred: config.prediction()?,
            spacing: config.spacing_or(Spacing::Linspace)?,
            heun,
            last_x0: None,
            config,
            alphas_cumprod,
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            begin_index: 0,
            lower_order_nums: 0,
            next_step: None,
        })
    }

    fn reset_state(&mut self) {
        self.last_x0 = None;
        self.lower_order_nums = 0;
        self.next_step = None;
    }

    /// `last_timestep = num_train_timesteps - searchsorted(flip(lambda_t), lambda_min_clipped)`.
    fn last_timestep(&self) -> usize {
        let nt = self.config.num_train_timesteps;
        let Some(clip) = self.config.lambda_min_clipped else {
            return nt;
        };
        let clipped = self
            .alphas_cumprod
            .iter()
            .rev()
            .filter(|&&a| {
                let lambda = a.sqrt().ln() - (1.0f32 - a).sqrt().ln();
                f64::from(lambda) < clip
            })
            .count();
        nt - clipped
    }

    fn int_spacing(&self, n: usize) -> Vec<f64> {
        let last = self.last_timestep();
        let offset = self.config.steps_offset as f64;
        let v: Vec<f64> = match self.spacing {
            Spacing::Linspace => {
                let mut v: Vec<f64> = schedule::np_linspace(0.0, last as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(schedule::np_round)
                    .collect();
                v.reverse();
                v.truncate(n);
                v
            }
            Spacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n).rev().map(|i| (i * ratio) as f64 + offset).collect()
            }
            Spacing::Trailing => {
                let ratio = self.config.num_train_timesteps as f64 / n as f64;
                schedule::np_arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| schedule::np_round(t) - 1.0)
                    .collect()
            }
        };
        v.into_iter().map(|t| t.trunc()).collect()
    }

    /// `(alpha_t, sigma_t)` of the VP process for the sigma `s` (`_sigma_to_alpha_sigma_t`).
    fn alpha_sigma(s: f64) -> (f64, f64) {
        let a = 1.0 / (s * s + 1.0).sqrt();
        (a, s * a)
    }

    fn lambda(s: f64) -> f64 {
        let (a, sg) = Self::alpha_sigma(s);
        a.ln() - sg.ln()
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn name(&self) -> &'static str {
        self.name
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
        let mut timesteps = self.int_spacing(n);
        let mut sigmas: Vec<f64> = if self.config.use_karras_sigmas {
            let log_sigmas = schedule::log_sigmas_f32(&self.train_sigmas);
            // The class has no sigma_min / sigma_max config fields, so diffusers
            // always uses the full training range here.
            let smin = self.train_sigmas[0];
            let smax = self.train_sigmas[self.train_sigmas.len() - 1];
            let sig = schedule::karras_sigmas(smin, smax, n);
            let round = self.config.beta_schedule()? != BetaSchedule::SquaredCosCapV2;
            timesteps = sig
                .iter()
                .map(|&s| {
                    let t = schedule::sigma_to_t(s, &log_sigmas);
                    if round {
                        schedule::np_round(t)
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            sig
        } else {
            timesteps
                .iter()
                .map(|&t| schedule::interp_index(t, &self.train_sigmas))
                .collect()
        };
        let last = if self.config.final_sigma_min()? {
            let a = self.alphas_cumprod[0];
            f64::from(((1.0f32 - a) / a).sqrt())
        } else {
            0.0
        };
        sigmas.push(last);
        self.sigmas = sigmas.into_iter().map(f32r).collect();
        self.timesteps = timesteps;
        self.begin_index = 0;
        self.reset_state();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn input_scale(&self, step_index: usize) -> Result<f64> {
        check_step(self.name, step_index, self.timesteps.len())?;
        Ok(1.0)
    }

    fn linear_step(&mut self, step_index: usize) -> Result<LinearStep> {
        let n = self.timesteps.len();
        check_step(self.name, step_index, n)?;
        if let Some(want) = self.next_step {
            if step_index != want {
                return Err(Error::invalid_argument(format!(
                    "{}: steps must be taken in order: expected step {want}, got {step_index} \
                     (call set_timesteps or set_begin_index to restart)",
                    self.name
                )));
            }
        }
        let order = self.config.solver_order;
        let final_zero = !self.config.final_sigma_min()?;
        let lof = self.config.lower_order_final.unwrap_or(true);
        let lower_order_final =
            step_index == n - 1 && (self.config.euler_at_final || (lof && n < 15) || final_zero);
        // diffusers' `lower_order_second` only matters for solver_order 3, which is refused.

        // convert_model_output: the data prediction x0.
        let s0 = self.sigmas[step_index];
        let (alpha_s0, sigma_s0) = Self::alpha_sigma(s0);
        let (x0_sample, x0_model) = LinearStep::x0_of(self.pred, alpha_s0, sigma_s0);

        let st = self.sigmas[step_index + 1];
        let (alpha_t, sigma_t) = Self::alpha_sigma(st);
        let lambda_t = alpha_t.ln() - sigma_t.ln();
        let lambda_s0 = alpha_s0.ln() - sigma_s0.ln();
        let h = lambda_t - lambda_s0;
        let em1 = (-h).exp() - 1.0;
        // First order: prev = (sigma_t / sigma_s0) * x - alpha_t * em1 * D0.
        let mut step = LinearStep {
            x0_sample,
            x0_model,
            prev_sample: sigma_t / sigma_s0,
            prev_x0: -alpha_t * em1,
            ..LinearStep::default()
        };
        if !(order == 1 || self.lower_order_nums < 1 || lower_order_final) {
            // Second order adds a multiple of D1 = (D0 - D_prev) / r0.
            let lambda_s1 = Self::lambda(self.sigmas[step_index - 1]);
            let r0 = (lambda_s0 - lambda_s1) / h;
            let d1 = if self.heun {
                alpha_t * (em1 / h + 1.0)
            } else {
                -0.5 * (alpha_t * em1)
            } / r0;
            step.prev_x0 += d1;
            step.prev_history = -d1;
        }
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.next_step = Some(step_index + 1);
        Ok(step)
    }

    fn history(&self) -> Option<&[f32]> {
        self.last_x0.as_deref()
    }

    fn keep_history(&mut self, x0: &[f32]) {
        self.last_x0 = Some(x0.to_vec());
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        check_step(self.name, step_index, self.timesteps.len())?;
        check_len("noise", noise.len(), original.len())?;
        let (a, s) = Self::alpha_sigma(self.sigmas[step_index]);
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&o, &z)| (a * f64::from(o) + s * f64::from(z)) as f32)
            .collect())
    }

    fn needs_noise(&self, _step_index: usize) -> bool {
        false
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = begin_index;
        self.reset_state();
    }

    fn begin_index(&self) -> usize {
        self.begin_index
    }
}
