"""Each reverse rule of spo_onnx.export.vjp against central finite differences,
one small graph per rule, run by ONNX Runtime. The UNet fixtures check the
rules the UNets use against autograd (tests/train_grad.rs); this covers every
rule, including those no fixture reaches (Gemm, Slice, Where, Expand, a
strided Conv, a Split output nobody reads, both inputs of Sub and Div)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from spo_onnx.export.vjp import vjp

RNG = np.random.default_rng(7)


def case(op, shapes, out_shape, consts=(), wrt=None, opset=17, n_out=1, **attrs):
    """(model, wrt names): inputs x0, x1, ... of `shapes` (float32), constant
    inputs appended after them, outputs y0.. of `out_shape`(s)."""
    names = [f"x{i}" for i in range(len(shapes))]
    inits = []
    for k, c in enumerate(consts):
        inits.append(numpy_helper.from_array(np.asarray(c), f"c{k}") if c is not None else None)
    inputs = names + [t.name if t is not None else "" for t in inits]
    outs = [f"y{i}" for i in range(n_out)]
    out_shapes = out_shape if n_out > 1 else [out_shape]
    g = helper.make_graph(
        [helper.make_node(op, inputs, outs, name=op, **attrs)], "rule",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, shapes)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in zip(outs, out_shapes)],
        [t for t in inits if t is not None])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    return model, names if wrt is None else [names[i] for i in wrt]


def session(model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def check(model, wrt, tol=2e-2):
    forward = session(model)
    outs = [o.name for o in model.graph.output]
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    x = {n: RNG.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    ys = forward.run(outs, x)
    cots = {o: RNG.standard_normal(y.shape).astype(np.float32) for o, y in zip(outs, ys)}
    joint = onnx.ModelProto()
    joint.CopyFrom(model)
    adj = vjp(joint, wrt, {o: f"cot.{o}" for o in outs})
    for w in wrt:
        joint.graph.output.append(helper.make_tensor_value_info(adj[w], TensorProto.FLOAT, shapes[w]))
    onnx.checker.check_model(joint, full_check=True)
    got = session(joint).run([adj[w] for w in wrt], {**x, **{f"cot.{o}": c for o, c in cots.items()}})

    def loss(feed):
        return sum(float(np.sum(c.astype(np.float64) * y)) for c, y in zip(cots.values(), forward.run(outs, feed)))

    for w, g in zip(wrt, got):
        assert g.shape == x[w].shape, w
        d = RNG.standard_normal(x[w].shape).astype(np.float32)
        step = 1e-2
        fd = (loss({**x, w: x[w] + step * d}) - loss({**x, w: x[w] - step * d})) / (2 * step)
        analytic = float(np.sum(g.astype(np.float64) * d))
        assert abs(fd - analytic) <= tol * max(abs(fd), 1.0), f"{w}: {analytic} vs finite difference {fd}"


CASES = {
    "Add broadcast": lambda: case("Add", [[2, 3, 4], [3, 1]], [2, 3, 4]),
    "Sub broadcast": lambda: case("Sub", [[2, 3, 4], [4]], [2, 3, 4]),
    "Mul broadcast": lambda: case("Mul", [[2, 1, 4], [3, 4]], [2, 3, 4]),
    "Div": lambda: case("Div", [[2, 3], [2, 3]], [2, 3]),
    "MatMul batched": lambda: case("MatMul", [[2, 3, 4], [2, 4, 5]], [2, 3, 5]),
    "MatMul weight": lambda: case("MatMul", [[2, 3, 4], [4, 5]], [2, 3, 5]),
    "Gemm": lambda: case("Gemm", [[3, 4], [5, 4], [5]], [3, 5], transB=1, alpha=0.5, beta=2.0),
    "Gemm transA": lambda: case("Gemm", [[4, 3], [4, 5]], [3, 5], transA=1),
    "Transpose": lambda: case("Transpose", [[2, 3, 4]], [4, 2, 3], perm=[2, 0, 1]),
    "Reshape": lambda: case("Reshape", [[2, 3, 4]], [6, 4], consts=[np.array([6, 4], np.int64)]),
    "Softmax": lambda: case("Softmax", [[2, 3, 5]], [2, 3, 5], axis=1),
    "Sigmoid": lambda: case("Sigmoid", [[2, 5]], [2, 5]),
    "Erf": lambda: case("Erf", [[2, 5]], [2, 5]),
    "Split, one output unread": lambda: case("Split", [[2, 6]], [[2, 2], [2, 4]], n_out=2,
                                             consts=[np.array([2, 4], np.int64)], axis=1),
    "Concat": lambda: case("Concat", [[2, 3], [2, 1]], [2, 4], axis=1),
    "Slice": lambda: case("Slice", [[4, 6]], [2, 3], consts=[np.array([1, -4], np.int64), np.array([3, 5], np.int64)]),
    "Resize nearest 2x": lambda: case("Resize", [[1, 2, 3, 3]], [1, 2, 6, 6],
                                      consts=[None, np.array([1, 1, 2, 2], np.float32)],
                                      mode="nearest", coordinate_transformation_mode="asymmetric",
                                      nearest_mode="floor"),
    "Conv strided": lambda: case("Conv", [[1, 2, 6, 6]], [1, 3, 3, 3], wrt=[0],
                                 consts=[RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)],
                                 strides=[2, 2], pads=[1, 1, 1, 1]),
    "Conv grouped": lambda: case("Conv", [[1, 4, 5, 5]], [1, 4, 5, 5], wrt=[0],
                                 consts=[RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)],
                                 group=2, pads=[1, 1, 1, 1]),
    "LayerNormalization": lambda: case("LayerNormalization", [[2, 3, 8], [8], [8]], [2, 3, 8], epsilon=1e-5),
    "InstanceNormalization": lambda: case("InstanceNormalization", [[2, 3, 10]], [2, 3, 10], wrt=[0],
                                          consts=[np.array([0.5, 2.0, -1.0], np.float32),
                                                  np.array([0.1, 0.2, 0.3], np.float32)]),
    "Where": lambda: where_case(),
    "Expand": lambda: case("Expand", [[3, 1]], [2, 3, 4], consts=[np.array([2, 3, 4], np.int64)]),
}


def where_case():
    cond = numpy_helper.from_array(RNG.standard_normal((2, 3)) > 0, "cond")
    g = helper.make_graph(
        [helper.make_node("Where", ["cond", "x0", "x1"], ["y0"], name="Where")], "rule",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("x1", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [2, 3])], [cond])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model), ["x0", "x1"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_matches_finite_differences(name):
    check(*CASES[name]())


def test_unknown_op_on_the_gradient_path_is_named():
    model, wrt = case("Tanh", [[2, 3]], [2, 3])
    with pytest.raises(SystemExit, match="no gradient rule for Tanh"):
        vjp(model, wrt, {"y0": "cot.y0"})
