//! `spo_job` and `spo_images`: step-wise generation, cancellation and results.

use std::ffi::c_void;
use std::sync::Arc;

use parking_lot::Mutex;

use super::boundary::{
    arg_ref, call, call_or, free_handle, into_handle, out_slot, spo_error, UserData,
};
use super::options::spo_options;
use super::pipeline::spo_pipeline;
use crate::error::{Error, ErrorCode, Result};
use crate::options::Options;
use crate::pipeline::job::CancelToken;
use crate::pipeline::{Image, Job, JobSpec, PreviewSlot, Status};

/// A generation job: one request (prompt, size, steps, ...) on one pipeline.
///
/// Ownership: the caller owns it (from `spo_job_create`); free it with `spo_job_free`.
/// It keeps its pipeline's sessions alive.
/// Threading: `spo_job_cancel` and `spo_job_preview` may be called from any thread; the
/// other calls on one job must not overlap (an overlapping call gets SPO_ERR_BUSY).
/// Errors: see each function; a failed step leaves the job failed.
pub struct spo_job {
    job: Mutex<Job>,
    cancel: Arc<CancelToken>,
    preview: PreviewSlot,
}

/// Progress callback: called after each denoising step with the steps done
/// and the total. Return nonzero to cancel the job.
pub type spo_progress_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, done: u32, total: u32) -> i32>;

/// Where a job stands after `spo_job_step`.
#[repr(C)]
pub struct spo_job_status {
    /// Denoising steps finished.
    pub done: u32,
    /// Denoising steps in this job (fewer than "steps" for img2img).
    pub total: u32,
    /// 1 when the images are ready, else 0.
    pub finished: i32,
}

/// The finished RGB8 images of a job.
///
/// Ownership: the caller owns it (from `spo_job_take_images`); free it with
/// `spo_images_free`, which invalidates every `spo_image` view of it.
/// Threading: immutable: read it from any thread; free it when no thread reads it.
/// Errors: see each function.
pub struct spo_images {
    images: Vec<Image>,
}

/// A borrowed view of one RGB8 image: `height` rows of `stride` bytes, 3 bytes
/// per pixel. `data` belongs to the `spo_images` it came from.
#[repr(C)]
pub struct spo_image {
    pub width: u32,
    pub height: u32,
    pub stride: u32,
    pub data: *const u8,
}

thread_local! {
    /// Set while a host progress callback runs on this thread, so a call back
    /// into the job from inside it is told so instead of blaming "another thread".
    static IN_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A host's progress callback as the Rust API's (a nonzero return cancels).
pub(crate) fn progress_fn(
    callback: spo_progress_callback,
    user_data: *mut c_void,
) -> Option<Box<crate::pipeline::job::ProgressFn>> {
    callback.map(|cb| {
        let ud = UserData::new(user_data);
        Box::new(move |done: usize, total: usize| {
            IN_CALLBACK.with(|f| f.set(true));
            // SAFETY: the host registered `cb` for exactly this use.
            let go_on = unsafe { cb(ud.get(), done as u32, total as u32) == 0 };
            IN_CALLBACK.with(|f| f.set(false));
            go_on
        }) as Box<crate::pipeline::job::ProgressFn>
    })
}

fn lock(job: &spo_job) -> Result<parking_lot::MutexGuard<'_, Job>> {
    job.job.try_lock().ok_or_else(|| {
        let why = if IN_CALLBACK.with(|f| f.get()) {
            "this job is running its own progress callback; from there call only \
             spo_job_cancel or spo_job_preview (or return nonzero to cancel)"
        } else {
            "another thread is using this job"
        };
        Error::new(ErrorCode::Busy, why)
    })
}

/// Creates a job on a pipeline. Job keys: "prompt", "negative_prompt",
/// "width", "height", "steps", "guidance", "guidance_rescale", "scheduler"
/// (euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras, ddpm), "eta", "seed",
/// "generator" ("torch-cpu": same latents as torch.Generator("cpu").manual_seed),
/// "num_images", "clip_skip", "init_image" (PNG path, img2img), "strength",
/// "original_size" / "target_size" ("HxW"), "crops_coords_top_left" ("T,L"),
/// "step_math" ("graph": guidance and the scheduler update run as an ONNX
/// graph beside the UNet, so the latents stay where the UNet runs, in GPU
/// memory under CUDA; "host": on host arrays, the reference path; "auto", the
/// default: graph when the UNet runs on CUDA, host on the CPU provider),
/// "long_prompt" ("truncate", the default: the first 75 tokens, as diffusers;
/// "chunks": A1111-style 75-token windows encoded one by one and concatenated).
/// Without "scheduler" the model's own is used (spo_pipeline_info
/// "scheduler.default"). Numbers must be finite; "guidance" is in [0, 100],
/// "guidance_rescale", "eta" and "strength" in [0, 1]; "strength" needs
/// "init_image" and must leave at least one step (steps x strength >= 1);
/// width and height must be multiples of the model's VAE factor times its
/// UNet down-sampling (64 for SD 1.5, 32 for SDXL).
///
/// Width, height (and their product), steps, num_images and the init image's
/// size (read from its PNG header) are checked here against the runtime's
/// `limits.*` options, before anything is allocated; a refusal names the
/// value, the limit and the option ("width 100000 exceeds the limit 16384
/// (option limits.max_side)").
///
/// A pipeline holds one active job: from creation until the job finishes,
/// fails, is cancelled or is freed. Creating another meanwhile is SPO_ERR_BUSY.
///
/// Ownership: borrows the arguments; `*out` is freed with `spo_job_free` and written
/// only on success.
/// Threading: any thread.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_UNKNOWN_OPTION, SPO_ERR_INVALID_OPTION_VALUE
/// (names the key, or the limit exceeded), SPO_ERR_INVALID_ARGUMENT (init image of
/// another size), SPO_ERR_INVALID_FILE, SPO_ERR_BUSY (the pipeline has an active job).
#[no_mangle]
pub extern "C" fn spo_job_create(
    pipeline: *const spo_pipeline,
    options: *const spo_options,
    out: *mut *mut spo_job,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        let p = &arg_ref(pipeline, "pipeline")?.pipeline;
        let empty = Options::new();
        // SAFETY: NULL or a live options object, per the header.
        let opts = unsafe { options.as_ref() }.map_or(&empty, |o| &o.options);
        let job = p.job(JobSpec::from_options(opts)?)?;
        let cancel = job.cancel_token();
        let preview = job.preview_slot();
        *out = into_handle(spo_job {
            job: Mutex::new(job),
            cancel,
            preview,
        });
        Ok(())
    })
}

/// Sets (or with NULL removes) the progress callback. It runs on the thread
/// that calls `spo_job_step`/`spo_job_run`; a nonzero return cancels the job.
///
/// Ownership: `user_data` stays the caller's and must outlive the job.
/// Threading: not concurrently with other calls on this job (an overlapping call gets
/// SPO_ERR_BUSY); the callback runs on the thread that steps the job.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_BUSY (the job is running).
#[no_mangle]
pub extern "C" fn spo_job_set_progress_callback(
    job: *const spo_job,
    callback: spo_progress_callback,
    user_data: *mut c_void,
) -> *mut spo_error {
    call(|| {
        let mut j = lock(arg_ref(job, "job")?)?;
        j.set_progress(progress_fn(callback, user_data));
        Ok(())
    })
}

/// Advances one denoising step (the first step also encodes the prompt, the
/// last also decodes the images), so a host can spread a job over frames.
///
/// `status` may be NULL; when given it is written on success.
///
/// Ownership: borrows `job`; `status` is the caller's storage.
/// Threading: not concurrently with other calls on this job (an overlapping call gets
/// SPO_ERR_BUSY).
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_CANCELLED, SPO_ERR_BUSY, SPO_ERR_ORT,
/// SPO_ERR_INVALID_MODEL. After an error the job stays failed and the pipeline is free
/// for a new job.
#[no_mangle]
pub extern "C" fn spo_job_step(job: *const spo_job, status: *mut spo_job_status) -> *mut spo_error {
    call(|| {
        let mut j = lock(arg_ref(job, "job")?)?;
        let s = j.step()?;
        // SAFETY: NULL or caller-owned storage.
        if let Some(out) = unsafe { status.as_mut() } {
            *out = match s {
                Status::Running { done, total } => spo_job_status {
                    done: done as u32,
                    total: total as u32,
                    finished: 0,
                },
                Status::Done => {
                    let t = j.total_steps() as u32;
                    spo_job_status {
                        done: t,
                        total: t,
                        finished: 1,
                    }
                }
            };
        }
        Ok(())
    })
}

/// Runs the job to the end.
///
/// Ownership: borrows `job`.
/// Threading: not concurrently with other calls on this job (an overlapping call gets
/// SPO_ERR_BUSY); `spo_job_cancel` from another thread stops it with SPO_ERR_CANCELLED.
/// Errors: as `spo_job_step`.
#[no_mangle]
pub extern "C" fn spo_job_run(job: *const spo_job) -> *mut spo_error {
    call(|| lock(arg_ref(job, "job")?)?.run())
}

/// Requests cancellation. Safe from any thread, also while `spo_job_run` runs
/// elsewhere: the running ONNX Runtime call is terminated and the job ends with
/// SPO_ERR_CANCELLED. NULL is a no-op.
///
/// Ownership: borrows `job`.
/// Threading: any thread, also while another thread runs the job.
/// Errors: none (NULL is a no-op); the cancelled job's own call reports
/// SPO_ERR_CANCELLED.
#[no_mangle]
pub extern "C" fn spo_job_cancel(job: *const spo_job) {
    call_or((), || {
        // SAFETY: NULL or a live job handle, per the header.
        if let Some(j) = unsafe { job.as_ref() } {
            j.cancel.cancel();
        }
    })
}

/// Copies the predicted x0 latents of the latest finished step (diffusers'
/// `pred_original_sample`): f32, NCHW `[num_images, C, h, w]`, in latent
/// space (not divided by the VAE scaling factor). Cheap: no model call, one
/// copy (from GPU memory when the loop runs there).
///
/// `shape` (4 values) is written on success. With `data` NULL only the shape
/// is reported; otherwise `capacity` (in floats) must hold the product of the
/// shape. `step` may be NULL; it receives the steps done when the preview was
/// taken, as the progress callback counts them.
///
/// Ownership: borrows `job`; `data` (`capacity` floats), `shape` and `step` are the
/// caller's storage.
/// Threading: any thread, including from inside the progress callback (the preview of
/// that step is already there).
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_ARGUMENT (no step has finished yet;
/// `capacity` too small, with both sizes in the message), SPO_ERR_ORT (copying from the
/// device failed).
#[no_mangle]
pub extern "C" fn spo_job_preview(
    job: *const spo_job,
    data: *mut f32,
    capacity: usize,
    shape: *mut usize,
    step: *mut u32,
) -> *mut spo_error {
    call(|| {
        let job = arg_ref(job, "job")?;
        let shape = out_slot(shape.cast::<[usize; 4]>(), "shape")?;
        let no_preview =
            || Error::invalid_argument("no preview yet: no denoising step has finished");
        // The shape of a job's preview never changes; a copy is taken only
        // when there is somewhere to put it.
        let (step_done, p_shape) = if data.is_null() {
            job.preview.info().ok_or_else(no_preview)?
        } else {
            let p = job.preview.get()?.ok_or_else(no_preview)?;
            if capacity < p.latents.len() {
                return Err(Error::invalid_argument(format!(
                    "preview buffer holds {capacity} floats; shape {:?} needs {}",
                    p.shape,
                    p.latents.len()
                )));
            }
            // SAFETY: the caller owns `capacity` floats at `data`, checked above.
            unsafe { std::ptr::copy_nonoverlapping(p.latents.as_ptr(), data, p.latents.len()) };
            (p.step, p.shape)
        };
        *shape = p_shape;
        // SAFETY: NULL or caller storage.
        if let Some(s) = unsafe { step.as_mut() } {
            *s = step_done as u32;
        }
        Ok(())
    })
}

/// Takes the images of a finished job (once).
///
/// Ownership: `*out` is new, freed with `spo_images_free`; written only on success.
/// Threading: not concurrently with other calls on this job (an overlapping call gets
/// SPO_ERR_BUSY).
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_ARGUMENT (not finished, or already
/// taken), SPO_ERR_BUSY.
#[no_mangle]
pub extern "C" fn spo_job_take_images(
    job: *const spo_job,
    out: *mut *mut spo_images,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        let images = lock(arg_ref(job, "job")?)?.take_images()?;
        *out = into_handle(spo_images { images });
        Ok(())
    })
}

/// Frees a job (cancelling it if unfinished) and frees its pipeline's job
/// slot. NULL is a no-op.
///
/// Ownership: takes `job`; it must not be used afterwards. Images already taken stay
/// valid.
/// Threading: no other thread may use this handle during or after the call.
/// Errors: none (NULL is a no-op).
#[no_mangle]
pub extern "C" fn spo_job_free(job: *mut spo_job) {
    call_or((), || free_handle(job))
}

/// Number of images; 0 for NULL.
///
/// Ownership: borrows `images`.
/// Threading: any thread.
/// Errors: none (0 for NULL).
#[no_mangle]
pub extern "C" fn spo_images_count(images: *const spo_images) -> usize {
    // SAFETY: NULL or a live handle.
    call_or(0, || {
        unsafe { images.as_ref() }.map_or(0, |i| i.images.len())
    })
}

/// Fills `out` with a view of image `index`.
///
/// Ownership: borrows `images`; the pixels belong to it and are valid until
/// `spo_images_free`. `out` is the caller's storage, written only on success.
/// Threading: any thread.
/// Errors: SPO_ERR_NULL_ARGUMENT, SPO_ERR_INVALID_ARGUMENT (index out of range).
#[no_mangle]
pub extern "C" fn spo_images_get(
    images: *const spo_images,
    index: usize,
    out: *mut spo_image,
) -> *mut spo_error {
    call(|| {
        let out = out_slot(out, "out")?;
        let imgs = &arg_ref(images, "images")?.images;
        let img = imgs.get(index).ok_or_else(|| {
            Error::invalid_argument(format!(
                "image index {index} is out of range (count {})",
                imgs.len()
            ))
        })?;
        *out = spo_image {
            width: img.width as u32,
            height: img.height as u32,
            stride: img.stride() as u32,
            data: img.rgb.as_ptr(),
        };
        Ok(())
    })
}

/// Frees images. NULL is a no-op.
///
/// Ownership: takes `images`; every `spo_image` view of it becomes invalid.
/// Threading: no other thread may use this handle during or after the call.
/// Errors: none (NULL is a no-op).
#[no_mangle]
pub extern "C" fn spo_images_free(images: *mut spo_images) {
    call_or((), || free_handle(images))
}
