//! float32 `.npy` files (initial latents, per-step noise). Files are
//! untrusted: the file size is checked against `limits.max_file_bytes`, and
//! the shape in the header against the bytes actually present, before the
//! array is allocated, so a header that claims a terabyte over a 1 KB body is
//! an error, not an allocation. ndarray-npy also sizes its header buffer from
//! the header's stated length, so that length is checked against the bytes
//! there first (the npy fuzz target's find: a stated 0xffffff76 allocated 4 GB
//! and aborted). NaN and infinite values are refused here, where they start,
//! so the message names the file.
//!
//! The header is a Python literal that ndarray-npy parses with a backtracking
//! grammar: nested unclosed brackets take exponential time (the fuzz target's
//! second find: 128 bytes took 3.3 s, a few more would never end). A float32
//! array's header nests two levels (`{... (1, 4, 8, 8)}`), so headers that
//! nest deeper than [`MAX_HEADER_DEPTH`] or do not balance are refused first.
//! ndarray-npy also panics on a shape with a zero axis whose other axes
//! overflow (`(0, 375952003759528102, 32)`: no bytes needed, yet no valid
//! array), so the shape's size is checked here too.

use std::path::Path;

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use ndarray_npy::ViewNpyExt;

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::memory;
use crate::pipeline::job_spec::count_non_finite;

const MAGIC: &[u8] = b"\x93NUMPY";
/// Bracket nesting allowed in a header: the dict, the shape tuple, and one
/// level to spare (a structured dtype's list, refused later by name).
const MAX_HEADER_DEPTH: usize = 3;

/// Reads a float32 (native byte order) `.npy` file within `limits`; every
/// value must be finite.
pub fn read_f32(path: &Path, limits: &Limits) -> Result<ArrayD<f32>> {
    let bytes = limits.read_file(path)?;
    parse_f32(&bytes, &path.display().to_string())
}

/// Parses a float32 `.npy` file's bytes (every value finite); `what` names
/// it in errors. Public for the fuzz target.
pub fn parse_f32(bytes: &[u8], what: &str) -> Result<ArrayD<f32>> {
    let bad =
        |e: &dyn std::fmt::Display| Error::invalid_file(format!("{what}: not a float32 .npy: {e}"));
    if let Some((start, len)) = declared_header(bytes) {
        let Some(header) = start.checked_add(len).and_then(|end| bytes.get(start..end)) else {
            return Err(bad(&format!(
                "the header claims {len} bytes, the file has {}",
                bytes.len()
            )));
        };
        check_nesting(header).map_err(|e| bad(&e))?;
        check_shape_size(header).map_err(|e| bad(&e))?;
    }
    // Checks the header's shape against the data length; views, allocates nothing.
    let view = ArrayViewD::<f32>::view_npy(bytes).map_err(|e| bad(&e))?;
    let non_finite = count_non_finite(view.iter());
    if non_finite > 0 {
        return Err(Error::invalid_file(format!(
            "{what}: {non_finite} of its {} values are NaN or infinite",
            view.len()
        )));
    }
    let data = memory::collect(view.len(), view.iter().copied(), what)?;
    Ok(ArrayD::from_shape_vec(IxDyn(view.shape()), data).expect("shape of the view"))
}

/// Where the header of a file with the `.npy` magic starts and the length
/// it states (a u16 in format 1.0, a u32 after), or `None` when the file is
/// too short to say.
fn declared_header(bytes: &[u8]) -> Option<(usize, usize)> {
    let rest = bytes.strip_prefix(MAGIC)?;
    match rest {
        [1, _, a, b, ..] => Some((MAGIC.len() + 4, usize::from(u16::from_le_bytes([*a, *b])))),
        [_, _, a, b, c, d, ..] => Some((
            MAGIC.len() + 6,
            u32::from_le_bytes([*a, *b, *c, *d]) as usize,
        )),
        _ => None,
    }
}

/// Refuses a shape whose axes other than the zero-length ones multiply past
/// `isize::MAX` bytes of f32 (ndarray's own bound), which ndarray-npy would
/// turn into a panic. Every `shape` key (either quote style, duplicates too)
/// is checked, and its axes must be plain decimal integers, as numpy writes
/// them: the other Python spellings (`0x..`, `1_000`) are refused rather than
/// left unchecked.
fn check_shape_size(header: &[u8]) -> std::result::Result<(), String> {
    // Read as Latin-1 (format 1.0's encoding; ASCII-compatible with UTF-8):
    // every header is checked, whatever its bytes.
    let text: String = header.iter().map(|&b| char::from(b)).collect();
    for (at, _) in text.match_indices("shape") {
        let Some((_, rest)) = text[at..].split_once('(') else {
            continue;
        };
        let Some((axes, _)) = rest.split_once(')') else {
            continue;
        };
        shape_bytes(axes)?;
    }
    Ok(())
}

/// Bytes of f32 that a shape tuple's non-zero axes need, within isize::MAX.
fn shape_bytes(axes: &str) -> std::result::Result<usize, String> {
    let too_large = || format!("the shape ({}) is too large", axes.trim());
    let mut bytes = std::mem::size_of::<f32>();
    for axis in axes.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let digits = axis.strip_prefix('+').unwrap_or(axis);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("shape axis '{axis}' is not a decimal integer"));
        }
        let n: usize = digits.parse().map_err(|_| too_large())?;
        if n > 0 {
            bytes = bytes
                .checked_mul(n)
                .filter(|b| *b <= isize::MAX as usize)
                .ok_or_else(too_large)?;
        }
    }
    Ok(bytes)
}

/// Refuses a header whose brackets nest deeper than [`MAX_HEADER_DEPTH`] or
/// do not balance (brackets inside quoted strings do not count).
fn check_nesting(header: &[u8]) -> std::result::Result<(), String> {
    let (mut depth, mut quote) = (0usize, None);
    for &c in header {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'\'' | b'"') => quote = Some(c),
            (None, b'(' | b'[' | b'{') => {
                depth += 1;
                if depth > MAX_HEADER_DEPTH {
                    return Err(format!(
                        "the header nests brackets more than {MAX_HEADER_DEPTH} deep"
                    ));
                }
            }
            (None, b')' | b']' | b'}') => {
                depth = depth
                    .checked_sub(1)
                    .ok_or("the header closes a bracket it never opened")?;
            }
            _ => {}
        }
    }
    match (depth, quote) {
        (0, None) => Ok(()),
        _ => Err("the header leaves a bracket or a quote open".to_owned()),
    }
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

    /// The npy fuzz target's find (trimmed): format 3.0 with a header length
    /// of 0xffffff76, on which ndarray-npy allocated 4 GB and aborted.
    #[test]
    fn huge_header_length_is_refused() {
        let mut f = b"\x93NUMPY\x03\x00\x76\xff\xff\xff".to_vec();
        f.extend_from_slice(&[0xff; 60]);
        let err = parse_f32(&f, "noise.npy").unwrap_err().to_string();
        assert!(
            err.contains("noise.npy") && err.contains("4294967158"),
            "{err}"
        );
    }

    /// The npy fuzz target's 128-byte hang: unclosed brackets nested 13 deep
    /// sent ndarray-npy's header grammar into exponential backtracking (3.3 s
    /// for this file). It is refused before that parser sees it.
    #[test]
    fn deeply_nested_header_is_refused_before_parsing() {
        let f = [
            &b"\x93NUMPY\x01\x00v\x00"[..],
            &b"{(0,            [  (1, (0,      [  (1, ("[..],
            &b" [  (1, (5,      [  (1, (5,           [ "[..],
            &b" (1, (1, (5,  \x00\x00\x00\x00\x00\x00\x00\x00, )   (   (   \"\x0a"[..],
        ]
        .concat();
        let err = parse_f32(&f, "deep.npy").unwrap_err().to_string();
        assert!(
            err.contains("deep.npy") && err.contains("more than 3 deep"),
            "{err}"
        );
        // Balanced but four deep, and balanced with an unclosed quote.
        for (shape, why) in [("((((1,),),),)", "more than 3 deep"), ("(1, 2)'", "open")] {
            let err = parse_f32(&header(shape), "x.npy").unwrap_err().to_string();
            assert!(err.contains(why), "{shape}: {err}");
        }
        // Brackets inside a quoted string do not count.
        assert!(check_nesting(b"{'descr': '<f4((((((', 'shape': (1,), }").is_ok());
        assert!(check_nesting(b"{'shape': (1,)}}").is_err());
    }

    /// The npy fuzz target's panic: a zero axis makes the data length 0, and
    /// the other axes overflow ndarray's size bound.
    #[test]
    fn zero_axis_with_overflowing_axes_is_refused() {
        for shape in ["(0, 375952003759528102, 32)", "(0,+375952003759528102, 32)"] {
            let err = parse_f32(&header(shape), "z.npy").unwrap_err().to_string();
            assert!(err.contains("z.npy") && err.contains("too large"), "{err}");
        }
        assert_eq!(
            parse_f32(&header("(0, 4, 8)"), "e.npy").unwrap().shape(),
            [0, 4, 8]
        );
    }

    /// numpy's own bytes for `np.array([[1.5, -2.0]], dtype='<f4')`.
    #[test]
    fn numpy_file_reads() {
        let mut f = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }";
        f.extend_from_slice(format!("{dict:<117}\n").as_bytes());
        f.extend_from_slice(&[0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0]);
        let a = parse_f32(&f, "x.npy").unwrap();
        assert_eq!(a.shape(), &[1, 2]);
        assert_eq!(a.iter().copied().collect::<Vec<_>>(), vec![1.5, -2.0]);
    }

    #[test]
    fn non_finite_values_are_refused() {
        let mut b = header("(2,)");
        b.extend_from_slice(&1f32.to_le_bytes());
        b.extend_from_slice(&f32::NAN.to_le_bytes());
        let e = parse_f32(&b, "nan.npy").unwrap_err();
        assert!(
            e.message.contains("nan.npy: 1 of its 2 values"),
            "{}",
            e.message
        );
    }
}
