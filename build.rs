//! Generates the C header from `src/ffi` into `$OUT_DIR/spo_runtime.h`.
//! `tests/header.rs` fails when it differs from the committed
//! `include/spo_runtime.h`; `make header` copies it over. Never downloads anything.

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
        .write_to_file(out);
}
