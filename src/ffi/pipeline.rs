//! `spo_pipeline`: a loaded model folder.

use std::ffi::c_char;
use std::path::Path;

use super::boundary::{
    arg_ref, arg_str, call, call_or, free_handle, into_handle, out_slot, owned_c_string, spo_error,
};
use super::options::spo_options;
use super::runtime::spo_runtime;
use crate::error::Error;
use crate::options::Options;
use crate::pipeline::Pipeline;

/// A loaded model folder with its ONNX Runtime sessions.
///
/// Ownership: the caller owns it (from `spo_pipeline_load`); free it with
/// `spo_pipeline_free`. It keeps its runtime alive.
/// Threading: shareable between threads; it runs one job at a time (a second job or a
/// LoRA change while one is active gets SPO_ERR_BUSY).
/// Errors: see each function.
pub struct spo_pipeline {
    pub(crate) pipeline: Pipeline,
}

/// Loads a diffusers/optimum ONNX model folder (`model_index.json`, `unet/`,
/// `text_encoder/`, optionally `text_encoder_2/`, `vae_decoder/`,
/// `vae_encoder/`, `tokenizer*/`, `scheduler/`). SDXL or SD 1.5 is told from
/// `model_index.json`; dtypes and shapes are read from the graphs.
///
/// Options: "lora.allow_partial" (true: LoRA keys matching nothing are
/// warnings), "vae.upcast" ("auto", the default: an fp16 VAE runs in fp32 when
/// its config says force_upcast, as diffusers does; "always"; "never"). A VAE
/// output with inf/NaN fails the job with SPO_ERR_INVALID_MODEL.
///
/// Ownership: borrows all arguments; `options` may be NULL. On success `*out` is a new
/// pipeline, freed with `spo_pipeline_free`; it keeps the runtime alive.
/// Threading: any thread.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_UNKNOWN_OPTION,
/// SPO_ERR_INVALID_MODEL (names the file and tensor), SPO_ERR_ORT.
#[no_mangle]
pub extern "C" fn spo_pipeline_load(
    runtime: *const spo_runtime,
    dir: *const c_char,
    options: *const spo_options,
    out: *mut *mut spo_pipeline,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        let rt = &arg_ref(runtime, "runtime")?.runtime;
        let dir = arg_str(dir, "dir")?;
        let empty = Options::new();
        // SAFETY: NULL or a live options object, per the header.
        let opts = unsafe { options.as_ref() }.map_or(&empty, |o| &o.options);
        let pipeline = Pipeline::load(rt, Path::new(dir), opts)?;
        *out = into_handle(spo_pipeline { pipeline });
        Ok(())
    })
}

/// Answers a question about the pipeline as a new UTF-8 string. Keys: "kind"
/// ("sdxl" or "sd15"), "dir", "default_size" ("WxH"), "ep.<component>" (the
/// provider a component runs on, e.g. "ep.unet"), "io.<component>" (its inputs
/// and outputs with dtypes and shapes), "lora.mode", "scheduler.default" (the
/// scheduler of a job that sets no "scheduler": the class in the model's
/// scheduler_config.json when it is ported, else "euler", with the reason
/// logged at info level when the pipeline loads).
///
/// Ownership: `*out` is freed with `spo_string_free`; written only on success.
/// Threading: any thread.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_INVALID_ARGUMENT
/// (unknown key; the message lists the known ones).
#[no_mangle]
pub extern "C" fn spo_pipeline_info(
    pipeline: *const spo_pipeline,
    key: *const c_char,
    out: *mut *mut c_char,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        let p = &arg_ref(pipeline, "pipeline")?.pipeline;
        let key = arg_str(key, "key")?;
        let v = p.info(key).ok_or_else(|| {
            Error::invalid_argument(format!(
                "unknown pipeline info key '{key}' (known: {})",
                p.info_keys().join(", ")
            ))
        })?;
        *out = owned_c_string(&v);
        Ok(())
    })
}

/// Frees a pipeline handle. NULL is a no-op. Jobs still alive keep the
/// pipeline's sessions alive until they are freed.
///
/// Ownership: takes `pipeline`; it must not be used afterwards.
/// Threading: no other thread may use this handle during or after the call.
/// Errors: none (NULL is a no-op).
#[no_mangle]
pub extern "C" fn spo_pipeline_free(pipeline: *mut spo_pipeline) {
    call_or((), || free_handle(pipeline))
}
