"""Exports diffusers SDXL / SD 1.5 pipelines to the diffusers/optimum ONNX
folder layout that spo-runtime loads, and builds LoRA training graphs.

    PYTHONPATH=onnx python -m spo_onnx.export --pipeline DIR_OR_SAFETENSORS --out OUT \
        [--fp16] [--vae-fp16] [--opset N] [--static-shape HxW --batch N] \
        [--lora-slots RANK] [--lora FILE[:W]]... [--dynamo] [--config DIR]
    PYTHONPATH=onnx python -m spo_onnx.export.train --unet MODEL/unet --out TRAIN_DIR ...

Modules: `pipeline` (loading, LoRA baking, the folder layout, the CLI), `unet`
(lean attention graph, `lora_targets.json`), `slots` (hot-swap LoRA inputs),
`text`, `vae`, `common` (torch.onnx plumbing, external data, fp16, shapes) and
`train` (LoRA training graphs). The I/O contract is in onnx/DESIGN.md. The
TorchScript exporter is the default (LoRA-ready: no fusions, no packed QKV).
"""

from .common import (DEFAULT_OPSET, DYNAMO_MIN_OPSET, _dynamic_shapes, annotate_symbolic_shapes,
                     keep_name_scopes_only, save_onnx)
from .pipeline import export_pipeline, is_sdxl, load_pipeline, main
from .slots import SLOT_PROJECTIONS, is_slot_input, slot_input_names, unet_slot_modules
from .text import export_text_encoder
from .unet import export_unet, lora_targets
from .vae import export_vae

__all__ = [
    "DEFAULT_OPSET", "DYNAMO_MIN_OPSET", "SLOT_PROJECTIONS", "annotate_symbolic_shapes", "export_pipeline",
    "export_text_encoder", "export_unet", "export_vae", "is_sdxl", "is_slot_input", "keep_name_scopes_only",
    "load_pipeline", "lora_targets", "main", "save_onnx", "slot_input_names", "unet_slot_modules",
    "_dynamic_shapes",
]
