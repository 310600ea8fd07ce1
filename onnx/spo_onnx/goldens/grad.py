"""Gradient goldens for the LoRA training graphs, from PyTorch autograd on the
diffusers UNet with a peft LoRA (the fixtures' own weights, in float64), and
the training folders they check.

    PYTHONPATH=onnx python -m spo_onnx.goldens.grad [--only tiny-sdxl]

For each model it writes, under tests/fixtures/train/<model>/:
- the training folder (`spo_onnx.export.train`);
- `inputs.safetensors`: `spo grad`'s input contract (UNet inputs, `cotangent`,
  and the LoRA in PEFT form, `<module>.lora_A.weight` [r,in] and
  `<module>.lora_B.weight` [out,r]);
- `expected.safetensors`: `out_sample` and, under the LoRA keys, the gradient
  of sum(cotangent * out_sample) with respect to each parameter.
"""

import argparse
import os
import sys

import numpy as np
import torch

from ..export import train as train_graphs

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "fixtures")
# model -> (training folders: suffix -> (ONNX UNet folder, segments), shapes)
CASES = {
    "tiny-sdxl": {"unets": {"": ("tiny-sdxl/unet", 1)},
                  "batch": 2, "latent": (8, 8), "seq": 77, "rank": 4, "alpha": 8.0, "seed": 11},
    "tiny-sd15": {"unets": {"": ("tiny-sd15/unet", 1), "-fp16": ("tiny-sd15-fp16/unet", 1),
                            "-dynamo": ("tiny-sd15-dynamo/unet", 1), "-seg3": ("tiny-sd15/unet", 3)},
                  "batch": 2, "latent": (8, 8), "seq": 77, "rank": 4, "alpha": 4.0, "seed": 12},
}


def peft_unet(model, rank, alpha):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "diffusers", model, "unet"))
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                target_modules=list(train_graphs.SPO_TARGETS)))
    return unet.double().eval()


def lora_params(unet):
    """PEFT key (without the adapter name) -> parameter."""
    out = {}
    for name, p in unet.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            module, _, rest = name.partition(".lora_")
            which = rest.split(".")[0]
            out[f"{module}.lora_{which}.weight"] = p
        else:
            p.requires_grad_(False)
    return out


def random_inputs(unet, case, gen):
    b = case["batch"]
    h, w = case["latent"]
    cfg = unet.config
    x = {
        "sample": torch.randn(b, cfg.in_channels, h, w, generator=gen),
        "timestep": torch.tensor([421.0, 87.0][:b] + [500.0] * max(0, b - 2)),
        "encoder_hidden_states": torch.randn(b, case["seq"], cfg.cross_attention_dim, generator=gen),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        x["text_embeds"] = torch.randn(b, pooled, generator=gen)
        x["time_ids"] = torch.tensor([[8.0 * h, 8.0 * w, 0.0, 0.0, 8.0 * h, 8.0 * w]] * b)
    x["cotangent"] = torch.randn(b, cfg.out_channels, h, w, generator=gen)
    return x


def autograd(unet, x, params):
    kwargs = {}
    if "text_embeds" in x:
        kwargs["added_cond_kwargs"] = {"text_embeds": x["text_embeds"].double(), "time_ids": x["time_ids"].double()}
    out = unet(x["sample"].double(), x["timestep"].double(), x["encoder_hidden_states"].double(), **kwargs).sample
    (out * x["cotangent"].double()).sum().backward()
    return out.detach(), {k: p.grad.detach() for k, p in params.items()}


def write_case(model, case):
    from safetensors.numpy import save_file

    out_dir = os.path.join(ROOT, "train", model)
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(case["seed"])
    unet = peft_unet(model, case["rank"], case["alpha"])
    params = lora_params(unet)
    gen = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        for key in sorted(params):
            params[key].copy_(torch.randn(params[key].shape, generator=gen, dtype=torch.float64) * 0.2)
    x = random_inputs(unet, case, gen)
    out, grads = autograd(unet, x, params)
    f32 = lambda t: np.ascontiguousarray(t.detach().float().numpy())
    inputs = {k: f32(v) for k, v in x.items()}
    inputs.update({k: f32(p) for k, p in params.items()})
    save_file(inputs, os.path.join(out_dir, "inputs.safetensors"))
    expected = {"out_sample": f32(out)}
    expected.update({k: f32(g) for k, g in grads.items()})
    save_file(expected, os.path.join(out_dir, "expected.safetensors"))
    h, w = case["latent"]
    for suffix, (unet_dir, segments) in case["unets"].items():
        train_graphs.build(os.path.join(ROOT, unet_dir), os.path.join(out_dir, "graphs" + suffix),
                           case["batch"], h, w, case["seq"], case["rank"], case["alpha"], train_graphs.SPO_TARGETS,
                           segments=segments, sample=suffix == "")
    print(f"{model}: {len(params)} LoRA tensors, |out| max {out.abs().max():.3g}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(CASES))
    a = ap.parse_args(argv)
    for model, case in CASES.items():
        if a.only in (None, model):
            write_case(model, case)


if __name__ == "__main__":
    sys.exit(main())
