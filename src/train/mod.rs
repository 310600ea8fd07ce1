//! Training: LoRA gradients of the UNet through exported gradient graphs,
//! run as ordinary ONNX Runtime sessions (stock builds have no training API).
//!
//! - [`manifest`]: `train_manifest.json`, the exporter's contract;
//! - [`grad`]: the gradient runner (forward with residuals, backward from a
//!   cotangent, accumulation on the device);
//! - [`tensors`]: named float32 tensors in safetensors files (`spo grad`);
//! - [`check`]: seeded random inputs and finite-difference checks.

pub mod check;
pub mod grad;
pub mod manifest;
pub mod tensors;

pub use grad::GradRunner;
pub use manifest::TrainManifest;
