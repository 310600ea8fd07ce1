//! Any prompt text must tokenize with the real CLIP vocabulary (the test
//! fixture) into BOS ... EOS sequences of the encoder's length, never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spo_runtime::text::tokenizer::{ClipTokenizer, LongPrompt, BOS_ID, MAX_LEN};

fn tokenizer() -> &'static ClipTokenizer {
    static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/clip-tokenizer"
        );
        ClipTokenizer::from_dir(dir).expect("the CLIP tokenizer fixture loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(prompt) = std::str::from_utf8(data) else {
        return;
    };
    let tok = tokenizer();
    for mode in [LongPrompt::Truncate, LongPrompt::Chunks] {
        let seqs = tok.encode_with(prompt, mode);
        assert!(!seqs.is_empty());
        for seq in seqs {
            assert_eq!(seq.len(), MAX_LEN);
            assert_eq!(seq[0], i64::from(BOS_ID));
            assert!(seq.contains(&i64::from(tok.eos_id())));
        }
    }
});
