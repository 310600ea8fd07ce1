"""Writes the committed model folder models/shapes-sdxl from a trained
diffusers folder, with the ordinary exporter (fp32, TorchScript, no LoRA
slots) and the adherence preference model beside it:

    PYTHONPATH=onnx python -m spo_onnx.shapes.publish --pipeline ~/.cache/spo-runtime/shapes/pipeline \
        [--out models/shapes-sdxl]

The tokenizers' vocab.json / merges.txt become relative symlinks to
tests/fixtures/clip-tokenizer, as in the fixtures; the scheduler config is
the one the training folder carries (SDXL's EulerDiscreteScheduler config;
`spo generate --scheduler ddim` builds DDIM from it).
"""

import argparse
import json
import os
import shutil
import sys

import torch

from .. import export
from ..fixtures import REPO, link_tokenizers
from . import adherence

OUT = os.path.join(REPO, "models", "shapes-sdxl")


def publish(pipeline, out=OUT):
    torch.manual_seed(0)
    if os.path.exists(out):
        shutil.rmtree(out)
    export.export_pipeline(pipeline, out)
    link_tokenizers(out)
    # the configs name the local training folder; drop it
    for root, _, files in os.walk(out):
        if "config.json" in files:
            p = os.path.join(root, "config.json")
            with open(p) as f:
                conf = json.load(f)
            if conf.pop("_name_or_path", None) is not None:
                with open(p, "w") as f:
                    json.dump(conf, f, indent=2)
                    f.write("\n")
    adherence.write(os.path.join(out, "preference"), os.path.join(out, "tokenizer"))
    adherence.write(os.path.join(out, "preference-size"), os.path.join(out, "tokenizer"), kind="size")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True, help="the diffusers folder spo_onnx.shapes.train wrote")
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args(argv)
    print(f"wrote {publish(a.pipeline, a.out)}")


if __name__ == "__main__":
    sys.exit(main())
