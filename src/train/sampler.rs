//! SPO's sampling of one prompt, as the official code runs it: plain DDIM
//! steps up to `divert_start`; then, per segment, a pool of `pool` candidates
//! drawn from one guided UNet call at the shared latent (same mean,
//! independent noise), each denoised alone to the segment's end; the
//! candidates scored at the segment's end from the policy's x0 estimate (the
//! final image at timestep 0 in the last segment); win / lose by argmax /
//! argmin kept when softmax([win, lose]) differs by more than the threshold,
//! the label applying to every transition of the segment; and the next
//! shared latent chosen uniformly at random among the candidates, its noise
//! prediction reused for the next pool.
//!
//! The model calls are behind [`Denoiser`], so this file is the algorithm
//! alone, on host arrays.

use ndarray::{ArrayD, IxDyn};

use super::config::TrainConfig;
use super::spo::DdimStep;
use crate::error::{Error, Result};
use crate::memory;
use crate::pipeline::rng::TorchRng;
use crate::scheduler::ddim::DdimScheduler;
use crate::scheduler::{Scheduler, SchedulerConfig};

/// The DDIM schedule of a trajectory: timestep and transition per step.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub timesteps: Vec<i64>,
    /// Cumulative alpha at each step's timestep.
    pub alpha_bar: Vec<f64>,
    pub steps: Vec<DdimStep>,
}

impl Schedule {
    /// diffusers' `DDIMScheduler.from_config(<the model's config>)` with
    /// `steps` inference steps and `eta`.
    pub fn new(config: &SchedulerConfig, steps: usize, eta: f64) -> Result<Schedule> {
        let mut ddim = DdimScheduler::new(config.clone(), eta)?;
        ddim.set_timesteps(steps)?;
        let timesteps: Vec<i64> = ddim.timesteps().iter().map(|t| *t as i64).collect();
        let mut alpha_bar = Vec::with_capacity(steps);
        let mut out = Vec::with_capacity(steps);
        for i in 0..steps {
            let (a_t, a_prev) = ddim.alpha_bars(i)?;
            alpha_bar.push(a_t);
            out.push(DdimStep::new(a_t, a_prev, eta)?);
        }
        Ok(Schedule {
            timesteps,
            alpha_bar,
            steps: out,
        })
    }

    /// x0 = (x - sqrt(1 - a) eps) / sqrt(a) at step `i` (no clipping).
    pub fn x0(&self, i: usize, x: &ArrayD<f32>, eps: &ArrayD<f32>) -> ArrayD<f32> {
        let a = self.alpha_bar[i];
        let (k, c) = (
            (1.0 / a.sqrt()) as f32,
            (-(1.0 - a).sqrt() / a.sqrt()) as f32,
        );
        ndarray::Zip::from(x)
            .and(eps)
            .map_collect(|x, e| k * x + c * e)
    }
}

/// The models the sampler calls.
pub trait Denoiser {
    /// The policy's guided noise prediction for one latent [1,C,h,w] at step `i`.
    fn eps(&mut self, x: &ArrayD<f32>, i: usize) -> Result<ArrayD<f32>>;
    /// Preference scores of the images decoded from latents [n,C,h,w] (x0
    /// estimates, unscaled), at `timestep` (0 for final images).
    fn score(&mut self, x0: &ArrayD<f32>, timestep: i64) -> Result<Vec<f32>>;
    /// Called after each step of the trajectory; an error (cancellation) stops it.
    fn tick(&mut self) -> Result<()>;
}

/// A (win, lose) pair of transitions at the same step.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Index of the prompt in the round.
    pub prompt: usize,
    /// Step index (into [`Schedule`]).
    pub step: usize,
    pub x_t: [ArrayD<f32>; 2],
    pub x_prev: [ArrayD<f32>; 2],
}

/// What sampling one prompt gave.
#[derive(Debug, Default)]
pub struct Sampled {
    pub pairs: Vec<Pair>,
    /// Every candidate's score.
    pub scores: Vec<f32>,
    /// Per pool: best minus worst score.
    pub gaps: Vec<f64>,
    pub pools: usize,
    pub accepted: usize,
}

/// One branch's recorded transitions (step, x_t, x_prev).
type Branch = Vec<(usize, ArrayD<f32>, ArrayD<f32>)>;

/// Samples one prompt's trajectory with `den`, drawing noise and choices
/// from `rng`; `shape` is one latent's shape [1,C,h,w].
pub fn sample_prompt(
    den: &mut dyn Denoiser,
    schedule: &Schedule,
    cfg: &TrainConfig,
    prompt: usize,
    shape: &[usize],
    rng: &mut TorchRng,
) -> Result<Sampled> {
    let mut out = Sampled::default();
    let mut x = normal(rng, shape)?;
    for i in 0..cfg.divert_start {
        let eps = den.eps(&x, i)?;
        x = ddim_step(&schedule.steps[i], &x, &eps, rng, shape)?;
        den.tick()?;
    }
    let mut eps = den.eps(&x, cfg.divert_start)?;
    for (start, end) in cfg.segments() {
        let step = &schedule.steps[start];
        let mut cands: Vec<ArrayD<f32>> = (0..cfg.pool)
            .map(|_| ddim_step(step, &x, &eps, rng, shape))
            .collect::<Result<_>>()?;
        let mut branches: Vec<Branch> = cands
            .iter()
            .map(|c| vec![(start, x.clone(), c.clone())])
            .collect();
        den.tick()?;
        for s in start + 1..end {
            for (c, b) in cands.iter_mut().zip(&mut branches) {
                let e = den.eps(c, s)?;
                let next = ddim_step(&schedule.steps[s], c, &e, rng, shape)?;
                b.push((s, std::mem::replace(c, next.clone()), next));
            }
            den.tick()?;
        }
        let (scores, next_eps) = score_pool(den, schedule, &cands, end)?;
        out.pools += 1;
        let (w, l) = extremes(&scores);
        let gap = f64::from(scores[w]) - f64::from(scores[l]);
        out.gaps.push(gap);
        out.scores.extend_from_slice(&scores);
        // softmax([s_w, s_l]) gives p_w - p_l = tanh(gap / 2).
        if (gap / 2.0).tanh() > cfg.threshold {
            out.accepted += 1;
            for (bw, bl) in branches[w].iter().zip(&branches[l]) {
                out.pairs.push(Pair {
                    prompt,
                    step: bw.0,
                    x_t: [bw.1.clone(), bl.1.clone()],
                    x_prev: [bw.2.clone(), bl.2.clone()],
                });
            }
        }
        let r = rng.below(cfg.pool);
        x = cands.swap_remove(r);
        if let Some(mut e) = next_eps {
            eps = e.swap_remove(r);
        }
    }
    Ok(out)
}

/// A pool's scores and, before the trajectory's end, each candidate's
/// noise prediction at the scoring step.
type PoolScores = (Vec<f32>, Option<Vec<ArrayD<f32>>>);

/// Scores the candidates at step `end`: from the policy's x0 estimate there,
/// or the final latents at timestep 0 when the trajectory is over.
fn score_pool(
    den: &mut dyn Denoiser,
    schedule: &Schedule,
    cands: &[ArrayD<f32>],
    end: usize,
) -> Result<PoolScores> {
    let (x0, timestep, eps) = if end < schedule.steps.len() {
        let eps: Vec<ArrayD<f32>> = cands
            .iter()
            .map(|c| den.eps(c, end))
            .collect::<Result<_>>()?;
        let x0: Vec<ArrayD<f32>> = cands
            .iter()
            .zip(&eps)
            .map(|(c, e)| schedule.x0(end, c, e))
            .collect();
        (x0, schedule.timesteps[end], Some(eps))
    } else {
        (cands.to_vec(), 0, None)
    };
    let views: Vec<_> = x0.iter().map(|a| a.view()).collect();
    let batch = memory::concat(0, &views, "the batch of candidates")?;
    let scores = den.score(&batch, timestep)?;
    if scores.len() != cands.len() || scores.iter().any(|s| !s.is_finite()) {
        return Err(Error::invalid_model(format!(
            "the preference model gave {:?} for {} candidates: finite scores, one each, are needed",
            scores,
            cands.len()
        )));
    }
    Ok((scores, eps))
}

/// Indices of the highest and lowest score (the first of equals).
fn extremes(scores: &[f32]) -> (usize, usize) {
    let mut w = 0;
    let mut l = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[w] {
            w = i;
        }
        if *s < scores[l] {
            l = i;
        }
    }
    (w, l)
}

/// Standard normal latents of `shape`, allocated fallibly.
fn normal(rng: &mut TorchRng, shape: &[usize]) -> Result<ArrayD<f32>> {
    let n = memory::count::<f32>(shape, "the sampling noise")?;
    let z = rng.try_randn(n, "the sampling noise")?;
    Ok(ArrayD::from_shape_vec(IxDyn(shape), z).expect("sized"))
}

/// x_prev = mu(x, eps) + sigma z.
fn ddim_step(
    step: &DdimStep,
    x: &ArrayD<f32>,
    eps: &ArrayD<f32>,
    rng: &mut TorchRng,
    shape: &[usize],
) -> Result<ArrayD<f32>> {
    let mut next = step.mean(&x.view(), &eps.view());
    let sigma = step.sigma as f32;
    next.zip_mut_with(&normal(rng, shape)?, |m, z| *m += sigma * z);
    Ok(next)
}
