"""The toy world of SPO, measured: `spo train --preset toy` on the shapes
model (a tiny SDXL, models/shapes-sdxl) with its size preference model
(models/shapes-sdxl/preference-size: prompt adherence plus 5 x the
foreground share), then the score of captions and seeds that training never
saw, with and without the saved webui LoRA (loaded by `spo generate --lora`):
the mean paired difference and its standard error.

    PYTHONPATH=onnx python -m spo_onnx.shapes.toy_world [--work DIR] [--grid PNG]   # after `make build`

`make spo-demo` runs it with a before/after grid; tests/python/test_toy_world.py
asserts the gain is above 3 standard errors. Measured (8 rounds, n = 144):
+0.247 +- 0.029; the shapes grow, in the prompt's colours.

Why the size preference: the shapes model already adheres to its prompts, so
the adherence model alone leaves SPO little to gain. Tuning runs with it
(held-out captions, n = 144) gave +0.024 +- 0.011 at lr 1e-3 over 8 rounds,
and losses with more rounds (-0.215 +- 0.046 at lr 5e-4 over 60 rounds;
-1.28 +- 0.18 at lr 1e-3 over 40), where the LoRA drifted the colours.
A shape's size varies (35-60% of the side) and the preference can see it
from the first steps, so it is a preference with headroom.

Everything runs through the `spo` binary, as a user would: the training
folder comes from `spo_onnx.export.train`.
"""

import os
import random
import statistics
import subprocess

import sys
import tempfile
from pathlib import Path

from spo_onnx.export import train as train_graphs
from spo_onnx.shapes.world import COLOUR_NAMES, HELD_OUT, SHAPES, caption

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..")
# The CLI `make build` made; the Makefile exports SPO_CLI (it honours CARGO_TARGET_DIR).
SPO = os.environ.get("SPO_CLI") or os.path.join(ROOT, "target", "release", "spo")
MODEL = os.path.join(ROOT, "models", "shapes-sdxl")
SPM = os.path.join(MODEL, "preference-size")
ROUNDS = 8
# Held-out seeds: one generator stream from this seed gives IMAGES images per
# prompt (training draws from its own streams, seeded by the trainer's seed).
SEED, IMAGES = 1000, 6
# Sampling as in training (DDIM, eta 1, CFG 5, the empty negative prompt).
GEN = ["--steps", "10", "--scheduler", "ddim", "--eta", "1", "--guidance", "5", "--negative", "",
       "--width", "128", "--height", "128"]


def spo(*args):
    if not os.path.exists(SPO):
        sys.exit(f"{SPO} is missing: run `make build` first")
    env = dict(os.environ)
    env.setdefault("SPO_ORT_LIBRARY", os.path.join(ROOT, "third_party", "onnxruntime", "cpu", "libonnxruntime.so"))
    r = subprocess.run([SPO, *args, "--ep", "cpu"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def prompts():
    """(training prompts, evaluation prompts): disjoint captions of the (fg, bg)
    pairs the shapes model was trained on. The world's held-out pairs are left
    out: the model draws them as well as the seen ones, but SPO's gain on them
    is within noise (+0.005 +- 0.010 on 8 prompts in a tuning run)."""
    rng = random.Random(1)
    held = set(HELD_OUT)
    seen = [caption(f, s, b) for f in COLOUR_NAMES for b in COLOUR_NAMES for s in SHAPES
            if f != b and (f, b) not in held]
    rng.shuffle(seen)
    return seen[:24], seen[24:48]


def scores(tmp, tag, prompt_list, lora=None):
    """Scores of IMAGES images per prompt, in order."""
    out = []
    for i, p in enumerate(prompt_list):
        png = tmp / f"{tag}-{i}.png"
        spo("generate", "--model", MODEL, "--prompt", p, "--seed", str(SEED), "--num-images", str(IMAGES),
            "--out", str(png), *GEN, *(["--lora", str(lora)] if lora else []))
        # `spo generate` writes image 0 at --out and image k at <stem>_k.png.
        files = [str(png)] + [str(tmp / f"{tag}-{i}_{k}.png") for k in range(1, IMAGES)]
        lines = spo("score", "--spm", SPM, "--prompt", p, *files).splitlines()
        out += [float(line.split()[0]) for line in lines]
    assert len(out) == IMAGES * len(prompt_list)
    return out


def measure(tmp_path, rounds=ROUNDS, settings=(), train_dir=None):
    """Trains, evaluates, prints and returns (mean gain, standard error, base
    scores, trained scores). `settings`: extra `--set NAME=VALUE` pairs over
    the toy preset; `train_dir`: an exported training folder to reuse."""
    if train_dir is None:
        train_dir = tmp_path / "train"
        train_graphs.build(os.path.join(MODEL, "unet"), str(train_dir), 2, 16, 16, 77, 4, 4.0,
                           train_graphs.SPO_TARGETS, log=lambda *_: None)
    seen, held = prompts()
    (tmp_path / "prompts.txt").write_text("\n".join(seen))
    lora = tmp_path / "toy.safetensors"
    sets = [a for kv in settings for a in ("--set", kv)]
    spo("train", "--model", MODEL, "--train-dir", str(train_dir), "--spm", SPM, "--prompts",
        str(tmp_path / "prompts.txt"), "--out", str(lora), "--preset", "toy", "--rounds", str(rounds),
        "--format", "webui", *sets)
    base = scores(tmp_path, "base", held)
    trained = scores(tmp_path, "lora", held, lora)
    d = [t - b for t, b in zip(trained, base)]
    mean, se = statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5
    print(f"held-out preference score: base {statistics.fmean(base):.4f}, trained {statistics.fmean(trained):.4f}, "
          f"gain {mean:.4f} +- {se:.4f} (standard error of the paired difference, n = {len(d)})")
    return mean, se, base, trained


def grid(tmp_path, base, trained, out):
    """Before (top) and after (bottom) SPO: image 0 of the first 8 evaluation
    captions, labelled with its preference score."""
    from PIL import Image, ImageDraw

    _, held = prompts()
    picks = list(range(8))
    s, label = 128, 40
    img = Image.new("RGB", (s * len(picks), 2 * (s + label)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for c, i in enumerate(picks):
        words = held[i].split()
        for r, (tag, sc) in enumerate((("base", base), ("lora", trained))):
            x, y = c * s, r * (s + label)
            img.paste(Image.open(tmp_path / f"{tag}-{i}.png").convert("RGB"), (x, y))
            draw.text((x + 4, y + s + 2), f"{words[1]} {words[2]} on {words[5]}", fill=(0, 0, 0))
            draw.text((x + 4, y + s + 14), f"{'before' if r == 0 else 'after'}: {sc[i * IMAGES]:.3f}", fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.save(out, optimize=True)
    return out


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="keep the work folder (training folder, LoRA, metrics log, images) here")
    ap.add_argument("--grid", help="write a before/after grid of held-out prompts here")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--train-dir", help="reuse this exported training folder")
    ap.add_argument("--set", action="append", default=[], help="a trainer setting over the toy preset, NAME=VALUE")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        work = Path(a.work or d)
        work.mkdir(parents=True, exist_ok=True)
        mean, se, base, trained = measure(work, a.rounds, a.set, a.train_dir)
        if a.grid:
            print(f"wrote {grid(work, base, trained, a.grid)}")
    return 0 if mean > 3 * se else 1


if __name__ == "__main__":
    sys.exit(main())
