//! Prompt encoding: tokenizers plus text-encoder graphs to the embeddings the
//! UNet takes, following the diffusers pipelines:
//! - SDXL: the penultimate hidden state (`hidden_states[-2]`, or
//!   `hidden_states[-(clip_skip + 2)]`) of both encoders, concatenated on the
//!   feature axis, and `text_embeds` (the projected pooled output) of encoder 2;
//! - SD 1.5: `last_hidden_state` of the one encoder; with `clip_skip`,
//!   `hidden_states[-(clip_skip + 1)]` through the encoder's final layer norm,
//!   whose weights are read from the graph.
//!
//! Long prompts follow [`LongPrompt`]: truncated to one 77-token window like
//! diffusers, or cut into 77-token windows (A1111 style) that are encoded one
//! by one and concatenated on the sequence axis, with SDXL's pooled output
//! taken from the first window. A prompt and its negative are padded to the
//! same number of windows with the empty prompt's window, as A1111 does.

use ndarray::{concatenate, ArrayD, Axis, IxDyn};

use super::tokenizer::{ClipTokenizer, LongPrompt, MAX_LEN};
use crate::error::{Error, ErrorCode, Result};
use crate::model::graph::LayerNorm;
use crate::model::{ModelKind, OnnxGraph};
use crate::runtime::session::{Graph, Input};

/// Embeddings for one prompt: `embeds` [1, 77 * windows, D]; `pooled` [1, P] for SDXL.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    pub embeds: ArrayD<f32>,
    pub pooled: Option<ArrayD<f32>>,
}

impl PromptEmbeds {
    /// Zeros shaped like `self` (SDXL's `force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> PromptEmbeds {
        PromptEmbeds {
            embeds: ArrayD::zeros(self.embeds.raw_dim()),
            pooled: self.pooled.as_ref().map(|p| ArrayD::zeros(p.raw_dim())),
        }
    }
}

/// One tokenizer + encoder pair.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub graph: Graph,
    /// Number of transformer layers, from the `hidden_states.N` outputs.
    layers: usize,
    /// The final layer norm, read from the graph on first use (SD 1.5 clip_skip).
    final_norm: Option<LayerNorm>,
}

impl TextEncoder {
    pub fn new(tokenizer: ClipTokenizer, graph: Graph) -> Result<TextEncoder> {
        graph.require_input("input_ids")?;
        let layers = graph
            .outputs
            .iter()
            .filter_map(|o| o.name.strip_prefix("hidden_states.")?.parse::<usize>().ok())
            .max()
            .unwrap_or(0);
        Ok(TextEncoder {
            tokenizer,
            graph,
            layers,
            final_norm: None,
        })
    }

    /// The 77-token windows of `prompt`, padded to at least `min_windows`
    /// with the empty prompt's window.
    fn windows(&self, prompt: &str, long: LongPrompt, min_windows: usize) -> Vec<Vec<i64>> {
        let mut w = self.tokenizer.encode_with(prompt, long);
        while w.len() < min_windows {
            w.push(self.tokenizer.encode_padded("", MAX_LEN));
        }
        w
    }

    /// Runs the encoder on one window of ids and returns the requested outputs.
    fn run(&mut self, ids: &[i64], outputs: &[&str]) -> Result<Vec<ArrayD<f32>>> {
        let ids = Input::I64(
            ArrayD::from_shape_vec(IxDyn(&[1, ids.len()]), ids.to_vec()).expect("one window"),
        );
        self.graph.run(vec![("input_ids", ids)], outputs, None)
    }

    /// SD 1.5 with clip_skip, as diffusers: `hidden_states[-(skip + 1)]`
    /// through the final layer norm (the one applied to the last hidden state).
    fn skipped_and_normed(&mut self, ids: &[i64], clip_skip: usize) -> Result<ArrayD<f32>> {
        let name = self.hidden_state_name(clip_skip, 0)?;
        if self.final_norm.is_none() {
            let last = format!("hidden_states.{}", self.layers);
            let graph = OnnxGraph::open(&self.graph.path)?;
            let norm = graph.layer_norm_of(&last)?.ok_or_else(|| {
                Error::invalid_model(format!(
                    "{} ({}): clip_skip needs the final layer norm, and no \
                     LayerNormalization reads '{last}'",
                    self.graph.component,
                    self.graph.path.display()
                ))
            })?;
            self.final_norm = Some(norm);
        }
        let mut h = self.run(ids, &[&name])?.remove(0);
        let norm = self.final_norm.as_ref().expect("set above");
        if h.shape().last() != Some(&norm.scale.len()) {
            return Err(Error::invalid_model(format!(
                "{}: final layer norm has {} features, '{name}' is {:?}",
                self.graph.component,
                norm.scale.len(),
                h.shape()
            )));
        }
        norm.apply(h.as_slice_mut().expect("standard layout"));
        Ok(h)
    }

    /// `hidden_states[-(clip_skip + 1 + extra)]`: `extra` is 1 for SDXL (which
    /// starts from the penultimate layer) and 0 for SD 1.5. The message names
    /// the user's `clip_skip` and its largest value, not the internal index.
    fn hidden_state_name(&self, clip_skip: usize, extra: usize) -> Result<String> {
        if self.layers == 0 {
            return Err(Error::invalid_model(format!(
                "{} ({}): no hidden_states.N outputs; export the text encoder with hidden states",
                self.graph.component,
                self.graph.path.display()
            )));
        }
        let idx = self.layers.checked_sub(extra + clip_skip).ok_or_else(|| {
            Error::new(
                ErrorCode::InvalidOptionValue,
                format!(
                    "option 'clip_skip': {clip_skip} is too large; {} has {} layers, so \
                     clip_skip may be at most {}",
                    self.graph.component,
                    self.layers,
                    self.layers - extra
                ),
            )
        })?;
        Ok(format!("hidden_states.{idx}"))
    }
}

/// The text side of a pipeline.
pub struct TextEncoders {
    pub kind: ModelKind,
    pub te1: TextEncoder,
    pub te2: Option<TextEncoder>,
}

impl TextEncoders {
    /// How many 77-token windows `prompt` takes in mode `long`.
    pub fn windows(&self, prompt: &str, long: LongPrompt) -> usize {
        self.te1.tokenizer.encode_with(prompt, long).len()
    }

    /// Encodes `prompt` in mode `long`, padded to at least `min_windows` windows.
    pub fn encode(
        &mut self,
        prompt: &str,
        clip_skip: usize,
        long: LongPrompt,
        min_windows: usize,
    ) -> Result<PromptEmbeds> {
        let ids1 = self.te1.windows(prompt, long, min_windows);
        let ids2 = self
            .te2
            .as_ref()
            .map(|t| t.windows(prompt, long, min_windows));
        let mut parts = Vec::with_capacity(ids1.len());
        let mut pooled = None;
        for (k, a) in ids1.iter().enumerate() {
            let b = ids2.as_ref().map(|w| w[k].as_slice());
            let e = self.encode_window(a, b, clip_skip)?;
            pooled = pooled.or(e.pooled);
            parts.push(e.embeds);
        }
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        let embeds = concatenate(Axis(1), &views)
            .map_err(|e| Error::invalid_model(format!("prompt windows do not concatenate: {e}")))?;
        Ok(PromptEmbeds { embeds, pooled })
    }

    /// One window: `ids1` for encoder 1 and, for SDXL, `ids2` for encoder 2.
    fn encode_window(
        &mut self,
        ids1: &[i64],
        ids2: Option<&[i64]>,
        clip_skip: usize,
    ) -> Result<PromptEmbeds> {
        match self.kind {
            ModelKind::Sd15 => {
                let embeds = if clip_skip == 0 {
                    self.te1.run(ids1, &["last_hidden_state"])?.remove(0)
                } else {
                    self.te1.skipped_and_normed(ids1, clip_skip)?
                };
                Ok(PromptEmbeds {
                    embeds,
                    pooled: None,
                })
            }
            ModelKind::Sdxl => {
                let (te2, ids2) = self
                    .te2
                    .as_mut()
                    .zip(ids2)
                    .ok_or_else(|| Error::invalid_model("SDXL model without text_encoder_2"))?;
                let name1 = self.te1.hidden_state_name(clip_skip, 1)?;
                let h1 = self.te1.run(ids1, &[&name1])?.remove(0);
                let name2 = te2.hidden_state_name(clip_skip, 1)?;
                te2.graph.require_output(&["text_embeds"])?;
                let mut out2 = te2.run(ids2, &[&name2, "text_embeds"])?;
                let pooled = out2.remove(1);
                let h2 = out2.remove(0);
                let embeds = concatenate(Axis(2), &[h1.view(), h2.view()]).map_err(|e| {
                    Error::invalid_model(format!(
                        "text encoder hidden states {:?} and {:?} do not concatenate: {e}",
                        h1.shape(),
                        h2.shape()
                    ))
                })?;
                Ok(PromptEmbeds {
                    embeds,
                    pooled: Some(pooled),
                })
            }
        }
    }
}
