"""Preference models under spo-runtime's contract, and two toy ones for tests.

The contract (src/train/preference.rs reads it): one ONNX graph `model.onnx`
with inputs `image` float32 [B,3,224,224] (CLIP-normalised RGB), `timestep`
int64 [B] (0 for a final image) and `input_ids` int64 [B,77], and output
`score` float32 [B]; beside it `tokenizer/` (vocab.json, merges.txt,
tokenizer_config.json: the pad token) for `input_ids`, and `preference.json`
(what the model is).

    PYTHONPATH=onnx python -m spo_onnx.export.preference toy --kind colour|sharpness --out DIR

Toy models, whose score is computable from the image:
- `colour`: minus the squared distance (x10) between the image's mean colour
  and the colour the prompt names (the first of red, green, blue, yellow,
  white, black, purple, orange in it; grey when none);
- `sharpness`: the mean absolute Laplacian of the grey image (x10).
"""

import argparse
import json
import os
import shutil
import sys

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 224
MAX_LEN = 77
# The shapes world's colours (0-255 RGB).
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 50),
    "white": (240, 240, 240), "black": (20, 20, 20), "purple": (140, 60, 180), "orange": (240, 140, 30),
}


def unnormalise(image):
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return image * std + mean


class ColourScore(torch.nn.Module):
    def __init__(self, colour_ids):
        super().__init__()
        self.register_buffer("ids", torch.tensor(colour_ids, dtype=torch.int64))
        self.register_buffer("rgb", torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0)

    def forward(self, image, timestep, input_ids):
        mean = unnormalise(image).mean(dim=(2, 3))  # [B,3]
        hit = (input_ids.unsqueeze(-1) == self.ids.view(1, 1, -1)).float()  # [B,77,K]
        # the first colour word: weight each position by "no colour before it"
        before = torch.cumsum(hit.sum(-1), dim=1) - hit.sum(-1)
        first = hit * (before == 0).float().unsqueeze(-1)
        w = first.sum(1)  # [B,K], one-hot or zero
        target = w @ self.rgb + (1 - w.sum(-1, keepdim=True)) * 0.5
        return -10.0 * ((mean - target) ** 2).sum(-1) + 0.0 * timestep.float()


class SharpnessScore(torch.nn.Module):
    def forward(self, image, timestep, input_ids):
        grey = unnormalise(image).mean(dim=1, keepdim=True)
        k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
        lap = torch.nn.functional.conv2d(grey, k)
        return 10.0 * lap.abs().mean(dim=(1, 2, 3)) + 0.0 * timestep.float() + 0.0 * input_ids[:, 0].float()


def colour_token_ids(tokenizer_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ids = []
    for name in COLOURS:
        t = tok(name, add_special_tokens=False).input_ids
        assert len(t) == 1, f"'{name}' is {t}, not one token"
        ids.append(t[0])
    return ids


def export_model(model, out):
    os.makedirs(out, exist_ok=True)
    args = (torch.zeros(2, 3, SIZE, SIZE), torch.zeros(2, dtype=torch.int64), torch.zeros(2, MAX_LEN, dtype=torch.int64))
    torch.onnx.export(model.eval(), args, os.path.join(out, "model.onnx"), input_names=["image", "timestep", "input_ids"],
                      output_names=["score"], dynamic_axes={n: {0: "batch"} for n in ["image", "timestep", "input_ids", "score"]},
                      opset_version=17, dynamo=False)


def copy_tokenizer(src, out, link=False):
    """The tokenizer files beside the graph; `link`: relative symlinks for the
    two large vocabulary files (the test fixtures share one copy)."""
    dst = os.path.join(out, "tokenizer")
    os.makedirs(dst, exist_ok=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        target = os.path.join(dst, f)
        if os.path.lexists(target):
            os.remove(target)
        real = os.path.realpath(os.path.join(src, f))
        if link and f != "tokenizer_config.json":
            os.symlink(os.path.relpath(real, dst), target)
        else:
            shutil.copyfile(real, target)


def toy(kind, out, tokenizer_dir, link=False):
    model = ColourScore(colour_token_ids(tokenizer_dir)) if kind == "colour" else SharpnessScore()
    export_model(model, out)
    copy_tokenizer(tokenizer_dir, out, link)
    with open(os.path.join(out, "preference.json"), "w") as f:
        json.dump({"format": 1, "kind": f"toy-{kind}", "doc": sys.modules[__name__].__doc__.split("Toy models")[1].strip()},
                  f, indent=1)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy")
    t.add_argument("--kind", choices=["colour", "sharpness"], required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--tokenizer", required=True, help="a CLIP tokenizer folder (vocab.json, merges.txt, config)")
    a = ap.parse_args(argv)
    toy(a.kind, a.out, a.tokenizer)


if __name__ == "__main__":
    sys.exit(main())
