//! `spo_error` accessors and the stable code enum.

use std::ffi::c_char;

use super::boundary::{call_or, free_handle, spo_error};
use crate::error::ErrorCode;

/// Stable error codes returned by `spo_error_code`. Values never change.
#[repr(u32)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum spo_code {
    /// No error (the code of a NULL error pointer).
    SPO_OK = 0,
    /// A value passed by the caller is not acceptable.
    SPO_ERR_INVALID_ARGUMENT = 1,
    /// A required pointer argument was NULL.
    SPO_ERR_NULL_ARGUMENT = 2,
    /// A string argument was not valid UTF-8.
    SPO_ERR_INVALID_UTF8 = 3,
    /// An option key is not known to the call it was given to.
    SPO_ERR_UNKNOWN_OPTION = 4,
    /// An option value could not be parsed or is out of range.
    SPO_ERR_INVALID_OPTION_VALUE = 5,
    /// The caller was built against an incompatible ABI version.
    SPO_ERR_ABI_MISMATCH = 6,
    /// The ONNX Runtime shared library could not be found or loaded.
    SPO_ERR_ORT_LOAD = 10,
    /// ONNX Runtime reported an error.
    SPO_ERR_ORT = 11,
    /// A requested execution provider is unavailable and `ep.strict` was set.
    SPO_ERR_EP_UNAVAILABLE = 12,
    /// A file could not be read or written.
    SPO_ERR_IO = 20,
    /// A model folder or graph is missing a part or is malformed.
    SPO_ERR_INVALID_MODEL = 21,
    /// A LoRA file is malformed or does not fit the model.
    SPO_ERR_INVALID_LORA = 22,
    /// A safetensors, npy or image file is malformed.
    SPO_ERR_INVALID_FILE = 23,
    /// The object is already running a job.
    SPO_ERR_BUSY = 30,
    /// The work was cancelled by the caller.
    SPO_ERR_CANCELLED = 31,
    /// Valid but not supported by this build or model.
    SPO_ERR_UNSUPPORTED = 40,
    /// Memory for a buffer could not be allocated, in this library or in ONNX
    /// Runtime. Nothing was changed; a smaller request (size, batch) may fit.
    SPO_ERR_OUT_OF_MEMORY = 50,
    /// A Rust panic was caught at the C boundary (a bug: please report it).
    SPO_ERR_PANIC = 99,
}

impl From<ErrorCode> for spo_code {
    fn from(c: ErrorCode) -> Self {
        use spo_code::*;
        match c {
            ErrorCode::InvalidArgument => SPO_ERR_INVALID_ARGUMENT,
            ErrorCode::NullArgument => SPO_ERR_NULL_ARGUMENT,
            ErrorCode::InvalidUtf8 => SPO_ERR_INVALID_UTF8,
            ErrorCode::UnknownOption => SPO_ERR_UNKNOWN_OPTION,
            ErrorCode::InvalidOptionValue => SPO_ERR_INVALID_OPTION_VALUE,
            ErrorCode::AbiMismatch => SPO_ERR_ABI_MISMATCH,
            ErrorCode::OrtLoad => SPO_ERR_ORT_LOAD,
            ErrorCode::Ort => SPO_ERR_ORT,
            ErrorCode::EpUnavailable => SPO_ERR_EP_UNAVAILABLE,
            ErrorCode::Io => SPO_ERR_IO,
            ErrorCode::InvalidModel => SPO_ERR_INVALID_MODEL,
            ErrorCode::InvalidLora => SPO_ERR_INVALID_LORA,
            ErrorCode::InvalidFile => SPO_ERR_INVALID_FILE,
            ErrorCode::Busy => SPO_ERR_BUSY,
            ErrorCode::Cancelled => SPO_ERR_CANCELLED,
            ErrorCode::Unsupported => SPO_ERR_UNSUPPORTED,
            ErrorCode::OutOfMemory => SPO_ERR_OUT_OF_MEMORY,
            ErrorCode::Panic => SPO_ERR_PANIC,
        }
    }
}

/// The code of an error. `SPO_OK` for NULL.
///
/// Ownership: borrows `error`.
/// Threading: any thread.
/// Errors: none.
#[no_mangle]
pub extern "C" fn spo_error_code(error: *const spo_error) -> spo_code {
    call_or(spo_code::SPO_ERR_PANIC, || {
        // SAFETY: NULL or a pointer returned by this library and not yet freed.
        unsafe { error.as_ref() }.map_or(spo_code::SPO_OK, |e| e.code.into())
    })
}

/// The UTF-8 message of an error, naming the file, key or shape at fault.
/// Returns "" for NULL.
///
/// Ownership: the string belongs to `error` and is valid until `spo_error_free`.
/// Threading: any thread.
/// Errors: none.
#[no_mangle]
pub extern "C" fn spo_error_message(error: *const spo_error) -> *const c_char {
    call_or(c"".as_ptr(), || {
        // SAFETY: as in `spo_error_code`.
        unsafe { error.as_ref() }.map_or(c"".as_ptr(), |e| e.message.as_ptr())
    })
}

/// Frees an error returned by any `spo_*` call. NULL is a no-op.
///
/// Ownership: takes `error`; it must not be used afterwards.
/// Threading: any thread, once per error.
/// Errors: none (NULL is a no-op).
#[no_mangle]
pub extern "C" fn spo_error_free(error: *mut spo_error) {
    call_or((), || free_handle(error))
}
