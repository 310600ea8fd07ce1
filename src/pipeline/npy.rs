//! Float32 `.npy` arrays from outside (the CLI's `--init-latents` and
//! `--noise`). ndarray-npy sizes its header and data buffers from the header
//! before reading them, so a few bytes could ask for gigabytes; both sizes are
//! checked against the bytes actually there first.

use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::npy::header::Header;
use ndarray_npy::ReadNpyExt;

use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";
const F32_BYTES: usize = 4;

/// Reads a float32 `.npy` file.
pub fn read(path: &Path) -> Result<ArrayD<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, &path.display().to_string())
}

/// Parses a float32 `.npy` file's bytes; `what` names it in errors.
pub fn from_bytes(bytes: &[u8], what: &str) -> Result<ArrayD<f32>> {
    let bad =
        |e: &dyn std::fmt::Display| Error::invalid_file(format!("{what}: not a float32 .npy: {e}"));
    if let Some(len) = declared_header_len(bytes) {
        if len > bytes.len() {
            return Err(bad(&format!(
                "the header claims {len} bytes, the file has {}",
                bytes.len()
            )));
        }
    }
    let mut data = bytes;
    let header = Header::from_reader(&mut data).map_err(|e| bad(&e))?;
    let need = header
        .shape
        .iter()
        .try_fold(F32_BYTES, |n, &d| n.checked_mul(d));
    if need.is_none_or(|n| n > data.len()) {
        return Err(bad(&format!(
            "shape {:?} needs more than the {} data bytes the file has",
            header.shape,
            data.len()
        )));
    }
    ArrayD::<f32>::read_npy(bytes).map_err(|e| bad(&e))
}

/// The header length a file with the `.npy` magic states (a u16 in format
/// 1.0, a u32 after), or `None` when it is too short to say.
fn declared_header_len(bytes: &[u8]) -> Option<usize> {
    let rest = bytes.strip_prefix(MAGIC)?;
    match rest {
        [1, _, a, b, ..] => Some(usize::from(u16::from_le_bytes([*a, *b]))),
        [_, _, a, b, c, d, ..] => Some(u32::from_le_bytes([*a, *b, *c, *d]) as usize),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The npy fuzz target's find (trimmed): format 3.0 with a header length
    /// of 0xffffff76, on which ndarray-npy allocated 4 GB and aborted.
    #[test]
    fn huge_header_length_is_refused() {
        let mut f = b"\x93NUMPY\x03\x00\x76\xff\xff\xff".to_vec();
        f.extend_from_slice(&[0xff; 60]);
        let err = from_bytes(&f, "noise.npy").unwrap_err().to_string();
        assert!(
            err.contains("noise.npy") && err.contains("4294967158"),
            "{err}"
        );
    }

    /// A header that promises 2^30 floats over 8 data bytes.
    #[test]
    fn shape_larger_than_the_data_is_refused() {
        let mut f = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1073741824,), }";
        f.extend_from_slice(format!("{dict:<117}\n").as_bytes());
        assert_eq!(f.len(), 128);
        f.extend_from_slice(&[0; 8]);
        let err = from_bytes(&f, "latents.npy").unwrap_err().to_string();
        assert!(
            err.contains("latents.npy") && err.contains("1073741824"),
            "{err}"
        );
    }

    /// numpy's own bytes for `np.array([[1.5, -2.0]], dtype='<f4')`.
    #[test]
    fn numpy_file_reads() {
        let mut f = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }";
        f.extend_from_slice(format!("{dict:<117}\n").as_bytes());
        f.extend_from_slice(&[0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0]);
        let a = from_bytes(&f, "x.npy").unwrap();
        assert_eq!(a.shape(), &[1, 2]);
        assert_eq!(a.iter().copied().collect::<Vec<_>>(), vec![1.5, -2.0]);
    }
}
