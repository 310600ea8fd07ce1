"""Diffusers reference outputs ("goldens") for the Rust tests, computed with the
torch pipelines on the tiny diffusers fixtures (fp32, CPU).

    PYTHONPATH=onnx python -m spo_onnx.goldens.pipeline [--root tests/fixtures] [--only tiny-sdxl] [--case NAME]

Writes ROOT/goldens/<model>/index.json (+ .npy float32 C-order, .png). The format is described in onnx/DESIGN.md. Scheduler unit
goldens come from goldens/units.py, the "lora" section from goldens/lora.py.

Randomness: every case runs with `generator=torch.Generator("cpu").manual_seed(seed)`
and diffusers draws everything from it, in this order: the initial latents
(txt2img: unit-variance, before init_noise_sigma scaling; img2img: the noise
given to scheduler.add_noise), then the per-step noise of stochastic samplers.
Every draw is recorded (randn_tensor is wrapped, not replaced), so the files
hold exactly what diffusers consumed. The VAE encoder of img2img uses the
latent distribution mean ("vae_encode": "mean").
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

from ..fixtures import REPO
from .common import SCHEDULERS, Writer, jsonable, load, make_scheduler, record_randn

STOCHASTIC = {"euler_a", "ddpm"}  # plus ddim with eta > 0

TOKENIZER_TEXTS = [
    "",
    " ",
    "   \t\n  ",
    "a",
    "A photo of an astronaut riding a horse on mars",
    "a photo of an ASTRONAUT Riding A Horse On Mars",
    "masterpiece, best quality, 1girl, solo, looking at viewer",
    "(masterpiece:1.2), [blurry], {cat}, <lora:foo:0.5>",
    "Hello, World!",
    "hello world!!!",
    "don't stop; it's 5 o'clock... really?!",
    "e-mail: someone@example.com, url https://example.org/a_b?c=d&e=f",
    "numbers 0 1 2 3 42 3.14159 1,000,000 -7 1e10",
    "1024x1024 8k uhd, f/1.8, 35mm",
    "100% pure #hashtag $dollars ^caret *star* ~tilde~ `code`",
    "UPPERCASE ONLY TEXT",
    "MiXeD cAsE tExT",
    "café naïve résumé Ångström façade",
    "Straße Größe Übermensch",
    "日本語のテキスト、東京タワー",
    "中文提示词：一只可爱的猫",
    "한국어 텍스트",
    "русский текст, кошка",
    "العربية نص",
    "emoji 🤖🐱🚀 and 👍🏽 and 👨‍👩‍👧",
    "🎨",
    "a cat 🐈 on a mat",
    "tabs\tand\nnewlines\r\nmixed",
    "multiple    spaces     between    words",
    "  leading and trailing spaces  ",
    "punctuation.only?!,;:",
    "...",
    "!!!",
    "a!b!c",
    "quotes \"double\" and 'single' and «guillemets»",
    "dashes - – — and slashes / \\ |",
    "brackets ( ) [ ] { } < >",
    "under_score and CamelCase and snake_case_words",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "HTML &amp; entities &lt;tag&gt;",
    "a very very very very very very very very very very very very very very very very very very very very long prompt",
    " ".join(["word"] * 100),
    " ".join(f"token{i}" for i in range(60)),
    "beautiful landscape, " * 20,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, ½ ², ℃",
    "zero\u200bwidth space and non\u00a0breaking space",
    "accents combining: e\u0301 vs é",
    "x" * 200,
    "a portrait of a woman, highly detailed, digital painting, artstation, concept art, smooth, sharp focus, illustration",
    "negative: blurry, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped",
    "photo of a red car. 2 people; 3 dogs!",
    "12345678901234567890",
    "v1.5 sdxl-base_1.0 SPO",
]

EMBED_PROMPTS = [
    ("a photo of a cat", None),
    ("a photo of a cat", ""),
    ("a photo of a cat", "blurry, low quality"),
    ("", None),
    ("A LONG prompt, " * 30, "ugly " * 40),
    ("emoji 🤖 and ünïcode", "!"),
]

RNG_SEEDS = [0, 1, 42, 1234, 2**31 - 1, 2**32 + 7, 123456789012345]


# ----------------------------------------------------------------------------- noise recording


@contextlib.contextmanager
def vae_encode_mean():
    """img2img pipelines: retrieve_latents -> latent_dist.mode() (the mean)."""
    patched = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("diffusers.pipelines") and hasattr(mod, "retrieve_latents"):
            orig = mod.retrieve_latents

            def mean(encoder_output, generator=None, sample_mode="sample", _orig=orig):
                return _orig(encoder_output, generator=generator, sample_mode="argmax")

            mod.retrieve_latents = mean
            patched.append((mod, orig))
    try:
        yield
    finally:
        for mod, orig in patched:
            mod.retrieve_latents = orig


# ----------------------------------------------------------------------------- pipelines


def img2img_pipe(pipe):
    import diffusers

    cls = diffusers.StableDiffusionXLImg2ImgPipeline if hasattr(pipe, "text_encoder_2") else diffusers.StableDiffusionImg2ImgPipeline
    p = cls.from_pipe(pipe)
    p.set_progress_bar_config(disable=True)
    return p


def init_image(size=(64, 64)):
    """A deterministic, smooth 8-bit RGB test image."""
    from PIL import Image

    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.5 + 0.5 * np.sin(x / w * 2 * math.pi)
    g = 0.5 + 0.5 * np.cos(y / h * 3 * math.pi)
    b = ((x + y) / (w + h))
    rgb = np.stack([r, g, b], -1)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = [0.9, 0.1, 0.1]
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def tokenizer_entries(pipe):
    out = []
    for t in TOKENIZER_TEXTS:
        e = {"text": t}
        e["ids"] = pipe.tokenizer(t, padding="max_length", max_length=77, truncation=True).input_ids
        if hasattr(pipe, "tokenizer_2"):
            e["ids_2"] = pipe.tokenizer_2(t, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(e["ids"]) == 77
        out.append(e)
    return out


def encode(pipe, prompt, negative):
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):
            pe, ne, pp, npp = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative)
            return pe, ne, pp, npp
        pe, ne = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
        return pe, ne, None, None


LONG_PROMPT = (
    "a highly detailed oil painting of a red fox standing in deep fresh snow at dawn, soft golden light "
    "falling through tall pine trees, frost on the fur, breath visible in the cold air, distant mountains "
    "under a pale pink sky, crows circling above a frozen river, an old wooden cabin with smoke rising from "
    "its chimney, footprints leading into the forest, dramatic composition, masterpiece, trending on artstation"
)


def chunk_ids(tok, text):
    """The A1111-style long-prompt ids (our reference for `long_prompt=chunks`):
    the untruncated token stream cut into 75-token chunks, each wrapped in
    BOS/EOS and padded with the tokenizer's pad token to 77."""
    ids = tok(text, truncation=False, add_special_tokens=False).input_ids
    chunks = [ids[i : i + 75] for i in range(0, len(ids), 75)] or [[]]
    out = []
    for c in chunks:
        seq = [tok.bos_token_id] + c + [tok.eos_token_id]
        out.append(seq + [tok.pad_token_id] * (77 - len(seq)))
    return out


def chunked_embeds(pipe, text, n_chunks=None):
    """Encodes each chunk as diffusers encodes one 77-token window (SD 1.5:
    last hidden state; SDXL: penultimate hidden states of both encoders and
    the projected pooled output of encoder 2), concatenates the chunks on the
    sequence axis and, to reach `n_chunks`, appends the empty prompt's chunk
    (A1111 pads the shorter of prompt and negative that way). SDXL's pooled
    output is the first chunk's. Returns (embeds, pooled or None)."""
    sdxl = hasattr(pipe, "text_encoder_2")
    ids1 = chunk_ids(pipe.tokenizer, text)
    ids2 = chunk_ids(pipe.tokenizer_2, text) if sdxl else None
    if n_chunks is not None:
        empty1 = chunk_ids(pipe.tokenizer, "")[0]
        ids1 += [empty1] * (n_chunks - len(ids1))
        if sdxl:
            empty2 = chunk_ids(pipe.tokenizer_2, "")[0]
            ids2 += [empty2] * (n_chunks - len(ids2))
    parts, pooled = [], None
    with torch.no_grad():
        for k, a in enumerate(ids1):
            a = torch.tensor([a])
            if not sdxl:
                parts.append(pipe.text_encoder(a)[0])
                continue
            h1 = pipe.text_encoder(a, output_hidden_states=True).hidden_states[-2]
            o2 = pipe.text_encoder_2(torch.tensor([ids2[k]]), output_hidden_states=True)
            parts.append(torch.cat([h1, o2.hidden_states[-2]], dim=-1))
            if k == 0:
                pooled = o2[0]
    return torch.cat(parts, dim=1), pooled


def chunked_prompt_kwargs(pipe, prompt, negative):
    """The pipeline kwargs for a `long_prompt=chunks` case: precomputed
    embeddings in place of the prompt strings (negative None: SDXL zeros via
    force_zeros_for_empty_prompt, SD 1.5 the empty prompt)."""
    sdxl = hasattr(pipe, "text_encoder_2")
    n = max(len(chunk_ids(pipe.tokenizer, prompt)), len(chunk_ids(pipe.tokenizer, negative or "")))
    pe, pp = chunked_embeds(pipe, prompt, n)
    kw = dict(prompt_embeds=pe)
    if negative is None and sdxl and pipe.config.force_zeros_for_empty_prompt:
        ne, npp = torch.zeros_like(pe), torch.zeros_like(pp)
    else:
        ne, npp = chunked_embeds(pipe, negative or "", n)
    kw["negative_prompt_embeds"] = ne
    if sdxl:
        kw.update(pooled_prompt_embeds=pp, negative_pooled_prompt_embeds=npp)
    return kw


def embedding_entries(pipe, w):
    out = []
    for i, (p, n) in enumerate(EMBED_PROMPTS):
        pe, ne, pp, npp = encode(pipe, p, n)
        e = {"prompt": p, "negative_prompt": n, "prompt_embeds": w.npy(f"emb{i}_prompt.npy", pe), "negative_prompt_embeds": w.npy(f"emb{i}_negative.npy", ne)}
        if pp is not None:
            e["pooled_prompt_embeds"] = w.npy(f"emb{i}_pooled.npy", pp)
            e["negative_pooled_prompt_embeds"] = w.npy(f"emb{i}_negative_pooled.npy", npp)
        out.append(e)
    return out


def rng_entries(w):
    out = []
    for s in RNG_SEEDS:
        r16 = torch.randn(16, generator=torch.Generator("cpu").manual_seed(s))
        shape = [1, 4, 8, 8]
        lat = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s))
        out.append({"seed": s, "randn16": [float(v) for v in r16], "latents_shape": shape, "latents_randn": w.npy(f"rng_{s}.npy", lat)})
    # a non-square shape too (row-major fill order check)
    s = 7
    lat = torch.randn([1, 4, 8, 12], generator=torch.Generator("cpu").manual_seed(s))
    r16 = torch.randn(16, generator=torch.Generator("cpu").manual_seed(s))
    out.append({"seed": s, "randn16": [float(v) for v in r16], "latents_shape": [1, 4, 8, 12], "latents_randn": w.npy(f"rng_{s}_8x12.npy", lat)})
    return out


def case_list(model):
    sdxl = model.endswith("sdxl")
    cases = []
    seed = 100
    for s in SCHEDULERS:
        for tag, g, neg in (("cfg1", 1.0, None), ("cfg5", 5.0, None), ("cfg5_neg", 5.0, "blurry, low quality")):
            seed += 1
            cases.append(dict(name=f"{s}_{tag}", prompt="a photo of a cat", negative_prompt=neg, width=64, height=64, steps=5, guidance=g, scheduler=s, eta=0.0, seed=seed))
    cases.append(dict(name="ddim_eta1_cfg5_neg", prompt="a photo of a cat", negative_prompt="blurry", width=64, height=64, steps=5, guidance=5.0, scheduler="ddim", eta=1.0, seed=201))
    # non-square: latent dims must be multiples of 2**num_upsamplers (SDXL 4, SD1.5 8)
    wide = (96, 64) if sdxl else (128, 64)
    cases.append(dict(name=f"euler_{wide[0]}x{wide[1]}_cfg5", prompt="a wide landscape", negative_prompt=None, width=wide[0], height=wide[1], steps=5, guidance=5.0, scheduler="euler", eta=0.0, seed=202))
    cases.append(dict(name=f"euler_a_{wide[1]}x{wide[0]}_cfg5_neg", prompt="a tall tower", negative_prompt="ugly", width=wide[1], height=wide[0], steps=4, guidance=5.0, scheduler="euler_a", eta=0.0, seed=203))
    cases.append(dict(name="dpmpp_2m_karras_6steps_cfg7", prompt="an astronaut riding a horse", negative_prompt="lowres", width=64, height=64, steps=6, guidance=7.0, scheduler="dpmpp_2m_karras", eta=0.0, seed=204))
    cases.append(dict(name="euler_a_2images_cfg5_neg", prompt="a photo of a cat", negative_prompt="blurry", width=64, height=64, steps=4, guidance=5.0, scheduler="euler_a", eta=0.0, seed=206, num_images=2))
    cases.append(dict(name="euler_clipskip1_cfg5_neg", prompt="a photo of a cat", negative_prompt="blurry", width=64, height=64, steps=4, guidance=5.0, scheduler="euler", eta=0.0, seed=207, clip_skip=1))
    # long prompts: diffusers truncation (the default) and A1111-style chunks (option long_prompt=chunks)
    cases.append(dict(name="euler_longprompt_cfg5_neg", prompt=LONG_PROMPT, negative_prompt="blurry", width=64, height=64, steps=4, guidance=5.0, scheduler="euler", eta=0.0, seed=208))
    cases.append(dict(name="euler_longprompt_chunks_cfg5_neg", prompt=LONG_PROMPT, negative_prompt="blurry", width=64, height=64, steps=4, guidance=5.0, scheduler="euler", eta=0.0, seed=209, long_prompt="chunks"))
    cases.append(dict(name="dpmpp_2m_longprompt_chunks_cfg5", prompt=LONG_PROMPT, negative_prompt=None, width=64, height=64, steps=4, guidance=5.0, scheduler="dpmpp_2m", eta=0.0, seed=210, long_prompt="chunks"))
    cases.append(dict(name="euler_cfg5_rescale07", prompt="a photo of a cat", negative_prompt="blurry", width=64, height=64, steps=5, guidance=5.0, guidance_rescale=0.7, scheduler="euler", eta=0.0, seed=205))
    for s, sd in (("euler", 301), ("ddim", 302), ("dpmpp_2m", 303), ("euler_a", 304)):
        cases.append(dict(name=f"img2img_{s}_s06_cfg5_neg", prompt="a red square on a gradient", negative_prompt="blurry", width=64, height=64, steps=5, guidance=5.0, scheduler=s, eta=0.0, seed=sd, img2img=True, strength=0.6))
    return cases


def timesteps_used(c, timesteps, order=1):
    """The timesteps the UNet sees: all of them for txt2img; for img2img the
    last int(steps * strength) (diffusers get_timesteps)."""
    if c.get("strength") is None:
        return timesteps
    init_t = min(int(c["steps"] * c["strength"]), c["steps"])
    t_start = max(c["steps"] - init_t, 0)
    return timesteps[t_start * order :]


def run_case(pipe, c, w, init_png, prefix=""):
    """Runs one case twice (latent and np outputs) and writes its files."""
    name = prefix + c["name"]
    sched = make_scheduler(pipe, c["scheduler"])
    img2img = c.get("img2img", False)
    p = img2img_pipe(pipe) if img2img else pipe
    p.scheduler = sched
    if c.get("long_prompt") == "chunks":
        kw = chunked_prompt_kwargs(pipe, c["prompt"], c["negative_prompt"])
    else:
        kw = dict(prompt=c["prompt"], negative_prompt=c["negative_prompt"])
    kw.update(
        num_inference_steps=c["steps"],
        guidance_scale=c["guidance"],
        guidance_rescale=c.get("guidance_rescale", 0.0),
        eta=c["eta"],
        num_images_per_prompt=c.get("num_images", 1),
    )
    if c.get("clip_skip"):
        kw["clip_skip"] = c["clip_skip"]
    if img2img:
        from PIL import Image

        kw.update(image=Image.open(init_png).convert("RGB"), strength=c["strength"])
    else:
        kw.update(width=c["width"], height=c["height"])
    results = {}
    logs = {}
    for ot in ("latent", "np"):
        log = []
        gen = torch.Generator("cpu").manual_seed(c["seed"])
        with record_randn(log), vae_encode_mean(), torch.no_grad():
            results[ot] = p(output_type=ot, generator=gen, **kw).images
        logs[ot] = log
    la, lb = logs["latent"], logs["np"]
    assert len(la) == len(lb) and all(torch.equal(x[1], y[1]) for x, y in zip(la, lb)), "noise differs between runs"
    init = la[0]
    assert init[0].startswith("diffusers.pipelines"), init[0]
    noise = [x for m, x in la[1:]]
    assert all(m.startswith("diffusers.schedulers") for m, _ in la[1:]), [m for m, _ in la]
    stochastic = c["scheduler"] in STOCHASTIC or (c["scheduler"] == "ddim" and c["eta"] > 0)
    assert stochastic or not noise, (name, len(noise))
    img_np = results["np"]
    pil = p.image_processor.numpy_to_pil(img_np)[0]
    entry = dict(c)
    entry.pop("img2img", None)
    entry.update(
        name=name,
        guidance_rescale=c.get("guidance_rescale", 0.0),
        scheduler_class=type(sched).__name__,
        scheduler_config=jsonable(sched.config),
        timesteps=[float(t) for t in sched.timesteps],
        timesteps_used=timesteps_used(c, [float(t) for t in sched.timesteps], sched.order),
        init_latents=w.npy(f"{name}_init.npy", init[1]),
        noise=w.npy(f"{name}_noise.npy", torch.stack(noise)) if noise else None,
        init_image=os.path.basename(init_png) if img2img else None,
        strength=c["strength"] if img2img else None,
        vae_encode="mean" if img2img else None,
        latents=w.npy(f"{name}_latents.npy", results["latent"]),
        image=w.png(f"{name}.png", pil),
        # diffusers' float images, for the images after the first (the PNG
        # covers the first); only multi-image cases need it
        image_f32=w.npy(f"{name}_image.npy", img_np) if c.get("num_images", 1) > 1 else None,
    )
    if img2img:
        entry["width"], entry["height"] = pil.size
    return entry


def write_model_goldens(model, root, only_cases=None):
    """Writes goldens/<model> (with an empty "lora" section; goldens.lora
    fills it). `only_cases`: (re)run just these cases and merge them into the
    existing index, leaving every other entry and file as it is."""
    out = os.path.join(root, "goldens", model)
    pipe = load(model, root)
    index_path = os.path.join(out, "index.json")
    if only_cases:
        with open(index_path) as f:
            index = json.load(f)
        w = Writer(out)
        for c in case_list(model):
            if only_cases and c["name"] in only_cases:
                entry = run_case(pipe, c, w, os.path.join(out, "init_64.png"))
                index["cases"] = [e for e in index["cases"] if e["name"] != c["name"]] + [entry]
                print(f"{model}: {c['name']}", file=sys.stderr)
        with open(index_path, "w") as f:
            json.dump(index, f, indent=1, ensure_ascii=False)
        return
    if os.path.exists(out):
        shutil.rmtree(out)
    w = Writer(out)
    init_png = os.path.join(out, "init_64.png")
    init_image().save(init_png)
    index = {"model": model, "vae_encode": "mean"}
    index["tokenizer"] = tokenizer_entries(pipe)
    index["embeddings"] = embedding_entries(pipe, w)
    index["rng"] = rng_entries(w)
    index["cases"] = []
    for c in case_list(model):
        index["cases"].append(run_case(pipe, c, w, init_png))
        print(f"{model}: {c['name']}", file=sys.stderr)
    index["lora"] = []
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)


def main(argv=None):
    from ..fixtures import BUILDERS

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(REPO, "tests", "fixtures"))
    ap.add_argument("--only", action="append")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--case", action="append", help="(re)run only this pipeline case, keeping the rest of the index")
    a = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    if not a.skip_models:
        for model in a.only or list(BUILDERS):
            write_model_goldens(model, a.root, only_cases=a.case)


if __name__ == "__main__":
    main()
