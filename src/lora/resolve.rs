//! Matching the modules of a [`LoraFile`] to the weight initializers of a model,
//! with shape checks. Every key ends up either matched or reported unmatched
//! with a reason; nothing is dropped silently.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::format::{LoraFile, LoraKind, LoraModule};
use super::keys::{AliasTable, Component, UnetLayout};
use super::targets::{GraphTargets, WeightLayout, WeightTarget};
use crate::error::{Error, Result};
use crate::model::OnnxGraph;

/// The merge targets of one component (from a graph, or from a structure dump).
#[derive(Debug, Clone)]
pub struct TargetSet {
    pub component: Component,
    /// Module path -> target.
    pub targets: BTreeMap<String, WeightTarget>,
    /// UNet block layout for SGM names (inferred from the paths when `None`).
    pub layout: Option<UnetLayout>,
}

impl TargetSet {
    /// The LoRA targets of `graph` (an error for packed-QKV graphs).
    pub fn from_graph(
        component: Component,
        graph: &OnnxGraph,
        layout: Option<UnetLayout>,
    ) -> Result<TargetSet> {
        Ok(TargetSet {
            component,
            targets: GraphTargets::discover(graph)?.lora_targets()?.clone(),
            layout,
        })
    }
}

/// All components' targets plus the alias table over them.
#[derive(Debug, Clone)]
pub struct ModelTargets {
    pub sets: BTreeMap<Component, TargetSet>,
    table: AliasTable,
}

impl ModelTargets {
    pub fn new(sets: Vec<TargetSet>) -> ModelTargets {
        let mut table = AliasTable::new();
        let mut map = BTreeMap::new();
        for s in sets {
            let paths: Vec<&str> = s.targets.keys().map(String::as_str).collect();
            table.add_component(s.component, paths.iter().copied(), s.layout.as_ref());
            map.insert(s.component, s);
        }
        ModelTargets { sets: map, table }
    }

    pub fn table(&self) -> &AliasTable {
        &self.table
    }

    pub fn target(&self, comp: Component, module: &str) -> Option<&WeightTarget> {
        self.sets.get(&comp)?.targets.get(module)
    }
}

/// One LoRA module matched to one initializer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The LoRA key stem.
    pub key: String,
    pub component: Component,
    pub module: String,
    pub initializer: String,
    pub layout: WeightLayout,
    /// Stored initializer dims.
    pub shape: Vec<usize>,
    /// `lora`, `locon-tucker`, `loha`, `lokr`.
    pub kind: &'static str,
}

/// The outcome of resolving one LoRA file.
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    pub file: PathBuf,
    pub matched: Vec<Match>,
    /// (key stem, reason).
    pub unmatched: Vec<(String, String)>,
    /// Keys that name a module another key already matched (two spellings of
    /// one module), each with the sentence that names both keys.
    pub duplicates: Vec<(String, String)>,
}

impl Resolution {
    pub fn is_complete(&self) -> bool {
        self.unmatched.is_empty() && self.duplicates.is_empty()
    }

    /// Refuses duplicates always (applying a module twice silently doubles
    /// its weight, and picking one spelling would hide which one the author
    /// meant); refuses unmatched keys when `strict`.
    pub fn into_checked(self, strict: bool) -> Result<Resolution> {
        if let Some((_, why)) = self.duplicates.first() {
            return Err(Error::invalid_lora(format!(
                "{}: {why}; a LoRA must name each module once",
                self.file.display()
            )));
        }
        if strict {
            self.into_strict()
        } else {
            Ok(self)
        }
    }

    /// `Ok(self)` when every key matched, else an `InvalidLora` error listing
    /// (up to 10 of) the unmatched keys and why.
    pub fn into_strict(self) -> Result<Resolution> {
        if self.unmatched.is_empty() {
            return Ok(self);
        }
        let shown: Vec<String> = self
            .unmatched
            .iter()
            .take(10)
            .map(|(k, why)| format!("'{k}': {why}"))
            .collect();
        Err(Error::invalid_lora(format!(
            "{}: {} of {} LoRA modules do not fit the model: {}{}",
            self.file.display(),
            self.unmatched.len(),
            self.unmatched.len() + self.matched.len(),
            shown.join("; "),
            if self.unmatched.len() > 10 {
                "; ..."
            } else {
                ""
            }
        )))
    }
}

/// `(out, in, kernel)` the module produces, where knowable without the target.
fn lora_dims(m: &LoraModule) -> Option<(usize, usize, Vec<usize>)> {
    match &m.kind {
        LoraKind::Lora { down, up, mid } => {
            let kernel = match mid {
                Some(mid) => mid.shape[2..].to_vec(),
                None => down.shape[2..].to_vec(),
            };
            Some((up.shape[0], down.shape[1], kernel))
        }
        LoraKind::LoHa {
            w1a, w1b, t1: None, ..
        } => Some((w1a.shape[0], w1b.rows_cols().1, vec![])),
        _ => None,
    }
}

/// Checks that `m` fits a weight of PyTorch shape `torch` (`[out, in, (kh, kw)]`).
pub fn check_shape(m: &LoraModule, torch: &[usize]) -> std::result::Result<(), String> {
    let out = torch[0];
    let inn = torch.get(1).copied().unwrap_or(1);
    let kernel: Vec<usize> = torch.get(2..).map(|k| k.to_vec()).unwrap_or_default();
    let ksz: usize = kernel.iter().product();
    let ones = |k: &[usize]| k.iter().all(|&d| d == 1);
    let bad = |lo: usize, li: String| {
        Err(format!(
            "shape mismatch: the LoRA is [out {lo}, in {li}] but the weight is {torch:?} ([out, in, kernel])"
        ))
    };
    match (&m.kind, lora_dims(m)) {
        (LoraKind::LoHa { .. }, Some((o, cols, _))) => {
            if o != out || cols != inn * ksz.max(1) {
                return bad(o, format!("{cols} (in·kh·kw)"));
            }
        }
        (_, Some((o, i, k))) => {
            let kernel_ok = k == kernel || (ones(&k) && ones(&kernel));
            if o != out || i != inn || !kernel_ok {
                return bad(o, format!("{i}, kernel {k:?}"));
            }
        }
        // The delta itself is the check (its allocation failing, too, is
        // reported as the reason; the merge would fail the same way).
        (LoraKind::LoKr { .. }, None) => {
            super::merge::delta(m, torch).map_err(|e| e.message)?;
        }
        _ => {
            super::merge::delta(m, torch).map_err(|e| e.message)?;
        }
    }
    if let Some(d) = &m.dora_scale {
        if d.numel() != out && d.numel() != inn {
            return Err(format!(
                "dora_scale {:?} fits neither the output ({out}) nor the input ({inn}) of weight {torch:?}",
                d.shape
            ));
        }
    }
    Ok(())
}

/// Resolves every module of `lora` against `targets`.
pub fn resolve(lora: &LoraFile, targets: &ModelTargets) -> Resolution {
    let mut res = Resolution {
        file: lora.path.clone(),
        ..Default::default()
    };
    let mut seen: BTreeMap<(Component, &str), &str> = BTreeMap::new();
    for (stem, m) in &lora.modules {
        let (comp, module) = match targets.table.resolve(stem) {
            Ok(x) => x,
            Err(why) => {
                res.unmatched.push((stem.clone(), why));
                continue;
            }
        };
        let t = targets
            .target(comp, module)
            .expect("alias table built from targets");
        let torch = t.torch_shape();
        if let Err(why) = check_shape(m, &torch) {
            res.unmatched.push((
                stem.clone(),
                format!(
                    "{comp} module '{module}' (initializer '{}' {:?}): {why}",
                    t.initializer, t.shape
                ),
            ));
            continue;
        }
        if let Some(first) = seen.insert((comp, module), stem) {
            res.duplicates.push((
                stem.clone(),
                format!("keys '{first}' and '{stem}' both name {comp} module '{module}'"),
            ));
            continue;
        }
        res.matched.push(Match {
            key: stem.clone(),
            component: comp,
            module: module.to_string(),
            initializer: t.initializer.clone(),
            layout: t.layout,
            shape: t.shape.clone(),
            kind: m.kind.name(),
        });
    }
    res
}
