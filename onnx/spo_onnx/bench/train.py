"""One SPO round in PyTorch, the way the official code runs it, for
scripts/bench_train.sh to compare with `spo train` on the same model, the
same settings (the toy preset: 10 DDIM steps, eta 1, CFG 5, pools of 4 at
every step from step 2, batches of 4 pairs), the same preference model
(the toy colour model, in PyTorch) and the same threads.

    PYTHONPATH=onnx python -m spo_onnx.bench.train --model DIR --rounds N --threads T

Prints one JSON line per round with the phases `spo train` reports
(sampling, scoring, forward, backward, optimizer, in seconds), then one line
with the process's peak RSS in MiB. The pool, scoring, pairing and the loss
follow src/train/sampler.rs and spo.rs (the official algorithm); the
candidates are scored by the colour model, decoded by the VAE.
"""

import argparse
import json
import math
import os
import resource
import sys
import time

import torch

from ..export import train as train_graphs
from ..export.preference import ColourScore, colour_token_ids

STEPS, ETA, W, POOL, DIVERT, BATCH = 10, 1.0, 5.0, 4, 2, 4
BETA, CLIP, LR = 10.0, 0.5, 3e-3
PROMPTS = ["a red apple", "a blue car", "a green field", "a yellow flower"]


class Timer:
    def __init__(self):
        self.t = {k: 0.0 for k in ("sampling", "scoring", "forward", "backward", "optimizer")}

    def add(self, k, t0):
        self.t[k] += time.perf_counter() - t0


def load(model):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from peft import LoraConfig

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(STEPS)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                     target_modules=list(train_graphs.SPO_TARGETS)))
    return pipe


@torch.no_grad()
def conditioning(pipe, prompt):
    e, ne, p, np_ = pipe.encode_prompt(prompt, negative_prompt="", do_classifier_free_guidance=True)
    h = w = 64.0  # the tiny fixture's 8x8 latents, decoded
    ids = torch.tensor([[h, w, 0, 0, h, w]] * 2)
    return {"ehs": torch.cat([ne, e]), "te": torch.cat([np_, p]), "ids": ids}


def eps(unet, x, t, c):
    out = unet(torch.cat([x, x]), torch.tensor([float(t)] * 2), c["ehs"],
               added_cond_kwargs={"text_embeds": c["te"], "time_ids": c["ids"]}).sample
    u, cc = out.chunk(2)
    return u + W * (cc - u)


def coeffs(s, i):
    t = int(s.timesteps[i])
    prev = t - s.config.num_train_timesteps // s.num_inference_steps
    a_t = float(s.alphas_cumprod[t])
    a_p = float(s.alphas_cumprod[prev]) if prev >= 0 else float(s.final_alpha_cumprod)
    sigma = ETA * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    a = math.sqrt(a_p / a_t)
    c = math.sqrt(max(1 - a_p - sigma**2, 0)) - math.sqrt(a_p) * math.sqrt(1 - a_t) / math.sqrt(a_t)
    return t, a_t, a, c, sigma


def score(pipe, spm, x0, t, prompt, tm):
    t0 = time.perf_counter()
    img = pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample
    img = torch.nn.functional.interpolate((img + 1) / 2, size=(224, 224), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    ids = torch.tensor([pipe.tokenizer(prompt, padding="max_length", max_length=77).input_ids] * x0.shape[0])
    s = spm((img - mean) / std, torch.full((x0.shape[0],), t), ids)
    tm.add("scoring", t0)
    return s


@torch.no_grad()
def sample(pipe, spm, prompt, c, gen, tm):
    s, unet = pipe.scheduler, pipe.unet
    x = torch.randn(1, 4, 8, 8, generator=gen)
    step = lambda i, x, e: (lambda t, at, a, cc, sg: a * x + cc * e + sg * torch.randn(x.shape, generator=gen))(*coeffs(s, i))
    t0 = time.perf_counter()
    for i in range(DIVERT):
        x = step(i, x, eps(unet, x, int(s.timesteps[i]), c))
    e = eps(unet, x, int(s.timesteps[DIVERT]), c)
    tm.add("sampling", t0)
    pairs = []
    i = DIVERT
    while i < STEPS:
        end = i + 1 if i + 2 < STEPS else STEPS
        t0 = time.perf_counter()
        cands = [step(i, x, e) for _ in range(POOL)]
        trans = [[(i, x, cd)] for cd in cands]
        for k in range(i + 1, end):
            for j in range(POOL):
                nx = step(k, cands[j], eps(unet, cands[j], int(s.timesteps[k]), c))
                trans[j].append((k, cands[j], nx))
                cands[j] = nx
        if end < STEPS:
            t, a_t = int(s.timesteps[end]), float(s.alphas_cumprod[int(s.timesteps[end])])
            es = [eps(unet, cd, t, c) for cd in cands]
            x0 = torch.cat([(cd - math.sqrt(1 - a_t) * ee) / math.sqrt(a_t) for cd, ee in zip(cands, es)])
        else:
            t, es, x0 = 0, None, torch.cat(cands)
        tm.add("sampling", t0)
        sc = score(pipe, spm, x0, t, prompt, tm)
        w, l = int(sc.argmax()), int(sc.argmin())
        if w != l:
            pairs += [(k, (tw, xw), (tl, xl)) for (k, tw, xw), (_, tl, xl) in zip(trans[w], trans[l])]
        r = int(torch.randint(POOL, (1,), generator=gen))
        x = cands[r]
        if es is not None:
            e = es[r]
        i = end
    return pairs


def train(pipe, opt, params, pairs, tm):
    s, unet = pipe.scheduler, pipe.unet
    for b in range(0, len(pairs), BATCH):
        batch = pairs[b:b + BATCH]
        losses = []
        for i, win, lose, c in batch:
            t, a_t, a, cc, sigma = coeffs(s, i)
            log_r = []
            for x_t, x_prev in (win, lose):
                t0 = time.perf_counter()
                with torch.no_grad(), unet.disable_adapters_ctx():
                    mu_ref = a * x_t + cc * eps(unet, x_t, t, c)
                mu = a * x_t + cc * eps(unet, x_t, t, c)
                tm.add("forward", t0)
                log_r.append((((x_prev - mu_ref) ** 2) - ((x_prev - mu) ** 2)).mean() / (2 * sigma**2))
            ratio = [torch.clamp(lr.exp(), 1 - CLIP, 1 + CLIP) for lr in log_r]
            losses.append(-torch.nn.functional.logsigmoid(BETA * (ratio[0].log() - ratio[1].log())))
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.stack(losses).mean().backward()
        tm.add("backward", t0)
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tm.add("optimizer", t0)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a diffusers SDXL folder")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    pipe = load(a.model)
    unet = pipe.unet
    if not hasattr(unet, "disable_adapters_ctx"):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            unet.disable_adapters()
            try:
                yield
            finally:
                unet.enable_adapters()
        unet.disable_adapters_ctx = ctx
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    spm = ColourScore(colour_token_ids(os.path.join(a.model, "tokenizer")))
    gen = torch.Generator().manual_seed(0)
    for r in range(a.rounds):
        tm = Timer()
        t0 = time.perf_counter()
        pairs = []
        for prompt in PROMPTS:
            c = conditioning(pipe, prompt)
            pairs += [(i, w, l, c) for i, w, l in sample(pipe, spm, prompt, c, gen, tm)]
        perm = torch.randperm(len(pairs), generator=gen).tolist()
        train(pipe, opt, params, [pairs[k] for k in perm], tm)
        print(json.dumps(dict(tm.t, round=r, pairs=len(pairs), total=time.perf_counter() - t0)), flush=True)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    sys.exit(main())
