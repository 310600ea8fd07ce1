"""LoRA test fixtures and module-structure dumps for the Rust `lora` layer.

    PYTHONPATH=onnx python -m spo_onnx.lora_structure [OUT_DIR]

Writes (default OUT_DIR = tests/fixtures/lora-unit):

* `tiny_unet/` a tiny UNet2DConditionModel with the SDXL block layout (three
  levels, DownBlock2D + 2 x CrossAttn, text_time addition embedding, linear
  projections), random weights (seed 0), exported three ways:
  `ts/model.onnx` (+ `model.onnx_data`, TorchScript exporter, constant folding,
  anonymous [in,out] MatMul weights), `fqn/model.onnx` (TorchScript without
  constant folding: FQN weights behind Transpose nodes, inline data),
  `dynamo/model.onnx` (dynamo exporter, external data, metadata trimmed to
  `pkg.torch.onnx.name_scopes`).
  `tiny_unet/params.json` lists every Linear / Conv2d with its weight shape, and
  `tiny_unet/weights.safetensors` holds the PyTorch weights, for cross-checks.
* rank-4 LoRA files for the tiny UNet (alpha 2, so scale 0.5) in kohya
  diffusers-flat, kohya SGM, PEFT (+ adapter_config.json), diffusers
  `.lora.down` (+ metadata alpha) and attn-processor forms; the expected merged
  weights come from PEFT's own `merge()` (`expected_lora.safetensors`).
* `lycoris.safetensors`: LoCon (3x3, 1x1, Tucker `lora_mid`), LoHa, LoKr and
  DoRA modules; `expected_lycoris.safetensors` holds the merged weights at
  multiplier 0.8 computed here with numpy from the formulas in
  shared/reference/lora-formats.md.
* `sdxl_structure.json`: every Linear / Conv2d of the full-size SDXL UNet and
  both text encoders (and of SD 1.5), built on the meta device, plus kohya key
  lists (722 default targets, 560 attention targets) in the diffusers-flat and
  SGM dialects, the SGM names derived here from the block layout.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

RANK = 4
ALPHA = 2.0

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[2, 4, 8],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=2, cross_attention_dim=16,
    transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=4 * 6 + 8, norm_num_groups=2,
)
TE1 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
           num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TE2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}


def weight_modules(model):
    """{module path: (kind, weight shape)} for every Linear and Conv2d."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[name] = ("Linear", list(m.weight.shape))
        elif isinstance(m, torch.nn.Conv2d):
            out[name] = ("Conv2d", list(m.weight.shape))
    return out


def sgm_name(path, cfg):
    """The SGM (original SD/SDXL) name of a diffusers UNet module path, written
    out from the block layout: input_blocks count resnets and downsamplers,
    output_blocks count layers_per_block + 1 resnets per level."""
    L = cfg["layers_per_block"]
    p = path.split(".")
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if path in fixed:
        return fixed[path]

    def resnet_tail(rest):
        return RESNET_SGM.get(rest[0], rest[0]) if len(rest) == 1 else ".".join(rest)

    if p[0] == "down_blocks":
        i = int(p[1])
        ids = []
        n = 1
        for lvl, _ in enumerate(cfg["down_block_types"]):
            ids.append(n)
            n += L + (1 if lvl < len(cfg["down_block_types"]) - 1 else 0)
        if p[2] == "downsamplers":
            return f"input_blocks.{ids[i] + L}.0.op"
        j = int(p[3])
        if p[2] == "resnets":
            return f"input_blocks.{ids[i] + j}.0.{resnet_tail(p[4:])}"
        return f"input_blocks.{ids[i] + j}.1." + ".".join(p[4:])
    if p[0] == "mid_block":
        if p[1] == "attentions":
            return "middle_block.1." + ".".join(p[3:])
        return f"middle_block.{0 if p[2] == '0' else 2}.{resnet_tail(p[3:])}"
    if p[0] == "up_blocks":
        i = int(p[1])
        base = i * (L + 1)
        has_attn = cfg["up_block_types"][i].startswith("CrossAttn")
        if p[2] == "upsamplers":
            return f"output_blocks.{base + L}.{2 if has_attn else 1}.conv"
        j = int(p[3])
        if p[2] == "resnets":
            return f"output_blocks.{base + j}.0.{resnet_tail(p[4:])}"
        return f"output_blocks.{base + j}.1." + ".".join(p[4:])
    raise ValueError(path)


def te_root(path):
    return path if path.startswith("text_model.") else "text_model." + path


def flat(prefix, path):
    return prefix + path.replace(".", "_")


def structure(out_dir):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        sd15 = UNet2DConditionModel(**SD15_UNET)
        te1 = CLIPTextModel(CLIPTextConfig(**TE1))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TE2))
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    kohya = []  # Linear / 1x1 Conv children of Transformer2DModel
    for name, m in unet.named_modules():
        if isinstance(m, Transformer2DModel):
            for cname, c in m.named_modules():
                if isinstance(c, torch.nn.Linear) or (isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1)):
                    kohya.append(f"{name}.{cname}")
    attn = [k for k in kohya if k.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or k.endswith("to_out.0")]
    te_keys = lambda model: [n for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and (".self_attn." in n or ".mlp." in n)]
    mods = lambda m: {k: {"kind": v[0], "shape": v[1]} for k, v in weight_modules(m).items()}
    unet_mods = weight_modules(unet)
    doc = {
        "unet": {"config": SDXL_UNET, "modules": mods(unet)},
        "text_encoder": {"modules": mods(te1)},
        "text_encoder_2": {"modules": mods(te2)},
        "sd15_unet": {"config": SD15_UNET, "modules": mods(sd15)},
        "sd15_text_encoder": {"modules": mods(CLIPTextModel(CLIPTextConfig(**TE1)).to("meta"))},
        "kohya_722": {"modules": kohya,
                      "flat": [flat("lora_unet_", k) for k in kohya],
                      "sgm": [flat("lora_unet_", sgm_name(k, SDXL_UNET)) for k in kohya]},
        "spo_560": {"modules": attn,
                    "flat": [flat("lora_unet_", k) for k in attn],
                    "sgm": [flat("lora_unet_", sgm_name(k, SDXL_UNET)) for k in attn]},
        "locon_unet": {"modules": [k for k in unet_mods if ".resnets." in k or "samplers" in k],
                       "sgm": [flat("lora_unet_", sgm_name(k, SDXL_UNET)) for k in unet_mods
                               if ".resnets." in k or "samplers" in k]},
        # kohya names come from the `text_model.`-rooted CLIP module tree (transformers 4);
        # newer transformers may drop that root from the module paths.
        "te1": {"modules": te_keys(te1), "kohya": [flat("lora_te1_", te_root(k)) for k in te_keys(te1)]},
        "te2": {"modules": te_keys(te2), "kohya": [flat("lora_te2_", te_root(k)) for k in te_keys(te2)]},
    }
    assert len(kohya) == 722 and len(attn) == 560, (len(kohya), len(attn))
    assert len(doc["te1"]["modules"]) == 72 and len(doc["te2"]["modules"]) == 192
    with open(out_dir / "sdxl_structure.json", "w") as f:
        json.dump(doc, f, indent=0, sort_keys=True)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    class TinyUnet(UNet2DConditionModel):
        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            return super().forward(sample, timestep, encoder_hidden_states,
                                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                                   return_dict=False)[0]

    torch.manual_seed(0)
    u = TinyUnet(**TINY_UNET).eval()
    with torch.no_grad():
        for p in u.parameters():  # diffusers zero-inits some layers; make every weight distinct
            p.copy_(torch.randn_like(p) * 0.2)
    args = (torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 3, 16), torch.randn(1, 8),
            torch.randn(1, 6))
    return u, args


NAMES = dict(input_names=["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
             output_names=["out_sample"])


def export_all(u, args, tdir):
    import onnx

    from . import export

    for sub in ("ts", "fqn", "dynamo"):
        (tdir / sub).mkdir(parents=True, exist_ok=True)
        for f in (tdir / sub).iterdir():
            f.unlink()
    with torch.no_grad():
        p = tdir / "ts" / "model.onnx"
        torch.onnx.export(u, args, str(p), dynamo=False, opset_version=17, do_constant_folding=True, **NAMES)
        m = onnx.load(str(p))
        onnx.save_model(m, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=0)
        p = tdir / "fqn" / "model.onnx"
        torch.onnx.export(u, args, str(p), dynamo=False, opset_version=17, do_constant_folding=False, **NAMES)
        prog = torch.onnx.export(u, args, dynamo=True, **NAMES)
        # keep the fixture small: only the name-scope metadata the reader uses
        model = prog.model_proto
        export.keep_name_scopes_only(model)
        del model.graph.value_info[:]
        onnx.save_model(model, str(tdir / "dynamo" / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)


def lora_fixtures(u, out_dir):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    mods = weight_modules(u)
    base = {k + ".weight": dict(u.named_modules())[k].weight.detach().clone().contiguous() for k in mods}
    save_file(base, str(out_dir / "tiny_unet" / "weights.safetensors"))
    with open(out_dir / "tiny_unet" / "params.json", "w") as f:
        json.dump({"config": TINY_UNET, "modules": {k: {"kind": v[0], "shape": v[1]} for k, v in mods.items()}},
                  f, indent=1, sort_keys=True)

    torch.manual_seed(1)
    targets = sorted(mods)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(cfg, u)
    with torch.no_grad():
        for n, p in u.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    sd = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(u).items()}
    merged = {}
    for name, m in u.named_modules():
        if name in mods and hasattr(m, "merge"):
            m.merge()
            merged[name + ".weight"] = m.base_layer.weight.detach().clone().contiguous()
    assert len(merged) == len(targets), (len(merged), len(targets))
    save_file(merged, str(out_dir / "expected_lora.safetensors"))

    stems = {}
    for k, v in sd.items():
        stem, part = k.rsplit(".lora_", 1)
        stems.setdefault(stem, {})[part] = v
    # PEFT form with base_model.model. prefix + adapter_config.json
    (out_dir / "peft").mkdir(exist_ok=True)
    save_file({f"base_model.model.{s}.lora_{p}": v for s, d in stems.items() for p, v in d.items()},
              str(out_dir / "peft" / "adapter_model.safetensors"))
    with open(out_dir / "peft" / "adapter_config.json", "w") as f:
        json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": targets}, f)
    # older diffusers spelling, alpha in metadata
    save_file({f"unet.{s}.lora.{'down' if p == 'A.weight' else 'up'}.weight": v
               for s, d in stems.items() for p, v in d.items()},
              str(out_dir / "diffusers_old.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})})

    def kohya(namefn, alpha_tensor, metadata):
        t = {}
        for s, d in stems.items():
            k = flat("lora_unet_", namefn(s))
            t[k + ".lora_down.weight"] = d["A.weight"]
            t[k + ".lora_up.weight"] = d["B.weight"]
            t[k + ".alpha"] = alpha_tensor.clone()
        return t, metadata

    t, md = kohya(lambda s: s, torch.tensor(ALPHA, dtype=torch.float16), {"ss_network_module": "networks.lora"})
    save_file(t, str(out_dir / "kohya_flat.safetensors"), metadata=md)
    t, md = kohya(lambda s: sgm_name(s, TINY_UNET), torch.tensor(int(ALPHA), dtype=torch.int64),
                  {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA),
                   "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    save_file(t, str(out_dir / "kohya_sgm.safetensors"), metadata=md)
    # legacy attn-processor form for the attention projections, alpha as per-key scalars
    t = {}
    for s, d in stems.items():
        parent, _, leaf = s.rpartition(".")
        if leaf in ("to_q", "to_k", "to_v") or s.endswith("to_out.0"):
            if s.endswith("to_out.0"):
                parent, leaf = s[: -len(".to_out.0")], "to_out"
            k = f"unet.{parent}.processor.{leaf}_lora"
            t[k + ".down.weight"] = d["A.weight"]
            t[k + ".up.weight"] = d["B.weight"]
            t[k + ".alpha"] = torch.tensor(ALPHA, dtype=torch.bfloat16).clone()
    save_file(t, str(out_dir / "attn_procs.safetensors"))
    return base, mods


def lycoris_fixtures(base, mods, out_dir):
    """Each module with its own LyCORIS kind; the merge formulas written in numpy."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    mult = 0.8
    R = RANK
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)
    t, expected = {}, {}
    W = lambda n: base[n + ".weight"].numpy().astype(np.float64)

    def put(name, d, alpha, delta_fn):
        k = flat("lora_unet_", name)
        for part, v in d.items():
            t[f"{k}.{part}"] = v
        if alpha is not None:
            t[f"{k}.alpha"] = np.array(alpha, dtype=np.float32)
        expected[name + ".weight"] = delta_fn(W(name)).astype(np.float32)

    # LoCon 3x3 plain
    n = "down_blocks.0.resnets.0.conv2"
    o, i, kh, kw = mods[n][1]
    d = {"lora_down.weight": r(R, i, kh, kw), "lora_up.weight": r(o, R, 1, 1)}
    put(n, d, ALPHA, lambda w: w + mult * ALPHA / R * np.einsum("or,rikl->oikl", d["lora_up.weight"][:, :, 0, 0],
                                                                 d["lora_down.weight"]))
    # LoCon Tucker (lora_mid)
    n = "down_blocks.0.resnets.0.conv1"
    o, i, kh, kw = mods[n][1]
    d2 = {"lora_down.weight": r(R, i, 1, 1), "lora_mid.weight": r(R, R, kh, kw), "lora_up.weight": r(o, R, 1, 1)}
    put(n, d2, ALPHA, lambda w: w + mult * ALPHA / R * np.einsum(
        "nmkl,in,mj->ijkl", d2["lora_mid.weight"], d2["lora_up.weight"][:, :, 0, 0], d2["lora_down.weight"][:, :, 0, 0]))
    # LoCon 1x1
    n = "down_blocks.1.resnets.0.conv_shortcut"
    o, i, _, _ = mods[n][1]
    d3 = {"lora_down.weight": r(R, i, 1, 1), "lora_up.weight": r(o, R, 1, 1)}
    put(n, d3, 1.0, lambda w: w + mult * 1.0 / R * (d3["lora_up.weight"][:, :, 0, 0] @ d3["lora_down.weight"][:, :, 0, 0])[:, :, None, None])
    # LoHa linear
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    o, i = mods[n][1]
    h = {"hada_w1_a": r(o, R), "hada_w1_b": r(R, i), "hada_w2_a": r(o, R), "hada_w2_b": r(R, i)}
    put(n, h, ALPHA, lambda w: w + mult * ALPHA / R * ((h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"])))
    # LoHa conv 3x3 (b factors flattened to [R, in*kh*kw])
    n = "up_blocks.2.resnets.0.conv1"
    o, i, kh, kw = mods[n][1]
    h2 = {"hada_w1_a": r(o, R), "hada_w1_b": r(R, i * kh * kw), "hada_w2_a": r(o, R), "hada_w2_b": r(R, i * kh * kw)}
    put(n, h2, None, lambda w: w + mult * ((h2["hada_w1_a"] @ h2["hada_w1_b"]) * (h2["hada_w2_a"] @ h2["hada_w2_b"])).reshape(o, i, kh, kw))
    # LoKr, w1 full, w2 decomposed: alpha/rank applies
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    o, i = mods[n][1]
    k1 = {"lokr_w1": r(2, 4), "lokr_w2_a": r(o // 2, 2), "lokr_w2_b": r(2, i // 4)}
    put(n, k1, 1.0, lambda w: w + mult * 1.0 / 2 * np.kron(k1["lokr_w1"], k1["lokr_w2_a"] @ k1["lokr_w2_b"]))
    # LoKr, both full: scale 1, alpha ignored
    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"
    o, i = mods[n][1]
    k2 = {"lokr_w1": r(2, 2), "lokr_w2": r(o // 2, i // 2)}
    put(n, k2, 3.0, lambda w: w + mult * np.kron(k2["lokr_w1"], k2["lokr_w2"]))

    # DoRA, norms per input column (dora_scale [1, in]) and per output row ([out, 1])
    def dora(dd, alpha, per_out):
        def f(w):
            up, down = dd["lora_up.weight"], dd["lora_down.weight"]
            m = w + alpha / R * (up @ down)
            norm = np.linalg.norm(m, axis=1, keepdims=True) if per_out else np.linalg.norm(m, axis=0, keepdims=True)
            wp = dd["dora_scale"] * m / norm
            return w + mult * (wp - w)
        return f

    n = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
    o, i = mods[n][1]
    dd = {"lora_down.weight": r(R, i), "lora_up.weight": r(o, R), "dora_scale": np.abs(r(1, i)) + 0.5}
    put(n, dd, ALPHA, dora(dd, ALPHA, False))
    n = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    o, i = mods[n][1]
    de = {"lora_down.weight": r(R, i), "lora_up.weight": r(o, R), "dora_scale": np.abs(r(o, 1)) + 0.5}
    put(n, de, ALPHA, dora(de, ALPHA, True))

    save_file(t, str(out_dir / "lycoris.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    save_file(expected, str(out_dir / "expected_lycoris.safetensors"), metadata={"multiplier": str(mult)})


def main():
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/lora-unit")
    out_dir.mkdir(parents=True, exist_ok=True)
    structure(out_dir)
    u, args = tiny_unet()
    export_all(u, args, out_dir / "tiny_unet")
    base, mods = lora_fixtures(u, out_dir)
    lycoris_fixtures(base, mods, out_dir)
    total = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    print(f"wrote {out_dir} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
