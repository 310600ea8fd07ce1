//! LoRA targets of an exported `.onnx` graph: which initializer holds the weight
//! of which PyTorch module, in which layout.
//!
//! Three exporter conventions are recognised:
//! * initializers named by their module path (`conv1.weight`, Gemm weights, the
//!   TorchScript exporter without constant folding, the dynamo exporter for Gemm/Conv);
//! * TorchScript node scopes (`/down_blocks.1/attentions.0/.../to_q/MatMul`) with an
//!   anonymous `onnx::MatMul_N` weight stored `[in, out]`;
//! * the dynamo exporter's node metadata `pkg.torch.onnx.name_scopes`, whose last
//!   module scope names the module of an anonymous `val_N` weight. (Only graphs
//!   saved at the exporter's own opset, 18 or more, have it: onnx's version
//!   converter, which torch runs for a lower `opset_version`, drops node
//!   metadata; such graphs need their `lora_targets.json`.)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::graph::dims_usize;
use crate::model::onnx_proto::NodeProto;
use crate::model::OnnxGraph;

/// How a weight is stored in its initializer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightLayout {
    /// `MatMul(x, W)` with `W` stored `[in, out]` (TorchScript constant folding).
    LinearInOut,
    /// `W` stored `[out, in]`: `Gemm` with `transB = 1`, or an FQN weight behind a `Transpose`.
    LinearOutIn,
    /// Convolution weight `[out, in, kh, kw]`.
    ConvOIHW,
}

impl WeightLayout {
    pub fn as_str(self) -> &'static str {
        match self {
            WeightLayout::LinearInOut => "LinearInOut",
            WeightLayout::LinearOutIn => "LinearOutIn",
            WeightLayout::ConvOIHW => "ConvOIHW",
        }
    }
    pub fn parse(s: &str) -> Option<WeightLayout> {
        match s {
            // The exporter's manifest spelling, and the Rust names.
            "linear_in_out" | "LinearInOut" => Some(WeightLayout::LinearInOut),
            "linear_out_in" | "LinearOutIn" => Some(WeightLayout::LinearOutIn),
            "conv_oihw" | "ConvOIHW" => Some(WeightLayout::ConvOIHW),
            _ => None,
        }
    }
    /// The PyTorch shape `[out, in, (kh, kw)]` of a weight stored with `stored` dims.
    pub fn torch_shape(self, stored: &[usize]) -> Vec<usize> {
        match self {
            WeightLayout::LinearInOut if stored.len() == 2 => vec![stored[1], stored[0]],
            _ => stored.to_vec(),
        }
    }
}

/// One weight-bearing MatMul / Gemm / Conv whose weight is an initializer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightTarget {
    /// PyTorch module path, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub module: String,
    /// Name of the initializer holding the weight.
    pub initializer: String,
    pub layout: WeightLayout,
    /// Dims of the initializer as stored.
    pub shape: Vec<usize>,
    /// The consuming node (op type and name), for messages.
    pub op_type: String,
    pub node: String,
}

impl WeightTarget {
    /// The PyTorch weight shape `[out, in, (kh, kw)]`.
    pub fn torch_shape(&self) -> Vec<usize> {
        self.layout.torch_shape(&self.shape)
    }
}

/// One entry of a `lora_targets.json` manifest written by our exporter.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ManifestEntry {
    pub module: String,
    pub initializer: String,
    pub layout: String,
}

/// The weight targets of one graph, by module path.
#[derive(Debug, Clone)]
pub struct GraphTargets {
    path: PathBuf,
    targets: BTreeMap<String, WeightTarget>,
    /// Why the graph's attention weights are packed (ORT's transformer optimizer), if they are.
    packed: Option<String>,
}

impl GraphTargets {
    /// Recovers the targets of `g` from its structure. A `lora_targets.json`
    /// beside the file, if present, is cross-checked against them and adds
    /// what the structure cannot name.
    pub fn discover(g: &OnnxGraph) -> Result<GraphTargets> {
        let mut t = Self::collect(g)?;
        let manifest = g.dir().join("lora_targets.json");
        if manifest.is_file() {
            t.apply_manifest(g, &manifest)?;
        }
        Ok(t)
    }

    /// Every recovered weight target, by module path (packed graphs included).
    pub fn all(&self) -> &BTreeMap<String, WeightTarget> {
        &self.targets
    }

    /// The targets a LoRA may be merged into; an error for graphs whose Q/K/V
    /// weights were packed by the ONNX Runtime transformer optimizer.
    pub fn lora_targets(&self) -> Result<&BTreeMap<String, WeightTarget>> {
        match &self.packed {
            Some(why) => Err(Error::invalid_model(format!(
                "{}: {why}. LoRA cannot be merged into packed Q/K/V weights. Export a LoRA-ready \
                 graph with `python -m spo_onnx.export` without the ONNX Runtime transformer \
                 optimizer (or with enable_packed_qkv / enable_packed_kv off)",
                self.path.display()
            ))),
            None => Ok(&self.targets),
        }
    }

    fn collect(g: &OnnxGraph) -> Result<GraphTargets> {
        let nodes = g.graph_nodes();
        let producer: HashMap<&str, &NodeProto> = nodes
            .iter()
            .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
            .collect();
        let mut targets: BTreeMap<String, WeightTarget> = BTreeMap::new();
        let mut packed: Option<String> = None;
        for node in nodes {
            let op = node.op_type.as_str();
            let fused = matches!(
                op,
                "Attention" | "PackedAttention" | "MultiHeadAttention" | "PackedMultiHeadAttention"
            );
            if fused && packed.is_none() {
                // Fused attention whose weights are an initializer input carries packed QKV.
                if let Some(w) = node.input.get(1).filter(|w| g.initializer(w).is_some()) {
                    packed = Some(format!(
                        "node '{}' ({op}) takes packed Q/K/V weights '{w}'",
                        node.name
                    ));
                }
            }
            if !matches!(op, "MatMul" | "Gemm" | "Conv") || !node.domain.is_empty() {
                continue;
            }
            let Some(wname) = node.input.get(1) else {
                continue;
            };
            // The weight: an initializer, or a Transpose / Identity of one.
            let (init_name, transposed) = if g.initializer(wname).is_some() {
                (wname.clone(), false)
            } else if let Some(p) = producer.get(wname.as_str()) {
                match p.op_type.as_str() {
                    "Transpose" if p.input.first().is_some_and(|i| g.initializer(i).is_some()) => {
                        let perm = attr_ints(p, "perm");
                        if !(perm.is_empty() || perm == [1, 0]) {
                            continue;
                        }
                        (p.input[0].clone(), true)
                    }
                    "Identity" if p.input.first().is_some_and(|i| g.initializer(i).is_some()) => {
                        (p.input[0].clone(), false)
                    }
                    _ => continue,
                }
            } else {
                continue;
            };
            let init = g.initializer(&init_name).expect("checked");
            let shape = dims_usize(init, g.path())?;
            let layout = match op {
                "Conv" => {
                    if shape.len() < 3 {
                        continue;
                    }
                    WeightLayout::ConvOIHW
                }
                _ => {
                    if shape.len() != 2 {
                        continue;
                    }
                    let trans_b = op == "Gemm" && attr_int(node, "transB") == Some(1);
                    if trans_b != transposed {
                        WeightLayout::LinearOutIn
                    } else {
                        WeightLayout::LinearInOut
                    }
                }
            };
            let Some(module) = module_path(node, &init_name) else {
                continue;
            };
            if packed.is_none() {
                packed = packed_reason(&module, &init_name, op, layout, &shape, &node.name);
            }
            if targets.contains_key(&module) {
                continue; // a module called twice shares one weight
            }
            targets.insert(
                module.clone(),
                WeightTarget {
                    module,
                    initializer: init_name,
                    layout,
                    shape,
                    op_type: op.to_string(),
                    node: node.name.clone(),
                },
            );
        }
        Ok(GraphTargets {
            path: g.path().to_owned(),
            targets,
            packed,
        })
    }

    fn apply_manifest(&mut self, g: &OnnxGraph, manifest: &Path) -> Result<()> {
        let text = std::fs::read_to_string(manifest).map_err(|e| Error::io(manifest, e))?;
        // The exporter writes {"format": 1, "modules": [...]}; a bare list is accepted too.
        let not_manifest = |e: &dyn std::fmt::Display| {
            Error::invalid_model(format!(
                "{}: not a LoRA target manifest: {e}",
                manifest.display()
            ))
        };
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| not_manifest(&e))?;
        if let Some(modules) = value.get_mut("modules") {
            value = modules.take();
        }
        let entries: Vec<ManifestEntry> =
            serde_json::from_value(value).map_err(|e| not_manifest(&e))?;
        for e in entries {
            let bad = |why: String| {
                Error::invalid_model(format!(
                    "{}: module '{}' (initializer '{}'): {why}",
                    manifest.display(),
                    e.module,
                    e.initializer
                ))
            };
            let layout = WeightLayout::parse(&e.layout)
                .ok_or_else(|| bad(format!("unknown layout '{}'", e.layout)))?;
            match self.targets.get(&e.module) {
                Some(t) if t.initializer == e.initializer && t.layout == layout => {}
                Some(t) => {
                    return Err(bad(format!(
                        "the graph has initializer '{}' layout {} for this module",
                        t.initializer,
                        t.layout.as_str()
                    )))
                }
                None => {
                    let Some(init) = g.initializer(&e.initializer) else {
                        return Err(bad("no such initializer in the graph".into()));
                    };
                    let shape = dims_usize(init, g.path())?;
                    self.targets.insert(
                        e.module.clone(),
                        WeightTarget {
                            module: e.module.clone(),
                            initializer: e.initializer.clone(),
                            layout,
                            shape,
                            op_type: "manifest".into(),
                            node: String::new(),
                        },
                    );
                }
            }
        }
        Ok(())
    }
}

fn attr_int(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .and_then(|a| a.i)
}

fn attr_ints(n: &NodeProto, name: &str) -> Vec<i64> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
        .unwrap_or_default()
}

/// Whether an initializer name is itself a module path + `.weight`.
fn fqn_module(init: &str) -> Option<&str> {
    let m = init.strip_suffix(".weight")?;
    let ok = !m.is_empty()
        && !init.contains(['/', ':'])
        && m.split('.')
            .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    ok.then_some(m)
}

/// The module path of a weight-bearing node: FQN initializer, dynamo name
/// scopes, or the TorchScript node scope, in that order.
fn module_path(node: &NodeProto, init: &str) -> Option<String> {
    if let Some(m) = fqn_module(init) {
        return Some(m.to_string());
    }
    if let Some(md) = node
        .metadata_props
        .iter()
        .find(|p| p.key == "pkg.torch.onnx.name_scopes")
    {
        if let Some(m) = dynamo_scope(&md.value) {
            return Some(m);
        }
    }
    torchscript_scope(&node.name)
}

/// `"['', 'down_blocks.0', 'down_blocks.0.resnets.0.conv1', 'conv2d_1']"`: the
/// entries are the nested module scopes, the last one is the op; the module is
/// the last scope before it.
pub fn dynamo_scope(v: &str) -> Option<String> {
    let inner = v.trim().strip_prefix('[')?.strip_suffix(']')?;
    let items: Vec<&str> = inner
        .split(',')
        .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"'))
        .collect();
    if items.len() < 2 {
        return None;
    }
    let m = items[items.len() - 2];
    (!m.is_empty()).then(|| m.to_string())
}

/// `/down_blocks.1/attentions.0/transformer_blocks.0/attn1/to_q/MatMul` ->
/// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`. A segment that
/// repeats its parent's full path (`/input_blocks.1/input_blocks.1.1/`, called
/// `nn.Sequential`s) replaces the parent.
pub fn torchscript_scope(name: &str) -> Option<String> {
    let rest = name.strip_prefix('/')?;
    let mut segs: Vec<&str> = rest.split('/').collect();
    segs.pop(); // the op
    let mut out: Vec<String> = Vec::new();
    for s in segs {
        if s.is_empty() {
            return None;
        }
        let joined = out.join(".");
        if !joined.is_empty() && s.starts_with(&format!("{joined}.")) {
            out = vec![s.to_string()];
        } else if let Some(prev) = out.last() {
            if s.starts_with(&format!("{prev}.")) {
                let n = out.len();
                out[n - 1] = s.to_string();
            } else {
                out.push(s.to_string());
            }
        } else {
            out.push(s.to_string());
        }
    }
    (!out.is_empty()).then(|| out.join("."))
}

/// Why a MatMul looks like one of ORT's packed Q/K/V (or K/V) projections.
fn packed_reason(
    module: &str,
    init: &str,
    op: &str,
    layout: WeightLayout,
    shape: &[usize],
    node: &str,
) -> Option<String> {
    if init.contains("QKV") || init.contains("_KV_") {
        return Some(format!(
            "initializer '{init}' {shape:?} (node '{node}') is a packed Q/K/V or K/V weight"
        ));
    }
    let last = module.rsplit('.').next().unwrap_or(module);
    let is_attn = last.starts_with("attn") && last[4..].chars().all(|c| c.is_ascii_digit());
    // Unpacked graphs only multiply by weights of the attention's children
    // (to_q, to_k, ...); a weight owned by `attnN` itself is a packed projection.
    (op == "MatMul" && is_attn && layout != WeightLayout::ConvOIHW).then(|| {
        format!(
            "node '{node}' in attention module '{module}' multiplies by '{init}' {shape:?}, \
             a packed Q/K/V projection"
        )
    })
}
