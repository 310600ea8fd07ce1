"""LoRA slots (`--lora-slots R`): low-rank branches on the attention
projections whose factors are graph inputs, for hot-swapping. The input names
are the contract with src/lora/slots.rs.
"""

import torch
import torch.nn.functional as F

from .common import _patch_forward


SLOT_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# --------------------------------------------------------------------------- UNet


def unet_slot_modules(unet):
    """Attention projections that get LoRA slots: to_q/to_k/to_v/to_out.0 of
    every attn1/attn2 (diffusers Attention modules inside transformer blocks)."""
    out = []
    for name, mod in unet.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        parts = name.split(".")
        tail = ".".join(parts[-2:]) if parts[-1] == "0" else parts[-1]
        if tail in SLOT_PROJECTIONS and len(parts) >= 2 and parts[-2 if parts[-1] != "0" else -3] in ("attn1", "attn2"):
            out.append((name, mod))
    return out


def _install_slots(modules, ctx):
    """Linear forward becomes y = xW^T + b + (x A^T) B^T with A/B read from ctx."""
    for name, mod in modules:

        def fwd(self, x, _name=name):
            y = F.linear(x, self.weight, self.bias)
            dn, upn = slot_input_names(_name)
            a = ctx[dn]
            b = ctx[upn]
            return y + torch.matmul(torch.matmul(x, a.transpose(0, 1)), b.transpose(0, 1))

        _patch_forward(mod, fwd)


def _uninstall_slots(modules):
    for _, mod in modules:
        if "forward" in mod.__dict__:
            del mod.forward


def slot_input_names(path):
    """The slot inputs of a module (src/lora/slots.rs reads the same names)."""
    return f"lora.{path}.down", f"lora.{path}.up"


def is_slot_input(name):
    return name.startswith("lora.") and name.endswith((".down", ".up"))
