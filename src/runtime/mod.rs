//! placeholder
pub struct Runtime;
