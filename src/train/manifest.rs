//! `train_manifest.json`: the contract between the training-graph exporter
//! (`onnx/spo_onnx/export/train.py`) and the gradient runner. The exporter
//! writes it; this module reads it as untrusted input (size-limited, every
//! file name confined to the folder, every shape bounded before anything is
//! allocated from it).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The file name inside a training folder.
pub const MANIFEST_FILE: &str = "train_manifest.json";
/// The manifest format this runtime reads.
pub const FORMAT: u32 = 1;
/// A manifest larger than this is refused unread (the SDXL one is ~1 MB).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Segments a folder may have (SDXL has 9 top-level blocks).
const MAX_SEGMENTS: usize = 64;
/// LoRA parameter elements in all (rank-64 SDXL: 93M).
const MAX_PARAM_ELEMENTS: usize = 1 << 30;
/// Elements in any one tensor the manifest declares (2^31: 8 GiB of f32).
const MAX_ELEMENTS: usize = 1 << 31;

/// A graph input the UNet also has: name, element type and fixed shape.
#[derive(Debug, Clone, Deserialize)]
pub struct IoEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// One LoRA parameter: its PEFT key, the backward graph's gradient output
/// and accumulator input, and its shape (`[r,in]` for A, `[out,r]` for B).
#[derive(Debug, Clone, Deserialize)]
pub struct Param {
    pub key: String,
    pub grad: String,
    pub accum: String,
    pub shape: Vec<usize>,
}

/// One forward/backward pair: a run of UNet blocks.
#[derive(Debug, Clone, Deserialize)]
pub struct Segment {
    pub forward: String,
    /// None when the segment has neither LoRA parameters nor a gradient to
    /// pass on (blocks before the first target).
    pub backward: Option<String>,
    /// Forward inputs: UNet inputs, earlier segments' outputs, parameters.
    pub inputs: Vec<String>,
    /// What later segments read, and `out_sample` for the last.
    pub outputs: Vec<String>,
    /// The parameters (PEFT keys) this segment holds.
    pub params: Vec<String>,
    /// Extra forward outputs that the backward reads.
    pub residuals: Vec<String>,
    pub backward_inputs: Vec<String>,
    /// (forward output, the backward input taking its cotangent).
    pub cotangents: Vec<(String, String)>,
    /// (activation input, the backward output with its gradient).
    pub input_grads: Vec<(String, String)>,
}

/// A parsed and checked `train_manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainManifest {
    pub format: u32,
    pub batch: usize,
    pub latent_height: usize,
    pub latent_width: usize,
    pub text_seq_len: usize,
    pub rank: usize,
    pub lora_alpha: f64,
    /// Diffusers module paths of the trained linear modules.
    pub targets: Vec<String>,
    /// The base weights' dtype (`float32` or `float16`); LoRA parameters and
    /// gradients are always float32.
    pub dtype: String,
    pub unet_inputs: Vec<IoEntry>,
    pub output: String,
    pub cotangent: String,
    /// The LoRA-injected UNet alone (`out_sample`, no residuals): what the
    /// trainer samples through. Absent in folders written before it existed.
    #[serde(default)]
    pub sample: Option<String>,
    pub segments: Vec<Segment>,
    pub params: Vec<Param>,
    pub weights: String,
}

impl TrainManifest {
    /// Reads `dir/train_manifest.json` and checks it.
    pub fn open(dir: &Path) -> Result<TrainManifest> {
        let path = dir.join(MANIFEST_FILE);
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(Error::invalid_model(format!(
                "{}: {} bytes is over the {MAX_MANIFEST_BYTES}-byte limit for a manifest",
                path.display(),
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text).map_err(|e| e.context(format!("{}", path.display())))
    }

    /// Parses and checks a manifest's text.
    pub fn from_json(text: &str) -> Result<TrainManifest> {
        let m: TrainManifest = serde_json::from_str(text)
            .map_err(|e| Error::invalid_model(format!("not a training manifest: {e}")))?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(Error::invalid_model(format!(
                "format {} is not supported (this runtime reads format {FORMAT})",
                self.format
            )));
        }
        if self.segments.is_empty() || self.segments.len() > MAX_SEGMENTS {
            return Err(Error::invalid_model(format!(
                "{} segments (1 to {MAX_SEGMENTS} are valid)",
                self.segments.len()
            )));
        }
        if self.params.is_empty() || self.targets.is_empty() {
            return Err(Error::invalid_model("no LoRA parameters or targets"));
        }
        if !(self.lora_alpha.is_finite() && self.rank > 0) {
            return Err(Error::invalid_model(format!(
                "rank {} / lora_alpha {} are not a valid LoRA scale",
                self.rank, self.lora_alpha
            )));
        }
        for s in &self.segments {
            plain_file_name(&s.forward)?;
            if let Some(b) = &s.backward {
                plain_file_name(b)?;
            }
            if let Some(p) = s
                .params
                .iter()
                .find(|p| !self.params.iter().any(|q| q.key == **p))
            {
                return Err(Error::invalid_model(format!(
                    "segment {} holds parameter '{p}', which the manifest does not list",
                    s.forward
                )));
            }
        }
        let last = self.segments.last().expect("non-empty");
        if !last.outputs.contains(&self.output) {
            return Err(Error::invalid_model(format!(
                "the last segment ({}) does not output '{}'",
                last.forward, self.output
            )));
        }
        plain_file_name(&self.weights)?;
        if let Some(s) = &self.sample {
            plain_file_name(s)?;
        }
        let mut total = 0usize;
        for p in &self.params {
            total = total.saturating_add(check_shape(&p.key, &p.shape)?);
        }
        if total > MAX_PARAM_ELEMENTS {
            return Err(Error::invalid_model(format!(
                "{total} LoRA parameter elements are over the {MAX_PARAM_ELEMENTS} limit"
            )));
        }
        self.check_pairs()?;
        for i in &self.unet_inputs {
            check_shape(&i.name, &i.shape)?;
        }
        Ok(())
    }

    /// `params` are one (A, B) pair per target, in target order, with PEFT
    /// keys and shapes `[r,in]` / `[out,r]`.
    fn check_pairs(&self) -> Result<()> {
        if self.params.len() != 2 * self.targets.len() {
            return Err(Error::invalid_model(format!(
                "{} parameters for {} targets; expected an A and a B per target",
                self.params.len(),
                self.targets.len()
            )));
        }
        for (t, pair) in self.targets.iter().zip(self.params.chunks(2)) {
            let (a, b) = (&pair[0], &pair[1]);
            let keys_ok =
                a.key == format!("{t}.lora_A.weight") && b.key == format!("{t}.lora_B.weight");
            let shapes_ok = a.shape.len() == 2
                && b.shape.len() == 2
                && a.shape[0] == self.rank
                && b.shape[1] == self.rank;
            if !keys_ok || !shapes_ok {
                return Err(Error::invalid_model(format!(
                    "target '{t}': parameters '{}' {:?} / '{}' {:?} are not its rank-{} LoRA A / B",
                    a.key, a.shape, b.key, b.shape, self.rank
                )));
            }
        }
        Ok(())
    }

    /// (name, shape) of every UNet input.
    pub fn unet_input_shapes(&self) -> Vec<(&str, &[usize])> {
        self.unet_inputs
            .iter()
            .map(|i| (i.name.as_str(), i.shape.as_slice()))
            .collect()
    }

    /// (PEFT key, shape) of every LoRA parameter.
    pub fn param_shapes(&self) -> Vec<(&str, &[usize])> {
        self.params
            .iter()
            .map(|p| (p.key.as_str(), p.shape.as_slice()))
            .collect()
    }

    /// The shape of the UNet output and of the cotangent: `[B,4,h,w]`.
    pub fn output_shape(&self) -> Vec<usize> {
        vec![self.batch, 4, self.latent_height, self.latent_width]
    }
}

/// Names in the manifest must stay inside the training folder.
fn plain_file_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.contains(['/', '\\'])
        && name != ".."
        && name != "."
        && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_model(format!(
            "file name '{name}' is not a plain file name inside the training folder"
        )))
    }
}

/// The element count of a declared shape, when it is not empty and within
/// [`MAX_ELEMENTS`].
fn check_shape(name: &str, shape: &[usize]) -> Result<usize> {
    let n = shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .filter(|n| *n <= MAX_ELEMENTS && *n > 0);
    match n {
        Some(n) if !shape.is_empty() => Ok(n),
        _ => Err(Error::invalid_model(format!(
            "'{name}' has shape {shape:?}: empty, or over {MAX_ELEMENTS} elements"
        ))),
    }
}
