"""Trains the tiny SDXL-architecture shapes model on the 2-core CPU and writes
a diffusers folder (save_pretrained, safetensors):

    PYTHONPATH=onnx python -m spo_onnx.shapes.train --out ~/.cache/spo-runtime/shapes/pipeline

Phases (seeded; `--seed`):
1. the VAE (`AutoencoderKL`, 128x128 -> 4x16x16) on full-size rendered
   images of the seen pairs, decoded from the posterior mean, MSE + 0.1 L1 +
   1e-6 KL, AdamW with cosine decay;
   then a pool of rendered images is encoded (posterior mean) and the
   latents' scaling factor is set to 1/std;
2. the UNet (`UNet2DConditionModel`, `text_time` addition embeddings) together
   with both CLIP text encoders (real 49408-token vocabulary; their layers
   trained at lr x0.3, the token embeddings left at their random init), epsilon prediction on the SDXL scaled-linear schedule, min-SNR
   weights (gamma 5), noise offset 0.05, 10% caption dropout to the zero
   embeddings SDXL uses for an empty negative prompt
   (force_zeros_for_empty_prompt), AdamW with warm-up and cosine decay, EMA.

3. the VAE decoder alone, on the frozen encoder's latents (so the UNet's
   latent space is unchanged), edge-weighted, for sharper corners.
   `--decoder-only --vae-from DIR --out VAE_DIR` runs this phase by itself.

The held-out pairs of `world.HELD_OUT` never appear in training. The folder
(EMA weights) is rewritten every `--save-every` UNet steps, so a run cut
short still leaves a usable model. `--vae-from DIR` reuses a trained VAE
(DIR/vae of an earlier output, or DIR/vae-stage) and skips phase 1.
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..fixtures import SDXL_SCHEDULER, save_diffusers, tokenizer
from . import world

TE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, projection_dim=32)
TIME_EMBED = 8
UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=1,
    attention_head_dim=(1, 2, 2),  # the head count (diffusers' naming): head dim 32
    cross_attention_dim=2 * TE["hidden_size"],
    norm_num_groups=4,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    projection_class_embeddings_input_dim=6 * TIME_EMBED + TE["projection_dim"],
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    # few groups: one channel per group (instance norm) before conv_out
    # erases the absolute colour of a mostly uniform image
    norm_num_groups=2,
    sample_size=world.SIZE,
    scaling_factor=1.0,  # set from the latents' std after phase 1
    force_upcast=False,
)
TIME_IDS = (world.SIZE, world.SIZE, 0, 0, world.SIZE, world.SIZE)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def text_encoders(seed):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = []
    for i, (cls, act) in enumerate(((CLIPTextModel, "quick_gelu"), (CLIPTextModelWithProjection, "gelu"))):
        torch.manual_seed(seed + 1 + i)
        conf = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                              pad_token_id=1, hidden_act=act, **TE)
        out.append(cls(conf))
    return out


def batch_images(rng, n, pairs):
    imgs = [world.render(*world.sample(rng, pairs), rng) for _ in range(n)]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def cosine_lr(step, total, warmup, base, floor=0.05):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(vae, steps, batch, lr, rng):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    pairs = world.seen_pairs()
    t0 = time.time()
    vae.train()
    hist = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 50, lr)
        x = batch_images(rng, batch, pairs)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 0.1 * (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(mse.item())
        if (step + 1) % 50 == 0 or step == steps - 1:
            m = float(np.mean(hist[-50:]))
            log(f"vae step {step + 1}/{steps} mse {m:.5f} psnr {10 * math.log10(4 / m):.2f} dB ({time.time() - t0:.0f}s)")
    vae.eval()
    return time.time() - t0


def edge_weight(x, k=5):
    """1 + 4 near the shape's edge (a k-pixel neighbourhood of any colour
    change), so the decoder spends its capacity on corners and outlines."""
    g = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().sum(1, keepdim=True)
    h = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().sum(1, keepdim=True)
    e = F.pad(g, (0, 0, 0, 1)) + F.pad(h, (0, 1, 0, 0))
    e = (F.max_pool2d(e, k, stride=1, padding=k // 2) > 0.05).float()
    return 1.0 + 4.0 * e


def finetune_decoder(vae, steps, batch, lr, seed):
    """Phase 3: the decoder alone (post_quant_conv + decoder) on the frozen
    encoder's posterior means, edge-weighted MSE + 0.1 L1. The latent space
    the UNet learned is unchanged."""
    rng = np.random.default_rng(seed + 30)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pairs = world.seen_pairs()
    t0 = time.time()
    vae.decoder.train()
    hist = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 20, lr)
        x = batch_images(rng, batch, pairs)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = (edge_weight(x) * (rec - x) ** 2).mean() + 0.1 * (rec - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(F.mse_loss(rec.detach(), x).item())
        if (step + 1) % 50 == 0 or step == steps - 1:
            m = float(np.mean(hist[-50:]))
            log(f"decoder step {step + 1}/{steps} mse {m:.5f} psnr {10 * math.log10(4 / m):.2f} dB ({time.time() - t0:.0f}s)")
    vae.eval()
    return time.time() - t0


@torch.no_grad()
def encode_pool(vae, n, rng, chunk=64):
    """(latents before scaling [n,4,16,16], caption indices [n]) for n
    rendered images of the seen pairs (balanced over pair and shape)."""
    pairs = world.seen_pairs()
    combos = [(f, s, b) for f, b in pairs for s in world.SHAPES]
    lat, cap = [], []
    for i in range(0, n, chunk):
        items = [combos[(i + j) % len(combos)] for j in range(min(chunk, n - i))]
        x = torch.from_numpy(np.stack([world.render(*c, rng) for c in items])).permute(0, 3, 1, 2).float() / 127.5 - 1
        lat.append(vae.encode(x).latent_dist.mean)
        cap.extend(world.caption(*c) for c in items)
    return torch.cat(lat), cap


def encode_prompts(te1, te2, ids1, ids2):
    h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
    o2 = te2(ids2, output_hidden_states=True)
    return torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2.text_embeds


def train_unet(unet, te1, te2, latents, captions, args, rng, save_fn):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(SDXL_SCHEDULER)
    acp = sched.alphas_cumprod.float()
    snr = acp / (1 - acp)
    tok1, tok2 = tokenizer(), tokenizer("!")
    uniq = sorted(set(captions))
    index = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([index[c] for c in captions])
    ids1 = tok1(uniq, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(uniq, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    # the token embeddings stay at their random init (distinct vectors; AdamW
    # over 2 x 1.6M rows would cost more than the rest of the step)
    for te in (te1, te2):
        te.get_input_embeddings().requires_grad_(False)
    te_params = [p for te in (te1, te2) for p in te.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": args.lr, "weight_decay": 0.01, "scale": 1.0},
        {"params": te_params, "lr": args.lr * 0.3, "weight_decay": 0.0, "scale": 0.3},
    ])
    modules = torch.nn.ModuleList([unet, te1, te2])
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed + 100)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32)
    n, b = latents.shape[0], args.batch
    t0 = time.time()
    hist = []
    modules.train()
    for step in range(args.unet_steps):
        lr = cosine_lr(step, args.unet_steps, 100, 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lr * g["scale"] * lr
        sel = torch.from_numpy(rng.integers(n, size=b))
        x0 = latents[sel]
        ci = cap_idx[sel]
        pe, pooled = encode_prompts(te1, te2, ids1[ci], ids2[ci])
        keep = (torch.rand(b, generator=gen) >= args.dropout).float()
        pe = pe * keep.view(b, 1, 1)
        pooled = pooled * keep.view(b, 1)
        noise = torch.randn(x0.shape, generator=gen) + 0.05 * torch.randn(b, 4, 1, 1, generator=gen)
        t = torch.randint(0, 1000, (b,), generator=gen)
        a = acp[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, t, encoder_hidden_states=pe,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(b, 6)}).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in modules.parameters() if p.requires_grad], 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe_, p in zip(ema.parameters(), modules.parameters()):
                pe_.lerp_(p, 1 - decay)
        hist.append(loss.item())
        if (step + 1) % 100 == 0 or step == args.unet_steps - 1:
            el = time.time() - t0
            log(f"unet step {step + 1}/{args.unet_steps} loss {np.mean(hist[-100:]):.4f} lr {lr * args.lr:.2e} "
                f"({el:.0f}s, {el / (step + 1):.3f} s/step)")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.unet_steps:
            save_fn(ema, step + 1)
    save_fn(ema, args.unet_steps)
    return time.time() - t0


def build_pipe(vae, unet, te1, te2):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer(), tokenizer_2=tokenizer("!"), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def main(argv=None):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="diffusers folder to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1: with another job on the 2 cores, 2 threads ran 7x slower")
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae-from", help="reuse this trained VAE folder and skip phase 1")
    ap.add_argument("--pool", type=int, default=11520, help="rendered images encoded for UNet training")
    ap.add_argument("--unet-steps", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=32, help="32 steps twice as often as 64 for the same images")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--dropout", type=float, default=0.1, help="caption dropout")
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--decoder-steps", type=int, default=1500, help="phase 3")
    ap.add_argument("--decoder-lr", type=float, default=1e-3)
    ap.add_argument("--decoder-only", action="store_true",
                    help="run phase 3 alone on --vae-from and write the VAE folder to --out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t_start = time.time()
    os.makedirs(a.out, exist_ok=True)
    stats = {"seed": a.seed, "args": vars(a)}
    if a.decoder_only:
        vae = AutoencoderKL.from_pretrained(a.vae_from).eval()
        finetune_decoder(vae, a.decoder_steps, a.vae_batch, a.decoder_lr, a.seed)
        vae.save_pretrained(a.out)
        log(f"wrote {a.out} in {(time.time() - t_start) / 60:.1f} min")
        return

    if a.vae_from:
        vae = AutoencoderKL.from_pretrained(a.vae_from).eval()
        stats["vae_seconds"] = None
    else:
        torch.manual_seed(a.seed + 10)
        vae = AutoencoderKL(**VAE)
        log(f"vae params {sum(p.numel() for p in vae.parameters()):,}")
        stats["vae_seconds"] = train_vae(vae, a.vae_steps, a.vae_batch, a.vae_lr, rng)
        vae.save_pretrained(os.path.join(a.out, "vae-stage"))
    t = time.time()
    lat, caps = encode_pool(vae, a.pool, rng)
    sf = 1.0 / lat.std().item()
    vae.register_to_config(scaling_factor=sf)
    latents = lat * sf
    log(f"encoded {len(caps)} images in {time.time() - t:.0f}s; latent std {lat.std().item():.3f} -> scaling_factor {sf:.5f}")

    te1, te2 = text_encoders(a.seed)
    torch.manual_seed(a.seed + 20)
    unet = UNet2DConditionModel(**UNET)
    log(f"unet params {sum(p.numel() for p in unet.parameters()):,}; text encoders "
        f"{sum(p.numel() for p in te1.parameters()):,} + {sum(p.numel() for p in te2.parameters()):,}")

    def save(ema, step):
        u, e1, e2 = (copy.deepcopy(m).eval() for m in ema)
        save_diffusers(build_pipe(vae, u, e1, e2), a.out, SDXL_SCHEDULER)
        vae.save_pretrained(os.path.join(a.out, "vae-stage"))
        stats.update(unet_steps_saved=step, total_seconds=time.time() - t_start)
        with open(os.path.join(a.out, "train_stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
        log(f"saved EMA weights at step {step} to {a.out}")

    final = {}

    def keep(ema, step):
        final["ema"] = ema
        save(ema, step)

    stats["unet_seconds"] = train_unet(unet, te1, te2, latents, caps, a, rng, keep)
    if a.decoder_steps:
        stats["decoder_seconds"] = finetune_decoder(vae, a.decoder_steps, a.vae_batch, a.decoder_lr, a.seed)
        save(final["ema"], a.unet_steps)
    stats["total_seconds"] = time.time() - t_start
    with open(os.path.join(a.out, "train_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    log(f"done in {stats['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
