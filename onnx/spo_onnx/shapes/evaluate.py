"""Prompt adherence of an exported shapes model, generated through the `spo`
CLI and read back by the pixel judge of `world`:

    PYTHONPATH=onnx python -m spo_onnx.shapes.evaluate [--model models/shapes-sdxl] [--keep DIR]

The prompt set (`PROMPTS`, 72 prompts at fixed seeds): every held-out pair
with every shape (24) and 16 seen pairs (every third of `world.seen_pairs()`)
with every shape (48). Generation settings are the demo's: DDIM, 25 steps,
CFG 5, 128x128. Prints foreground / background / shape accuracy for seen and
held-out prompts separately.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..fixtures import REPO
from . import world

# The CLI `make build` made; the Makefile exports SPO_CLI (it honours CARGO_TARGET_DIR).
SPO = os.environ.get("SPO_CLI") or os.path.join(REPO, "target", "release", "spo")
ORT_LIB = os.path.join(REPO, "third_party", "onnxruntime", "cpu", "libonnxruntime.so")
MODEL = os.path.join(REPO, "models", "shapes-sdxl")
SETTINGS = dict(scheduler="ddim", steps=25, guidance=5.0)


def prompt_set():
    """[(fg, shape, bg, seed)]: the held-out pairs first, then seen ones."""
    held = [(f, s, b) for f, b in world.HELD_OUT for s in world.SHAPES]
    seen = [(f, s, b) for f, b in world.seen_pairs()[::3] for s in world.SHAPES]
    return [(f, s, b, 1000 + i) for i, (f, s, b) in enumerate(held + seen)]


PROMPTS = prompt_set()


def generate(prompt, seed, out, model=MODEL, spo=SPO, num_images=1, **kw):
    """Runs `spo generate`; returns the PNG paths it wrote."""
    o = dict(SETTINGS, **kw)
    env = dict(os.environ)
    env.setdefault("SPO_ORT_LIBRARY", ORT_LIB)
    cmd = [spo, "generate", "--model", model, "--prompt", prompt, "--steps", str(o["steps"]), "--guidance",
           str(o["guidance"]), "--scheduler", o["scheduler"], "--seed", str(seed), "--width", str(world.SIZE),
           "--height", str(world.SIZE), "--num-images", str(num_images), "--ep", "cpu", "--out", out]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    stem, ext = os.path.splitext(out)
    return [out] + [f"{stem}_{i}{ext}" for i in range(1, num_images)]


def read_png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def evaluate(model=MODEL, spo=SPO, workdir=None, prompts=PROMPTS, jobs=1, **kw):
    """[(fg, shape, bg, seed, judged (fg, shape, bg))] for `prompts`."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory()
        workdir = tmp.name
    os.makedirs(workdir, exist_ok=True)

    def one(p):
        f, s, b, seed = p
        out = os.path.join(workdir, f"{f}-{s}-{b}-{seed}.png")
        generate(world.caption(f, s, b), seed, out, model, spo, **kw)
        return (f, s, b, seed, world.judge(read_png(out)))

    with ThreadPoolExecutor(jobs) as ex:
        res = list(ex.map(one, prompts))
    if tmp:
        tmp.cleanup()
    return res


def summarise(results):
    """{"seen"/"held-out"/"all": {"n", "fg", "bg", "shape", "all"}}."""
    out = {}
    groups = {
        "seen": [r for r in results if not world.is_held_out(r[0], r[2])],
        "held-out": [r for r in results if world.is_held_out(r[0], r[2])],
        "all": list(results),
    }
    for name, rs in groups.items():
        n = max(1, len(rs))
        out[name] = {
            "n": len(rs),
            "fg": sum(r[4][0] == r[0] for r in rs) / n,
            "bg": sum(r[4][2] == r[2] for r in rs) / n,
            "shape": sum(r[4][1] == r[1] for r in rs) / n,
            "all": sum(r[4] == (r[0], r[1], r[2]) for r in rs) / n,
        }
    return out


def table(summary):
    lines = [f"{'':9} {'n':>3} {'fg':>5} {'bg':>5} {'shape':>5} {'all3':>5}"]
    for name, s in summary.items():
        lines.append(f"{name:9} {s['n']:3d} {s['fg']:5.2f} {s['bg']:5.2f} {s['shape']:5.2f} {s['all']:5.2f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--spo", default=SPO)
    ap.add_argument("--keep", help="keep the images in this folder")
    ap.add_argument("--scheduler", default=SETTINGS["scheduler"])
    ap.add_argument("--steps", type=int, default=SETTINGS["steps"])
    ap.add_argument("--guidance", type=float, default=SETTINGS["guidance"])
    ap.add_argument("-v", "--verbose", action="store_true", help="print every miss")
    a = ap.parse_args(argv)
    res = evaluate(a.model, a.spo, a.keep, scheduler=a.scheduler, steps=a.steps, guidance=a.guidance)
    if a.verbose:
        for f, s, b, seed, j in res:
            if j != (f, s, b):
                print(f"miss: {world.caption(f, s, b)} (seed {seed}) -> {j}")
    print(table(summarise(res)))


if __name__ == "__main__":
    sys.exit(main())
