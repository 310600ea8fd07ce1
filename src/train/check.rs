//! Diagnostics for training folders: seeded random inputs of the right
//! shapes, and a directional finite-difference check of the gradients through
//! the forward graphs (`spo grad --fd-directions N`). The check needs nothing
//! but the graphs, so it works at any size, where no autograd reference fits.

use ndarray::ArrayD;

use super::grad::GradRunner;
use crate::error::Result;
use crate::model::tensors::NamedTensors;

/// A small seeded generator (xorshift64*, Box-Muller normals): diagnostics
/// need reproducible numbers, not statistical quality.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    pub fn normals(&mut self, shape: &[usize], scale: f32) -> ArrayD<f32> {
        ArrayD::from_shape_simple_fn(shape.to_vec(), || scale * self.normal())
    }
}

/// Inputs for `run_contract`: standard-normal UNet inputs and cotangent, a
/// mid-schedule timestep, SDXL size conditioning for the manifest's latent
/// size, and LoRA parameters of standard deviation `param_scale`.
pub fn random_inputs(r: &GradRunner, seed: u64, param_scale: f32) -> NamedTensors {
    let m = r.manifest();
    let mut rng = Rng::new(seed);
    let mut out = NamedTensors::new();
    for i in &m.unet_inputs {
        let v = match i.name.as_str() {
            "timestep" => ArrayD::from_elem(i.shape.clone(), 500.0),
            "time_ids" => {
                let (h, w) = (8.0 * m.latent_height as f32, 8.0 * m.latent_width as f32);
                let row = [h, w, 0.0, 0.0, h, w];
                ArrayD::from_shape_fn(i.shape.clone(), |ix| row[ix[1] % 6])
            }
            _ => rng.normals(&i.shape, 1.0),
        };
        out.insert(i.name.clone(), v);
    }
    out.insert(m.cotangent.clone(), rng.normals(&m.output_shape(), 1.0));
    for p in &m.params {
        out.insert(p.key.clone(), rng.normals(&p.shape, param_scale));
    }
    out
}

/// One directional check: the gradient's derivative along a random direction
/// against finite differences of `sum(cotangent * out)`.
#[derive(Debug, Clone, Copy)]
pub struct DirectionalCheck {
    pub analytic: f64,
    pub numeric: f64,
}

impl DirectionalCheck {
    pub fn relative_error(&self) -> f64 {
        ((self.numeric - self.analytic) / self.analytic).abs()
    }
}

/// Checks `grads` (the gradients at `inputs`, as `run_contract` returns
/// them) along a direction drawn from `seed`, each parameter moved by up to
/// `step` times a unit normal. Two central differences (steps h and h/2) are
/// combined by Richardson extrapolation, which cancels the h^2 term, so the
/// step can stay large enough for float round-off not to dominate. The
/// runner's parameters are left at `inputs`' values.
pub fn directional(
    r: &mut GradRunner,
    inputs: &NamedTensors,
    grads: &NamedTensors,
    seed: u64,
    step: f32,
) -> Result<DirectionalCheck> {
    let m = r.manifest().clone();
    let unet: NamedTensors = m
        .unet_inputs
        .iter()
        .map(|i| (i.name.clone(), inputs[&i.name].clone()))
        .collect();
    let cot = &inputs[&m.cotangent];
    let mut rng = Rng::new(seed);
    let dir: NamedTensors = m
        .params
        .iter()
        .map(|p| (p.key.clone(), rng.normals(&p.shape, 1.0)))
        .collect();
    let analytic: f64 = dir.iter().map(|(k, d)| dot(&grads[k], d)).sum();
    let mut at = |h: f32| -> Result<f64> {
        let p: NamedTensors = m
            .params
            .iter()
            .map(|p| {
                (
                    p.key.clone(),
                    &inputs[&p.key] + &dir[&p.key].mapv(|d| h * d),
                )
            })
            .collect();
        r.set_params(&p)?;
        Ok(dot(&r.forward(&unet)?, cot))
    };
    let d1 = (at(step)? - at(-step)?) / (2.0 * step as f64);
    let d2 = (at(step / 2.0)? - at(-step / 2.0)?) / step as f64;
    let params: NamedTensors = m
        .params
        .iter()
        .map(|p| (p.key.clone(), inputs[&p.key].clone()))
        .collect();
    r.set_params(&params)?;
    Ok(DirectionalCheck {
        analytic,
        numeric: (4.0 * d2 - d1) / 3.0,
    })
}

fn dot(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}
