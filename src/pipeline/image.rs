//! RGB8 images: conversion from and to the VAE's [-1, 1] NCHW tensors, and PNG
//! files. Conversions follow diffusers (`(x / 2 + 0.5).clamp(0, 1)`, then
//! `round(x * 255)`).

use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};

/// The longest side a PNG may have. The header alone sets the decode buffer's
/// size, so a few bytes could otherwise ask for tens of gigabytes; 8192 is four
/// times SDXL's native side and keeps the buffers under 500 MB.
pub const MAX_SIDE: u32 = 8192;

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
        Ok((0..b)
            .map(|n| {
                let mut rgb = vec![0u8; h * w * 3];
                for c in 0..3 {
                    let plane = &data[(n * 3 + c) * h * w..(n * 3 + c + 1) * h * w];
                    for (i, v) in plane.iter().enumerate() {
                        let unit = (v / 2.0 + 0.5).clamp(0.0, 1.0);
                        rgb[i * 3 + c] = (unit * 255.0).round() as u8;
                    }
                }
                Image {
                    width: w,
                    height: h,
                    rgb,
                }
            })
            .collect())
    }

    /// The VAE encoder input [1, 3, H, W] in [-1, 1] (diffusers' preprocessing:
    /// `x / 255 * 2 - 1`).
    pub fn to_tensor(&self) -> ArrayD<f32> {
        let (h, w) = (self.height, self.width);
        let mut out = vec![0f32; 3 * h * w];
        for i in 0..h * w {
            for c in 0..3 {
                out[c * h * w + i] = self.rgb[i * 3 + c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        ArrayD::from_shape_vec(IxDyn(&[1, 3, h, w]), out).expect("sizes match")
    }

    /// Reads an 8-bit PNG (RGB, RGBA, gray or gray+alpha; alpha is dropped).
    pub fn read_png(path: &Path) -> Result<Image> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Self::decode_png(std::io::BufReader::new(file), path)
    }

    /// [`read_png`](Self::read_png) on an open stream; `path` only names it in
    /// errors. Public for the fuzz targets.
    #[doc(hidden)]
    pub fn decode_png(stream: impl std::io::BufRead + std::io::Seek, path: &Path) -> Result<Image> {
        let bad = |e: &dyn std::fmt::Display| {
            Error::invalid_file(format!("{}: not a readable PNG: {e}", path.display()))
        };
        let mut decoder = png::Decoder::new(stream);
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().map_err(|e| bad(&e))?;
        let (w, h) = (reader.info().width, reader.info().height);
        if w.max(h) > MAX_SIDE {
            return Err(Error::invalid_file(format!(
                "{}: {w}x{h} pixels; images up to {MAX_SIDE} pixels a side are read",
                path.display()
            )));
        }
        let mut buf = vec![
            0;
            reader
                .output_buffer_size()
                .ok_or_else(|| bad(&"image too large"))?
        ];
        let info = reader.next_frame(&mut buf).map_err(|e| bad(&e))?;
        let (w, h) = (info.width as usize, info.height as usize);
        let px = &buf[..info.buffer_size()];
        let channels = info.color_type.samples();
        let mut rgb = Vec::with_capacity(w * h * 3);
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
            err.contains("in.png") && err.contains("100000x100000"),
            "{err}"
        );
        assert!(err.contains("8192"), "{err}");
    }

    #[test]
    fn longest_side_limit_is_inclusive() {
        let dir = std::env::temp_dir().join(format!("spo-image-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (w, ok) in [(8192usize, true), (8193, false)] {
            let path = dir.join(format!("{w}.png"));
            let img = Image {
                width: w,
                height: 1,
                rgb: vec![7; w * 3],
            };
            img.write_png(&path).unwrap();
            let read = Image::read_png(&path);
            assert_eq!(read.is_ok(), ok, "{w}: {read:?}");
            if ok {
                assert_eq!(read.unwrap(), img);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
