//! RGB8 images: conversion from and to the VAE's [-1, 1] NCHW tensors, and PNG
//! files. Conversions follow diffusers (`(x / 2 + 0.5).clamp(0, 1)`, then
//! `round(x * 255)`).

use std::fs::File;
use std::io::{BufRead, BufReader, Seek};
use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::memory;

/// A tightly packed RGB8 image (stride = 3 * width).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    pub fn stride(&self) -> usize {
        self.width * 3
    }

    /// Images from a decoded batch [B, 3, H, W] in [-1, 1].
    pub fn from_decoded(x: &ArrayD<f32>) -> Result<Vec<Image>> {
        let s = x.shape();
        if s.len() != 4 || s[1] != 3 {
            return Err(Error::invalid_model(format!(
                "vae_decoder output has shape {s:?}, expected [B,3,H,W]"
            )));
        }
        let (b, h, w) = (s[0], s[2], s[3]);
        let x = x.as_standard_layout();
        let data = x.as_slice().expect("standard layout");
        let mut out = memory::with_capacity(b, "the images")?;
        for n in 0..b {
            let mut rgb = memory::filled(h * w * 3, 0u8, "an image")?;
            for c in 0..3 {
                let plane = &data[(n * 3 + c) * h * w..(n * 3 + c + 1) * h * w];
                for (i, v) in plane.iter().enumerate() {
                    let unit = (v / 2.0 + 0.5).clamp(0.0, 1.0);
                    rgb[i * 3 + c] = (unit * 255.0).round() as u8;
                }
            }
            out.push(Image {
                width: w,
                height: h,
                rgb,
            });
        }
        Ok(out)
    }

    /// The VAE encoder input [1, 3, H, W] in [-1, 1] (diffusers' preprocessing:
    /// `x / 255 * 2 - 1`).
    pub fn to_tensor(&self) -> Result<ArrayD<f32>> {
        let (h, w) = (self.height, self.width);
        let mut out = memory::filled(3 * h * w, 0f32, "the image tensor")?;
        for i in 0..h * w {
            for c in 0..3 {
                out[c * h * w + i] = self.rgb[i * 3 + c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        Ok(ArrayD::from_shape_vec(IxDyn(&[1, 3, h, w]), out).expect("sizes match"))
    }

    /// Reads an 8-bit PNG (RGB, RGBA, gray or gray+alpha; alpha is dropped)
    /// within the default [`Limits`].
    pub fn read_png(path: &Path) -> Result<Image> {
        Self::read_png_limited(path, &Limits::default(), None)
    }

    /// Checks a PNG's size from its header alone, without decoding: against
    /// `limits`, and against `expect` (width, height), the size of the job
    /// that will use it.
    pub fn check_png(path: &Path, limits: &Limits, expect: (usize, usize)) -> Result<()> {
        open_png(path, limits, Some(expect)).map(|_| ())
    }

    /// Reads a PNG whose header passes [`Image::check_png`] (when `expect` is
    /// given) and `limits`; the pixel buffers are allocated fallibly.
    pub fn read_png_limited(
        path: &Path,
        limits: &Limits,
        expect: Option<(usize, usize)>,
    ) -> Result<Image> {
        decode(open_png(path, limits, expect)?, path)
    }

    /// [`read_png`](Self::read_png) on an open stream, within the default
    /// [`Limits`]; `path` only names it in errors. Public for the fuzz target.
    #[doc(hidden)]
    pub fn decode_png(stream: impl BufRead + Seek, path: &Path) -> Result<Image> {
        decode(png_header(stream, path, &Limits::default(), None)?, path)
    }

    /// Writes the image as an RGB8 PNG.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut enc = png::Encoder::new(
            std::io::BufWriter::new(file),
            self.width as u32,
            self.height as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| Error::io(path, std::io::Error::other(e));
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(&self.rgb).map_err(err)?;
        w.finish().map_err(err)
    }
}

/// Opens a PNG file and reads its header; its size is checked against
/// `limits` and `expect` before a pixel is decoded.
fn open_png(
    path: &Path,
    limits: &Limits,
    expect: Option<(usize, usize)>,
) -> Result<png::Reader<BufReader<File>>> {
    limits.check_file(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    png_header(BufReader::new(file), path, limits, expect)
}

/// Reads a PNG header from `stream` and checks its size.
fn png_header<R: BufRead + Seek>(
    stream: R,
    path: &Path,
    limits: &Limits,
    expect: Option<(usize, usize)>,
) -> Result<png::Reader<R>> {
    let mut decoder = png::Decoder::new(stream);
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let reader = decoder
        .read_info()
        .map_err(|e| Error::invalid_file(format!("{}: not a readable PNG: {e}", path.display())))?;
    let (w, h) = (reader.info().width, reader.info().height);
    limits.check_size(&format!("{}: ", path.display()), w as u64, h as u64)?;
    if let Some((ew, eh)) = expect {
        if (w as usize, h as usize) != (ew, eh) {
            return Err(Error::invalid_argument(format!(
                "init image {} is {w}x{h}; the job is {ew}x{eh}",
                path.display()
            )));
        }
    }
    Ok(reader)
}
/// Decodes the pixels of a PNG whose header was checked, into RGB8.
fn decode<R: BufRead + Seek>(mut reader: png::Reader<R>, path: &Path) -> Result<Image> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::invalid_file(format!("{}: not a readable PNG: {e}", path.display()))
    };
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad(&"image too large"))?;
    let mut buf = memory::filled(size, 0u8, &format!("PNG {}", path.display()))?;
    let info = reader.next_frame(&mut buf).map_err(|e| bad(&e))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let px = &buf[..info.buffer_size()];
    let channels = info.color_type.samples();
    let mut rgb = memory::with_capacity(w * h * 3, &format!("image {}", path.display()))?;
    for p in px.chunks_exact(channels) {
        match channels {
            1 | 2 => rgb.extend_from_slice(&[p[0], p[0], p[0]]),
            _ => rgb.extend_from_slice(&p[..3]),
        }
    }
    Ok(Image {
        width: w,
        height: h,
        rgb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1x1 RGB PNG whose IHDR was rewritten (CRC fixed) to claim
    /// 100000x100000 pixels: the png_image fuzz target's find, which made the
    /// reader allocate a 30 GB buffer and abort.
    const HUGE_HEADER: [u8; 69] = [
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x01, 0x86, 0xa0, 0x00, 0x01, 0x86, 0xa0, 0x08, 0x02, 0x00, 0x00, 0x00, 0x27,
        0x30, 0x9c, 0x9f, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60,
        0x60, 0x60, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01, 0xf6, 0x17, 0x38, 0x55, 0x00, 0x00, 0x00,
        0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];

    #[test]
    fn huge_header_is_refused_before_allocating() {
        let err = Image::decode_png(std::io::Cursor::new(&HUGE_HEADER[..]), Path::new("in.png"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("in.png: width 100000") && err.contains("limits.max_side"),
            "{err}"
        );
    }

    #[test]
    fn longest_side_limit_is_inclusive() {
        let dir = std::env::temp_dir().join(format!("spo-image-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let limits = Limits {
            max_side: 64,
            ..Limits::default()
        };
        for (w, ok) in [(64usize, true), (65, false)] {
            let path = dir.join(format!("{w}.png"));
            let img = Image {
                width: w,
                height: 1,
                rgb: vec![7; w * 3],
            };
            img.write_png(&path).unwrap();
            let read = Image::read_png_limited(&path, &limits, None);
            assert_eq!(read.is_ok(), ok, "{w}: {read:?}");
            if ok {
                assert_eq!(read.unwrap(), img);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
