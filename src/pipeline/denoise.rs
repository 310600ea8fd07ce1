//! The per-step model math: one UNet evaluation with classifier-free guidance
//! (as one batch-2B call, or row by row when the graph fixes batch 1), the
//! optional guidance rescale, and the VAE calls.

use ndarray::{s, ArrayD, Axis, IxDyn};
use ort::session::RunOptions;

use crate::error::{Error, Result};
use crate::memory;
use crate::runtime::session::{Binding, DType, Graph, Input};

/// Everything the UNet takes besides the latents and the timestep, already
/// batched as the UNet sees it: rows `[uncond x B, cond x B]` with CFG, else
/// `[cond x B]`.
pub struct Conditioning {
    pub encoder_hidden_states: ArrayD<f32>,
    /// SDXL `text_embeds` and `time_ids`.
    pub text_embeds: Option<ArrayD<f32>>,
    pub time_ids: Option<ArrayD<f32>>,
    pub cfg: bool,
    /// LoRA slot inputs (hot-swap mode), fed unchanged to every UNet call.
    pub lora_slots: std::sync::Arc<Vec<(String, ArrayD<f32>)>>,
    /// All of the above bound once to the UNet session ([`Conditioning::bind`]),
    /// so a step passes only the latents and the timestep.
    pub binding: Option<Binding>,
}

impl Conditioning {
    /// Binds the conditioning to `unet` when one call takes the whole batch
    /// (graphs with a smaller fixed batch are fed row by row, unbound).
    pub fn bind(&mut self, unet: &Graph) -> Result<()> {
        let rows = self.encoder_hidden_states.shape()[0];
        if unet
            .require_input("sample")?
            .fixed_dim(0)
            .is_some_and(|b| b != rows)
        {
            return Ok(());
        }
        let mut fixed = vec![(
            "encoder_hidden_states",
            Input::F32(self.encoder_hidden_states.clone()),
        )];
        if let Some(te) = &self.text_embeds {
            fixed.push(("text_embeds", Input::F32(te.clone())));
        }
        if let Some(ti) = &self.time_ids {
            fixed.push(("time_ids", Input::F32(ti.clone())));
        }
        for (name, v) in self.lora_slots.iter() {
            fixed.push((name.as_str(), Input::F32(v.clone())));
        }
        self.binding = Some(unet.bind(fixed, "out_sample")?);
        Ok(())
    }
}

/// Repeats `x` (shape [1, ...]) `n` times along the batch axis. The batch
/// holds `n` copies, so it is allocated fallibly (`OutOfMemory`).
pub fn repeat_batch(x: &ArrayD<f32>, n: usize) -> Result<ArrayD<f32>> {
    let views = vec![x.view(); n];
    memory::concat(0, &views, "a batch of tensors")
}

/// Stacks along the batch axis, into a fallibly allocated batch.
pub fn cat_batch(parts: &[&ArrayD<f32>]) -> Result<ArrayD<f32>> {
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    memory::concat(0, &views, "a batch of tensors")
}

pub(crate) fn timestep_input(unet: &Graph, t: f64, batch: usize) -> Result<Input> {
    let spec = unet.require_input("timestep")?;
    let shape: Vec<usize> = match spec.shape.len() {
        0 => vec![],
        _ => vec![spec.fixed_dim(0).unwrap_or(batch)],
    };
    let n: usize = shape.iter().product();
    Ok(match spec.dtype {
        // Integer-timestep graphs get the value diffusers' int64 schedules hold.
        DType::I64 | DType::I32 => Input::I64(
            ArrayD::from_shape_vec(IxDyn(&shape), vec![t.round() as i64; n]).expect("sizes"),
        ),
        _ => Input::F32(ArrayD::from_shape_vec(IxDyn(&shape), vec![t as f32; n]).expect("sizes")),
    })
}

/// One UNet evaluation for the batch `latents` [B, C, h, w] (already scaled by
/// the scheduler), returning the guided noise prediction [B, C, h, w].
pub fn predict_noise(
    unet: &mut Graph,
    latents: &ArrayD<f32>,
    t: f64,
    cond: &mut Conditioning,
    guidance: f64,
    guidance_rescale: f64,
    run_options: &RunOptions,
) -> Result<ArrayD<f32>> {
    let b = latents.shape()[0];
    let sample = if cond.cfg {
        cat_batch(&[latents, latents])?
    } else {
        latents.clone()
    };
    let rows = sample.shape()[0];
    let fixed_batch = unet.require_input("sample")?.fixed_dim(0);
    let out = match (cond.binding.as_mut(), fixed_batch) {
        (Some(b), _) => {
            let timestep = timestep_input(unet, t, rows)?;
            let step = vec![("sample", Input::F32(sample)), ("timestep", timestep)];
            unet.run_bound(b, step, Some(run_options))?
        }
        (None, fixed_batch) => match fixed_batch {
            Some(fb) if fb != rows => {
                if rows % fb != 0 {
                    return Err(Error::invalid_model(format!(
                        "unet fixes batch {fb}, which does not divide {rows} rows"
                    )));
                }
                let mut parts = Vec::new();
                for start in (0..rows).step_by(fb) {
                    let r = start..start + fb;
                    let sl = |a: &ArrayD<f32>| {
                        memory::to_owned(a.slice_axis(Axis(0), r.clone().into()), "a batch row")
                    };
                    parts.push(unet_call(
                        unet,
                        sl(&sample)?,
                        t,
                        sl(&cond.encoder_hidden_states)?,
                        cond.text_embeds.as_ref().map(sl).transpose()?,
                        cond.time_ids.as_ref().map(sl).transpose()?,
                        &cond.lora_slots,
                        run_options,
                    )?);
                }
                cat_batch(&parts.iter().collect::<Vec<_>>())?
            }
            _ => unet_call(
                unet,
                sample,
                t,
                cond.encoder_hidden_states.clone(),
                cond.text_embeds.clone(),
                cond.time_ids.clone(),
                &cond.lora_slots,
                run_options,
            )?,
        },
    };
    if !cond.cfg {
        return Ok(out);
    }
    let uncond = out.slice_axis(Axis(0), (0..b).into());
    let text = out.slice_axis(Axis(0), (b..2 * b).into());
    let g = guidance as f32;
    // uncond + (text - uncond) * g, written over a fallible copy of text.
    let mut guided = memory::to_owned(text.view(), "the guided noise prediction")?;
    guided.zip_mut_with(&uncond, |t, &u| *t = u + (*t - u) * g);
    if guidance_rescale > 0.0 {
        rescale(&mut guided, &text, guidance_rescale);
    }
    Ok(guided)
}

#[allow(clippy::too_many_arguments)]
fn unet_call(
    unet: &mut Graph,
    sample: ArrayD<f32>,
    t: f64,
    ehs: ArrayD<f32>,
    text_embeds: Option<ArrayD<f32>>,
    time_ids: Option<ArrayD<f32>>,
    lora_slots: &[(String, ArrayD<f32>)],
    run_options: &RunOptions,
) -> Result<ArrayD<f32>> {
    let batch = sample.shape()[0];
    let mut inputs = vec![
        ("sample", Input::F32(sample)),
        ("timestep", timestep_input(unet, t, batch)?),
        ("encoder_hidden_states", Input::F32(ehs)),
    ];
    if let Some(te) = text_embeds {
        inputs.push(("text_embeds", Input::F32(te)));
    }
    if let Some(ti) = time_ids {
        inputs.push(("time_ids", Input::F32(ti)));
    }
    for (name, v) in lora_slots {
        inputs.push((name.as_str(), Input::F32(v.clone())));
    }
    Ok(unet
        .run(inputs, &["out_sample"], Some(run_options))?
        .remove(0))
}

/// diffusers' `rescale_noise_cfg`: per image, scale the guided prediction to
/// the standard deviation of the text prediction, then blend by `phi`.
fn rescale(guided: &mut ArrayD<f32>, text: &ndarray::ArrayViewD<f32>, phi: f64) {
    let std = |a: ndarray::ArrayViewD<f32>| {
        let n = a.len() as f64;
        let mean = a.iter().map(|v| *v as f64).sum::<f64>() / n;
        (a.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    };
    for i in 0..guided.shape()[0] {
        let st = std(text.slice(s![i, .., .., ..]).into_dyn());
        let sg = std(guided.slice(s![i, .., .., ..]).into_dyn());
        let factor = st / sg;
        guided
            .slice_mut(s![i, .., .., ..])
            .mapv_inplace(|v| (phi * (v as f64 * factor) + (1.0 - phi) * v as f64) as f32);
    }
}

/// Decodes latents (already divided by the scaling factor) to [B, 3, H, W].
pub fn vae_decode(
    vae: &mut Graph,
    latents: ArrayD<f32>,
    run_options: &RunOptions,
) -> Result<ArrayD<f32>> {
    let out = vae.require_output(&["sample"])?.name.clone();
    let fixed = vae.require_input("latent_sample")?.fixed_dim(0);
    let b = latents.shape()[0];
    if fixed.is_some_and(|f| f != b) {
        // Decode image by image for a batch-1 graph.
        let mut parts = Vec::new();
        for i in 0..b {
            let row = memory::to_owned(
                latents.slice_axis(Axis(0), (i..i + 1).into()),
                "a latent row",
            )?;
            parts.push(
                vae.run(
                    vec![("latent_sample", Input::F32(row))],
                    &[&out],
                    Some(run_options),
                )?
                .remove(0),
            );
        }
        return finite_image(vae, cat_batch(&parts.iter().collect::<Vec<_>>())?);
    }
    let image = vae
        .run(
            vec![("latent_sample", Input::F32(latents))],
            &[&out],
            Some(run_options),
        )?
        .remove(0);
    finite_image(vae, image)
}

/// An image with inf/NaN is an fp16 overflow (the SDXL VAE's failure mode),
/// not a picture: fail loudly rather than hand back black pixels.
fn finite_image(vae: &Graph, image: ArrayD<f32>) -> Result<ArrayD<f32>> {
    let bad = image.iter().filter(|v| !v.is_finite()).count();
    if bad == 0 {
        return Ok(image);
    }
    let fp16 = vae.inputs.iter().any(|i| i.dtype == DType::F16);
    Err(Error::invalid_model(format!(
        "{}: {} produced {bad} non-finite values of {}{}",
        vae.component,
        vae.path.display(),
        image.len(),
        if fp16 {
            "; the fp16 VAE overflowed: load the pipeline with vae.upcast=always (or auto with \
             force_upcast in its config), or use an fp16-fix VAE"
        } else {
            ""
        }
    )))
}

/// Encodes an image [1, 3, H, W] to the latent distribution's mean [1, C, h, w]
/// (unscaled). Accepts optimum's `latent_parameters` (mean and log-variance)
/// or a plain `latent_sample` output.
pub fn vae_encode_mean(
    vae: &mut Graph,
    image: ArrayD<f32>,
    channels: usize,
    run_options: &RunOptions,
) -> Result<ArrayD<f32>> {
    let out = vae
        .require_output(&["latent_parameters", "latent_sample"])?
        .name
        .clone();
    let r = vae
        .run(
            vec![("sample", Input::F32(image))],
            &[&out],
            Some(run_options),
        )?
        .remove(0);
    let c = r.shape().get(1).copied().unwrap_or(0);
    if c == 2 * channels {
        memory::to_owned(
            r.slice_axis(Axis(1), (0..channels).into()),
            "the latent mean",
        )
    } else if c == channels {
        Ok(r)
    } else {
        Err(Error::invalid_model(format!(
            "vae_encoder output '{out}' has {c} channels; expected {channels} or {}",
            2 * channels
        )))
    }
}
