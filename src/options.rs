//! String-keyed options: the one way settings reach the library from C and from
//! the CLI. Keys are checked when set (against every key the library knows) and
//! again when a call consumes them (against the keys that call accepts), so a
//! typo is always an error that names the key.

use std::collections::BTreeMap;

use crate::error::{Error, ErrorCode, Result};
use crate::limits;

/// Every key the library understands, with the call that consumes it. A key may
/// match a prefix entry ending in `.` (e.g. `cuda.`) for pass-through groups.
pub const KNOWN_KEYS: &[(&str, &str)] = &[
    ("ep", "runtime"),
    ("ep.strict", "runtime"),
    ("ort.library_path", "runtime"),
    ("log.level", "runtime"),
    ("threads.intra", "runtime"),
    (limits::MAX_SIDE, "runtime"),
    (limits::MAX_PIXELS, "runtime"),
    (limits::MAX_BATCH, "runtime"),
    (limits::MAX_STEPS, "runtime"),
    (limits::MAX_PROMPT_WINDOWS, "runtime"),
    (limits::MAX_PROMPT_BYTES, "runtime"),
    (limits::MAX_FILE_BYTES, "runtime"),
    (limits::MAX_THREADS, "runtime"),
    ("cuda.device_id", "runtime"),
    ("cuda.arena_extend_strategy", "runtime"),
    ("cuda.cudnn_conv_algo_search", "runtime"),
    ("cuda.gpu_mem_limit", "runtime"),
    ("cuda.enable_cuda_graph", "runtime"),
    ("lora.allow_partial", "pipeline"),
    ("vae.upcast", "pipeline"),
    ("prompt", "job"),
    ("negative_prompt", "job"),
    ("width", "job"),
    ("height", "job"),
    ("steps", "job"),
    ("guidance", "job"),
    ("guidance_rescale", "job"),
    ("scheduler", "job"),
    ("eta", "job"),
    ("seed", "job"),
    ("generator", "job"),
    ("init_image", "job"),
    ("strength", "job"),
    ("num_images", "job"),
    ("clip_skip", "job"),
    ("original_size", "job"),
    ("crops_coords_top_left", "job"),
    ("target_size", "job"),
    ("step_math", "job"),
    ("long_prompt", "job"),
    // The trainer's settings (`train.dir`, `train.lr`, ...): the trainer
    // names an unknown one (`train::config`).
    ("train.", "trainer"),
];

/// An ordered key/value bag. Values are kept as strings and parsed by the
/// consumer, which names the key in any parse error.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    values: BTreeMap<String, String>,
}

impl Options {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds options from `(key, value)` pairs, checking each key.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        let mut o = Options::new();
        for (k, v) in pairs {
            o.set(k, v)?;
        }
        Ok(o)
    }

    /// Sets `key` to `value`. Unknown keys are refused here already.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        if !is_known(key) {
            return Err(Error::new(
                ErrorCode::UnknownOption,
                format!("unknown option key '{key}'"),
            ));
        }
        self.values.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    /// Applies a JSON object as an overlay. Nested objects flatten with dots
    /// (`{"cuda": {"device_id": 1}}` sets `cuda.device_id`); scalars become strings;
    /// arrays of scalars join with commas (`{"ep": ["cuda", "cpu"]}`).
    /// Nothing is applied when any key or value is bad.
    pub fn apply_json(&mut self, json: &str) -> Result<()> {
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| {
            Error::new(
                ErrorCode::InvalidOptionValue,
                format!("options JSON does not parse: {e}"),
            )
        })?;
        let obj = v.as_object().ok_or_else(|| {
            Error::new(
                ErrorCode::InvalidOptionValue,
                "options JSON must be an object",
            )
        })?;
        let mut flat = Vec::new();
        flatten("", obj, &mut flat)?;
        let mut next = self.clone();
        for (k, v) in &flat {
            next.set(k, v)?;
        }
        *self = next;
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Fails naming the first key that `consumer` does not accept.
    pub fn check_consumer(&self, consumer: &str, call: &str) -> Result<()> {
        for k in self.values.keys() {
            let ok = KNOWN_KEYS
                .iter()
                .any(|(key, c)| *c == consumer && key_matches(key, k));
            if !ok {
                return Err(Error::new(
                    ErrorCode::UnknownOption,
                    format!("option '{k}' is not accepted by {call}"),
                ));
            }
        }
        Ok(())
    }

    /// Parses `key` with `parse`, naming the key and value on failure.
    pub fn parse<T>(
        &self,
        key: &str,
        what: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse(v).map(Some).ok_or_else(|| {
                Error::new(
                    ErrorCode::InvalidOptionValue,
                    format!("option '{key}': '{v}' is not {what}"),
                )
            }),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.parse(key, "a boolean (true/false/1/0)", parse_bool)
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        self.parse(key, "a non-negative integer", |v| v.trim().parse().ok())
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.parse(key, "a finite number", |v| {
            v.trim().parse::<f64>().ok().filter(|x| x.is_finite())
        })
    }

    /// A comma-separated list, trimmed, without empty items.
    pub fn list(&self, key: &str) -> Option<Vec<String>> {
        self.get(key).map(|v| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
    }
}

pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn key_matches(pattern: &str, key: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('.') {
        key.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1)
    } else {
        pattern == key
    }
}

fn is_known(key: &str) -> bool {
    KNOWN_KEYS.iter().any(|(k, _)| key_matches(k, key))
}

fn flatten(
    prefix: &str,
    obj: &serde_json::Map<String, serde_json::Value>,
    out: &mut Vec<(String, String)>,
) -> Result<()> {
    use serde_json::Value;
    for (k, v) in obj {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let scalar = |v: &Value| -> Option<String> {
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            }
        };
        match v {
            Value::Object(o) => flatten(&key, o, out)?,
            Value::Array(items) => {
                let parts: Option<Vec<String>> = items.iter().map(scalar).collect();
                let parts = parts.ok_or_else(|| {
                    Error::new(
                        ErrorCode::InvalidOptionValue,
                        format!(
                            "option '{key}': arrays may hold only strings, numbers and booleans"
                        ),
                    )
                })?;
                out.push((key, parts.join(",")));
            }
            Value::Null => {
                return Err(Error::new(
                    ErrorCode::InvalidOptionValue,
                    format!("option '{key}': null is not a value"),
                ))
            }
            other => out.push((key, scalar(other).unwrap_or_default())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let e = Options::new().set("stepz", "4").unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownOption);
        assert!(e.message.contains("'stepz'"), "{}", e.message);
    }

    #[test]
    fn json_overlay_flattens_and_is_atomic() {
        let mut o = Options::new();
        o.apply_json(r#"{"ep": ["cuda", "cpu"], "cuda": {"device_id": 1}, "ep.strict": true}"#)
            .unwrap();
        assert_eq!(o.get("ep"), Some("cuda,cpu"));
        assert_eq!(o.get("cuda.device_id"), Some("1"));
        assert_eq!(o.bool("ep.strict").unwrap(), Some(true));
        let before = o.clone();
        let e = o.apply_json(r#"{"ep": "cpu", "nope": 1}"#).unwrap_err();
        assert!(e.message.contains("'nope'"));
        assert_eq!(o, before, "a failed overlay must change nothing");
    }

    #[test]
    fn bad_value_names_key_and_value() {
        let o = Options::from_pairs([("cuda.device_id", "x")]).unwrap();
        let e = o.u64("cuda.device_id").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidOptionValue);
        assert!(e.message.contains("cuda.device_id") && e.message.contains("'x'"));
    }
}
