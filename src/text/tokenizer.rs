//! The CLIP byte-level BPE tokenizer, as used by SD 1.5 and both SDXL text encoders.
//!
//! This reproduces what `transformers` 5.23 `CLIPTokenizer` (which is backed by the
//! `tokenizers` library) produces for
//! `tok(text, padding="max_length", max_length=77, truncation=True).input_ids`:
//!
//! 1. **Special tokens** (`<|startoftext|>`, `<|endoftext|>` and the pad token when it
//!    differs, e.g. `!` for SDXL's second tokenizer) are matched literally, case
//!    sensitively, on the *raw* text before any normalisation, and become their id.
//!    So with pad token `!` every `!` in a prompt becomes id 0, as in transformers.
//! 2. Every other stretch of text is normalised: Unicode NFC, each run of `\s`
//!    replaced by one space, then lowercased character by character (no final-sigma
//!    rule). No ftfy fixing and no accent stripping take place.
//! 3. It is split with the CLIP pattern
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    (whitespace is dropped, each digit is its own word), and each piece again with
//!    the GPT-2 byte-level pattern (this only matters for a lowercased literal such
//!    as `<|ENDOFTEXT|>`, which becomes `<|`, `endoftext`, `|>`).
//! 4. Each word's UTF-8 bytes are mapped through the GPT-2 byte-to-unicode table,
//!    `</w>` is appended to its last symbol, and BPE merges are applied by rank.
//!
//! Long prompts: [`ClipTokenizer::encode_padded`] truncates to `max_len - 2` tokens
//! like diffusers (the default). [`ClipTokenizer::encode_chunks`] instead cuts the
//! token stream into 75-token chunks, each wrapped in BOS/EOS and padded to 77
//! (the A1111 style), for a pipeline that concatenates the encoder outputs.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use parking_lot::Mutex;
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// Id of `<|startoftext|>` in the CLIP vocabulary.
pub const BOS_ID: u32 = 49406;
/// Id of `<|endoftext|>` in the CLIP vocabulary.
pub const EOS_ID: u32 = 49407;
/// The sequence length the CLIP text encoders of SD 1.5 / SDXL take.
pub const MAX_LEN: usize = 77;

const BOS_TOKEN: &str = "<|startoftext|>";
const EOS_TOKEN: &str = "<|endoftext|>";
const WORD_END: &str = "</w>";
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The GPT-2 byte-level pattern restricted to whitespace-free input (CLIP pieces
/// never hold whitespace, so its ` ?` prefixes and `\s+` branches cannot match).
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";
const CACHE_LIMIT: usize = 50_000;

/// The pre-tokenizer patterns, compiled once per process and shared by
/// reference: they are the same for every tokenizer, compiling their Unicode
/// classes costs milliseconds per load, and their lazy DFAs warm up as they
/// are used (a `Regex` clone would start with cold caches).
#[derive(Debug)]
struct Patterns {
    clip: Regex,
    byte_level: Regex,
    whitespace: Regex,
}

fn patterns() -> &'static Patterns {
    static PATTERNS: OnceLock<Patterns> = OnceLock::new();
    PATTERNS.get_or_init(|| Patterns {
        clip: Regex::new(CLIP_PATTERN).expect("CLIP pattern"),
        byte_level: Regex::new(BYTE_LEVEL_PATTERN).expect("byte-level pattern"),
        whitespace: Regex::new(r"\s+").expect("whitespace pattern"),
    })
}

/// How a prompt longer than the encoder's window is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LongPrompt {
    /// Keep the first `max_len - 2` tokens (diffusers behaviour). The default.
    #[default]
    Truncate,
    /// Split into 75-token chunks, each wrapped with BOS/EOS and padded (A1111).
    Chunks,
}

impl LongPrompt {
    /// `truncate` or `chunks`.
    pub fn parse(s: &str) -> Option<LongPrompt> {
        match s {
            "truncate" => Some(LongPrompt::Truncate),
            "chunks" => Some(LongPrompt::Chunks),
            _ => None,
        }
    }
}

/// A CLIP BPE tokenizer. Cheap to share between threads (`Send + Sync`); the BPE
/// cache sits behind a mutex.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), u32>,
    byte_chars: [char; 256],
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    pad_token: String,
    /// Literal special tokens matched on raw text, with their ids.
    specials: Vec<(String, u32)>,
    special_re: Regex,
    /// The process-wide pre-tokenizer patterns (see [`patterns`]).
    patterns: &'static Patterns,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("merges", &self.ranks.len())
            .field("pad_token", &self.pad_token)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// The GPT-2 / CLIP reversible map from bytes to printable characters: printable
/// Latin-1 bytes map to themselves, the rest to U+0100 onwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let keep = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0u32;
    for b in 0u32..256 {
        let c = if keep(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).expect("valid code point");
    }
    out
}

/// Reads `pad_token` from a transformers config file: either a string or an
/// `{"content": ...}` object. `Ok(None)` when the file or key is absent.
fn read_pad_token(path: &Path) -> Result<Option<String>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    pad_token_of(&text, path)
}

/// The `pad_token` of a transformers config file's text; `path` only names it
/// in errors. Public for the fuzz targets.
#[doc(hidden)]
pub fn pad_token_of(text: &str, path: &Path) -> Result<Option<String>> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::invalid_model(format!("{}: invalid JSON: {e}", path.display())))?;
    Ok(match v.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => {
            o.get("content").and_then(|c| c.as_str()).map(str::to_owned)
        }
        _ => None,
    })
}

fn parse_merge_line(line: &str, origin: &Path, lineno: usize) -> Result<(String, String)> {
    let mut it = line.split(' ');
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
            Ok((a.to_owned(), b.to_owned()))
        }
        _ => Err(Error::invalid_model(format!(
            "{}: line {lineno}: expected two space-separated symbols, got {line:?}",
            origin.display()
        ))),
    }
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `vocab.json` + `merges.txt` (preferred), or else
    /// `tokenizer.json`. The pad token comes from `tokenizer_config.json`, then
    /// `special_tokens_map.json`, else defaults to `<|endoftext|>`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut pad = read_pad_token(&dir.join("tokenizer_config.json"))?;
        if pad.is_none() {
            pad = read_pad_token(&dir.join("special_tokens_map.json"))?;
        }
        Self::from_dir_inner(dir, pad.as_deref())
    }

    /// Like [`from_dir`](Self::from_dir) with an explicit pad token (`"<|endoftext|>"`
    /// for SD 1.5 and SDXL's first tokenizer, `"!"` for SDXL's second), ignoring
    /// the config files.
    pub fn from_dir_with_pad(dir: impl AsRef<Path>, pad_token: &str) -> Result<Self> {
        Self::from_dir_inner(dir.as_ref(), Some(pad_token))
    }

    fn from_dir_inner(dir: &Path, pad_token: Option<&str>) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let tj = dir.join("tokenizer.json");
        if !vocab.is_file() && !merges.is_file() && tj.is_file() {
            return Self::from_tokenizer_json(&tj, pad_token);
        }
        Self::from_files(&vocab, &merges, pad_token)
    }

    /// Loads `vocab.json` and `merges.txt`. `pad_token` defaults to `<|endoftext|>`.
    pub fn from_files(
        vocab_path: &Path,
        merges_path: &Path,
        pad_token: Option<&str>,
    ) -> Result<Self> {
        let vtext = fs::read_to_string(vocab_path).map_err(|e| Error::io(vocab_path, e))?;
        let mtext = fs::read_to_string(merges_path).map_err(|e| Error::io(merges_path, e))?;
        Self::from_texts((vocab_path, &vtext), (merges_path, &mtext), pad_token)
    }

    /// [`from_files`](Self::from_files) on the files' texts, each with the path
    /// that names it in errors. Public for the fuzz targets.
    #[doc(hidden)]
    pub fn from_texts(
        (vocab_path, vtext): (&Path, &str),
        (merges_path, mtext): (&Path, &str),
        pad_token: Option<&str>,
    ) -> Result<Self> {
        let vocab: HashMap<String, u32> = serde_json::from_str(vtext).map_err(|e| {
            Error::invalid_model(format!(
                "{}: not a JSON object of token -> id: {e}",
                vocab_path.display()
            ))
        })?;
        let mut merges = Vec::new();
        for (i, line) in mtext.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if (i == 0 && line.starts_with("#version")) || line.is_empty() {
                continue;
            }
            merges.push(parse_merge_line(line, merges_path, i + 1)?);
        }
        Self::build(vocab, merges, pad_token.unwrap_or(EOS_TOKEN), vocab_path)
    }

    /// Loads the BPE model of a `tokenizer.json` (the `tokenizers` library format).
    pub fn from_tokenizer_json(path: &Path, pad_token: Option<&str>) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_tokenizer_json_text(&text, path, pad_token)
    }

    /// [`from_tokenizer_json`](Self::from_tokenizer_json) on the file's text;
    /// `path` only names it in errors. Public for the fuzz targets.
    #[doc(hidden)]
    pub fn from_tokenizer_json_text(
        text: &str,
        path: &Path,
        pad_token: Option<&str>,
    ) -> Result<Self> {
        let bad = |m: &str| Error::invalid_model(format!("{}: {m}", path.display()));
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        let model = v.get("model").ok_or_else(|| bad("no \"model\" key"))?;
        let vocab: HashMap<String, u32> = serde_json::from_value(
            model
                .get("vocab")
                .cloned()
                .ok_or_else(|| bad("no \"model.vocab\" key"))?,
        )
        .map_err(|e| bad(&format!("model.vocab: {e}")))?;
        let list = model
            .get("merges")
            .and_then(|m| m.as_array())
            .ok_or_else(|| bad("no \"model.merges\" array"))?;
        let mut merges = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let pair = match m {
                serde_json::Value::String(s) => parse_merge_line(s, path, i + 1)?,
                serde_json::Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str())
                {
                    (Some(x), Some(y)) => (x.to_owned(), y.to_owned()),
                    _ => return Err(bad(&format!("model.merges[{i}] is not a pair of strings"))),
                },
                _ => return Err(bad(&format!("model.merges[{i}] is malformed"))),
            };
            merges.push(pair);
        }
        let json_pad = v
            .get("padding")
            .and_then(|p| p.get("pad_token"))
            .and_then(|p| p.as_str())
            .map(str::to_owned);
        let pad = pad_token
            .map(str::to_owned)
            .or(json_pad)
            .unwrap_or_else(|| EOS_TOKEN.to_owned());
        Self::build(vocab, merges, &pad, path)
    }

    /// Builds a tokenizer from an in-memory vocabulary and merge list (in rank
    /// order) with the given pad token.
    pub fn from_parts(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad_token: &str,
    ) -> Result<Self> {
        Self::build(vocab, merges, pad_token, Path::new("<vocabulary>"))
    }

    fn build(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad_token: &str,
        origin: &Path,
    ) -> Result<Self> {
        let id_of = |tok: &str| {
            vocab.get(tok).copied().ok_or_else(|| {
                Error::invalid_model(format!(
                    "{}: token {tok:?} is not in the vocabulary",
                    origin.display()
                ))
            })
        };
        let bos_id = id_of(BOS_TOKEN)?;
        let eos_id = id_of(EOS_TOKEN)?;
        let pad_id = id_of(pad_token)?;
        let mut specials = vec![
            (BOS_TOKEN.to_owned(), bos_id),
            (EOS_TOKEN.to_owned(), eos_id),
        ];
        if pad_token != BOS_TOKEN && pad_token != EOS_TOKEN {
            specials.push((pad_token.to_owned(), pad_id));
        }
        // Longest first, so the alternation behaves as leftmost-longest.
        let mut alts: Vec<&str> = specials.iter().map(|(s, _)| s.as_str()).collect();
        alts.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let special_re = Regex::new(
            &alts
                .iter()
                .map(|s| regex::escape(s))
                .collect::<Vec<_>>()
                .join("|"),
        )
        .map_err(|e| Error::invalid_model(format!("special token pattern: {e}")))?;
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p, i as u32))
            .collect();
        Ok(ClipTokenizer {
            vocab,
            ranks,
            byte_chars: bytes_to_unicode(),
            bos_id,
            eos_id,
            pad_id,
            pad_token: pad_token.to_owned(),
            specials,
            special_re,
            patterns: patterns(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    /// Id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    /// Id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    /// The pad token string.
    pub fn pad_token(&self) -> &str {
        &self.pad_token
    }
    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The BPE ids of `text`, without BOS/EOS and without truncation. Special
    /// tokens written literally in the text are kept as their ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut last = 0;
        for m in self.special_re.find_iter(text) {
            self.encode_plain(&text[last..m.start()], &mut out);
            let id = self
                .specials
                .iter()
                .find(|(s, _)| s == m.as_str())
                .map(|(_, id)| *id)
                .expect("matched special token");
            out.push(id);
            last = m.end();
        }
        self.encode_plain(&text[last..], &mut out);
        out
    }

    /// `[BOS] + first (max_len - 2) tokens + [EOS]`, padded with the pad id to
    /// `max_len`: transformers' `padding="max_length", truncation=True`.
    /// `max_len` must be at least 2.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Vec<i64> {
        let ids = self.encode(text);
        self.wrap(&ids[..ids.len().min(max_len.saturating_sub(2))], max_len)
    }

    /// The A1111-style long-prompt encoding: the token stream cut into chunks of 75,
    /// each `[BOS] + chunk + [EOS]` padded to 77. An empty prompt gives one chunk.
    pub fn encode_chunks(&self, text: &str) -> Vec<Vec<i64>> {
        let ids = self.encode(text);
        let body = MAX_LEN - 2;
        if ids.is_empty() {
            return vec![self.wrap(&[], MAX_LEN)];
        }
        ids.chunks(body).map(|c| self.wrap(c, MAX_LEN)).collect()
    }

    /// Encodes with the chosen long-prompt mode; `Truncate` yields one sequence.
    pub fn encode_with(&self, text: &str, mode: LongPrompt) -> Vec<Vec<i64>> {
        match mode {
            LongPrompt::Truncate => vec![self.encode_padded(text, MAX_LEN)],
            LongPrompt::Chunks => self.encode_chunks(text),
        }
    }

    fn wrap(&self, body: &[u32], max_len: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(max_len.max(body.len() + 2));
        out.push(i64::from(self.bos_id));
        out.extend(body.iter().map(|&i| i64::from(i)));
        out.push(i64::from(self.eos_id));
        while out.len() < max_len {
            out.push(i64::from(self.pad_id));
        }
        out
    }

    /// Normalises the text NFC -> collapse whitespace -> lowercase, exactly in the
    /// order of the transformers CLIP normaliser.
    fn normalize(&self, text: &str) -> String {
        let nfc: String = text.nfc().collect();
        let spaced = self.patterns.whitespace.replace_all(&nfc, " ");
        spaced.chars().flat_map(char::to_lowercase).collect()
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let norm = self.normalize(text);
        for piece in self.patterns.clip.find_iter(&norm) {
            for word in self.patterns.byte_level.find_iter(piece.as_str()) {
                self.encode_word(word.as_str(), out);
            }
        }
    }

    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        if let Some(ids) = self.cache.lock().get(word) {
            out.extend_from_slice(ids);
            return;
        }
        let ids = self.bpe(word);
        out.extend_from_slice(&ids);
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(word.to_owned(), ids);
    }

    /// BPE of one word: byte-mapped symbols, `</w>` on the last, then repeatedly
    /// merge every occurrence of the lowest-ranked adjacent pair, left to right.
    fn bpe(&self, word: &str) -> Vec<u32> {
        let mut syms: Vec<String> = word
            .bytes()
            .map(|b| self.byte_chars[b as usize].to_string())
            .collect();
        if let Some(last) = syms.last_mut() {
            last.push_str(WORD_END);
        }
        let mut key = (String::new(), String::new());
        loop {
            let mut best: Option<(u32, usize)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                key.0.clear();
                key.0.push_str(&syms[i]);
                key.1.clear();
                key.1.push_str(&syms[i + 1]);
                if let Some(&r) = self.ranks.get(&key) {
                    if best.is_none_or(|(br, _)| r < br) {
                        best = Some((r, i));
                    }
                }
            }
            let Some((_, first)) = best else { break };
            let (a, b) = (syms[first].clone(), syms[first + 1].clone());
            let mut merged = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                    merged.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut syms[i]));
                    i += 1;
                }
            }
            syms = merged;
        }
        // Symbols missing from the vocabulary become the unknown token, as in
        // `tokenizers` BPE with `unk_token = <|endoftext|>`.
        syms.iter()
            .map(|s| self.vocab.get(s).copied().unwrap_or(self.eos_id))
            .collect()
    }
}
