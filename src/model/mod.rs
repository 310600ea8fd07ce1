//! Model folders and ONNX graphs on disk.

pub mod folder;

pub use folder::{ModelFolder, ModelKind};
