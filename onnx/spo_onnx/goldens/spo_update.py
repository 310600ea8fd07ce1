"""Golden for one SPO training pass on the tiny SDXL model, from PyTorch with
the official code's formulas: the diffusers UNet with a peft LoRA on SPO's
targets (the policy) and the same UNet with the adapter disabled (the
reference), CFG in the loss, the DDIM mean with eta, the log-probability as a
mean over C*H*W, the clamped ratio, -logsigmoid(beta * (log r_w - log r_l))
averaged over a mini-batch, clip_grad_norm_ and torch.optim.AdamW.

    PYTHONPATH=onnx python -m spo_onnx.goldens.spo_update

Writes tests/fixtures/goldens/spo_update/{index.json, tensors.safetensors}:
the pairs (x_t, x_prev of win and lose, step index, prompt), the prompts'
conditioning (random embeddings: the text encoders are not under test), the
initial LoRA and the LoRA after each mini-batch's AdamW step.
"""

import json
import math
import os
import sys

import numpy as np
import torch

from .grad import ROOT as FIXTURES, lora_params, peft_unet

OUT = os.path.join(FIXTURES, "goldens", "spo_update")
MODEL = "tiny-sdxl"
RANK, ALPHA = 4, 8.0
# The toy preset's constants (src/train/config.rs) with the official clamp, so
# that a ratio leaves it.
CFG = {"steps": 10, "eta": 1.0, "guidance": 5.0, "beta": 10.0, "clip": 0.1, "lr": 3e-3, "betas": [0.9, 0.999],
       "weight_decay": 1e-4, "eps": 1e-8, "max_grad_norm": 1.0, "batch": 2}
# (step index, prompt) of each pair, in training order: two mini-batches.
PAIRS = [(3, 0), (6, 1), (2, 1), (8, 0)]
LATENT = (1, 4, 8, 8)
# The initial LoRA's scale: away from zero, so the policy differs from the
# reference, yet small enough that float32 gradients stay within a small
# fraction of a percent of float64 ones (a LoRA of 0.3 gave 0.5%: the tiny
# random UNet amplifies rounding); the index records that float32 floor.
INIT_STD = 0.1


def scheduler():
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_pretrained(os.path.join(FIXTURES, "diffusers", MODEL, "scheduler"))
    s.set_timesteps(CFG["steps"])
    return s


def transition(s, t):
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    a_t = s.alphas_cumprod[t].double()
    a_p = s.alphas_cumprod[prev].double() if prev >= 0 else s.final_alpha_cumprod.double()
    sigma = CFG["eta"] * float(s._get_variance(t, prev)) ** 0.5
    return a_t, a_p, sigma


def guided(unet, x, t, cond):
    out = unet(torch.cat([x, x]), torch.tensor([float(t)] * 2, dtype=torch.float64),
               cond["encoder_hidden_states"],
               added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
    u, c = out.chunk(2)
    return u + CFG["guidance"] * (c - u)


def log_prob(x_prev, eps, x_t, a_t, a_p, sigma):
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mu = a_p.sqrt() * x0 + (1 - a_p - sigma**2) ** 0.5 * eps
    lp = -((x_prev - mu) ** 2) / (2 * sigma**2) - math.log(sigma) - math.log(math.sqrt(2 * math.pi))
    return lp.mean()


def pair_loss(unet, s, pair, conds):
    t = int(s.timesteps[pair["step"]])
    a_t, a_p, sigma = transition(s, t)
    cond = conds[pair["prompt"]]
    log_r = []
    for b in range(2):
        x_t, x_prev = pair["x_t"][b], pair["x_prev"][b]
        lp = log_prob(x_prev, guided(unet, x_t, t, cond), x_t, a_t, a_p, sigma)
        unet.disable_adapters()
        with torch.no_grad():
            lp_ref = log_prob(x_prev, guided(unet, x_t, t, cond), x_t, a_t, a_p, sigma)
        unet.enable_adapters()
        log_r.append(lp - lp_ref)
    clip = CFG["clip"]
    ratio = [torch.clamp(lr.exp(), 1 - clip, 1 + clip) for lr in log_r]
    loss = -torch.nn.functional.logsigmoid(CFG["beta"] * (ratio[0].log() - ratio[1].log()))
    return loss, [float(v) for v in log_r]


def make_pairs(unet, s, conds, gen):
    """x_t random; x_prev drawn from the policy's transition (as sampling does)."""
    pairs = []
    for step, prompt in PAIRS:
        t = int(s.timesteps[step])
        a_t, a_p, sigma = transition(s, t)
        p = {"step": step, "prompt": prompt, "x_t": [], "x_prev": []}
        for _ in range(2):
            x_t = torch.randn(LATENT, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                eps = guided(unet, x_t, t, conds[prompt])
            x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            mu = a_p.sqrt() * x0 + (1 - a_p - sigma**2) ** 0.5 * eps
            p["x_t"].append(x_t)
            p["x_prev"].append(mu + sigma * torch.randn(LATENT, generator=gen, dtype=torch.float64))
        pairs.append(p)
    return pairs


def train(unet, params, s, pairs, conds):
    """The official pass: per mini-batch, the mean loss, backward, clipping
    and one AdamW step. Returns the LoRA after each step and the stats."""
    opt = torch.optim.AdamW(params.values(), lr=CFG["lr"], betas=tuple(CFG["betas"]),
                            weight_decay=CFG["weight_decay"], eps=CFG["eps"])
    after, stats = [], []
    for start in range(0, len(pairs), CFG["batch"]):
        batch = pairs[start:start + CFG["batch"]]
        losses, ratios = zip(*(pair_loss(unet, s, p, conds) for p in batch))
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params.values(), CFG["max_grad_norm"]))
        opt.step()
        after.append({k: p.detach().clone() for k, p in params.items()})
        stats.append({"loss": float(loss), "log_ratio": ratios, "grad_norm": norm})
    return after, stats


def cast(x, dtype):
    if isinstance(x, dict):
        return {k: cast(v, dtype) for k, v in x.items()}
    if isinstance(x, list):
        return [cast(v, dtype) for v in x]
    return x.to(dtype) if torch.is_tensor(x) else x


def main(argv=None):
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(21)
    unet = peft_unet(MODEL, RANK, ALPHA)
    params = lora_params(unet)
    with torch.no_grad():
        # A LoRA away from zero, so the policy differs from the reference and
        # some ratios leave the clamp.
        for k in sorted(params):
            params[k].copy_(torch.randn(params[k].shape, generator=gen, dtype=torch.float64) * INIT_STD)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    conds = [{"encoder_hidden_states": torch.randn(2, 77, cfg.cross_attention_dim, generator=gen, dtype=torch.float64),
              "text_embeds": torch.randn(2, pooled, generator=gen, dtype=torch.float64),
              "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2, dtype=torch.float64)}
             for _ in range(2)]
    s = scheduler()
    pairs = make_pairs(unet, s, conds, gen)
    f32 = lambda t: np.ascontiguousarray(t.detach().float().numpy())
    tensors = {f"init.{k}": f32(p) for k, p in params.items()}
    for i, c in enumerate(conds):
        tensors.update({f"cond.{i}.{k}": f32(v) for k, v in c.items()})
    for i, p in enumerate(pairs):
        for b, side in enumerate(["win", "lose"]):
            tensors[f"pair.{i}.{side}.x_t"] = f32(p["x_t"][b])
            tensors[f"pair.{i}.{side}.x_prev"] = f32(p["x_prev"][b])
    init = {k: p.detach().clone() for k, p in params.items()}
    after, updates = train(unet, params, s, pairs, conds)
    for u, a in enumerate(after):
        tensors.update({f"after.{u}.{k}": f32(p) for k, p in a.items()})
        print(f"update {u}: {updates[u]}")
    # The same pass in float32 from the float32-rounded inputs: the precision
    # floor any float32 implementation meets.
    unet32 = unet.float()
    params32 = lora_params(unet32)
    with torch.no_grad():
        for k, p in params32.items():
            p.copy_(init[k].float())
    after32, _ = train(unet32, params32, s, cast(cast(pairs, torch.float32), torch.float32),
                       cast(conds, torch.float32))
    floor = max(float((after32[-1][k].double() - after[-1][k]).abs().max()) for k in init)
    print(f"float32 torch vs float64: largest parameter difference {floor:.3e}")
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "tensors.safetensors"))
    index = {"model": MODEL, "config": CFG, "timesteps": [int(t) for t in s.timesteps],
             "pairs": [{"step": st, "prompt": pr} for st, pr in PAIRS], "updates": updates,
             "float32_floor": floor}
    with open(os.path.join(OUT, "index.json"), "w") as f:
        json.dump(index, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
