"""Reference outputs for the pure-Rust unit tests (tokenizer and schedulers).

    PYTHONPATH=onnx python -m spo_onnx.goldens.units [--root REPO_ROOT] [--only tokenizer|scheduler|vae-fp16]

Writes
  tests/fixtures/goldens/tokenizer/corpus.json   (transformers CLIPTokenizer)
  tests/fixtures/goldens/scheduler/<case>.json   (diffusers schedulers)
  tests/fixtures/vae-fp16-overflow/              (an fp16 VAE decoder that overflows, and its fp32 golden)

No network access: the tokenizer comes from tests/fixtures/clip-tokenizer and the
schedulers are built from inline configs.
"""

import argparse
import json
import math
import os
import shutil
import tempfile

LONG_WORDS = (
    "a breathtaking panoramic view of an ancient city built into the cliffs of a misty mountain range "
    "at golden hour with waterfalls cascading down terraced gardens lanterns glowing in narrow alleys "
    "merchants selling silk and spices birds circling over copper domes and a river winding through "
    "stone bridges painted in the style of a romantic era landscape oil painting highly detailed "
    "dramatic lighting volumetric fog intricate architecture trending on artstation 8k resolution"
)


def tokenizer_corpus():
    long300 = " ".join([LONG_WORDS] * 5)  # ~300 words
    texts = [
        "",
        " ",
        "   \t\n  ",
        "a photo of a cat",
        "A photo of an astronaut riding a horse on mars",
        "portrait of a woman, oil painting, by greg rutkowski, trending on artstation",
        "cyberpunk city at night, neon lights, rain, reflections, 4k, ultra detailed",
        "a cute corgi wearing sunglasses on the beach",
        "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
        "watercolor painting of a fox in a snowy forest",
        "an isometric diorama of a tiny island with a lighthouse",
        "Photograph of a bowl of ramen, shallow depth of field, 85mm lens",
        "low poly render of a mountain landscape",
        "the quick brown fox jumps over the lazy dog",
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
        "ThE qUiCk BrOwN fOx",
        "CamelCaseWordsTogether and snake_case_words and kebab-case-words",
        "café naïve résumé coöperate façade jalapeño",
        "e\u0301cole (decomposed accent) vs \u00e9cole",
        "Ångström Øresund Æsir straße ß ẞ",
        "Zürich, München, Köln, Düsseldorf",
        "東京の夜景、ネオン、雨",
        "一只可爱的猫坐在窗台上",
        "한국어 프롬프트 테스트",
        "Привет, мир! Красивый закат над морем",
        "ΟΔΥΣΣΕΥΣ and Σίσυφος",
        "שלום עולם",
        "مرحبا بالعالم",
        "हिन्दी में एक वाक्य",
        "ไทย ภาษา",
        "emoji 😀🎨🔥 party 🎉",
        "👨‍👩‍👧‍👦 family emoji with zero width joiners",
        "flags 🇯🇵🇺🇸 and skin tones 👍🏽",
        "İstanbul and ǅungla titlecase",
        "zero\u200bwidth\u200bspace and soft\u00adhyphen",
        "non\u00a0breaking\u00a0space and\u2003em space and\u3000ideographic space",
        "line\u2028separator and\u0085next line",
        "tab\tseparated\twords",
        "new\nline\nseparated\n\nwords",
        "multiple     spaces    between   words",
        "  leading and trailing spaces  ",
        "!!!???...,,,;;;:::",
        "wow!! great! amazing!!!",
        "a ! b ! c",
        "(masterpiece:1.2), [[ugly]], {detailed}, <lora:foo:0.8>",
        "hello--world__foo++bar==baz",
        "email@example.com https://example.com/path?q=1&x=2#frag",
        "C:\\Users\\name\\file.txt and /usr/bin/env",
        "\"quoted\" 'single' `backtick` «guillemets» „low“",
        "price $19.99 €5 £3 ¥100 50% off",
        "math: 2+2=4, x^2 - y^2 = (x-y)(x+y), 3.14159",
        "1234567890",
        "year 2024, 1080p, 4k, 8k uhd, f/1.8, 1/200s, ISO 100",
        "numbers ١٢٣ and ① ② ③ and ½ ¾ and Ⅻ",
        "don't can't won't it's i'm you're we've they'll he'd",
        "DON'T CAN'T IT'S I'M YOU'RE WE'VE THEY'LL HE'D",
        "the cat's toy and the dogs' bone",
        "o'neil ''' '''s rock'n'roll",
        "it’s curly apostrophe and don’t",
        "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp;",
        "<b>bold</b> <i>italic</i> <br/>",
        "<|endoftext|>",
        "a photo<|endoftext|>of a cat",
        "<|startoftext|>a dog<|endoftext|>",
        "<|ENDOFTEXT|> uppercase special",
        "< |endoftext| > spaced special",
        "<|endoftext|><|endoftext|><|startoftext|>",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "xyzzy qwfp zxcvbnm asdfghjkl",
        "a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p",
        "hyphen-ated words and em—dash and en–dash",
        "ellipsis… and bullet • and degree 25°C",
        "™ © ® § ¶ † ‡",
        "\u0000control\u0001chars\u007f",
        "mixed 日本 english 中文 русский ελληνικά",
        "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
        "combining: a\u0300 o\u0308 n\u0303 and stacked a\u0300\u0301\u0302",
        LONG_WORDS,
        long300,
        ", ".join(str(i) for i in range(60)),
        "word " * 74 + "end",
        "word " * 75 + "end",
        "word " * 76 + "end",
        "a" * 500,
        "🎨" * 40,
        "masterpiece, " * 40,
    ]
    return texts


def write_tokenizer(root):
    from transformers import CLIPTokenizer

    tok_dir = os.path.join(root, "tests", "fixtures", "clip-tokenizer")
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    tok0 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
    assert tok.pad_token_id == 49407 and tok0.pad_token_id == 0
    out = []
    for text in tokenizer_corpus():
        kw = dict(padding="max_length", max_length=77, truncation=True)
        ids = tok(text, **kw).input_ids
        ids0 = tok0(text, **kw).input_ids
        assert len(ids) == 77 and len(ids0) == 77
        out.append({"text": text, "ids": ids, "ids_pad0": ids0})
    path = os.path.join(root, "tests", "fixtures", "goldens", "tokenizer", "corpus.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"wrote {path}: {len(out)} texts")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
    ap.add_argument("--only", choices=["tokenizer", "scheduler", "vae-fp16"])
    a = ap.parse_args()
    if a.only in (None, "tokenizer"):
        write_tokenizer(a.root)
    if a.only in (None, "scheduler"):
        write_schedulers(a.root)
    if a.only in (None, "vae-fp16"):
        write_vae_fp16(a.root)


def write_vae_fp16(root):
    """An fp16 VAE decoder whose output overflows fp16, for the runtime's fp32
    upcast (diffusers' force_upcast) and its non-finite check. The tiny SDXL
    VAE gets a decoder conv_out with bias 6e4 and weights x10000, so outputs
    pass 65504: in fp16 they become inf, in fp32 they are finite. (The SDXL
    VAE overflows inside the decoder; ONNX Runtime's CPU provider runs fp16
    nodes that lack fp16 kernels in fp32, so only an overflow at an fp16
    output shows on every provider.) The weights are rounded to fp16 before the
    golden is computed, so the golden is what an fp32 run of the fp16 graph's
    weights gives."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from diffusers import AutoencoderKL

    from .. import export

    out = os.path.join(root, "tests", "fixtures", "vae-fp16-overflow")
    vae = AutoencoderKL.from_pretrained(os.path.join(root, "tests", "fixtures", "diffusers", "tiny-sdxl", "vae")).eval()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(10000.0)
        vae.decoder.conv_out.bias.fill_(6e4)
        for p in vae.parameters():  # fp16-rounded weights, fp32 arithmetic
            p.copy_(p.half().float())
    assert vae.config.force_upcast
    with tempfile.TemporaryDirectory() as tmp:
        export.export_vae(vae, tmp, torch.float16, export.DEFAULT_OPSET, False, 1, None)
        os.makedirs(out, exist_ok=True)
        shutil.rmtree(os.path.join(out, "vae_decoder"), ignore_errors=True)
        shutil.copytree(os.path.join(tmp, "vae_decoder"), os.path.join(out, "vae_decoder"))
    g = torch.Generator().manual_seed(7)
    z = torch.randn(1, 4, 8, 12, generator=g)
    with torch.no_grad():
        golden = vae.decode(z).sample
    s = ort.InferenceSession(os.path.join(out, "vae_decoder", "model.onnx"), providers=["CPUExecutionProvider"])
    fp16 = s.run(None, {"latent_sample": z.numpy().astype(np.float16)})[0]
    bad = int((~np.isfinite(fp16)).sum())
    assert bad > 0, "the fp16 graph was meant to overflow"
    assert np.isfinite(golden.numpy()).all()
    np.save(os.path.join(out, "latents.npy"), z.numpy())
    np.save(os.path.join(out, "decoded.npy"), golden.numpy())
    print(f"wrote {out}: fp16 run has {bad}/{fp16.size} non-finite values; fp32 golden range "
          f"[{golden.min():.3f}, {golden.max():.3f}]")


SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SCHED_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


def scheduler_cases():
    """(case name, our scheduler name, extra config, steps, eta, img2img strength or None)."""
    cases = []
    sdxl = dict(SD15, steps_offset=1, timestep_spacing="leading")
    for name in ["euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "ddpm"]:
        for spacing in ["leading", "trailing", "linspace"]:
            for offset in [0, 1]:
                if spacing != "leading" and offset == 1:
                    continue
                steps = {"leading": 20, "trailing": 5, "linspace": 4}[spacing]
                cfg = dict(SD15, timestep_spacing=spacing, steps_offset=offset)
                cases.append((f"{name}_{spacing}_off{offset}_{steps}", name, cfg, steps, 0.0, None))
        cases.append((f"{name}_sdxl_vpred_5", name, dict(sdxl, prediction_type="v_prediction"), 5, 0.0, None))
        cases.append((f"{name}_linear_default_4", name, dict(num_train_timesteps=1000), 4, 0.0, None))
        cases.append((f"{name}_img2img_20", name, dict(sdxl), 20, 0.0, 0.6))
        cases.append((f"{name}_img2img_vpred_5", name, dict(sdxl, prediction_type="v_prediction"), 5, 0.0, 0.6))
    for k in [True]:
        cases.append(("euler_karras_sdxl_20", "euler", dict(sdxl, use_karras_sigmas=k), 20, 0.0, None))
        cases.append(("euler_karras_vpred_5", "euler", dict(sdxl, use_karras_sigmas=k, prediction_type="v_prediction"), 5, 0.0, None))
    cases.append(("euler_sigma_min_final_5", "euler", dict(sdxl, final_sigmas_type="sigma_min"), 5, 0.0, None))
    cases.append(("ddim_eta1_20", "ddim", dict(SD15, steps_offset=1, clip_sample=False, set_alpha_to_one=False), 20, 1.0, None))
    cases.append(("ddim_eta05_trailing_5", "ddim", dict(SD15, timestep_spacing="trailing"), 5, 0.5, None))
    cases.append(("ddim_eta05_img2img_20", "ddim", dict(sdxl), 20, 0.5, 0.6))
    cases.append(("ddim_clip_sample_4", "ddim", dict(SD15, clip_sample=True, clip_sample_range=0.5), 4, 0.0, None))
    cases.append(("ddpm_fixed_large_5", "ddpm", dict(SD15, variance_type="fixed_large", clip_sample=False), 5, 0.0, None))
    cases.append(("dpmpp_2m_sigma_min_20", "dpmpp_2m", dict(sdxl, final_sigmas_type="sigma_min"), 20, 0.0, None))
    cases.append(("dpmpp_2m_karras_sigma_min_5", "dpmpp_2m_karras", dict(sdxl, final_sigmas_type="sigma_min"), 5, 0.0, None))
    cases.append(("dpmpp_2m_no_lower_order_final_20", "dpmpp_2m", dict(sdxl, lower_order_final=False, final_sigmas_type="sigma_min"), 20, 0.0, None))
    cases.append(("dpmpp_2m_euler_at_final_5", "dpmpp_2m", dict(sdxl, euler_at_final=True, final_sigmas_type="sigma_min"), 5, 0.0, None))
    cases.append(("dpmpp_2m_squaredcos_5", "dpmpp_2m", dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"), 5, 0.0, None))
    cases.append(("euler_zero_snr_trailing_5", "euler", dict(sdxl, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"), 5, 0.0, None))
    cases.append(("ddim_zero_snr_trailing_5", "ddim", dict(sdxl, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"), 5, 0.0, None))
    # Less common settings and awkward step counts.
    cases.append(("euler_continuous_vpred_5", "euler", dict(sdxl, timestep_type="continuous", prediction_type="v_prediction"), 5, 0.0, None))
    cases.append(("euler_sample_pred_4", "euler", dict(SD15, prediction_type="sample"), 4, 0.0, None))
    cases.append(("ddim_sample_pred_5", "ddim", dict(SD15, prediction_type="sample", clip_sample=False), 5, 0.0, None))
    cases.append(("dpmpp_2m_heun_20", "dpmpp_2m", dict(sdxl, solver_type="heun"), 20, 0.0, None))
    cases.append(("dpmpp_2m_karras_vpred_20", "dpmpp_2m_karras", dict(sdxl, prediction_type="v_prediction"), 20, 0.0, None))
    cases.append(("dpmpp_2m_lambda_clipped_7", "dpmpp_2m", dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="linspace"), 7, 0.0, None))
    cases.append(("dpmpp_2m_order1_5", "dpmpp_2m", dict(sdxl, solver_order=1), 5, 0.0, None))
    cases.append(("ddpm_fixed_small_log_5", "ddpm", dict(SD15, variance_type="fixed_small_log", clip_sample=False), 5, 0.0, None))
    for name in ["euler", "euler_a", "ddim", "dpmpp_2m", "ddpm"]:
        cases.append((f"{name}_trailing_7", name, dict(SD15, timestep_spacing="trailing"), 7, 0.0, None))
        cases.append((f"{name}_linspace_3", name, dict(SD15, timestep_spacing="linspace"), 3, 0.0, None))
    cases.append(("euler_karras_linspace_7", "euler", dict(SD15, use_karras_sigmas=True), 7, 0.0, None))
    cases.append(("euler_a_img2img_trailing_7", "euler_a", dict(SD15, timestep_spacing="trailing"), 7, 0.0, 0.6))
    return cases


def _flat(x):
    return [float(v) for v in x.detach().reshape(-1).to(torch_mod().float64).tolist()]


def torch_mod():
    import torch

    return torch


def run_scheduler_case(case):
    import diffusers
    import importlib
    torch = torch_mod()

    cname, name, extra, steps, eta, strength = case
    cls_name = SCHED_CLASSES[name]
    cls = getattr(diffusers, cls_name)
    cfg = dict(extra)
    if name == "dpmpp_2m_karras":
        cfg["use_karras_sigmas"] = True
    if name == "dpmpp_2m":
        cfg["use_karras_sigmas"] = False
    sched = cls(**cfg)
    sched.set_timesteps(steps)
    timesteps = [float(t) for t in sched.timesteps.tolist()]
    sigmas = None
    if hasattr(sched, "sigmas") and cls_name != "DDIMScheduler" and cls_name != "DDPMScheduler":
        sigmas = [float(s) for s in sched.sigmas.to(torch.float64).tolist()]
    init_noise_sigma = float(sched.init_noise_sigma)
    shape = (1, 4, 2, 2)
    gen = torch.Generator().manual_seed(1234)
    base = torch.randn(shape, generator=gen, dtype=torch.float32)
    begin = 0
    img2img = None
    if strength is None:
        sample = base * sched.init_noise_sigma
    else:
        init_timestep = min(int(steps * strength), steps)
        begin = max(steps - init_timestep, 0) * sched.order
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        original = torch.randn(shape, generator=gen, dtype=torch.float32)
        t0 = sched.timesteps[begin : begin + 1]
        sample = sched.add_noise(original, base, t0)
        img2img = {"strength": strength, "begin_index": begin, "original": _flat(original), "noise": _flat(base), "noised": _flat(sample)}
    sample0 = sample.clone()

    # Noise for stochastic steps, drawn in advance and handed out in order by a
    # patched randn_tensor (the scheduler module's own import).
    noise_gen = torch.Generator().manual_seed(4321)
    pending = [torch.randn(shape, generator=noise_gen, dtype=torch.float32) for _ in range(steps)]
    used = []
    mod = importlib.import_module(cls.__module__)
    orig_randn = mod.randn_tensor

    def fake_randn(shape_, generator=None, device=None, dtype=None, layout=None):
        n = pending[len(used)]
        used.append(n)
        return n.to(dtype or torch.float32)

    mod.randn_tensor = fake_randn
    model_outputs, traj, noises, x0s = [], [], [], []
    try:
        for i in range(begin, len(sched.timesteps)):
            t = sched.timesteps[i]
            scaled = sched.scale_model_input(sample, t)
            mo = (0.5 * scaled.to(torch.float64) * math.cos(float(t) / 300.0) + 0.1).to(torch.float32)
            before = len(used)
            kw = {}
            if cls_name == "DDIMScheduler":
                kw["eta"] = eta
            out = sched.step(mo, t, sample, **kw)
            sample = out.prev_sample
            # The step's data prediction x0: `pred_original_sample` where the
            # output has it; DPM-Solver keeps it as its latest converted model output.
            x0 = getattr(out, "pred_original_sample", None)
            x0s.append(_flat(x0 if x0 is not None else sched.model_outputs[-1]))
            noises.append(_flat(used[-1]) if len(used) > before else None)
            model_outputs.append(_flat(mo))
            traj.append(_flat(sample))
    finally:
        mod.randn_tensor = orig_randn
    # As a scheduler_config.json would hold it: the class name and diffusers version
    # (unknown fields the Rust side must ignore); `_use_default_values` is dropped
    # because its order is not stable between runs.
    config = {"_class_name": cls_name, "_diffusers_version": diffusers.__version__}
    config.update({k: v for k, v in dict(sched.config).items() if k != "_use_default_values"})
    return {
        "case": cname,
        "scheduler_class": cls_name,
        "name": name,
        "eta": eta,
        "config": config,
        "steps": steps,
        "timesteps": timesteps,
        "sigmas": sigmas,
        "init_noise_sigma": init_noise_sigma,
        "begin_index": begin,
        "img2img": img2img,
        "sample0": _flat(sample0),
        "noise": noises if any(n is not None for n in noises) else None,
        "model_outputs": model_outputs,
        "trajectory": traj,
        "pred_original": x0s,
    }


def write_schedulers(root):
    out_dir = os.path.join(root, "tests", "fixtures", "goldens", "scheduler")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if f.endswith(".json"):
            os.remove(os.path.join(out_dir, f))
    cases = scheduler_cases()
    for case in cases:
        g = run_scheduler_case(case)
        with open(os.path.join(out_dir, case[0] + ".json"), "w") as f:
            json.dump(g, f)  # DPM's lambda_min_clipped is written as -Infinity, as diffusers does
            f.write("\n")
    print(f"wrote {out_dir}: {len(cases)} cases")


if __name__ == "__main__":
    main()
