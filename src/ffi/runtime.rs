//! `spo_runtime`: the loaded ONNX Runtime and execution providers.

use std::ffi::{c_char, c_void};

use super::boundary::{
    arg_ref, arg_str, call, call_or, free_handle, into_handle, out_slot, owned_c_string, spo_error,
};
use super::options::{log_sink, spo_log_callback, spo_options};
use crate::error::Error;
use crate::runtime::{Logger, Runtime};

/// A runtime: the loaded ONNX Runtime and the execution providers in use.
///
/// Ownership: the caller owns it (from `spo_runtime_create`); free it with
/// `spo_runtime_free`. Pipelines created from it keep it alive.
/// Threading: shareable by any number of threads.
/// Errors: see each function.
pub struct spo_runtime {
    pub(crate) runtime: Runtime,
}

/// Creates a runtime: loads ONNX Runtime (searching the `ort.library_path`
/// option, `SPO_ORT_LIBRARY`, `ORT_DYLIB_PATH`, the folder of this library, then
/// the system path) and resolves the execution providers of the "ep" option.
/// A requested provider that is unavailable is logged and skipped, or is an
/// error with "ep.strict"="true".
///
/// `abi_version` must be `SPO_ABI_VERSION` from the header the caller was
/// compiled with. `options` may be NULL for defaults.
///
/// Ownership: borrows `options`; on success `*out` is a new runtime, freed with
/// `spo_runtime_free`. `*out` is written only on success.
/// Threading: any thread; ONNX Runtime is loaded once per process, so a second runtime
/// asking for a different library file is refused.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_ABI_MISMATCH, SPO_ERR_UNKNOWN_OPTION,
/// SPO_ERR_INVALID_OPTION_VALUE (also "threads.intra" above
/// "limits.max_threads"), SPO_ERR_ORT_LOAD (the message lists every place
/// searched), SPO_ERR_EP_UNAVAILABLE.
#[no_mangle]
pub extern "C" fn spo_runtime_create(
    abi_version: u32,
    options: *const spo_options,
    out: *mut *mut spo_runtime,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        Runtime::check_abi(abi_version)?;
        let defaults = spo_options::default();
        // SAFETY: NULL or a live options object, per the header.
        let o = unsafe { options.as_ref() }.unwrap_or(&defaults);
        let logger = Logger::default();
        if let Some((level, f)) = &o.log {
            logger.set(*level, Some(f.clone()));
        }
        let runtime = Runtime::new(&o.options, logger)?;
        *out = into_handle(spo_runtime { runtime });
        Ok(())
    })
}

/// Frees a runtime handle. NULL is a no-op. Pipelines created from it keep the
/// underlying runtime alive until they are freed.
///
/// Ownership: takes `runtime`; it must not be used afterwards.
/// Threading: no other thread may use this handle during or after the call.
/// Errors: none (NULL is a no-op).
#[no_mangle]
pub extern "C" fn spo_runtime_free(runtime: *mut spo_runtime) {
    call_or((), || free_handle(runtime))
}

/// Answers a question about the runtime as a UTF-8 string. Keys: "version",
/// "abi_version", "ort.version", "ort.library_path", "ep.available" (providers in
/// the loaded ONNX Runtime), "ep.requested", "ep.active" (providers really in use,
/// in order, e.g. "cpu" after a CUDA fallback).
///
/// Ownership: on success `*out` is a new string, freed with `spo_string_free`; written
/// only on success.
/// Threading: any thread.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_INVALID_ARGUMENT
/// (unknown key; the message lists the known keys).
#[no_mangle]
pub extern "C" fn spo_runtime_info(
    runtime: *const spo_runtime,
    key: *const c_char,
    out: *mut *mut c_char,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        let rt = &arg_ref(runtime, "runtime")?.runtime;
        let key = arg_str(key, "key")?;
        let value = rt.info(key).ok_or_else(|| {
            Error::invalid_argument(format!(
                "unknown runtime info key '{key}' (known: {})",
                Runtime::INFO_KEYS.join(", ")
            ))
        })?;
        *out = owned_c_string(&value);
        Ok(())
    })
}

/// Replaces the runtime's log callback (NULL removes it). `max_level` is a
/// `spo_log_level`; messages less severe than it are not delivered.
///
/// Ownership: `user_data` stays the caller's and must outlive its registration.
/// Threading: any thread; the callback may run on any thread using the runtime.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_ARGUMENT (bad level).
#[no_mangle]
pub extern "C" fn spo_runtime_set_log_callback(
    runtime: *const spo_runtime,
    callback: spo_log_callback,
    user_data: *mut c_void,
    max_level: i32,
) -> *mut spo_error {
    call(|| {
        let rt = &arg_ref(runtime, "runtime")?.runtime;
        match log_sink(callback, user_data, max_level)? {
            Some((level, f)) => rt.logger().set(level, Some(f)),
            None => rt.logger().set(crate::runtime::LogLevel::Error, None),
        }
        Ok(())
    })
}
