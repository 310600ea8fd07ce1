//! The CLIP tokenizer against transformers 5.23 `CLIPTokenizer` goldens
//! (`tests/fixtures/goldens/tokenizer/corpus.json`, written by
//! `onnx/spo_onnx/goldens/units.py`). Every entry must match exactly.

use std::path::{Path, PathBuf};

use spo_runtime::text::{ClipTokenizer, LongPrompt, BOS_ID, EOS_ID, MAX_LEN};
use spo_runtime::ErrorCode;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn vocab_dir() -> PathBuf {
    fixtures().join("clip-tokenizer")
}

#[derive(serde::Deserialize)]
struct Entry {
    text: String,
    ids: Vec<i64>,
    ids_pad0: Vec<i64>,
}

fn corpus() -> Vec<Entry> {
    let p = fixtures().join("goldens/tokenizer/corpus.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn check(tok: &ClipTokenizer, pick: impl Fn(&Entry) -> &Vec<i64>) {
    let corpus = corpus();
    assert!(corpus.len() >= 80);
    let mut bad = Vec::new();
    for e in &corpus {
        let got = tok.encode_padded(&e.text, MAX_LEN);
        if &got != pick(e) {
            bad.push(format!(
                "{:?}\n  want {:?}\n  got  {:?}",
                e.text,
                pick(e),
                got
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ:\n{}",
        bad.len(),
        corpus.len(),
        bad.join("\n")
    );
}

#[test]
fn corpus_pad_endoftext() {
    let tok = ClipTokenizer::from_dir(vocab_dir()).unwrap();
    assert_eq!(tok.pad_id(), EOS_ID);
    check(&tok, |e| &e.ids);
}

#[test]
fn corpus_pad_exclamation() {
    let tok = ClipTokenizer::from_dir_with_pad(vocab_dir(), "!").unwrap();
    assert_eq!(tok.pad_id(), 0);
    check(&tok, |e| &e.ids_pad0);
}

#[test]
fn pad_token_from_config_files() {
    let dir = std::env::temp_dir().join(format!("spo-tok-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(vocab_dir().join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"pad_token": {"content": "!", "lstrip": false}}"#,
    )
    .unwrap();
    assert_eq!(ClipTokenizer::from_dir(&dir).unwrap().pad_id(), 0);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"pad_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    assert_eq!(ClipTokenizer::from_dir(&dir).unwrap().pad_id(), EOS_ID);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tokenizer_json_matches_vocab_merges() {
    let vocab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vocab_dir().join("vocab.json")).unwrap())
            .unwrap();
    let merges: Vec<String> = std::fs::read_to_string(vocab_dir().join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect();
    let tj = serde_json::json!({"model": {"type": "BPE", "vocab": vocab, "merges": merges}});
    let dir = std::env::temp_dir().join(format!("spo-tok-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let a = ClipTokenizer::from_dir(&dir).unwrap();
    let b = ClipTokenizer::from_dir(vocab_dir()).unwrap();
    for e in corpus().iter().take(40) {
        assert_eq!(
            a.encode_padded(&e.text, MAX_LEN),
            b.encode_padded(&e.text, MAX_LEN)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chunks_wrap_every_75_tokens() {
    let tok = ClipTokenizer::from_dir(vocab_dir()).unwrap();
    let text = "word ".repeat(160);
    let raw = tok.encode(&text);
    assert_eq!(raw.len(), 160);
    let chunks = tok.encode_chunks(&text);
    assert_eq!(chunks.len(), 3);
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.len(), MAX_LEN);
        assert_eq!(c[0], i64::from(BOS_ID));
        let body: Vec<i64> = raw
            .iter()
            .skip(75 * i)
            .take(75)
            .map(|&x| i64::from(x))
            .collect();
        assert_eq!(&c[1..1 + body.len()], &body[..]);
        assert_eq!(c[1 + body.len()], i64::from(EOS_ID));
    }
    assert_eq!(tok.encode_chunks("").len(), 1);
    assert_eq!(
        tok.encode_with(&text, LongPrompt::Truncate),
        vec![tok.encode_padded(&text, MAX_LEN)]
    );
    assert_eq!(tok.encode_with(&text, LongPrompt::default()).len(), 1);
}

#[test]
fn missing_vocab_names_the_file() {
    let dir = std::env::temp_dir().join(format!("spo-tok-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(vocab_dir().join("merges.txt"), dir.join("merges.txt")).unwrap();
    let e = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert_eq!(e.code, ErrorCode::Io);
    assert!(e.message.contains("vocab.json"), "{}", e.message);

    std::fs::write(dir.join("vocab.json"), "{not json").unwrap();
    let e = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidModel);
    assert!(e.message.contains("vocab.json"), "{}", e.message);

    std::fs::copy(vocab_dir().join("vocab.json"), dir.join("vocab.json")).unwrap();
    std::fs::write(
        dir.join("merges.txt"),
        "#version: 0.2\ni n\nbroken line here\n",
    )
    .unwrap();
    let e = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert!(
        e.message.contains("merges.txt") && e.message.contains("line 3"),
        "{}",
        e.message
    );

    std::fs::remove_file(dir.join("merges.txt")).unwrap();
    let e = ClipTokenizer::from_dir(&dir).unwrap_err();
    assert!(e.message.contains("merges.txt"), "{}", e.message);

    let e = ClipTokenizer::from_dir_with_pad(vocab_dir(), "<|notatoken|>").unwrap_err();
    assert!(e.message.contains("<|notatoken|>"), "{}", e.message);
    std::fs::remove_dir_all(&dir).unwrap();
}
