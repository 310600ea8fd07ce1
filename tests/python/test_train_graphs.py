"""The training-graph exporter: standard ops only, deterministic (the committed
fixture folders are what it writes today), and the graphs load on stock
ONNX Runtime. Their numbers are checked by tests/train_grad.rs against
float64 autograd."""

import json
import os

import onnx
import onnxruntime as ort

from spo_onnx.export import train

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")


def test_standard_ops_deterministic_and_loadable(tmp_path):
    out = tmp_path / "train"
    unet = os.path.join(FIXTURES, "tiny-sd15", "unet")
    # graphs-seg3 is a gradients-only folder (no sample.onnx), as goldens/grad.py writes it.
    manifest = train.build(unet, str(out), 2, 8, 8, 77, 4, 4.0, train.SPO_TARGETS, segments=3, sample=False,
                           log=lambda *_: None)
    committed = os.path.join(FIXTURES, "train", "tiny-sd15", "graphs-seg3")
    with open(os.path.join(committed, train.MANIFEST)) as f:
        assert manifest == json.load(f)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for seg in manifest["segments"]:
        for name in (seg["forward"], seg["backward"]):
            model = onnx.load(str(out / name), load_external_data=False)
            assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, name
            with open(out / name, "rb") as a, open(os.path.join(committed, name), "rb") as b:
                assert a.read() == b.read(), f"{name} differs from the committed fixture"
            ort.InferenceSession(str(out / name), opts, providers=["CPUExecutionProvider"])
