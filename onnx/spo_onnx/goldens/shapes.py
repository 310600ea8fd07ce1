"""Diffusers parity goldens for the shapes model (models/shapes-sdxl), written
from the trained diffusers pipeline that `spo_onnx.shapes.publish` exported:

    PYTHONPATH=onnx python -m spo_onnx.goldens.shapes --pipeline ~/.cache/spo-runtime/shapes/pipeline

The diffusers weights are not committed (the ONNX export is); they come back
bit for bit from the seeded `spo_onnx.shapes.train`. Writes
tests/fixtures/goldens/shapes-sdxl/index.json with the same case format as
goldens/pipeline.py (only the "cases" section), so tests/shapes_goldens.rs checks
it with the fixtures' tolerances.
"""

import argparse
import json
import os
import shutil
import sys

import torch

from ..fixtures import REPO
from .common import Writer
from .pipeline import run_case

OUT = os.path.join(REPO, "tests", "fixtures", "goldens", "shapes-sdxl")

# The demo's prompt and sampler, and a held-out (fg, bg) pair with a
# stochastic sampler at another size.
CASES = [
    dict(name="ddim_demo_cfg5", prompt="a red circle on a blue background", negative_prompt=None, width=128,
         height=128, steps=25, guidance=5.0, scheduler="ddim", eta=0.0, seed=42),
    dict(name="euler_a_heldout_cfg5_neg", prompt="a purple triangle on a green background", negative_prompt="",
         width=128, height=96, steps=12, guidance=5.0, scheduler="euler_a", eta=0.0, seed=7),
]


def load_pipeline(path):
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe._spo_base_scheduler_config = pipe.scheduler.config
    return pipe


def write(pipeline, out=OUT):
    torch.use_deterministic_algorithms(True)
    pipe = load_pipeline(pipeline)
    if os.path.exists(out):
        shutil.rmtree(out)
    w = Writer(out)
    index = {"model": "shapes-sdxl", "cases": []}
    for c in CASES:
        index["cases"].append(run_case(pipe, c, w, None))
        print(f"shapes-sdxl: {c['name']}", file=sys.stderr)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True, help="the trained diffusers folder")
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args(argv)
    write(a.pipeline, a.out)


if __name__ == "__main__":
    sys.exit(main())
