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

/// The labels every public function and handle type documents, each at the
/// start of a comment line, so a C user finds them without reading prose.
const CONTRACT_LABELS: [&str; 3] = ["Ownership:", "Threading:", "Errors:"];

/// A declaration of the public header with the comment block above it.
struct Documented {
    name: String,
    is_handle: bool,
    doc: Vec<String>,
}

/// Every function prototype and opaque handle typedef of the header, each with
/// the `//` lines right above it.
fn documented_items(header: &str) -> Vec<Documented> {
    let handle = regex::Regex::new(r"^typedef struct (spo_\w+) spo_\w+;$").unwrap();
    let function = regex::Regex::new(r"^[\w\s\*]*?\b(spo_\w+)\(").unwrap();
    let mut items = Vec::new();
    let mut doc: Vec<String> = Vec::new();
    let mut in_functions = false;
    for line in header.lines() {
        if let Some(text) = line.strip_prefix("//") {
            doc.push(text.trim().to_string());
            continue;
        }
        if line.starts_with("extern \"C\" {") {
            in_functions = true;
        }
        let name = match (handle.captures(line), function.captures(line)) {
            (Some(c), _) => Some((c[1].to_string(), true)),
            (None, Some(c)) if in_functions && !line.starts_with(' ') => {
                Some((c[1].to_string(), false))
            }
            _ => None,
        };
        if let Some((name, is_handle)) = name {
            items.push(Documented {
                name,
                is_handle,
                doc: std::mem::take(&mut doc),
            });
        } else {
            doc.clear();
        }
    }
    items
}

/// How many `extern "C"` functions src/ffi defines, counted from the Rust
/// source, so the header parser is checked against something it did not read.
fn exported_function_count() -> usize {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/ffi");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .map(|src| src.matches("pub extern \"C\" fn spo_").count())
        .sum()
}

#[test]
fn every_function_and_handle_states_its_contract() {
    let header = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/include/spo_runtime.h"
    ))
    .unwrap();
    let items = documented_items(&header);
    let exported = exported_function_count();
    let found = items.iter().filter(|i| !i.is_handle).count();
    assert_eq!(
        found, exported,
        "the header parser found {found} functions but src/ffi exports {exported}: it no longer understands the header"
    );
    let mut missing = Vec::new();
    for item in &items {
        for label in CONTRACT_LABELS {
            if !item.doc.iter().any(|l| l.starts_with(label)) {
                missing.push(format!("{} lacks a line starting `{label}`", item.name));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "include/spo_runtime.h: every public function and handle type states ownership, threading and errors on labelled lines (edit the doc comments in src/ffi, then `make header`):\n{}",
        missing.join("\n")
    );
}

#[test]
fn contract_check_sees_a_missing_label() {
    let header = "// A handle.\n//\n// Ownership: x.\n// Threading: any.\ntypedef struct spo_x spo_x;\n\
                  extern \"C\" {\n// Does y.\n// Ownership: b. Threading: any.\n// Errors: none.\nvoid spo_y(void);\n";
    let items = documented_items(header);
    let names: Vec<_> = items.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["spo_x", "spo_y"]);
    assert!(!items[0].doc.iter().any(|l| l.starts_with("Errors:")));
    assert!(!items[1].doc.iter().any(|l| l.starts_with("Threading:")));
    assert!(items[1].doc.iter().any(|l| l.starts_with("Errors:")));
}
