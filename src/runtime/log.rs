//! Per-runtime logging. Each runtime owns its sink; nothing is global, so two
//! hosts in one process (an engine and a plugin) keep their logs apart.

use std::sync::Arc;

use parking_lot::RwLock;

/// Severity, most severe first. The numeric values are part of the C ABI.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl LogLevel {
    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            _ => return None,
        })
    }
    pub fn from_i32(v: i32) -> Option<LogLevel> {
        [
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
        ]
        .into_iter()
        .find(|l| *l as i32 == v)
    }
}

pub type LogFn = dyn Fn(LogLevel, &str) + Send + Sync;

/// A sink and the least severe level it receives.
pub type LogSink = (LogLevel, Arc<LogFn>);

/// A replaceable sink with a threshold. Messages above the threshold are dropped
/// before formatting reaches the callback.
#[derive(Clone, Default)]
pub struct Logger {
    sink: Arc<RwLock<Option<LogSink>>>,
}

impl Logger {
    pub fn set(&self, level: LogLevel, f: Option<Arc<LogFn>>) {
        *self.sink.write() = f.map(|f| (level, f));
    }

    /// Changes the threshold of the current sink, if any.
    pub fn set_level(&self, level: LogLevel) {
        if let Some((l, _)) = self.sink.write().as_mut() {
            *l = level;
        }
    }

    pub fn log(&self, level: LogLevel, message: &str) {
        let sink = self.sink.read().clone();
        if let Some((max, f)) = sink {
            if level <= max {
                f(level, message);
            }
        }
    }

    pub fn warn(&self, message: &str) {
        self.log(LogLevel::Warn, message)
    }
    pub fn info(&self, message: &str) {
        self.log(LogLevel::Info, message)
    }
    pub fn debug(&self, message: &str) {
        self.log(LogLevel::Debug, message)
    }
}

impl std::fmt::Debug for Logger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Logger")
    }
}
