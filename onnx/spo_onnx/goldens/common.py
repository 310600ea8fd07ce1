"""What every golden writer shares: loading a tiny diffusers fixture, the
scheduler table and builder, recording diffusers' noise draws, and writing
.npy / .png / JSON files."""

import contextlib
import os
import sys

import numpy as np
import torch

SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "ddpm": ("DDPMScheduler", {}),
}
def _np(x):
    return np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())


class Writer:
    def __init__(self, out_dir):
        self.dir = out_dir
        os.makedirs(out_dir, exist_ok=True)

    def npy(self, name, x):
        arr = _np(x) if isinstance(x, torch.Tensor) else np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        np.save(os.path.join(self.dir, name), arr)
        return name

    def png(self, name, img):
        img.save(os.path.join(self.dir, name))
        return name


def jsonable(cfg):
    out = {}
    for k, v in dict(cfg).items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


@contextlib.contextmanager
def record_randn(log):
    """Wraps diffusers' randn_tensor in every loaded diffusers module; appends
    (module, tensor) for each draw."""
    import diffusers.utils.torch_utils as tu

    orig = tu.randn_tensor

    def spy(*a, **k):
        x = orig(*a, **k)
        log.append((sys._getframe(1).f_globals.get("__name__", "?"), x.detach().clone()))
        return x

    patched = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("diffusers") and getattr(mod, "randn_tensor", None) is orig:
            mod.randn_tensor = spy
            patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            mod.randn_tensor = orig


def load(model, root):
    import diffusers

    d = os.path.join(root, "diffusers", model)
    kw = {"add_watermarker": False} if model.endswith("sdxl") else {"safety_checker": None, "requires_safety_checker": False}
    pipe = diffusers.DiffusionPipeline.from_pretrained(d, torch_dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    # the checkpoint's own scheduler config: every case derives its scheduler
    # from this (cases replace pipe.scheduler, so never read it back from there)
    pipe._spo_base_scheduler_config = pipe.scheduler.config
    # diffusers 0.42.1's SD 1.5 clip_skip path calls
    # text_encoder.text_model.final_layer_norm, but transformers 5 flattened
    # CLIPTextModel (final_layer_norm sits on the model itself). An alias,
    # outside the module registry, lets diffusers' own code run unchanged.
    if not hasattr(pipe.text_encoder, "text_model"):
        object.__setattr__(pipe.text_encoder, "text_model", pipe.text_encoder)
    return pipe


def make_scheduler(pipe, name, base_config=None):
    import diffusers

    cls_name, kw = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    return cls.from_config(base_config or pipe._spo_base_scheduler_config, **kw)
