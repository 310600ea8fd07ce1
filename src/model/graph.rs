//! Reading an exported `.onnx` graph: its nodes, initializers and their values
//! (inline or external data), and small structural queries (the layer norm
//! after a value). Which initializer holds which PyTorch module's weight is
//! LoRA's question, answered in `crate::lora::targets`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component as PathComponent, Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message;

use super::onnx_proto::{data_type, ModelProto, NodeProto, TensorProto, DATA_LOCATION_EXTERNAL};
use crate::error::{Error, Result};

/// Largest `.onnx` protobuf accepted (protobuf's own 2 GiB message limit).
const MAX_PROTO_BYTES: u64 = 2 << 30;

/// A parsed `.onnx` file.
pub struct OnnxGraph {
    path: PathBuf,
    dir: PathBuf,
    model: ModelProto,
    init_index: HashMap<String, usize>,
    mmaps: Mutex<HashMap<PathBuf, Arc<memmap2::Mmap>>>,
}

impl std::fmt::Debug for OnnxGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxGraph")
            .field("path", &self.path)
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

impl OnnxGraph {
    /// Reads and parses `path`.
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
        Self::from_bytes(&bytes, path)
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
        Ok(OnnxGraph {
            path: path.to_path_buf(),
            dir,
            model,
            init_index,
            mmaps: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn model(&self) -> &ModelProto {
        &self.model
    }

    /// The initializer proto named `name`.
    pub fn initializer(&self, name: &str) -> Option<&TensorProto> {
        let g = self.model.graph.as_ref()?;
        self.init_index.get(name).map(|&i| &g.initializer[i])
    }

    /// The folder of the file (external data and side files are relative to it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The graph's nodes, in order.
    pub fn graph_nodes(&self) -> &[NodeProto] {
        self.model
            .graph
            .as_ref()
            .map(|g| &g.node[..])
            .unwrap_or(&[])
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

pub(crate) fn dims_usize(t: &TensorProto, path: &Path) -> Result<Vec<usize>> {
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
