//! The one error type of the crate. Every layer returns [`Error`]; the C ABI maps
//! [`ErrorCode`] one to one onto `spo_error_code`, so codes are stable forever.

use std::fmt;

/// Stable error codes. Never renumber or reuse one; retire by comment.
/// Grouped by source: 1-9 arguments, 10-19 ONNX Runtime, 20-29 files and models,
/// 30-39 job control, 40-49 capability, 50-59 resources, 99 panic.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A value passed by the caller is not acceptable.
    InvalidArgument = 1,
    /// A required pointer argument was NULL.
    NullArgument = 2,
    /// A string argument was not valid UTF-8.
    InvalidUtf8 = 3,
    /// An option key is not known to the call it was given to.
    UnknownOption = 4,
    /// An option value could not be parsed or is out of range.
    InvalidOptionValue = 5,
    /// The caller was built against an incompatible ABI version.
    AbiMismatch = 6,
    /// The ONNX Runtime shared library could not be found or loaded.
    OrtLoad = 10,
    /// ONNX Runtime reported an error.
    Ort = 11,
    /// A requested execution provider is unavailable and `ep.strict` was set.
    EpUnavailable = 12,
    /// A file could not be read or written.
    Io = 20,
    /// A model folder or graph is missing a part or is malformed.
    InvalidModel = 21,
    /// A LoRA file is malformed or does not fit the model.
    InvalidLora = 22,
    /// A safetensors / npy / image file is malformed.
    InvalidFile = 23,
    /// The object is already running a job.
    Busy = 30,
    /// The work was cancelled by the caller.
    Cancelled = 31,
    /// The request is valid but not supported by this build or model.
    Unsupported = 40,
    /// Memory for a buffer could not be allocated (here or in ONNX Runtime).
    OutOfMemory = 50,
    /// A Rust panic was caught at the C boundary.
    Panic = 99,
}

impl ErrorCode {
    /// Maps an integer from C back to a code; unknown values become `InvalidArgument`.
    pub fn from_u32(v: u32) -> ErrorCode {
        use ErrorCode::*;
        [
            InvalidArgument,
            NullArgument,
            InvalidUtf8,
            UnknownOption,
            InvalidOptionValue,
            AbiMismatch,
            OrtLoad,
            Ort,
            EpUnavailable,
            Io,
            InvalidModel,
            InvalidLora,
            InvalidFile,
            Busy,
            Cancelled,
            Unsupported,
            OutOfMemory,
            Panic,
        ]
        .into_iter()
        .find(|c| *c as u32 == v)
        .unwrap_or(InvalidArgument)
    }
}

/// An error with a stable code and a message that names the file, key or shape at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
    pub fn invalid_argument(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, m)
    }
    pub fn invalid_model(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidModel, m)
    }
    pub fn invalid_file(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidFile, m)
    }
    pub fn invalid_lora(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidLora, m)
    }
    pub fn unsupported(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, m)
    }
    /// An I/O error on `path`, keeping the OS reason.
    pub fn io(path: &std::path::Path, e: std::io::Error) -> Self {
        Self::new(ErrorCode::Io, format!("{}: {e}", path.display()))
    }
    /// Prefixes the message with context (a file, a tensor), keeping the code.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        let message = e.to_string();
        crate::memory::ort_out_of_memory(&message)
            .unwrap_or_else(|| Error::new(ErrorCode::Ort, format!("onnx runtime: {message}")))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
