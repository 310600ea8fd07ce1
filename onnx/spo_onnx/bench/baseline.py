"""Python baseline for examples/bench_pipeline.rs: the same ONNX files, end to end.

    PYTHONPATH=onnx python -m spo_onnx.bench.baseline [--model DIR] [--steps N] [--repeats R] [--threads T]

optimum (`optimum.onnxruntime.ORTStableDiffusionXLPipeline`) is not installed and
is deliberately not a dependency, so this is a hand-written loop that follows the
diffusers StableDiffusionXLPipeline / StableDiffusionPipeline: CLIPTokenizer from
the model folder, onnxruntime InferenceSessions for the text encoder(s), UNet and
VAE decoder, diffusers' EulerDiscreteScheduler from the folder's scheduler config,
classifier-free guidance as one batch-2 UNet call, SDXL penultimate hidden states,
text_embeds and time_ids, zero negative embeddings (force_zeros_for_empty_prompt).

Each run (after one warm-up) is timed from tokenization to the uint8 image;
session loading is excluded, as in the Rust benchmark. Prints the median, the
peak RSS (getrusage; it includes torch, which diffusers' scheduler imports) and
a final `e2e_s=<seconds>` line for scripts.
"""

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from diffusers import EulerDiscreteScheduler
from transformers import CLIPTokenizer

PROMPT = "a red fox in the snow, oil painting"
GUIDANCE = 5.0
SEED = 42


def session(path, threads):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class Baseline:
    def __init__(self, model, threads):
        with open(os.path.join(model, "model_index.json")) as f:
            index = json.load(f)
        self.sdxl = "text_encoder_2" in index and index["text_encoder_2"][0] is not None
        self.force_zeros = index.get("force_zeros_for_empty_prompt", False)
        load = lambda c: session(os.path.join(model, c, "model.onnx"), threads)  # noqa: E731
        names = ["text_encoder", "text_encoder_2"] if self.sdxl else ["text_encoder"]
        self.tokenizers = [CLIPTokenizer.from_pretrained(os.path.join(model, n.replace("text_encoder", "tokenizer"))) for n in names]
        self.encoders = [load(n) for n in names]
        self.unet = load("unet")
        self.vae = load("vae_decoder")
        self.scheduler = EulerDiscreteScheduler.from_pretrained(os.path.join(model, "scheduler"))
        with open(os.path.join(model, "vae_decoder", "config.json")) as f:
            vae_cfg = json.load(f)
        self.scaling = vae_cfg.get("scaling_factor", 0.18215)
        self.vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        with open(os.path.join(model, "unet", "config.json")) as f:
            self.sample_size = json.load(f)["sample_size"]
        self.channels = self.unet.get_inputs()[0].shape[1]
        self.ts_type = np.int64 if "int64" in self.unet.get_inputs()[1].type else np.float32

    def encode(self, prompt):
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np").input_ids
            outs = [o.name for o in enc.get_outputs()]
            if not self.sdxl:
                return enc.run(["last_hidden_state"], {"input_ids": ids.astype(np.int64)})[0], None
            layers = max(int(n.split(".")[1]) for n in outs if n.startswith("hidden_states."))
            want = [f"hidden_states.{layers - 1}"] + (["text_embeds"] if "text_embeds" in outs else [])
            r = enc.run(want, {"input_ids": ids.astype(np.int64)})
            hidden.append(r[0])
            if len(r) > 1:
                pooled = r[1]
        return np.concatenate(hidden, axis=-1), pooled

    def __call__(self, steps):
        pos, pos_pooled = self.encode(PROMPT)
        if self.sdxl and self.force_zeros:
            neg, neg_pooled = np.zeros_like(pos), np.zeros_like(pos_pooled)
        else:
            neg, neg_pooled = self.encode("")
        ehs = np.concatenate([neg, pos])
        feeds = {"encoder_hidden_states": ehs}
        h = w = self.sample_size * self.vae_factor
        if self.sdxl:
            feeds["text_embeds"] = np.concatenate([neg_pooled, pos_pooled])
            feeds["time_ids"] = np.array([[h, w, 0, 0, h, w]] * 2, dtype=np.float32)
        sched = self.scheduler
        sched.set_timesteps(steps)
        gen = torch.Generator("cpu").manual_seed(SEED)
        shape = (1, self.channels, h // self.vae_factor, w // self.vae_factor)
        latents = torch.randn(shape, generator=gen, dtype=torch.float32) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            feeds["sample"] = x.numpy()
            feeds["timestep"] = np.full((2,), t.item(), dtype=self.ts_type)
            out = torch.from_numpy(self.unet.run(["out_sample"], feeds)[0])
            uncond, text = out.chunk(2)
            noise = uncond + GUIDANCE * (text - uncond)
            latents = sched.step(noise, t, latents, return_dict=False)[0]
        image = self.vae.run(["sample"], {"latent_sample": (latents / self.scaling).numpy()})[0]
        image = (np.clip(image / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
        return latents, image


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tests/fixtures/tiny-sdxl")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    args = ap.parse_args()
    try:
        from optimum.onnxruntime import ORTStableDiffusionXLPipeline  # noqa: F401

        print("note: optimum is installed but unused; this baseline is the hand-written loop")
    except ImportError:
        print("note: optimum not installed; using the hand-written diffusers-style loop")
    t = time.perf_counter()
    pipe = Baseline(args.model, args.threads)
    print(f"load       {time.perf_counter() - t:.2f} s (onnxruntime {ort.__version__}, CPUExecutionProvider)")
    latents, _ = pipe(args.steps)  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        pipe(args.steps)
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model      {args.model} ({'sdxl' if pipe.sdxl else 'sd15'}), {args.steps} steps, guidance {GUIDANCE}, {args.repeats} repeats")
    print(f"latents    mean |x| {latents.abs().mean().item():.6f} (compare with the Rust benchmark)")
    print(f"end-to-end {statistics.median(times):.4f} s median (min {min(times):.4f} s)")
    print(f"peak RSS   {rss:.1f} MiB (ru_maxrss)")
    print(f"e2e_s={statistics.median(times):.6f}")


if __name__ == "__main__":
    main()
