//! The denoising pipeline: a loaded model folder (text encoders, UNet, VAE and
//! scheduler config) that runs one [`Job`] at a time.

pub mod denoise;
pub mod image;
pub mod job;
pub mod job_spec;
pub mod lora;
pub mod preview;
pub mod resident;
pub mod rng;
pub mod step_graph;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub use self::image::Image;
pub use self::job::{Job, JobSpec, Status, StepMath};
pub use self::lora::{Lora, LoraMode};
pub use self::preview::{Preview, PreviewSlot};
use crate::error::{Error, ErrorCode, Result};
use crate::model::{upcast, ModelFolder, ModelKind, OnnxGraph};
use crate::options::Options;
use crate::runtime::session::Graph;
use crate::runtime::Runtime;
use crate::scheduler::{model_default, SchedulerConfig};
use crate::text::{ClipTokenizer, LongPrompt, PromptEmbeds, TextEncoder, TextEncoders};

/// The graphs of a pipeline; locked by the job that runs.
pub(crate) struct Models {
    pub text: TextEncoders,
    pub unet: Graph,
    pub vae_decoder: Graph,
    pub vae_encoder: Option<Graph>,
    /// Step graphs built so far ([`step_graph`]), one per kind.
    pub step_graphs: std::collections::HashMap<step_graph::StepGraphKind, Graph>,
}

impl Models {
    /// Puts a rebuilt graph in the slot of `component`.
    pub(crate) fn replace(
        &mut self,
        component: crate::lora::Component,
        graph: Graph,
    ) -> Result<()> {
        use crate::lora::Component;
        match component {
            Component::Unet => self.unet = graph,
            Component::TextEncoder => self.text.te1.graph = graph,
            Component::TextEncoder2 => {
                let te2 = self.text.te2.as_mut().ok_or_else(|| {
                    Error::new(
                        ErrorCode::InvalidLora,
                        "LoRA targets text_encoder_2, which this model lacks",
                    )
                })?;
                te2.graph = graph;
            }
        }
        Ok(())
    }
}

/// A loaded pipeline. Cheap to clone; clones share the sessions and the
/// one-job-at-a-time rule.
#[derive(Clone)]
pub struct Pipeline {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub runtime: Runtime,
    pub folder: ModelFolder,
    pub scheduler_config: SchedulerConfig,
    /// The scheduler of a job that names none ([`crate::scheduler::model_default`]).
    pub default_scheduler: &'static str,
    pub models: Mutex<Models>,
    busy: AtomicBool,
    pub(crate) lora: Mutex<lora::LoraState>,
    pub(crate) allow_partial_lora: bool,
    /// Latent channels, VAE downscale factor and default image size.
    pub latent_channels: usize,
    pub vae_factor: usize,
    /// The latent height and width must be multiples of this: the UNet halves
    /// them once per down block but the last, and its skip connections only
    /// concatenate when every halving is exact.
    pub latent_multiple: usize,
    pub default_size: (usize, usize),
    info: BTreeMap<String, String>,
}

fn read_config(path: &std::path::Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// `2^(down blocks - 1)` from the UNet config; 1 when the config does not say.
fn unet_latent_multiple(unet_cfg: Option<&serde_json::Value>) -> usize {
    unet_cfg
        .and_then(|c| c.get("down_block_types")?.as_array().map(Vec::len))
        .filter(|&n| (1..=8).contains(&n))
        .map_or(1, |n| 1 << (n - 1))
}

/// The scheduler config and the model's default scheduler; a fallback is
/// logged once here, at info level, and shows as info `scheduler.default`.
fn load_scheduler(
    folder: &ModelFolder,
    log: &crate::runtime::Logger,
) -> Result<(SchedulerConfig, &'static str)> {
    let path = folder.scheduler_config();
    // `from_file` names the path in its errors already.
    let config = SchedulerConfig::from_file(&path)?;
    let default = model_default(&config).map_err(|e| e.context(path.display()))?;
    if let Some(why) = &default.fallback {
        log.info(&format!(
            "{}: {why} (choose another with option 'scheduler')",
            path.display()
        ));
    }
    Ok((config, default.name))
}

fn tokenizer(folder: &ModelFolder, name: &str) -> Result<ClipTokenizer> {
    let dir = folder.dir.join(name);
    if !dir.is_dir() {
        return Err(Error::invalid_model(format!(
            "{}: missing tokenizer folder",
            dir.display()
        )));
    }
    ClipTokenizer::from_dir(&dir).map_err(|e| e.context(name))
}

/// When an fp16 VAE graph is rebuilt in fp32 ([`crate::model::upcast`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeUpcast {
    /// As diffusers: when the VAE config says `force_upcast` (its default, so
    /// also when the config is missing); the fp16-fix VAE says false.
    Auto,
    Always,
    Never,
}

impl VaeUpcast {
    fn parse(v: &str) -> Option<VaeUpcast> {
        match v {
            "auto" => Some(VaeUpcast::Auto),
            "always" => Some(VaeUpcast::Always),
            "never" => Some(VaeUpcast::Never),
            _ => None,
        }
    }
}

/// Loads a VAE component, in fp32 when it is an fp16 graph and `upcast` asks.
fn load_vae(
    rt: &Runtime,
    folder: &ModelFolder,
    component: &str,
    upcast: VaeUpcast,
) -> Result<Graph> {
    let path = folder.graph(component);
    let wanted = match upcast {
        VaeUpcast::Never => false,
        VaeUpcast::Always => true,
        VaeUpcast::Auto => folder.vae_force_upcast,
    };
    if wanted && path.is_file() {
        let graph = OnnxGraph::open(&path).map_err(|e| e.context(component))?;
        if upcast::has_fp16_io(&graph) {
            let bytes = upcast::fp16_to_fp32(&graph).map_err(|e| e.context(component))?;
            rt.logger().info(&format!(
                "{component}: fp16 graph upcast to fp32 (vae.upcast={upcast:?}; the VAE config's \
                 force_upcast is {})",
                folder.vae_force_upcast
            ));
            return Graph::load_from_memory(rt, component, &path, &bytes);
        }
    }
    Graph::load(rt, component, &path)
}

impl Pipeline {
    /// Loads the model folder `dir`. Options: `lora.allow_partial` (LoRA keys
    /// that match nothing are warnings instead of errors); `vae.upcast`
    /// (`auto`, `always`, `never`; see [`VaeUpcast`]).
    pub fn load(runtime: &Runtime, dir: &std::path::Path, options: &Options) -> Result<Pipeline> {
        options.check_consumer("pipeline", "spo_pipeline_load")?;
        let allow_partial_lora = options.bool("lora.allow_partial")?.unwrap_or(false);
        let upcast = options
            .parse("vae.upcast", "auto, always or never", VaeUpcast::parse)?
            .unwrap_or(VaeUpcast::Auto);
        let folder = ModelFolder::open(dir)?;
        let log = runtime.logger();
        let load = |c: &str| Graph::load(runtime, c, &folder.graph(c));
        let te1 = TextEncoder::new(tokenizer(&folder, "tokenizer")?, load("text_encoder")?)?;
        let te2 = match folder.kind {
            ModelKind::Sdxl => Some(TextEncoder::new(
                tokenizer(&folder, "tokenizer_2")?,
                load("text_encoder_2")?,
            )?),
            ModelKind::Sd15 => None,
        };
        let unet = load("unet")?;
        for name in ["sample", "timestep", "encoder_hidden_states"] {
            unet.require_input(name)?;
        }
        if folder.kind == ModelKind::Sdxl {
            unet.require_input("text_embeds")?;
            unet.require_input("time_ids")?;
        }
        unet.require_output(&["out_sample"])?;
        let load_vae = |c: &str| load_vae(runtime, &folder, c, upcast);
        let vae_decoder = load_vae("vae_decoder")?;
        vae_decoder.require_input("latent_sample")?;
        let vae_encoder = if folder.has("vae_encoder") {
            Some(load_vae("vae_encoder")?)
        } else {
            None
        };
        let (scheduler_config, default_scheduler) = load_scheduler(&folder, log)?;

        let vae_cfg = read_config(&folder.dir.join("vae_decoder/config.json"));
        let vae_factor = vae_cfg
            .as_ref()
            .and_then(|c| {
                c.get("block_out_channels")?
                    .as_array()
                    .map(|a| 1usize << a.len().saturating_sub(1))
            })
            .unwrap_or(8);
        let sample = unet.require_input("sample")?.clone();
        let latent_channels = sample.fixed_dim(1).unwrap_or(4);
        let unet_cfg = read_config(&folder.dir.join("unet/config.json"));
        let latent_multiple = unet_latent_multiple(unet_cfg.as_ref());
        let default_size = match (sample.fixed_dim(2), sample.fixed_dim(3)) {
            (Some(h), Some(w)) => (h * vae_factor, w * vae_factor),
            _ => {
                let s = unet_cfg
                    .as_ref()
                    .and_then(|c| c.get("sample_size")?.as_u64())
                    .map(|s| s as usize * vae_factor)
                    .unwrap_or(match folder.kind {
                        ModelKind::Sdxl => 1024,
                        ModelKind::Sd15 => 512,
                    });
                (s, s)
            }
        };

        let ep = runtime
            .eps()
            .active
            .first()
            .map(|e| e.name())
            .unwrap_or("cpu");
        let mut info = BTreeMap::new();
        info.insert("kind".into(), folder.kind.name().into());
        info.insert("dir".into(), folder.dir.display().to_string());
        let mut describe = |g: &Graph| {
            info.insert(format!("ep.{}", g.component), ep.to_owned());
            let io: Vec<String> = g
                .inputs
                .iter()
                .chain(&g.outputs)
                .map(|s| s.describe())
                .collect();
            info.insert(format!("io.{}", g.component), io.join("; "));
        };
        describe(&te1.graph);
        if let Some(t) = &te2 {
            describe(&t.graph);
        }
        describe(&unet);
        describe(&vae_decoder);
        if let Some(v) = &vae_encoder {
            describe(v);
        }
        info.insert("scheduler.default".into(), default_scheduler.to_owned());
        info.insert(
            "default_size".into(),
            format!("{}x{}", default_size.1, default_size.0),
        );
        log.info(&format!(
            "loaded {} pipeline from {}",
            folder.kind.name(),
            folder.dir.display()
        ));

        Ok(Pipeline {
            inner: Arc::new(Inner {
                runtime: runtime.clone(),
                scheduler_config,
                default_scheduler,
                models: Mutex::new(Models {
                    text: TextEncoders {
                        kind: folder.kind,
                        te1,
                        te2,
                    },
                    unet,
                    vae_decoder,
                    vae_encoder,
                    step_graphs: Default::default(),
                }),
                folder,
                busy: AtomicBool::new(false),
                lora: Mutex::new(Default::default()),
                allow_partial_lora,
                latent_channels,
                vae_factor,
                latent_multiple,
                default_size,
                info,
            }),
        })
    }

    /// The runtime the sessions were built on.
    pub fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    pub fn kind(&self) -> ModelKind {
        self.inner.folder.kind
    }

    /// Answers `spo_pipeline_info` keys: `kind`, `dir`, `default_size`,
    /// `scheduler.default`, `ep.<component>`, `io.<component>`, `lora.mode`.
    pub fn info(&self, key: &str) -> Option<String> {
        match key {
            "lora.mode" => Some(self.inner.lora.lock().mode_name().to_owned()),
            _ => self.inner.info.get(key).cloned(),
        }
    }

    pub fn info_keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.inner.info.keys().cloned().collect();
        k.push("lora.mode".into());
        k
    }

    /// Encodes a prompt and, when `cfg`, its negative, following diffusers:
    /// with no negative prompt SDXL uses zeros if the model sets
    /// `force_zeros_for_empty_prompt`, otherwise the empty string is encoded.
    /// `clip_skip` applies to the prompt only: diffusers (SD 1.5 and SDXL
    /// alike) encodes the negative prompt without it.
    pub fn encode_prompts(
        &self,
        prompt: &str,
        negative: Option<&str>,
        cfg: bool,
        clip_skip: usize,
        long: LongPrompt,
    ) -> Result<(PromptEmbeds, Option<PromptEmbeds>)> {
        let limits = self.inner.runtime.limits();
        for (what, text) in [("prompt", Some(prompt)), ("negative prompt", negative)] {
            let len = text.map_or(0, str::len) as u64;
            let key = crate::limits::MAX_PROMPT_BYTES;
            crate::limits::check(
                &format!("{what} length (bytes):"),
                len,
                limits.max_prompt_bytes,
                key,
            )?;
        }
        let mut models = self.inner.models.lock();
        let text = &mut models.text;
        // A prompt and its negative get the same number of windows (they
        // are rows of one UNet batch).
        let max = limits.max_prompt_windows;
        let key = crate::limits::MAX_PROMPT_WINDOWS;
        let windows = text.windows(prompt, long);
        crate::limits::check("prompt windows (77 tokens each):", windows as u64, max, key)?;
        let windows = if cfg {
            let neg = text.windows(negative.unwrap_or(""), long);
            crate::limits::check(
                "negative prompt windows (77 tokens each):",
                neg as u64,
                max,
                key,
            )?;
            windows.max(neg)
        } else {
            1
        };
        let pos = text.encode(prompt, clip_skip, long, windows)?;
        if !cfg {
            return Ok((pos, None));
        }
        let f = &self.inner.folder;
        let neg = match negative {
            None if f.kind == ModelKind::Sdxl && f.force_zeros_for_empty_prompt => pos.zeros_like(),
            neg => text.encode(neg.unwrap_or(""), 0, long, windows)?,
        };
        Ok((pos, Some(neg)))
    }

    /// Starts a job. Fails with `Busy` while another job of this pipeline is active.
    pub fn job(&self, spec: JobSpec) -> Result<Job> {
        let guard = BusyGuard::acquire(self)?;
        Job::new(self.clone(), spec, guard)
    }
}

/// Holds the pipeline's one active-job slot until dropped or released.
pub(crate) struct BusyGuard {
    pipeline: Option<Pipeline>,
}

impl BusyGuard {
    pub(crate) fn acquire(p: &Pipeline) -> Result<BusyGuard> {
        if p.inner.busy.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorCode::Busy,
                "the pipeline is running another job or LoRA change; a pipeline runs one job at a time",
            ));
        }
        Ok(BusyGuard {
            pipeline: Some(p.clone()),
        })
    }

    pub fn release(&mut self) {
        if let Some(p) = self.pipeline.take() {
            p.inner.busy.store(false, Ordering::Release);
        }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.release();
    }
}
