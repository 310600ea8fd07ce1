//! Model folders and ONNX graphs on disk: folder layout and configs, and graph
//! reading (initializers, external data, node scopes).

pub mod folder;
pub mod graph;
pub mod npy;
pub mod onnx_proto;
pub mod tensors;
pub mod upcast;

pub use folder::{ModelFolder, ModelKind};
pub use graph::OnnxGraph;
