"""CLIP text encoders with every hidden state as an output.
"""

import os
import tempfile

import torch

from .common import _export, _patch_forward, save_onnx, to_fp16


# --------------------------------------------------------------------------- text encoders


def export_text_encoder(te, out_dir, with_projection, opset, dynamo, batch, static, fp16=False):
    te = te.eval().to(torch.float32)
    n_layers = te.config.num_hidden_layers
    orig_forward = te.forward

    def forward(self, input_ids):
        out = orig_forward(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        hs = tuple(out.hidden_states)
        if with_projection:
            return (out.text_embeds, out.last_hidden_state) + hs
        return (out.last_hidden_state, out.pooler_output) + hs

    _patch_forward(te, forward)
    hs_names = [f"hidden_states.{i}" for i in range(n_layers + 1)]
    outputs = (["text_embeds", "last_hidden_state"] if with_projection else ["last_hidden_state", "pooler_output"]) + hs_names
    ids = torch.full((batch, 77), 49407, dtype=torch.int64)
    ids[:, 0] = 49406
    ids[:, 1:4] = torch.tensor([320, 1929, 539])
    axes = None
    if not static:
        axes = {"input_ids": {0: "batch_size"}}
        for n in outputs:
            axes[n] = {0: "batch_size"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "model.onnx")
            with torch.no_grad():
                _export(te, (ids,), p, ["input_ids"], outputs, axes, opset, dynamo)
            import onnx

            m = onnx.load(p)
        if fp16:
            m = to_fp16(m)
        save_onnx(m, os.path.join(out_dir, "model.onnx"))
    finally:
        del te.forward
    te.config.to_json_file(os.path.join(out_dir, "config.json"))
