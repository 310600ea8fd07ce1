//! float32 `.npy` files (initial latents, per-step noise). Files are
//! untrusted: the file size is checked against `limits.max_file_bytes`, and
//! the shape in the header against the bytes actually present, before the
//! array is allocated, so a header that claims a terabyte over a 1 KB body is
//! an error, not an allocation. NaN and infinite values are refused here,
//! where they start, so the message names the file.

use std::path::Path;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use ndarray_npy::ViewNpyExt;

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::memory;
use crate::pipeline::job_spec::count_non_finite;

/// Reads a float32 (native byte order) `.npy` file within `limits`; every
/// value must be finite.
pub fn read_f32(path: &Path, limits: &Limits) -> Result<ArrayD<f32>> {
    let bytes = limits.read_file(path)?;
    // Checks the header's shape against the data length; views, allocates nothing.
    let view = ArrayViewD::<f32>::view_npy(&bytes)
        .map_err(|e| Error::invalid_file(format!("{}: not a float32 .npy: {e}", path.display())))?;
    let bad = count_non_finite(view.iter());
    if bad > 0 {
        return Err(Error::invalid_file(format!(
            "{}: {bad} of its {} values are NaN or infinite",
            path.display(),
            view.len()
        )));
    }
    let data = memory::collect(
        view.len(),
        view.iter().copied(),
        &path.display().to_string(),
    )?;
    Ok(ArrayD::from_shape_vec(IxDyn(view.shape()), data).expect("shape of the view"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    /// A version-1 .npy header for float32 `shape`, padded to 64 bytes as numpy does.
    fn header(shape: &str) -> Vec<u8> {
        let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        let pad = 64 - (10 + dict.len() + 1) % 64;
        let text = format!("{dict}{}\n", " ".repeat(pad));
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(text.len() as u16).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
        out
    }

    fn write(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("spo-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_an_honest_file() {
        let mut b = header("(2, 3)");
        for v in [1f32, 2.0, 3.0, 4.0, 5.0, -6.5] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let a = read_f32(&write("ok.npy", &b), &Limits::default()).unwrap();
        assert_eq!(a.shape(), &[2, 3]);
        assert_eq!(a[[1, 2]], -6.5);
        assert_eq!(a[[0, 1]], 2.0);
    }

    #[test]
    fn a_header_that_lies_about_its_shape_is_refused_without_allocating() {
        // (100000, 100000, 4, 8) float32 is 1.28 TB; the body is 1 KB. An
        // allocation of that size would abort the test process.
        let mut b = header("(100000, 100000, 4, 8)");
        b.extend_from_slice(&[0u8; 1024]);
        let e = read_f32(&write("lie.npy", &b), &Limits::default()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidFile);
        assert!(e.message.contains("lie.npy"), "{}", e.message);
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_unread() {
        let mut b = header("(4,)");
        b.extend_from_slice(&[0u8; 16]);
        let p = write("big.npy", &b);
        let limits = Limits {
            max_file_bytes: 32,
            ..Limits::default()
        };
        let e = read_f32(&p, &limits).unwrap_err();
        assert!(
            e.message
                .contains("exceeds the limit 32 (option limits.max_file_bytes)"),
            "{}",
            e.message
        );
    }
}
