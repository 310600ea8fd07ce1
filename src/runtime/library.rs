//! Finding and loading the ONNX Runtime shared library.
//!
//! ONNX Runtime is loaded once per process (`ort`'s `load-dynamic` keeps one
//! library); every runtime after the first shares it. Search order (docs/architecture.md,
//! "Loading ONNX Runtime"): the `ort.library_path` option, `SPO_ORT_LIBRARY`,
//! `ORT_DYLIB_PATH`, the folder of the loaded spo_runtime library, then the
//! system search path. An explicitly configured place (the first three) is
//! authoritative: when it fails we stop there rather than silently load another
//! build. The error lists every place that was tried and why it failed.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::{Error, ErrorCode, Result};

#[cfg(target_os = "windows")]
const LIB_NAME: &str = "onnxruntime.dll";
#[cfg(target_os = "macos")]
const LIB_NAME: &str = "libonnxruntime.dylib";
#[cfg(not(any(target_os = "windows", target_os = "macos")))]
const LIB_NAME: &str = "libonnxruntime.so";

/// What was loaded, for `ort.library_path` and `ort.version`, with the ONNX
/// Runtime environment, which must stay alive for the life of the process
/// (`ort` keeps only a weak reference to it).
#[derive(Clone)]
pub struct LoadedLibrary {
    pub path: PathBuf,
    pub version: String,
    pub env: ort::environment::Environment,
}

impl std::fmt::Debug for LoadedLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ONNX Runtime {} at {}",
            self.version,
            self.path.display()
        )
    }
}

static LOADED: Mutex<Option<LoadedLibrary>> = Mutex::new(None);

/// Releases our reference to the ONNX Runtime environment when the process
/// exits, before the runtime library's own static objects are destroyed.
/// The environment owns background threads; left alive through exit, one can
/// wake while those statics are torn down and read freed memory (an ONNX
/// Runtime behaviour: it expects the environment released before `main`
/// returns). Sessions still alive at exit keep the environment (they hold
/// references); hosts free their handles first.
///
/// Exit handlers (`atexit` and C++ static destructors alike) run in reverse
/// order of registration, so the release must be registered after the
/// constructor of every ONNX Runtime static it has to precede. Namespace
/// statics are built when the library is loaded, but function-local statics
/// are built lazily, on first session creation and on first run; one built
/// after our registration would be destroyed before the release, while the
/// environment's threads still live. So the (idempotent) release is
/// registered again at each of those points, once per process: see
/// [`release_after`]. (A second environment per process is refused by `ort`,
/// so releasing the environment with the last runtime is not an option.)
/// One background thread that `CreateEnv` starts is not the environment's and
/// survives this release; its exit race is inside ONNX Runtime alone (see
/// `tests/c/valgrind.supp`).
fn release_at_exit() {
    extern "C" fn release() {
        if let Some(mut loaded) = LOADED.try_lock() {
            loaded.take();
        }
    }
    // SAFETY: registers a plain function with no captured state.
    unsafe {
        libc::atexit(release);
    }
}

/// The points after which ONNX Runtime has constructed lazy statics that the
/// exit-time release must precede (see [`release_at_exit`]).
#[derive(Clone, Copy)]
pub(crate) enum LazyStatics {
    /// The first session was committed.
    SessionCreated = 0,
    /// The first session run returned.
    FirstRun = 1,
}

/// Re-registers the exit-time release after `point`, once per process.
pub(crate) fn release_after(point: LazyStatics) {
    static DONE: [std::sync::Once; 2] = [std::sync::Once::new(), std::sync::Once::new()];
    DONE[point as usize].call_once(release_at_exit);
}

/// A place to look, with a label for the error message.
struct Candidate {
    source: &'static str,
    path: PathBuf,
    explicit: bool,
}

fn candidates(option: Option<&str>) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut explicit = |source, value: Option<String>| {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            let p = PathBuf::from(v);
            // A folder means "the library inside it".
            let path = if p.is_dir() { p.join(LIB_NAME) } else { p };
            out.push(Candidate {
                source,
                path,
                explicit: true,
            });
        }
    };
    explicit("option ort.library_path", option.map(str::to_owned));
    explicit("env SPO_ORT_LIBRARY", std::env::var("SPO_ORT_LIBRARY").ok());
    explicit("env ORT_DYLIB_PATH", std::env::var("ORT_DYLIB_PATH").ok());
    if let Some(dir) = own_library_dir() {
        out.push(Candidate {
            source: "folder of the spo_runtime library",
            path: dir.join(LIB_NAME),
            explicit: false,
        });
    }
    out.push(Candidate {
        source: "system library search path",
        path: PathBuf::from(LIB_NAME),
        explicit: false,
    });
    out
}

/// The folder holding the binary this code lives in (the cdylib, or the
/// executable when linked statically as an rlib).
fn own_library_dir() -> Option<PathBuf> {
    #[cfg(unix)]
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        let addr = own_library_dir as *const libc::c_void;
        if libc::dladdr(addr, &mut info) != 0 && !info.dli_fname.is_null() {
            let p = PathBuf::from(
                CStr::from_ptr(info.dli_fname)
                    .to_string_lossy()
                    .into_owned(),
            );
            let p = p.canonicalize().unwrap_or(p);
            return p.parent().map(Path::to_path_buf);
        }
    }
    None
}

/// Loads ONNX Runtime (once per process) and returns what is loaded.
pub fn load(option: Option<&str>) -> Result<LoadedLibrary> {
    let mut loaded = LOADED.lock();
    let cands = candidates(option);
    if let Some(lib) = loaded.as_ref() {
        // Already loaded: an explicit request for another file cannot be honoured.
        if let Some(c) = cands.iter().find(|c| c.explicit) {
            let want = c.path.canonicalize().unwrap_or_else(|_| c.path.clone());
            if want != lib.path {
                return Err(Error::new(
                    ErrorCode::OrtLoad,
                    format!(
                        "ONNX Runtime is already loaded in this process from {}; {} asks for {}, and one process can hold only one ONNX Runtime",
                        lib.path.display(),
                        c.source,
                        c.path.display()
                    ),
                ));
            }
        }
        return Ok(lib.clone());
    }
    let mut tried = Vec::new();
    for c in &cands {
        if c.path.is_absolute() && !c.path.exists() {
            tried.push(format!(
                "  {} -> {}: no such file",
                c.source,
                c.path.display()
            ));
        } else {
            match try_load(&c.path) {
                Ok(lib) => {
                    *loaded = Some(lib.clone());
                    release_at_exit();
                    return Ok(lib);
                }
                Err(why) => tried.push(format!("  {} -> {}: {why}", c.source, c.path.display())),
            }
        }
        if c.explicit {
            break;
        }
    }
    Err(Error::new(
        ErrorCode::OrtLoad,
        format!(
            "could not load ONNX Runtime ({LIB_NAME}, 1.31 or newer); looked in:\n{}\nRun scripts/fetch-onnxruntime.sh and set SPO_ORT_LIBRARY or the option ort.library_path.",
            tried.join("\n")
        ),
    ))
}

fn try_load(path: &Path) -> std::result::Result<LoadedLibrary, String> {
    // Check the file is an ONNX Runtime before handing it to ort: its loader
    // keeps the first library it opens for the life of the process.
    let version = probe_version(path)?;
    let env = ort::init_from(path)
        .map_err(|e| e.to_string())?
        .with_name("spo-runtime")
        .with_telemetry(false)
        .build()
        .map_err(|e| e.to_string())?;
    let path = path.canonicalize().unwrap_or_else(|_| resolved_path(path));
    Ok(LoadedLibrary { path, version, env })
}

/// Opens the library, reads `OrtGetApiBase()->GetVersionString()`, closes it.
fn probe_version(path: &Path) -> std::result::Result<String, String> {
    let c = CString::new(path.as_os_str().to_string_lossy().as_bytes())
        .map_err(|_| "path contains a NUL byte".to_owned())?;
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if h.is_null() {
            let err = libc::dlerror();
            let msg = if err.is_null() {
                "dlopen failed".to_owned()
            } else {
                CStr::from_ptr(err).to_string_lossy().into_owned()
            };
            return Err(msg);
        }
        let sym = libc::dlsym(h, c"OrtGetApiBase".as_ptr());
        if sym.is_null() {
            libc::dlclose(h);
            return Err("not an ONNX Runtime library (no OrtGetApiBase)".to_owned());
        }
        let get_base: unsafe extern "C" fn() -> *const ort::sys::OrtApiBase =
            std::mem::transmute(sym);
        let base = get_base();
        let version = if base.is_null() {
            None
        } else {
            let v = ((*base).GetVersionString)();
            (!v.is_null()).then(|| CStr::from_ptr(v).to_string_lossy().into_owned())
        };
        libc::dlclose(h);
        let version = version.ok_or("OrtGetApiBase returned no version")?;
        let minor: u32 = version
            .split('.')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if minor < 31 {
            return Err(format!("version {version} is older than the required 1.31"));
        }
        Ok(version)
    }
}

/// For a bare library name, the file the dynamic loader actually picked.
fn resolved_path(path: &Path) -> PathBuf {
    #[cfg(target_os = "linux")]
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(line) = maps.lines().find(|l| l.contains(&name)) {
            if let Some(p) = line.split_whitespace().last() {
                return PathBuf::from(p);
            }
        }
    }
    path.to_path_buf()
}
