"""Export plumbing shared by every component: torch.onnx calls (TorchScript and
dynamo), saving with external data (streamed for large fp16 weights), fp16
conversion and symbolic shape annotation.
"""

import json
import os
import types

import numpy as np
import torch


DEFAULT_OPSET = 17
# The dynamo exporter implements opset 18 and up. Asked for less, torch runs
# onnx's C version converter afterwards, which drops every node's
# metadata_props, and with them the `pkg.torch.onnx.name_scopes` that name the
# module of an anonymous (constant-folded) weight; so dynamo exports use >= 18.
DYNAMO_MIN_OPSET = 18
EXTERNAL_DATA_THRESHOLD = 1024
TWO_GB = 2**31 - 2**26  # stay well below the protobuf limit


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

# Config keys left out of exported configs: diffusers records where the model
# was loaded from, a local path that means nothing beside the graph.
LOCAL_CONFIG_KEYS = ("_name_or_path",)

def _config_json(cfg):
    return json.dumps({k: v for k, v in dict(cfg).items() if k not in LOCAL_CONFIG_KEYS}, indent=2, sort_keys=True, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
