//! Model folders and ONNX graph reading (initializers, external data, node scopes).

pub mod graph;
pub mod onnx_proto;

pub use graph::{OnnxGraph, WeightLayout, WeightTarget};
