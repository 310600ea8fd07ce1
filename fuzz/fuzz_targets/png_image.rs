//! Any byte string given as an init image (`init_image`) must decode into a
//! tightly packed RGB8 image or give an Error, never a panic.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spo_runtime::pipeline::image::Image;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = Image::decode_png(Cursor::new(data), Path::new("fuzz.png")) {
        assert_eq!(img.rgb.len(), img.width * img.height * 3);
        if img.rgb.len() <= 1 << 20 {
            let t = img.to_tensor().expect("a small image converts");
            assert_eq!(t.shape(), &[1, 3, img.height, img.width]);
        }
    }
});
