//! Text side of the pipeline: the CLIP BPE tokenizer.
//!
//! The text encoders themselves are ONNX graphs run by `model`; this module
//! only turns prompts into the `input_ids` those graphs take.

pub mod tokenizer;

pub use tokenizer::{ClipTokenizer, LongPrompt, BOS_ID, EOS_ID, MAX_LEN};
