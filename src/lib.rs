//! spo-runtime: SDXL / SD 1.5 denoising on ONNX Runtime, runtime LoRA and SPO
//! training, usable from Rust directly and from C through `src/ffi`.
//!
//! Layers (docs/architecture.md): `runtime` loads ONNX Runtime
//! and builds sessions; `model`, `text`, `scheduler`, `pipeline`, `lora` and
//! `train` build on it; `ffi` only converts arguments for the C ABI.

pub mod error;
pub mod ffi;
pub mod limits;
pub mod lora;
pub mod memory;
pub mod model;
pub mod options;
pub mod pipeline;
pub mod runtime;
pub mod scheduler;
pub mod text;
pub mod train;

pub use error::{Error, ErrorCode, Result};
pub use options::Options;
pub use runtime::Runtime;
