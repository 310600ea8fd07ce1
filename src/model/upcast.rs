//! fp16 → fp32 graph conversion: the ONNX counterpart of diffusers'
//! `force_upcast`. The SDXL VAE overflows fp16 (activations past 65504 turn
//! into inf, then NaN after the next GroupNorm), so diffusers runs it in fp32
//! unless the checkpoint is the fp16-fix. An fp16 ONNX VAE cannot be cast at
//! run time, so its graph is rewritten before the session is built:
//!
//! * FLOAT16 initializers and constant tensors (`Constant`, `ConstantOfShape`,
//!   any tensor attribute) become FLOAT with the same values;
//! * `Cast(to=FLOAT16)` becomes `Cast(to=FLOAT)`;
//! * every FLOAT16 input, output and value_info becomes FLOAT, in subgraphs too.
//!
//! The weights keep their fp16-rounded values; only the arithmetic widens,
//! which is exactly what `vae.to(torch.float32)` does to an fp16 checkpoint.
//! External data is read in and written inline, so the result is one buffer
//! for `Session::commit_from_memory` (a VAE is far below the 2 GiB limit).

use prost::Message;

use super::graph::OnnxGraph;
use super::onnx_proto::{
    data_type, AttributeProto, GraphProto, TensorProto, ValueInfoProto, DATA_LOCATION_EXTERNAL,
};
use crate::error::{Error, Result};

/// `AttributeProto.type` INT.
const ATTR_INT: i32 = 2;

/// Whether any graph input or output of `graph` is FLOAT16.
pub fn has_fp16_io(graph: &OnnxGraph) -> bool {
    graph.model().graph.as_ref().is_some_and(|g| {
        g.input
            .iter()
            .chain(&g.output)
            .any(|v| elem_type(v) == Some(data_type::FLOAT16))
    })
}

fn elem_type(v: &ValueInfoProto) -> Option<i32> {
    Some(v.r#type.as_ref()?.tensor_type.as_ref()?.elem_type)
}

/// The fp32 version of `graph`, encoded as an `.onnx` protobuf.
pub fn fp16_to_fp32(graph: &OnnxGraph) -> Result<Vec<u8>> {
    let mut model = graph.model().clone();
    let g = model
        .graph
        .as_mut()
        .ok_or_else(|| Error::invalid_model("the ONNX model has no graph"))?;
    convert_graph(graph, g)?;
    let bytes = model.encode_to_vec();
    if bytes.len() as u64 >= 2 << 30 {
        return Err(Error::invalid_model(format!(
            "{}: the fp32 version would be {} bytes, over the 2 GiB protobuf limit",
            graph.path().display(),
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn convert_graph(src: &OnnxGraph, g: &mut GraphProto) -> Result<()> {
    for t in &mut g.initializer {
        convert_tensor(src, t)?;
    }
    for v in g
        .input
        .iter_mut()
        .chain(&mut g.output)
        .chain(&mut g.value_info)
    {
        if let Some(tt) = v.r#type.as_mut().and_then(|t| t.tensor_type.as_mut()) {
            if tt.elem_type == data_type::FLOAT16 {
                tt.elem_type = data_type::FLOAT;
            }
        }
    }
    for node in &mut g.node {
        for a in &mut node.attribute {
            if node.op_type == "Cast"
                && a.name == "to"
                && a.r#type == ATTR_INT
                && a.i == Some(i64::from(data_type::FLOAT16))
            {
                a.i = Some(i64::from(data_type::FLOAT));
            }
            convert_attribute(src, a)?;
        }
    }
    Ok(())
}

fn convert_attribute(src: &OnnxGraph, a: &mut AttributeProto) -> Result<()> {
    if let Some(t) = a.t.as_mut() {
        convert_tensor(src, t)?;
    }
    for t in &mut a.tensors {
        convert_tensor(src, t)?;
    }
    for g in a.g.iter_mut().chain(&mut a.graphs) {
        convert_graph(src, g)?;
    }
    Ok(())
}

/// FLOAT16 → FLOAT in place; other tensors stay, but external data is inlined
/// (the converted model is built from memory, with no folder to resolve paths).
fn convert_tensor(src: &OnnxGraph, t: &mut TensorProto) -> Result<()> {
    let external = t.data_location == DATA_LOCATION_EXTERNAL;
    if t.data_type != data_type::FLOAT16 && !external {
        return Ok(());
    }
    if t.data_type != data_type::FLOAT16 && t.data_type != data_type::FLOAT {
        return Err(Error::invalid_model(format!(
            "{}: external initializer '{}' has data type {}; only float external data \
             can be inlined for the fp32 upcast",
            src.path().display(),
            t.name,
            t.data_type
        )));
    }
    let (_, values) = src.tensor_f32(t)?;
    t.data_type = data_type::FLOAT;
    t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    t.int32_data.clear();
    t.float_data.clear();
    t.external_data.clear();
    t.data_location = 0;
    Ok(())
}
