//! Any byte string given to the LoRA parser must yield a LoraFile or an Error,
//! never a panic, and parsed modules must survive shape checks and the merge math.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spo_runtime::lora::WeightLayout;
use spo_runtime::lora::{format::LoraKind, merge, resolve::check_shape, LoraFile};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = LoraFile::from_bytes(data, Path::new("fuzz.safetensors"), None) else {
        return;
    };
    for m in file.modules.values() {
        // A plausible target shape from the module itself, kept small.
        let shape = match &m.kind {
            LoraKind::Lora { down, up, .. } => {
                let mut s = vec![up.shape[0], down.shape.get(1).copied().unwrap_or(1)];
                s.extend(down.shape.iter().skip(2));
                s
            }
            LoraKind::LoHa { w1a, w1b, .. } => vec![w1a.shape[0], w1b.rows_cols().1],
            LoraKind::LoKr { .. } => vec![4, 4],
        };
        if shape.iter().product::<usize>() > 1 << 16 || shape.contains(&0) {
            continue;
        }
        if check_shape(m, &shape).is_ok() {
            let mut w = vec![0.5f32; shape.iter().product()];
            let layout = if shape.len() == 4 {
                WeightLayout::ConvOIHW
            } else {
                WeightLayout::LinearOutIn
            };
            let _ = merge::merge_into(&mut w, &shape, layout, m, 1.0);
        }
    }
});
