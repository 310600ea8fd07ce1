"""diffusers / PEFT baseline for the LoRA merge benchmark (examples/bench_lora_merge.rs).

    PYTHONPATH=onnx python -m spo_onnx.bench.lora_fuse [--rank 64] [--threads 2] [--repeats 2]

In one process: a full-size SDXL base UNet2DConditionModel from its config
(random init, fp32, CPU), an SPO-sized PEFT LoRA (rank 64, alpha 64) on the
560 attention projections (to_q / to_k / to_v / to_out.0 of attn1 / attn2) with
random weights from a fixed seed, then timed:

* `unet.load_lora_adapter(state_dict, prefix=None, adapter_name=...)` (load);
* `unet.fuse_lora()` (PEFT `merge`: W += scale * B @ A) -- "fuse alone";
* load + fuse together;
* `unfuse_lora()` and a second `fuse_lora()` (repeats).
"""

import argparse
import gc
import os
import resource
import time

import torch

SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=64.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="extra unfuse+fuse rounds")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import diffusers
    import peft
    from diffusers import UNet2DConditionModel

    print(f"torch={torch.__version__} diffusers={diffusers.__version__} peft={peft.__version__} threads={torch.get_num_threads()}")

    t = time.perf_counter()
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(torch.float32).eval()
    unet.requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"unet_init_s={time.perf_counter() - t:.2f} params={n_params} ({n_params * 4 / 2**30:.2f} GiB f32) max_rss_gib={rss_gib():.2f}")

    # LoRA state dict in PEFT key format: <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r].
    g = torch.Generator().manual_seed(1234)
    sd = {}
    flop = 0
    n_mod = 0
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attn" in name and name.endswith(TARGETS):
            out_f, in_f = mod.weight.shape
            sd[f"{name}.lora_A.weight"] = (torch.rand(args.rank, in_f, generator=g) * 2 - 1) * 0.05
            sd[f"{name}.lora_B.weight"] = (torch.rand(out_f, args.rank, generator=g) * 2 - 1) * 0.05
            flop += 2 * out_f * in_f * args.rank + 2 * out_f * in_f
            n_mod += 1
    print(f"lora_modules={n_mod} rank={args.rank} alpha={args.alpha} flop_total={flop:.4e}")
    assert n_mod == 560, n_mod

    # metadata carries the adapter config (alpha); the rank is read from lora_B's shape.
    metadata = {"r": args.rank, "lora_alpha": args.alpha, "target_modules": list(TARGETS)}

    gc.collect()
    t0 = time.perf_counter()
    try:
        unet.load_lora_adapter(dict(sd), prefix=None, adapter_name="spo", metadata=metadata)
    except (TypeError, ValueError) as e:  # older signature: no metadata
        print(f"load_lora_adapter with metadata failed ({e}); retrying without")
        unet.load_lora_adapter(dict(sd), prefix=None, adapter_name="spo")
    t1 = time.perf_counter()
    cfg = unet.peft_config["spo"]
    print(f"peft_config r={cfg.r} lora_alpha={cfg.lora_alpha} n_targets={len(cfg.target_modules) if cfg.target_modules else None}")
    unet.fuse_lora()
    t2 = time.perf_counter()
    load_s, fuse_s = t1 - t0, t2 - t1
    print(f"load_s={load_s:.3f} fuse_s={fuse_s:.3f} load_plus_fuse_s={t2 - t0:.3f} fuse_gflops={flop / fuse_s / 1e9:.2f} max_rss_gib={rss_gib():.2f}")

    fuses = [fuse_s]
    for i in range(args.repeats):
        t = time.perf_counter()
        unet.unfuse_lora()
        tu = time.perf_counter() - t
        t = time.perf_counter()
        unet.fuse_lora()
        tf = time.perf_counter() - t
        fuses.append(tf)
        print(f"repeat={i} unfuse_s={tu:.3f} fuse_s={tf:.3f} fuse_gflops={flop / tf / 1e9:.2f}")
    best = min(fuses)
    print(f"fuse_best_s={best:.3f} fuse_best_gflops={flop / best / 1e9:.2f} load_s={load_s:.3f} max_rss_gib={rss_gib():.2f} pid={os.getpid()}")


if __name__ == "__main__":
    main()
