//! A diffusers/optimum ONNX model folder: which pipeline it is, where each
//! component lives, and the constants its JSON files give (VAE scale, empty
//! prompt handling). Nothing here is hard-coded per release when the folder
//! states it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Two text encoders, `text_embeds` / `time_ids` micro-conditioning.
    Sdxl,
    /// One text encoder.
    Sd15,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Sdxl => "sdxl",
            ModelKind::Sd15 => "sd15",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub dir: PathBuf,
    pub kind: ModelKind,
    /// `force_zeros_for_empty_prompt` from model_index.json (SDXL default true).
    pub force_zeros_for_empty_prompt: bool,
    /// VAE `scaling_factor` from vae_decoder/config.json, else the kind's default.
    pub vae_scaling_factor: f64,
    /// VAE `shift_factor`, when the config has one.
    pub vae_shift_factor: f64,
    /// The VAE config's `force_upcast` (diffusers' default true also when the
    /// config or key is missing; the fp16-fix VAE sets false).
    pub vae_force_upcast: bool,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::invalid_model(format!("{}: {e}", path.display())))
}

fn parse_json(text: &str, path: &Path) -> Result<Value> {
    serde_json::from_str(text)
        .map_err(|e| Error::invalid_model(format!("{}: invalid JSON: {e}", path.display())))
}

impl ModelFolder {
    /// Reads `model_index.json` and the component configs under `dir`.
    pub fn open(dir: &Path) -> Result<ModelFolder> {
        if !dir.is_dir() {
            return Err(Error::invalid_model(format!(
                "model folder {} does not exist",
                dir.display()
            )));
        }
        let index_path = dir.join("model_index.json");
        let index_text = read_text(&index_path)?;
        let vae_path = ["vae_decoder/config.json", "vae/config.json"]
            .iter()
            .map(|p| dir.join(p))
            .find(|p| p.is_file());
        let vae_text = vae_path.as_deref().map(read_text).transpose()?;
        let vae = vae_path.as_deref().zip(vae_text.as_deref());
        Self::from_configs(dir, &index_text, vae)
    }

    /// [`open`](Self::open) on config texts already read: `index` is
    /// `model_index.json`, `vae` the VAE config's path and text. Public for the
    /// fuzz targets.
    #[doc(hidden)]
    pub fn from_configs(
        dir: &Path,
        index: &str,
        vae: Option<(&Path, &str)>,
    ) -> Result<ModelFolder> {
        let index_path = dir.join("model_index.json");
        let index = parse_json(index, &index_path)?;
        let class = index
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let has = |k: &str| index.get(k).is_some_and(|v| !v.is_null());
        let kind = if class.contains("XL") || has("text_encoder_2") {
            ModelKind::Sdxl
        } else if has("text_encoder") || class.contains("StableDiffusion") {
            ModelKind::Sd15
        } else {
            return Err(Error::invalid_model(format!(
                "{}: cannot tell the pipeline kind (class '{class}', no text_encoder entry)",
                index_path.display()
            )));
        };
        let force_zeros = index
            .get("force_zeros_for_empty_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(kind == ModelKind::Sdxl);
        let vae_cfg = vae.map(|(p, text)| parse_json(text, p)).transpose()?;
        let get = |k: &str| {
            vae_cfg
                .as_ref()
                .and_then(|c| c.get(k))
                .and_then(Value::as_f64)
        };
        let default_scale = match kind {
            ModelKind::Sdxl => 0.13025,
            ModelKind::Sd15 => 0.18215,
        };
        Ok(ModelFolder {
            dir: dir.to_owned(),
            kind,
            force_zeros_for_empty_prompt: force_zeros,
            vae_scaling_factor: get("scaling_factor").unwrap_or(default_scale),
            vae_shift_factor: get("shift_factor").unwrap_or(0.0),
            vae_force_upcast: vae_cfg
                .as_ref()
                .and_then(|c| c.get("force_upcast"))
                .and_then(Value::as_bool)
                .unwrap_or(true),
        })
    }

    /// `<component>/model.onnx`.
    pub fn graph(&self, component: &str) -> PathBuf {
        self.dir.join(component).join("model.onnx")
    }

    pub fn has(&self, component: &str) -> bool {
        self.graph(component).is_file()
    }

    pub fn scheduler_config(&self) -> PathBuf {
        self.dir.join("scheduler").join("scheduler_config.json")
    }
}
