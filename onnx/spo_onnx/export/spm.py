"""SPO's step-aware preference model (SPM) as a preference-model folder (the
contract is in preference.py's docstring).

    PYTHONPATH=onnx python -m spo_onnx.export.spm --clip-config DIR_OR_JSON --checkpoint FILE.bin \\
        --tokenizer DIR --out DIR
    PYTHONPATH=onnx python -m spo_onnx.export.spm --tiny-random --seed N --tokenizer DIR --out DIR

The SPM is a CLIP model (the published one: CLIP-H/14 started from
PickScore_v1) whose vision tower is conditioned on the denoising step t:
- t -> sinusoidal embedding, 256 wide, in diffusers' `get_timestep_embedding`
  convention with flip_sin_to_cos=True, downscale_freq_shift=0,
  max_period=10000, i.e. [cos(t f_i), sin(t f_i)] with f_i = 10000^(-i/128),
  i < 128 (DiT's `TimestepEmbedder` convention) -> Linear(256, D) -> SiLU ->
  Linear(D, D) = c, D the vision width;
- every vision layer: SiLU(c) -> Linear(D, 6D) = shift, scale, gate for the
  attention and for the MLP, and
  h += gate_msa * attn(modulate(ln1(h), shift_msa, scale_msa)),
  h += gate_mlp * mlp(modulate(ln2(h), shift_mlp, scale_mlp)),
  modulate(x, shift, scale) = x * (1 + scale) + shift over all tokens;
- the pooled token: modulate(post_layernorm(h[:, 0]), shift, scale), with
  (shift, scale) = Linear(D, 2D)(SiLU(c)), before the visual projection;
- the text tower is CLIP's; score = exp(logit_scale) * cos(image, text).

Module names follow the official code's layout, so a state dict of this
module is the published checkpoint's: `model.t_embedder.mlp.{0,2}`,
`model.vision_model.encoder.layers.N.adaLN_modulation.1`,
`model.vision_model.adaLN_modulation.1`, the rest CLIPModel's. Loading is
strict: any difference is an error that names the keys.
"""

import argparse
import json
import os
import sys
import tempfile
import warnings

import torch
from torch import nn

from . import preference
from .common import DEFAULT_OPSET, _export, save_onnx

FREQ_DIM = 256


def timestep_features(t):
    """[B] int -> [B,256] sinusoids (the convention in the module docstring)."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t.float(), FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)


class TimestepEmbedder(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_features(t))


def adaln(width, n):
    """SiLU -> Linear(D, nD), initialised so that every shift and scale is 0
    and every gate 1 (n = 6: the gates are chunks 2 and 5): the SPM then
    computes exactly the CLIP model it starts from."""
    lin = nn.Linear(width, n * width)
    nn.init.zeros_(lin.weight)
    with torch.no_grad():
        lin.bias.zero_()
        if n == 6:
            lin.bias.view(6, width)[[2, 5]] = 1.0
    return nn.Sequential(nn.SiLU(), lin)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class StepAwarePreferenceModel(nn.Module):
    """forward(image [B,3,224,224] CLIP-normalised, timestep [B] int64,
    input_ids [B,77] int64) -> score [B]. `self.model` is a transformers
    CLIPModel with the adaLN parts attached under the official names; its own
    attention, MLP and layer norms do the work, only the vision loop is
    rewritten here (to insert the modulation)."""

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPModel

        clip = CLIPModel(config)
        d = config.vision_config.hidden_size
        clip.t_embedder = TimestepEmbedder(d)
        for layer in clip.vision_model.encoder.layers:
            layer.adaLN_modulation = adaln(d, 6)
        clip.vision_model.adaLN_modulation = adaln(d, 2)
        self.model = clip.eval()

    def image_embeds(self, image, timestep):
        m, v = self.model, self.model.vision_model
        c = m.t_embedder(timestep)
        h = v.pre_layrnorm(v.embeddings(image))
        for layer in v.encoder.layers:
            s1, k1, g1, s2, k2, g2 = layer.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
            h = h + g1 * layer.self_attn(modulate(layer.layer_norm1(h), s1, k1))[0]
            h = h + g2 * layer.mlp(modulate(layer.layer_norm2(h), s2, k2))
        shift, scale = v.adaLN_modulation(c).chunk(2, dim=-1)
        return m.visual_projection(modulate(v.post_layernorm(h[:, 0]), shift, scale))

    def text_embeds(self, input_ids):
        return self.model.text_projection(self.model.text_model(input_ids=input_ids).pooler_output)

    def forward(self, image, timestep, input_ids):
        i = self.image_embeds(image, timestep)
        t = self.text_embeds(input_ids)
        cos = (i / i.norm(dim=-1, keepdim=True) * (t / t.norm(dim=-1, keepdim=True))).sum(-1)
        return self.model.logit_scale.exp() * cos

    def load_checkpoint(self, state_dict):
        """Loads the published state dict (keys `model.…`; bare CLIP-model keys
        are taken too). Raises ValueError naming every missing and unexpected
        key, so a checkpoint with other adaLN names fails at once."""
        sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()}
        # position_ids was a persistent buffer in transformers < 4.31: a fixed arange, not a weight.
        sd = {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"SPM checkpoint does not fit: missing keys {sorted(missing)}, "
                             f"unexpected keys {sorted(unexpected)}")
        return self


def load_config(path):
    """A CLIPConfig from a folder (config.json) or a JSON file; nothing is downloaded."""
    from transformers import CLIPConfig

    if os.path.isdir(path):
        return CLIPConfig.from_pretrained(path, local_files_only=True)
    return CLIPConfig.from_json_file(path)


def tiny_config():
    """CLIP-H's architecture (GELU, 224 images, CLIP vocabulary) at toy width:
    32 wide, 2 layers, patch 32 (7x7 patches), projection 16."""
    from transformers import CLIPConfig

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu")
    return CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
                      vision_config=dict(tower, image_size=224, patch_size=32), projection_dim=16)


def tiny_random(seed, official_init=False):
    """A tiny SPM with random weights; unless `official_init`, the adaLN and
    timestep weights are random too (non-zero, gates near 1), so that the
    timestep path is exercised."""
    torch.manual_seed(seed)
    model = StepAwarePreferenceModel(tiny_config())
    if not official_init:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.model.named_parameters():
                if "adaLN_modulation" in name or "t_embedder" in name:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def export(model, out, tokenizer_dir, info, opset=DEFAULT_OPSET, link=False):
    """Writes the contract folder: model.onnx (+ model.onnx_data above ~2 GB),
    tokenizer/ and preference.json. Traced at batch 2 so that no size-1 batch
    gets specialised."""
    os.makedirs(out, exist_ok=True)
    b = 2
    args = (torch.zeros(b, 3, preference.SIZE, preference.SIZE), torch.tensor([0, 999]),
            torch.full((b, preference.MAX_LEN), 49407, dtype=torch.int64))
    names = ["image", "timestep", "input_ids"]
    axes = {n: {0: "batch"} for n in names + ["score"]}
    import onnx

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        # transformers' shape checks (image size, 77 positions) are constants at these fixed sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        p = os.path.join(tmp, "model.onnx")
        _export(model.eval(), args, p, names, ["score"], axes, opset, dynamo=False)
        save_onnx(onnx.load(p), os.path.join(out, "model.onnx"))
    preference.copy_tokenizer(tokenizer_dir, out, link)
    with open(os.path.join(out, "preference.json"), "w") as f:
        json.dump({"format": 1, "kind": "spm", "doc": __doc__.split("The SPM is ")[1].split("\n\nModule names")[0],
                   **info}, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="the SPM state dict (.bin / .pt, or .safetensors); needs --clip-config")
    src.add_argument("--tiny-random", action="store_true", help="a tiny random SPM (tests)")
    ap.add_argument("--clip-config", help="a local CLIP config: folder with config.json, or the JSON file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", required=True, help="CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    a = ap.parse_args(argv)
    if a.tiny_random:
        model, info = tiny_random(a.seed), {"source": "tiny-random", "seed": a.seed}
    else:
        if not a.clip_config:
            ap.error("--checkpoint needs --clip-config")
        if a.checkpoint.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(a.checkpoint)
        else:
            sd = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
        model = StepAwarePreferenceModel(load_config(a.clip_config)).load_checkpoint(sd)
        info = {"source": os.path.basename(a.checkpoint)}
    export(model.float(), a.out, a.tokenizer, info, a.opset)


if __name__ == "__main__":
    sys.exit(main())
