#!/usr/bin/env bash
# Rust pipeline vs the Python (diffusers scheduler + onnxruntime) baseline on the
# same ONNX files, same steps and repeats, processes interleaved:
# rust, python, rust, python, ... (--rounds pairs). Prints each side's output,
# then the median end-to-end times and the ratio python_time / rust_time.
#
#   scripts/bench.sh [--model DIR] [--steps N] [--repeats R] [--rounds K] [--threads T]
#
# Every process loads its sessions once (not timed) and runs one warm-up image,
# then R timed images. The Rust side is examples/bench_pipeline.rs, which also
# reports the loop overhead over a bare UNet call.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

model=tests/fixtures/tiny-sdxl
steps=20
repeats=5
rounds=2
threads=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

venv=$(bash scripts/python-env.sh)
ort_dir=$(bash scripts/fetch-onnxruntime.sh)
export SPO_ORT_LIBRARY="$ort_dir/libonnxruntime.so"
cargo=${CARGO:-cargo}
"$cargo" build --release --locked --example bench_pipeline >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/bench_pipeline"

common=(--model "$model" --steps "$steps" --repeats "$repeats")
[ -n "$threads" ] && common+=(--threads "$threads")
rust_args=(--ep cpu "${common[@]}")

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
for k in $(seq 1 "$rounds"); do
  echo "== round $k/$rounds: rust"
  "$bin" "${rust_args[@]}" | tee "$log/rust.$k"
  echo "== round $k/$rounds: python"
  PYTHONPATH="$root/onnx" "$venv/bin/python" -m spo_onnx.bench.baseline "${common[@]}" | tee "$log/python.$k"
done

# Median over rounds of each process's median end-to-end time.
med() { sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
rust_s=$(cat "$log"/rust.* | sed -n 's/^e2e_s=//p' | med)
python_s=$(cat "$log"/python.* | sed -n 's/^e2e_s=//p' | med)
overhead=$(cat "$log"/rust.* | sed -n 's/^overhead_pct=//p' | med)
rust_rss=$(cat "$log"/rust.* | sed -n 's/^peak RSS *//p' | tail -n1)
python_rss=$(cat "$log"/python.* | sed -n 's/^peak RSS *//p' | tail -n1)
echo "== summary: $model, $steps steps, $repeats repeats x $rounds rounds"
echo "rust   end-to-end ${rust_s} s  peak RSS ${rust_rss}  loop overhead ${overhead}% of a UNet call"
echo "python end-to-end ${python_s} s  peak RSS ${python_rss}"
awk -v p="$python_s" -v r="$rust_s" 'BEGIN {printf "ratio python_time / rust_time = %.3f\n", p / r}'
