//! Reading an exported `.onnx` graph for LoRA: which initializer holds the weight
//! of which PyTorch module, in which layout, and the weight values themselves
//! (inline or external data).
//!
//! Three exporter conventions are recognised (`shared/reference/lora-formats.md` §3):
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
use std::fs::File;
use std::path::{Component as PathComponent, Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message;

use super::onnx_proto::{data_type, ModelProto, NodeProto, TensorProto, DATA_LOCATION_EXTERNAL};
use crate::error::{Error, Result};

/// Largest `.onnx` protobuf accepted (protobuf's own 2 GiB message limit).
const MAX_PROTO_BYTES: u64 = 2 << 30;

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

/// A parsed `.onnx` file.
pub struct OnnxGraph {
    path: PathBuf,
    dir: PathBuf,
    model: ModelProto,
    init_index: HashMap<String, usize>,
    targets: BTreeMap<String, WeightTarget>,
    packed: Option<String>,
    mmaps: Mutex<HashMap<PathBuf, Arc<memmap2::Mmap>>>,
}

impl std::fmt::Debug for OnnxGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxGraph")
            .field("path", &self.path)
            .field("targets", &self.targets.len())
            .finish()
    }
}

/// A layer norm over the last axis, read from a graph (see
/// [`OnnxGraph::layer_norm_of`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    pub scale: Vec<f32>,
    pub bias: Vec<f32>,
    pub epsilon: f32,
}

impl LayerNorm {
    /// Normalises every row of `x` (last axis = `scale.len()`) in place, in
    /// f64 like the reductions of torch's CPU kernel, to stay within fp32 ulps.
    pub fn apply(&self, x: &mut [f32]) {
        let d = self.scale.len();
        for row in x.chunks_exact_mut(d) {
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / d as f64;
            let var = row
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / d as f64;
            let inv = 1.0 / (var + f64::from(self.epsilon)).sqrt();
            for (v, (g, b)) in row.iter_mut().zip(self.scale.iter().zip(&self.bias)) {
                *v = ((f64::from(*v) - mean) * inv * f64::from(*g) + f64::from(*b)) as f32;
            }
        }
    }
}

/// One entry of a `lora_targets.json` manifest written by our exporter.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ManifestEntry {
    pub module: String,
    pub initializer: String,
    pub layout: String,
}

impl OnnxGraph {
    /// Reads and parses `path`. A `lora_targets.json` beside it, if present, is
    /// cross-checked against the recovered targets.
    pub fn open(path: impl AsRef<Path>) -> Result<OnnxGraph> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.len() > MAX_PROTO_BYTES {
            return Err(Error::invalid_model(format!(
                "{}: {} bytes is over the 2 GiB protobuf limit",
                path.display(),
                meta.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut g = Self::from_bytes(&bytes, path)?;
        let manifest = g.dir.join("lora_targets.json");
        if manifest.is_file() {
            g.apply_manifest(&manifest)?;
        }
        Ok(g)
    }

    /// Parses an in-memory `.onnx`; `path` names it in messages and anchors
    /// external data (its parent folder).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<OnnxGraph> {
        let model = ModelProto::decode(bytes).map_err(|e| {
            Error::invalid_model(format!(
                "{}: not a valid ONNX protobuf ({} bytes, truncated or corrupt): {e}",
                path.display(),
                bytes.len()
            ))
        })?;
        let Some(graph) = model.graph.as_ref() else {
            return Err(Error::invalid_model(format!(
                "{}: the ONNX model has no graph",
                path.display()
            )));
        };
        if graph.node.is_empty() {
            return Err(Error::invalid_model(format!(
                "{}: the ONNX graph has no nodes",
                path.display()
            )));
        }
        let init_index: HashMap<String, usize> = graph
            .initializer
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut g = OnnxGraph {
            path: path.to_path_buf(),
            dir,
            model,
            init_index,
            targets: BTreeMap::new(),
            packed: None,
            mmaps: Mutex::new(HashMap::new()),
        };
        g.collect_targets()?;
        Ok(g)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn model(&self) -> &ModelProto {
        &self.model
    }

    /// Every recovered weight target, by module path (packed graphs included).
    pub fn targets(&self) -> &BTreeMap<String, WeightTarget> {
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

    /// The initializer proto named `name`.
    pub fn initializer(&self, name: &str) -> Option<&TensorProto> {
        let g = self.model.graph.as_ref()?;
        self.init_index.get(name).map(|&i| &g.initializer[i])
    }

    fn graph_nodes(&self) -> &[NodeProto] {
        self.model
            .graph
            .as_ref()
            .map(|g| &g.node[..])
            .unwrap_or(&[])
    }

    fn collect_targets(&mut self) -> Result<()> {
        let nodes = self.graph_nodes();
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
                if let Some(w) = node
                    .input
                    .get(1)
                    .filter(|w| self.init_index.contains_key(*w))
                {
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
            let (init_name, transposed) = if self.init_index.contains_key(wname) {
                (wname.clone(), false)
            } else if let Some(p) = producer.get(wname.as_str()) {
                match p.op_type.as_str() {
                    "Transpose"
                        if p.input
                            .first()
                            .is_some_and(|i| self.init_index.contains_key(i)) =>
                    {
                        let perm = attr_ints(p, "perm");
                        if !(perm.is_empty() || perm == [1, 0]) {
                            continue;
                        }
                        (p.input[0].clone(), true)
                    }
                    "Identity"
                        if p.input
                            .first()
                            .is_some_and(|i| self.init_index.contains_key(i)) =>
                    {
                        (p.input[0].clone(), false)
                    }
                    _ => continue,
                }
            } else {
                continue;
            };
            let init = self.initializer(&init_name).expect("indexed");
            let shape = dims_usize(init, &self.path)?;
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
        self.targets = targets;
        self.packed = packed;
        Ok(())
    }

    fn apply_manifest(&mut self, manifest: &Path) -> Result<()> {
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
                    let Some(init) = self.initializer(&e.initializer) else {
                        return Err(bad("no such initializer in the graph".into()));
                    };
                    let shape = dims_usize(init, &self.path)?;
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

    /// The `LayerNormalization` applied to the value `input` (e.g. a CLIP
    /// encoder's final layer norm, which reads the last `hidden_states.N`
    /// output): its scale, bias (zeros when absent) and epsilon. Found by
    /// structure, not by name, so both torch exporters work; scale and bias
    /// are followed through `Identity` nodes (the TorchScript exporter shares
    /// equal parameters that way).
    pub fn layer_norm_of(&self, input: &str) -> Result<Option<LayerNorm>> {
        let nodes = self.graph_nodes();
        let Some(n) = nodes.iter().find(|n| {
            n.op_type == "LayerNormalization" && n.input.first().is_some_and(|i| i == input)
        }) else {
            return Ok(None);
        };
        let mut producer: HashMap<&str, &NodeProto> = HashMap::new();
        for p in nodes {
            for o in &p.output {
                producer.insert(o, p);
            }
        }
        let resolve = |name: &str| {
            let mut name = name.to_owned();
            // bounded: a corrupt graph may chain Identity nodes in a cycle
            for _ in 0..nodes.len() {
                match producer.get(name.as_str()) {
                    Some(p) if p.op_type == "Identity" && !p.input.is_empty() => {
                        name = p.input[0].clone()
                    }
                    _ => break,
                }
            }
            name
        };
        let scale_name = n.input.get(1).map(|s| resolve(s)).unwrap_or_default();
        let (_, scale) = self.read_f32(&scale_name)?;
        let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
            Some(b) => self.read_f32(&resolve(b))?.1,
            None => vec![0.0; scale.len()],
        };
        if bias.len() != scale.len() || attr_int(n, "axis").is_some_and(|a| a != -1) {
            return Err(Error::invalid_model(format!(
                "{}: layer norm '{}' is not over the last axis with matching scale and bias",
                self.path.display(),
                n.name
            )));
        }
        let epsilon = n
            .attribute
            .iter()
            .find(|a| a.name == "epsilon")
            .and_then(|a| a.f)
            .unwrap_or(1e-5);
        Ok(Some(LayerNorm {
            scale,
            bias,
            epsilon,
        }))
    }

    /// Dims and ONNX data type of the initializer `name`.
    pub fn initializer_info(&self, name: &str) -> Option<(Vec<usize>, i32)> {
        let t = self.initializer(name)?;
        Some((dims_usize(t, &self.path).ok()?, t.data_type))
    }

    /// The values of the initializer `name` as f32 (from FLOAT, FLOAT16 or BFLOAT16).
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.initializer(name).ok_or_else(|| {
            Error::invalid_model(format!("{}: no initializer '{name}'", self.path.display()))
        })?;
        self.tensor_f32(t)
    }

    /// The values of any float tensor of this model (an initializer or a
    /// constant attribute; inline or external data) as f32, with its dims.
    pub fn tensor_f32(&self, t: &TensorProto) -> Result<(Vec<usize>, Vec<f32>)> {
        let dims = dims_usize(t, &self.path)?;
        let n = numel(&dims).ok_or_else(|| self.bad_tensor(t, "element count overflows"))?;
        let elem = match t.data_type {
            data_type::FLOAT => 4,
            data_type::FLOAT16 | data_type::BFLOAT16 => 2,
            other => {
                return Err(self.bad_tensor(t, &format!("data type {other} is not a float type")))
            }
        };
        let nbytes = n
            .checked_mul(elem)
            .ok_or_else(|| self.bad_tensor(t, "byte size overflows"))?;
        let values = if t.data_location == DATA_LOCATION_EXTERNAL {
            let bytes = self.external_bytes(t, nbytes)?;
            decode_le(&bytes, t.data_type)
        } else if !t.raw_data.is_empty() || n == 0 {
            if t.raw_data.len() != nbytes {
                return Err(self.bad_tensor(
                    t,
                    &format!("raw_data has {} bytes, expected {nbytes}", t.raw_data.len()),
                ));
            }
            decode_le(&t.raw_data, t.data_type)
        } else if t.data_type == data_type::FLOAT {
            if t.float_data.len() != n {
                return Err(self.bad_tensor(
                    t,
                    &format!("float_data has {} values, expected {n}", t.float_data.len()),
                ));
            }
            t.float_data.clone()
        } else {
            if t.int32_data.len() != n {
                return Err(self.bad_tensor(
                    t,
                    &format!("int32_data has {} values, expected {n}", t.int32_data.len()),
                ));
            }
            let bits: Vec<u16> = t.int32_data.iter().map(|&v| v as u16).collect();
            bits16_to_f32(&bits, t.data_type)
        };
        Ok((dims, values))
    }

    fn bad_tensor(&self, t: &TensorProto, why: &str) -> Error {
        Error::invalid_model(format!(
            "{}: initializer '{}' {:?}: {why}",
            self.path.display(),
            t.name,
            t.dims
        ))
    }

    fn external_bytes(&self, t: &TensorProto, nbytes: usize) -> Result<Vec<u8>> {
        let mut location = None;
        let mut offset = 0u64;
        let mut length = None;
        for kv in &t.external_data {
            match kv.key.as_str() {
                "location" => location = Some(kv.value.clone()),
                "offset" => {
                    offset = kv
                        .value
                        .parse()
                        .map_err(|_| self.bad_tensor(t, &format!("bad offset '{}'", kv.value)))?
                }
                "length" => {
                    length =
                        Some(kv.value.parse::<u64>().map_err(|_| {
                            self.bad_tensor(t, &format!("bad length '{}'", kv.value))
                        })?)
                }
                _ => {}
            }
        }
        let location =
            location.ok_or_else(|| self.bad_tensor(t, "external data without a location"))?;
        let rel = Path::new(&location);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, PathComponent::Normal(_) | PathComponent::CurDir))
        {
            return Err(self.bad_tensor(
                t,
                &format!("external data location '{location}' leaves the model folder"),
            ));
        }
        let length = length.unwrap_or(nbytes as u64);
        if length != nbytes as u64 {
            return Err(self.bad_tensor(
                t,
                &format!("external data length {length} but the tensor needs {nbytes} bytes"),
            ));
        }
        let file = self.dir.join(rel);
        let map = {
            let mut maps = self.mmaps.lock();
            if let Some(m) = maps.get(&file) {
                m.clone()
            } else {
                let f = File::open(&file).map_err(|e| Error::io(&file, e))?;
                // SAFETY: the mapping is read-only; a concurrent truncation of the
                // file by another process is outside what this library guards against.
                let m =
                    Arc::new(unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&file, e))?);
                maps.insert(file.clone(), m.clone());
                m
            }
        };
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= map.len() as u64);
        let Some(end) = end else {
            return Err(self.bad_tensor(
                t,
                &format!(
                    "external data {}: offset {offset} + length {length} is past the end ({} bytes)",
                    file.display(),
                    map.len()
                ),
            ));
        };
        Ok(map[offset as usize..end as usize].to_vec())
    }
}

fn numel(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

fn dims_usize(t: &TensorProto, path: &Path) -> Result<Vec<usize>> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                Error::invalid_model(format!(
                    "{}: initializer '{}' has a negative dim {:?}",
                    path.display(),
                    t.name,
                    t.dims
                ))
            })
        })
        .collect()
}

fn decode_le(bytes: &[u8], dt: i32) -> Vec<f32> {
    if dt == data_type::FLOAT {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        let bits: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        bits16_to_f32(&bits, dt)
    }
}

fn bits16_to_f32(bits: &[u16], dt: i32) -> Vec<f32> {
    if dt == data_type::BFLOAT16 {
        bits.iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect()
    } else {
        bits.iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect()
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
