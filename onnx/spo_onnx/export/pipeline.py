"""Whole-pipeline export (`python -m spo_onnx.export`): loading a diffusers
folder or single-file checkpoint, baking LoRA files in, and writing the
diffusers/optimum ONNX folder layout (model_index.json, tokenizers, configs).
"""

import argparse
import json
import os
import shutil
import sys
import time

import torch

from .common import DEFAULT_OPSET
from .text import export_text_encoder
from .unet import export_unet
from .vae import export_vae


# --------------------------------------------------------------------------- loading


def _is_sdxl_checkpoint(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return any(k.startswith("conditioner.embedders.1") for k in f.keys())


def load_pipeline(src, config=None, dtype=torch.float32):
    """A diffusers pipeline from a folder, or from one single-file checkpoint
    (`config` = a local diffusers folder holding the component configs, as
    there is no hub access)."""
    import diffusers

    if os.path.isdir(src):
        kwargs = {}
        with open(os.path.join(src, "model_index.json")) as f:
            index = json.load(f)
        if "safety_checker" in index:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        return diffusers.DiffusionPipeline.from_pretrained(src, torch_dtype=dtype, **kwargs)
    cls = diffusers.StableDiffusionXLPipeline if _is_sdxl_checkpoint(src) else diffusers.StableDiffusionPipeline
    kwargs = {"torch_dtype": dtype}
    if config:
        kwargs["config"] = config
    if cls is diffusers.StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return cls.from_single_file(src, **kwargs)


def is_sdxl(pipe):
    return getattr(pipe, "text_encoder_2", None) is not None


def parse_lora_arg(spec):
    """FILE[:W] -> (file, weight). A Windows drive letter or a path containing
    ':' is handled by only splitting off a trailing float."""
    if ":" in spec:
        head, tail = spec.rsplit(":", 1)
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def fuse_loras(pipe, loras):
    """diffusers load_lora_weights + fuse_lora, each LoRA with its multiplier."""
    if not loras:
        return
    names = []
    for i, (path, _) in enumerate(loras):
        name = f"lora{i}"
        pipe.load_lora_weights(path, adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if is_sdxl(pipe) else [])
    pipe.fuse_lora(components=components, adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
# --------------------------------------------------------------------------- tokenizers / configs


def save_tokenizer(tok, out_dir, src_dir=None):
    """tokenizer files as diffusers saves them, plus vocab.json / merges.txt
    (copied from the source folder, else rebuilt from tokenizer.json)."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    for fname in ("vocab.json", "merges.txt"):
        if src_dir and os.path.exists(os.path.join(src_dir, fname)):
            shutil.copyfile(os.path.join(src_dir, fname), os.path.join(out_dir, fname))
    if not os.path.exists(os.path.join(out_dir, "vocab.json")):
        with open(os.path.join(out_dir, "tokenizer.json"), encoding="utf-8") as f:
            model = json.load(f)["model"]
        with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(model["vocab"], f, ensure_ascii=False)
        with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for m in model["merges"]:
                f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    # the optimum layout has no tokenizer.json; it is 3.6 MB and redundant
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        os.remove(os.path.join(out_dir, "tokenizer.json"))




# --------------------------------------------------------------------------- driver


def export_pipeline(
    src,
    out,
    fp16=False,
    vae_fp16=False,
    opset=DEFAULT_OPSET,
    static_hw=None,
    batch=None,
    lora_slots=0,
    loras=(),
    dynamo=False,
    config=None,
    components=("text_encoder", "text_encoder_2", "unet", "vae"),
    pipe=None,
):
    t0 = time.time()
    torch.manual_seed(0)
    if pipe is None:
        pipe = load_pipeline(src, config=config)
    fuse_loras(pipe, list(loras))
    sdxl = is_sdxl(pipe)
    dt = torch.float16 if fp16 else torch.float32
    vdt = torch.float16 if vae_fp16 else torch.float32
    os.makedirs(out, exist_ok=True)
    src_dir = src if src and os.path.isdir(src) else None
    # folder-level files
    if src_dir:
        shutil.copyfile(os.path.join(src_dir, "model_index.json"), os.path.join(out, "model_index.json"))
    else:
        with open(os.path.join(out, "model_index.json"), "w") as f:
            json.dump(dict(pipe.config), f, indent=2, default=lambda o: list(o))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    sched_src = os.path.join(src_dir, "scheduler", "scheduler_config.json") if src_dir else None
    if sched_src and os.path.exists(sched_src):
        shutil.copyfile(sched_src, os.path.join(out, "scheduler", "scheduler_config.json"))
    else:
        pipe.scheduler.save_config(os.path.join(out, "scheduler"))
    save_tokenizer(pipe.tokenizer, os.path.join(out, "tokenizer"), src_dir and os.path.join(src_dir, "tokenizer"))
    if sdxl:
        save_tokenizer(pipe.tokenizer_2, os.path.join(out, "tokenizer_2"), src_dir and os.path.join(src_dir, "tokenizer_2"))

    b = batch or 1
    if dynamo and static_hw is None:
        # torch.export specialises a size of 1 seen while tracing (see export_unet)
        b = max(b, 2)
    if "text_encoder" in components:
        export_text_encoder(pipe.text_encoder, os.path.join(out, "text_encoder"), False, opset, dynamo, b, static_hw is not None, fp16)
        print(f"text_encoder done ({time.time() - t0:.1f}s)", file=sys.stderr)
    if sdxl and "text_encoder_2" in components:
        export_text_encoder(pipe.text_encoder_2, os.path.join(out, "text_encoder_2"), True, opset, dynamo, b, static_hw is not None, fp16)
        print(f"text_encoder_2 done ({time.time() - t0:.1f}s)", file=sys.stderr)
    if "unet" in components:
        te_dim = pipe.text_encoder_2.config.projection_dim if sdxl else None
        export_unet(pipe.unet, os.path.join(out, "unet"), sdxl, dt, opset, dynamo, batch or 2, static_hw, lora_slots, te_dim)
        print(f"unet done ({time.time() - t0:.1f}s)", file=sys.stderr)
    if "vae" in components:
        export_vae(pipe.vae, out, vdt, opset, dynamo, b, static_hw)
        print(f"vae done ({time.time() - t0:.1f}s)", file=sys.stderr)
    return pipe


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True, help="diffusers folder, or a single .safetensors checkpoint")
    ap.add_argument("--config", help="for a single-file checkpoint: a local diffusers folder with the component configs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fp16", action="store_true", help="UNet and text encoders in fp16 (VAE stays fp32)")
    ap.add_argument("--vae-fp16", action="store_true", help="VAE in fp16 too (only for an fp16-safe VAE)")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    ap.add_argument("--static-shape", help="HxW image size: export static shapes")
    ap.add_argument("--batch", type=int, help="batch size (static with --static-shape; trace size otherwise)")
    ap.add_argument("--lora-slots", type=int, default=0, metavar="RANK", help="add low-rank LoRA branch inputs to attention projections")
    ap.add_argument("--lora", action="append", default=[], metavar="FILE[:W]", help="fuse a LoRA before export (repeatable)")
    ap.add_argument("--dynamo", action="store_true", help="use the dynamo exporter instead of TorchScript")
    a = ap.parse_args(argv)
    static = None
    if a.static_shape:
        hh, ww = a.static_shape.lower().split("x")
        static = (int(hh), int(ww))
    export_pipeline(
        a.pipeline,
        a.out,
        fp16=a.fp16,
        vae_fp16=a.vae_fp16,
        opset=a.opset,
        static_hw=static,
        batch=a.batch,
        lora_slots=a.lora_slots,
        loras=[parse_lora_arg(s) for s in a.lora],
        dynamo=a.dynamo,
        config=a.config,
    )
