//! Applying LoRAs to a loaded pipeline.
//!
//! Merge mode computes `W' = W + Σ m·(α/r)·ΔW` per target initializer
//! (`lora::merged_overrides`) and rebuilds only the sessions whose overrides
//! changed, handing the merged weights to ONNX Runtime as initializer
//! overrides. Applying the same list again rebuilds nothing. Slots mode (graphs
//! exported with `--lora-slots`) feeds the low-rank factors as UNet inputs, so a
//! switch costs no rebuild.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use ort::value::{DynValue, Tensor};

use super::{BusyGuard, Pipeline};
use crate::error::{Error, ErrorCode, Result};
use crate::lora::slots;
use crate::lora::{
    merged_overrides, Component, LoraFile, MergeOptions, ModelGraphs, OverrideData, Resolution,
};
use crate::memory;
use crate::model::tensors::NamedTensors;
use crate::runtime::session::Graph;

/// The name of the hot-swap slot buffers in out-of-memory errors.
const SLOT: &str = "the LoRA slot inputs";

/// How LoRAs reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMode {
    /// Slots when the UNet was exported with them, else merge.
    Auto,
    /// Merge into the weights and rebuild the affected sessions.
    Merge,
    /// Feed adapters to a `--lora-slots` UNet as inputs; no rebuild.
    Slots,
}

impl LoraMode {
    pub fn parse(s: &str) -> Option<LoraMode> {
        Some(match s {
            "auto" => LoraMode::Auto,
            "merge" => LoraMode::Merge,
            "slots" => LoraMode::Slots,
            _ => return None,
        })
    }
}

/// A loaded LoRA file: immutable and shareable between pipelines and threads.
#[derive(Clone, Debug)]
pub struct Lora(pub Arc<LoraFile>);

impl Lora {
    pub fn open(path: &std::path::Path) -> Result<Lora> {
        Ok(Lora(Arc::new(LoraFile::open(path)?)))
    }

    /// [`Lora::open`] within a runtime's `limits.max_file_bytes`.
    pub fn open_limited(path: &std::path::Path, limits: &crate::limits::Limits) -> Result<Lora> {
        Ok(Lora(Arc::new(LoraFile::open_limited(path, limits)?)))
    }

    /// Answers `spo_lora_info` keys: path, format, dialect, modules, rank, alpha.
    pub fn info(&self, key: &str) -> Option<String> {
        let f = &self.0;
        let ranks: BTreeSet<usize> = f.modules.values().filter_map(|m| m.rank).collect();
        let alphas: BTreeSet<String> = f
            .modules
            .values()
            .map(|m| m.alpha.map_or("none".into(), |a| a.to_string()))
            .collect();
        let join = |v: Vec<String>| v.join(",");
        Some(match key {
            "path" => f.path.display().to_string(),
            "format" => format!("{:?}", f.format),
            "dialect" => format!("{:?}", f.dialect),
            "modules" => f.modules.len().to_string(),
            "rank" => join(ranks.iter().map(|r| r.to_string()).collect()),
            "alpha" => join(alphas.into_iter().collect()),
            _ => return None,
        })
    }

    pub const INFO_KEYS: &'static [&'static str] =
        &["path", "format", "dialect", "modules", "rank", "alpha"];
}

/// Named UNet inputs (LoRA slot tensors).
pub type SlotInputs = Vec<(String, ArrayD<f32>)>;

/// Per slotted module: the `down` and `up` factors of each LoRA on it.
type SlotFactors = BTreeMap<String, (Vec<ArrayD<f32>>, Vec<ArrayD<f32>>)>;

/// What a pipeline has applied.
#[derive(Default)]
pub(crate) struct LoraState {
    /// Identity of the applied list: (file pointer, multiplier bits).
    applied: Vec<(usize, u32)>,
    mode: Option<LoraMode>,
    /// Components whose sessions carry overrides now.
    touched: BTreeSet<Component>,
    /// The parsed graphs, read once on first use.
    graphs: Option<Arc<ModelGraphs>>,
    /// Slots mode: the UNet's `lora.<module>.down/.up` inputs to feed each call.
    pub slot_inputs: Arc<SlotInputs>,
}

impl LoraState {
    /// Whether any LoRA is applied.
    pub fn is_active(&self) -> bool {
        !self.applied.is_empty()
    }

    pub fn mode_name(&self) -> &'static str {
        match (self.mode, self.applied.is_empty()) {
            (_, true) | (None, _) => "none",
            (Some(LoraMode::Slots), _) => "slots",
            _ => "merge",
        }
    }
}

/// A merged initializer as the ONNX Runtime value that
/// [`Graph::load_with_initializers`] takes (public for the merge benchmark).
pub fn override_value(o: &crate::lora::InitializerOverride) -> Result<DynValue> {
    let shape = IxDyn(&o.dims);
    let bad = |e: ndarray::ShapeError| {
        Error::invalid_lora(format!("override '{}' {:?}: {e}", o.name, o.dims))
    };
    Ok(match &o.data {
        OverrideData::F32(v) => {
            Tensor::from_array(ArrayD::from_shape_vec(shape, v.clone()).map_err(bad)?)?.into_dyn()
        }
        OverrideData::F16(v) => {
            Tensor::from_array(ArrayD::from_shape_vec(shape, v.clone()).map_err(bad)?)?.into_dyn()
        }
        OverrideData::BF16(_) => {
            return Err(Error::unsupported(format!(
                "bfloat16 initializer '{}' cannot be overridden yet",
                o.name
            )))
        }
    })
}

impl Pipeline {
    /// Applies `loras` (each with its multiplier), replacing what was applied
    /// before; an empty list removes all. Returns each file's key resolution.
    /// Fails with `Busy` while a job is active. Unmatched keys are an error
    /// unless the pipeline was loaded with `lora.allow_partial=true`, when they
    /// are logged as warnings.
    pub fn set_loras(&self, loras: &[(Lora, f32)], mode: LoraMode) -> Result<Vec<Resolution>> {
        let _busy = BusyGuard::acquire(self)?;
        let inner = &self.inner;
        let mode = match mode {
            LoraMode::Auto if self.has_lora_slots() => LoraMode::Slots,
            LoraMode::Auto => LoraMode::Merge,
            m => m,
        };
        if mode == LoraMode::Slots && !self.has_lora_slots() {
            return Err(Error::unsupported(format!(
                "slots mode needs a UNet exported with --lora-slots; {} has no lora.* inputs",
                inner.folder.graph("unet").display()
            )));
        }
        let identity: Vec<(usize, u32)> = loras
            .iter()
            .map(|(l, m)| (Arc::as_ptr(&l.0) as usize, m.to_bits()))
            .collect();
        let mut state = inner.lora.lock();
        let graphs = match &state.graphs {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(ModelGraphs::open(&inner.folder.dir)?);
                state.graphs = Some(g.clone());
                g
            }
        };
        let files: Vec<(&LoraFile, f32)> = loras.iter().map(|(l, m)| (&*l.0, *m)).collect();
        if mode == LoraMode::Slots {
            let (inputs, resolutions) = self.slot_inputs(&graphs, &files)?;
            self.restore_plain_sessions(&mut state)?;
            state.slot_inputs = Arc::new(inputs);
            state.applied = identity;
            state.mode = Some(mode);
            return Ok(resolutions);
        }
        let merged = merged_overrides(
            &graphs,
            &files,
            MergeOptions {
                strict: !inner.allow_partial_lora,
            },
        )?;
        for r in &merged.resolutions {
            for (key, why) in &r.unmatched {
                inner.runtime.logger().warn(&format!(
                    "{}: LoRA key '{key}' not applied: {why}",
                    r.file.display()
                ));
            }
        }
        if state.applied == identity && state.mode == Some(mode) {
            return Ok(merged.resolutions);
        }
        let mut by_component: BTreeMap<Component, Vec<(String, DynValue)>> = BTreeMap::new();
        for ((comp, name), o) in &merged.overrides {
            by_component
                .entry(*comp)
                .or_default()
                .push((name.clone(), override_value(o)?));
        }
        let now: BTreeSet<Component> = by_component.keys().copied().collect();
        let rebuild: BTreeSet<Component> = now.union(&state.touched).copied().collect();
        // Build every new session first, so a failure leaves the pipeline as it was.
        let mut built = Vec::new();
        for comp in &rebuild {
            let path = inner.folder.graph(comp.folder());
            let inits = by_component.remove(comp).unwrap_or_default();
            built.push((
                *comp,
                Graph::load_with_initializers(&inner.runtime, comp.folder(), &path, inits)?,
            ));
        }
        let mut models = inner.models.lock();
        for (comp, g) in built {
            models.replace(comp, g)?;
        }
        state.applied = identity;
        state.mode = Some(mode);
        state.touched = now;
        state.slot_inputs = Arc::new(Vec::new());
        inner.runtime.logger().info(&format!(
            "applied {} LoRA(s) in merge mode; rebuilt {} session(s)",
            loras.len(),
            rebuild.len()
        ));
        Ok(merged.resolutions)
    }

    /// Feeds trained LoRA parameters straight to a slots UNet: `params` in
    /// PEFT form (`<module>.lora_A.weight` [r,in], `<module>.lora_B.weight`
    /// [out,r]) with scale `alpha / r`. How a trainer samples with its current
    /// LoRA: no file, no merge, no session rebuild. Replaces what was applied;
    /// every module needs a slot, and a module without one is an error naming
    /// it. Fails with `Busy` while a job is active.
    pub fn set_lora_params(&self, params: &NamedTensors, alpha: f32) -> Result<()> {
        let _busy = BusyGuard::acquire(self)?;
        let inner = &self.inner;
        if !self.has_lora_slots() {
            return Err(Error::unsupported(format!(
                "LoRA parameters need a UNet exported with --lora-slots; {} has no lora.* inputs",
                inner.folder.graph("unet").display()
            )));
        }
        let slots: BTreeSet<String> = inner
            .models
            .lock()
            .unet
            .optional_inputs
            .iter()
            .map(|i| i.name.clone())
            .collect();
        let mut inputs = Vec::new();
        for (key, a) in params {
            let Some(module) = key.strip_suffix(".lora_A.weight") else {
                continue;
            };
            let b = params
                .get(&format!("{module}.lora_B.weight"))
                .ok_or_else(|| {
                    Error::invalid_lora(format!("LoRA parameters: '{module}' has A but no B"))
                })?;
            let rank = a.shape().first().copied().unwrap_or(0);
            if rank == 0 || b.shape().get(1) != Some(&rank) || !alpha.is_finite() {
                return Err(Error::invalid_lora(format!(
                    "LoRA parameters: '{module}' A {:?} / B {:?} / alpha {alpha} are not a LoRA pair",
                    a.shape(),
                    b.shape()
                )));
            }
            let (down, up) = (slots::down_input(module), slots::up_input(module));
            if !slots.contains(&down) || !slots.contains(&up) {
                return Err(Error::invalid_lora(format!(
                    "LoRA parameters: module '{module}' has no LoRA slot in this UNet"
                )));
            }
            inputs.push((down, a.clone()));
            inputs.push((up, b.mapv(|v| v * alpha / rank as f32)));
        }
        // Each A gave two inputs, consuming its B: any other key is left over.
        if inputs.is_empty() || inputs.len() != params.len() {
            return Err(Error::invalid_lora(
                "LoRA parameters: every key must be a '<module>.lora_A.weight' / \
                 '<module>.lora_B.weight' pair, and there must be at least one",
            ));
        }
        let mut state = inner.lora.lock();
        self.restore_plain_sessions(&mut state)?;
        state.slot_inputs = Arc::new(inputs);
        state.applied = vec![(Arc::as_ptr(&state.slot_inputs) as usize, alpha.to_bits())];
        state.mode = Some(LoraMode::Slots);
        Ok(())
    }

    /// Sessions that carried merged weights go back to the plain graph.
    fn restore_plain_sessions(&self, state: &mut LoraState) -> Result<()> {
        let inner = &self.inner;
        let mut models = inner.models.lock();
        for comp in std::mem::take(&mut state.touched) {
            let path = inner.folder.graph(comp.folder());
            models.replace(comp, Graph::load(&inner.runtime, comp.folder(), &path)?)?;
        }
        Ok(())
    }

    fn has_lora_slots(&self) -> bool {
        self.inner
            .models
            .lock()
            .unet
            .optional_inputs
            .iter()
            .any(|i| crate::lora::slots::is_slot_input(&i.name))
    }

    /// The slot inputs for `files`: per slotted module, `down` [r, in] and
    /// `up` [out, r] with `multiplier * alpha / rank` folded into `up`; several
    /// LoRAs on one module are concatenated along the rank axis. Modules that
    /// have no slot (text encoders, resnets) or kinds that are not plain
    /// low-rank (LoHa, LoKr, DoRA, Tucker LoCon) are refused: use merge mode.
    fn slot_inputs(
        &self,
        graphs: &ModelGraphs,
        files: &[(&LoraFile, f32)],
    ) -> Result<(SlotInputs, Vec<Resolution>)> {
        let models = self.inner.models.lock();
        let slots: BTreeSet<&str> = models
            .unet
            .optional_inputs
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        let mut per_slot: SlotFactors = BTreeMap::new();
        let mut resolutions = Vec::new();
        for (file, mult) in files {
            let res = crate::lora::resolve(file, &graphs.targets)
                .into_checked(!self.inner.allow_partial_lora)?;
            for m in &res.matched {
                let refuse = |why: &str| {
                    Error::invalid_lora(format!(
                        "{}: '{}' ({} {}) {why}; use merge mode",
                        file.path.display(),
                        m.key,
                        m.component.folder(),
                        m.module
                    ))
                };
                let down_name = crate::lora::slots::down_input(&m.module);
                if m.component != Component::Unet || !slots.contains(down_name.as_str()) {
                    return Err(refuse("has no LoRA slot in this UNet"));
                }
                let module = &file.modules[&m.key];
                let (down, up) = match (&module.kind, &module.dora_scale) {
                    (
                        crate::lora::LoraKind::Lora {
                            down,
                            up,
                            mid: None,
                        },
                        None,
                    ) => (down, up),
                    _ => {
                        return Err(refuse(&format!(
                            "is a {} module, which slots cannot express",
                            m.kind
                        )))
                    }
                };
                let r = down.shape[0];
                let inn = down.data.len() / r.max(1);
                let out = up.shape[0];
                let scale = mult * module.scale();
                let down_copy = memory::collect(down.data.len(), down.data.iter().copied(), SLOT)?;
                let d = ArrayD::from_shape_vec(IxDyn(&[r, inn]), down_copy)
                    .map_err(|e| refuse(&e.to_string()))?;
                let up_scaled =
                    memory::collect(up.data.len(), up.data.iter().map(|v| v * scale), SLOT)?;
                let u = ArrayD::from_shape_vec(IxDyn(&[out, r]), up_scaled)
                    .map_err(|e| refuse(&e.to_string()))?;
                let e = per_slot.entry(m.module.clone()).or_default();
                e.0.push(d);
                e.1.push(u);
            }
            resolutions.push(res);
        }
        let mut inputs = Vec::new();
        for (module, (downs, ups)) in per_slot {
            let cat = |parts: &[ArrayD<f32>], axis| {
                let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                memory::concat(axis, &views, SLOT).map_err(|e| match e.code {
                    ErrorCode::OutOfMemory => e,
                    _ => Error::invalid_lora(format!("LoRA slot {module}: {}", e.message)),
                })
            };
            inputs.push((crate::lora::slots::down_input(&module), cat(&downs, 0)?));
            inputs.push((crate::lora::slots::up_input(&module), cat(&ups, 1)?));
        }
        Ok((inputs, resolutions))
    }
}
