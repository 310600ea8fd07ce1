//! Upper bounds on what a request may ask for, checked before anything is
//! allocated, so hostile or mistyped input (a 100000-pixel side, a .npy header
//! that claims a terabyte, `/dev/zero` as a LoRA) gets an error that names the
//! value, the limit and the option that raises it, instead of an abort.
//!
//! The limits are runtime options (`limits.*`): a host sets them once on the
//! runtime, and every pipeline, job and trainer made from it inherits them.
//! This module is the one home of their names and defaults.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, ErrorCode, Result};
use crate::memory;
use crate::options::Options;

/// Option key: the largest width or height of a generated image, in pixels.
pub const MAX_SIDE: &str = "limits.max_side";
/// Option key: the most pixels (width x height) of one generated or read image.
pub const MAX_PIXELS: &str = "limits.max_pixels";
/// Option key: the most images one job makes (`num_images`).
pub const MAX_BATCH: &str = "limits.max_batch";
/// Option key: the most denoising steps of a job.
pub const MAX_STEPS: &str = "limits.max_steps";
/// Option key: the most 77-token windows a prompt may take (`long_prompt=chunks`).
pub const MAX_PROMPT_WINDOWS: &str = "limits.max_prompt_windows";
/// Option key: the longest prompt (or negative prompt), in bytes, checked
/// before tokenizing: CLIP's BPE takes time quadratic in the length of one
/// word, so a megabyte-long word would stall a job for many minutes (64 KiB
/// of one word takes about 6 s; 32 KiB measured 1.6 s).
pub const MAX_PROMPT_BYTES: &str = "limits.max_prompt_bytes";
/// Option key: the largest file read whole (LoRA, .npy, safetensors, prompts, PNG).
pub const MAX_FILE_BYTES: &str = "limits.max_file_bytes";
/// Option key: the most ONNX Runtime threads `threads.intra` may ask for.
pub const MAX_THREADS: &str = "limits.max_threads";

/// `limits.max_threads` itself may not go above this: ONNX Runtime takes an
/// `int`, and thousands of spinning threads only hang the machine.
pub const THREADS_CEILING: u64 = 4096;

/// The bounds in force. `Default` is generous for real use: SDXL at 2048² and
/// beyond (sides to 16384, 64 Mi pixels, e.g. 8192²), 64 images per job, 1000
/// steps, 64 prompt windows (4800 tokens), 64 KiB prompts, 8 GiB files (a rank-256 SDXL LoRA is
/// under 2 GiB), and 4 threads per core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_side: u64,
    pub max_pixels: u64,
    pub max_batch: u64,
    pub max_steps: u64,
    pub max_prompt_windows: u64,
    pub max_prompt_bytes: u64,
    pub max_file_bytes: u64,
    pub max_threads: u64,
}

impl Default for Limits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Limits {
            max_side: 16384,
            max_pixels: 64 << 20,
            max_batch: 64,
            max_steps: 1000,
            max_prompt_windows: 64,
            max_prompt_bytes: 64 << 10,
            max_file_bytes: 8 << 30,
            max_threads: (4 * cores).min(THREADS_CEILING),
        }
    }
}

/// The error of a value over its limit: "width 100000 exceeds the limit 16384
/// (option limits.max_side)".
pub fn exceeded(what: &str, value: impl std::fmt::Display, limit: u64, key: &str) -> Error {
    Error::new(
        ErrorCode::InvalidOptionValue,
        format!("{what} {value} exceeds the limit {limit} (option {key})"),
    )
}

/// Fails with [`exceeded`] when `value > limit`.
pub fn check(what: &str, value: u64, limit: u64, key: &str) -> Result<()> {
    if value > limit {
        Err(exceeded(what, value, limit, key))
    } else {
        Ok(())
    }
}

impl Limits {
    /// The defaults overridden by the `limits.*` keys of `o` (positive integers).
    pub fn from_options(o: &Options) -> Result<Limits> {
        let mut l = Limits::default();
        for (key, slot) in [
            (MAX_SIDE, &mut l.max_side),
            (MAX_PIXELS, &mut l.max_pixels),
            (MAX_BATCH, &mut l.max_batch),
            (MAX_STEPS, &mut l.max_steps),
            (MAX_PROMPT_WINDOWS, &mut l.max_prompt_windows),
            (MAX_PROMPT_BYTES, &mut l.max_prompt_bytes),
            (MAX_FILE_BYTES, &mut l.max_file_bytes),
            (MAX_THREADS, &mut l.max_threads),
        ] {
            if let Some(v) = o.parse(key, "a positive integer", |v| {
                v.trim().parse::<u64>().ok().filter(|n| *n > 0)
            })? {
                *slot = v;
            }
        }
        if l.max_threads > THREADS_CEILING {
            return Err(Error::new(
                ErrorCode::InvalidOptionValue,
                format!(
                    "option '{MAX_THREADS}': {} is above {THREADS_CEILING}, the most this library allows",
                    l.max_threads
                ),
            ));
        }
        Ok(l)
    }

    /// Checks an image size `w` x `h` (either side, then the pixel count);
    /// `prefix` says whose size it is ("" for a job, "x.png: " for a file).
    pub fn check_size(&self, prefix: &str, w: u64, h: u64) -> Result<()> {
        check(&format!("{prefix}width"), w, self.max_side, MAX_SIDE)?;
        check(&format!("{prefix}height"), h, self.max_side, MAX_SIDE)?;
        let px = w.saturating_mul(h);
        if px > self.max_pixels {
            return Err(exceeded(
                &format!("{prefix}size {w}x{h} ="),
                format!("{px} pixels"),
                self.max_pixels,
                MAX_PIXELS,
            ));
        }
        Ok(())
    }

    /// Checks `threads.intra` (0 means ONNX Runtime's default, one per core).
    pub fn check_threads(&self, n: u64) -> Result<()> {
        check("threads.intra", n, self.max_threads, MAX_THREADS)
    }

    /// Checks a file's size before it is read whole: it must be a regular file
    /// (a device such as /dev/zero never ends) of at most `max_file_bytes`.
    pub fn check_file(&self, path: &Path) -> Result<u64> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::invalid_file(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        let what = format!("{}: size", path.display());
        check(&what, meta.len(), self.max_file_bytes, MAX_FILE_BYTES)?;
        Ok(meta.len())
    }

    /// Reads a whole file after [`Limits::check_file`], into a buffer
    /// allocated fallibly; reads no more than the size checked (a file growing
    /// meanwhile is cut there).
    pub fn read_file(&self, path: &Path) -> Result<Vec<u8>> {
        let len = self.check_file(path)?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut buf = memory::with_capacity::<u8>(len as usize, &path.display().to_string())?;
        file.take(len)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(path, e))?;
        Ok(buf)
    }

    /// [`Limits::read_file`] as UTF-8 text.
    pub fn read_text(&self, path: &Path) -> Result<String> {
        String::from_utf8(self.read_file(path)?)
            .map_err(|e| Error::invalid_file(format!("{}: not UTF-8 text: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(pairs: &[(&str, &str)]) -> Result<Limits> {
        Limits::from_options(&Options::from_pairs(pairs.iter().copied())?)
    }

    #[test]
    fn defaults_allow_real_sizes() {
        let l = Limits::default();
        l.check_size("", 2048, 2048).unwrap();
        l.check_size("", 8192, 8192).unwrap();
        l.check_size("", 16384, 4096).unwrap();
        assert!(l.max_threads >= 4);
    }

    #[test]
    fn side_refusal_names_value_limit_and_option() {
        let e = Limits::default().check_size("", 100000, 512).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidOptionValue);
        assert_eq!(
            e.message,
            "width 100000 exceeds the limit 16384 (option limits.max_side)"
        );
    }

    #[test]
    fn pixel_limit_counts_both_sides() {
        let l = limits(&[(MAX_PIXELS, "1000000")]).unwrap();
        l.check_size("x.png: ", 1000, 1000).unwrap();
        let e = l.check_size("x.png: ", 1000, 1008).unwrap_err();
        assert!(
            e.message.contains("1008000 pixels")
                && e.message.contains("1000000")
                && e.message.contains(MAX_PIXELS),
            "{}",
            e.message
        );
    }

    #[test]
    fn options_override_and_are_checked() {
        let l = limits(&[(MAX_SIDE, "64"), (MAX_THREADS, "3")]).unwrap();
        assert_eq!((l.max_side, l.max_threads), (64, 3));
        assert_eq!(l.max_batch, Limits::default().max_batch);
        let e = limits(&[(MAX_SIDE, "0")]).unwrap_err();
        assert!(e.message.contains(MAX_SIDE) && e.message.contains("'0'"));
        let e = limits(&[(MAX_THREADS, "99999999999999")]).unwrap_err();
        assert!(e.message.contains("99999999999999") && e.message.contains("4096"));
    }

    #[test]
    fn threads_above_the_limit_are_refused() {
        let l = limits(&[(MAX_THREADS, "8")]).unwrap();
        l.check_threads(0).unwrap();
        l.check_threads(8).unwrap();
        let e = l.check_threads(9).unwrap_err();
        assert_eq!(
            e.message,
            "threads.intra 9 exceeds the limit 8 (option limits.max_threads)"
        );
        let e = Limits::default()
            .check_threads(99_999_999_999_999)
            .unwrap_err();
        assert!(e.message.contains("99999999999999"), "{}", e.message);
    }

    #[test]
    fn files_over_the_limit_or_not_regular_are_refused_unread() {
        let dir = std::env::temp_dir().join(format!("spo-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("ten.txt");
        std::fs::write(&f, b"0123456789").unwrap();
        let l = limits(&[(MAX_FILE_BYTES, "10")]).unwrap();
        assert_eq!(l.read_file(&f).unwrap(), b"0123456789");
        let l = limits(&[(MAX_FILE_BYTES, "9")]).unwrap();
        let e = l.read_file(&f).unwrap_err();
        assert!(
            e.message
                .contains("size 10 exceeds the limit 9 (option limits.max_file_bytes)"),
            "{}",
            e.message
        );
        let e = Limits::default()
            .read_file(Path::new("/dev/zero"))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidFile);
        assert!(e.message.contains("/dev/zero: not a regular file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
