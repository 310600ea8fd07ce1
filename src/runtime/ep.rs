//! Execution providers: parsing the `ep` list, probing what really works on this
//! machine, and registering the active ones on every session.

use ort::environment::Environment;
use ort::ep::{self, ArbitrarilyConfigurableExecutionProvider, ExecutionProvider};
use ort::session::builder::SessionBuilder;

use super::log::Logger;
use crate::error::{Error, ErrorCode, Result};
use crate::options::Options;

/// The execution providers this build knows how to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ep {
    Cuda,
    Cpu,
}

impl Ep {
    pub fn name(self) -> &'static str {
        match self {
            Ep::Cuda => "cuda",
            Ep::Cpu => "cpu",
        }
    }
    fn parse(s: &str) -> Option<Ep> {
        match s.to_ascii_lowercase().as_str() {
            "cuda" => Some(Ep::Cuda),
            "cpu" => Some(Ep::Cpu),
            _ => None,
        }
    }
}

/// CUDA option keys passed through to ONNX Runtime (`cuda.<key>`).
const CUDA_KEYS: &[&str] = &[
    "device_id",
    "arena_extend_strategy",
    "cudnn_conv_algo_search",
    "gpu_mem_limit",
    "enable_cuda_graph",
];

/// The resolved provider set of one runtime.
#[derive(Debug, Clone)]
pub struct EpSet {
    pub requested: Vec<Ep>,
    pub active: Vec<Ep>,
    cuda_options: Vec<(String, String)>,
}

impl EpSet {
    /// Reads `ep`, `ep.strict` and `cuda.*`, then probes each requested provider.
    /// A provider that cannot start is dropped with a warning, or is an error
    /// when `ep.strict=true`. CPU is always appended last as the fallback.
    pub fn resolve(options: &Options, env: &Environment, logger: &Logger) -> Result<EpSet> {
        // Without an explicit list, a CUDA provider missing from the loaded
        // build is the expected case on a CPU machine, not worth a warning.
        let explicit = options.get("ep").is_some();
        let names = options
            .list("ep")
            .unwrap_or_else(|| vec!["cuda".into(), "cpu".into()]);
        let mut requested = Vec::new();
        for n in &names {
            let ep = Ep::parse(n).ok_or_else(|| {
                Error::new(
                    ErrorCode::InvalidOptionValue,
                    format!("option 'ep': unknown execution provider '{n}' (known: cuda, cpu)"),
                )
            })?;
            if !requested.contains(&ep) {
                requested.push(ep);
            }
        }
        if requested.is_empty() {
            return Err(Error::new(
                ErrorCode::InvalidOptionValue,
                "option 'ep': the list is empty",
            ));
        }
        let strict = options.bool("ep.strict")?.unwrap_or(false);
        let mut cuda_options = Vec::new();
        for key in CUDA_KEYS {
            if let Some(v) = options.get(&format!("cuda.{key}")) {
                cuda_options.push((key.to_string(), v.to_owned()));
            }
        }
        let mut set = EpSet {
            requested: requested.clone(),
            active: Vec::new(),
            cuda_options,
        };
        let mut skipped = Vec::new();
        for ep in requested {
            match set.probe(ep, env) {
                Ok(()) => set.active.push(ep),
                Err(why) if strict => {
                    return Err(Error::new(
                        ErrorCode::EpUnavailable,
                        format!(
                            "execution provider '{}' is unavailable (ep.strict=true): {why}",
                            ep.name()
                        ),
                    ))
                }
                Err(why) if !explicit && !Self::is_built(ep) => {
                    skipped.push(format!("default '{}' skipped: {why}", ep.name()))
                }
                Err(why) => logger.warn(&format!(
                    "execution provider '{}' is unavailable, falling back: {why}",
                    ep.name()
                )),
            }
        }
        if !set.active.contains(&Ep::Cpu) {
            set.active.push(Ep::Cpu);
        }
        let why = if skipped.is_empty() {
            String::new()
        } else {
            format!(" ({})", skipped.join("; "))
        };
        logger.info(&format!(
            "running on execution providers: {}{why}",
            set.active_names()
        ));
        Ok(set)
    }

    /// Whether `ep` can be registered here: compiled into the loaded ONNX
    /// Runtime, and its libraries (CUDA, cuDNN) load.
    fn probe(&self, ep: Ep, env: &Environment) -> std::result::Result<(), String> {
        match ep {
            Ep::Cpu => Ok(()),
            Ep::Cuda => {
                if !ep::CUDA::is_available().map_err(|e| e.to_string())? {
                    return Err("this ONNX Runtime build has no CUDA provider (use scripts/fetch-onnxruntime.sh --cuda)".into());
                }
                let mut builder = SessionBuilder::new(env).map_err(|e| e.to_string())?;
                self.cuda()
                    .register(&mut builder)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Whether the loaded ONNX Runtime was built with `ep` at all.
    fn is_built(ep: Ep) -> bool {
        match ep {
            Ep::Cpu => true,
            Ep::Cuda => ep::CUDA::is_available().unwrap_or(false),
        }
    }

    fn cuda(&self) -> ep::CUDA {
        let mut cuda = ep::CUDA::default();
        for (k, v) in &self.cuda_options {
            cuda = cuda.with_arbitrary_config(k, v);
        }
        cuda
    }

    /// Registers the active providers, in order, on a session builder.
    pub fn register(&self, builder: &mut SessionBuilder) -> Result<()> {
        for ep in &self.active {
            if *ep == Ep::Cuda {
                self.cuda().register(builder)?;
            }
        }
        Ok(())
    }

    /// The CUDA device id when CUDA is the first active provider (where
    /// sessions place their nodes and bound inputs belong).
    pub fn cuda_device(&self) -> Option<i32> {
        (self.active.first() == Some(&Ep::Cuda)).then(|| {
            self.cuda_options
                .iter()
                .find(|(k, _)| k == "device_id")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0)
        })
    }

    pub fn active_names(&self) -> String {
        self.active
            .iter()
            .map(|e| e.name())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Providers compiled into the loaded ONNX Runtime that this build drives.
    pub fn available_names() -> String {
        let mut v = vec![];
        if ep::CUDA::is_available().unwrap_or(false) {
            v.push("cuda");
        }
        v.push("cpu");
        v.join(",")
    }
}
