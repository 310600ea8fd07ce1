//! `spo_trainer`: SPO fine-tuning of a LoRA on a loaded pipeline.

use std::ffi::{c_char, c_void};
use std::path::Path;
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use parking_lot::Mutex;

use super::boundary::{
    arg_ref, arg_str, call, call_or, free_handle, into_handle, out_slot, spo_error,
};
use super::job::{progress_fn, spo_progress_callback};
use super::options::spo_options;
use super::pipeline::spo_pipeline;
use crate::error::{Error, ErrorCode, Result};
use crate::lora::LoraDialect;
use crate::options::Options;
use crate::pipeline::job::CancelToken;
use crate::train::sampler::Pair;
use crate::train::{checkpoint, RoundMetrics, Trainer, TrainerSpec};

/// An SPO trainer: a LoRA trained on one pipeline's UNet, with its optimizer state.
///
/// Ownership: the caller owns it (from `spo_trainer_create`); free it with
/// `spo_trainer_free`. It keeps its pipeline alive.
/// Threading: `spo_trainer_cancel` may be called from any thread; the other calls on
/// one trainer must not overlap (an overlapping call gets SPO_ERR_BUSY).
/// Errors: see each function; a failed call leaves the trainer as it was.
pub struct spo_trainer {
    trainer: Mutex<Trainer>,
    cancel: Arc<CancelToken>,
}

/// What one round (or one `spo_trainer_update`) did. Times are in seconds.
#[repr(C)]
pub struct spo_train_metrics {
    /// Rounds completed before this one.
    pub round: u64,
    /// Mean loss over the trained pairs (NaN when there were none).
    pub loss: f64,
    /// Pairs trained on.
    pub pairs: u32,
    /// Candidate pools sampled.
    pub pools: u32,
    /// Pools whose score gap passed the threshold, over all pools.
    pub accepted_ratio: f64,
    /// Mean preference score of all candidates.
    pub score_mean: f64,
    /// Mean best-minus-worst score of a pool.
    pub score_gap: f64,
    /// Mean global gradient norm before clipping.
    pub grad_norm: f64,
    /// Branches whose probability ratio left the clamp.
    pub clamp_fraction: f64,
    /// Optimizer steps applied.
    pub updates: u32,
    /// Optimizer steps skipped because the loss or a gradient was not finite.
    pub skipped_updates: u32,
    pub time_sampling: f64,
    pub time_scoring: f64,
    pub time_forward: f64,
    pub time_backward: f64,
    pub time_optimizer: f64,
    /// The whole call, wall clock.
    pub time_total: f64,
}

impl From<&RoundMetrics> for spo_train_metrics {
    fn from(m: &RoundMetrics) -> Self {
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        spo_train_metrics {
            round: m.round,
            loss: m.loss,
            pairs: n(m.pairs),
            pools: n(m.pools),
            accepted_ratio: m.accepted_ratio,
            score_mean: m.score_mean,
            score_gap: m.score_gap,
            grad_norm: m.grad_norm,
            clamp_fraction: m.clamp_fraction,
            updates: n(m.updates),
            skipped_updates: n(m.skipped_updates),
            time_sampling: m.time_sampling,
            time_scoring: m.time_scoring,
            time_forward: m.time_forward,
            time_backward: m.time_backward,
            time_optimizer: m.time_optimizer,
            time_total: m.time_total,
        }
    }
}

/// One (win, lose) pair for `spo_trainer_update`: the transition x_t ->
/// x_prev of each branch at timestep `timestep` (one of the trainer's DDIM
/// schedule), conditioned on prompt `prompt` (an index into the prompts
/// passed with it). Each pointer holds one latent of
/// `spo_trainer_latent_shape` floats (NCHW, batch 1); a pool's shared x_t may
/// be passed as both `x_t_win` and `x_t_lose`.
#[repr(C)]
pub struct spo_train_pair {
    pub prompt: u32,
    pub timestep: i64,
    pub x_t_win: *const f32,
    pub x_prev_win: *const f32,
    pub x_t_lose: *const f32,
    pub x_prev_lose: *const f32,
}

fn lock(t: &spo_trainer) -> Result<parking_lot::MutexGuard<'_, Trainer>> {
    t.trainer
        .try_lock()
        .ok_or_else(|| Error::new(ErrorCode::Busy, "another call is using this trainer"))
}

/// The `n` strings of `prompts`.
fn prompt_list<'a>(prompts: *const *const c_char, n: usize) -> Result<Vec<&'a str>> {
    if n == 0 || n > crate::train::trainer::MAX_ROUND_PROMPTS {
        return Err(Error::invalid_argument(format!(
            "{n} prompts; 1 to {} are accepted",
            crate::train::trainer::MAX_ROUND_PROMPTS
        )));
    }
    arg_ref(prompts, "prompts")?;
    (0..n)
        // SAFETY: the header requires an array of `n` strings.
        .map(|i| arg_str(unsafe { *prompts.add(i) }, &format!("prompts[{i}]")))
        .collect()
}

fn write_metrics(out: *mut spo_train_metrics, m: &RoundMetrics) {
    // SAFETY: NULL or caller-owned storage, per the header.
    if let Some(o) = unsafe { out.as_mut() } {
        *o = m.into();
    }
}

/// Creates a trainer for `pipeline`. Options: "train.dir" (the training
/// folder made by spo_onnx.export.train from this pipeline's UNet),
/// "train.preference" (a preference-model folder: model.onnx, tokenizer/),
/// "train.preset" ("sdxl", the default: the official SDXL settings; "sd15";
/// "toy"), and any setting over the preset: "train.steps", "train.eta",
/// "train.guidance", "train.pool", "train.inner_steps", "train.divert_start",
/// "train.threshold", "train.prompts_per_round", "train.beta", "train.clip",
/// "train.lr", "train.adam_beta1", "train.adam_beta2", "train.weight_decay",
/// "train.adam_eps", "train.batch", "train.grad_accum", "train.max_grad_norm",
/// "train.grad_clip" ("norm": clipping that clips; "official": the official
/// code's no-op), "train.seed", "train.init_std".
///
/// Ownership: borrows the arguments; `*out` is freed with `spo_trainer_free` and
/// written only on success; the trainer keeps the pipeline alive.
/// Threading: any thread.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_UNKNOWN_OPTION / SPO_ERR_INVALID_OPTION_VALUE
/// (naming the key), SPO_ERR_INVALID_MODEL (a training folder that does not fit the
/// pipeline's UNet: the message names both sides), SPO_ERR_UNSUPPORTED, SPO_ERR_ORT.
#[no_mangle]
pub extern "C" fn spo_trainer_create(
    pipeline: *const spo_pipeline,
    options: *const spo_options,
    out: *mut *mut spo_trainer,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        let p = &arg_ref(pipeline, "pipeline")?.pipeline;
        let empty = Options::new();
        // SAFETY: NULL or a live options object, per the header.
        let opts = unsafe { options.as_ref() }.map_or(&empty, |o| &o.options);
        let trainer = Trainer::new(p, TrainerSpec::from_options(opts)?)?;
        let cancel = trainer.cancel_token();
        *out = into_handle(spo_trainer {
            trainer: Mutex::new(trainer),
            cancel,
        });
        Ok(())
    })
}

/// Sets (or with NULL removes) the progress callback of rounds: called with
/// (done, total) on the thread running `spo_trainer_step`; `done` counts the
/// sampled denoising steps, then the trained pairs. A nonzero return cancels
/// the round.
///
/// Ownership: `user_data` stays the caller's and must outlive the trainer.
/// Threading: not during another call on this trainer (an overlapping call gets
/// SPO_ERR_BUSY); the callback runs on the thread running `spo_trainer_step`.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_BUSY.
#[no_mangle]
pub extern "C" fn spo_trainer_set_progress_callback(
    trainer: *const spo_trainer,
    callback: spo_progress_callback,
    user_data: *mut c_void,
) -> *mut spo_error {
    call(|| {
        let mut t = lock(arg_ref(trainer, "trainer")?)?;
        t.set_progress(progress_fn(callback, user_data));
        Ok(())
    })
}

/// Runs one round: samples the `n` prompts with the current LoRA (pools of
/// candidates, scored by the preference model), then trains on the pairs it
/// kept. `metrics` may be NULL; when given it is written on success.
///
/// Ownership: borrows `prompts` (an array of `n` UTF-8 strings); `metrics` is the
/// caller's storage.
/// Threading: not during another call on this trainer (an overlapping call gets
/// SPO_ERR_BUSY), nor while a job of the pipeline runs (SPO_ERR_BUSY);
/// `spo_trainer_cancel` from another thread stops it.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_INVALID_ARGUMENT,
/// SPO_ERR_CANCELLED, SPO_ERR_BUSY, SPO_ERR_ORT, SPO_ERR_INVALID_MODEL. On any error
/// the trainer is as it was before the call (no partial round).
#[no_mangle]
pub extern "C" fn spo_trainer_step(
    trainer: *const spo_trainer,
    prompts: *const *const c_char,
    n: usize,
    metrics: *mut spo_train_metrics,
) -> *mut spo_error {
    call(|| {
        let mut t = lock(arg_ref(trainer, "trainer")?)?;
        let list = prompt_list(prompts, n)?;
        let m = t.step(&list)?;
        write_metrics(metrics, &m);
        Ok(())
    })
}

/// Trains on pairs from the host's own sampler: the mini-batches, gradient
/// accumulation, clipping and AdamW of a round, without sampling. `prompts`
/// (`n_prompts` strings) are encoded as the trainer's conditioning; each
/// pair names one by index. `metrics` may be NULL.
///
/// Ownership: borrows every array; `metrics` is the caller's storage.
/// Threading: as `spo_trainer_step`.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_INVALID_ARGUMENT (a
/// prompt index or timestep outside the trainer's schedule, named), SPO_ERR_BUSY,
/// SPO_ERR_ORT. On error nothing changes.
#[no_mangle]
pub extern "C" fn spo_trainer_update(
    trainer: *const spo_trainer,
    prompts: *const *const c_char,
    n_prompts: usize,
    pairs: *const spo_train_pair,
    n_pairs: usize,
    metrics: *mut spo_train_metrics,
) -> *mut spo_error {
    call(|| {
        let mut t = lock(arg_ref(trainer, "trainer")?)?;
        let list = prompt_list(prompts, n_prompts)?;
        if n_pairs == 0 || n_pairs > 1 << 20 {
            return Err(Error::invalid_argument(format!(
                "{n_pairs} pairs; 1 to {} are accepted",
                1 << 20
            )));
        }
        arg_ref(pairs, "pairs")?;
        let shape = t.latent_shape();
        let n: usize = shape.iter().product();
        let latent = |p: *const f32, name: String| -> Result<ArrayD<f32>> {
            arg_ref(p, &name)?;
            // SAFETY: the header requires `n` readable floats.
            let v = unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
            Ok(ArrayD::from_shape_vec(IxDyn(&shape), v).expect("sized"))
        };
        let mut converted = Vec::with_capacity(n_pairs);
        for i in 0..n_pairs {
            // SAFETY: the header requires an array of `n_pairs` pairs.
            let p = unsafe { &*pairs.add(i) };
            converted.push(Pair {
                prompt: p.prompt as usize,
                step: t.step_index(p.timestep)?,
                x_t: [
                    latent(p.x_t_win, format!("pairs[{i}].x_t_win"))?,
                    latent(p.x_t_lose, format!("pairs[{i}].x_t_lose"))?,
                ],
                x_prev: [
                    latent(p.x_prev_win, format!("pairs[{i}].x_prev_win"))?,
                    latent(p.x_prev_lose, format!("pairs[{i}].x_prev_lose"))?,
                ],
            });
        }
        let conds = list
            .iter()
            .map(|p| t.condition(p))
            .collect::<Result<Vec<_>>>()?;
        let m = t.update(&converted, &conds)?;
        write_metrics(metrics, &m);
        Ok(())
    })
}

/// The shape of one latent of `spo_trainer_update`'s pairs: [1, C, h, w].
///
/// Ownership: `shape` (4 values) is the caller's, written on success.
/// Threading: not during another call on this trainer (an overlapping call gets
/// SPO_ERR_BUSY).
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_BUSY.
#[no_mangle]
pub extern "C" fn spo_trainer_latent_shape(
    trainer: *const spo_trainer,
    shape: *mut u32,
) -> *mut spo_error {
    call(|| {
        let t = lock(arg_ref(trainer, "trainer")?)?;
        out_slot(shape, "shape")?;
        for (i, d) in t.latent_shape().iter().enumerate() {
            // SAFETY: the header requires room for 4 values.
            unsafe { *shape.add(i) = *d as u32 };
        }
        Ok(())
    })
}

/// Requests cancellation of the running round. Safe from any thread: the
/// running ONNX Runtime call is terminated and the round ends with
/// SPO_ERR_CANCELLED, leaving the trainer as before it. NULL is a no-op.
///
/// Ownership: borrows `trainer`.
/// Threading: any thread, also while another thread runs a round.
/// Errors: none (NULL is a no-op); the cancelled round reports SPO_ERR_CANCELLED.
#[no_mangle]
pub extern "C" fn spo_trainer_cancel(trainer: *const spo_trainer) {
    call_or((), || {
        // SAFETY: NULL or a live trainer handle, per the header.
        if let Some(t) = unsafe { trainer.as_ref() } {
            t.cancel.cancel();
        }
    })
}

/// Writes the current LoRA to `path`, atomically. `format`: "webui" (kohya
/// names with SGM block numbers and alpha: what A1111 and ComfyUI load) or
/// "diffusers" (what `load_lora_weights` loads); NULL means "webui".
///
/// Ownership: borrows the arguments.
/// Threading: not during another call on this trainer (an overlapping call gets
/// SPO_ERR_BUSY).
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_INVALID_ARGUMENT
/// (unknown format), SPO_ERR_IO, SPO_ERR_BUSY.
#[no_mangle]
pub extern "C" fn spo_trainer_save_lora(
    trainer: *const spo_trainer,
    path: *const c_char,
    format: *const c_char,
) -> *mut spo_error {
    call(|| {
        let t = lock(arg_ref(trainer, "trainer")?)?;
        let path = arg_str(path, "path")?;
        let format = if format.is_null() {
            "webui"
        } else {
            arg_str(format, "format")?
        };
        let dialect = LoraDialect::parse(format).ok_or_else(|| {
            Error::invalid_argument(format!("LoRA format '{format}' is not webui or diffusers"))
        })?;
        t.save_lora(Path::new(path), dialect)
    })
}

/// Writes a checkpoint (the LoRA, the optimizer state, the round and seed)
/// to `path` atomically: a crash mid-save leaves the previous file whole.
///
/// Ownership: borrows the arguments.
/// Threading: not during another call on this trainer (an overlapping call gets
/// SPO_ERR_BUSY).
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_IO, SPO_ERR_BUSY.
#[no_mangle]
pub extern "C" fn spo_trainer_save_checkpoint(
    trainer: *const spo_trainer,
    path: *const c_char,
) -> *mut spo_error {
    call(|| {
        let t = lock(arg_ref(trainer, "trainer")?)?;
        checkpoint::save(&t, Path::new(arg_str(path, "path")?))
    })
}

/// Restores a checkpoint of `spo_trainer_save_checkpoint`; training then
/// continues bit for bit as the saved run would have.
///
/// Ownership: borrows the arguments.
/// Threading: not during another call on this trainer (an overlapping call gets
/// SPO_ERR_BUSY).
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_UTF8, SPO_ERR_IO,
/// SPO_ERR_INVALID_FILE (not a checkpoint, or one of other parameters: the key is
/// named), SPO_ERR_BUSY. On error nothing changes.
#[no_mangle]
pub extern "C" fn spo_trainer_load_checkpoint(
    trainer: *const spo_trainer,
    path: *const c_char,
) -> *mut spo_error {
    call(|| {
        let mut t = lock(arg_ref(trainer, "trainer")?)?;
        checkpoint::load(&mut t, Path::new(arg_str(path, "path")?))
    })
}

/// Applies the current LoRA to `pipeline` from memory (no file): slots when
/// its UNet has them, merged otherwise. It replaces the pipeline's LoRAs.
///
/// Ownership: borrows both handles.
/// Threading: not during another call on this trainer (an overlapping call gets
/// SPO_ERR_BUSY), nor while a job of `pipeline` runs (SPO_ERR_BUSY).
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_BUSY, SPO_ERR_INVALID_LORA (the pipeline's
/// UNet lacks a trained module), SPO_ERR_ORT.
#[no_mangle]
pub extern "C" fn spo_trainer_apply(
    trainer: *const spo_trainer,
    pipeline: *const spo_pipeline,
) -> *mut spo_error {
    call(|| {
        let t = lock(arg_ref(trainer, "trainer")?)?;
        t.apply(&arg_ref(pipeline, "pipeline")?.pipeline)
    })
}

/// Frees a trainer. NULL is a no-op.
///
/// Ownership: takes `trainer`; it must not be used afterwards.
/// Threading: no other thread may use this handle during or after the call (not while
/// another call on it runs).
/// Errors: none (NULL is a no-op).
#[no_mangle]
pub extern "C" fn spo_trainer_free(trainer: *mut spo_trainer) {
    call_or((), || free_handle(trainer))
}
