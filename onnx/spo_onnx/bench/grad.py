"""PyTorch side of the gradient benchmark (scripts/bench_grad.sh), and the
benchmark's larger model.

    PYTHONPATH=onnx python -m spo_onnx.bench.grad make --out DIR
    PYTHONPATH=onnx python -m spo_onnx.bench.grad torch --unet DIFFUSERS_UNET --inputs IN.safetensors \
        --rank R --alpha A [--repeats N] [--threads T]

`make` builds the SDXL topology at a quarter of its width (every block, the
1/2/10 transformer layers; channels 80/160/320, heads of 80, 80 and 64) with random
weights, and writes DIR/diffusers-unet, DIR/unet (the ONNX export), DIR/train
(its training folder: batch 2, latent 32x32, rank 8) and DIR/inputs.safetensors.

`torch` times the diffusers UNet with a peft LoRA (the parameters from the
inputs file) on the same inputs: a forward under no_grad, and a forward plus
backward of sum(cotangent * out). Peak memory is the resident-set high-water
mark of each phase (reset through /proc/self/clear_refs after a warm-up).
Prints one `key=value` line.
"""

import argparse
import os
import statistics
import sys
import time

import torch

from ..export import train as train_graphs
from ..goldens.grad import lora_params, random_inputs
from . import fullsize_check

NARROW = dict(fullsize_check.SDXL_BASE_UNET, block_out_channels=(80, 160, 320), attention_head_dim=(1, 2, 5),
              cross_attention_dim=512, projection_class_embeddings_input_dim=256 + 6 * 256, norm_num_groups=16)
CASE = {"batch": 2, "latent": (32, 32), "seq": 77, "rank": 8, "alpha": 8.0}


def make(out):
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import save_file
    from peft import LoraConfig

    from .. import export

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**NARROW).eval()
    unet.save_pretrained(os.path.join(out, "diffusers-unet"))
    export.export_unet(unet, os.path.join(out, "unet"), True, torch.float32, export.DEFAULT_OPSET, False, 2, None, 0,
                       text_embeds_dim=256, trace_hw=(256, 256))
    h, w = CASE["latent"]
    train_graphs.build(os.path.join(out, "unet"), os.path.join(out, "train"), CASE["batch"], h, w, CASE["seq"],
                       CASE["rank"], CASE["alpha"], train_graphs.SPO_TARGETS)
    unet.add_adapter(LoraConfig(r=CASE["rank"], lora_alpha=CASE["alpha"], init_lora_weights=False,
                                target_modules=list(train_graphs.SPO_TARGETS)))
    gen = torch.Generator().manual_seed(1)
    x = random_inputs(unet, CASE, gen)
    x.update({k: torch.randn(p.shape, generator=gen) * 0.05 for k, p in lora_params(unet).items()})
    save_file({k: v.float().contiguous().numpy() for k, v in x.items()}, os.path.join(out, "inputs.safetensors"))


def peak_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timed(fn, repeats):
    fn()  # warm-up
    reset_peak()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, peak_mib()


def bench_torch(unet_dir, inputs, rank, alpha, repeats, threads):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from safetensors.torch import load_file

    if threads:
        torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(train_graphs.SPO_TARGETS)))
    x = load_file(inputs)
    params = lora_params(unet)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(x[k])
    kwargs = {}
    if "text_embeds" in x:
        kwargs["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}

    def forward():
        with torch.no_grad():
            unet(x["sample"], x["timestep"], x["encoder_hidden_states"], **kwargs)

    def train():
        for p in params.values():
            p.grad = None
        out = unet(x["sample"], x["timestep"], x["encoder_hidden_states"], **kwargs).sample
        (out * x["cotangent"]).sum().backward()

    f, f_peak = timed(forward, repeats)
    t, t_peak = timed(train, repeats)
    print(f"torch threads={torch.get_num_threads()} forward_ms={f:.2f} train_ms={t:.2f} "
          f"backward_over_forward={(t - f) / f:.2f} forward_peak_mib={f_peak:.0f} train_peak_mib={t_peak:.0f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    t = sub.add_parser("torch")
    t.add_argument("--unet", required=True)
    t.add_argument("--inputs", required=True)
    t.add_argument("--rank", type=int, required=True)
    t.add_argument("--alpha", type=float, required=True)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "make":
        make(a.out)
    else:
        bench_torch(a.unet, a.inputs, a.rank, a.alpha, a.repeats, a.threads)


if __name__ == "__main__":
    sys.exit(main())
