//! The runtime: one loaded ONNX Runtime, the execution providers that really
//! work here, and a log sink. Cheap to clone and safe to share between threads.

pub mod ep;
pub mod library;
pub mod log;
pub mod ort_log;
pub mod session;

use std::sync::Arc;

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

pub use self::ep::{Ep, EpSet};
pub use self::library::LoadedLibrary;
pub use self::log::{LogFn, LogLevel, LogSink, Logger};
use crate::error::{Error, ErrorCode, Result};
use crate::limits::Limits;
use crate::options::Options;

/// The C ABI version this build implements. Bumped on incompatible changes only;
/// additions within a major version keep it.
pub const ABI_VERSION: u32 = 1;

#[derive(Clone, Debug)]
pub struct Runtime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    library: LoadedLibrary,
    eps: EpSet,
    intra_threads: Option<usize>,
    limits: Limits,
    logger: Logger,
    /// Sessions built so far (tests check that unchanged LoRA sets rebuild nothing).
    sessions_built: std::sync::atomic::AtomicUsize,
}

impl Runtime {
    /// Loads ONNX Runtime and resolves execution providers from `options`
    /// (keys: `ep`, `ep.strict`, `ort.library_path`, `log.level`,
    /// `threads.intra`, `cuda.*`, `limits.*`). `logger` receives the fallback
    /// warnings.
    pub fn new(options: &Options, logger: Logger) -> Result<Runtime> {
        options.check_consumer("runtime", "spo_runtime_create")?;
        let limits = Limits::from_options(options)?;
        let intra_threads = options.u64("threads.intra")?;
        if let Some(n) = intra_threads {
            limits.check_threads(n)?;
        }
        let intra_threads = intra_threads.map(|n| n as usize);
        // "log.level" overrides the threshold of the sink the logger came with.
        if let Some(level) = options.parse(
            "log.level",
            "one of error, warn, info, debug",
            LogLevel::parse,
        )? {
            logger.set_level(level);
        }
        let library = library::load(options.get("ort.library_path"))?;
        logger.info(&format!(
            "ONNX Runtime {} loaded from {}",
            library.version,
            library.path.display()
        ));
        let eps = EpSet::resolve(options, &library.env, &logger)?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                library,
                eps,
                intra_threads,
                limits,
                logger,
                sessions_built: Default::default(),
            }),
        })
    }

    /// Checks a caller's ABI version against this build.
    pub fn check_abi(caller: u32) -> Result<()> {
        if caller == ABI_VERSION {
            Ok(())
        } else {
            Err(Error::new(
                ErrorCode::AbiMismatch,
                format!(
                    "caller was built for spo-runtime ABI version {caller}, this library ({}) implements ABI version {ABI_VERSION}; rebuild against the matching spo_runtime.h",
                    env!("CARGO_PKG_VERSION")
                ),
            ))
        }
    }

    pub fn logger(&self) -> &Logger {
        &self.inner.logger
    }

    /// The bounds requests made through this runtime must keep (`limits.*`).
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn eps(&self) -> &EpSet {
        &self.inner.eps
    }

    pub(crate) fn note_session_built(&self) {
        self.inner
            .sessions_built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Number of ONNX Runtime sessions this runtime has built.
    pub fn sessions_built(&self) -> usize {
        self.inner
            .sessions_built
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A session builder with the active providers and thread settings applied.
    pub fn session_builder(&self) -> Result<SessionBuilder> {
        let mut b = SessionBuilder::new(&self.inner.library.env)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(ort::Error::from)?
            .with_logger(ort_log::forwarder(self.inner.logger.clone()))
            .map_err(ort::Error::from)?
            .with_log_level(ort_log::SESSION_LEVEL)
            .map_err(ort::Error::from)?;
        if let Some(n) = self.inner.intra_threads {
            b = b.with_intra_threads(n).map_err(ort::Error::from)?;
        }
        self.inner.eps.register(&mut b)?;
        Ok(b)
    }

    /// Answers `spo_runtime_info` keys; `None` for an unknown key.
    pub fn info(&self, key: &str) -> Option<String> {
        Some(match key {
            "version" => env!("CARGO_PKG_VERSION").to_owned(),
            "abi_version" => ABI_VERSION.to_string(),
            "ort.version" => self.inner.library.version.clone(),
            "ort.library_path" => self.inner.library.path.display().to_string(),
            "ep.available" => EpSet::available_names(),
            "ep.requested" => self
                .inner
                .eps
                .requested
                .iter()
                .map(|e| e.name())
                .collect::<Vec<_>>()
                .join(","),
            "ep.active" => self.inner.eps.active_names(),
            "sessions.built" => self.sessions_built().to_string(),
            _ => return None,
        })
    }

    /// The keys `info` answers, for error messages.
    pub const INFO_KEYS: &'static [&'static str] = &[
        "version",
        "abi_version",
        "ort.version",
        "ort.library_path",
        "ep.available",
        "ep.requested",
        "ep.active",
        "sessions.built",
    ];
}
