//! Runtime LoRA: file formats ([`format`]), key resolution against the ONNX graph
//! ([`targets`], [`keys`], [`resolve`]), merge math ([`merge`]), the slots UNet's input
//! names ([`slots`]) and writing trained LoRA files ([`write`]). [`merged_overrides`]
//! turns a set of `(LoraFile, multiplier)` into new initializer tensors for
//! ONNX Runtime initializer overrides.

pub mod format;
pub mod keys;
pub mod merge;
pub mod resolve;
pub mod slots;
pub mod targets;
pub mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use format::{LoraFile, LoraFormat, LoraKind, LoraModule, Tensor, UnetDialect};
pub use keys::{AliasTable, Component, UnetLayout};
pub use resolve::{resolve, Match, ModelTargets, Resolution, TargetSet};
pub use targets::{GraphTargets, WeightLayout, WeightTarget};
pub use write::{lora_bytes, write_lora, LoraDialect, LoraOut};

use crate::error::{Error, Result};
use crate::model::onnx_proto::data_type;
use crate::model::OnnxGraph;

/// The graphs of a diffusers-layout ONNX model folder that LoRA can target.
#[derive(Debug)]
pub struct ModelGraphs {
    pub dir: PathBuf,
    pub graphs: BTreeMap<Component, OnnxGraph>,
    pub targets: ModelTargets,
}

impl ModelGraphs {
    /// Opens `unet/model.onnx`, `text_encoder/model.onnx` and
    /// `text_encoder_2/model.onnx` where present (at least one must be). The UNet
    /// block layout comes from `unet/config.json` when present, else from the graph.
    pub fn open(model_dir: impl AsRef<Path>) -> Result<ModelGraphs> {
        let dir = model_dir.as_ref();
        let mut graphs = BTreeMap::new();
        for comp in [
            Component::Unet,
            Component::TextEncoder,
            Component::TextEncoder2,
        ] {
            let p = dir.join(comp.folder()).join("model.onnx");
            if p.is_file() {
                graphs.insert(comp, OnnxGraph::open(&p)?);
            }
        }
        if graphs.is_empty() {
            return Err(Error::invalid_model(format!(
                "{}: no unet/, text_encoder/ or text_encoder_2/ model.onnx",
                dir.display()
            )));
        }
        let layout = std::fs::read_to_string(dir.join("unet").join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| UnetLayout::from_config(&v));
        Self::from_graphs(dir, graphs, layout)
    }

    /// Wraps already opened graphs.
    pub fn from_graphs(
        dir: &Path,
        graphs: BTreeMap<Component, OnnxGraph>,
        unet_layout: Option<UnetLayout>,
    ) -> Result<ModelGraphs> {
        let mut sets = Vec::new();
        for (comp, g) in &graphs {
            let layout = if *comp == Component::Unet {
                unet_layout.clone()
            } else {
                None
            };
            sets.push(TargetSet::from_graph(*comp, g, layout)?);
        }
        Ok(ModelGraphs {
            dir: dir.to_path_buf(),
            graphs,
            targets: ModelTargets::new(sets),
        })
    }
}

/// New initializer values, in the initializer's own data type.
#[derive(Debug, Clone, PartialEq)]
pub enum OverrideData {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

/// One initializer replacement for ONNX Runtime (`SessionBuilder::with_initializer`
/// or `with_external_initializer`, by `name`).
#[derive(Debug, Clone, PartialEq)]
pub struct InitializerOverride {
    pub component: Component,
    pub name: String,
    pub dims: Vec<usize>,
    pub data: OverrideData,
}

/// Options for [`merged_overrides`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeOptions {
    /// Fail when any key of any file is unmatched (otherwise they are only reported).
    pub strict: bool,
}

/// Result of [`merged_overrides`].
#[derive(Debug, Clone, Default)]
pub struct MergedOverrides {
    /// (component, initializer name) -> new tensor.
    pub overrides: BTreeMap<(Component, String), InitializerOverride>,
    /// One resolution per input file, in order.
    pub resolutions: Vec<Resolution>,
}

/// Resolves and merges `loras` (each with its multiplier) into the weights of
/// `model`, summing all files' deltas per weight, and returns the changed
/// initializers cast back to their stored dtype (f16 clamped to ±65504).
pub fn merged_overrides(
    model: &ModelGraphs,
    loras: &[(&LoraFile, f32)],
    opts: MergeOptions,
) -> Result<MergedOverrides> {
    let mut resolutions = Vec::new();
    // (component, initializer) -> [(module, multiplier, file)]
    type Work<'a> = BTreeMap<(Component, String), Vec<(&'a LoraModule, f32, &'a Path, String)>>;
    let mut work: Work = BTreeMap::new();
    for (file, mult) in loras {
        if !mult.is_finite() {
            return Err(Error::invalid_argument(format!(
                "{}: LoRA multiplier {mult} is not finite",
                file.path.display()
            )));
        }
        let res = resolve(file, &model.targets).into_checked(opts.strict)?;
        for m in &res.matched {
            let module = &file.modules[&m.key];
            work.entry((m.component, m.initializer.clone()))
                .or_default()
                .push((module, *mult, &file.path, m.key.clone()));
        }
        resolutions.push(res);
    }
    let mut overrides = BTreeMap::new();
    for ((comp, init), mods) in work {
        let g = &model.graphs[&comp];
        let t = model
            .targets
            .sets
            .get(&comp)
            .and_then(|s| s.targets.values().find(|t| t.initializer == init))
            .expect("matched initializer has a target");
        let (dims, mut w) = g.read_f32(&init)?;
        for (module, mult, path, key) in mods {
            merge::merge_into(&mut w, &dims, t.layout, module, mult).map_err(|e| {
                e.context(format!(
                    "{}: module '{key}' into {comp} initializer '{init}' {dims:?}",
                    path.display()
                ))
            })?;
        }
        let dt = g
            .initializer(&init)
            .map(|t| t.data_type)
            .unwrap_or(data_type::FLOAT);
        let data = match dt {
            data_type::FLOAT16 => OverrideData::F16(merge::to_f16_clamped(&w)?),
            data_type::BFLOAT16 => OverrideData::BF16(merge::to_bf16(&w)?),
            _ => OverrideData::F32(w),
        };
        overrides.insert(
            (comp, init.clone()),
            InitializerOverride {
                component: comp,
                name: init,
                dims,
                data,
            },
        );
    }
    Ok(MergedOverrides {
        overrides,
        resolutions,
    })
}
