//! AdamW with PyTorch's semantics (decoupled weight decay applied first, then
//! the bias-corrected Adam step), and gradient-norm clipping that really clips
//! (the official SPO code passes an exhausted iterator to its clipping call,
//! so its clipping does nothing: [`Clip::OfficialNoOp`] reproduces that).

use ndarray::ArrayD;

use crate::error::{Error, Result};
use crate::model::tensors::NamedTensors;

/// AdamW's constants (torch.optim.AdamW's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// What happens to the gradients before a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Clip {
    /// Scale all gradients together so that their global L2 norm is at most
    /// this (torch.nn.utils.clip_grad_norm_).
    Norm(f64),
    /// Leave them alone, as the official code does in effect.
    OfficialNoOp,
}

/// AdamW state: step count and the two moments per parameter.
#[derive(Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    m: NamedTensors,
    v: NamedTensors,
}

impl AdamW {
    /// Zero moments shaped like `params`.
    pub fn new(config: AdamWConfig, params: &NamedTensors) -> Result<AdamW> {
        let finite = [
            config.lr,
            config.beta1,
            config.beta2,
            config.weight_decay,
            config.eps,
        ];
        if finite.iter().any(|v| !v.is_finite() || *v < 0.0)
            || config.beta1 >= 1.0
            || config.beta2 >= 1.0
        {
            return Err(Error::invalid_argument(format!(
                "AdamW: {config:?} must be finite and >= 0, with betas below 1"
            )));
        }
        let zeros = |p: &NamedTensors| -> NamedTensors {
            p.iter()
                .map(|(k, v)| (k.clone(), ArrayD::zeros(v.raw_dim())))
                .collect()
        };
        Ok(AdamW {
            config,
            step: 0,
            m: zeros(params),
            v: zeros(params),
        })
    }

    /// The first and second moments, by parameter key.
    pub fn moments(&self) -> (&NamedTensors, &NamedTensors) {
        (&self.m, &self.v)
    }

    /// Puts back a saved state: `step` and the moments, which must have the
    /// keys and shapes of the current ones.
    pub fn restore(&mut self, step: u64, m: NamedTensors, v: NamedTensors) -> Result<()> {
        for (what, new, old) in [("first", &m, &self.m), ("second", &v, &self.v)] {
            let same = new.len() == old.len()
                && new
                    .iter()
                    .all(|(k, a)| old.get(k).is_some_and(|b| b.shape() == a.shape()));
            if !same {
                return Err(Error::invalid_argument(format!(
                    "AdamW: the saved {what} moments do not match the parameters"
                )));
            }
        }
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// One update of `params` from `grads` (the same keys and shapes).
    pub fn update(&mut self, params: &mut NamedTensors, grads: &NamedTensors) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(Error::invalid_argument(format!(
                "AdamW: {} parameters and {} gradients for {} moments",
                params.len(),
                grads.len(),
                self.m.len()
            )));
        }
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (k, p) in params.iter_mut() {
            let (Some(g), Some(m), Some(v)) = (grads.get(k), self.m.get_mut(k), self.v.get_mut(k))
            else {
                return Err(Error::invalid_argument(format!(
                    "AdamW: no gradient or state for '{k}'"
                )));
            };
            if g.shape() != p.shape() {
                return Err(Error::invalid_argument(format!(
                    "AdamW: gradient of '{k}' is {:?}, the parameter {:?}",
                    g.shape(),
                    p.shape()
                )));
            }
            ndarray::Zip::from(p)
                .and(g)
                .and(m)
                .and(v)
                .for_each(|p, &g, m, v| {
                    let g = g as f64;
                    let mut x = *p as f64 * (1.0 - c.lr * c.weight_decay);
                    let mm = c.beta1 * *m as f64 + (1.0 - c.beta1) * g;
                    let vv = c.beta2 * *v as f64 + (1.0 - c.beta2) * g * g;
                    x -= c.lr / bc1 * mm / ((vv / bc2).sqrt() + c.eps);
                    *m = mm as f32;
                    *v = vv as f32;
                    *p = x as f32;
                });
        }
        Ok(())
    }
}

/// Applies `clip` to `grads` in place; returns the global L2 norm before.
pub fn clip_gradients(grads: &mut NamedTensors, clip: Clip) -> f64 {
    let norm = grads
        .values()
        .flat_map(|g| g.iter())
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    if let Clip::Norm(max) = clip {
        // torch: coefficient max / (norm + 1e-6), applied only when below 1.
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.values_mut() {
                g.mapv_inplace(|v| (v as f64 * coef) as f32);
            }
        }
    }
    norm
}
