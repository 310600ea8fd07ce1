//! Any model_index.json and VAE config.json texts (split at the first NUL
//! byte; without one there is no VAE config) must give a ModelFolder or an
//! Error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spo_runtime::model::folder::ModelFolder;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (index, vae) = match text.split_once('\0') {
        Some((i, v)) => (i, Some((Path::new("/fuzz/vae_decoder/config.json"), v))),
        None => (text, None),
    };
    let _ = ModelFolder::from_configs(Path::new("/fuzz"), index, vae);
});
