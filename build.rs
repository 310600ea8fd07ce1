//! Generates the C header from `src/ffi` into `$OUT_DIR/spo_runtime.h`.
//! `tests/header.rs` fails when it differs from the committed
//! `include/spo_runtime.h`; `make header` copies it over. Never downloads anything.
//!
//! On Linux it also gives the cdylib the SONAME `libspo_runtime.so.<ABI>`, so a
//! program linked today refuses a future library of another ABI at load time,
//! and gives `spo` a run path of `$ORIGIN/../lib`, so an installed CLI finds
//! ONNX Runtime in the prefix's lib/ with no variable set.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("spo_runtime.h");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=src/ffi");
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    // cbindgen follows the `mod` items of src/ffi/mod.rs, so only the C ABI is seen.
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen could not generate the header")
        .write_to_file(&out);
    let header = std::fs::read_to_string(&out).expect("generated header");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        let abi = abi_version(&header);
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libspo_runtime.so.{abi}");
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN/../lib");
    }
}

/// `SPO_ABI_VERSION` as the header states it (from `src/ffi/mod.rs`), so the
/// SONAME cannot drift from the ABI a caller compiles against.
fn abi_version(header: &str) -> u32 {
    header
        .lines()
        .find_map(|l| l.strip_prefix("#define SPO_ABI_VERSION "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the generated header defines SPO_ABI_VERSION")
}
