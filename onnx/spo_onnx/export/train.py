"""Builds LoRA training graphs (a forward/backward VJP pair) from an exported
UNet folder, in standard ONNX ops only, for spo-runtime's gradient runner.

    PYTHONPATH=onnx python -m spo_onnx.export.train --unet MODEL/unet --out TRAIN_DIR \
        --batch 2 --latent 8x8 --seq 77 --rank 4 [--alpha A] [--targets to_q,to_k,...]

Steps (each a function below):
1. load the UNet graph without its weights and fix every input shape;
2. inject a LoRA branch `y += (x A^T) B^T * alpha/r` on every target module,
   with A [r,in] and B [out,r] as fp32 graph inputs (a Cast pair around the
   branch for fp16 UNets), and fold what the fixed shapes make constant;
3. reverse it with our own rules (vjp.py): only the values that depend on
   the LoRA are differentiated, frozen weights get no gradient, and adjoints
   have the values' own shapes (no seed axis);
4. present a plain `cotangent` input, `grad.<key>` outputs (with the
   accumulator added) and `grad_in.<value>` outputs, and drop dead nodes;
5. split the joint graph: the forward graph computes `out_sample` and returns
   every value the backward reads ("residuals"); the backward graph takes
   those plus the cotangent and returns the gradients (JAX's vjp pattern: the
   forward is never run twice);
6. also write `sample.onnx`, the injected UNet of step 2 on its own: the
   trainer samples through it with its current LoRA as inputs.

All graphs share one external data file (the UNet's weights, copied as they
are). The contract is `train_manifest.json`, described in onnx/DESIGN.md.
"""

import argparse
import ast
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .common import annotate_symbolic_shapes
from .slots import is_slot_input
from .vjp import vjp

MANIFEST = "train_manifest.json"
FORMAT = 1
FORWARD = "forward.onnx"
BACKWARD = "backward.onnx"
# The LoRA-injected UNet before reversal: out_sample only, no residuals. The
# trainer samples through it with its current parameters fed as inputs (and
# with zero parameters it is the frozen reference), so an update costs no
# merge and no session rebuild.
SAMPLE = "sample.onnx"
WEIGHTS = "weights.onnx_data"
COTANGENT = "cotangent"
OUTPUT = "out_sample"
SPO_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_keys(module):
    """PEFT names of a module's LoRA pair (the names `spo grad` reads)."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def grad_name(key):
    return f"grad.{key}"


def accum_name(key):
    return f"accum.{key}"


# --------------------------------------------------------------------------- 1. load


def unet_inputs(model):
    return [i.name for i in model.graph.input if not is_slot_input(i.name)]


def fixed_dims(name, batch, h, w, seq, cross_dim, text_embeds_dim):
    return {
        "sample": [batch, 4, h, w],
        "timestep": [batch],
        "encoder_hidden_states": [batch, seq, cross_dim],
        "text_embeds": [batch, text_embeds_dim],
        "time_ids": [batch, 6],
    }[name]


def load_fixed(unet_dir, batch, h, w, seq):
    """The UNet graph (weights left on disk) with every input shape fixed and
    every intermediate shape inferred from them."""
    model = onnx.load(os.path.join(unet_dir, "model.onnx"), load_external_data=False)
    del model.graph.value_info[:]
    for vi in model.graph.input:
        if is_slot_input(vi.name):
            continue  # slot inputs stay zero initializers
        dims = vi.type.tensor_type.shape.dim
        known = [d.dim_value for d in dims]
        shape = fixed_dims(vi.name, batch, h, w, seq, known[-1] if vi.name == "encoder_hidden_states" else 0,
                           known[-1] if vi.name == "text_embeds" else 0)
        for d, v in zip(dims, shape):
            d.Clear()
            d.dim_value = v
    for vi in model.graph.output:
        for d, v in zip(vi.type.tensor_type.shape.dim, [batch, 4, h, w]):
            d.Clear()
            d.dim_value = v
    # Slot inputs of a slots UNet become plain constants (their zero defaults).
    slot_inputs = {i.name for i in model.graph.input if is_slot_input(i.name)}
    keep = [i for i in model.graph.input if i.name not in slot_inputs]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return infer(model)


# --------------------------------------------------------------------------- 2. inject


def select_targets(targets_json, names):
    """The modules of `lora_targets.json` whose path is one of `names` or ends
    with `.<name>`. They must be linear layers on activations (MatMul): a
    selected conv or 2-D Gemm is an error, not silently skipped."""
    with open(targets_json) as f:
        info = json.load(f)
    chosen = [m for m in info["modules"] if any(m["module"] == n or m["module"].endswith("." + n) for n in names)]
    if not chosen:
        raise SystemExit(f"no module of {targets_json} is or ends with one of {list(names)}")
    bad = [m["module"] for m in chosen if m["kind"] != "linear" or m["op"] != "MatMul"]
    if bad:
        raise SystemExit(f"{len(bad)} selected modules are not linear layers on activations (MatMul), "
                         f"e.g. '{bad[0]}'; training graphs put LoRA on those only")
    return info, chosen


def inject_lora(model, targets, rank, alpha, fp16):
    """Adds the LoRA branch after each target MatMul; returns the A/B input names."""
    g = model.graph
    by_name = {n.name: (i, n) for i, n in enumerate(g.node)}
    scale = numpy_helper.from_array(np.array(alpha / rank, np.float32), "lora.scale")
    g.initializer.append(scale)
    params = []
    inserts = []
    for t in targets:
        if t["node"] not in by_name:
            raise SystemExit(f"target {t['module']}: node {t['node']} not in the graph")
        idx, node = by_name[t["node"]]
        if node.input[1] != t["initializer"]:
            raise SystemExit(f"target {t['module']}: {t['node']} does not read {t['initializer']}")
        out_f, in_f = t["weight_shape"]
        a, b = lora_keys(t["module"])
        g.input.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, [rank, in_f]))
        g.input.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, [out_f, rank]))
        params += [a, b]
        p = f"/lora/{t['module']}/"
        y = node.output[0]
        base = p + "base"
        node.output[0] = base
        x = node.input[0]
        nodes = []
        if fp16:
            nodes.append(helper.make_node("Cast", [x], [p + "x32"], to=TensorProto.FLOAT, name=p + "CastIn"))
            x = p + "x32"
        nodes += [
            helper.make_node("Transpose", [a], [p + "At"], perm=[1, 0], name=p + "TA"),
            helper.make_node("Transpose", [b], [p + "Bt"], perm=[1, 0], name=p + "TB"),
            helper.make_node("MatMul", [x, p + "At"], [p + "xa"], name=p + "MatMulA"),
            helper.make_node("MatMul", [p + "xa", p + "Bt"], [p + "xab"], name=p + "MatMulB"),
            helper.make_node("Mul", [p + "xab", "lora.scale"], [p + "delta"], name=p + "Scale"),
        ]
        delta = p + "delta"
        if fp16:
            nodes.append(helper.make_node("Cast", [delta], [p + "delta16"], to=TensorProto.FLOAT16, name=p + "CastOut"))
            delta = p + "delta16"
        nodes.append(helper.make_node("Add", [base, delta], [y], name=p + "Add"))
        inserts.append((idx, nodes))
    for idx, nodes in sorted(inserts, key=lambda x: -x[0]):
        for k, n in enumerate(nodes):
            g.node.insert(idx + 1 + k, n)
    return params


FOLD_MAX = 4096  # elements: larger constants stay nodes (or weights) as they are
UNFOLDABLE = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")


def fold_constants(model):
    """Replaces every node that the fixed shapes make constant by an
    initializer: Constant nodes and TorchScript's shape arithmetic (Shape ->
    Gather -> Unsqueeze -> Concat -> Reshape). ONNX Runtime would fold them at
    every load of every graph, and warn about each intermediate it then
    leaves unused (hundreds of warnings per graph). Returns the count."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(g.input) + list(g.value_info)}
    known = {t.name: numpy_helper.to_array(t) for t in g.initializer
             if t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) <= FOLD_MAX}
    outputs = {o.name for o in g.output}
    keep, folded = [], []
    for n in g.node:
        values = None
        if n.op_type == "Shape" and None not in shapes.get(n.input[0], [None]):
            start, end = (next((a.i for a in n.attribute if a.name == k), None) for k in ("start", "end"))
            values = [np.array(shapes[n.input[0]], np.int64)[start:end]]
        elif n.op_type not in UNFOLDABLE and n.domain in ("", "ai.onnx") and all(i in known for i in n.input if i):
            values = ReferenceEvaluator(n).run(None, {i: known[i] for i in n.input if i})
        if values is None or any(o in outputs for o in n.output) or any(np.asarray(v).size > FOLD_MAX for v in values):
            keep.append(n)
            continue
        for o, v in zip(n.output, values):
            known[o] = np.asarray(v)
            folded.append(numpy_helper.from_array(known[o], o))
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(folded)
    return len(folded)


# --------------------------------------------------------------------------- 3, 4. reverse, interface


def cotangent_name(output):
    """The backward input that takes the cotangent of a forward output."""
    return COTANGENT if output == OUTPUT else f"cotangent.{output}"


def input_grad_name(value):
    """The backward output with the gradient of a segment's activation input."""
    return f"grad_in.{value}"


def _shape(model, name):
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if v.name == name:
            return v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim]
    raise KeyError(name)


def gradient_graph(model, params, seeded, diff_inputs):
    """The joint forward+backward graph (see vjp.py) with the runner's
    interface: float32 `cotangent[.<output>]` inputs, `grad.<key>` outputs and
    float32 `grad_in.<value>` outputs for a segment's activation inputs.
    `grad.<key> = accum.<key> + this call's gradient`: the runner accumulates
    across calls on the device by swapping two buffers, with no extra pass."""
    adjoints = vjp(model, params + diff_inputs, {o: cotangent_name(o) for o in seeded})
    g = model.graph
    for p in params:
        shape = _shape(model, p)[1]
        g.input.append(helper.make_tensor_value_info(accum_name(p), TensorProto.FLOAT, shape))
        g.node.append(helper.make_node("Add", [accum_name(p), adjoints[p]], [grad_name(p)], name=f"/grad/{p}/Add"))
        g.output.append(helper.make_tensor_value_info(grad_name(p), TensorProto.FLOAT, shape))
    for x in diff_inputs:
        out = input_grad_name(x)
        g.node.append(helper.make_node("Cast", [adjoints[x]], [out], to=TensorProto.FLOAT, name=f"/grad_in/{x}/Cast"))
        g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, _shape(model, x)[1]))
    return model


def dce(model):
    """Drops nodes whose outputs no graph output needs, and unused
    initializers."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def compact_names(model):
    """Short names for every intermediate value and no node names: the joint
    graph of the SDXL topology spends most of its bytes spelling module paths
    (the `--keep-names` export keeps them, for profiling)."""
    g = model.graph
    keep = {v.name for v in list(g.input) + list(g.output)} | {t.name for t in g.initializer}
    names = {}
    for n in g.node:
        for i, o in enumerate(n.output):
            if o and o not in keep:
                names.setdefault(o, f"v{len(names)}")
                n.output[i] = names[o]
        for i, v in enumerate(n.input):
            if v in names:
                n.input[i] = names[v]
        n.name = ""
    for v in g.value_info:
        if v.name in names:
            v.name = names[v.name]


def infer(model):
    """Static shapes for every value. ONNX's inference loses the batch size of
    some graphs (a batch of 1 in the full-size SDXL UNet: a shape computed
    through Shape/Gather/Concat); ONNX Runtime's symbolic inference, which
    propagates such data, fills those in."""
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    if any(d.dim_param or not d.HasField("dim_value") for v in model.graph.value_info
           for d in v.type.tensor_type.shape.dim):
        annotate_symbolic_shapes(model)
    return model


# --------------------------------------------------------------------------- 5. split


# The helpers below take a list of the graph's nodes and compare nodes by
# identity: protobuf's wrappers are only stable while a reference is held.


def producers(nodes):
    return {o: n for n in nodes for o in n.output}


def ancestors(nodes, outputs):
    """The nodes needed to compute `outputs`, in graph order."""
    prod = producers(nodes)
    seen, stack = set(), list(outputs)
    while stack:
        v = stack.pop()
        n = prod.get(v)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        stack.extend(i for i in n.input if i)
    return [n for n in nodes if id(n) in seen]


def subgraph(model, nodes, inputs, outputs, name):
    g = model.graph
    vis = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    read = {i for n in nodes for i in n.input if i}
    inits = [t for t in g.initializer if t.name in read or t.name in outputs]
    new = helper.make_graph(
        nodes, name, [vis[i] for i in inputs], [vis[o] for o in outputs], inits,
        value_info=[v for v in g.value_info if v.name in read])
    return helper.make_model(new, opset_imports=model.opset_import, ir_version=model.ir_version)


def dependents(nodes, sources):
    """Every value computed from `sources`, and the ids of the nodes on the way."""
    values, hit = set(sources), set()
    for n in nodes:
        if any(i in values for i in n.input if i):
            values.update(n.output)
            hit.add(id(n))
    return values, hit


def split(joint, grads):
    """(forward, backward, residuals). The forward holds the nodes the primal
    outputs need; the backward everything else the gradients need (constants,
    which read no input, are copied into both). Residuals are the values the
    backward reads that the forward makes."""
    g = joint.graph
    nodes = list(g.node)
    primal = [o.name for o in g.output if o.name not in grads]
    fwd_nodes = ancestors(nodes, primal)
    fwd_ids = {id(n) for n in fwd_nodes}
    inputs = {i.name for i in g.input}
    _, live = dependents(nodes, inputs)
    bwd_nodes = [n for n in ancestors(nodes, grads) if id(n) not in fwd_ids or id(n) not in live]
    # Without the constants that only forward nodes read (dead in the backward).
    bwd_nodes = ancestors(bwd_nodes, grads)
    made_fwd = {o for n in fwd_nodes for o in n.output}
    made_bwd = {o for n in bwd_nodes for o in n.output}
    init_names = {t.name for t in g.initializer}
    residuals, graph_inputs = [], []
    for v in dict.fromkeys(i for n in bwd_nodes for i in n.input if i and i not in made_bwd):
        if v in init_names:
            continue
        if v in made_fwd:
            residuals.append(v)
        elif v in inputs:
            graph_inputs.append(v)
        else:
            raise SystemExit(f"backward reads '{v}', which nothing makes")
    read_fwd = {i for n in fwd_nodes for i in n.input}
    fwd_inputs = [i.name for i in g.input if i.name in read_fwd]
    forward = subgraph(joint, fwd_nodes, fwd_inputs, primal + [r for r in residuals if r not in primal], "unet_lora_forward")
    bwd_inputs = [i.name for i in g.input if i.name in graph_inputs] + residuals
    backward = subgraph(joint, bwd_nodes, bwd_inputs, grads, "unet_lora_backward")
    # A primal output the backward reads is passed as the output it already is.
    return forward, backward, [r for r in residuals if r not in primal]


# --------------------------------------------------------------------------- segments

BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)$")


def node_block(node):
    """The top-level UNet block a node belongs to: from the TorchScript scope
    (`/down_blocks.1/...`) or the dynamo exporter's name-scope metadata."""
    if node.name.startswith("/"):
        return node.name.split("/")[1]
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)
            return scopes[1] if len(scopes) > 2 else None
    return None


def cut_points(model, k):
    """k-1 node indices, each the first node of a UNet block, splitting the
    graph into k parts of about equal node count."""
    starts, seen = [], set()
    for i, n in enumerate(model.graph.node):
        b = node_block(n)
        if b and BLOCK.match(b) and b not in seen:
            seen.add(b)
            starts.append(i)
    starts = starts[1:]
    if k - 1 > len(starts):
        raise SystemExit(f"--segments {k}: the UNet has only {len(starts) + 1} block boundaries to cut at")
    total, cuts = len(model.graph.node), []
    for j in range(1, k):
        free = [c for c in starts if not cuts or c > cuts[-1]]
        free = free[: len(free) - (k - 1 - j)]  # leave room for the cuts still to come
        cuts.append(min(free, key=lambda c: abs(c - total * j / k)))
    return cuts


def segment_models(model, cuts):
    """The UNet cut at `cuts` into sub-models. A segment's inputs are the graph
    inputs it reads and the activations earlier segments make; its outputs are
    what later segments read (and `out_sample`). Constant nodes, which read no
    graph input, are copied into every segment that needs them."""
    g = model.graph
    nodes = list(g.node)
    inputs = [i.name for i in g.input]
    _, live = dependents(nodes, inputs)
    bounds = [0] + list(cuts) + [len(nodes)]
    parts = [[n for n in nodes[bounds[s]:bounds[s + 1]] if id(n) in live] for s in range(len(bounds) - 1)]
    seg_of = {o: s for s, part in enumerate(parts) for n in part for o in n.output}
    reads = [{i for n in part for i in n.input if i} for part in parts]
    out = []
    for s, mine in enumerate(parts):
        seg_inputs = [i for i in inputs if i in reads[s]]
        seg_inputs += sorted(v for v in reads[s] if seg_of.get(v, s) < s)
        later = set().union(*reads[s + 1:]) if s + 1 < len(reads) else set()
        outputs = [v for v in dict.fromkeys(o for n in mine for o in n.output) if v in later or v == OUTPUT]
        needed = {id(n) for n in ancestors_within(nodes, mine, live)}
        seg_nodes = [n for n in nodes if id(n) in needed]
        out.append((subgraph(model, seg_nodes, seg_inputs, outputs, f"unet_segment_{s}"), seg_inputs, outputs))
    return out


def ancestors_within(nodes, mine, live):
    """`mine` plus the constant (not live) nodes that they depend on."""
    prod = producers(nodes)
    seen, stack, result = set(), [i for n in mine for i in n.input if i], list(mine)
    while stack:
        v = stack.pop()
        n = prod.get(v)
        if n is None or id(n) in live or id(n) in seen:
            continue
        seen.add(id(n))
        result.append(n)
        stack.extend(i for i in n.input if i)
    return result


# --------------------------------------------------------------------------- write


def rebase_external(model, location):
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location


def save_graph(model, path):
    """Writes a graph of the folder, its weights in the shared WEIGHTS file."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rebase_external(m, WEIGHTS)
    # Every shape is static, so ONNX Runtime infers them again at load (no
    # slower); the annotations were a third of the bytes.
    del m.graph.value_info[:]
    onnx.save(m, path)


def io_list(vis):
    out = []
    for v in vis:
        tt = v.type.tensor_type
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                    "shape": [d.dim_value for d in tt.shape.dim]})
    return out


def build_segment(seg, seg_inputs, outputs, params, param_dep, keep_names, log):
    """One segment's forward/backward pair and its manifest entry (without
    file names). A segment with no LoRA parameter and no gradient to pass on
    has no backward."""
    seg_params = [p for p in params if p in seg_inputs]
    diff_inputs = [x for x in seg_inputs if x in param_dep and x not in params]
    seeded = [o for o in outputs if o in param_dep]
    entry = {"inputs": seg_inputs, "outputs": outputs, "params": seg_params}
    if not seg_params and not diff_inputs:
        return seg, None, dict(entry, residuals=[], backward_inputs=[], cotangents=[], input_grads=[])
    t0 = time.time()
    joint = gradient_graph(seg, seg_params, seeded, diff_inputs)
    dce(joint)
    if not keep_names:
        compact_names(joint)
    joint = infer(joint)
    grads = [grad_name(p) for p in seg_params] + [input_grad_name(x) for x in diff_inputs]
    forward, backward, residuals = split(joint, grads)
    log(f"  segment: {len(seg_params)} params, {len(diff_inputs)} activation inputs; forward "
        f"{len(forward.graph.node)} nodes, backward {len(backward.graph.node)} nodes, "
        f"{len(residuals)} residuals ({time.time() - t0:.1f} s)")
    return forward, backward, dict(
        entry, residuals=residuals, backward_inputs=[i.name for i in backward.graph.input],
        cotangents=[[o, cotangent_name(o)] for o in seeded],
        input_grads=[[x, input_grad_name(x)] for x in diff_inputs])


def build(unet_dir, out_dir, batch, h, w, seq, rank, alpha, suffixes, segments=1, keep_names=False, sample=True,
          log=print):
    t0 = time.time()
    info, targets = select_targets(os.path.join(unet_dir, "lora_targets.json"), suffixes)
    model = load_fixed(unet_dir, batch, h, w, seq)
    params = inject_lora(model, targets, rank, alpha, info["dtype"] == "float16")
    model = infer(model)
    fold_constants(model)
    dce(model)
    model = infer(model)
    log(f"injected {len(targets)} targets: {len(model.graph.node)} nodes ({time.time() - t0:.1f} s)")
    param_dep, _ = dependents(list(model.graph.node), params)
    os.makedirs(out_dir, exist_ok=True)
    if sample:
        save_graph(model, os.path.join(out_dir, SAMPLE))
    cuts = cut_points(model, segments) if segments > 1 else []
    entries = []
    for k, (seg, seg_inputs, outputs) in enumerate(segment_models(model, cuts)):
        forward, backward, entry = build_segment(seg, seg_inputs, outputs, params, param_dep, keep_names, log)
        suffix = "" if segments == 1 else f".{k}"
        entry["forward"] = FORWARD.replace(".onnx", suffix + ".onnx")
        entry["backward"] = BACKWARD.replace(".onnx", suffix + ".onnx") if backward else None
        for m, name in ((forward, entry["forward"]), (backward, entry["backward"])):
            if m is not None:
                save_graph(m, os.path.join(out_dir, name))
        entries.append(entry)
    # A copy, not a symlink: ONNX Runtime refuses external data that resolves
    # outside the model's folder.
    shutil.copyfile(os.path.join(unet_dir, "model.onnx_data"), os.path.join(out_dir, WEIGHTS))
    shapes = {i.name: i for i in model.graph.input}
    manifest = {
        "format": FORMAT,
        "batch": batch,
        "latent_height": h,
        "latent_width": w,
        "text_seq_len": seq,
        "rank": rank,
        "lora_alpha": alpha,
        "targets": [t["module"] for t in targets],
        "dtype": info["dtype"],
        "param_dtype": "float32",
        "unet_inputs": io_list([shapes[n] for n in unet_inputs(model) if n not in params]),
        "output": OUTPUT,
        "cotangent": COTANGENT,
        "sample": SAMPLE if sample else None,
        "segments": entries,
        "params": [{"key": p, "grad": grad_name(p), "accum": accum_name(p),
                    "shape": [d.dim_value for d in shapes[p].type.tensor_type.shape.dim]} for p in params],
        "weights": WEIGHTS,
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"wrote {out_dir}: {len(entries)} segment(s) ({time.time() - t0:.1f} s)")
    return manifest


def parse_hw(s):
    h, _, w = s.partition("x")
    return int(h), int(w or h)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", required=True, help="an exported UNet folder (model.onnx, lora_targets.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--latent", default="8x8", help="latent HxW")
    ap.add_argument("--seq", type=int, default=77)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=None, help="default: the rank")
    ap.add_argument("--targets", default=",".join(SPO_TARGETS),
                    help="linear modules to train: full module paths or path suffixes, comma-separated")
    ap.add_argument("--segments", type=int, default=1,
                    help="cut the UNet at block boundaries into K forward/backward pairs (gradient checkpointing)")
    ap.add_argument("--no-sample", action="store_true",
                    help="skip sample.onnx (the folder then serves gradients only, not the trainer)")
    ap.add_argument("--keep-names", action="store_true",
                    help="keep the UNet's value and node names (larger files; for profiling)")
    a = ap.parse_args(argv)
    h, w = parse_hw(a.latent)
    build(a.unet, a.out, a.batch, h, w, a.seq, a.rank, a.alpha if a.alpha is not None else float(a.rank),
          tuple(a.targets.split(",")), segments=a.segments,
          keep_names=a.keep_names, sample=not a.no_sample)


if __name__ == "__main__":
    sys.exit(main())
