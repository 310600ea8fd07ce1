"""Structure check at real size: a randomly initialised SDXL-base UNet (the
config values of stabilityai/stable-diffusion-xl-base-1.0, written inline),
exported with --fp16 semantics and external data. Prints export time, file
sizes, peak RSS and LoRA target counts. Manual only (minutes); not part of
pytest. fp16 is traced from the fp16 module and the weights are streamed to
model.onnx_data (see export.export_unet); the earlier fp32-trace-then-convert
route was OOM-killed at 23.6 GB.

    PYTHONPATH=onnx python -m spo_onnx.bench.fullsize_check --out /tmp/sdxl-unet-check [--fp32] [--lora-slots 64] [--trace 256]
"""

import argparse
import json
import os
import resource
import time

import torch

SDXL_BASE_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)


def kohya_counts(unet):
    """kohya default targets: Linear (and 1x1 Conv) modules inside
    Transformer2DModel blocks; attention-only: to_q/to_k/to_v/to_out.0."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    default, attn = set(), set()
    for name, mod in unet.named_modules():
        if isinstance(mod, Transformer2DModel):
            for sub, m in mod.named_modules():
                full = f"{name}.{sub}"
                if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)):
                    default.add(full)
                    if full.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
                        attn.add(full)
    return len(default), len(attn)


def main(argv=None):
    from diffusers import UNet2DConditionModel

    from .. import export

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--lora-slots", type=int, default=0)
    ap.add_argument("--trace", type=int, default=256, help="image size to trace at (dynamic axes regardless)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    unet = UNet2DConditionModel(**SDXL_BASE_UNET).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    dt = torch.float32 if a.fp32 else torch.float16  # export_unet traces in this dtype
    t1 = time.time()
    default, attn = kohya_counts(unet)
    print(f"params {n_params:,} (expect 2,567,463,684); built in {t1 - t0:.1f}s")
    print(f"kohya targets: default {default} (expect 722), attention-only {attn} (expect 560)")
    out = os.path.join(a.out, "unet")
    export.export_unet(unet, out, True, dt, export.DEFAULT_OPSET, False, 2, None, a.lora_slots, 1280, trace_hw=(a.trace, a.trace))
    t2 = time.time()
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)}
    with open(os.path.join(out, "lora_targets.json")) as f:
        t = json.load(f)
    layouts = {}
    for e in t["modules"]:
        layouts[e["layout"]] = layouts.get(e["layout"], 0) + 1
    print(f"export {t2 - t1:.1f}s")
    for f, s in sorted(sizes.items()):
        print(f"  {f}: {s / 2**20:.1f} MiB")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"lora_targets: {len(t['modules'])} modules, missing {len(t['missing'])}, layouts {layouts}, slots {len(t['slots'])}")


if __name__ == "__main__":
    main()
