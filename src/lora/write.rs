//! Writing a trained UNet LoRA as a file other tools load: the kohya /
//! A1111 "webui" dialect (`lora_unet_<flat module>.lora_down.weight`,
//! `.lora_up.weight`, `.alpha`; what ComfyUI and A1111 read) or diffusers'
//! (`unet.<module>.lora_A.weight` / `.lora_B.weight`, with rank and alpha in
//! the `lora_adapter_metadata` header that `load_lora_weights` reads). The
//! input is the PEFT form the trainer and `spo grad` use: `<module>.lora_A.weight`
//! [r, in] and `<module>.lora_B.weight` [out, r], scaled by `alpha / r`.

use std::collections::HashMap;
use std::path::Path;

use ndarray::ArrayD;

use super::keys::{flatten, UnetLayout};
use crate::error::{Error, Result};
use crate::model::tensors::{self, NamedTensors};

/// The file dialect to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraDialect {
    /// kohya / A1111 "webui" names, per-module `.alpha`.
    Kohya,
    /// diffusers' names, alpha in the header metadata.
    Diffusers,
}

impl LoraDialect {
    pub fn parse(s: &str) -> Option<LoraDialect> {
        match s {
            "kohya" | "webui" => Some(LoraDialect::Kohya),
            "diffusers" => Some(LoraDialect::Diffusers),
            _ => None,
        }
    }
}

const A: &str = ".lora_A.weight";
const B: &str = ".lora_B.weight";

/// How a trained LoRA is written.
#[derive(Debug, Clone, Copy)]
pub struct LoraOut<'a> {
    pub rank: usize,
    pub alpha: f32,
    pub dialect: LoraDialect,
    /// The UNet's block layout: kohya names then use the SGM numbering
    /// (`lora_unet_input_blocks_4_1_...`), as kohya, A1111 and ComfyUI name
    /// SDXL modules; without it they flatten the diffusers path, as kohya
    /// names SD 1.x modules.
    pub layout: Option<&'a UnetLayout>,
}

/// Writes the UNet LoRA `params` (PEFT keys; every module needs both
/// factors, all of rank `out.rank`) atomically.
pub fn write_lora(path: &Path, params: &NamedTensors, out: LoraOut) -> Result<()> {
    let (tensors, meta) = lora_tensors(params, out)?;
    tensors::write_with_metadata(path, &tensors, Some(meta))
}

/// The file [`write_lora`] writes, in memory.
pub fn lora_bytes(params: &NamedTensors, out: LoraOut) -> Result<Vec<u8>> {
    let (tensors, meta) = lora_tensors(params, out)?;
    tensors::to_bytes(&tensors, Some(meta))
}

fn lora_tensors(
    params: &NamedTensors,
    o: LoraOut,
) -> Result<(NamedTensors, HashMap<String, String>)> {
    let (rank, alpha) = (o.rank, o.alpha);
    let modules = modules(params, rank)?;
    if !alpha.is_finite() || alpha <= 0.0 {
        return Err(Error::invalid_argument(format!(
            "LoRA alpha {alpha} must be finite and positive"
        )));
    }
    let mut out = NamedTensors::new();
    let mut meta = HashMap::new();
    match o.dialect {
        LoraDialect::Kohya => {
            for m in &modules {
                let path = o.layout.and_then(|l| l.sgm_path(m));
                let stem = format!("lora_unet_{}", flatten(path.as_deref().unwrap_or(m)));
                out.insert(
                    format!("{stem}.lora_down.weight"),
                    params[&format!("{m}{A}")].clone(),
                );
                out.insert(
                    format!("{stem}.lora_up.weight"),
                    params[&format!("{m}{B}")].clone(),
                );
                out.insert(format!("{stem}.alpha"), ArrayD::from_elem(vec![], alpha));
            }
            meta.insert("ss_network_module".into(), "networks.lora".into());
            meta.insert("ss_network_dim".into(), rank.to_string());
            meta.insert("ss_network_alpha".into(), alpha.to_string());
        }
        LoraDialect::Diffusers => {
            for m in &modules {
                for part in [A, B] {
                    out.insert(
                        format!("unet.{m}{part}"),
                        params[&format!("{m}{part}")].clone(),
                    );
                }
            }
            let config = serde_json::json!({
                "unet.r": rank,
                "unet.lora_alpha": alpha,
                "unet.target_modules": modules,
            });
            meta.insert("lora_adapter_metadata".into(), config.to_string());
        }
    }
    meta.insert("format".into(), "pt".into());
    Ok((out, meta))
}

/// The module paths of `params`, checked: both factors present, of rank `rank`.
fn modules(params: &NamedTensors, rank: usize) -> Result<Vec<String>> {
    let mut modules = Vec::new();
    for (key, a) in params {
        let Some(m) = key.strip_suffix(A) else {
            if key.ends_with(B) {
                continue;
            }
            return Err(Error::invalid_argument(format!(
                "LoRA parameter '{key}' is not a PEFT '<module>{A}' / '{B}' key"
            )));
        };
        let b = params.get(&format!("{m}{B}")).ok_or_else(|| {
            Error::invalid_argument(format!("LoRA module '{m}' has A but no '{m}{B}'"))
        })?;
        let ok = a.ndim() == 2 && b.ndim() == 2 && a.shape()[0] == rank && b.shape()[1] == rank;
        if !ok {
            return Err(Error::invalid_argument(format!(
                "LoRA module '{m}': A {:?} / B {:?} are not a rank-{rank} pair ([r,in] / [out,r])",
                a.shape(),
                b.shape()
            )));
        }
        modules.push(m.to_owned());
    }
    if let Some(orphan) = params
        .keys()
        .filter_map(|k| k.strip_suffix(B))
        .find(|m| !params.contains_key(&format!("{m}{A}")))
    {
        return Err(Error::invalid_argument(format!(
            "LoRA module '{orphan}' has B but no '{orphan}{A}'"
        )));
    }
    if modules.is_empty() {
        return Err(Error::invalid_argument("no LoRA parameters to write"));
    }
    Ok(modules)
}
