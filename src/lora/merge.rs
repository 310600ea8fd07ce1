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

use ndarray::{s, Array2, ArrayView2, ArrayViewMut2, Axis};

use super::format::{LoraKind, LoraModule, Tensor};
use super::targets::WeightLayout;

/// Largest value of f16.
pub const F16_MAX: f32 = 65504.0;

fn view2(t: &Tensor, rows: usize) -> Result<ArrayView2<'_, f32>, String> {
    if rows == 0 || !t.numel().is_multiple_of(rows) {
        return Err(format!(
            "tensor {:?} cannot be viewed with {rows} rows",
            t.shape
        ));
    }
    ArrayView2::from_shape((rows, t.numel() / rows), &t.data).map_err(|e| e.to_string())
}

/// `ΔW` (unscaled) as `[out, in·kh·kw]` for a weight whose PyTorch shape is `torch_shape`.
pub fn delta(module: &LoraModule, torch_shape: &[usize]) -> Result<Array2<f32>, String> {
    if torch_shape.len() < 2 {
        return Err(format!("weight shape {torch_shape:?} is not a matrix"));
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
            view2(up, up.shape[0])?.dot(&view2(down, r)?)
        }
        LoraKind::Lora {
            down,
            up,
            mid: Some(mid),
        } => {
            let r = down.shape[0];
            let (kh, kw) = (mid.shape[2], mid.shape[3]);
            if kh * kw != ksz {
                return Err(format!(
                    "lora_mid {:?} kernel vs weight {torch_shape:?}",
                    mid.shape
                ));
            }
            let up2 = view2(up, up.shape[0])?;
            let down2 = view2(down, r)?; // [r, in]
            let inn = down2.ncols();
            let mid4 = ndarray::ArrayView4::from_shape((r, r, kh, kw), &mid.data)
                .map_err(|e| e.to_string())?;
            let mut d = Array2::<f32>::zeros((up2.nrows(), inn * ksz));
            for k in 0..kh {
                for l in 0..kw {
                    let m = mid4.slice(s![.., .., k, l]);
                    let part = up2.dot(&m).dot(&down2); // [out, in]
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
                return Err("LoHa with Tucker cores (hada_t1 / hada_t2) is not supported".into());
            }
            let a = view2(w1a, w1a.shape[0])?.dot(&view2(w1b, w1b.shape[0])?);
            let b = view2(w2a, w2a.shape[0])?.dot(&view2(w2b, w2b.shape[0])?);
            if a.dim() != b.dim() {
                return Err(format!(
                    "LoHa products {:?} and {:?} differ",
                    a.dim(),
                    b.dim()
                ));
            }
            a * b
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
                return Err("LoKr with a Tucker core (lokr_t2) is not supported".into());
            }
            let factor = |w: &Option<Tensor>,
                          a: &Option<Tensor>,
                          b: &Option<Tensor>|
             -> Result<Array2<f32>, String> {
                match (w, a, b) {
                    (Some(w), _, _) => Ok(view2(w, w.shape[0])?.to_owned()),
                    (None, Some(a), Some(b)) => {
                        Ok(view2(a, a.shape[0])?.dot(&view2(b, b.shape[0])?))
                    }
                    _ => Err("incomplete LoKr factor".into()),
                }
            };
            let f1 = factor(w1, w1a, w1b)?;
            let f2 = factor(w2, w2a, w2b)?;
            let (a, b) = f1.dim();
            let inn = torch_shape[1];
            if !out.is_multiple_of(a) || !inn.is_multiple_of(b) {
                return Err(format!(
                    "LoKr w1 {:?} does not divide weight {torch_shape:?}",
                    f1.dim()
                ));
            }
            let (c, dd) = (out / a, inn / b);
            if f2.len() != c * dd * ksz {
                return Err(format!(
                    "LoKr w2 {:?} does not fit weight {torch_shape:?} with w1 {:?}",
                    f2.dim(),
                    f1.dim()
                ));
            }
            let f2 = f2
                .into_shape_with_order((c, dd * ksz))
                .map_err(|e| e.to_string())?;
            let mut d = Array2::<f32>::zeros((out, cols));
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
        return Err(format!(
            "the LoRA gives a delta of {:?} for weight {torch_shape:?} ([out, in·k] = [{out}, {cols}])",
            d.dim()
        ));
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
) -> Result<(), String> {
    let torch_shape = layout.torch_shape(stored_shape);
    let n: usize = stored_shape.iter().product();
    if weight.len() != n || stored_shape.len() < 2 {
        return Err(format!(
            "weight has {} values for shape {stored_shape:?}",
            weight.len()
        ));
    }
    let d = delta(module, &torch_shape)?;
    let scale = module.scale();
    let (out, cols) = d.dim();
    let inout = layout == WeightLayout::LinearInOut;
    match &module.dora_scale {
        None => {
            let s = multiplier * scale;
            if inout {
                let mut w =
                    ArrayViewMut2::from_shape((cols, out), weight).map_err(|e| e.to_string())?;
                w.scaled_add(s, &d.t());
            } else {
                let mut w =
                    ArrayViewMut2::from_shape((out, cols), weight).map_err(|e| e.to_string())?;
                w.scaled_add(s, &d);
            }
        }
        Some(mag) => {
            let w0: Array2<f32> = if inout {
                ArrayView2::from_shape((cols, out), &*weight)
                    .map_err(|e| e.to_string())?
                    .t()
                    .to_owned()
            } else {
                ArrayView2::from_shape((out, cols), &*weight)
                    .map_err(|e| e.to_string())?
                    .to_owned()
            };
            let inn = torch_shape[1];
            let ksz = cols / inn;
            let mut m = w0.clone();
            m.scaled_add(scale, &d);
            let per_out = mag.shape.first() == Some(&out) && mag.numel() == out;
            let mut wd = m.clone();
            if per_out {
                for (o, mut row) in wd.axis_iter_mut(Axis(0)).enumerate() {
                    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                    row.mapv_inplace(|v| mag.data[o] * v / norm);
                }
            } else if mag.numel() == inn {
                for i in 0..inn {
                    let blk = m.slice(s![.., i * ksz..(i + 1) * ksz]);
                    let norm = blk.iter().map(|v| v * v).sum::<f32>().sqrt();
                    let f = mag.data[i] / norm;
                    wd.slice_mut(s![.., i * ksz..(i + 1) * ksz])
                        .mapv_inplace(|v| v * f);
                }
            } else {
                return Err(format!(
                    "dora_scale {:?} fits neither the output ({out}) nor the input ({inn}) dim",
                    mag.shape
                ));
            }
            // W' = W + multiplier · (W_d − W)
            let mut new = w0.clone();
            new.scaled_add(multiplier, &(&wd - &w0));
            if inout {
                let mut w =
                    ArrayViewMut2::from_shape((cols, out), weight).map_err(|e| e.to_string())?;
                w.assign(&new.t());
            } else {
                let mut w =
                    ArrayViewMut2::from_shape((out, cols), weight).map_err(|e| e.to_string())?;
                w.assign(&new);
            }
        }
    }
    Ok(())
}

/// Casts to f16, clamping finite values to ±65504 (NaN stays NaN).
pub fn to_f16_clamped(values: &[f32]) -> Vec<half::f16> {
    values
        .iter()
        .map(|&v| {
            half::f16::from_f32(if v.is_nan() {
                v
            } else {
                v.clamp(-F16_MAX, F16_MAX)
            })
        })
        .collect()
}

/// Casts to bf16.
pub fn to_bf16(values: &[f32]) -> Vec<half::bf16> {
    values.iter().map(|&v| half::bf16::from_f32(v)).collect()
}
