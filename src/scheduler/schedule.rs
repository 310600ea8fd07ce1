//! Noise-schedule arithmetic shared by the schedulers: betas, `alphas_cumprod`,
//! timestep spacing, sigma interpolation and Karras sigmas.
//!
//! Ported from the helpers repeated across
//! `diffusers/src/diffusers/schedulers/scheduling_*.py` at v0.42.1
//! (`betas_for_alpha_bar`, `rescale_zero_terminal_snr`, `set_timesteps`,
//! `_sigma_to_t`, `_convert_to_karras`), and from the numpy / torch primitives
//! they call, reproducing where diffusers rounds to float32 so that the
//! schedules agree with it to the last bit or nearly so:
//! `torch.linspace` (float32, fused multiply-add from both ends),
//! `torch.cumprod` (accumulated in double, stored as float32), `np.linspace`,
//! `np.arange` with a float step, `np.round` (ties to even) and `np.interp`.

use super::{BetaSchedule, SchedulerConfig, Spacing};
use crate::error::{Error, Result};

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: the first half
/// counts up from `start`, the second half down from `end`, each with one fused
/// multiply-add in float32.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, n)` in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// `np.arange(start, stop, step)` for a float step (numpy's length rule
/// `ceil((stop - start) / step)` and fill rule `start + i * (x1 - x0)`).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut v = Vec::with_capacity(len);
    v.push(start);
    if len > 1 {
        let next = start + step;
        v.push(next);
        let delta = next - start;
        for i in 2..len {
            v.push(start + i as f64 * delta);
        }
    }
    v
}

/// `np.round` (round half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn interp_index(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x <= 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// The per-class choices that change how the training schedule is built.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TrainScheduleOpts {
    /// Euler, Euler-ancestral and DPM-Solver set the last `alphas_cumprod` to
    /// 2^-24 after a zero-terminal-SNR rescale; DDIM and DDPM do not.
    pub zero_snr_floor: bool,
}

/// `alphas_cumprod` as diffusers computes it (float32 values).
pub(crate) fn alphas_cumprod(cfg: &SchedulerConfig, opts: TrainScheduleOpts) -> Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    let mut betas: Vec<f32> = if let Some(tb) = &cfg.trained_betas {
        if tb.len() != n {
            return Err(Error::invalid_model(format!(
                "scheduler config: trained_betas has {} values, num_train_timesteps is {n}",
                tb.len()
            )));
        }
        tb.iter().map(|&b| b as f32).collect()
    } else {
        match cfg.beta_schedule()? {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => betas_for_alpha_bar_cosine(n),
        }
    };
    if cfg.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let mut ac = cumprod(betas.iter().map(|&b| 1.0f32 - b));
    if cfg.rescale_betas_zero_snr && opts.zero_snr_floor {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(ac)
}

/// `torch.cumprod` on float32 input: accumulated in double, stored as float32.
fn cumprod(alphas: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    alphas
        .map(|a| {
            acc *= f64::from(a);
            acc as f32
        })
        .collect()
}

/// `betas_for_alpha_bar(n, alpha_transform_type="cosine")`, max_beta 0.999.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let f = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - f(t2) / f(t1)).min(0.999) as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1), in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = cumprod(betas.iter().map(|&b| 1.0f32 - b));
    let mut s: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let s0 = s[0];
    let st = s[s.len() - 1];
    let scale = s0 / (s0 - st);
    for x in &mut s {
        *x -= st;
        *x *= scale;
    }
    let bar: Vec<f32> = s.iter().map(|x| x * x).collect();
    let mut alphas = Vec::with_capacity(bar.len());
    alphas.push(bar[0]);
    for i in 1..bar.len() {
        alphas.push(bar[i] / bar[i - 1]);
    }
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, as float64.
pub(crate) fn train_sigmas(ac: &[f32]) -> Vec<f64> {
    ac.iter()
        .map(|&a| f64::from(((1.0f32 - a) / a).sqrt()))
        .collect()
}

/// Timesteps of the Euler schedulers (float32 values): `linspace`, `leading`
/// (+ `steps_offset`) or `trailing` spacing.
pub(crate) fn spacing_float(cfg: &SchedulerConfig, spacing: Spacing, n: usize) -> Vec<f64> {
    let nt = cfg.num_train_timesteps;
    let v: Vec<f64> = match spacing {
        Spacing::Linspace => {
            let mut v = np_linspace(0.0, (nt - 1) as f64, n);
            v.reverse();
            v
        }
        Spacing::Leading => {
            let ratio = nt / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f64 + cfg.steps_offset as f64)
                .collect()
        }
        Spacing::Trailing => np_arange(nt as f64, 0.0, -(nt as f64 / n as f64))
            .into_iter()
            .map(|t| np_round(t) - 1.0)
            .collect(),
    };
    v.into_iter().map(|t| f64::from(t as f32)).collect()
}

/// Integer timesteps of DDIM / DDPM.
pub(crate) fn spacing_int(cfg: &SchedulerConfig, spacing: Spacing, n: usize) -> Vec<i64> {
    let nt = cfg.num_train_timesteps;
    match spacing {
        Spacing::Linspace => {
            let mut v: Vec<i64> = np_linspace(0.0, (nt - 1) as f64, n)
                .into_iter()
                .map(|t| np_round(t) as i64)
                .collect();
            v.reverse();
            v
        }
        Spacing::Leading => {
            let ratio = nt / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as i64 + cfg.steps_offset)
                .collect()
        }
        Spacing::Trailing => np_arange(nt as f64, 0.0, -(nt as f64 / n as f64))
            .into_iter()
            .map(|t| np_round(t) as i64 - 1)
            .collect(),
    }
}

/// `_convert_to_karras` with rho 7: `n` sigmas from `sigma_max` down to `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`, by
/// linear interpolation in log-sigma. `log_sigmas` is increasing.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Index of the last log_sigma <= log_sigma (0 when there is none).
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low_idx = count.saturating_sub(1).min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `np.log` of the float32 training sigmas, rounded to float32 like numpy.
pub(crate) fn log_sigmas_f32(train_sigmas: &[f64]) -> Vec<f64> {
    train_sigmas
        .iter()
        .map(|&s| f64::from(s.ln() as f32))
        .collect()
}

/// Rounds to float32 and back, where diffusers stores a float32 tensor.
pub(crate) fn f32r(x: f64) -> f64 {
    f64::from(x as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_length_rule() {
        assert_eq!(
            np_arange(1000.0, 0.0, -200.0),
            vec![1000.0, 800.0, 600.0, 400.0, 200.0]
        );
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
    }

    #[test]
    fn interp_matches_endpoints() {
        let fp = [1.0, 2.0, 4.0];
        assert_eq!(interp_index(0.0, &fp), 1.0);
        assert_eq!(interp_index(1.5, &fp), 3.0);
        assert_eq!(interp_index(2.0, &fp), 4.0);
    }
}
