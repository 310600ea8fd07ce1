//! Benchmark of the gradient runner on one training folder: the median time
//! of a forward (UNet output plus residuals) and of a forward+backward, and
//! the peak memory of each phase. `scripts/bench_grad.sh` runs it beside
//! PyTorch on the same shapes and weights and prints the ratios.
//!
//!   bench_grad --train-dir DIR --inputs IN.safetensors [--repeats N] [--threads T]
//!
//! Peak memory is the process's resident-set high-water mark during a phase
//! (`*_peak_mib`: weights, buffers and activations; the mark is reset with
//! `/proc/self/clear_refs` after loading and a warm-up run, so load-time
//! peaks do not count) and its rise over the RSS when the phase began
//! (`*_extra_mib`). Prints one `key=value` line.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use spo_runtime::model::tensors;
use spo_runtime::train::GradRunner;
use spo_runtime::{Options, Result, Runtime};

struct Args {
    train_dir: PathBuf,
    inputs: PathBuf,
    repeats: usize,
    threads: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        train_dir: PathBuf::new(),
        inputs: PathBuf::new(),
        repeats: 5,
        threads: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--train-dir" => a.train_dir = v.into(),
            "--inputs" => a.inputs = v.into(),
            "--repeats" => a.repeats = v.parse().expect("--repeats N"),
            "--threads" => a.threads = Some(v),
            _ => panic!("unknown argument {k}"),
        }
    }
    a
}

/// The resident-set high-water mark since the last reset, in MiB.
fn peak_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn reset_peak() {
    // "5" resets the high-water mark to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let a = args();
    let mut pairs = vec![("ep", "cpu".to_owned())];
    if let Some(t) = &a.threads {
        pairs.push(("threads.intra", t.clone()));
    }
    let opts = Options::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())))?;
    let rt = Runtime::new(&opts, Default::default())?;
    let t0 = Instant::now();
    let mut r = GradRunner::open(&rt, &a.train_dir)?;
    let load = t0.elapsed();
    let mut all = tensors::read(&a.inputs)?;
    let m = r.manifest().clone();
    let cot = all.remove(&m.cotangent).expect("inputs hold the cotangent");
    let params: tensors::NamedTensors = m
        .params
        .iter()
        .map(|p| {
            (
                p.key.clone(),
                all.remove(&p.key).expect("inputs hold every parameter"),
            )
        })
        .collect();
    r.set_params(&params)?;
    let rss_loaded = peak_mib();

    r.forward(&all)?; // warm-up
    reset_peak();
    let base = peak_mib();
    let mut fwd = Vec::new();
    for _ in 0..a.repeats {
        let t = Instant::now();
        r.forward(&all)?;
        fwd.push(t.elapsed());
    }
    let fwd_peak = peak_mib();
    let fwd_extra = fwd_peak - base;

    r.forward(&all)?;
    r.backward(&cot)?; // warm-up
    reset_peak();
    let base = peak_mib();
    let mut train = Vec::new();
    for _ in 0..a.repeats {
        let t = Instant::now();
        r.forward(&all)?;
        r.backward(&cot)?;
        train.push(t.elapsed());
    }
    let train_peak = peak_mib();
    let train_extra = train_peak - base;
    let (f, t) = (median(fwd), median(train));
    println!(
        "ours segments={} load_s={:.2} rss_loaded_mib={:.0} forward_ms={f:.2} train_ms={t:.2} \
         backward_over_forward={:.2} forward_peak_mib={fwd_peak:.0} train_peak_mib={train_peak:.0} \
         forward_extra_mib={fwd_extra:.0} train_extra_mib={train_extra:.0}",
        m.segments.len(),
        load.as_secs_f64(),
        rss_loaded,
        (t - f) / f,
    );
    Ok(())
}
