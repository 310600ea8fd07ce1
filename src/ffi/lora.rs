//! `spo_lora`: loaded LoRA files, and applying them to a pipeline.

use std::ffi::c_char;
use std::path::Path;

use super::boundary::{
    arg_ref, arg_str, call, call_or, free_handle, into_handle, out_slot, owned_c_string, spo_error,
};
use super::pipeline::spo_pipeline;
use super::runtime::spo_runtime;
use crate::error::{Error, ErrorCode};
use crate::pipeline::{Lora, LoraMode};

/// A loaded LoRA file, not yet tied to any pipeline.
///
/// Ownership: the caller owns it (from `spo_lora_load`); free it with `spo_lora_free`.
/// Pipelines keep what they need of it.
/// Threading: immutable: share it between pipelines and threads.
/// Errors: see each function.
pub struct spo_lora {
    lora: Lora,
}

/// How `spo_pipeline_set_loras` applies LoRAs.
#[repr(i32)]
#[allow(clippy::upper_case_acronyms)]
pub enum spo_lora_mode {
    /// Slots when the UNet was exported with --lora-slots, else merge.
    SPO_LORA_AUTO = 0,
    /// Merge into the weights; rebuilds only the affected sessions.
    SPO_LORA_MERGE = 1,
    /// Feed adapters to a --lora-slots UNet; no session rebuild.
    SPO_LORA_SLOTS = 2,
}

/// Loads a LoRA safetensors file: kohya/A1111 "webui" (both SDXL dialects),
/// diffusers/PEFT, LoCon, LoHa, LoKr, DoRA. The file must be a regular file
/// within the runtime's `limits.max_file_bytes`.
///
/// Ownership: borrows the arguments; `*out` is freed with `spo_lora_free` and written
/// only on success.
/// Threading: any thread.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_IO,
/// SPO_ERR_INVALID_LORA (names the file, key and shape), SPO_ERR_INVALID_FILE (not a
/// regular file), SPO_ERR_INVALID_OPTION_VALUE (over the size limit),
/// SPO_ERR_OUT_OF_MEMORY.
#[no_mangle]
pub extern "C" fn spo_lora_load(
    runtime: *const spo_runtime,
    path: *const c_char,
    out: *mut *mut spo_lora,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        let runtime = arg_ref(runtime, "runtime")?;
        let path = arg_str(path, "path")?;
        let lora = Lora::open_limited(Path::new(path), runtime.runtime.limits())?;
        *out = into_handle(spo_lora { lora });
        Ok(())
    })
}

/// Answers a question about a LoRA as a new string. Keys: "path", "format",
/// "dialect", "modules" (count), "rank" and "alpha" (distinct values, comma-separated).
///
/// Ownership: `*out` is freed with `spo_string_free`; written only on success.
/// Threading: any thread.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_INVALID_ARGUMENT
/// (unknown key).
#[no_mangle]
pub extern "C" fn spo_lora_info(
    lora: *const spo_lora,
    key: *const c_char,
    out: *mut *mut c_char,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        let l = &arg_ref(lora, "lora")?.lora;
        let key = arg_str(key, "key")?;
        let v = l.info(key).ok_or_else(|| {
            Error::invalid_argument(format!(
                "unknown LoRA info key '{key}' (known: {})",
                Lora::INFO_KEYS.join(", ")
            ))
        })?;
        *out = owned_c_string(&v);
        Ok(())
    })
}

/// Frees a LoRA handle.
///
/// Ownership: takes `lora`; it must not be used afterwards. Pipelines it was applied to
/// keep what they need.
/// Threading: no other thread may use this handle during or after the call; pipelines
/// using it are unaffected.
/// Errors: none (NULL is a no-op).
#[no_mangle]
pub extern "C" fn spo_lora_free(lora: *mut spo_lora) {
    call_or((), || free_handle(lora))
}

/// Applies `n` LoRAs with their multipliers to the pipeline, replacing the
/// previous set (`n` = 0 removes all). In merge mode only the sessions whose
/// weights change are rebuilt; the same list again rebuilds nothing. A LoRA key
/// that matches nothing in the model is an error naming the file and key,
/// unless the pipeline was loaded with "lora.allow_partial"="true".
///
/// Ownership: borrows the arrays and handles (`loras` and `multipliers` may be NULL
/// when `n` is 0).
/// Threading: any thread, but not while a job of this pipeline is active
/// (SPO_ERR_BUSY).
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_ARGUMENT (bad mode or multiplier),
/// SPO_ERR_INVALID_LORA, SPO_ERR_UNSUPPORTED (slots on a graph without them),
/// SPO_ERR_BUSY, SPO_ERR_ORT. On error the pipeline keeps its previous LoRAs.
#[no_mangle]
pub extern "C" fn spo_pipeline_set_loras(
    pipeline: *const spo_pipeline,
    loras: *const *const spo_lora,
    multipliers: *const f32,
    n: usize,
    mode: i32,
) -> *mut spo_error {
    call(|| {
        let p = &arg_ref(pipeline, "pipeline")?.pipeline;
        let mode = match mode {
            0 => LoraMode::Auto,
            1 => LoraMode::Merge,
            2 => LoraMode::Slots,
            m => {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!("LoRA mode {m} is not a spo_lora_mode (0-2)"),
                ))
            }
        };
        let mut list = Vec::with_capacity(n);
        if n > 0 {
            arg_ref(loras, "loras")?;
            arg_ref(multipliers, "multipliers")?;
            for i in 0..n {
                // SAFETY: the header requires arrays of `n` elements.
                let (l, m) = unsafe { (*loras.add(i), *multipliers.add(i)) };
                let l = arg_ref(l, &format!("loras[{i}]"))?;
                list.push((l.lora.clone(), m));
            }
        }
        p.set_loras(&list, mode).map(|_| ())
    })
}
