//! Training: LoRA gradients of the UNet through exported gradient graphs,
//! run as ordinary ONNX Runtime sessions (stock builds have no training API).
//!
//! - [`manifest`]: `train_manifest.json`, the exporter's contract;
//! - [`grad`]: the gradient runner (forward with residuals, backward from a
//!   cotangent, accumulation on the device);
//! - [`check`]: seeded random inputs and finite-difference checks;
//! - [`spo`]: SPO's step math: DDIM transition, log-probabilities, the
//!   clamped-ratio loss and its cotangent through the DDIM mean and CFG;
//! - [`optim`]: AdamW and gradient clipping;
//! - [`preference`]: preference models (the ONNX contract, image preparation);
//! - [`config`]: the trainer's settings and presets;
//! - [`sampler`]: SPO's sampling of a prompt (pools, scoring, pairs);
//! - [`trainer`]: the trainer (rounds, updates, LoRA output);
//! - [`checkpoint`]: checkpoints written atomically.

pub mod check;
pub mod checkpoint;
pub mod config;
pub mod grad;
pub mod manifest;
pub mod optim;
pub mod preference;
pub mod sampler;
pub mod spo;
pub mod trainer;

pub use config::{Preset, TrainConfig, TrainerSpec};
pub use grad::GradRunner;
pub use manifest::TrainManifest;
pub use trainer::{RoundMetrics, TrainState, Trainer};
