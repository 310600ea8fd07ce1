"""Exports a diffusers SDXL / SD 1.5 pipeline to the diffusers/optimum ONNX
folder layout that spo-runtime loads.

    PYTHONPATH=onnx python -m spo_onnx.export --pipeline DIR_OR_SAFETENSORS --out OUT \
        [--fp16] [--vae-fp16] [--opset N] [--static-shape HxW --batch N] \
        [--lora-slots RANK] [--lora FILE[:W]]... [--dynamo] [--config DIR]

The I/O contract is in onnx/DESIGN.md. The TorchScript exporter is the default
(LoRA-ready: no fusions, no packed QKV); `unet/lora_targets.json` maps every
UNet Linear/Conv2d module to the ONNX initializer holding its weight.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_OPSET = 17
# The dynamo exporter implements opset 18 and up. Asked for less, torch runs
# onnx's C version converter afterwards, which drops every node's
# metadata_props, and with them the `pkg.torch.onnx.name_scopes` that name the
# module of an anonymous (constant-folded) weight; so dynamo exports use >= 18.
DYNAMO_MIN_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1024
TWO_GB = 2**31 - 2**26  # stay well below the protobuf limit

SLOT_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


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


# --------------------------------------------------------------------------- ONNX helpers


def _export(module, args, path, input_names, output_names, dynamic_axes, opset, dynamo):
    """Runs torch.onnx.export into `path` (a file in a scratch folder)."""
    kwargs = dict(
        input_names=input_names,
        output_names=output_names,
        opset_version=opset,
        do_constant_folding=True,
    )
    if dynamo:
        kwargs["opset_version"] = max(opset, DYNAMO_MIN_OPSET)
        kwargs.pop("do_constant_folding")  # TorchScript-only; dynamo runs its own optimizer
        shapes = _dynamic_shapes(module, input_names, dynamic_axes)
        torch.onnx.export(module, args, path, dynamo=True, dynamic_shapes=shapes, external_data=True, **kwargs)
        _trim_dynamo_metadata(path)
    else:
        torch.onnx.export(module, args, path, dynamo=False, dynamic_axes=dynamic_axes, **kwargs)


def _trim_dynamo_metadata(path):
    """Keeps only `pkg.torch.onnx.name_scopes` of the dynamo exporter's node
    metadata (what LoRA resolution reads). The rest (stack traces, FX node
    reprs, class hierarchies) is about three times the size of the graph and
    holds this machine's source paths, which would make exports differ between
    machines. The weights stay in the external data file beside `path`."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    keep_name_scopes_only(m)
    onnx.save_model(m, path)


def keep_name_scopes_only(model):
    """In place: drops every node's doc string and metadata except
    `pkg.torch.onnx.name_scopes`."""
    for node in model.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        del node.metadata_props[:]
        for k, v in keep:
            node.metadata_props.add(key=k, value=v)
        node.doc_string = ""


def _dynamic_shapes(module, input_names, dynamic_axes):
    """dynamic_axes -> torch.export dynamic_shapes. torch's own conversion
    cannot map names onto a `forward(self, *a)` (the patched UNet forward), so
    the specs are built here: one per positional input, in order, wrapped in one
    more tuple when forward takes varargs. Dim.DYNAMIC lets torch.export derive
    the relations itself (equal batch sizes, latent sizes that are multiples of
    the upsampling factor) and fails if an input axis gets specialised; an
    intermediate size of 1 is still specialised silently (see export_unet)."""
    import inspect

    if not dynamic_axes:
        return None
    specs = []
    for name in input_names:
        axes = dynamic_axes.get(name) or {}
        if not isinstance(axes, dict):
            axes = {a: None for a in axes}
        specs.append({int(a): torch.export.Dim.DYNAMIC for a in axes} or None)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return (tuple(specs),)
    return tuple(specs)


def _model_bytes(model):
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_onnx(model, path, external=None):
    """Saves `model`; external data goes to `<path>_data` (model.onnx_data)
    when `external` is True, or when None and the weights are above ~2 GB."""
    import onnx

    os.makedirs(os.path.dirname(path), exist_ok=True)
    data_name = os.path.basename(path) + "_data"
    data_path = os.path.join(os.path.dirname(path), data_name)
    if os.path.exists(data_path):
        os.remove(data_path)
    if external is None:
        external = _model_bytes(model) > TWO_GB
    if external:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=EXTERNAL_DATA_THRESHOLD,
        )
    else:
        onnx.save_model(model, path)


def _tensor_bytes(t, base_dir):
    """Raw little-endian bytes of an initializer, from the proto or from its
    external file (onnx.load(..., load_external_data=False))."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if not uses_external_data(t):
        return t.raw_data if t.HasField("raw_data") else _numpy_bytes(t)
    info = ExternalDataInfo(t)
    with open(os.path.join(base_dir, info.location), "rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length) if info.length else f.read()


def _numpy_bytes(t):
    from onnx import numpy_helper

    return np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()


def _tensor_array(t, base_dir):
    from onnx import helper

    dt = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(_tensor_bytes(t, base_dir), dtype=dt).reshape(tuple(t.dims))


def save_streaming(model, path, base_dir, align=4096):
    """Saves `model` (loaded with load_external_data=False; external tensors
    are read relative to `base_dir`) as `path` + `<path>_data`, copying one
    tensor at a time, so that a model larger than memory can be re-packed.
    Offsets are page-aligned (what ORT needs to memory-map external data)."""
    import onnx

    os.makedirs(os.path.dirname(path), exist_ok=True)
    data_name = os.path.basename(path) + "_data"
    with open(os.path.join(os.path.dirname(path), data_name), "wb") as f:
        for t in model.graph.initializer:
            raw = _tensor_bytes(t, base_dir)
            if len(raw) < EXTERNAL_DATA_THRESHOLD:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
                    t.raw_data = raw
                continue  # small tensors live in the proto
            off = f.tell()
            if off % align:
                off += align - off % align
                f.seek(off)
            f.write(raw)
            del t.external_data[:]
            t.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            for k, v in (("location", data_name), ("offset", str(off)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, path)


def to_fp16(model, keep_io=(), block_prefixes=()):
    """fp32 graph -> fp16 (onnxruntime.transformers.float16: initializers keep
    their names). Inputs/outputs in `keep_io` stay fp32, and nodes whose name
    starts with one of `block_prefixes` keep computing in fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked = [n.name for n in model.graph.node if any(n.name.startswith(p) for p in block_prefixes)]
    # Resize's roi/scales must stay float32: keep the nodes producing them
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Resize":
            for i in n.input[1:]:
                if i in producers:
                    blocked.append(producers[i].name)
    return convert_float_to_float16(
        model,
        keep_io_types=list(keep_io) if keep_io else False,
        disable_shape_infer=True,
        node_block_list=blocked or None,
    )


def annotate_symbolic_shapes(model):
    """Adds `value_info` with symbolic dims for the intermediate values (ONNX
    Runtime's symbolic shape inference); nodes and initializers are untouched.

    ONNX's own shape inference cannot express sizes such as height*width (the
    attention sequence), so with dynamic axes most activations reach ONNX
    Runtime with unknown dims. Its allocation planner only reuses a buffer for
    a value of provably the same shape, and with unknown dims planning time
    grows superlinearly with the graph: for the tiny SDXL UNet (lean graph)
    session creation takes ~20 s without these dims and ~3 s with them (the
    same graph with fixed input sizes: ~2 s).

    The only merges the inference makes are the equalities the graph needs
    anyway (the skip-connection Concats: upsampled size == skip size, i.e. the
    latent size is a multiple of 2**num_upsamplers). Inference runs on a copy
    without the weights (large initializers become shaped inputs)."""
    import onnx
    from onnx import helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    g = model.graph
    light = helper.make_graph(list(g.node), g.name, list(g.input), list(g.output))
    known = {i.name for i in g.input}
    for t in g.initializer:
        numel = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or numel <= 16:
            light.initializer.append(t)
        elif t.name not in known:
            light.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    lm = helper.make_model(light, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    inferred = SymbolicShapeInference.infer_shapes(lm, auto_merge=True)
    skip = {i.name for i in g.input} | {o.name for o in g.output} | {t.name for t in g.initializer}
    # derived sizes are sympy expressions ('(floor(height/2 - 1/2) + 1)*(...)'):
    # short names keep the file small; equal expressions keep equal names
    io_dims = {d.dim_param for v in list(g.input) + list(g.output) for d in v.type.tensor_type.shape.dim if d.dim_param}
    names = {}
    del g.value_info[:]
    for v in inferred.graph.value_info:
        if v.name in skip:
            continue
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param and d.dim_param not in io_dims:
                d.dim_param = names.setdefault(d.dim_param, f"sym_{len(names)}")
        g.value_info.append(v)
    return model


def _patch_forward(module, fn):
    """Replaces module.forward on the instance: the module stays the traced root,
    so node scopes and initializer names keep their diffusers paths (no wrapper
    prefix)."""
    module.forward = types.MethodType(fn, module)


# --------------------------------------------------------------------------- text encoders


def export_text_encoder(te, out_dir, with_projection, opset, dynamo, batch, static, fp16=False):
    te = te.eval().to(torch.float32)
    n_layers = te.config.num_hidden_layers
    orig_forward = te.forward

    def forward(self, input_ids):
        out = orig_forward(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        hs = tuple(out.hidden_states)
        if with_projection:
            return (out.text_embeds, out.last_hidden_state) + hs
        return (out.last_hidden_state, out.pooler_output) + hs

    _patch_forward(te, forward)
    hs_names = [f"hidden_states.{i}" for i in range(n_layers + 1)]
    outputs = (["text_embeds", "last_hidden_state"] if with_projection else ["last_hidden_state", "pooler_output"]) + hs_names
    ids = torch.full((batch, 77), 49407, dtype=torch.int64)
    ids[:, 0] = 49406
    ids[:, 1:4] = torch.tensor([320, 1929, 539])
    axes = None
    if not static:
        axes = {"input_ids": {0: "batch_size"}}
        for n in outputs:
            axes[n] = {0: "batch_size"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "model.onnx")
            with torch.no_grad():
                _export(te, (ids,), p, ["input_ids"], outputs, axes, opset, dynamo)
            import onnx

            m = onnx.load(p)
        if fp16:
            m = to_fp16(m)
        save_onnx(m, os.path.join(out_dir, "model.onnx"))
    finally:
        del te.forward
    te.config.to_json_file(os.path.join(out_dir, "config.json"))


# --------------------------------------------------------------------------- lean UNet graph
#
# diffusers' AttnProcessor reads every size it reshapes with from the tensor
# (`x.shape` -> Shape/Gather/Unsqueeze/Concat chains in the TorchScript export)
# and builds baddbmm's zero input from them (ConstantOfShape, Mul, Add): ~134
# nodes per attention, two thirds of the tiny SDXL UNet graph (27k nodes). The
# ops below emit Reshape with a constant shape (0 = copy that dim, -1 = infer)
# and Split with constant sizes: the same arithmetic on the same values (ORT
# without graph optimizations gives bitwise-equal outputs), ~13 nodes per
# attention, every axis still dynamic and every node still in its diffusers
# module scope. See also annotate_symbolic_shapes.


class _ConstReshape(torch.autograd.Function):
    """Reshape to `shape`: 0 copies the input dim, -1 is inferred (ONNX Reshape
    semantics; torch's exporter wants a -1 whenever there is a 0)."""

    @staticmethod
    def forward(ctx, x, shape):
        return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(list(shape), dtype=torch.int64)))


class _SplitHalves(torch.autograd.Function):
    """x.chunk(2, dim=-1) for a last dim of the known size 2 * `half`."""

    @staticmethod
    def forward(ctx, x, half):
        a, b = x.split(half, dim=-1)
        return a.clone(), b.clone()

    @staticmethod
    def symbolic(g, x, half):
        sizes = g.op("Constant", value_t=torch.tensor([half, half], dtype=torch.int64))
        return g.op("Split", x, sizes, axis_i=-1, outputs=2)


class LeanAttnProcessor:
    """diffusers AttnProcessor's arithmetic (q k^T * scale, softmax, @ v) on
    (batch, heads, seq, head_dim) tensors with constant-shape reshapes. Cases
    it does not cover (masks, 4-D input, spatial/group norm, norm_cross,
    residual, upcasting, rescaling) go to AttnProcessor unchanged."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor

        self.fallback = AttnProcessor()

    @staticmethod
    def covers(attn, hidden_states, attention_mask):
        return (
            attention_mask is None
            and hidden_states.ndim == 3
            and attn.spatial_norm is None
            and attn.group_norm is None
            and not attn.norm_cross
            and not attn.residual_connection
            and attn.rescale_output_factor == 1.0
            and not attn.upcast_attention
            and not attn.upcast_softmax
            and attn.to_q.out_features == attn.to_k.out_features == attn.to_v.out_features
            and attn.to_q.out_features % attn.heads == 0
        )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if not self.covers(attn, hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        heads = attn.heads
        inner = attn.to_q.out_features
        split = (0, -1, heads, inner // heads)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = attn.to_k(context)
        value = attn.to_v(context)
        query = _ConstReshape.apply(query, split).permute(0, 2, 1, 3)
        key_t = _ConstReshape.apply(key, split).permute(0, 2, 3, 1)
        value = _ConstReshape.apply(value, split).permute(0, 2, 1, 3)
        scores = torch.matmul(query, key_t) * attn.scale
        probs = scores.softmax(dim=-1)
        out = torch.matmul(probs, value).permute(0, 2, 1, 3)
        out = _ConstReshape.apply(out, (0, -1, inner))
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _lean_geglu_forward(self, hidden_states, *args, **kwargs):
    """GEGLU.forward with a constant-size Split instead of chunk's shape arithmetic."""
    hidden_states = self.proj(hidden_states)
    hidden_states, gate = _SplitHalves.apply(hidden_states, self.proj.out_features // 2)
    return hidden_states * self.gelu(gate)


def _install_lean_ops(unet):
    """Lean attention processors and GEGLU forwards; returns the patched GEGLUs."""
    from diffusers.models.activations import GEGLU

    unet.set_attn_processor(LeanAttnProcessor())
    geglus = [m for m in unet.modules() if type(m) is GEGLU and m.proj.out_features % 2 == 0]
    for m in geglus:
        _patch_forward(m, _lean_geglu_forward)
    return geglus


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


def export_unet(unet, out_dir, sdxl, dtype, opset, dynamo, batch, static_hw, lora_slots, text_embeds_dim=None, trace_hw=None):
    # fp16 is traced from the fp16 module itself: converting an fp32 graph
    # needs the fp32 weights plus the exported fp32 copy plus the converted
    # copy in memory (the full-size SDXL UNet was OOM-killed at 23.6 GB), and
    # tracing fp16 keeps diffusers' own fp16 semantics (the timestep
    # projection runs in fp32 and diffusers casts t_emb to the sample dtype).
    # CPU fp16 kernels are slow, hence the small default trace size (the axes
    # are dynamic anyway).
    unet = unet.eval().to(dtype)
    cfg = unet.config
    cross = cfg.cross_attention_dim
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    default_hw = cfg.sample_size * 8
    if dtype == torch.float16:
        default_hw = min(default_hw, 256)
    h, w = static_hw or trace_hw or (default_hw, default_hw)
    # the latent size to trace with: a multiple of 2**num_upsamplers, so that
    # the traced graph uses plain scale-2 upsampling (see DESIGN.md)
    lh, lw = h // 8, w // 8
    if not static_hw:
        up = 2 ** (len(cfg.block_out_channels) - 1)
        lh = max(up, (lh // up) * up)
        lw = max(up, (lw // up) * up)
        if dynamo:
            # torch.export specialises any size that is 0 or 1 while tracing to
            # that constant: a latent of `up` gives a 1x1 mid block, and the graph
            # then only runs at the trace size. Trace with every level at least
            # 2x2, and non-square so that no height/width equality is assumed.
            lh, lw = max(lh, 2 * up), max(lw, 2 * up)
            if lh == lw:
                lw += up
        if dynamo and batch < 2:
            raise ValueError("dynamo export with dynamic shapes needs a trace batch >= 2 (a batch of 1 is specialised)")
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, cfg.in_channels, lh, lw, generator=g).to(dtype)
    timestep = torch.full((batch,), 999.0, dtype=torch.float32)
    ehs = torch.randn(batch, 77, cross, generator=g).to(dtype)
    args = [sample, timestep, ehs]
    inputs = ["sample", "timestep", "encoder_hidden_states"]
    axes = {
        "sample": {0: "batch_size", 2: "height", 3: "width"},
        "timestep": {0: "batch_size"},
        "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
        "out_sample": {0: "batch_size", 2: "height", 3: "width"},
    }
    if sdxl:
        te_dim = text_embeds_dim or (cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
        args += [torch.randn(batch, te_dim, generator=g).to(dtype), torch.tensor([[h, w, 0, 0, h, w]] * batch, dtype=dtype)]
        inputs += ["text_embeds", "time_ids"]
        axes["text_embeds"] = {0: "batch_size"}
        axes["time_ids"] = {0: "batch_size"}

    slot_mods = unet_slot_modules(unet) if lora_slots else []
    ctx = {}
    slots = []
    for name, mod in slot_mods:
        dn, upn = slot_input_names(name)
        args += [torch.zeros(lora_slots, mod.in_features, dtype=dtype), torch.zeros(mod.out_features, lora_slots, dtype=dtype)]
        inputs += [dn, upn]
        axes[dn] = {0: "lora_rank"}
        axes[upn] = {1: "lora_rank"}
        slots.append({"module": name, "down": dn, "up": upn, "rank": lora_slots, "in_features": mod.in_features, "out_features": mod.out_features})
    n_fixed = len(inputs) - 2 * len(slot_mods)
    if static_hw:
        axes = None

    orig_forward = unet.forward

    def forward(self, *a):
        for i, (name, _) in enumerate(slot_mods):
            dn, upn = slot_input_names(name)
            ctx[dn] = a[n_fixed + 2 * i]
            ctx[upn] = a[n_fixed + 2 * i + 1]
        kw = {}
        if sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": a[3], "time_ids": a[4]}
        return orig_forward(a[0], a[1], encoder_hidden_states=a[2], return_dict=False, **kw)[0]

    _patch_forward(unet, forward)
    _install_slots(slot_mods, ctx)
    geglus = _install_lean_ops(unet)
    import onnx

    # the weights never enter the Python process again: above 2 GB the exporter
    # writes them as external files, which lora_targets reads one at a time and
    # save_streaming copies one at a time into model.onnx_data (the scratch
    # folder is inside out_dir: same disk, and /tmp may be small)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        p = os.path.join(tmp, "model.onnx")
        try:
            with torch.no_grad():
                _export(unet, tuple(args), p, inputs, ["out_sample"], axes, opset, dynamo)
        finally:
            del unet.forward
            _uninstall_slots(slot_mods)
            _uninstall_slots([(None, m) for m in geglus])
            # the UNet is left with diffusers' eager processor, as before lean export
            from diffusers.models.attention_processor import AttnProcessor

            unet.set_attn_processor(AttnProcessor())
        m = onnx.load(p, load_external_data=False)
        # before the slots' default initializers: their rank axis stays symbolic
        annotate_symbolic_shapes(m)
        targets = lora_targets(unet, m, dtype, tmp)
        if slots:
            # zero defaults: an initializer with the same name as a graph input is
            # the input's default value (IR >= 4), so the graph runs as the base model
            np_dtype = np.float16 if dtype == torch.float16 else np.float32
            for s in slots:
                m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((s["rank"], s["in_features"]), np_dtype), s["down"]))
                m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((s["out_features"], s["rank"]), np_dtype), s["up"]))
        save_streaming(m, os.path.join(out_dir, "model.onnx"), tmp)
    targets["slots"] = slots
    targets["slot_formula"] = "y = x W^T + b + (x down^T) up^T; scale (multiplier*alpha/rank) is folded into up by the caller; rank axis is dynamic"
    with open(os.path.join(out_dir, "lora_targets.json"), "w") as f:
        json.dump(targets, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(_config_json(unet.config))


# --------------------------------------------------------------------------- lora_targets.json


def _scope_path(node_name):
    """'/down_blocks.1/attentions.0/transformer_blocks.0/attn1/to_q/MatMul' ->
    'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' (drops the op,
    collapses duplicated Sequential scopes such as '/layer1/layer1.0')."""
    parts = [p for p in node_name.strip("/").split("/")][:-1]
    out = []
    for p in parts:
        if out and p.startswith(out[-1] + "."):
            out[-1] = p
        else:
            out.append(p)
    return ".".join(out)


def _node_scope(node):
    """The module path of a node: from the dynamo exporter's
    `pkg.torch.onnx.name_scopes` metadata ("['', 'down_blocks.0', ...,
    'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q', 'linear']": the
    last entry is the op, the one before it the module), else from the
    TorchScript node name."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                import ast

                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                return scopes[-2]
            break
    return _scope_path(node.name)


def _digest(arr):
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


def lora_targets(unet, model, dtype, base_dir):
    """For every nn.Linear / nn.Conv2d of the UNet: the initializer holding its
    weight and the layout. Candidates come from the consuming node's scope; each
    is confirmed by comparing values with the torch parameter; if that fails,
    the initializer is found by value (hash of the bytes). `model` is loaded
    without external data: values are read one tensor at a time (relative to
    `base_dir`) and not kept, so a full-size UNet is never in memory twice."""
    inits = {t.name: t for t in model.graph.initializer}

    def arr(name):
        return _tensor_array(inits[name], base_dir)

    producers = {o: n for n in model.graph.node for o in n.output}
    by_scope = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv") or len(n.input) < 2:
            continue
        w = n.input[1]
        via = None
        if w not in inits and w in producers and producers[w].op_type in ("Transpose", "Cast") and producers[w].input[0] in inits:
            via = producers[w].op_type
            w = producers[w].input[0]
        if w in inits:
            by_scope.setdefault(_node_scope(n), []).append((w, n.op_type, n.name, via))

    by_hash = None
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    modules = []
    missing = []
    for path, mod in unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        wt = mod.weight.detach().to(torch.float32).numpy().astype(np_dtype)
        kind = "conv" if isinstance(mod, torch.nn.Conv2d) else "linear"
        found = None
        for init, op, node, via in by_scope.get(path, []):
            a = arr(init)
            if a.shape == wt.shape and np.array_equal(a, wt):
                found = (init, "conv_oihw" if kind == "conv" else "linear_out_in", op, node)
            elif kind == "linear" and a.shape == wt.T.shape and np.array_equal(a, wt.T):
                found = (init, "linear_in_out", op, node)
            if found:
                break
        if not found:
            if by_hash is None:
                by_hash = {}
                for name, t in inits.items():
                    if len(t.dims) >= 2:
                        by_hash.setdefault((tuple(t.dims), _digest(arr(name))), name)
            h1 = by_hash.get((wt.shape, _digest(wt)))
            if h1:
                found = (h1, "conv_oihw" if kind == "conv" else "linear_out_in", None, None)
            elif kind == "linear":
                h2 = by_hash.get((wt.T.shape, _digest(wt.T)))
                if h2:
                    found = (h2, "linear_in_out", None, None)
        entry = {"module": path, "kind": kind, "weight_shape": list(wt.shape)}
        if found:
            entry.update(initializer=found[0], layout=found[1], initializer_shape=list(inits[found[0]].dims), op=found[2], node=found[3])
            b = path + ".bias"
            entry["bias_initializer"] = b if b in inits else None
        else:
            entry.update(initializer=None, layout=None)
            missing.append(path)
        modules.append(entry)
    if missing:
        print(f"warning: {len(missing)} UNet modules without an initializer: {missing[:5]}...", file=sys.stderr)
    return {"format": 1, "dtype": "float16" if dtype == torch.float16 else "float32", "modules": modules, "missing": missing}


# --------------------------------------------------------------------------- VAE


def export_vae(vae, out_root, dtype, opset, dynamo, batch, static_hw):
    import onnx

    out_dtype = dtype
    dtype = torch.float32
    vae = vae.eval().to(torch.float32)
    cfg = vae.config
    h, w = static_hw or (64, 64)
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, cfg.latent_channels, h // factor, w // factor, generator=g).to(dtype)
    img = (torch.rand(batch, cfg.in_channels, h, w, generator=g) * 2 - 1).to(dtype)
    orig_forward = vae.forward

    def dec(self, latent_sample):
        return self.decode(latent_sample, return_dict=False)[0]

    def enc(self, sample):
        hcur = self.encoder(sample)
        if self.quant_conv is not None:
            hcur = self.quant_conv(hcur)
        return hcur

    for name, fn, x, iname, oname in (
        ("vae_decoder", dec, lat, "latent_sample", "sample"),
        ("vae_encoder", enc, img, "sample", "latent_parameters"),
    ):
        _patch_forward(vae, fn)
        axes = None if static_hw else {iname: {0: "batch_size", 2: "height", 3: "width"}, oname: {0: "batch_size", 2: "height", 3: "width"}}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                p = os.path.join(tmp, "model.onnx")
                with torch.no_grad():
                    _export(vae, (x,), p, [iname], [oname], axes, opset, dynamo)
                m = onnx.load(p)
            if out_dtype == torch.float16:
                m = to_fp16(m)
        finally:
            del vae.forward
        out_dir = os.path.join(out_root, name)
        save_onnx(m, os.path.join(out_dir, "model.onnx"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write(_config_json(cfg))
    assert vae.forward == orig_forward


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


def _config_json(cfg):
    return json.dumps({k: v for k, v in dict(cfg).items()}, indent=2, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o))


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


if __name__ == "__main__":
    main()
