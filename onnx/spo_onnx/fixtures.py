"""Builds the tiny test pipelines (real diffusers/transformers classes, tiny
configs, random weights from fixed seeds), saves their diffusers copies and
exports them with spo_onnx.export.

    PYTHONPATH=onnx python -m spo_onnx.fixtures [--root tests/fixtures] [--only tiny-sdxl] [--no-onnx]

Outputs: ROOT/diffusers/tiny-sdxl, ROOT/diffusers/tiny-sd15 (save_pretrained,
safetensors) and ROOT/tiny-sdxl, ROOT/tiny-sd15 (ONNX layout), and the UNet
variants in UNET_VARIANTS: ROOT/<variant>/unet only, exported from the saved
diffusers folder of their base model (tests pair them with the base model's
other components). `--only tiny-sd15-dynamo` rebuilds just that one.

Every tokenizer's vocab.json / merges.txt is a relative symlink to
tests/fixtures/clip-tokenizer (the same 1.5 MB pair, stored once).
"""

import argparse
import json
import os
import shutil

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
CLIP_VOCAB_DIR = os.path.join(REPO, "tests", "fixtures", "clip-tokenizer")

# scheduler_config.json files as the real checkpoints ship them
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# tiny configs -------------------------------------------------------------------------

TE_SDXL_1 = dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu", projection_dim=16)
TE_SDXL_2 = dict(hidden_size=24, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, hidden_act="gelu", projection_dim=32)
TE_SD15 = dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu", projection_dim=16)

UNET_SDXL = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(8, 16, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(1, 2, 2),  # diffusers' name for the head count: head dim 8
    cross_attention_dim=TE_SDXL_1["hidden_size"] + TE_SDXL_2["hidden_size"],
    norm_num_groups=4,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + TE_SDXL_2["projection_dim"],
)
UNET_SD15 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,  # head count (SD 1.5 uses 8): head dims 4, 8, 8
    cross_attention_dim=TE_SD15["hidden_size"],
    norm_num_groups=4,
)


def vae_config(scaling_factor, force_upcast):
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def text_encoder(cls, cfg, seed):
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    conf = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **cfg)
    return cls(conf).eval()


def tokenizer(pad_token=None):
    from transformers import CLIPTokenizer

    kw = {"model_max_length": 77}
    if pad_token:
        kw["pad_token"] = pad_token
    return CLIPTokenizer(os.path.join(CLIP_VOCAB_DIR, "vocab.json"), os.path.join(CLIP_VOCAB_DIR, "merges.txt"), **kw)


def build_sdxl():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    te1 = text_encoder(CLIPTextModel, TE_SDXL_1, 1)
    te2 = text_encoder(CLIPTextModelWithProjection, TE_SDXL_2, 2)
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**UNET_SDXL).eval()
    torch.manual_seed(4)
    vae = AutoencoderKL(**vae_config(0.13025, True)).eval()
    sched = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer("!"),
        unet=unet,
        scheduler=sched,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_sd15():
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    te = text_encoder(CLIPTextModel, TE_SD15, 11)
    torch.manual_seed(13)
    unet = UNet2DConditionModel(**UNET_SD15).eval()
    torch.manual_seed(14)
    vae = AutoencoderKL(**vae_config(0.18215, False)).eval()
    sched = PNDMScheduler.from_config(SD15_SCHEDULER)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer(),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


BUILDERS = {"tiny-sdxl": (build_sdxl, SDXL_SCHEDULER), "tiny-sd15": (build_sd15, SD15_SCHEDULER)}

# variant -> (base model, export_unet keyword arguments)
UNET_VARIANTS = {
    # --lora-slots (tests/lora_slots.rs)
    "tiny-sd15-slots": ("tiny-sd15", {"lora_slots": 4}),
    # the dynamo exporter (tests/lora_dynamo.rs; ~2-4 min to export on 2 cores)
    "tiny-sd15-dynamo": ("tiny-sd15", {"dynamo": True}),
    # SDXL on dynamo: the kohya SGM key form on a dynamo graph
    "tiny-sdxl-dynamo": ("tiny-sdxl", {"dynamo": True}),
    # fp16 I/O and weights: the step graph's casts (tests/step_math.rs)
    "tiny-sd15-fp16": ("tiny-sd15", {"dtype": torch.float16}),
}


def export_unet_variant(root, name):
    """ROOT/<name>/unet from ROOT/diffusers/<base> (must exist)."""
    from . import export

    base, kw = UNET_VARIANTS[name]
    pipe = export.load_pipeline(os.path.join(root, "diffusers", base))
    out = os.path.join(root, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    sdxl = export.is_sdxl(pipe)
    te_dim = pipe.text_encoder_2.config.projection_dim if sdxl else None
    opts = dict(sdxl=sdxl, dtype=torch.float32, opset=export.DEFAULT_OPSET, dynamo=False, batch=2, static_hw=None, lora_slots=0, text_embeds_dim=te_dim)
    opts.update(kw)
    export.export_unet(pipe.unet, os.path.join(out, "unet"), **opts)
    return out


def link_clip_vocab(tok_dir, check=True):
    """Replaces tok_dir/{vocab.json,merges.txt} with relative symlinks to the
    shared clip-tokenizer copies; with `check`, the replaced files must hold
    the same bytes."""
    for fname in ("vocab.json", "merges.txt"):
        src = os.path.join(CLIP_VOCAB_DIR, fname)
        dst = os.path.join(tok_dir, fname)
        if os.path.lexists(dst) and check:
            with open(src, "rb") as a, open(dst, "rb") as b:
                if a.read() != b.read():
                    raise ValueError(f"{dst} differs from {src}")
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.relpath(src, tok_dir), dst)


def link_tokenizers(model_dir):
    for tok in ("tokenizer", "tokenizer_2"):
        d = os.path.join(model_dir, tok)
        if os.path.isdir(d):
            link_clip_vocab(d)


def save_diffusers(pipe, out, scheduler_json):
    if os.path.exists(out):
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # the scheduler config exactly as the real checkpoint ships it
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_json, f, indent=2)
    for tok in ("tokenizer", "tokenizer_2"):
        d = os.path.join(out, tok)
        if os.path.isdir(d):
            # save_pretrained rewrites the vocabulary; link the original files
            link_clip_vocab(d, check=False)
            # tokenizer.json (3.6 MB) is redundant with vocab.json + merges.txt +
            # tokenizer_config.json; transformers rebuilds the same tokenizer
            os.remove(os.path.join(d, "tokenizer.json"))


def build(name):
    return BUILDERS[name][0]()


def main(argv=None):
    from . import export

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(REPO, "tests", "fixtures"))
    ap.add_argument("--only", action="append")
    ap.add_argument("--no-onnx", action="store_true")
    a = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    for name in a.only or list(BUILDERS) + list(UNET_VARIANTS):
        if name in UNET_VARIANTS:
            if not a.no_onnx:
                print(f"exported {export_unet_variant(a.root, name)}")
            continue
        builder, sched = BUILDERS[name]
        pipe = builder()
        ddir = os.path.join(a.root, "diffusers", name)
        save_diffusers(pipe, ddir, sched)
        print(f"saved {ddir}")
        if not a.no_onnx:
            out = os.path.join(a.root, name)
            if os.path.exists(out):
                shutil.rmtree(out)
            export.export_pipeline(ddir, out)
            link_tokenizers(out)
            print(f"exported {out}")


if __name__ == "__main__":
    main()
