"""LoRAs saved by `spo train` load in diffusers (`load_lora_weights`), in both
formats: the webui (kohya) file, with SGM block names for SDXL, and the
diffusers file. After `fuse_lora`, every trained weight of the diffusers UNet
must be W + alpha/r * up @ down from the file, and the two formats of one
(deterministic) training run must give the same weights.
"""

import os
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
# The CLI `make build` made; the Makefile exports SPO_CLI (it honours CARGO_TARGET_DIR).
SPO = os.environ.get("SPO_CLI") or os.path.join(ROOT, "target", "release", "spo")
FIX = os.path.join(ROOT, "tests", "fixtures")


def train(tmp_path, model, fmt):
    if not os.path.exists(SPO):
        pytest.fail(f"{SPO} is missing: run `make build` first")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\n")
    out = tmp_path / f"{model}-{fmt}.safetensors"
    env = dict(os.environ)
    env.setdefault("SPO_ORT_LIBRARY", os.path.join(ROOT, "third_party", "onnxruntime", "cpu", "libonnxruntime.so"))
    subprocess.run([SPO, "train", "--ep", "cpu", "--model", os.path.join(FIX, model),
                    "--train-dir", os.path.join(FIX, "train", model, "graphs"),
                    "--spm", os.path.join(FIX, "preference", "colour"), "--prompts", str(prompts),
                    "--out", str(out), "--format", fmt, "--preset", "toy", "--rounds", "1",
                    "--set", "steps=3", "--set", "divert_start=1", "--set", "pool=2", "--set", "threshold=0"],
                   check=True, env=env, capture_output=True)
    return out


def fused_unet(model, lora):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(os.path.join(FIX, "diffusers", model))
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora()
    # peft keeps the fused weight under `<module>.base_layer.weight`.
    fused = {k.replace(".base_layer.", "."): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    return base, fused


def expected_deltas(diffusers_file):
    """module -> alpha/r * B @ A from our diffusers-format file."""
    t = load_file(str(diffusers_file))
    out = {}
    for k, a in t.items():
        if k.endswith(".lora_A.weight"):
            module = k[len("unet."):-len(".lora_A.weight")]
            b = t[k.replace("lora_A", "lora_B")]
            out[module] = (b @ a, a.shape[0])
    return out


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_both_formats_load_in_diffusers(tmp_path, model):
    webui = train(tmp_path, model, "webui")
    diff = train(tmp_path, model, "diffusers")
    keys = load_file(str(webui)).keys()
    if model == "tiny-sdxl":
        # A1111 / ComfyUI names: SGM blocks.
        assert all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
                   for k in keys), sorted(keys)[:3]
    alpha = float(load_file(str(webui))[next(k for k in keys if k.endswith(".alpha"))])
    deltas = expected_deltas(diff)
    assert deltas and any(np.abs(d).max() > 0 for d, _ in deltas.values()), "training left the LoRA at zero"
    fused = {}
    for fmt, f in (("webui", webui), ("diffusers", diff)):
        base, fused[fmt] = fused_unet(model, f)
        worst = 0.0
        for module, (d, rank) in deltas.items():
            key = module + ".weight"
            got = (fused[fmt][key] - base[key]).double().numpy()
            want = alpha / rank * d.astype(np.float64)
            worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)))
        assert worst < 1e-4, f"{fmt}: fused delta off by {worst}"
    for k, v in fused["webui"].items():
        assert torch.allclose(v, fused["diffusers"][k], atol=1e-7), k
