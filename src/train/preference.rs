//! Preference models: the scorer SPO ranks candidate images with.
//!
//! The contract is one ONNX graph, `model.onnx`, with inputs `image` float32
//! [B,3,224,224] (CLIP-normalised RGB), `timestep` int64 [B] (0 for a final
//! image) and `input_ids` int64 [B,77], and output `score` float32 [B]; the
//! tokenizer for `input_ids` (its pad token included) is `tokenizer/` beside
//! the graph. `onnx/spo_onnx/export/preference.py` writes such folders.
//!
//! Images reach the model the way the official SPO code prepares them:
//! from [-1, 1] to [0, 1], centre-cropped to a square, resized to 224 with
//! bicubic interpolation (PyTorch's `interpolate`, `align_corners=False`,
//! A = -0.75, no antialiasing), then CLIP-normalised.

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, ArrayView2, Axis, IxDyn};

use crate::error::{Error, Result};
use crate::memory;
use crate::runtime::session::{DType, Graph, Input};
use crate::runtime::Runtime;
use crate::text::tokenizer::ClipTokenizer;

/// The side of the square image the model takes.
pub const IMAGE_SIZE: usize = 224;
/// Token ids per prompt.
pub const MAX_TOKENS: usize = 77;
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// The published constants, rounded to f32.
const CLIP_STD: [f32; 3] = [0.268_629_5, 0.261_302_6, 0.275_777_1];
/// Largest input image side accepted (8192: SDXL's 1024 with room).
const MAX_SIDE: usize = 8192;

/// A loaded preference model.
pub struct PreferenceModel {
    dir: PathBuf,
    graph: Graph,
    tokenizer: ClipTokenizer,
}

impl PreferenceModel {
    /// Loads `dir/model.onnx` and `dir/tokenizer/`, and checks the graph
    /// against the contract; the error names the input or output at fault.
    pub fn open(rt: &Runtime, dir: &Path) -> Result<PreferenceModel> {
        let graph = Graph::load(rt, "preference", &dir.join("model.onnx"))?;
        let contract: [(&str, DType, &[i64]); 3] = [
            (
                "image",
                DType::F32,
                &[-1, 3, IMAGE_SIZE as i64, IMAGE_SIZE as i64],
            ),
            ("timestep", DType::I64, &[-1]),
            ("input_ids", DType::I64, &[-1, MAX_TOKENS as i64]),
        ];
        for (name, dtype, shape) in contract {
            let spec = graph.require_input(name)?;
            let fits = spec.dtype == dtype
                && spec.shape.len() == shape.len()
                && spec
                    .shape
                    .iter()
                    .zip(shape)
                    .all(|(h, w)| *w < 0 || *h < 0 || h == w);
            if !fits {
                return Err(Error::invalid_model(format!(
                    "{}: input {} does not fit the preference contract ({name} {}{shape:?})",
                    dir.display(),
                    spec.describe(),
                    dtype.name()
                )));
            }
        }
        let score = graph.require_output(&["score"])?;
        if score.shape.len() != 1 {
            return Err(Error::invalid_model(format!(
                "{}: output {} must be [B]",
                dir.display(),
                score.describe()
            )));
        }
        let tokenizer = ClipTokenizer::from_dir(dir.join("tokenizer"))
            .map_err(|e| e.context(format!("preference model {}", dir.display())))?;
        Ok(PreferenceModel {
            dir: dir.to_owned(),
            graph,
            tokenizer,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The padded token ids of `prompt`, as the model reads them.
    pub fn input_ids(&self, prompt: &str) -> Vec<i64> {
        self.tokenizer.encode_padded(prompt, MAX_TOKENS)
    }

    /// Scores `images` ([B,3,H,W] in [-1, 1]), one timestep and prompt each.
    pub fn score(
        &mut self,
        images: &ArrayD<f32>,
        timesteps: &[i64],
        prompts: &[&str],
    ) -> Result<Vec<f32>> {
        let b = images.shape().first().copied().unwrap_or(0);
        if b == 0 || timesteps.len() != b || prompts.len() != b {
            return Err(Error::invalid_argument(format!(
                "preference score: {b} images, {} timesteps and {} prompts must be as many, and \
                 at least one",
                timesteps.len(),
                prompts.len()
            )));
        }
        let pixels = preprocess(images)?;
        let ids: Vec<i64> = prompts.iter().flat_map(|p| self.input_ids(p)).collect();
        let ids = ArrayD::from_shape_vec(IxDyn(&[b, MAX_TOKENS]), ids).expect("padded ids");
        let t = ArrayD::from_shape_vec(IxDyn(&[b]), timesteps.to_vec()).expect("b timesteps");
        let out = self.graph.run(
            vec![
                ("image", Input::F32(pixels)),
                ("timestep", Input::I64(t)),
                ("input_ids", Input::I64(ids)),
            ],
            &["score"],
            None,
        )?;
        let s: Vec<f32> = out[0].iter().copied().collect();
        if s.len() != b {
            return Err(Error::invalid_model(format!(
                "{}: 'score' has {} values for {b} images",
                self.dir.display(),
                s.len()
            )));
        }
        Ok(s)
    }
}

/// [-1, 1] images [B,3,H,W] to the model's CLIP-normalised [B,3,224,224].
pub fn preprocess(images: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let s = images.shape();
    if s.len() != 4 || s[1] != 3 || s[2] == 0 || s[3] == 0 || s[2] > MAX_SIDE || s[3] > MAX_SIDE {
        return Err(Error::invalid_argument(format!(
            "preference images must be [B,3,H,W] with sides of 1 to {MAX_SIDE}, not {s:?}"
        )));
    }
    let (b, h, w) = (s[0], s[2], s[3]);
    let side = h.min(w);
    let (top, left) = ((h - side) / 2, (w - side) / 2);
    let rows = cubic_weights(side, IMAGE_SIZE);
    let mut out = memory::zeros(
        IxDyn(&[b, 3, IMAGE_SIZE, IMAGE_SIZE]),
        "the preference batch",
    )?;
    for i in 0..b {
        for c in 0..3 {
            let plane = images.index_axis(Axis(0), i);
            let plane = plane.index_axis(Axis(0), c);
            let crop = plane
                .slice(ndarray::s![top..top + side, left..left + side])
                .mapv(|v| (v + 1.0) / 2.0);
            let crop: ArrayView2<f32> = crop.view().into_dimensionality().expect("2-D");
            // Rows then columns: out = R * crop * R^T.
            let resized = rows.dot(&crop).dot(&rows.t());
            let mut dst = out.index_axis_mut(Axis(0), i);
            let mut dst = dst.index_axis_mut(Axis(0), c);
            dst.assign(
                &resized
                    .mapv(|v| (v - CLIP_MEAN[c]) / CLIP_STD[c])
                    .into_dyn(),
            );
        }
    }
    Ok(out)
}

/// The [out, in] matrix of PyTorch's bicubic resampling along one axis
/// (`align_corners=False`, A = -0.75, source indices clamped to the edge).
fn cubic_weights(input: usize, output: usize) -> Array2<f32> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = input as f64 / output as f64;
    let mut m = Array2::zeros((output, input));
    for o in 0..output {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let x0 = src.floor();
        let t = src - x0;
        let coeffs = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, c) in coeffs.iter().enumerate() {
            let idx = (x0 as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            m[[o, idx]] += *c as f32;
        }
    }
    m
}
