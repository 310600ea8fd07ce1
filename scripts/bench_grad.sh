#!/usr/bin/env bash
# Gradient runner vs PyTorch autograd on the same shapes and weights, same
# threads, processes interleaved (ours, torch, ours, torch ...). Two models:
# tiny-sdxl (a test fixture: per-op overhead dominates) and the SDXL topology
# at a quarter width, latent 32x32 (kernels dominate; built once into the cache
# by `python -m spo_onnx.bench.grad make`). Prints each run's line, then the
# median times, backward/forward ratios and the peak-memory ratios.
#
#   scripts/bench_grad.sh [--repeats R] [--rounds K] [--threads T]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

repeats=5
rounds=2
threads=2
while [ $# -gt 0 ]; do
  case "$1" in
    --repeats) repeats=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "bench_grad.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

venv=$(bash scripts/python-env.sh)
ort_dir=$(bash scripts/fetch-onnxruntime.sh)
export SPO_ORT_LIBRARY="$ort_dir/libonnxruntime.so"
cargo=${CARGO:-cargo}
"$cargo" build --release --locked --example bench_grad >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/bench_grad"
cache=${SPO_CACHE_DIR:-$HOME/.cache/spo-runtime}/bench-grad/sdxl-narrow
stale=0
for src in onnx/spo_onnx/export/train.py onnx/spo_onnx/export/vjp.py; do
  if [ "$cache/inputs.safetensors" -ot "$src" ]; then stale=1; fi
done
if [ ! -f "$cache/inputs.safetensors" ] || [ $stale = 1 ]; then
  rm -rf "$cache"
  PYTHONPATH=onnx "$venv/bin/python" -m spo_onnx.bench.grad make --out "$cache" >&2
fi

# name train_dir inputs diffusers_unet rank alpha
models=(
  "tiny-sdxl tests/fixtures/train/tiny-sdxl/graphs tests/fixtures/train/tiny-sdxl/inputs.safetensors tests/fixtures/diffusers/tiny-sdxl/unet 4 8"
  "sdxl-quarter $cache/train $cache/inputs.safetensors $cache/diffusers-unet 8 8"
)
for m in "${models[@]}"; do
  read -r name train inputs unet rank alpha <<<"$m"
  ours=() theirs=()
  for _ in $(seq "$rounds"); do
    line=$("$bin" --train-dir "$train" --inputs "$inputs" --repeats "$repeats" --threads "$threads")
    echo "$name $line"; ours+=("$line")
    line=$(PYTHONPATH=onnx "$venv/bin/python" -m spo_onnx.bench.grad torch --unet "$unet" --inputs "$inputs" \
      --rank "$rank" --alpha "$alpha" --repeats "$repeats" --threads "$threads" 2>/dev/null)
    echo "$name $line"; theirs+=("$line")
  done
  printf '%s\n' "${ours[@]}" > /tmp/bench_grad_ours.$$
  printf '%s\n' "${theirs[@]}" > /tmp/bench_grad_torch.$$
  "$venv/bin/python" - "$name" /tmp/bench_grad_ours.$$ /tmp/bench_grad_torch.$$ <<'PY'
import statistics, sys
def rows(path):
    out = []
    for line in open(path):
        out.append({k: float(v) for k, v in (f.split("=") for f in line.split() if "=" in f)})
    return out
name, ours, torch = sys.argv[1], rows(sys.argv[2]), rows(sys.argv[3])
med = lambda rs, k: statistics.median(r[k] for r in rs)
f, t = med(ours, "forward_ms"), med(ours, "train_ms")
tf, tt = med(torch, "forward_ms"), med(torch, "train_ms")
print(f"== {name}: ours forward {f:.1f} ms, forward+backward {t:.1f} ms (backward/forward {(t - f) / f:.2f}); "
      f"torch forward {tf:.1f} ms, forward+backward {tt:.1f} ms (backward/forward {(tt - tf) / tf:.2f})")
print(f"== {name}: forward+backward torch/ours = {tt / t:.2f} (goal >= 1); backward/forward ours = {(t - f) / f:.2f} "
      f"(goal <= 2); peak memory ours/torch = {med(ours, 'train_peak_mib') / med(torch, 'train_peak_mib'):.2f} "
      f"(goal <= 1; {med(ours, 'train_peak_mib'):.0f} vs {med(torch, 'train_peak_mib'):.0f} MiB)")
PY
  rm -f /tmp/bench_grad_ours.$$ /tmp/bench_grad_torch.$$
done
