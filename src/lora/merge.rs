//! Merge math, in f32 with a real GEMM (ndarray `dot`, i.e. matrixmultiply).
//!
//! * LoRA / LoCon: `ΔW = up · down` (conv: `down` flattened to `[r, in·kh·kw]`);
//!   Tucker LoCon: `ΔW[:, :, k, l] = up · mid[:, :, k, l] · down`.
//! * LoHa: `ΔW = (w1a · w1b) ⊙ (w2a · w2b)`.
//! * LoKr: `ΔW = kron(w1, w2)` with `w = a · b` for decomposed factors.
//! * `W' = W + multiplier · (alpha / rank) · ΔW`; DoRA:
//!   `W_d = dora_scale · (W + s·ΔW) / ‖W + s·ΔW‖` (norm per output row or per
//!   input column, whichever `dora_scale`'s shape has), `W' = W + multiplier · (W_d − W)`.
//!
//! The file conventions behind them: docs/architecture.md, "LoRA".

//!
//! Every buffer here is as large as the weight it changes (or a LoRA factor),
//! so each is allocated through [`crate::memory`]: a failure is
//! `OutOfMemory`, not an abort. Shape errors are `InvalidLora`.

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};

use super::format::{LoraKind, LoraModule, Tensor};
use super::targets::WeightLayout;
use crate::error::{Error, Result};
use crate::memory;

/// The name of the LoRA delta buffer in out-of-memory errors.
const DELTA: &str = "the LoRA delta";

/// Largest value of f16.
pub const F16_MAX: f32 = 65504.0;

fn view2(t: &Tensor, rows: usize) -> Result<ArrayView2<'_, f32>> {
    if rows == 0 || !t.numel().is_multiple_of(rows) {
        return Err(Error::invalid_lora(format!(
            "tensor {:?} cannot be viewed with {rows} rows",
            t.shape
        )));
    }
    ArrayView2::from_shape((rows, t.numel() / rows), &t.data).map_err(shape_error)
}

fn shape_error(e: ndarray::ShapeError) -> Error {
    Error::invalid_lora(e.to_string())
}

/// `a · b` of two factors, fallibly allocated.
fn mul(a: &ArrayView2<'_, f32>, b: &ArrayView2<'_, f32>) -> Result<Array2<f32>> {
    memory::matmul(a, b, DELTA).map_err(|e| match e.code {
        crate::error::ErrorCode::OutOfMemory => e,
        _ => Error::invalid_lora(e.message),
    })
}

/// `ΔW` (unscaled) as `[out, in·kh·kw]` for a weight whose PyTorch shape is `torch_shape`.
pub fn delta(module: &LoraModule, torch_shape: &[usize]) -> Result<Array2<f32>> {
    if torch_shape.len() < 2 {
        return Err(Error::invalid_lora(format!(
            "weight shape {torch_shape:?} is not a matrix"
        )));
    }
    let out = torch_shape[0];
    let cols: usize = torch_shape[1..].iter().product();
    let ksz: usize = torch_shape[2..].iter().product();
    let d = match &module.kind {
        LoraKind::Lora {
            down,
            up,
            mid: None,
        } => {
            let r = down.shape[0];
            mul(&view2(up, up.shape[0])?, &view2(down, r)?)?
        }
        LoraKind::Lora {
            down,
            up,
            mid: Some(mid),
        } => {
            let r = down.shape[0];
            let (kh, kw) = (mid.shape[2], mid.shape[3]);
            if kh * kw != ksz {
                return Err(Error::invalid_lora(format!(
                    "lora_mid {:?} kernel vs weight {torch_shape:?}",
                    mid.shape
                )));
            }
            let up2 = view2(up, up.shape[0])?;
            let down2 = view2(down, r)?; // [r, in]
            let inn = down2.ncols();
            let mid4 =
                ndarray::ArrayView4::from_shape((r, r, kh, kw), &mid.data).map_err(shape_error)?;
            let mut d = memory::zeros(ndarray::Ix2(up2.nrows(), inn * ksz), DELTA)?;
            for k in 0..kh {
                for l in 0..kw {
                    let m = mid4.slice(s![.., .., k, l]);
                    let part = mul(&mul(&up2, &m)?.view(), &down2)?; // [out, in]
                    let pos = k * kw + l;
                    for (i, col) in part.axis_iter(Axis(1)).enumerate() {
                        d.column_mut(i * ksz + pos).assign(&col);
                    }
                }
            }
            d
        }
        LoraKind::LoHa {
            w1a,
            w1b,
            w2a,
            w2b,
            t1,
            t2,
        } => {
            if t1.is_some() || t2.is_some() {
                return Err(Error::invalid_lora(
                    "LoHa with Tucker cores (hada_t1 / hada_t2) is not supported",
                ));
            }
            let mut a = mul(&view2(w1a, w1a.shape[0])?, &view2(w1b, w1b.shape[0])?)?;
            let b = mul(&view2(w2a, w2a.shape[0])?, &view2(w2b, w2b.shape[0])?)?;
            if a.dim() != b.dim() {
                return Err(Error::invalid_lora(format!(
                    "LoHa products {:?} and {:?} differ",
                    a.dim(),
                    b.dim()
                )));
            }
            a *= &b;
            a
        }
        LoraKind::LoKr {
            w1,
            w1a,
            w1b,
            w2,
            w2a,
            w2b,
            t2,
        } => {
            if t2.is_some() {
                return Err(Error::invalid_lora(
                    "LoKr with a Tucker core (lokr_t2) is not supported",
                ));
            }
            let factor = |w: &Option<Tensor>,
                          a: &Option<Tensor>,
                          b: &Option<Tensor>|
             -> Result<Array2<f32>> {
                match (w, a, b) {
                    (Some(w), _, _) => memory::to_owned(view2(w, w.shape[0])?, DELTA),
                    (None, Some(a), Some(b)) => mul(&view2(a, a.shape[0])?, &view2(b, b.shape[0])?),
                    _ => Err(Error::invalid_lora("incomplete LoKr factor")),
                }
            };
            let f1 = factor(w1, w1a, w1b)?;
            let f2 = factor(w2, w2a, w2b)?;
            let (a, b) = f1.dim();
            let inn = torch_shape[1];
            if !out.is_multiple_of(a) || !inn.is_multiple_of(b) {
                return Err(Error::invalid_lora(format!(
                    "LoKr w1 {:?} does not divide weight {torch_shape:?}",
                    f1.dim()
                )));
            }
            let (c, dd) = (out / a, inn / b);
            if f2.len() != c * dd * ksz {
                return Err(Error::invalid_lora(format!(
                    "LoKr w2 {:?} does not fit weight {torch_shape:?} with w1 {:?}",
                    f2.dim(),
                    f1.dim()
                )));
            }
            let f2 = f2
                .into_shape_with_order((c, dd * ksz))
                .map_err(shape_error)?;
            let mut d = memory::zeros(ndarray::Ix2(out, cols), DELTA)?;
            for i in 0..a {
                for j in 0..b {
                    let w = f1[[i, j]];
                    let mut blk =
                        d.slice_mut(s![i * c..(i + 1) * c, j * dd * ksz..(j + 1) * dd * ksz]);
                    blk.scaled_add(w, &f2);
                }
            }
            d
        }
    };
    if d.dim() != (out, cols) {
        return Err(Error::invalid_lora(format!(
            "the LoRA gives a delta of {:?} for weight {torch_shape:?} ([out, in·k] = [{out}, {cols}])",
            d.dim()
        )));
    }
    Ok(d)
}

/// Merges one module into `weight` (stored with `stored_shape` in `layout`):
/// `W += multiplier · scale · ΔW`, or the DoRA rule when the module has `dora_scale`.
pub fn merge_into(
    weight: &mut [f32],
    stored_shape: &[usize],
    layout: WeightLayout,
    module: &LoraModule,
    multiplier: f32,
) -> Result<()> {
    let torch_shape = layout.torch_shape(stored_shape);
    let n: usize = stored_shape.iter().product();
    if weight.len() != n || stored_shape.len() < 2 {
        return Err(Error::invalid_lora(format!(
            "weight has {} values for shape {stored_shape:?}",
            weight.len()
        )));
    }
    let d = delta(module, &torch_shape)?;
    let (out, cols) = d.dim();
    let inout = layout == WeightLayout::LinearInOut;
    let mut w = if inout {
        ArrayViewMut2::from_shape((cols, out), weight)
            .map_err(shape_error)?
            .reversed_axes()
    } else {
        ArrayViewMut2::from_shape((out, cols), weight).map_err(shape_error)?
    };
    match &module.dora_scale {
        None => w.scaled_add(multiplier * module.scale(), &d),
        Some(mag) => {
            let new = dora(w.view(), d, mag, module.scale(), multiplier, torch_shape[1])?;
            w.assign(&new);
        }
    }
    Ok(())
}

/// The DoRA rule for `w0` (as `[out, in·k]`): `W_d = mag · (W + s·ΔW) / ‖W + s·ΔW‖`,
/// returned as `W + multiplier · (W_d − W)`. `d` is reused as the work buffer.
fn dora(
    w0: ArrayView2<'_, f32>,
    mut d: Array2<f32>,
    mag: &Tensor,
    scale: f32,
    multiplier: f32,
    inn: usize,
) -> Result<Array2<f32>> {
    let (out, cols) = d.dim();
    let ksz = cols / inn;
    // wd = W + s·ΔW, in place of ΔW.
    d.zip_mut_with(&w0, |dv, &wv| *dv = wv + scale * *dv);
    let mut wd = d;
    if mag.shape.first() == Some(&out) && mag.numel() == out {
        for (o, mut row) in wd.axis_iter_mut(Axis(0)).enumerate() {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.mapv_inplace(|v| mag.data[o] * v / norm);
        }
    } else if mag.numel() == inn {
        for i in 0..inn {
            let mut blk = wd.slice_mut(s![.., i * ksz..(i + 1) * ksz]);
            let norm = blk.iter().map(|v| v * v).sum::<f32>().sqrt();
            let f = mag.data[i] / norm;
            blk.mapv_inplace(|v| v * f);
        }
    } else {
        return Err(Error::invalid_lora(format!(
            "dora_scale {:?} fits neither the output ({out}) nor the input ({inn}) dim",
            mag.shape
        )));
    }
    // W' = W + multiplier · (W_d − W)
    let mut new = memory::to_owned(w0, "the DoRA-merged weight")?;
    wd -= &w0;
    new.scaled_add(multiplier, &wd);
    Ok(new)
}

/// Casts to f16, clamping finite values to ±65504 (NaN stays NaN).
pub fn to_f16_clamped(values: &[f32]) -> Result<Vec<half::f16>> {
    let cast = |&v: &f32| {
        half::f16::from_f32(if v.is_nan() {
            v
        } else {
            v.clamp(-F16_MAX, F16_MAX)
        })
    };
    memory::collect(
        values.len(),
        values.iter().map(cast),
        "the merged f16 weight",
    )
}

/// Casts to bf16.
pub fn to_bf16(values: &[f32]) -> Result<Vec<half::bf16>> {
    let cast = |&v: &f32| half::bf16::from_f32(v);
    memory::collect(
        values.len(),
        values.iter().map(cast),
        "the merged bf16 weight",
    )
}
