"""Goldens for the SPO step math (src/train/spo.rs, src/train/optim.rs), from
a PyTorch reference written from the official training code's formulas:
diffusers' DDIMScheduler for the alpha-bars and the step variance, torch
autograd for the loss's gradient with respect to the UNet outputs, and
torch.optim.AdamW / clip_grad_norm_ for the optimizer.

    PYTHONPATH=onnx python -m spo_onnx.goldens.spo

Writes tests/fixtures/goldens/spo/{index.json, tensors.safetensors}.
"""

import json
import math
import os
import sys

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "fixtures", "goldens", "spo")
SHAPE = (4, 8, 8)
# (name, t, eta, guidance, beta, clip, reference noise of win and lose): the
# reference UNet's outputs are the policy's plus noise of this size, which
# decides whether a ratio stays inside the clamp.
LOSS_CASES = [
    ("inside", 751, 1.0, 5.0, 10.0, 0.1, (0.01, 0.01)),
    ("win_clamped", 351, 1.0, 5.0, 10.0, 0.1, (0.5, 0.01)),
    ("sd15_eta_half", 501, 0.5, 7.5, 5.0, 0.2, (0.02, 0.03)),
]


def scheduler():
    from diffusers import DDIMScheduler

    # SDXL base's scheduler config (leading spacing, offset 1), 20 steps.
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    s.set_timesteps(20)
    return s


def log_prob(x_prev, mu, sigma):
    """The official code's log-probability: a mean over C*H*W."""
    lp = -((x_prev - mu) ** 2) / (2 * sigma**2) - math.log(sigma) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def loss_case(s, name, t, eta, w, beta, clip, ref_noise, gen, tensors):
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    a_t = s.alphas_cumprod[t].double()
    a_p = s.alphas_cumprod[prev].double() if prev >= 0 else s.final_alpha_cumprod.double()
    sigma = eta * float(s._get_variance(t, prev)) ** 0.5
    x_t = torch.randn((2,) + SHAPE, generator=gen, dtype=torch.float64)
    eps_u = torch.randn((2,) + SHAPE, generator=gen, dtype=torch.float64)
    eps_c = eps_u + 0.3 * torch.randn((2,) + SHAPE, generator=gen, dtype=torch.float64)
    noise = torch.tensor(ref_noise, dtype=torch.float64).view(2, 1, 1, 1)
    ref_u = eps_u + noise * torch.randn((2,) + SHAPE, generator=gen, dtype=torch.float64)
    ref_c = eps_c + noise * torch.randn((2,) + SHAPE, generator=gen, dtype=torch.float64)
    # x_prev drawn from the policy's transition, as sampling does.
    eps_u.requires_grad_(True)
    eps_c.requires_grad_(True)

    def mean(u, c):
        e = u + w * (c - u)
        x0 = (x_t - (1 - a_t).sqrt() * e) / a_t.sqrt()
        return a_p.sqrt() * x0 + (1 - a_p - sigma**2) ** 0.5 * e

    with torch.no_grad():
        x_prev = mean(eps_u, eps_c) + sigma * torch.randn((2,) + SHAPE, generator=gen, dtype=torch.float64)
    log_r = log_prob(x_prev, mean(eps_u, eps_c), sigma) - log_prob(x_prev, mean(ref_u, ref_c), sigma)
    ratio = torch.clamp(log_r.exp(), 1 - clip, 1 + clip)
    loss = -torch.nn.functional.logsigmoid(beta * (ratio[0].log() - ratio[1].log()))
    loss.backward()
    for k, v in {"x_t": x_t, "x_prev": x_prev, "eps_u": eps_u, "eps_c": eps_c, "ref_u": ref_u, "ref_c": ref_c,
                 "cot_u": eps_u.grad, "cot_c": eps_c.grad}.items():
        tensors[f"{name}.{k}"] = v.detach().float().numpy()
    return {"name": name, "t": t, "prev": prev, "alpha_bar_t": float(a_t), "alpha_bar_prev": float(a_p),
            "eta": eta, "sigma": sigma, "guidance": w, "beta": beta, "clip": clip,
            "log_ratio": [float(v) for v in log_r.detach()], "loss": float(loss.detach())}


def adamw_case(gen, tensors, clip):
    shapes = {"a": (3, 5), "b": (7,)}
    params = {k: torch.randn(s, generator=gen).requires_grad_(True) for k, s in shapes.items()}
    for k, p in params.items():
        tensors[f"adamw.init.{k}"] = p.detach().numpy().copy()
    cfg = {"lr": 1e-2, "betas": [0.9, 0.999], "weight_decay": 1e-2, "eps": 1e-8, "steps": 4, "max_grad_norm": clip}
    opt = torch.optim.AdamW(params.values(), lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"],
                            eps=cfg["eps"])
    tag = "clip" if clip else "noclip"
    for step in range(cfg["steps"]):
        for k, p in params.items():
            # gradients of a norm well above 1, so clipping bites
            p.grad = 3.0 * torch.randn(shapes[k], generator=gen)
            tensors[f"adamw.{tag}.{step}.grad.{k}"] = p.grad.numpy().copy()
        if clip:
            torch.nn.utils.clip_grad_norm_(params.values(), clip)
        opt.step()
        for k, p in params.items():
            tensors[f"adamw.{tag}.{step}.param.{k}"] = p.detach().numpy().copy()
    return cfg


def main(argv=None):
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    s = scheduler()
    tensors = {}
    index = {"timesteps": [int(t) for t in s.timesteps],
             "loss": [loss_case(s, *c, gen=gen, tensors=tensors) for c in LOSS_CASES],
             "adamw": {"noclip": adamw_case(torch.Generator().manual_seed(6), tensors, None),
                       "clip": adamw_case(torch.Generator().manual_seed(6), tensors, 1.0)}}
    os.makedirs(ROOT, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(ROOT, "tensors.safetensors"))
    with open(os.path.join(ROOT, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    for c in index["loss"]:
        print(c["name"], "log r", c["log_ratio"], "loss", c["loss"])


if __name__ == "__main__":
    sys.exit(main())
