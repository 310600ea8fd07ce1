//! LoRA merge throughput on the real-size SDXL UNet attention projections.
//!
//!   cargo run --release --example bench_lora_merge -- [--structure PATH] [--rank R] [--repeats N]
//!
//! Builds, in memory, an SPO-sized LoRA (rank 64, alpha 64 by default) on the
//! 560 attention projections (`to_q`, `to_k`, `to_v`, `to_out.0` of `attn1` /
//! `attn2`) with the shapes of `tests/fixtures/lora-unit/sdxl_structure.json`,
//! and random base weights stored as MatMul weights `[in, out]`
//! (`WeightLayout::LinearInOut`). All values come from a fixed-seed PRNG.
//!
//! Times, in one process:
//! * a single-thread sgemm peak probe: ndarray `dot` of 2048×2048 · 2048×2048 (f32);
//! * the merge alone: all 560 `merge::merge_into` calls (f32);
//! * `merge::delta` alone (the GEMMs, no add) for the same modules;
//! * `merge::to_f16_clamped` over all merged weights.

use std::path::PathBuf;
use std::time::Instant;

use ndarray::Array2;
use spo_runtime::lora::merge;
use spo_runtime::lora::{LoraKind, LoraModule, Tensor};
use spo_runtime::model::WeightLayout;

/// splitmix64, uniform f32 in [-scale, scale).
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32; // [0,1)
                (2.0 * u - 1.0) * scale
            })
            .collect()
    }
}

fn main() {
    let mut structure = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lora-unit/sdxl_structure.json");
    let mut rank = 64usize;
    let mut repeats = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--structure" => structure = PathBuf::from(args.next().expect("--structure PATH")),
            "--rank" => rank = args.next().expect("--rank R").parse().expect("rank"),
            "--repeats" => repeats = args.next().expect("--repeats N").parse().expect("repeats"),
            other => panic!("unknown argument {other}"),
        }
    }

    // ---- sgemm peak probe (single thread: matrixmultiply is built without threading) ----
    let n = 2048usize;
    let mut rng = Rng(0x5EED_0001);
    let a = Array2::from_shape_vec((n, n), rng.fill(n * n, 1.0)).unwrap();
    let b = Array2::from_shape_vec((n, n), rng.fill(n * n, 1.0)).unwrap();
    let gemm_flop = 2.0 * (n as f64).powi(3);
    let mut best_gemm = f64::INFINITY;
    let mut sink = 0.0f32;
    for _ in 0..3 {
        let t = Instant::now();
        let c = a.dot(&b);
        best_gemm = best_gemm.min(t.elapsed().as_secs_f64());
        sink += c[[0, 0]];
    }
    drop((a, b));
    let peak1 = gemm_flop / best_gemm / 1e9;
    println!(
        "sgemm_probe n={n} best_s={best_gemm:.4} gflops_1core={peak1:.2} est_peak_2core_gflops={:.2}",
        2.0 * peak1
    );

    // ---- structure ----
    let text = std::fs::read_to_string(&structure).expect("read structure json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("parse structure json");
    let names: Vec<String> = json["spo_560"]["modules"]
        .as_array()
        .expect("spo_560.modules")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mods = &json["unet"]["modules"];
    let shapes: Vec<(usize, usize)> = names
        .iter()
        .map(|m| {
            let s = mods[m]["shape"].as_array().expect("shape");
            assert_eq!(s.len(), 2, "{m} is not a Linear");
            (
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(names.len(), 560, "expected 560 attention projections");

    // ---- build LoRA + base weights ----
    let t_build = Instant::now();
    let mut rng = Rng(0x5EED_0002);
    let mut loras = Vec::with_capacity(names.len());
    let mut weights: Vec<Vec<f32>> = Vec::with_capacity(names.len());
    let mut stored: Vec<[usize; 2]> = Vec::with_capacity(names.len());
    let (mut params, mut lora_params) = (0usize, 0usize);
    let mut flop = 0f64;
    let mut flop_gemm = 0f64;
    for &(out, inn) in &shapes {
        let down = Tensor::new(vec![rank, inn], rng.fill(rank * inn, 0.05));
        let up = Tensor::new(vec![out, rank], rng.fill(out * rank, 0.05));
        lora_params += rank * (inn + out);
        loras.push(LoraModule {
            kind: LoraKind::Lora {
                down,
                up,
                mid: None,
            },
            alpha: Some(rank as f32),
            rank: Some(rank),
            dora_scale: None,
        });
        weights.push(rng.fill(inn * out, 0.05));
        stored.push([inn, out]); // LinearInOut: [in, out]
        params += inn * out;
        flop_gemm += 2.0 * (out * inn * rank) as f64;
        flop += 2.0 * (out * inn * rank) as f64 + 2.0 * (out * inn) as f64; // up·down + scaled add
    }
    println!(
        "built modules={} rank={rank} base_params={params} ({:.3} GiB f32) lora_params={lora_params} build_s={:.2}",
        names.len(),
        params as f64 * 4.0 / (1u64 << 30) as f64,
        t_build.elapsed().as_secs_f64()
    );
    println!(
        "flop_total={:.4e} (gemm {:.4e} + add {:.4e})",
        flop,
        flop_gemm,
        flop - flop_gemm
    );

    // ---- delta alone (GEMM only) ----
    let mut best_delta = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        for (m, &(out, inn)) in loras.iter().zip(&shapes) {
            let d = merge::delta(m, &[out, inn]).unwrap();
            sink += d[[0, 0]];
        }
        best_delta = best_delta.min(t.elapsed().as_secs_f64());
    }
    println!(
        "delta_only best_s={best_delta:.3} gflops={:.2}",
        flop_gemm / best_delta / 1e9
    );

    // ---- merge (all 560 merge_into calls), repeated; each repeat adds on top ----
    let mut times = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        for ((w, s), m) in weights.iter_mut().zip(&stored).zip(&loras) {
            merge::merge_into(w, s, WeightLayout::LinearInOut, m, 1.0).unwrap();
        }
        times.push(t.elapsed().as_secs_f64());
    }
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "merge_into calls={} runs_s={:?} best_s={best:.3} mean_s={mean:.3} gflops_best={:.2} pct_of_1core_peak={:.1} pct_of_2core_peak={:.1}",
        names.len(),
        times.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>(),
        flop / best / 1e9,
        100.0 * flop / best / 1e9 / peak1,
        100.0 * flop / best / 1e9 / (2.0 * peak1)
    );

    // ---- f16 cast with clamping ----
    let mut f16_times = Vec::new();
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let mut total = 0usize;
        for w in &weights {
            let h = merge::to_f16_clamped(w);
            total += h.len();
            sink += h[0].to_f32();
        }
        f16_times.push(t.elapsed().as_secs_f64());
        assert_eq!(total, params);
    }
    let bestc = f16_times.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "to_f16_clamped values={params} runs_s={:?} best_s={bestc:.3} gvalues_per_s={:.3} gb_per_s_rw={:.2}",
        f16_times.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>(),
        params as f64 / bestc / 1e9,
        params as f64 * 6.0 / bestc / 1e9
    );
    println!("sink={sink}");
}
