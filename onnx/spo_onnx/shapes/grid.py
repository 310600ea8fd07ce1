"""The README's grid of the shapes model, generated through the `spo` CLI
(DDIM, 25 steps, CFG 5, 128x128, seed 42): the top row has prompts whose
(fg, bg) pair was seen in training, the bottom row held-out pairs.

    PYTHONPATH=onnx python -m spo_onnx.shapes.grid [--model models/shapes-sdxl] [--out docs/shapes-grid.png]
"""

import argparse
import os
import sys
import tempfile

import numpy as np

from ..fixtures import REPO
from . import world
from .evaluate import MODEL, SPO, generate, read_png

SEEN = [("red", "circle", "blue"), ("yellow", "triangle", "purple"), ("white", "square", "black"), ("green", "circle", "orange")]
HELD = [("red", "square", "white"), ("blue", "triangle", "yellow"), ("white", "circle", "red"), ("orange", "triangle", "purple")]
LABEL = 28


def make_grid(model=MODEL, out=os.path.join(REPO, "docs", "shapes-grid.png"), spo=SPO, seed=42):
    from PIL import Image, ImageDraw

    rows = [SEEN, HELD]
    s = world.SIZE
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * s, len(rows) * (s + LABEL)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    with tempfile.TemporaryDirectory() as tmp:
        for r, row in enumerate(rows):
            for c, (f, shape, b) in enumerate(row):
                path = os.path.join(tmp, f"{r}-{c}.png")
                generate(world.caption(f, shape, b), seed, path, model, spo)
                img = read_png(path)
                x, y = c * s, r * (s + LABEL)
                grid.paste(Image.fromarray(img), (x, y))
                tag = " (held out)" if world.is_held_out(f, b) else ""
                draw.text((x + 4, y + s + 2), f"{f} {shape}", fill=(0, 0, 0))
                draw.text((x + 4, y + s + 14), f"on {b}{tag}", fill=(0, 0, 0))
                print(f"{world.caption(f, shape, b)}: judged {world.judge(np.asarray(img))}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    grid.save(out, optimize=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "shapes-grid.png"))
    ap.add_argument("--spo", default=SPO)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args(argv)
    print(f"wrote {make_grid(a.model, a.out, a.spo, a.seed)}")


if __name__ == "__main__":
    sys.exit(main())
