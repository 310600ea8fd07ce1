#!/usr/bin/env bash
# One SPO round, ours against PyTorch, on the tiny SDXL fixture: `spo train
# --preset toy` against `python -m spo_onnx.bench.train` (the same round in
# PyTorch: diffusers UNet with a peft LoRA, the official loss, the same
# settings, prompts and threads; every pool with a gap kept: the random tiny
# model's gaps are far below the toy threshold). Each runs ROUNDS rounds; the first is warm-up
# and left out. Prints each side's mean time per round and per phase, the
# ratio torch/ours (above 1: we are faster), and both peak RSS.
#
#   scripts/bench_train.sh [--rounds N] [--threads T]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

rounds=4
threads=2
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "bench_train.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

venv=$(bash scripts/python-env.sh)
ort_dir=$(bash scripts/fetch-onnxruntime.sh)
export SPO_ORT_LIBRARY="$ort_dir/libonnxruntime.so"
export OMP_NUM_THREADS=$threads
"${CARGO:-cargo}" build --release --locked --bin spo >&2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The prompts of the PyTorch side (spo_onnx/bench/train.py, PROMPTS).
printf '%s\n' "a red apple" "a blue car" "a green field" "a yellow flower" >"$out/prompts.txt"

/usr/bin/time -f "%M" -o "$out/ours.rss" "${SPO_CLI:-target/release/spo}" train --ep cpu --threads "$threads" --preset toy --rounds "$rounds" \
  --model tests/fixtures/tiny-sdxl --train-dir tests/fixtures/train/tiny-sdxl/graphs \
  --spm tests/fixtures/preference/colour --prompts "$out/prompts.txt" --out "$out/lora.safetensors" \
  --metrics-log "$out/ours.jsonl" --set threshold=0 2>/dev/null >/dev/null
PYTHONPATH=onnx "$venv/bin/python" -m spo_onnx.bench.train --model tests/fixtures/diffusers/tiny-sdxl \
  --rounds "$rounds" --threads "$threads" 2>/dev/null >"$out/torch.jsonl"

"$venv/bin/python" - "$out" <<'EOF'
import json, sys
d = sys.argv[1]
ours = [json.loads(l) for l in open(f"{d}/ours.jsonl")][1:]
torch_lines = [json.loads(l) for l in open(f"{d}/torch.jsonl")]
theirs = [l for l in torch_lines if "round" in l][1:]
torch_rss = next(l["peak_rss_mib"] for l in torch_lines if "peak_rss_mib" in l)
ours_rss = int(open(f"{d}/ours.rss").read().split()[-1]) / 1024
phases = ["sampling", "scoring", "forward", "backward", "optimizer"]
mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
o = {p: mean(ours, "time_" + p) for p in phases}
t = {p: mean(theirs, p) for p in phases}
print(f"rounds measured: {len(ours)} ours, {len(theirs)} torch (the first of each left out)")
print(f"pairs per round: ours {mean(ours, 'pairs'):.1f}, torch {mean(theirs, 'pairs'):.1f}")
for p in phases:
    print(f"{p:>10}: ours {o[p]:7.3f} s   torch {t[p]:7.3f} s   torch/ours {t[p] / max(o[p], 1e-9):5.2f}")
so, st = mean(ours, "time_total"), mean(theirs, "total")
print(f"{'round':>10}: ours {so:7.3f} s   torch {st:7.3f} s   torch/ours {st / so:5.2f}")
print(f"peak RSS: ours {ours_rss:.0f} MiB, torch {torch_rss:.0f} MiB, ours/torch {ours_rss / torch_rss:.2f}")
EOF
