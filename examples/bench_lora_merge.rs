//! LoRA merge throughput on the real-size SDXL UNet attention projections.
//!
//!   cargo run --release --example bench_lora_merge -- [--structure PATH] [--rank R] [--repeats N]
//!   cargo run --release --example bench_lora_merge -- --unet DIR [--rank R] [--lora FILE] [--step HxW]
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
//!
//! With `--unet DIR` (an exported `unet/` folder: model.onnx, model.onnx_data,
//! lora_targets.json, config.json) it benchmarks merge mode against that real
//! graph instead, through the library functions the pipeline uses:
//! * writes an SPO-sized kohya LoRA (diffusers-flat `lora_unet_*` keys, f16,
//!   rank R, alpha R) on the graph's 560 attention projections to `--lora FILE`
//!   (default: in the temp dir) and parses it (`LoraFile::open`);
//! * opens the graph (`OnnxGraph::open` + `ModelGraphs::from_graphs`);
//! * `lora::resolve` (all keys must match), then `lora::merged_overrides`;
//! * builds the UNet session plain, with the merged initializer overrides
//!   (`Graph::load_with_initializers`), and plain again (the first build also
//!   warms the page cache, so the ratio uses the second); one session at a time;
//! * optionally one UNet step at `--step HxW` (batch 2, as with CFG).
//!
//! Peak RSS is reported per phase (VmHWM, reset through /proc/self/clear_refs).

use std::path::PathBuf;
use std::time::Instant;

use std::collections::BTreeMap;
use std::sync::Arc;

use ndarray::Array2;
use spo_runtime::lora::merge;
use spo_runtime::lora::WeightLayout;
use spo_runtime::lora::{
    merged_overrides, resolve, Component, LoraFile, LoraKind, LoraModule, MergeOptions,
    ModelGraphs, OverrideData, Tensor, UnetLayout,
};
use spo_runtime::model::OnnxGraph;
use spo_runtime::pipeline::lora::override_value;
use spo_runtime::runtime::session::{f32_input, Graph};
use spo_runtime::runtime::{LogLevel, Logger};
use spo_runtime::{Options, Runtime};

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
    let mut unet: Option<PathBuf> = None;
    let mut lora_path: Option<PathBuf> = None;
    let mut step: Option<(usize, usize)> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--structure" => structure = PathBuf::from(args.next().expect("--structure PATH")),
            "--unet" => unet = Some(PathBuf::from(args.next().expect("--unet DIR"))),
            "--lora" => lora_path = Some(PathBuf::from(args.next().expect("--lora FILE"))),
            "--step" => {
                let v = args.next().expect("--step HxW");
                let (h, w) = v.split_once('x').expect("--step HxW");
                step = Some((h.parse().expect("height"), w.parse().expect("width")));
            }
            "--rank" => rank = args.next().expect("--rank R").parse().expect("rank"),
            "--repeats" => repeats = args.next().expect("--repeats N").parse().expect("repeats"),
            other => panic!("unknown argument {other}"),
        }
    }
    if let Some(dir) = unet {
        let lora_path = lora_path.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("spo_bench_lora_r{rank}.safetensors"))
        });
        if let Err(e) = real_unet(&dir, rank, &lora_path, step) {
            eprintln!("bench_lora_merge: {e}");
            std::process::exit(1);
        }
        return;
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
            let h = merge::to_f16_clamped(w).expect("cast");
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

/// Current and peak RSS in GiB (VmRSS, VmHWM).
fn rss_gib() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / (1u64 << 20) as f64
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// Starts a new phase: resets VmHWM to the current RSS (Linux only; a no-op elsewhere).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn phase(name: &str, t: Instant) -> f64 {
    let s = t.elapsed().as_secs_f64();
    let (rss, hwm) = rss_gib();
    println!("{name}_s={s:.3} rss_gib={rss:.2} phase_peak_rss_gib={hwm:.2}");
    reset_peak();
    s
}

/// Writes a kohya LoRA (diffusers-flat `lora_unet_<module>` keys, f16 factors,
/// `alpha` = rank) for `modules` (path, torch `[out, in]`).
fn write_lora(path: &std::path::Path, modules: &[(String, [usize; 2])], rank: usize) {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let mut rng = Rng(0x5EED_0003);
    let f16_bytes = |v: Vec<f32>| -> Vec<u8> {
        v.into_iter()
            .flat_map(|x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    };
    let mut bufs: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
    for (m, [out, inn]) in modules {
        let stem = format!("lora_unet_{}", m.replace('.', "_"));
        let down = f16_bytes(rng.fill(rank * inn, 0.05));
        let up = f16_bytes(rng.fill(out * rank, 0.05));
        bufs.push((
            format!("{stem}.lora_down.weight"),
            vec![rank, *inn],
            Dtype::F16,
            down,
        ));
        bufs.push((
            format!("{stem}.lora_up.weight"),
            vec![*out, rank],
            Dtype::F16,
            up,
        ));
        let alpha = (rank as f32).to_le_bytes().to_vec();
        bufs.push((format!("{stem}.alpha"), vec![], Dtype::F32, alpha));
    }
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(k, shape, dt, b)| (k.clone(), TensorView::new(*dt, shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write LoRA safetensors");
}

fn real_unet(
    dir: &std::path::Path,
    rank: usize,
    lora_path: &std::path::Path,
    step: Option<(usize, usize)>,
) -> spo_runtime::Result<()> {
    let model = dir.join("model.onnx");
    let data_gib = std::fs::metadata(dir.join("model.onnx_data"))
        .map(|m| m.len() as f64 / (1u64 << 30) as f64)
        .unwrap_or(0.0);
    println!("unet={} model.onnx_data_gib={data_gib:.2}", model.display());
    reset_peak();

    // ---- graph: parse + targets (cross-checked with lora_targets.json) ----
    let t = Instant::now();
    let layout = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| UnetLayout::from_config(&v));
    let mut graphs = BTreeMap::new();
    graphs.insert(Component::Unet, OnnxGraph::open(&model)?);
    let root = dir.parent().unwrap_or(dir);
    let graphs = ModelGraphs::from_graphs(root, graphs, layout)?;
    let targets = &graphs.targets.sets[&Component::Unet].targets;
    let attn: Vec<(String, [usize; 2])> = targets
        .values()
        .filter(|t| {
            let p = &t.module;
            (p.contains(".attn1.") || p.contains(".attn2."))
                && [".to_q", ".to_k", ".to_v", ".to_out.0"]
                    .iter()
                    .any(|s| p.ends_with(s))
        })
        .map(|t| {
            let s = t.torch_shape();
            (t.module.clone(), [s[0], s[1]])
        })
        .collect();
    println!(
        "graph targets={} attention_targets={} nodes={}",
        targets.len(),
        attn.len(),
        graphs.graphs[&Component::Unet]
            .model()
            .graph
            .as_ref()
            .map_or(0, |g| g.node.len())
    );
    phase("graph_open", t);

    // ---- LoRA file ----
    let t = Instant::now();
    write_lora(lora_path, &attn, rank);
    let size = std::fs::metadata(lora_path).map(|m| m.len()).unwrap_or(0);
    println!(
        "lora_file={} mib={:.1} rank={rank}",
        lora_path.display(),
        size as f64 / (1u64 << 20) as f64
    );
    phase("lora_write", t);
    let t = Instant::now();
    let file = LoraFile::open(lora_path)?;
    println!(
        "lora format={:?} dialect={:?} modules={}",
        file.format,
        file.dialect,
        file.modules.len()
    );
    phase("lora_parse", t);

    // ---- resolve ----
    let t = Instant::now();
    let res = resolve(&file, &graphs.targets);
    println!(
        "resolve matched={} unmatched={}",
        res.matched.len(),
        res.unmatched.len()
    );
    for (k, why) in res.unmatched.iter().take(5) {
        println!("  unmatched {k}: {why}");
    }
    phase("resolve", t);

    // ---- merge (resolve + read base weights + merge + cast back) ----
    let t = Instant::now();
    let merged = merged_overrides(&graphs, &[(&file, 1.0)], MergeOptions { strict: true })?;
    let bytes: usize = merged
        .overrides
        .values()
        .map(|o| match &o.data {
            OverrideData::F32(v) => v.len() * 4,
            OverrideData::F16(v) => v.len() * 2,
            OverrideData::BF16(v) => v.len() * 2,
        })
        .sum();
    println!(
        "merged overrides={} gib={:.3}",
        merged.overrides.len(),
        bytes as f64 / (1u64 << 30) as f64
    );
    phase("merge", t);
    // ONNX Runtime is loaded by Runtime::new: before any ort value exists
    let logger = Logger::default();
    logger.set(
        LogLevel::Warn,
        Some(Arc::new(|l: LogLevel, m: &str| eprintln!("[{l:?}] {m}"))),
    );
    let rt = Runtime::new(&Options::new(), logger)?;
    let t = Instant::now();
    let mut inits = Vec::new();
    for o in merged.overrides.values() {
        inits.push((o.name.clone(), override_value(o)?));
    }
    drop(merged);
    drop(file);
    drop(graphs);
    phase("override_values", t);

    // ---- sessions ----
    let t = Instant::now();
    drop(Graph::load(&rt, "unet", &model)?);
    let plain1 = phase("session_plain_first", t);
    let t = Instant::now();
    drop(Graph::load_with_initializers(&rt, "unet", &model, inits)?);
    let over = phase("session_overrides", t);
    let t = Instant::now();
    let mut plain = Graph::load(&rt, "unet", &model)?;
    let plain2 = phase("session_plain_second", t);
    println!(
        "session_build overrides/plain_second={:.2} (plain_first={plain1:.2}s)",
        over / plain2
    );

    // ---- one UNet step (the step time does not depend on the overrides) ----
    if let Some((h, w)) = step {
        let (lh, lw) = (h / 8, w / 8);
        let mut rng = Rng(0x5EED_0004);
        let mut inputs = vec![
            (
                "sample",
                f32_input(&[2, 4, lh, lw], rng.fill(2 * 4 * lh * lw, 1.0)),
            ),
            ("timestep", f32_input(&[2], vec![999.0, 999.0])),
            (
                "encoder_hidden_states",
                f32_input(&[2, 77, 2048], rng.fill(2 * 77 * 2048, 1.0)),
            ),
        ];
        if plain.input("text_embeds").is_some() {
            inputs.push((
                "text_embeds",
                f32_input(&[2, 1280], rng.fill(2 * 1280, 1.0)),
            ));
            let ids = [h as f32, w as f32, 0.0, 0.0, h as f32, w as f32];
            inputs.push(("time_ids", f32_input(&[2, 6], [ids, ids].concat())));
        }
        let t = Instant::now();
        let out = plain.run(inputs, &["out_sample"], None)?;
        let finite = out[0].iter().all(|v| v.is_finite());
        println!("step {h}x{w} batch=2 finite={finite}");
        phase("unet_step", t);
    }
    Ok(())
}
