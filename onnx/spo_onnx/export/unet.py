"""The UNet: the lean attention graph, the export itself and `lora_targets.json`
(which initializer holds which module's weight).
"""

import hashlib
import json
import os
import sys
import tempfile

import numpy as np
import torch

from .common import _config_json, _export, _patch_forward, _tensor_array, annotate_symbolic_shapes, save_streaming
from .slots import _install_slots, _uninstall_slots, slot_input_names, unet_slot_modules


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
