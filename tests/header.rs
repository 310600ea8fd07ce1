//! The committed header must equal a fresh cbindgen generation, so a changed
//! `extern "C"` signature cannot land without its header. `make header`
//! (SPO_UPDATE_HEADER=1) rewrites the committed file.

#[test]
fn committed_header_matches_generated() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/spo_runtime.h"));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/include/spo_runtime.h");
    if std::env::var_os("SPO_UPDATE_HEADER").is_some() {
        std::fs::write(path, generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/spo_runtime.h is stale: src/ffi changed without regenerating the header. Run `make header` and commit it."
    );
}

#[test]
fn header_abi_version_matches_library() {
    let header = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/include/spo_runtime.h"
    ))
    .unwrap();
    let want = format!(
        "#define SPO_ABI_VERSION {}",
        spo_runtime::runtime::ABI_VERSION
    );
    assert!(header.contains(&want), "header lacks `{want}`");
}
