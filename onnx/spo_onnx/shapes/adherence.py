"""The shapes world's prompt-adherence preference model, under the contract of
`spo_onnx.export.preference` (inputs `image` f32 [B,3,224,224] CLIP-normalised,
`timestep` int64 [B], `input_ids` int64 [B,77]; output `score` f32 [B]):

    PYTHONPATH=onnx python -m spo_onnx.shapes.adherence --out models/shapes-sdxl/preference \
        [--tokenizer models/shapes-sdxl/tokenizer] [--kind adherence|size]

writes `model.onnx`, `adherence.onnx` (a relative symlink to it: the name the
issue asks for; the runtime opens `model.onnx`), `tokenizer/` (vocabulary as
symlinks to tests/fixtures/clip-tokenizer) and `preference.json`.

Adherence kind, a smooth score of how well the image shows the prompt's colours:
- background estimate = the per-channel median of an 8-pixel border ring
  (TopK, so plain ONNX ops);
- foreground weight of a pixel = sigmoid((|pixel - background| - 0.2) / 0.04)
  in RGB 0-1 units; foreground estimate = the weighted mean colour;
- targets: the first colour word of the prompt (red, green, blue, yellow,
  white, black, purple, orange) is the foreground, the second the background;
- score = -10 (|fg - fg target|^2 + |bg - bg target|^2)
  - 10 relu(0.03 - foreground share): a term drops out when its colour is
  not named; an image without a visible shape loses up to 0.3.
The timestep is ignored (the score is the same at every step).

Size kind (`--kind size`), the toy world's preference with headroom: the
adherence score plus 5 x the foreground share, so a bigger shape in the
prompt's colours wins. The shapes model already adheres (a trained LoRA has
little to gain there), while its shapes span 35-60% of the side, so SPO has
room to move them.
"""

import argparse
import json
import os
import sys

import torch

from ..export.preference import COLOURS, SIZE, colour_token_ids, copy_tokenizer, export_model, unnormalise
from ..fixtures import REPO

BORDER = 8
TAU = 0.2
SOFT = 0.04
MIN_SHARE = 0.03
DEFAULT_TOKENIZER = os.path.join(REPO, "tests", "fixtures", "tiny-sdxl", "tokenizer")


class AdherenceScore(torch.nn.Module):
    def __init__(self, colour_ids):
        super().__init__()
        self.register_buffer("ids", torch.tensor(colour_ids, dtype=torch.int64))
        self.register_buffer("rgb", torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0)
        n = 4 * BORDER * SIZE - 4 * BORDER * BORDER
        self.k = n // 2 + 1

    def colours(self, image):
        """(foreground estimate [B,3], background estimate [B,3], foreground share [B])."""
        x = unnormalise(image).clamp(0.0, 1.0)
        k = BORDER
        ring = torch.cat([
            x[:, :, :k, :].flatten(2), x[:, :, -k:, :].flatten(2),
            x[:, :, k:-k, :k].flatten(2), x[:, :, k:-k, -k:].flatten(2),
        ], dim=2)
        bg = torch.topk(ring, self.k, dim=2).values[:, :, -1]  # the median (upper of the middle two)
        d = ((x - bg[:, :, None, None]) ** 2).sum(1).clamp_min(1e-12).sqrt()  # [B,H,W]
        w = torch.sigmoid((d - TAU) / SOFT)
        mass = w.sum(dim=(1, 2))
        fg = (w.unsqueeze(1) * x).sum(dim=(2, 3)) / (mass + 1e-3).unsqueeze(1)
        return fg, bg, mass / float(SIZE * SIZE)

    def forward(self, image, timestep, input_ids):
        fg, bg, share = self.colours(image)
        hit = (input_ids.unsqueeze(-1) == self.ids.view(1, 1, -1)).float()  # [B,77,K]
        per_pos = hit.sum(-1)  # [B,77]
        before = torch.cumsum(per_pos, dim=1) - per_pos
        first = (hit * (before == 0).float().unsqueeze(-1)).sum(1)  # [B,K] one-hot or zero
        second = (hit * (before == 1).float().unsqueeze(-1)).sum(1)
        e_fg = ((fg - first @ self.rgb) ** 2).sum(-1) * first.sum(-1)
        e_bg = ((bg - second @ self.rgb) ** 2).sum(-1) * second.sum(-1)
        absent = torch.relu(MIN_SHARE - share)
        return -10.0 * (e_fg + e_bg + absent) + 0.0 * timestep.float()


SIZE_WEIGHT = 5.0


class SizeScore(AdherenceScore):
    def forward(self, image, timestep, input_ids):
        _, _, share = self.colours(image)
        return super().forward(image, timestep, input_ids) + SIZE_WEIGHT * share


KINDS = {"adherence": AdherenceScore, "size": SizeScore}


def write(out, tokenizer_dir=DEFAULT_TOKENIZER, kind="adherence"):
    model = KINDS[kind](colour_token_ids(tokenizer_dir)).eval()
    export_model(model, out)
    if kind == "adherence":
        link = os.path.join(out, "adherence.onnx")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink("model.onnx", link)
    copy_tokenizer(tokenizer_dir, out, link=True)
    doc = __doc__.split("Adherence kind, ")[1].strip()
    with open(os.path.join(out, "preference.json"), "w") as f:
        json.dump({"format": 1, "kind": kind, "doc": doc}, f, indent=1)
        f.write("\n")
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="a CLIP tokenizer folder")
    ap.add_argument("--kind", choices=sorted(KINDS), default="adherence")
    a = ap.parse_args(argv)
    write(a.out, a.tokenizer, a.kind)


if __name__ == "__main__":
    sys.exit(main())
