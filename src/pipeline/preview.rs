//! The per-step x0 preview: diffusers' `pred_original_sample` of the latest
//! step, readable from any thread while the job runs. In the host loop it is
//! a host copy; in the resident loop it is one of the two device buffers the
//! step graph writes in turn, copied only when a reader asks.

use std::sync::Arc;

use ort::value::DynTensor;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::runtime::session::{download, Binding};

/// The data prediction x0 of the latest step: latents in the UNet's latent
/// space (not scaled by the VAE factor), shaped [num_images, C, h, w].
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// Steps done when it was taken (1-based, like the progress callback).
    pub step: usize,
    pub shape: [usize; 4],
    pub latents: Vec<f32>,
}

/// Where the latest x0 is: nowhere yet, a host copy (host loop), or one of the
/// two device buffers the resident loop writes in turn.
#[derive(Default)]
enum PreviewSource {
    #[default]
    None,
    Host(Vec<f32>),
    Device {
        buffers: [DynTensor; 2],
        /// The buffer of the latest step, once there is one.
        current: Option<usize>,
    },
}

#[derive(Default)]
struct PreviewState {
    step: usize,
    shape: [usize; 4],
    source: PreviewSource,
}

/// The job's x0 preview, shared so a host can read it from its progress
/// callback or from another thread while the job is stepping. Reading copies
/// (from the device when the loop runs there); steps never copy for it.
#[derive(Clone, Default)]
pub struct PreviewSlot(Arc<Mutex<PreviewState>>);

impl PreviewSlot {
    /// Steps done and shape of the latest preview, without copying it.
    pub fn info(&self) -> Option<(usize, [usize; 4])> {
        let s = self.0.lock();
        match s.source {
            PreviewSource::None | PreviewSource::Device { current: None, .. } => None,
            _ => Some((s.step, s.shape)),
        }
    }

    /// A copy of the latest preview (`None` before the first step).
    pub fn get(&self) -> Result<Option<Preview>> {
        let s = self.0.lock();
        let latents = match &s.source {
            PreviewSource::None | PreviewSource::Device { current: None, .. } => return Ok(None),
            PreviewSource::Host(v) => v.clone(),
            PreviewSource::Device {
                buffers,
                current: Some(k),
            } => download(&buffers[*k])?.into_iter().collect(),
        };
        Ok(Some(Preview {
            step: s.step,
            shape: s.shape,
            latents,
        }))
    }

    pub(crate) fn publish_host(&self, step: usize, shape: [usize; 4], latents: Vec<f32>) {
        *self.0.lock() = PreviewState {
            step,
            shape,
            source: PreviewSource::Host(latents),
        };
    }

    /// Hands the resident loop's two x0 buffers to the slot.
    pub(crate) fn install_device(&self, shape: [usize; 4], buffers: [DynTensor; 2]) {
        *self.0.lock() = PreviewState {
            step: 0,
            shape,
            source: PreviewSource::Device {
                buffers,
                current: None,
            },
        };
    }

    /// Binds buffer `k` as the step graph's `x0` output and the other one (the
    /// previous step's x0, or `zeros` before there is one) as its `history`.
    /// Buffer `k` is never the published one, so readers never see a write.
    pub(crate) fn bind_x0(
        &self,
        binding: &mut Binding,
        k: usize,
        has_history: bool,
        zeros: &DynTensor,
    ) -> Result<()> {
        let mut s = self.0.lock();
        let PreviewSource::Device { buffers, .. } = &mut s.source else {
            return Err(Error::invalid_argument(
                "no device preview buffers installed",
            ));
        };
        binding.input("history", if has_history { &buffers[1 - k] } else { zeros })?;
        binding.output("x0", &mut buffers[k])
    }

    /// Publishes buffer `k`, just written by step `step`.
    pub(crate) fn publish_device(&self, step: usize, k: usize) {
        let mut s = self.0.lock();
        if let PreviewSource::Device { current, .. } = &mut s.source {
            *current = Some(k);
            s.step = step;
        }
    }
}
