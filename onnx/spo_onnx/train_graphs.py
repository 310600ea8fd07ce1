"""Builds LoRA training graphs (a forward/backward VJP pair) from an exported
UNet folder, in standard ONNX ops only, for spo-runtime's gradient runner.

    PYTHONPATH=onnx python -m spo_onnx.train_graphs --unet MODEL/unet --out TRAIN_DIR \
        --batch 2 --latent 8x8 --seq 77 --rank 4 [--alpha A] [--targets to_q,to_k,...]

Steps (each a function below):
1. load the UNet graph without its weights and fix every input shape;
2. inject a LoRA branch `y += (x A^T) B^T * alpha/r` on every target module,
   with A [r,in] and B [out,r] as fp32 graph inputs (a Cast pair around the
   branch for fp16 UNets);
3. reverse it with onnx-ad (weights hidden as inputs meanwhile, so its
   constant folding never reads external data);
4. present a plain `cotangent` input and `grad.<key>` outputs (the seed axis
   fixed to 1), drop dead nodes, turn seed-axis Transposes into Reshapes;
5. split the joint graph: the forward graph computes `out_sample` and returns
   every value the backward reads ("residuals"); the backward graph takes
   those plus the cotangent and returns the gradients (JAX's vjp pattern: the
   forward is never run twice).

Both graphs share one external data file (the UNet's weights, copied as they
are). The contract is `train_manifest.json`, described in onnx/DESIGN.md.
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MANIFEST = "train_manifest.json"
FORMAT = 1
FORWARD = "forward.onnx"
BACKWARD = "backward.onnx"
WEIGHTS = "weights.onnx_data"
COTANGENT = "cotangent"
OUTPUT = "out_sample"
SPO_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
HIDE_ABOVE = 4096  # initializers with more elements are hidden from onnx-ad
SEED_DIM = "nadj"


def lora_keys(module):
    """PEFT names of a module's LoRA pair (the names `spo grad` reads)."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def grad_name(key):
    return f"grad.{key}"


def accum_name(key):
    return f"accum.{key}"


# --------------------------------------------------------------------------- 1. load


def unet_inputs(model):
    return [i.name for i in model.graph.input if not i.name.startswith("lora.")]


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
        if vi.name.startswith("lora."):
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
    slot_inputs = {i.name for i in model.graph.input if i.name.startswith("lora.")}
    keep = [i for i in model.graph.input if i.name not in slot_inputs]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return model


# --------------------------------------------------------------------------- 2. inject


def select_targets(targets_json, suffixes):
    with open(targets_json) as f:
        info = json.load(f)
    chosen = [m for m in info["modules"]
              if m["kind"] == "linear" and m["op"] == "MatMul" and m["module"].split(".", 0)[0]
              and any(m["module"].endswith("." + s) for s in suffixes)]
    if not chosen:
        raise SystemExit(f"no linear module of {targets_json} ends with one of {suffixes}")
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


# --------------------------------------------------------------------------- 3. reverse


def hide_initializers(model):
    """Moves external or large initializers to graph inputs; returns them."""
    g = model.graph
    hidden = [t for t in g.initializer
              if t.data_location == TensorProto.EXTERNAL or int(np.prod(t.dims)) > HIDE_ABOVE]
    names = {t.name for t in hidden}
    keep = [t for t in g.initializer if t.name not in names]
    del g.initializer[:]
    g.initializer.extend(keep)
    for t in hidden:
        g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return hidden


def restore_initializers(model, hidden):
    names = {t.name for t in hidden}
    keep = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.initializer.extend(hidden)


def reverse(model, params):
    import onnx_ad

    hidden = hide_initializers(model)
    joint = onnx_ad.reverse(model, inputs=params, outputs=[OUTPUT], prefix="adj_", dim=SEED_DIM, layout="onnx")
    restore_initializers(joint, hidden)
    return joint


# --------------------------------------------------------------------------- 4. interface


def plain_interface(model, params, out_shape):
    """`cotangent` [B,4,h,w] in, `grad.<key>` out, the seed axis fixed to 1."""
    g = model.graph
    seed = "adj_" + OUTPUT
    seed_vi = next(i for i in g.input if i.name == seed)
    g.input.remove(seed_vi)
    g.input.append(helper.make_tensor_value_info(COTANGENT, TensorProto.FLOAT, out_shape))
    axis = numpy_helper.from_array(np.array([len(out_shape)], np.int64), "seed.axis")
    g.initializer.append(axis)
    cot = COTANGENT
    if _elem_type(model, OUTPUT) == TensorProto.FLOAT16:
        g.node.insert(0, helper.make_node("Cast", [COTANGENT], ["cotangent.half"], to=TensorProto.FLOAT16, name="/seed/Cast"))
        cot = "cotangent.half"
    g.node.insert(1 if cot != COTANGENT else 0,
                  helper.make_node("Unsqueeze", [cot, "seed.axis"], [seed], name="/seed/Unsqueeze"))
    outs = {o.name: o for o in g.output}
    del g.output[:]
    g.output.append(outs[OUTPUT])
    last = numpy_helper.from_array(np.array([-1], np.int64), "seed.axis.last")
    g.initializer.append(last)
    for p in params:
        # grad.<key> = accum.<key> + this call's gradient: the runner accumulates
        # across calls on the device by swapping two buffers, with no extra pass.
        shape = next([d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input if i.name == p)
        g.input.append(helper.make_tensor_value_info(accum_name(p), TensorProto.FLOAT, shape))
        g.node.append(helper.make_node("Squeeze", ["adj_" + p, "seed.axis.last"], [f"/grad/{p}/step"], name=f"/grad/{p}/Squeeze"))
        g.node.append(helper.make_node("Add", [accum_name(p), f"/grad/{p}/step"], [grad_name(p)], name=f"/grad/{p}/Add"))
        g.output.append(helper.make_tensor_value_info(grad_name(p), TensorProto.FLOAT, shape))
    return model


def _elem_type(model, name):
    for v in list(model.graph.output) + list(model.graph.input) + list(model.graph.value_info):
        if v.name == name:
            return v.type.tensor_type.elem_type
    raise KeyError(name)


def fix_seed_dim(model):
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param == SEED_DIM:
                d.Clear()
                d.dim_value = 1


def dce(model):
    """Drops nodes whose outputs no graph output needs (onnx-ad leaves the
    weight-gradient branches of frozen weights), and unused initializers."""
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


def transposes_to_reshapes(model):
    """A Transpose that only moves size-1 axes keeps the memory order: a Reshape
    is a free view where a Transpose copies."""
    g = model.graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.input) + list(g.output)}
    count = 0
    for i, n in enumerate(g.node):
        if n.op_type != "Transpose":
            continue
        shape = shapes.get(n.input[0])
        if not shape or any(d is None for d in shape):
            continue
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), list(range(len(shape)))[::-1])
        big = [p for p in perm if shape[p] != 1]
        if big != sorted(big):
            continue
        out_shape = [shape[p] for p in perm]
        const = f"{n.name or n.output[0]}/t2r_shape"
        g.initializer.append(numpy_helper.from_array(np.array(out_shape, np.int64), const))
        g.node[i].CopyFrom(helper.make_node("Reshape", [n.input[0], const], list(n.output), name=n.name))
        count += 1
    return count


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
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


# --------------------------------------------------------------------------- 5. split


def producers(g):
    return {o: n for n in g.node for o in n.output}


def ancestors(g, outputs):
    """The nodes needed to compute `outputs`, in graph order."""
    prod = producers(g)
    seen, stack = set(), list(outputs)
    while stack:
        v = stack.pop()
        n = prod.get(v)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        stack.extend(i for i in n.input if i)
    return [n for n in g.node if id(n) in seen]


def subgraph(model, nodes, inputs, outputs, name):
    g = model.graph
    vis = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    read = {i for n in nodes for i in n.input if i}
    inits = [t for t in g.initializer if t.name in read or t.name in outputs]
    new = helper.make_graph(
        nodes, name, [vis[i] for i in inputs], [vis[o] for o in outputs], inits,
        value_info=[v for v in g.value_info if v.name in read])
    m = helper.make_model(new, opset_imports=model.opset_import, ir_version=model.ir_version)
    return m


def split(joint, params):
    """(forward, backward, residuals). The forward holds the nodes `out_sample`
    needs; the backward everything else the gradients need. Residuals are the
    values the backward reads that the forward makes or that are inputs."""
    g = joint.graph
    grads = [grad_name(p) for p in params]
    fwd_nodes = ancestors(g, [OUTPUT])
    fwd_ids = {id(n) for n in fwd_nodes}
    bwd_all = ancestors(g, grads)
    # Nodes that read no graph input are constants: each graph gets its own copy.
    inputs = {i.name for i in g.input}
    bwd_nodes = [n for n in bwd_all if id(n) not in fwd_ids or not _depends_on(g, n, inputs)]
    made_fwd = {o for n in fwd_nodes for o in n.output}
    made_bwd = {o for n in bwd_nodes for o in n.output}
    read_bwd = [i for n in bwd_nodes for i in n.input if i and i not in made_bwd]
    init_names = {t.name for t in g.initializer}
    residuals, graph_inputs = [], []
    for v in dict.fromkeys(read_bwd):
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
    forward = subgraph(joint, fwd_nodes, fwd_inputs, [OUTPUT] + [r for r in residuals if r != OUTPUT], "unet_lora_forward")
    bwd_inputs = [i.name for i in g.input if i.name in graph_inputs] + [r for r in residuals]
    backward = subgraph(joint, bwd_nodes, bwd_inputs, grads, "unet_lora_backward")
    return forward, backward, residuals


_DEPENDS = {}


def _depends_on(g, node, inputs):
    """Whether `node` reads a graph input, directly or through other nodes."""
    key = id(g)
    cache = _DEPENDS.setdefault(key, {})
    if not cache:
        live = set(inputs)
        for n in g.node:
            hit = any(i in live for i in n.input if i)
            cache[id(n)] = hit
            if hit:
                live.update(n.output)
    return cache[id(node)]


# --------------------------------------------------------------------------- write


def rebase_external(model, location):
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location


def io_list(vis):
    out = []
    for v in vis:
        tt = v.type.tensor_type
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                    "shape": [d.dim_value for d in tt.shape.dim]})
    return out


def build(unet_dir, out_dir, batch, h, w, seq, rank, alpha, suffixes, keep_names=False, log=print):
    t0 = time.time()
    info, targets = select_targets(os.path.join(unet_dir, "lora_targets.json"), suffixes)
    fp16 = info["dtype"] == "float16"
    model = load_fixed(unet_dir, batch, h, w, seq)
    params = inject_lora(model, targets, rank, alpha, fp16)
    model = infer(model)
    log(f"injected {len(targets)} targets: {len(model.graph.node)} nodes ({time.time() - t0:.1f} s)")
    joint = reverse(model, params)
    log(f"reversed: {len(joint.graph.node)} nodes ({time.time() - t0:.1f} s)")
    joint = plain_interface(joint, params, [batch, 4, h, w])
    fix_seed_dim(joint)
    dce(joint)
    joint = infer(joint)
    n_t2r = transposes_to_reshapes(joint)
    if not keep_names:
        compact_names(joint)
    joint = infer(joint)
    log(f"post-passes: {len(joint.graph.node)} nodes, {n_t2r} Transposes as Reshapes ({time.time() - t0:.1f} s)")
    forward, backward, residuals = split(joint, params)
    os.makedirs(out_dir, exist_ok=True)
    for m in (forward, backward):
        rebase_external(m, WEIGHTS)
    # A copy, not a symlink: ONNX Runtime refuses external data that resolves
    # outside the model's folder.
    shutil.copyfile(os.path.join(unet_dir, "model.onnx_data"), os.path.join(out_dir, WEIGHTS))
    onnx.save(forward, os.path.join(out_dir, FORWARD))
    onnx.save(backward, os.path.join(out_dir, BACKWARD))
    unet_in = unet_inputs(forward)
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
        "unet_inputs": io_list([i for i in forward.graph.input if i.name in unet_in and i.name not in params]),
        "output": OUTPUT,
        "cotangent": COTANGENT,
        "segments": [{
            "forward": FORWARD,
            "backward": BACKWARD,
            "residuals": residuals,
            "backward_inputs": [i.name for i in backward.graph.input],
        }],
        "params": [{"key": p, "grad": grad_name(p), "accum": accum_name(p),
                    "shape": [d.dim_value for d in next(i for i in forward.graph.input if i.name == p).type.tensor_type.shape.dim]}
                   for p in params],
        "weights": WEIGHTS,
    }
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"wrote {out_dir}: forward {len(forward.graph.node)} nodes, backward {len(backward.graph.node)} nodes, "
        f"{len(residuals)} residuals ({time.time() - t0:.1f} s)")
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
                    help="module-path suffixes of the linear modules to train")
    ap.add_argument("--keep-names", action="store_true",
                    help="keep the UNet's value and node names (larger files; for profiling)")
    a = ap.parse_args(argv)
    h, w = parse_hw(a.latent)
    build(a.unet, a.out, a.batch, h, w, a.seq, a.rank, a.alpha if a.alpha is not None else float(a.rank),
          tuple(a.targets.split(",")), keep_names=a.keep_names)


if __name__ == "__main__":
    sys.exit(main())
