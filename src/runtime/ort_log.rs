//! ONNX Runtime's own messages about a session (graph warnings, provider
//! notes) delivered to the runtime's log sink instead of stderr.
//!
//! Each session gets its own logging function (`SessionBuilder::with_logger`),
//! holding the sink of the runtime that built it, so two runtimes in one
//! process keep their logs apart. ONNX Runtime's process-wide logger is left
//! as `ort` sets it up (errors only, to stderr): replacing it proved to race
//! with ONNX Runtime's teardown at process exit.

use std::sync::Arc;

use super::log::{LogLevel, Logger};

/// The least severe message a session produces at all. Verbose and info
/// messages are many and say nothing a host needs; not producing them also
/// spares their formatting.
pub const SESSION_LEVEL: ort::logging::LogLevel = ort::logging::LogLevel::Warning;

/// The logging function of a session built for the runtime owning `logger`.
pub fn forwarder(logger: Logger) -> ort::logging::LoggerFunction {
    Arc::new(move |level, _category, _id, location, message| {
        // Called from C++: a panic must not unwind into it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            logger.log(
                our_level(level, message),
                &format!("ONNX Runtime ({location}): {message}"),
            )
        }));
    })
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
