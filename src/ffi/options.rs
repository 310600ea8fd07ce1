//! `spo_options`: string-keyed settings, a JSON overlay, and the log callback a
//! runtime is created with.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use super::boundary::UserData;

use super::boundary::{
    arg_mut, arg_str, call, call_or, free_handle, into_handle, out_slot, spo_error,
};
use crate::error::{Error, ErrorCode, Result};
use crate::options::Options;
use crate::runtime::{LogFn, LogLevel, LogSink};

/// Log callback: `level` is a `spo_log_level`, `message` is UTF-8 and valid only
/// during the call. It may be called from any thread that calls into the library.
pub type spo_log_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, level: i32, message: *const c_char)>;

/// Log levels, most severe first; a sink receives its level and all above it.
#[repr(i32)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
pub enum spo_log_level {
    SPO_LOG_ERROR = 1,
    SPO_LOG_WARN = 2,
    SPO_LOG_INFO = 3,
    SPO_LOG_DEBUG = 4,
}

/// A settings object: string keys and values for a runtime, pipeline, job or trainer.
///
/// Ownership: the caller owns it (from `spo_options_create`); free it with
/// `spo_options_free`. Objects created from it copy what they need.
/// Threading: a call that changes it must not overlap any other use of it; several
/// threads may create objects from it at once.
/// Errors: see each function; a refused setting leaves the object unchanged.
#[derive(Default)]
pub struct spo_options {
    pub(crate) options: Options,
    pub(crate) log: Option<LogSink>,
}

/// Wraps a C callback as a Rust log sink; `None` when `cb` is NULL.
pub(crate) fn log_sink(
    cb: spo_log_callback,
    user_data: *mut c_void,
    level: i32,
) -> Result<Option<LogSink>> {
    let level = LogLevel::from_i32(level).ok_or_else(|| {
        Error::new(
            ErrorCode::InvalidArgument,
            format!("log level {level} is not a spo_log_level (1-4)"),
        )
    })?;
    Ok(cb.map(|cb| {
        let ud = UserData::new(user_data);
        let f: Arc<LogFn> = Arc::new(move |lvl: LogLevel, msg: &str| {
            let c = std::ffi::CString::new(msg.replace('\0', " ")).unwrap_or_default();
            // SAFETY: the host registered `cb` for exactly this use.
            unsafe { cb(ud.get(), lvl as i32, c.as_ptr()) }
        });
        (level, f)
    }))
}

/// Creates an empty options object.
///
/// Ownership: on success `*out` is a new object; free it with `spo_options_free`.
/// `*out` is written only on success.
/// Threading: any thread.
/// Errors: SPO_ERR_NULL_ARGUMENT.
#[no_mangle]
pub extern "C" fn spo_options_create(out: *mut *mut spo_options) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        *out = into_handle(spo_options::default());
        Ok(())
    })
}

/// Sets `key` to `value` (both UTF-8). Unknown keys are refused at once.
///
/// Runtime keys: "ep" (ordered list, default "cuda,cpu"; from the default, a
/// CUDA provider missing from the loaded ONNX Runtime build is skipped with an
/// info message, while a list naming it gets a warning), "ep.strict"
/// ("true" makes an unavailable provider an error instead of a logged fallback),
/// "ort.library_path", "log.level", "threads.intra" (0: one per core), and the
/// CUDA pass-through keys "cuda.device_id", "cuda.arena_extend_strategy",
/// "cuda.cudnn_conv_algo_search", "cuda.gpu_mem_limit", "cuda.enable_cuda_graph".
///
/// Limits (runtime keys, positive integers; every pipeline, job and LoRA load
/// of the runtime keeps them, and a refusal names the value, the limit and the
/// key): "limits.max_side" (pixels per image side, default 16384),
/// "limits.max_pixels" (width x height, default 67108864 = 8192²),
/// "limits.max_batch" (num_images, default 64), "limits.max_steps" (default
/// 1000), "limits.max_prompt_windows" (77-token windows of a prompt, default
/// 64), "limits.max_prompt_bytes" (bytes of a prompt, checked before
/// tokenizing, default 65536), "limits.max_file_bytes" (LoRA, .npy, PNG and prompt files, default
/// 8 GiB; only regular files are read), "limits.max_threads" ("threads.intra",
/// default 4 per core, at most 4096).
///
/// Ownership: copies both strings.
/// Threading: not concurrently with other use of the same object.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_UNKNOWN_OPTION (the
/// message names the key). On error the object is unchanged.
#[no_mangle]
pub extern "C" fn spo_options_set(
    options: *mut spo_options,
    key: *const c_char,
    value: *const c_char,
) -> *mut spo_error {
    call(|| {
        let o = arg_mut(options, "options")?;
        let key = arg_str(key, "key")?;
        let value = arg_str(value, "value")?;
        o.options.set(key, value)
    })
}

/// Applies a JSON object as an overlay: nested objects flatten with dots
/// (`{"cuda":{"device_id":0}}`), arrays of scalars join with commas
/// (`{"ep":["cuda","cpu"]}`).
///
/// Ownership: copies the string.
/// Threading: as `spo_options_set`.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_INVALID_OPTION_VALUE
/// (bad JSON), SPO_ERR_UNKNOWN_OPTION. On error nothing is applied.
#[no_mangle]
pub extern "C" fn spo_options_set_json(
    options: *mut spo_options,
    json: *const c_char,
) -> *mut spo_error {
    call(|| {
        let o = arg_mut(options, "options")?;
        let json = arg_str(json, "json")?;
        o.options.apply_json(json)
    })
}

/// Sets the log callback that a runtime created from these options starts with,
/// so messages from creation itself (such as a CUDA fallback) are delivered.
/// `callback` NULL removes it. `max_level` is a `spo_log_level`.
///
/// Ownership: `user_data` stays the caller's; it must outlive every runtime created
/// from these options (or until `spo_runtime_set_log_callback` replaces it).
/// Threading: as `spo_options_set`; the callback may run on any thread that calls into
/// the library.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_ARGUMENT (bad level).
#[no_mangle]
pub extern "C" fn spo_options_set_log_callback(
    options: *mut spo_options,
    callback: spo_log_callback,
    user_data: *mut c_void,
    max_level: i32,
) -> *mut spo_error {
    call(|| {
        let o = arg_mut(options, "options")?;
        o.log = log_sink(callback, user_data, max_level)?;
        Ok(())
    })
}

/// Frees an options object. NULL is a no-op.
///
/// Ownership: takes `options`. Objects created from it do not depend on it.
/// Threading: no other thread may use this handle during or after the call.
/// Errors: none (NULL is a no-op).
#[no_mangle]
pub extern "C" fn spo_options_free(options: *mut spo_options) {
    call_or((), || free_handle(options))
}
