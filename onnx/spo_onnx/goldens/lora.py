"""Tiny LoRAs (made with peft, fixed seeds) in three file formats, and
diffusers' fused-LoRA reference latents.

    PYTHONPATH=onnx python -m spo_onnx.goldens.lora [--root tests/fixtures] [--only tiny-sdxl]

Writes ROOT/lora/<model>/<lora>/{peft,kohya_flat,kohya_sgm}.safetensors and
appends the "lora" section of ROOT/goldens/<model>/index.json.
"""

import argparse
import json
import os
import re
import shutil
import sys

import torch

from ..fixtures import REPO
from .common import Writer, jsonable, load, make_scheduler, record_randn

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

LORAS = {
    # name: (seed, rank, alpha, with text encoders)
    "lora_a": (1000, 4, 8, True),
    "lora_b": (2000, 2, 1, False),
}

CASE = dict(name="lora_euler_cfg5_neg", prompt="a photo of a cat", negative_prompt="blurry", width=64, height=64, steps=5, guidance=5.0, scheduler="euler", eta=0.0, seed=500)


def _add_adapter(model, targets, rank, alpha, seed):
    from peft import LoraConfig

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model.add_adapter(cfg)
    # init_lora_weights=False gives random A and B; rescale B so the effect is
    # visible but moderate
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
    return cfg


def make_lora(pipe, seed, rank, alpha, with_te):
    """Returns {component: peft state dict} and the adapter configs."""
    from peft.utils import get_peft_model_state_dict

    sdxl = hasattr(pipe, "text_encoder_2")
    comps = [("unet", pipe.unet, UNET_TARGETS)]
    if with_te:
        comps.append(("text_encoder", pipe.text_encoder, TE_TARGETS))
        if sdxl:
            comps.append(("text_encoder_2", pipe.text_encoder_2, TE_TARGETS))
    layers, metas = {}, {}
    for i, (name, model, targets) in enumerate(comps):
        cfg = _add_adapter(model, targets, rank, alpha, seed + i)
        layers[name] = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        metas[name] = clean_meta(cfg.to_dict())
        model.delete_adapters("default") if hasattr(model, "delete_adapters") else None
    return layers, metas


def clean_meta(meta):
    """Deterministic adapter metadata: sorted target modules (a set in peft),
    no local paths."""
    meta = dict(meta)
    meta["target_modules"] = sorted(meta["target_modules"])
    meta["base_model_name_or_path"] = None
    return meta


def sanitize_peft_file(path):
    """Rewrites the lora_adapter_metadata of a saved peft file with clean_meta."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    m = json.loads(meta["lora_adapter_metadata"])
    for k in list(m):
        if k.endswith(".target_modules"):
            m[k] = sorted(m[k])
        if k.endswith(".base_model_name_or_path"):
            m[k] = None
    meta["lora_adapter_metadata"] = json.dumps(m, indent=2, sort_keys=True)
    save_file(tensors, path, metadata=meta)


# SGM names (SDXL): diffusers attention blocks -> kohya "original" UNet blocks
def sgm_module(path):
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{3 * i + j + 1}.1.{rest}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", path)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{3 * i + j}.1.{rest}"
    raise ValueError(path)


def kohya_dicts(layers, alpha, sdxl):
    """(kohya diffusers-flat, kohya SGM or None) state dicts, alpha = the real alpha."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft_sd = {}
    for comp, sd in layers.items():
        for k, v in sd.items():
            peft_sd[f"{comp}.{k}"] = v
    flat = convert_state_dict_to_kohya(peft_sd)
    te1 = "lora_te1_" if sdxl else "lora_te_"
    fixed = {}
    for k, v in flat.items():
        if k.endswith(".alpha"):
            v = torch.tensor(float(alpha), dtype=torch.float32)
        if not sdxl:
            k = k.replace("lora_te1_", te1)
        fixed[k] = v.contiguous()
    sgm = None
    if sdxl:
        sgm = {}
        for comp, sd in layers.items():
            for k, v in sd.items():
                mod, part = k.rsplit(".lora_", 1)
                part = "lora_down.weight" if part.startswith("A") else "lora_up.weight"
                if comp == "unet":
                    name = "lora_unet_" + sgm_module(mod).replace(".", "_")
                else:
                    name = ("lora_te1_" if comp == "text_encoder" else "lora_te2_") + mod.replace(".", "_")
                sgm[f"{name}.{part}"] = v.contiguous()
                if part == "lora_down.weight":
                    sgm[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return fixed, sgm


def write_lora_files(pipe_cls, layers, metas, alpha, sdxl, out_dir):
    from safetensors.torch import save_file

    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    kw = {"unet_lora_layers": layers["unet"], "unet_lora_adapter_metadata": metas["unet"]}
    if "text_encoder" in layers:
        kw.update(text_encoder_lora_layers=layers["text_encoder"], text_encoder_lora_adapter_metadata=metas["text_encoder"])
    if "text_encoder_2" in layers:
        kw.update(text_encoder_2_lora_layers=layers["text_encoder_2"], text_encoder_2_lora_adapter_metadata=metas["text_encoder_2"])
    pipe_cls.save_lora_weights(out_dir, weight_name="peft.safetensors", **kw)
    flat, sgm = kohya_dicts(layers, alpha, sdxl)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(next(iter(layers["unet"].values())).shape[0]), "ss_network_alpha": str(alpha)}
    save_file(flat, os.path.join(out_dir, "kohya_flat.safetensors"), metadata=meta)
    files = {"peft": "peft.safetensors", "kohya_flat": "kohya_flat.safetensors"}
    if sgm is not None:
        save_file(sgm, os.path.join(out_dir, "kohya_sgm.safetensors"), metadata=meta)
        files["kohya_sgm"] = "kohya_sgm.safetensors"
    return files


def fused_latents(pipe, loras, case, fmt="peft"):
    """diffusers load_lora_weights + fuse_lora, then the case with output_type latent."""
    names = []
    for i, (path, mult) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"l{i}")
        names.append(f"l{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[m for _, m in loras])
        comps = ["unet", "text_encoder"] + (["text_encoder_2"] if hasattr(pipe, "text_encoder_2") else [])
        pipe.fuse_lora(components=comps, adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    pipe.scheduler = make_scheduler(pipe, case["scheduler"])
    log = []
    with record_randn(log), torch.no_grad():
        lat = pipe(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            width=case["width"],
            height=case["height"],
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance"],
            generator=torch.Generator("cpu").manual_seed(case["seed"]),
            output_type="latent",
        ).images
    return lat, log[0][1], pipe.scheduler


def lora_entries(model, pipe_unused, root, w):
    sdxl = model.endswith("sdxl")
    lora_root = os.path.join(root, "lora", model)
    files = {}
    for name, (seed, rank, alpha, with_te) in LORAS.items():
        pipe = load(model, root)
        layers, metas = make_lora(pipe, seed, rank, alpha, with_te)
        f = write_lora_files(type(pipe), layers, metas, alpha, sdxl, os.path.join(lora_root, name))
        files[name] = {k: f"lora/{model}/{name}/{v}" for k, v in f.items()}
        files[name]["rank"] = rank
        files[name]["alpha"] = alpha
        files[name]["text_encoders"] = with_te
    entries = []
    base, _, _ = fused_latents(load(model, root), [], CASE)
    combos = [("lora_a_x1.0", [("lora_a", 1.0)]), ("lora_a_x0.5", [("lora_a", 0.5)]), ("lora_b_x1.0", [("lora_b", 1.0)]), ("lora_a_x1.0_lora_b_x0.5", [("lora_a", 1.0), ("lora_b", 0.5)])]
    for tag, combo in combos:
        paths = [(os.path.join(root, files[n]["peft"]), m) for n, m in combo]
        lat, init, sched = fused_latents(load(model, root), paths, CASE)
        diff = (lat - base).abs().max().item()
        assert diff > 1e-3, f"LoRA {tag} has no visible effect ({diff})"
        # the kohya forms must give the same result through diffusers' own loaders
        checks = {}
        for fmt in ("kohya_flat", "kohya_sgm"):
            if all(fmt in files[n] for n, _ in combo):
                try:
                    lk, _, _ = fused_latents(load(model, root), [(os.path.join(root, files[n][fmt]), m) for n, m in combo], CASE)
                    checks[fmt] = float((lk - lat).abs().max())
                except Exception as e:  # diffusers cannot load every dialect
                    checks[fmt] = f"diffusers failed to load: {type(e).__name__}: {e}"[:300]
        case = dict(CASE, name=f"{CASE['name']}_{tag}", guidance_rescale=0.0, scheduler_class=type(sched).__name__, scheduler_config=jsonable(sched.config), timesteps=[float(t) for t in sched.timesteps], noise=None, init_image=None, strength=None)
        case["init_latents"] = w.npy(f"{tag}_init.npy", init)
        entries.append(
            {
                "name": tag,
                "loras": [n for n, _ in combo],
                "files": {fmt: [files[n].get(fmt) for n, _ in combo] for fmt in ("peft", "kohya_flat", "kohya_sgm")},
                "ranks": [files[n]["rank"] for n, _ in combo],
                "alphas": [files[n]["alpha"] for n, _ in combo],
                "text_encoders": [files[n]["text_encoders"] for n, _ in combo],
                "multipliers": [m for _, m in combo],
                "case": case,
                "latents": w.npy(f"{tag}_latents.npy", lat),
                "base_latents": w.npy("lora_base_latents.npy", base),
                "max_abs_diff_vs_base": diff,
                "diffusers_kohya_load_max_abs_diff": checks,
            }
        )
        print(f"{model}: {tag} diff vs base {diff:.4f}, kohya checks {checks}", file=sys.stderr)
    return entries


def write_lora_section(model, root):
    """Rewrites the "lora" section of goldens/<model>/index.json (run after
    goldens.pipeline, which leaves it empty)."""
    out = os.path.join(root, "goldens", model)
    index_path = os.path.join(out, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["lora"] = lora_entries(model, load(model, root), root, Writer(out))
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1, ensure_ascii=False)


def main(argv=None):
    from ..fixtures import BUILDERS

    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(REPO, "tests", "fixtures"))
    ap.add_argument("--only", action="append")
    a = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    for model in a.only or list(BUILDERS):
        write_lora_section(model, a.root)


if __name__ == "__main__":
    main()
