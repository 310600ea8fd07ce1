//! The denoising loop with the latents resident in ONNX Runtime values.
//!
//! The UNet writes its output into a fixed buffer, the step graph
//! ([`super::step_graph`]) reads it with the latents and writes the next
//! latents, the step's x0 and the next UNet input into more fixed buffers, and
//! the UNet reads that input at the next step. All buffers are allocated once
//! per job where the sessions run (GPU memory under CUDA), so a step moves no
//! tensor through the host except the noise of stochastic samplers (drawn by
//! the host generator for torch parity). The latents come back to the host
//! once, for the VAE.
//!
//! Buffers alternate between two copies where a step reads one and writes the
//! other (latents and x0); the x0 pair lives in the job's [`PreviewSlot`], which
//! publishes the newest one to readers on other threads.

use ndarray::{ArrayD, IxDyn};
use ort::session::RunOptions;
use ort::value::DynTensor;

use super::denoise::{self, cat_batch, Conditioning};
use super::preview::PreviewSlot;
use super::step_graph::{self, StepGraphKind};
use crate::error::{Error, Result};
use crate::runtime::session::{download, f32_input, Binding, DType, Graph, Input};
use crate::scheduler::LinearStep;

/// What one resident step needs from the job.
pub struct StepInputs<'a> {
    pub timestep: f64,
    pub step: &'a LinearStep,
    /// The input scale of the next step (1 after the last).
    pub next_input_scale: f64,
    /// Standard-normal noise for stochastic steps.
    pub noise: Option<Vec<f32>>,
    /// Steps done when this one finishes (the preview's step).
    pub done: usize,
}

pub struct ResidentLoop {
    kind: StepGraphKind,
    shape: [usize; 4],
    /// The initial latents and UNet input, uploaded; read by the first step only.
    initial: Option<(DynTensor, DynTensor)>,
    latents: [DynTensor; 2],
    /// Which of `latents` holds the current sample (after the first step).
    current: usize,
    unet_in: DynTensor,
    model_out: DynTensor,
    /// Stands in for the history before the first x0 and for the noise of
    /// deterministic steps (their coefficients are 0 there).
    zeros: DynTensor,
    guidance: Vec<f32>,
    binding: Binding,
    steps: usize,
}

impl ResidentLoop {
    /// The step graph kind for this UNet, or `None` when the loop cannot be
    /// resident (its `sample` and `out_sample` dtypes differ, or are not float).
    pub fn kind_for(unet: &Graph, cfg: bool, rescale: bool) -> Result<Option<StepGraphKind>> {
        let input = unet.require_input("sample")?.dtype;
        let output = unet.require_output(&["out_sample"])?.dtype;
        Ok(
            (input == output && matches!(input, DType::F32 | DType::F16)).then_some(
                StepGraphKind {
                    cfg,
                    rescale: cfg && rescale,
                    unet_dtype: input,
                },
            ),
        )
    }

    pub fn kind(&self) -> StepGraphKind {
        self.kind
    }

    /// Uploads `latents` (the initial sample, `shape`) and allocates the loop's
    /// buffers. `input_scale` is the first step's UNet input scale; `guidance`
    /// and `rescale` are the job's.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        unet: &Graph,
        step: &Graph,
        kind: StepGraphKind,
        shape: [usize; 4],
        latents: &[f32],
        input_scale: f64,
        guidance: f64,
        rescale: f64,
        preview: &PreviewSlot,
    ) -> Result<ResidentLoop> {
        let rows = if kind.cfg { 2 * shape[0] } else { shape[0] };
        let row_shape = [rows, shape[1], shape[2], shape[3]];
        let n: usize = shape.iter().product();
        let sample = step.upload("sample", f32_input(&shape, latents.to_vec()))?;
        let scaled = f32_input(
            &shape,
            latents
                .iter()
                .map(|&x| (f64::from(x) * input_scale) as f32)
                .collect(),
        );
        let first_in = match (scaled, kind.cfg) {
            (Input::F32(a), true) => Input::F32(cat_batch(&[&a, &a])?),
            (x, _) => x,
        };
        let first_in = unet.upload("sample", first_in)?;
        preview.install_device(
            shape,
            [
                step.alloc(DType::F32, &shape)?,
                step.alloc(DType::F32, &shape)?,
            ],
        );
        Ok(ResidentLoop {
            kind,
            shape,
            initial: Some((sample, first_in)),
            latents: [
                step.alloc(DType::F32, &shape)?,
                step.alloc(DType::F32, &shape)?,
            ],
            current: 0,
            unet_in: step.alloc(kind.unet_dtype, &row_shape)?,
            model_out: unet.alloc(kind.unet_dtype, &row_shape)?,
            zeros: step.upload("history", f32_input(&shape, vec![0.0; n]))?,
            guidance: step_graph::guidance_input(guidance, rescale, n / shape[0]),
            binding: step.binding()?,
            steps: 0,
        })
    }

    /// One step: the UNet on the current input (`cond` holds the bound
    /// conditioning), then the step graph. Publishes the step's x0 to `preview`.
    pub fn step(
        &mut self,
        unet: &mut Graph,
        step: &mut Graph,
        cond: &mut Conditioning,
        s: StepInputs<'_>,
        preview: &PreviewSlot,
        run_options: &RunOptions,
    ) -> Result<()> {
        let rows = self.unet_in.shape()[0] as usize;
        let unet_binding = cond
            .binding
            .as_mut()
            .ok_or_else(|| Error::invalid_argument("resident loop without a UNet binding"))?;
        let (sample, unet_in) = match &self.initial {
            Some((sample, first_in)) => (sample, first_in),
            None => (&self.latents[self.current], &self.unet_in),
        };
        unet_binding.input("sample", unet_in)?;
        let out_name = unet_binding.output_name().to_owned();
        unet_binding.output(&out_name, &mut self.model_out)?;
        let timestep = denoise::timestep_input(unet, s.timestep, rows)?;
        unet.run_values(
            unet_binding,
            vec![("timestep", timestep)],
            Some(run_options),
        )?;

        // The step graph. Latents and x0 alternate between two buffers, so a
        // step never writes what it reads.
        let next = if self.initial.is_some() {
            0
        } else {
            1 - self.current
        };
        let b = &mut self.binding;
        b.input("model_out", &self.model_out)?;
        b.input("sample", sample)?;
        let noise;
        b.input(
            "noise",
            match s.noise {
                Some(z) => {
                    noise = step.upload("noise", f32_input(&self.shape, z))?;
                    &noise
                }
                None => &self.zeros,
            },
        )?;
        let x0_slot = self.steps % 2;
        preview.bind_x0(b, x0_slot, self.steps > 0, &self.zeros)?;
        let [l0, l1] = &mut self.latents;
        b.output("prev", if next == 0 { l0 } else { l1 })?;
        b.output("unet_in", &mut self.unet_in)?;
        let mut host = vec![(
            "coef",
            Input::F32(
                ArrayD::from_shape_vec(
                    IxDyn(&[step_graph::COEFS.len()]),
                    step_graph::coefficients(s.step, s.next_input_scale),
                )
                .expect("10 coefficients"),
            ),
        )];
        if self.kind.cfg {
            host.push((
                "guidance",
                Input::F32(
                    ArrayD::from_shape_vec(IxDyn(&[3]), self.guidance.clone()).expect("3 values"),
                ),
            ));
        }
        step.run_values(b, host, Some(run_options))?;
        self.initial = None;
        self.current = next;
        self.steps += 1;
        preview.publish_device(s.done, x0_slot);
        Ok(())
    }

    /// The current latents, copied to the host.
    pub fn latents(&self) -> Result<Vec<f32>> {
        let a = match &self.initial {
            Some((sample, _)) => download(sample)?,
            None => download(&self.latents[self.current])?,
        };
        Ok(a.into_iter().collect())
    }
}
