"""The VAE decoder and encoder.
"""

import os
import tempfile

import torch

from .common import _config_json, _export, _patch_forward, save_onnx, to_fp16


# --------------------------------------------------------------------------- VAE


def export_vae(vae, out_root, dtype, opset, dynamo, batch, static_hw):
    import onnx

    out_dtype = dtype
    dtype = torch.float32
    vae = vae.eval().to(torch.float32)
    cfg = vae.config
    h, w = static_hw or (64, 64)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, cfg.latent_channels, h // factor, w // factor, generator=g).to(dtype)
    img = (torch.rand(batch, cfg.in_channels, h, w, generator=g) * 2 - 1).to(dtype)
    orig_forward = vae.forward

    def dec(self, latent_sample):
        return self.decode(latent_sample, return_dict=False)[0]

    def enc(self, sample):
        hcur = self.encoder(sample)
        if self.quant_conv is not None:
            hcur = self.quant_conv(hcur)
        return hcur

    for name, fn, x, iname, oname in (
        ("vae_decoder", dec, lat, "latent_sample", "sample"),
        ("vae_encoder", enc, img, "sample", "latent_parameters"),
    ):
        _patch_forward(vae, fn)
        axes = None if static_hw else {iname: {0: "batch_size", 2: "height", 3: "width"}, oname: {0: "batch_size", 2: "height", 3: "width"}}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                p = os.path.join(tmp, "model.onnx")
                with torch.no_grad():
                    _export(vae, (x,), p, [iname], [oname], axes, opset, dynamo)
                m = onnx.load(p)
            if out_dtype == torch.float16:
                m = to_fp16(m)
        finally:
            del vae.forward
        out_dir = os.path.join(out_root, name)
        save_onnx(m, os.path.join(out_dir, "model.onnx"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write(_config_json(cfg))
    assert vae.forward == orig_forward
