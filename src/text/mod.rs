//! Text side of the pipeline: the CLIP BPE tokenizer, and the text-encoder
//! graphs that turn its ids into prompt embeddings.

pub mod encoder;
pub mod tokenizer;

pub use encoder::{PromptEmbeds, TextEncoder, TextEncoders};
pub use tokenizer::{ClipTokenizer, LongPrompt, BOS_ID, EOS_ID, MAX_LEN};
