//! The SPO trainer's settings: every constant of the official algorithm is an
//! option (`train.<name>`), grouped in presets. A preset is applied first and
//! the options given beside it override it, whatever their order.
//!
//! - `sdxl` (the default): the official SDXL run (20 DDIM steps, eta 1, CFG 5,
//!   pools of 2 every 4th step from step 4, threshold 0.4, beta 10, clip 0.1,
//!   AdamW 1e-5 / (0.9, 0.999) / 1e-4 / 1e-8, batches of 2 pairs, 2
//!   accumulations, seed 42);
//! - `sd15`: the official SD 1.5 run (pools of 4 at every step, threshold 0.3,
//!   lr 6e-5, batches of 10, no accumulation);
//! - `toy`: the tiny-model world of the tests (10 steps, pools of 4 at every
//!   step from step 2, a larger learning rate and trust region).
//!
//! One decision differs from the official code on purpose: gradient clipping
//! really clips (`train.grad_clip=norm`); `train.grad_clip=official`
//! reproduces the official code, whose clipping call does nothing.

use std::path::PathBuf;

use super::optim::{AdamWConfig, Clip};
use crate::error::{Error, ErrorCode, Result};
use crate::options::Options;

/// Option keys are `train.` plus one of these names.
pub const OPTION_PREFIX: &str = "train.";

/// The named presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Sdxl,
    Sd15,
    Toy,
}

impl Preset {
    pub fn parse(s: &str) -> Option<Preset> {
        match s {
            "sdxl" => Some(Preset::Sdxl),
            "sd15" => Some(Preset::Sd15),
            "toy" => Some(Preset::Toy),
            _ => None,
        }
    }
}

/// Every SPO constant. Field names are the option names after `train.`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// DDIM inference steps of a sampled trajectory.
    pub steps: usize,
    pub eta: f64,
    pub guidance: f64,
    /// Candidates per pool (`num_sample_each_step`).
    pub pool: usize,
    /// Steps each candidate runs alone after its pool (`num_inner_step`):
    /// pools form every `inner_steps + 1` steps.
    pub inner_steps: usize,
    /// Steps before the first pool (`divert_start_step`); never trained.
    pub divert_start: usize,
    /// A pool yields a pair when softmax(win, lose) differs by more than this.
    pub threshold: f64,
    /// Prompts sampled per round (`sample_batch_size`).
    pub prompts_per_round: usize,
    /// Loss: beta and the ratio clamp epsilon.
    pub beta: f64,
    pub clip: f64,
    pub lr: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub weight_decay: f64,
    pub adam_eps: f64,
    /// Pairs per mini-batch, and mini-batches per optimizer step.
    pub batch: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    /// `true`: clip to `max_grad_norm`; `false`: the official no-op.
    pub clip_grad: bool,
    pub seed: u64,
    /// Standard deviation of the initial LoRA A (B starts at zero, so the
    /// policy starts as the reference); `None`: PEFT's gaussian, 1 / rank.
    pub init_std: Option<f64>,
}

impl TrainConfig {
    pub fn preset(p: Preset) -> TrainConfig {
        let sdxl = TrainConfig {
            steps: 20,
            eta: 1.0,
            guidance: 5.0,
            pool: 2,
            inner_steps: 3,
            divert_start: 4,
            threshold: 0.4,
            prompts_per_round: 2,
            beta: 10.0,
            clip: 0.1,
            lr: 1e-5,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            weight_decay: 1e-4,
            adam_eps: 1e-8,
            batch: 2,
            grad_accum: 2,
            max_grad_norm: 1.0,
            clip_grad: true,
            seed: 42,
            init_std: None,
        };
        match p {
            Preset::Sdxl => sdxl,
            Preset::Sd15 => TrainConfig {
                pool: 4,
                inner_steps: 0,
                threshold: 0.3,
                prompts_per_round: 10,
                lr: 6e-5,
                batch: 10,
                grad_accum: 1,
                ..sdxl
            },
            Preset::Toy => TrainConfig {
                steps: 10,
                pool: 4,
                inner_steps: 0,
                divert_start: 2,
                threshold: 0.1,
                prompts_per_round: 4,
                clip: 0.5,
                lr: 3e-3,
                batch: 4,
                grad_accum: 1,
                ..sdxl
            },
        }
    }

    /// Sets one option (`name` without the prefix); the error names the key.
    fn set(&mut self, name: &str, v: &str) -> Result<()> {
        let key = format!("{OPTION_PREFIX}{name}");
        let bad = |what: &str| {
            Error::new(
                ErrorCode::InvalidOptionValue,
                format!("option '{key}': '{v}' is not {what}"),
            )
        };
        let int = || v.trim().parse::<usize>().map_err(|_| bad("an integer"));
        let num = || {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad("a finite number"))
        };
        match name {
            "steps" => self.steps = int()?,
            "eta" => self.eta = num()?,
            "guidance" => self.guidance = num()?,
            "pool" => self.pool = int()?,
            "inner_steps" => self.inner_steps = int()?,
            "divert_start" => self.divert_start = int()?,
            "threshold" => self.threshold = num()?,
            "prompts_per_round" => self.prompts_per_round = int()?,
            "beta" => self.beta = num()?,
            "clip" => self.clip = num()?,
            "lr" => self.lr = num()?,
            "adam_beta1" => self.adam_beta1 = num()?,
            "adam_beta2" => self.adam_beta2 = num()?,
            "weight_decay" => self.weight_decay = num()?,
            "adam_eps" => self.adam_eps = num()?,
            "batch" => self.batch = int()?,
            "grad_accum" => self.grad_accum = int()?,
            "max_grad_norm" => self.max_grad_norm = num()?,
            "grad_clip" => {
                self.clip_grad = match v {
                    "norm" => true,
                    "official" => false,
                    _ => return Err(bad("norm or official")),
                }
            }
            "seed" => self.seed = v.trim().parse().map_err(|_| bad("an integer"))?,
            "init_std" => self.init_std = Some(num()?),
            _ => {
                return Err(Error::new(
                    ErrorCode::UnknownOption,
                    format!("unknown option key '{key}'"),
                ))
            }
        }
        Ok(())
    }

    /// Ranges that make the algorithm meaningful; the error names the key.
    pub fn check(&self) -> Result<()> {
        let fail = |name: &str, why: &str| {
            Err(Error::new(
                ErrorCode::InvalidOptionValue,
                format!("option '{OPTION_PREFIX}{name}': {why}"),
            ))
        };
        if !(2..=1000).contains(&self.steps) {
            return fail("steps", "must be in 2..=1000");
        }
        if self.divert_start >= self.steps {
            return fail("divert_start", "must be below train.steps");
        }
        if !(2..=64).contains(&self.pool) {
            return fail("pool", "must be in 2..=64");
        }
        if self.inner_steps >= self.steps {
            return fail("inner_steps", "must be below train.steps");
        }
        if !(1..=4096).contains(&self.prompts_per_round) {
            return fail("prompts_per_round", "must be in 1..=4096");
        }
        if !(1..=4096).contains(&self.batch) || !(1..=4096).contains(&self.grad_accum) {
            return fail("batch", "batch and grad_accum must be in 1..=4096");
        }
        if self.eta <= 0.0 {
            return fail("eta", "must be > 0 (the log-probabilities need noise)");
        }
        if !(0.0..1.0).contains(&self.threshold) {
            return fail("threshold", "must be in [0, 1)");
        }
        if !(self.clip > 0.0 && self.clip < 1.0) {
            return fail("clip", "must be in (0, 1)");
        }
        if self.beta <= 0.0 || self.max_grad_norm <= 0.0 {
            return fail("beta", "beta and max_grad_norm must be > 0");
        }
        if self.init_std.is_some_and(|s| s < 0.0) {
            return fail("init_std", "must be >= 0");
        }
        Ok(())
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            weight_decay: self.weight_decay,
            eps: self.adam_eps,
        }
    }

    pub fn grad_clip(&self) -> Clip {
        if self.clip_grad {
            Clip::Norm(self.max_grad_norm)
        } else {
            Clip::OfficialNoOp
        }
    }

    /// The first step of each pool, and the step after its segment. The final
    /// step never opens a pool of its own: a segment that would end one step
    /// short of the end runs to the end (the official SD 1.5 schedule, where
    /// step 19 shares the final image's label with step 18).
    pub fn segments(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut i = self.divert_start;
        while i < self.steps {
            let mut end = (i + self.inner_steps + 1).min(self.steps);
            if end + 1 == self.steps {
                end = self.steps;
            }
            out.push((i, end));
            i = end;
        }
        out
    }
}

/// What `spo_trainer_create` takes: the training folder, the preference
/// model and the settings.
#[derive(Debug, Clone)]
pub struct TrainerSpec {
    pub train_dir: PathBuf,
    pub preference: PathBuf,
    pub config: TrainConfig,
}

impl TrainerSpec {
    /// From options: `train.dir`, `train.preference`, `train.preset` and any
    /// `train.<setting>`.
    pub fn from_options(o: &Options) -> Result<TrainerSpec> {
        o.check_consumer("trainer", "spo_trainer_create")?;
        let preset = o
            .parse(
                &format!("{OPTION_PREFIX}preset"),
                "sdxl, sd15 or toy",
                Preset::parse,
            )?
            .unwrap_or(Preset::Sdxl);
        let mut config = TrainConfig::preset(preset);
        let mut dir = None;
        let mut preference = None;
        for (k, v) in o.iter() {
            let name = k.strip_prefix(OPTION_PREFIX).unwrap_or(k);
            match name {
                "preset" => {}
                "dir" => dir = Some(PathBuf::from(v)),
                "preference" => preference = Some(PathBuf::from(v)),
                _ => config.set(name, v)?,
            }
        }
        config.check()?;
        let required = |v: Option<PathBuf>, name: &str| {
            v.ok_or_else(|| {
                Error::new(
                    ErrorCode::InvalidOptionValue,
                    format!("option '{OPTION_PREFIX}{name}' is required"),
                )
            })
        };
        Ok(TrainerSpec {
            train_dir: required(dir, "dir")?,
            preference: required(preference, "preference")?,
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_segments() {
        let sdxl = TrainConfig::preset(Preset::Sdxl);
        assert_eq!(sdxl.segments(), vec![(4, 8), (8, 12), (12, 16), (16, 20)]);
        let sd15 = TrainConfig::preset(Preset::Sd15);
        let s = sd15.segments();
        assert_eq!(s.first(), Some(&(4, 5)));
        assert_eq!(s.last(), Some(&(18, 20)));
        assert_eq!(s.len(), 15);
    }

    #[test]
    fn options_override_the_preset_and_name_bad_keys() {
        let o = Options::from_pairs([
            ("train.lr", "0.5"),
            ("train.preset", "sd15"),
            ("train.dir", "d"),
            ("train.preference", "p"),
        ])
        .unwrap();
        let s = TrainerSpec::from_options(&o).unwrap();
        assert_eq!(s.config.lr, 0.5);
        assert_eq!(s.config.pool, 4);
        let o = Options::from_pairs([("train.lrr", "1")]).unwrap();
        let e = TrainerSpec::from_options(&o).unwrap_err();
        assert!(e.message.contains("'train.lrr'"), "{}", e.message);
        let o = Options::from_pairs([("train.pool", "1"), ("train.dir", "d")]).unwrap();
        let e = TrainerSpec::from_options(&o).unwrap_err();
        assert!(e.message.contains("'train.pool'"), "{}", e.message);
    }
}
