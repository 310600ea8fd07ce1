//! ONNX Runtime's own messages (graph warnings, provider notes) delivered to
//! the runtime sinks instead of stderr.
//!
//! ONNX Runtime has one logger per process, fixed when its environment is
//! created, while our sinks are per runtime. Each runtime registers its logger
//! here under a log id that its sessions carry (`SessionBuilder::with_log_id`),
//! and the process-wide callback hands a message to the runtime it names.
//! Messages of no session (environment set-up) go to every live runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::log::{LogLevel, Logger, WeakLogger};

/// Registered runtime loggers by log id; dead ones are pruned on registration.
static SINKS: Mutex<Vec<(String, WeakLogger)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The least severe ONNX Runtime message produced at all. Verbose and info
/// messages are many and say nothing a host needs; leaving them unproduced
/// also spares their formatting.
pub const ORT_LEVEL: ort::logging::LogLevel = ort::logging::LogLevel::Warning;

/// Registers `logger` and returns the log id its sessions must carry.
pub fn register(logger: &Logger) -> String {
    let id = format!("spo-runtime-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let mut sinks = SINKS.lock();
    sinks.retain(|(_, w)| w.upgrade().is_some());
    sinks.push((id.clone(), logger.downgrade()));
    id
}

/// The callback given to ONNX Runtime when its environment is built.
pub fn forwarder() -> ort::logging::LoggerFunction {
    Arc::new(|level, _category, id, location, message| {
        // Called from C++: a panic must not unwind into it.
        let _ = std::panic::catch_unwind(|| deliver(level, id, location, message));
    })
}

fn deliver(level: ort::logging::LogLevel, id: &str, location: &str, message: &str) {
    let level = our_level(level, message);
    let text = format!("ONNX Runtime ({location}): {message}");
    let targets: Vec<Logger> = SINKS
        .lock()
        .iter()
        .filter(|(sid, _)| id.is_empty() || sid == id)
        .filter_map(|(_, w)| w.upgrade())
        .collect();
    for logger in targets {
        logger.log(level, &text);
    }
}

/// Maps ONNX Runtime's severity to ours. One warning is demoted to debug: an
/// initializer that is also a graph input. That is how LoRA slots and training
/// graphs give inputs a default (ONNX Runtime says it once per such input,
/// hundreds per session), and for any other graph it is a missed constant
/// folding, not something a host can act on.
pub fn our_level(level: ort::logging::LogLevel, message: &str) -> LogLevel {
    use ort::logging::LogLevel as Ort;
    match level {
        Ort::Warning
            if message.starts_with("Initializer ")
                && message.contains(" appears in graph inputs") =>
        {
            LogLevel::Debug
        }
        Ort::Verbose | Ort::Info => LogLevel::Debug,
        Ort::Warning => LogLevel::Warn,
        Ort::Error | Ort::Fatal => LogLevel::Error,
    }
}
