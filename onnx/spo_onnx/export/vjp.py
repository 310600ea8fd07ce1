"""Reverse-mode rules over a fixed-shape ONNX graph: the LoRA gradient (VJP)
graph in standard ONNX ops, with no seed axis.

`vjp(model, wrt, cotangents)` appends the backward nodes to the forward graph
(a joint graph), seeded by one float32 input per differentiated output, and
returns the value holding each `wrt` input's adjoint. The caller (`train.py`)
names the interface and splits the graph in two.

Only what training a LoRA needs is differentiated: values that are float and
depend on a `wrt` input ("active"). Frozen weights get no gradient, so a Conv
needs only its input gradient (a ConvTranspose) and the Shape/Gather/Concat
arithmetic on shapes is never reversed. Every value has a static shape, so
un-broadcasting reads the shapes instead of computing them.

An active op without a rule below is an error naming the op and the node: a
gradient graph that silently drops a term would train the wrong thing.
"""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


class Tape:
    """The backward graph under construction: the forward's shapes, dtypes and
    constants, the nodes and initializers added, and the adjoints so far."""

    def __init__(self, model):
        g = model.graph
        self.model = model
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.shapes, self.dtypes = {}, {}
        for v in list(g.input) + list(g.output) + list(g.value_info):
            tt = v.type.tensor_type
            self.dtypes[v.name] = tt.elem_type
            self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        self.consts = {}
        for t in g.initializer:
            self.dtypes[t.name] = t.data_type
            self.shapes[t.name] = list(t.dims)
            if t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) <= 64:
                self.consts[t.name] = numpy_helper.to_array(t)
        for n in g.node:
            if n.op_type == "Constant" and attr(n, "value") is not None:
                self.consts[n.output[0]] = numpy_helper.to_array(attr(n, "value"))
        self.nodes, self.inits, self.adj = [], [], {}
        self._count, self._cache = 0, {}

    # ------------------------------------------------------------ building

    def fresh(self, hint):
        self._count += 1
        return f"bwd.{self._count}.{hint}"

    def op(self, op_type, inputs, shape, dtype, n_out=1, **attrs):
        """Adds a node; returns its output name (or names, for n_out > 1, with
        `shape` then a list of shapes). Shapes and dtypes are recorded for the
        rules that read them."""
        outs = [self.fresh(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        for k, o in enumerate(outs):
            self.shapes[o] = list(shape[k] if n_out > 1 else shape)
            self.dtypes[o] = dtype
        return outs if n_out > 1 else outs[0]

    def const(self, value, dtype=None):
        """An initializer holding `value` (int64 unless `dtype` is given), shared
        between rules that need the same one."""
        arr = np.asarray(value, dtype=np.int64 if dtype is None else helper.tensor_dtype_to_np_dtype(dtype))
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._cache:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(arr, name))
            self.shapes[name], self.dtypes[name] = list(arr.shape), helper.np_dtype_to_tensor_dtype(arr.dtype)
            self._cache[key] = name
        return self._cache[key]

    def like(self, x, op_type, inputs, **attrs):
        """A node whose output has x's shape and dtype."""
        return self.op(op_type, inputs, self.shapes[x], self.dtypes[x], **attrs)

    def scalar(self, value, like):
        return self.const(value, self.dtypes[like])

    def reshape(self, x, shape):
        if self.shapes[x] == list(shape):
            return x
        return self.op("Reshape", [x, self.const(list(shape))], shape, self.dtypes[x])

    def cast(self, x, dtype):
        return x if self.dtypes[x] == dtype else self.op("Cast", [x], self.shapes[x], dtype, to=dtype)

    def reduce(self, op_type, x, axes, keepdims=1):
        """ReduceSum/ReduceMean over `axes`, with the axes as an input or an
        attribute as the graph's opset wants."""
        shape = self.shapes[x]
        axes = sorted(a % len(shape) for a in axes)
        out = [1 if i in axes else d for i, d in enumerate(shape)] if keepdims else \
            [d for i, d in enumerate(shape) if i not in axes]
        since = 13 if op_type == "ReduceSum" else 18
        if self.opset >= since:
            return self.op(op_type, [x, self.const(axes)], out, self.dtypes[x], keepdims=keepdims)
        return self.op(op_type, [x], out, self.dtypes[x], axes=axes, keepdims=keepdims)

    def unbroadcast(self, d, target):
        """Sums the adjoint `d` over the axes broadcasting added to a value of
        shape `target`."""
        shape = self.shapes[d]
        if shape == list(target):
            return d
        padded = [1] * (len(shape) - len(target)) + list(target)
        axes = [i for i, (p, s) in enumerate(zip(padded, shape)) if p == 1 and s != 1]
        if axes:
            d = self.reduce("ReduceSum", d, axes)
        return self.reshape(d, target)

    # ------------------------------------------------------------ adjoints

    def add_adjoint(self, value, d):
        self.adj.setdefault(value, []).append(d)

    def adjoint(self, value):
        """The summed adjoint of `value`, or None when nothing reaches it."""
        parts = self.adj.get(value)
        if not parts:
            return None
        if len(parts) > 1:
            parts[:] = [self.like(parts[0], "Sum", parts)]
        return parts[0]

    def zeros(self, value):
        return self.op("Expand", [self.scalar(0, value), self.const(self.shapes[value])],
                       self.shapes[value], self.dtypes[value])


# ---------------------------------------------------------------- rules
#
# A rule gets the tape, the forward node, the adjoints of its outputs (None
# where nothing reaches an output) and the set of input positions that need a
# gradient; it returns {position: gradient}.


def r_identity(t, n, dys, need):
    return {0: dys[0]}


def r_reshape(t, n, dys, need):
    return {0: t.reshape(dys[0], t.shapes[n.input[0]])}


def r_transpose(t, n, dys, need):
    perm = attr(n, "perm") or list(range(len(t.shapes[n.input[0]])))[::-1]
    inv = list(np.argsort(perm))
    return {0: t.op("Transpose", [dys[0]], t.shapes[n.input[0]], t.dtypes[dys[0]], perm=inv)}


def r_cast(t, n, dys, need):
    return {0: t.cast(dys[0], t.dtypes[n.input[0]])}


def r_add(t, n, dys, need):
    return {i: t.unbroadcast(dys[0], t.shapes[n.input[i]]) for i in need}


def r_sub(t, n, dys, need):
    out = {}
    if 0 in need:
        out[0] = t.unbroadcast(dys[0], t.shapes[n.input[0]])
    if 1 in need:
        out[1] = t.unbroadcast(t.like(dys[0], "Neg", [dys[0]]), t.shapes[n.input[1]])
    return out


def r_mul(t, n, dys, need):
    a, b = n.input
    return {i: t.unbroadcast(t.like(dys[0], "Mul", [dys[0], (b, a)[i]]), t.shapes[n.input[i]]) for i in need}


def r_div(t, n, dys, need):
    a, b = n.input
    dy, out = dys[0], {}
    if 0 in need:
        out[0] = t.unbroadcast(t.like(dy, "Div", [dy, b]), t.shapes[a])
    if 1 in need:  # d(a/b)/db = -y/b
        ratio = t.like(dy, "Div", [n.output[0], b])
        out[1] = t.unbroadcast(t.like(dy, "Neg", [t.like(dy, "Mul", [dy, ratio])]), t.shapes[b])
    return out


def swap_last(t, x):
    rank = len(t.shapes[x])
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return t.op("Transpose", [x], [t.shapes[x][p] for p in perm], t.dtypes[x], perm=perm)


def r_matmul(t, n, dys, need):
    a, b = n.input
    sa, sb, dy = t.shapes[a], t.shapes[b], dys[0]
    if len(sa) < 2 or len(sb) < 2:
        raise SystemExit(f"no gradient rule for the 1-D MatMul {n.name}")
    sy = t.shapes[dy]
    out = {}
    if 0 in need:  # dA = dY B^T
        out[0] = t.unbroadcast(t.op("MatMul", [dy, swap_last(t, b)], sy[:-1] + [sa[-1]], t.dtypes[dy]), sa)
    if 1 in need:
        if len(sb) == 2:  # a weight against activations: flatten the batch axes, dB = A^T dY
            a2 = t.reshape(a, [int(np.prod(sa[:-1])), sa[-1]])
            d2 = t.reshape(dy, [int(np.prod(sy[:-1])), sy[-1]])
            out[1] = t.op("Gemm", [a2, d2], sb, t.dtypes[dy], transA=1)
        else:
            out[1] = t.unbroadcast(t.op("MatMul", [swap_last(t, a), dy], sy[:-2] + sb[-2:], t.dtypes[dy]), sb)
    return out


def r_gemm(t, n, dys, need):
    a, b = n.input[:2]
    ta, tb = attr(n, "transA", 0), attr(n, "transB", 0)
    alpha, beta = attr(n, "alpha", 1.0), attr(n, "beta", 1.0)
    dy, dt, out = dys[0], t.dtypes[dys[0]], {}
    if 0 in need:
        out[0] = (t.op("Gemm", [dy, b], t.shapes[a], dt, alpha=alpha, transB=1 - tb) if not ta else
                  t.op("Gemm", [b, dy], t.shapes[a], dt, alpha=alpha, transA=tb, transB=1))
    if 1 in need:
        out[1] = (t.op("Gemm", [a, dy], t.shapes[b], dt, alpha=alpha, transA=1 - ta) if not tb else
                  t.op("Gemm", [dy, a], t.shapes[b], dt, alpha=alpha, transA=1, transB=ta))
    if 2 in need:
        scaled = dy if beta == 1.0 else t.like(dy, "Mul", [dy, t.scalar(beta, dy)])
        out[2] = t.unbroadcast(scaled, t.shapes[n.input[2]])
    return out


def r_conv(t, n, dys, need):
    """dX = ConvTranspose(dY, W) with the Conv's geometry; `output_padding`
    restores the input size a strided Conv rounded down. Frozen weights only."""
    if need - {0}:
        raise SystemExit(f"Conv {n.name}: gradients reach its weight or bias; only activation inputs are supported")
    if attr(n, "auto_pad", "NOTSET") != "NOTSET":
        raise SystemExit(f"Conv {n.name}: auto_pad is not supported by the gradient rules")
    x, w = n.input[:2]
    sx, sy, k = t.shapes[x], t.shapes[dys[0]], t.shapes[w][2:]
    nsp = len(k)
    strides = attr(n, "strides", [1] * nsp)
    dil = attr(n, "dilations", [1] * nsp)
    pads = attr(n, "pads", [0] * 2 * nsp)
    extra = []
    for i in range(nsp):
        full = (sy[2 + i] - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - pads[i] - pads[nsp + i]
        extra.append(sx[2 + i] - full)
        if not 0 <= extra[-1] < max(strides[i], dil[i]):
            raise SystemExit(f"Conv {n.name}: no ConvTranspose restores input shape {sx}")
    return {0: t.op("ConvTranspose", [dys[0], w], sx, t.dtypes[dys[0]], strides=strides, dilations=dil,
                    pads=pads, group=attr(n, "group", 1), output_padding=extra)}


def r_softmax(t, n, dys, need):
    if t.opset < 13:
        raise SystemExit(f"Softmax {n.name}: opset {t.opset} (the rule needs opset 13's per-axis Softmax)")
    y, dy = n.output[0], dys[0]
    # The dot product sums over every key (4,096 at SDXL's first level at
    # 1024 px): in float32 also when the model is float16.
    y32, dy32 = t.cast(y, TensorProto.FLOAT), t.cast(dy, TensorProto.FLOAT)
    dot = t.reduce("ReduceSum", t.like(dy32, "Mul", [dy32, y32]), [attr(n, "axis", -1)])
    return {0: t.like(dy, "Mul", [y, t.like(dy, "Sub", [dy, t.cast(dot, t.dtypes[dy])])])}


def r_sigmoid(t, n, dys, need):
    y, dy = n.output[0], dys[0]
    slope = t.like(y, "Mul", [y, t.like(y, "Sub", [t.scalar(1, y), y])])
    return {0: t.like(dy, "Mul", [dy, slope])}


def r_erf(t, n, dys, need):
    x, dy = n.input[0], dys[0]
    gauss = t.like(x, "Exp", [t.like(x, "Neg", [t.like(x, "Mul", [x, x])])])
    slope = t.like(x, "Mul", [gauss, t.scalar(2 / np.sqrt(np.pi), x)])
    return {0: t.like(dy, "Mul", [dy, slope])}


def r_split(t, n, dys, need):
    """Concat of the outputs' adjoints, zeros where an output has none."""
    parts = [d if d is not None else t.zeros(o) for o, d in zip(n.output, dys)]
    return {0: t.op("Concat", parts, t.shapes[n.input[0]], t.dtypes[parts[0]], axis=attr(n, "axis", 0))}


def r_concat(t, n, dys, need):
    axis = attr(n, "axis")
    sizes = [t.shapes[i][axis] for i in n.input]
    shapes = [t.shapes[i] for i in n.input]
    parts = t.op("Split", [dys[0], t.const(sizes)], shapes, t.dtypes[dys[0]], n_out=len(sizes), axis=axis)
    parts = parts if len(sizes) > 1 else [parts]
    return {i: parts[i] for i in need}


def r_slice(t, n, dys, need):
    """Pads the adjoint back with zeros (unit steps, constant bounds)."""
    shape = t.shapes[n.input[0]]
    args = [t.consts.get(i) if i else None for i in list(n.input[1:]) + [""] * (5 - len(n.input))]
    starts, ends, axes, steps = args[:4]
    if starts is None or ends is None or (n.input[3:4] and n.input[3] and axes is None) or \
            (n.input[4:5] and n.input[4] and steps is None):
        raise SystemExit(f"Slice {n.name}: the gradient rule needs constant starts, ends, axes and steps")
    axes = list(range(len(starts))) if axes is None else [int(a) % len(shape) for a in axes]
    if steps is not None and any(int(s) != 1 for s in steps):
        raise SystemExit(f"Slice {n.name}: only unit steps have a gradient rule")
    pads = [0] * (2 * len(shape))
    for a, s, e in zip(axes, starts, ends):
        s, e = (int(v) + shape[a] if int(v) < 0 else int(v) for v in (s, e))
        s, e = min(max(s, 0), shape[a]), min(max(e, 0), shape[a])
        pads[a], pads[len(shape) + a] = s, shape[a] - e
    return {0: t.op("Pad", [dys[0], t.const(pads)], shape, t.dtypes[dys[0]])}


def r_resize(t, n, dys, need):
    """Nearest-neighbour upsampling by integer factors, where output pixel i
    reads input pixel floor(i / f): each input pixel's adjoint is the sum over
    its f x f block."""
    mode, ctm = attr(n, "mode", "nearest"), attr(n, "coordinate_transformation_mode", "half_pixel")
    nearest = attr(n, "nearest_mode", "round_prefer_floor")
    ok = mode == "nearest" and ((ctm == "asymmetric" and nearest == "floor") or
                                (ctm in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_floor"))
    sx, sy = t.shapes[n.input[0]], t.shapes[dys[0]]
    factors = [o // i if i and o % i == 0 else 0 for i, o in zip(sx, sy)]
    if not ok or 0 in factors or factors[:2] != [1, 1]:
        raise SystemExit(f"Resize {n.name}: only nearest upsampling of the spatial axes by whole factors "
                         f"has a gradient rule (mode {mode}, {ctm}, {nearest}; {sx} -> {sy})")
    blocks = sx[:2] + [d for i, f in zip(sx[2:], factors[2:]) for d in (i, f)]
    folded = t.reshape(dys[0], blocks)
    summed = t.reduce("ReduceSum", folded, [3 + 2 * k for k in range(len(sx) - 2)], keepdims=0)
    return {0: summed}


def normalize_backward(t, x, dy, scale, axes, mean, rstd):
    """dX of y = (x - mean) * rstd * scale over `axes`, in float32:
    rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * scale."""
    x32, dy32 = t.cast(x, TensorProto.FLOAT), t.cast(dy, TensorProto.FLOAT)
    xhat = t.like(x32, "Mul", [t.like(x32, "Sub", [x32, mean]), rstd])
    g = dy32 if scale is None else t.like(dy32, "Mul", [dy32, scale])
    mg = t.reduce("ReduceMean", g, axes)
    mgx = t.reduce("ReduceMean", t.like(g, "Mul", [g, xhat]), axes)
    inner = t.like(g, "Sub", [t.like(g, "Sub", [g, mg]), t.like(g, "Mul", [xhat, mgx])])
    return t.cast(t.like(g, "Mul", [inner, rstd]), t.dtypes[x]), xhat, dy32


def r_layer_norm(t, n, dys, need):
    """Reads the mean and inverse deviation the forward node already computes
    (LayerNormalization's optional outputs, added to the node here)."""
    x, scale = n.input[:2]
    if attr(n, "stash_type", 1) != 1:
        raise SystemExit(f"LayerNormalization {n.name}: only stash_type 1 (float32 statistics) is supported")
    rank = len(t.shapes[x])
    axes = list(range(attr(n, "axis", -1) % rank, rank))
    stat_shape = [1 if i in axes else d for i, d in enumerate(t.shapes[x])]
    while len(n.output) < 3:
        n.output.append(f"{n.output[0]}.{('mean', 'rstd')[len(n.output) - 1]}")
    for o in n.output[1:]:
        t.shapes[o], t.dtypes[o] = stat_shape, TensorProto.FLOAT
    gamma = t.cast(scale, TensorProto.FLOAT)
    dx, xhat, dy32 = normalize_backward(t, x, dys[0], gamma, axes, n.output[1], n.output[2])
    out = {0: dx} if 0 in need else {}
    if 1 in need:
        out[1] = t.cast(t.unbroadcast(t.like(dy32, "Mul", [dy32, xhat]), t.shapes[scale]), t.dtypes[scale])
    if 2 in need:
        out[2] = t.unbroadcast(dys[0], t.shapes[n.input[2]])
    return out


def r_instance_norm(t, n, dys, need):
    """Recomputes the per-channel statistics over the spatial axes in float32
    (InstanceNormalization has no outputs for them)."""
    if need - {0}:
        raise SystemExit(f"InstanceNormalization {n.name}: only the input gradient is supported")
    x, scale = n.input[:2]
    sx = t.shapes[x]
    axes = list(range(2, len(sx)))
    x32 = t.cast(x, TensorProto.FLOAT)
    mean = t.reduce("ReduceMean", x32, axes)
    centred = t.like(x32, "Sub", [x32, mean])
    var = t.reduce("ReduceMean", t.like(x32, "Mul", [centred, centred]), axes)
    eps = t.scalar(attr(n, "epsilon", 1e-5), var)
    rstd = t.like(var, "Reciprocal", [t.like(var, "Sqrt", [t.like(var, "Add", [var, eps])])])
    const = t.consts.get(scale)
    gamma = None
    if const is None or not np.all(const == 1):
        gamma = t.reshape(t.cast(scale, TensorProto.FLOAT), [sx[1]] + [1] * len(axes))
    return {0: normalize_backward(t, x, dys[0], gamma, axes, mean, rstd)[0]}


def r_where(t, n, dys, need):
    cond, dy = n.input[0], dys[0]
    zero = t.scalar(0, dy)
    out = {}
    if 1 in need:
        out[1] = t.unbroadcast(t.like(dy, "Where", [cond, dy, zero]), t.shapes[n.input[1]])
    if 2 in need:
        out[2] = t.unbroadcast(t.like(dy, "Where", [cond, zero, dy]), t.shapes[n.input[2]])
    return out


def r_expand(t, n, dys, need):
    return {0: t.unbroadcast(dys[0], t.shapes[n.input[0]])}


RULES = {
    "Identity": r_identity, "Reshape": r_reshape, "Flatten": r_reshape, "Squeeze": r_reshape,
    "Unsqueeze": r_reshape, "Transpose": r_transpose, "Cast": r_cast,
    "Add": r_add, "Sub": r_sub, "Mul": r_mul, "Div": r_div,
    "MatMul": r_matmul, "Gemm": r_gemm, "Conv": r_conv,
    "Softmax": r_softmax, "Sigmoid": r_sigmoid, "Erf": r_erf,
    "Split": r_split, "Concat": r_concat, "Slice": r_slice, "Resize": r_resize,
    "LayerNormalization": r_layer_norm, "InstanceNormalization": r_instance_norm,
    "Where": r_where, "Expand": r_expand,
}


# ---------------------------------------------------------------- driver


def active_values(model, t, wrt):
    """Float values computed from `wrt` (integers, such as shapes, carry no
    gradient)."""
    active = set(wrt)
    for n in model.graph.node:
        if any(i in active for i in n.input if i):
            active.update(o for o in n.output if o and t.dtypes.get(o) in FLOAT_TYPES)
    return active


def vjp(model, wrt, cotangents):
    """Appends to `model` (in place) the backward of the outputs in
    `cotangents`, a map output -> name of the float32 input that seeds it.
    Returns {x: the value holding x's adjoint} for each `wrt` value (in x's
    dtype; zeros when no seeded output depends on x)."""
    t = Tape(model)
    g = model.graph
    active = active_values(model, t, wrt)
    for o, cot in cotangents.items():
        g.input.append(helper.make_tensor_value_info(cot, TensorProto.FLOAT, t.shapes[o]))
        t.shapes[cot], t.dtypes[cot] = t.shapes[o], TensorProto.FLOAT
        t.add_adjoint(o, t.cast(cot, t.dtypes[o]))
    for n in reversed(list(g.node)):
        dys = [t.adjoint(o) if o else None for o in n.output]
        need = {i for i, x in enumerate(n.input) if x in active}
        if not need or all(d is None for d in dys):
            continue
        rule = RULES.get(n.op_type)
        if rule is None:
            raise SystemExit(f"no gradient rule for {n.op_type} (node '{n.name}'), "
                             "which the LoRA's gradient passes through")
        if n.op_type != "Split" and dys[0] is None:
            continue  # only the first output of the other ops carries a gradient
        for i, d in rule(t, n, dys, need).items():
            t.add_adjoint(n.input[i], d)
    adjoints = {}
    for x in wrt:
        d = t.adjoint(x)
        adjoints[x] = d if d is not None else t.zeros(x)
    g.node.extend(t.nodes)
    g.initializer.extend(t.inits)
    return adjoints
