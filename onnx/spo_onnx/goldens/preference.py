"""Goldens for the preference-model runner (src/train/preference.rs): the two
toy preference models as fixtures, and PyTorch's scores for a few images and
prompts through the official preprocessing order (images in [-1, 1] to
[0, 1], centre crop to a square, bicubic resize to 224 with torch's
`interpolate`, CLIP normalisation).

    PYTHONPATH=onnx python -m spo_onnx.goldens.preference

Writes tests/fixtures/preference/{colour,sharpness}/ and
tests/fixtures/goldens/preference/{index.json, tensors.safetensors}.
"""

import json
import os
import sys

import numpy as np
import torch

from ..export import preference

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "fixtures")
PROMPTS = ["a red circle on a blue background", "a yellow square", "a photo of a cat", "an orange or a purple thing"]
TIMESTEPS = [0, 751, 351, 1]


def preprocess(images):
    """[-1, 1] [B,3,H,W] -> CLIP-normalised [B,3,224,224]."""
    x = (images + 1) / 2
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top:top + s, left:left + s]
    x = torch.nn.functional.interpolate(x, size=(preference.SIZE, preference.SIZE), mode="bicubic", align_corners=False)
    mean = torch.tensor(preference.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(preference.CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def main(argv=None):
    from safetensors.numpy import save_file
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(FIXTURES, "tiny-sdxl", "tokenizer")
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    gen = torch.Generator().manual_seed(3)
    # Smooth random images (a coarse grid upsampled), one non-square.
    coarse = torch.rand(4, 3, 4, 4, generator=gen) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False)
    wide = torch.rand(1, 3, 48, 80, generator=gen) * 2 - 1
    ids = torch.tensor(tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids)
    t = torch.tensor(TIMESTEPS)
    # The preprocessed wide image, every 7th row and column (a 32x32 sample
    # keeps the fixture small and still covers the whole resize).
    tensors = {"images": images.numpy(), "wide": wide.numpy(), "wide_pre_every7": preprocess(wide)[..., ::7, ::7].numpy()}
    index = {"prompts": PROMPTS, "timesteps": TIMESTEPS, "input_ids": ids.tolist(), "scores": {}}
    for kind in ("colour", "sharpness"):
        model = preference.toy(kind, os.path.join(FIXTURES, "preference", kind), tok_dir, link=True)
        with torch.no_grad():
            index["scores"][kind] = [float(v) for v in model(preprocess(images), t, ids)]
    out = os.path.join(FIXTURES, "goldens", "preference")
    os.makedirs(out, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out, "tensors.safetensors"))
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    print(json.dumps(index["scores"]))


if __name__ == "__main__":
    sys.exit(main())
