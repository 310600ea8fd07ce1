//! LoRA file parsing: kohya / A1111 "webui" (incl. LyCORIS LoCon, LoHa, LoKr,
//! DoRA) and diffusers / PEFT safetensors files, grouped into one
//! [`LoraModule`] per target key stem. Key grammar and alpha conventions:
//! docs/architecture.md, "LoRA".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::memory;

/// A dense f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// Rows = first dim, columns = the product of the rest.
    pub fn rows_cols(&self) -> (usize, usize) {
        let r = self.shape.first().copied().unwrap_or(1);
        let c = self.shape.iter().skip(1).product::<usize>();
        (r, c)
    }
}

/// The decomposition a module's weight delta is stored in.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraKind {
    /// LoRA / LoCon: `up [out, r(,1,1)]`, `down [r, in(, kh, kw)]`, optional
    /// Tucker core `mid [r, r, kh, kw]` (then `down` is `[r, in, 1, 1]`).
    Lora {
        down: Tensor,
        up: Tensor,
        mid: Option<Tensor>,
    },
    /// LoHa: `(w1a @ w1b) * (w2a @ w2b)`; `t1`/`t2` are Tucker cores.
    LoHa {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
        t1: Option<Tensor>,
        t2: Option<Tensor>,
    },
    /// LoKr: `kron(w1, w2)`, each factor full or as an `a @ b` product.
    LoKr {
        w1: Option<Tensor>,
        w1a: Option<Tensor>,
        w1b: Option<Tensor>,
        w2: Option<Tensor>,
        w2a: Option<Tensor>,
        w2b: Option<Tensor>,
        t2: Option<Tensor>,
    },
}

impl LoraKind {
    pub fn name(&self) -> &'static str {
        match self {
            LoraKind::Lora { mid: None, .. } => "lora",
            LoraKind::Lora { mid: Some(_), .. } => "locon-tucker",
            LoraKind::LoHa { .. } => "loha",
            LoraKind::LoKr { .. } => "lokr",
        }
    }
}

/// One target module of a LoRA file.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub kind: LoraKind,
    /// Alpha as stored (per-key tensor, metadata or adapter_config.json).
    pub alpha: Option<f32>,
    /// The rank alpha is divided by; `None` where the format applies no alpha
    /// (LoKr with both factors full).
    pub rank: Option<usize>,
    /// DoRA magnitude (`dora_scale` / PEFT `lora_magnitude_vector`).
    pub dora_scale: Option<Tensor>,
}

impl LoraModule {
    /// `alpha / rank`; 1 when alpha is absent or zero, or the kind has no rank.
    pub fn scale(&self) -> f32 {
        match (self.alpha, self.rank) {
            (Some(a), Some(r)) if a != 0.0 && r > 0 => a / r as f32,
            _ => 1.0,
        }
    }
}

/// Key naming family of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// `lora_unet_...`, `lora_te1_...` with `.lora_down.weight` etc.
    Kohya,
    /// `...lora_A.weight` / `lora_B.weight` (PEFT, current diffusers).
    Peft,
    /// `...lora.down.weight`, `lora_linear_layer` or attn-processor keys (older diffusers).
    Diffusers,
    /// More than one of the above.
    Mixed,
}

/// How UNet modules are named inside the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetDialect {
    /// diffusers module paths (dotted or kohya-flattened).
    Diffusers,
    /// SGM / original-SD names (`input_blocks_4_1_...`).
    Sgm,
    /// No UNet keys, or both.
    Unknown,
}

/// A parsed LoRA file.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    pub dialect: UnetDialect,
    /// Key stem (the key without its part suffix) -> module.
    pub modules: BTreeMap<String, LoraModule>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Down,
    Up,
    Mid,
    Alpha,
    Dora,
    HadaW1a,
    HadaW1b,
    HadaW2a,
    HadaW2b,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1a,
    LokrW1b,
    LokrW2,
    LokrW2a,
    LokrW2b,
    LokrT2,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Kohya,
    Peft,
    Diffusers,
}

const SUFFIXES: &[(&str, Part, Option<Family>)] = &[
    (".lora_down.weight", Part::Down, None),
    (".lora_up.weight", Part::Up, None),
    (".lora_mid.weight", Part::Mid, None),
    (".lora_A.weight", Part::Down, Some(Family::Peft)),
    (".lora_B.weight", Part::Up, Some(Family::Peft)),
    (".lora_A.default.weight", Part::Down, Some(Family::Peft)),
    (".lora_B.default.weight", Part::Up, Some(Family::Peft)),
    (".lora.down.weight", Part::Down, Some(Family::Diffusers)),
    (".lora.up.weight", Part::Up, Some(Family::Diffusers)),
    (
        ".lora_linear_layer.down.weight",
        Part::Down,
        Some(Family::Diffusers),
    ),
    (
        ".lora_linear_layer.up.weight",
        Part::Up,
        Some(Family::Diffusers),
    ),
    ("_lora.down.weight", Part::Down, Some(Family::Diffusers)),
    ("_lora.up.weight", Part::Up, Some(Family::Diffusers)),
    (".alpha", Part::Alpha, None),
    (".dora_scale", Part::Dora, None),
    (".lora_magnitude_vector", Part::Dora, Some(Family::Peft)),
    (
        ".lora_magnitude_vector.weight",
        Part::Dora,
        Some(Family::Peft),
    ),
    (
        ".lora_magnitude_vector.default.weight",
        Part::Dora,
        Some(Family::Peft),
    ),
    (".hada_w1_a", Part::HadaW1a, None),
    (".hada_w1_b", Part::HadaW1b, None),
    (".hada_w2_a", Part::HadaW2a, None),
    (".hada_w2_b", Part::HadaW2b, None),
    (".hada_t1", Part::HadaT1, None),
    (".hada_t2", Part::HadaT2, None),
    (".lokr_w1", Part::LokrW1, None),
    (".lokr_w1_a", Part::LokrW1a, None),
    (".lokr_w1_b", Part::LokrW1b, None),
    (".lokr_w2", Part::LokrW2, None),
    (".lokr_w2_a", Part::LokrW2a, None),
    (".lokr_w2_b", Part::LokrW2b, None),
    (".lokr_t2", Part::LokrT2, None),
];

/// Splits a tensor key into (normalised stem, part).
fn split_key(key: &str) -> Option<(String, Part, Option<Family>)> {
    let (suffix, part, fam) = SUFFIXES
        .iter()
        .filter(|(s, _, _)| key.len() > s.len() && key.ends_with(s))
        .max_by_key(|(s, _, _)| s.len())?;
    let mut stem = key[..key.len() - suffix.len()].to_string();
    // Legacy attn-processor keys: `<attn>.processor.to_q_lora.*` -> `<attn>.to_q`.
    if let Some((attn, leaf)) = stem.split_once(".processor.") {
        let leaf = leaf.strip_suffix("_lora").unwrap_or(leaf);
        let leaf = if leaf == "to_out" { "to_out.0" } else { leaf };
        stem = format!("{attn}.{leaf}");
    }
    Some((stem, *part, *fam))
}

/// Alpha defaults from PEFT configuration (adapter_config.json or
/// `lora_adapter_metadata`).
#[derive(Debug, Default, Clone)]
struct PeftAlpha {
    lora_alpha: Option<f32>,
    r: Option<usize>,
    rslora: bool,
    alpha_pattern: Vec<(String, f32)>,
    /// diffusers' `lora_adapter_metadata` prefixes each component's config
    /// (`unet.lora_alpha`, `text_encoder.r`, ...): one entry per prefix.
    scoped: Vec<(String, PeftAlpha)>,
}

impl PeftAlpha {
    fn from_json(v: &serde_json::Value) -> PeftAlpha {
        let mut p = PeftAlpha {
            lora_alpha: v
                .get("lora_alpha")
                .and_then(|a| a.as_f64())
                .map(|a| a as f32),
            r: v.get("r").and_then(|a| a.as_u64()).map(|a| a as usize),
            rslora: v
                .get("use_rslora")
                .and_then(|a| a.as_bool())
                .unwrap_or(false),
            alpha_pattern: Vec::new(),
            scoped: Vec::new(),
        };
        if let Some(obj) = v.as_object() {
            let mut groups: BTreeMap<&str, serde_json::Map<String, serde_json::Value>> =
                BTreeMap::new();
            for (k, val) in obj {
                if let Some((prefix, rest)) = k.split_once('.') {
                    groups
                        .entry(prefix)
                        .or_default()
                        .insert(rest.to_owned(), val.clone());
                }
            }
            for (prefix, sub) in groups {
                let sub = PeftAlpha::from_json(&serde_json::Value::Object(sub));
                if sub.lora_alpha.is_some() {
                    p.scoped.push((prefix.to_owned(), sub));
                }
            }
        }
        if let Some(m) = v.get("alpha_pattern").and_then(|a| a.as_object()) {
            for (k, a) in m {
                if let Some(a) = a.as_f64() {
                    p.alpha_pattern.push((k.clone(), a as f32));
                }
            }
        }
        p
    }
    /// Alpha for `stem` with tensor rank `rank`, such that alpha / rank is PEFT's scale.
    fn alpha_for(&self, stem: &str, rank: usize) -> Option<f32> {
        for (prefix, sub) in &self.scoped {
            if let Some(rest) = stem
                .strip_prefix(prefix.as_str())
                .and_then(|r| r.strip_prefix('.'))
            {
                return sub.alpha_for(rest, rank);
            }
        }
        let a = self
            .alpha_pattern
            .iter()
            .find(|(pat, _)| stem.ends_with(pat.as_str()))
            .map(|(_, a)| *a)
            .or(self.lora_alpha)?;
        Some(if self.rslora {
            // scale = alpha / sqrt(r)
            a * (rank as f32).sqrt()
        } else {
            a
        })
    }
}

impl LoraFile {
    /// Reads a `.safetensors` LoRA within the default limits (see [`Self::open_limited`]).
    pub fn open(path: impl AsRef<Path>) -> Result<LoraFile> {
        Self::open_limited(path.as_ref(), &crate::limits::Limits::default())
    }

    /// Reads a `.safetensors` LoRA: a regular file within `limits.max_file_bytes`.
    /// A sibling `adapter_config.json` supplies PEFT's `lora_alpha` / `r` when
    /// the file has no alpha of its own.
    pub fn open_limited(path: &Path, limits: &crate::limits::Limits) -> Result<LoraFile> {
        let bytes = limits.read_file(path)?;
        let cfg_path = path.with_file_name("adapter_config.json");
        let config = if cfg_path.is_file() {
            let text = limits.read_text(&cfg_path)?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                Error::invalid_lora(format!("{}: not valid JSON: {e}", cfg_path.display()))
            })?;
            Some(v)
        } else {
            None
        };
        Self::from_bytes(&bytes, path, config.as_ref())
    }

    /// Parses an in-memory safetensors LoRA; `path` names it in messages.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        adapter_config: Option<&serde_json::Value>,
    ) -> Result<LoraFile> {
        let file = path.display().to_string();
        if bytes.is_empty() {
            return Err(Error::invalid_lora(format!("{file}: empty file (0 bytes)")));
        }
        if bytes.len() < 8 {
            return Err(Error::invalid_lora(format!(
                "{file}: {} bytes is too short for a safetensors header",
                bytes.len()
            )));
        }
        let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        if header_len > bytes.len() as u64 - 8 {
            return Err(Error::invalid_lora(format!(
                "{file}: safetensors header length {header_len} is beyond the end of the file \
                 ({} bytes): truncated or not a safetensors file",
                bytes.len()
            )));
        }
        let (_, st_meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::invalid_lora(format!("{file}: invalid safetensors header: {e}")))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::invalid_lora(format!("{file}: invalid safetensors file: {e}")))?;
        let metadata: BTreeMap<String, String> = st_meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        if st.is_empty() {
            return Err(Error::invalid_lora(format!(
                "{file}: the file holds no tensors"
            )));
        }

        let mut peft = adapter_config.map(PeftAlpha::from_json).unwrap_or_default();
        if let Some(md) = metadata.get("lora_adapter_metadata") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(md) {
                let m = PeftAlpha::from_json(&v);
                if m.lora_alpha.is_some() || !m.scoped.is_empty() {
                    peft = m;
                }
            }
        }
        let kohya_alpha: Option<f32> = metadata
            .get("ss_network_alpha")
            .and_then(|s| s.parse::<f32>().ok())
            .filter(|a| a.is_finite());

        // Group the tensors by stem.
        let mut groups: BTreeMap<String, BTreeMap<Part, (String, Tensor)>> = BTreeMap::new();
        let mut families = [false; 3];
        let mut names: Vec<(String, safetensors::tensor::TensorView<'_>)> =
            st.tensors().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, view) in names {
            let shape = view.shape().to_vec();
            let Some((stem, part, fam)) = split_key(&key) else {
                return Err(Error::invalid_lora(format!(
                    "{file}: tensor '{key}' {shape:?} has an unknown suffix (expected \
                     .lora_down.weight / .lora_up.weight / .alpha, lora_A / lora_B, hada_*, lokr_*, \
                     dora_scale, ...)"
                )));
            };
            let fam = fam.unwrap_or(if stem.starts_with("lora_") {
                Family::Kohya
            } else {
                Family::Diffusers
            });
            families[fam as usize] = true;
            let t = to_f32(&view, part == Part::Alpha)
                .map_err(|e| e.context(format!("{file}: tensor '{key}' {shape:?}")))?;
            let g = groups.entry(stem).or_default();
            if g.insert(part, (key.clone(), t)).is_some() {
                return Err(Error::invalid_lora(format!(
                    "{file}: tensor '{key}' {shape:?} duplicates another key of the same module"
                )));
            }
        }
        let format = match families {
            [true, false, false] => LoraFormat::Kohya,
            [false, true, false] => LoraFormat::Peft,
            [false, false, true] => LoraFormat::Diffusers,
            _ => LoraFormat::Mixed,
        };

        let mut modules = BTreeMap::new();
        for (stem, mut parts) in groups {
            let module = build_module(&file, &stem, &mut parts, &peft, kohya_alpha)?;
            modules.insert(stem, module);
        }
        let sgm = modules.keys().any(|k| is_sgm_stem(k));
        let diff = modules.keys().any(|k| {
            k.contains("down_blocks") || k.contains("up_blocks") || k.contains("mid_block")
        });
        let dialect = match (diff, sgm) {
            (true, false) => UnetDialect::Diffusers,
            (false, true) => UnetDialect::Sgm,
            _ => UnetDialect::Unknown,
        };
        Ok(LoraFile {
            path: path.to_path_buf(),
            format,
            dialect,
            modules,
            metadata,
        })
    }
}

fn is_sgm_stem(k: &str) -> bool {
    ["input_blocks", "output_blocks", "middle_block"]
        .iter()
        .any(|s| k.contains(s))
}

/// A safetensors tensor as f32 (half and integer types widened: an f16 LoRA
/// doubles in size here, so the buffer is allocated fallibly).
fn to_f32(view: &safetensors::tensor::TensorView<'_>, allow_int: bool) -> Result<Tensor> {
    let shape = view.shape().to_vec();
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::invalid_lora("element count overflows"))?;
    let size = match view.dtype() {
        Dtype::F32 | Dtype::I32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        Dtype::F64 | Dtype::I64 => 8,
        _ => 0,
    };
    let b = view.data();
    if size > 0 && n.checked_mul(size) != Some(b.len()) {
        return Err(Error::invalid_lora(format!(
            "{} data bytes for {n} elements",
            b.len()
        )));
    }
    fn widen<const N: usize>(b: &[u8], n: usize, f: impl Fn([u8; N]) -> f32) -> Result<Vec<f32>> {
        let values = b.chunks_exact(N).map(|c| f(c.try_into().expect("N bytes")));
        memory::collect(n, values, "the LoRA tensor as f32")
    }
    let data = match view.dtype() {
        Dtype::F32 => widen(b, n, f32::from_le_bytes)?,
        Dtype::F16 => widen(b, n, |c| half::f16::from_le_bytes(c).to_f32())?,
        Dtype::BF16 => widen(b, n, |c| half::bf16::from_le_bytes(c).to_f32())?,
        Dtype::F64 => widen(b, n, |c| f64::from_le_bytes(c) as f32)?,
        Dtype::I64 if allow_int => widen(b, n, |c| i64::from_le_bytes(c) as f32)?,
        Dtype::I32 if allow_int => widen(b, n, |c| i32::from_le_bytes(c) as f32)?,
        other => {
            return Err(Error::invalid_lora(format!("unsupported dtype {other:?}")));
        }
    };
    Ok(Tensor { shape, data })
}

fn build_module(
    file: &str,
    stem: &str,
    parts: &mut BTreeMap<Part, (String, Tensor)>,
    peft: &PeftAlpha,
    kohya_alpha: Option<f32>,
) -> Result<LoraModule> {
    let err = |key: &str, t: &Tensor, why: &str| {
        Error::invalid_lora(format!("{file}: tensor '{key}' {:?}: {why}", t.shape))
    };
    let missing = |what: &str| {
        Error::invalid_lora(format!(
            "{file}: module '{stem}' has no {what} tensor (incomplete LoRA module)"
        ))
    };
    // NaN/inf in a factor would spread through every weight it touches and
    // surface steps later as a black image; name the tensor here instead.
    for (key, t) in parts.values() {
        let bad = t.data.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(err(
                key,
                t,
                &format!(
                    "{bad} of its {} values are NaN or infinite (a diverged training run \
                     or a damaged file); this LoRA cannot be applied",
                    t.numel()
                ),
            ));
        }
    }
    let alpha = match parts.remove(&Part::Alpha) {
        Some((key, t)) => {
            if t.numel() != 1 {
                return Err(err(&key, &t, "alpha must be a scalar"));
            }
            let a = t.data[0];
            if !a.is_finite() {
                return Err(err(&key, &t, &format!("alpha is {a}, not a finite number")));
            }
            Some(a)
        }
        None => None,
    };
    let dora_scale = parts.remove(&Part::Dora).map(|(_, t)| t);
    let take = |parts: &mut BTreeMap<Part, (String, Tensor)>, p: Part| parts.remove(&p);
    let check_nonzero = |key: &str, t: &Tensor| -> Result<()> {
        if t.shape.is_empty() || t.shape.contains(&0) {
            return Err(err(key, t, "empty tensor (rank 0 or a zero dim)"));
        }
        Ok(())
    };

    let (kind, rank) = if parts.contains_key(&Part::Down) || parts.contains_key(&Part::Up) {
        let (dk, down) = take(parts, Part::Down).ok_or_else(|| missing("down / lora_A"))?;
        let (uk, up) = take(parts, Part::Up).ok_or_else(|| missing("up / lora_B"))?;
        check_nonzero(&dk, &down)?;
        check_nonzero(&uk, &up)?;
        let r = down.shape[0];
        if !(2..=4).contains(&down.shape.len()) || !(2..=4).contains(&up.shape.len()) {
            return Err(err(
                &dk,
                &down,
                &format!("down/up must be 2-D or 4-D (up is {:?})", up.shape),
            ));
        }
        if up.shape[1] != r || up.shape[2..].iter().any(|&d| d != 1) {
            return Err(Error::invalid_lora(format!(
                "{file}: module '{stem}': down '{dk}' {:?} and up '{uk}' {:?} do not fit \
                 (up must be [out, {r}(, 1, 1)])",
                down.shape, up.shape
            )));
        }
        let mid = take(parts, Part::Mid);
        if let Some((mk, m)) = &mid {
            if m.shape.len() != 4 || m.shape[0] != r || m.shape[1] != r {
                return Err(err(mk, m, &format!("lora_mid must be [{r}, {r}, kh, kw]")));
            }
            if down.shape.len() != 4 || down.shape[2] != 1 || down.shape[3] != 1 {
                return Err(err(&dk, &down, "with lora_mid, down must be [r, in, 1, 1]"));
            }
        }
        (
            LoraKind::Lora {
                down,
                up,
                mid: mid.map(|m| m.1),
            },
            Some(r),
        )
    } else if parts.keys().any(|p| {
        matches!(
            p,
            Part::HadaW1a | Part::HadaW1b | Part::HadaW2a | Part::HadaW2b
        )
    }) {
        let mut get = |p: Part, n: &str| take(parts, p).ok_or_else(|| missing(n));
        let (k1a, w1a) = get(Part::HadaW1a, "hada_w1_a")?;
        let (k1b, w1b) = get(Part::HadaW1b, "hada_w1_b")?;
        let (k2a, w2a) = get(Part::HadaW2a, "hada_w2_a")?;
        let (k2b, w2b) = get(Part::HadaW2b, "hada_w2_b")?;
        for (k, t) in [(&k1a, &w1a), (&k1b, &w1b), (&k2a, &w2a), (&k2b, &w2b)] {
            check_nonzero(k, t)?;
        }
        let t1 = take(parts, Part::HadaT1).map(|t| t.1);
        let t2 = take(parts, Part::HadaT2).map(|t| t.1);
        if t1.is_none() && t2.is_none() {
            let (a1, b1) = (w1a.rows_cols(), w1b.rows_cols());
            let (a2, b2) = (w2a.rows_cols(), w2b.rows_cols());
            if a1.1 != b1.0 || a2.1 != b2.0 || a1.0 != a2.0 || b1.1 != b2.1 {
                return Err(Error::invalid_lora(format!(
                    "{file}: module '{stem}': LoHa factors {k1a} {:?}, {k1b} {:?}, {k2a} {:?}, {k2b} {:?} \
                     do not fit",
                    w1a.shape, w1b.shape, w2a.shape, w2b.shape
                )));
            }
        }
        let r = w1b.shape[0];
        (
            LoraKind::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            },
            Some(r),
        )
    } else if parts.keys().any(|p| {
        matches!(
            p,
            Part::LokrW1
                | Part::LokrW1a
                | Part::LokrW1b
                | Part::LokrW2
                | Part::LokrW2a
                | Part::LokrW2b
        )
    }) {
        let mut t = |p| take(parts, p);
        let (w1, w1a, w1b, w2, w2a, w2b, t2) = (
            t(Part::LokrW1),
            t(Part::LokrW1a),
            t(Part::LokrW1b),
            t(Part::LokrW2),
            t(Part::LokrW2a),
            t(Part::LokrW2b),
            t(Part::LokrT2),
        );
        for (k, x) in [&w1, &w1a, &w1b, &w2, &w2a, &w2b, &t2]
            .into_iter()
            .flatten()
        {
            check_nonzero(k, x)?;
        }
        if w1.is_none() && (w1a.is_none() || w1b.is_none()) {
            return Err(missing("lokr_w1 (or lokr_w1_a + lokr_w1_b)"));
        }
        if w2.is_none() && (w2a.is_none() || w2b.is_none()) {
            return Err(missing("lokr_w2 (or lokr_w2_a + lokr_w2_b)"));
        }
        for (a, b) in [(&w1a, &w1b), (&w2a, &w2b)] {
            if let (Some((ka, ta)), Some((kb, tb))) = (a, b) {
                if ta.rows_cols().1 != tb.shape[0] {
                    return Err(Error::invalid_lora(format!(
                        "{file}: module '{stem}': LoKr factors '{ka}' {:?} and '{kb}' {:?} do not fit",
                        ta.shape, tb.shape
                    )));
                }
            }
        }
        // alpha / rank only applies when a factor is decomposed.
        let rank = w1b
            .as_ref()
            .map(|t| t.1.shape[0])
            .or(w2b.as_ref().map(|t| t.1.shape[0]));
        let m = |x: Option<(String, Tensor)>| x.map(|t| t.1);
        (
            LoraKind::LoKr {
                w1: m(w1),
                w1a: m(w1a),
                w1b: m(w1b),
                w2: m(w2),
                w2a: m(w2a),
                w2b: m(w2b),
                t2: m(t2),
            },
            rank,
        )
    } else {
        let what: Vec<&String> = parts.values().map(|(k, _)| k).collect();
        return Err(Error::invalid_lora(format!(
            "{file}: module '{stem}' has no weight tensors (only {what:?}{})",
            if alpha.is_some() { " and alpha" } else { "" }
        )));
    };
    if let Some((key, t)) = parts.values().next() {
        return Err(err(
            key,
            t,
            &format!("does not belong to a {} module", kind.name()),
        ));
    }
    if rank == Some(0) {
        return Err(Error::invalid_lora(format!(
            "{file}: module '{stem}' has rank 0"
        )));
    }
    let alpha = alpha
        .or_else(|| rank.and_then(|r| peft.alpha_for(stem, r)))
        .or(if stem.starts_with("lora_") {
            kohya_alpha
        } else {
            None
        });
    let _ = peft.r;
    Ok(LoraModule {
        kind,
        alpha,
        rank,
        dora_scale,
    })
}
