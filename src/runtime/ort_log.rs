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

/// Maps ONNX Runtime's severity to ours. Two warnings are demoted to debug,
/// as nothing a host can act on:
/// - an initializer that is also a graph input: how LoRA slots and training
///   graphs give inputs a default (said once per such input, hundreds per
///   session); for any other graph it is a missed constant folding;
/// - an initializer "not used by any node", removed: ONNX Runtime's own
///   fusions leave such constants behind (a scale folded into a MatMul, a
///   divisor into a Mul), about a hundred per training graph.
pub fn our_level(level: ort::logging::LogLevel, message: &str) -> LogLevel {
    use ort::logging::LogLevel as Ort;
    match level {
        Ort::Warning if is_housekeeping(message) => LogLevel::Debug,
        Ort::Verbose | Ort::Info => LogLevel::Debug,
        Ort::Warning => LogLevel::Warn,
        Ort::Error | Ort::Fatal => LogLevel::Error,
    }
}

fn is_housekeeping(message: &str) -> bool {
    (message.starts_with("Initializer ") && message.contains(" appears in graph inputs"))
        || (message.starts_with("Removing initializer ")
            && message.contains(" is not used by any node"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ort::logging::LogLevel as Ort;

    #[test]
    fn only_the_housekeeping_warnings_are_demoted() {
        let removed = "Removing initializer 'v3720'. It is not used by any node and should be \
                       removed from the model.";
        let slot = "Initializer lora.x.down appears in graph inputs and will not be treated as \
                    constant value/weight.";
        assert_eq!(our_level(Ort::Warning, removed), LogLevel::Debug);
        assert_eq!(our_level(Ort::Warning, slot), LogLevel::Debug);
        let other = "Removing initializer 'x'. It is still used.";
        assert_eq!(our_level(Ort::Warning, other), LogLevel::Warn);
        assert_eq!(our_level(Ort::Error, removed), LogLevel::Error);
    }
}
