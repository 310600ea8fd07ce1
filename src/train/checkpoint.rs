//! Trainer checkpoints: one safetensors file holding the LoRA (`lora/<key>`)
//! and AdamW's moments (`adam_m/<key>`, `adam_v/<key>`), with the round,
//! AdamW's step count and the seed in the header. With the seed and the
//! round, that is the trainer's whole state (each round's generator is
//! derived from them), so a resumed run continues bit for bit.
//!
//! Written atomically (temporary file, fsync, rename, fsync of the folder):
//! a kill mid-save leaves the previous checkpoint whole.

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;

use super::trainer::{TrainState, Trainer};
use crate::error::{Error, Result};
use crate::model::tensors::{self, NamedTensors};

const FORMAT: &str = "spo-runtime-trainer-checkpoint";
const VERSION: &str = "1";
const LORA: &str = "lora/";
const MOMENT_1: &str = "adam_m/";
const MOMENT_2: &str = "adam_v/";

/// Writes the trainer's state to `path`.
pub fn save(trainer: &Trainer, path: &Path) -> Result<()> {
    let state = trainer.state();
    let (m, v) = state.adam.moments();
    let mut out = NamedTensors::new();
    for (prefix, set) in [(LORA, &state.params), (MOMENT_1, m), (MOMENT_2, v)] {
        for (k, a) in set {
            out.insert(format!("{prefix}{k}"), a.clone());
        }
    }
    let meta = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        ("version".to_owned(), VERSION.to_owned()),
        ("round".to_owned(), state.round.to_string()),
        ("adam_step".to_owned(), state.adam.step.to_string()),
        ("seed".to_owned(), trainer.config().seed.to_string()),
    ]);
    tensors::write_with_metadata(path, &out, Some(meta))
}

/// A parsed checkpoint.
#[derive(Debug)]
pub struct Saved {
    pub params: NamedTensors,
    pub moment_1: NamedTensors,
    pub moment_2: NamedTensors,
    pub round: u64,
    pub adam_step: u64,
    pub seed: u64,
}

/// Parses a checkpoint file's bytes; `what` names it in errors.
pub fn parse(bytes: &[u8], what: &str) -> Result<Saved> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::invalid_file(format!("{what}: invalid safetensors header: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |k: &str| {
        meta.get(k)
            .ok_or_else(|| Error::invalid_file(format!("{what}: no '{k}' in the header")))
    };
    if field("format")? != FORMAT || field("version")? != VERSION {
        return Err(Error::invalid_file(format!(
            "{what}: not a version-{VERSION} trainer checkpoint"
        )));
    }
    let number = |k: &str| -> Result<u64> {
        field(k)?
            .parse()
            .map_err(|_| Error::invalid_file(format!("{what}: '{k}' is not an integer")))
    };
    let mut all = tensors::from_bytes(bytes, what)?;
    let mut take = |prefix: &str| -> NamedTensors {
        let keys: Vec<String> = all
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.into_iter()
            .map(|k| {
                let v = all.remove(&k).expect("listed");
                (k[prefix.len()..].to_owned(), v)
            })
            .collect()
    };
    let (params, moment_1, moment_2) = (take(LORA), take(MOMENT_1), take(MOMENT_2));
    if let Some(k) = all.keys().next() {
        return Err(Error::invalid_file(format!(
            "{what}: unexpected tensor '{k}'"
        )));
    }
    Ok(Saved {
        params,
        moment_1,
        moment_2,
        round: number("round")?,
        adam_step: number("adam_step")?,
        seed: number("seed")?,
    })
}

/// Reads `path` into `trainer`, which must train the same parameters.
/// Nothing changes when the file is bad.
pub fn load(trainer: &mut Trainer, path: &Path) -> Result<()> {
    let what = path.display().to_string();
    let saved = parse(&tensors::read_bytes(path)?, &what)?;
    let mut adam = trainer.state().adam.clone();
    adam.restore(saved.adam_step, saved.moment_1, saved.moment_2)
        .map_err(|e| e.context(&what))?;
    let state = TrainState {
        params: saved.params,
        adam,
        round: saved.round,
    };
    trainer
        .restore(state, saved.seed)
        .map_err(|e| e.context(&what))
}
