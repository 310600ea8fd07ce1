//! Any tokenizer folder files must give a ClipTokenizer or an Error, never a
//! panic. The input is split at NUL bytes into vocab.json, merges.txt and a
//! prompt; the first part is also tried as tokenizer.json and as a
//! tokenizer_config.json (pad token). A tokenizer that loads encodes the prompt.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spo_runtime::text::tokenizer::{pad_token_of, ClipTokenizer, LongPrompt, MAX_LEN};

fn encode(tok: &ClipTokenizer, prompt: &str) {
    for mode in [LongPrompt::Truncate, LongPrompt::Chunks] {
        for seq in tok.encode_with(prompt, mode) {
            assert_eq!(seq.len(), MAX_LEN);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\0');
    let vocab = parts.next().unwrap_or("");
    let merges = parts.next().unwrap_or("");
    let prompt = parts.next().unwrap_or("a photo");
    let pad = pad_token_of(vocab, Path::new("tokenizer_config.json"))
        .ok()
        .flatten();
    let files = ClipTokenizer::from_texts(
        (Path::new("vocab.json"), vocab),
        (Path::new("merges.txt"), merges),
        pad.as_deref(),
    );
    if let Ok(tok) = files {
        encode(&tok, prompt);
    }
    if let Ok(tok) =
        ClipTokenizer::from_tokenizer_json_text(vocab, Path::new("tokenizer.json"), None)
    {
        encode(&tok, prompt);
    }
});
