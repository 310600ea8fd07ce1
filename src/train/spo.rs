//! SPO's per-step math, on host arrays: the DDIM transition with eta, its
//! Gaussian log-probability (a mean over C*H*W, as the official code takes
//! it), the clamped-ratio preference loss of a (win, lose) pair against a
//! frozen reference, and the loss's cotangent with respect to the UNet
//! outputs, through the DDIM mean and the classifier-free-guidance split.
//!
//! For one branch with timestep t, previous timestep p (alpha-bars a_t, a_p):
//!   eps  = eps_u + w (eps_c - eps_u)
//!   x0   = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
//!   sig  = eta sqrt((1 - a_p) / (1 - a_t)) sqrt(1 - a_t / a_p)
//!   mu   = sqrt(a_p) x0 + sqrt(1 - a_p - sig^2) eps        (linear in eps)
//!   logp = mean[-(x_prev - mu)^2 / (2 sig^2)] - log sig - log sqrt(2 pi)
//!   log r = logp_policy - logp_ref, clamped to [log(1-e), log(1+e)]
//!   L    = -log sigmoid(beta (log r_win - log r_lose))
//! The cotangent dL/d[eps_u; eps_c] is what the gradient graphs take.

use ndarray::{ArrayD, ArrayViewD, Zip};

use crate::error::{Error, Result};

/// The DDIM coefficients of one transition t -> p.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdimStep {
    /// mu = a * x_t + c * eps.
    pub a: f64,
    pub c: f64,
    /// The transition's standard deviation.
    pub sigma: f64,
}

impl DdimStep {
    /// From the cumulative alphas at t and at the previous timestep (the
    /// final alpha-bar, usually 1, when there is none) and eta.
    pub fn new(alpha_bar_t: f64, alpha_bar_prev: f64, eta: f64) -> Result<DdimStep> {
        let ok = |v: f64| v.is_finite() && v > 0.0 && v <= 1.0;
        if !(ok(alpha_bar_t) && ok(alpha_bar_prev) && eta.is_finite() && eta >= 0.0) {
            return Err(Error::invalid_argument(format!(
                "DDIM step: alpha-bars {alpha_bar_t} / {alpha_bar_prev} must be in (0, 1] and \
                 eta {eta} finite and >= 0"
            )));
        }
        let variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t).max(f64::MIN_POSITIVE)
            * (1.0 - alpha_bar_t / alpha_bar_prev);
        let sigma = eta * variance.max(0.0).sqrt();
        let dir = (1.0 - alpha_bar_prev - sigma * sigma).max(0.0).sqrt();
        let (st, sp) = (alpha_bar_t.sqrt(), alpha_bar_prev.sqrt());
        Ok(DdimStep {
            a: sp / st,
            c: dir - sp * (1.0 - alpha_bar_t).sqrt() / st,
            sigma,
        })
    }

    /// The transition mean for `x_t` and the guided `eps`.
    pub fn mean(&self, x_t: &ArrayViewD<f32>, eps: &ArrayViewD<f32>) -> ArrayD<f32> {
        let (a, c) = (self.a as f32, self.c as f32);
        Zip::from(x_t).and(eps).map_collect(|x, e| a * x + c * e)
    }

    /// log p(x_prev | x_t) with mean `mu`: a mean over the elements.
    pub fn log_prob(&self, x_prev: &ArrayViewD<f32>, mu: &ArrayViewD<f32>) -> f64 {
        let s2 = self.sigma * self.sigma;
        let n = x_prev.len() as f64;
        let sq: f64 = x_prev
            .iter()
            .zip(mu)
            .map(|(x, m)| (*x as f64 - *m as f64).powi(2))
            .sum();
        -sq / n / (2.0 * s2) - self.sigma.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
    }
}

/// Classifier-free guidance: `eps_u + w (eps_c - eps_u)`.
pub fn guide(eps_u: &ArrayViewD<f32>, eps_c: &ArrayViewD<f32>, w: f32) -> ArrayD<f32> {
    Zip::from(eps_u)
        .and(eps_c)
        .map_collect(|u, c| u + w * (c - u))
}

/// The loss constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub beta: f64,
    /// The ratio is clamped to [1 - clip, 1 + clip].
    pub clip: f64,
    pub guidance: f32,
}

/// One branch (win or lose) of a pair: its transition and the UNet outputs.
pub struct Branch<'a> {
    pub x_t: ArrayViewD<'a, f32>,
    pub x_prev: ArrayViewD<'a, f32>,
    /// Policy UNet outputs, unconditional and conditional.
    pub eps_u: ArrayViewD<'a, f32>,
    pub eps_c: ArrayViewD<'a, f32>,
    /// Reference UNet outputs.
    pub ref_u: ArrayViewD<'a, f32>,
    pub ref_c: ArrayViewD<'a, f32>,
}

/// A pair's loss and what it contributes to the gradient.
#[derive(Debug, Clone)]
pub struct PairLoss {
    pub loss: f64,
    /// log r of win and lose before clamping.
    pub log_ratio: [f64; 2],
    /// Whether each branch passes a gradient (its ratio inside the clamp);
    /// an inactive branch's cotangents are zero.
    pub active: [bool; 2],
    /// The cotangents dL/d eps_u and dL/d eps_c of win and lose, each
    /// already divided by `pairs` (the loss is a mean over the batch).
    pub cot_u: [ArrayD<f32>; 2],
    pub cot_c: [ArrayD<f32>; 2],
}

/// The clamped-ratio loss of one (win, lose) pair and its cotangents, for a
/// batch of `pairs` pairs (the loss is their mean). Both branches share the
/// step `step`.
pub fn pair_loss<'a>(
    step: &DdimStep,
    cfg: &LossConfig,
    win: &Branch<'a>,
    lose: &Branch<'a>,
    pairs: usize,
) -> Result<PairLoss> {
    if step.sigma <= 0.0 {
        return Err(Error::invalid_argument(
            "SPO loss: the DDIM step has sigma 0 (eta 0 or the last step); log-probabilities \
             need eta > 0",
        ));
    }
    let branches = [win, lose];
    let mut mu = Vec::with_capacity(2);
    let mut log_ratio = [0.0; 2];
    for (i, b) in branches.iter().enumerate() {
        check_shapes(b)?;
        let eps = guide(&b.eps_u, &b.eps_c, cfg.guidance);
        let eps_ref = guide(&b.ref_u, &b.ref_c, cfg.guidance);
        let m = step.mean(&b.x_t, &eps.view());
        let m_ref = step.mean(&b.x_t, &eps_ref.view());
        log_ratio[i] =
            step.log_prob(&b.x_prev, &m.view()) - step.log_prob(&b.x_prev, &m_ref.view());
        mu.push(m);
    }
    let (lo, hi) = ((1.0 - cfg.clip).ln(), (1.0 + cfg.clip).ln());
    let clamped = log_ratio.map(|l| l.clamp(lo, hi));
    let z = cfg.beta * (clamped[0] - clamped[1]);
    // -log sigmoid(z) = softplus(-z), computed stably.
    let loss = (-z).max(0.0) + (-z.abs()).exp().ln_1p();
    // dL/dz = -(1 - sigmoid(z)) = -sigmoid(-z).
    let dz = -1.0 / (1.0 + z.exp());
    let scale = 1.0 / pairs as f64;
    let mut cot_u = Vec::with_capacity(2);
    let mut cot_c = Vec::with_capacity(2);
    // Inside the clamp, log r passes the gradient (torch's clamp passes it
    // at the bounds too); outside it is cut.
    let active = log_ratio.map(|l| (lo..=hi).contains(&l));
    for (i, b) in branches.iter().enumerate() {
        let inside = active[i];
        let sign = if i == 0 { 1.0 } else { -1.0 };
        let d_logr = if inside {
            dz * cfg.beta * sign * scale
        } else {
            0.0
        };
        // d log r / d mu = (x_prev - mu) / (sigma^2 N); d mu / d eps = c.
        let k = (d_logr * step.c / (step.sigma * step.sigma * b.x_prev.len() as f64)) as f32;
        let g: ArrayD<f32> = Zip::from(&b.x_prev)
            .and(&mu[i])
            .map_collect(|x, m| k * (x - m));
        let w = cfg.guidance;
        cot_u.push(g.mapv(|v| (1.0 - w) * v));
        cot_c.push(g.mapv(|v| w * v));
    }
    let two = |v: Vec<ArrayD<f32>>| -> [ArrayD<f32>; 2] {
        let mut it = v.into_iter();
        [it.next().expect("two"), it.next().expect("two")]
    };
    Ok(PairLoss {
        loss: loss * scale,
        log_ratio,
        active,
        cot_u: two(cot_u),
        cot_c: two(cot_c),
    })
}

fn check_shapes(b: &Branch) -> Result<()> {
    let s = b.x_t.shape();
    let all = [&b.x_prev, &b.eps_u, &b.eps_c, &b.ref_u, &b.ref_c];
    if let Some(bad) = all.iter().find(|a| a.shape() != s) {
        return Err(Error::invalid_argument(format!(
            "SPO loss: a branch mixes shapes {s:?} and {:?}",
            bad.shape()
        )));
    }
    Ok(())
}
