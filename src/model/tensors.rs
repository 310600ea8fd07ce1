//! Named float32 tensors in safetensors files: the input and output format of
//! `spo grad`, the trainer's checkpoints and written LoRA files. Files are untrusted: the size
//! is checked before reading, the header by the safetensors crate, and every
//! tensor must be float32.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::memory;

/// Named tensors, sorted by name.
pub type NamedTensors = BTreeMap<String, ArrayD<f32>>;

/// Reads every tensor of a safetensors file as f32.
pub fn read(path: &Path) -> Result<NamedTensors> {
    from_bytes(&read_bytes(path)?, &path.display().to_string())
}

/// A safetensors file's bytes, refused unread when it is not a regular file
/// or is over the default `limits.max_file_bytes`.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    Limits::default().read_file(path)
}

/// Parses an in-memory safetensors file; `what` names it in messages.
pub fn from_bytes(bytes: &[u8], what: &str) -> Result<NamedTensors> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::invalid_file(format!("{what}: invalid safetensors file: {e}")))?;
    let mut out = NamedTensors::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::invalid_file(format!(
                "{what}: tensor '{name}' is {:?}; float32 is expected",
                view.dtype()
            )));
        }
        let bytes = view.data();
        let data = memory::collect(
            bytes.len() / 4,
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            &format!("{what}: tensor '{name}'"),
        )?;
        let a = ArrayD::from_shape_vec(IxDyn(view.shape()), data)
            .map_err(|e| Error::invalid_file(format!("{what}: tensor '{name}': {e}")))?;
        out.insert(name, a);
    }
    Ok(out)
}

/// Writes `tensors` as float32, atomically (a temporary file renamed into place).
pub fn write(path: &Path, tensors: &NamedTensors) -> Result<()> {
    write_with_metadata(path, tensors, None)
}

/// [`write`], with the safetensors header's `__metadata__` strings. Atomic:
/// the bytes go to a temporary file beside `path`, are synced to disk, and
/// the file is renamed over `path` (then the folder is synced), so a crash
/// leaves the old file or the new one, never a torn one.
pub fn write_with_metadata(
    path: &Path,
    tensors: &NamedTensors,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let bytes = to_bytes(tensors, metadata)?;
    write_atomic(path, &bytes)
}

/// A safetensors file of `tensors`, in memory.
pub fn to_bytes(
    tensors: &NamedTensors,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, a)| {
            let b = a.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.clone(), b, a.shape().to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, s)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::invalid_argument(format!("tensor '{k}': {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::invalid_argument(format!("cannot serialise tensors: {e}")))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync
/// of the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid_argument(format!("{}: not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Checks that `tensors` holds exactly `expected` (name, shape): a missing
/// key, an extra key and a wrong shape are errors that name the key and both
/// shapes. `what` names the file in messages.
pub fn check_exact(
    what: &str,
    tensors: &NamedTensors,
    expected: &[(&str, &[usize])],
) -> Result<()> {
    for (name, shape) in expected {
        match tensors.get(*name) {
            None => {
                return Err(Error::invalid_argument(format!(
                    "{what}: missing tensor '{name}' (expected shape {shape:?})"
                )))
            }
            Some(a) if a.shape() != *shape => {
                return Err(Error::invalid_argument(format!(
                    "{what}: tensor '{name}' has shape {:?}, expected {shape:?}",
                    a.shape()
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = tensors
        .keys()
        .find(|k| !expected.iter().any(|(n, _)| n == k))
    {
        return Err(Error::invalid_argument(format!(
            "{what}: unexpected tensor '{extra}' {:?} (not an input of these training graphs)",
            tensors[extra].shape()
        )));
    }
    Ok(())
}
