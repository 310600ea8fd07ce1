"""Exporter tests: ONNX Runtime (CPU) against the diffusers torch modules.

    cd <repo> && PYTHONPATH=onnx python -m pytest -q tests/python

Exports the committed diffusers fixtures into a temp dir (TorchScript
exporter, fp32) and compares every graph with torch.
"""

import copy
import json
import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "onnx"))

from spo_onnx import export, fixtures  # noqa: E402

FIX = os.path.join(REPO, "tests", "fixtures")
ATOL = 1e-4  # fp32 ORT vs torch; observed max errors are ~1e-6 (see README)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


_SESSIONS = {}


def session(path):
    """One cached ORT session per graph file."""
    if path not in _SESSIONS:
        _SESSIONS[path] = _new_session(path)
    return _SESSIONS[path]


def _new_session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # no graph optimizations: they are not what is under test
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """{model: (pipe, out_dir)} for plain fp32 exports of both fixtures."""
    out = {}
    root = tmp_path_factory.mktemp("export")
    for name in ("tiny-sdxl", "tiny-sd15"):
        d = str(root / name)
        pipe = export.export_pipeline(os.path.join(FIX, "diffusers", name), d)
        # export_pipeline leaves the modules unchanged (no forward patches left behind)
        out[name] = (export.load_pipeline(os.path.join(FIX, "diffusers", name)), d)
        del pipe
    return out


def _close(a, b, atol=ATOL):
    err = float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
    assert err <= atol, err
    return err


# ----------------------------------------------------------------------------- I/O contract


def io(path):
    s = session(path)
    return [(i.name, i.type) for i in s.get_inputs()], [(o.name, o.type) for o in s.get_outputs()]


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_io_names(exported, name):
    pipe, d = exported[name]
    f, i64 = "tensor(float)", "tensor(int64)"
    n1 = pipe.text_encoder.config.num_hidden_layers
    ins, outs = io(os.path.join(d, "text_encoder", "model.onnx"))
    assert ins == [("input_ids", i64)]
    assert outs == [("last_hidden_state", f), ("pooler_output", f)] + [(f"hidden_states.{i}", f) for i in range(n1 + 1)]
    ins, outs = io(os.path.join(d, "unet", "model.onnx"))
    want = [("sample", f), ("timestep", f), ("encoder_hidden_states", f)]
    if name == "tiny-sdxl":
        want += [("text_embeds", f), ("time_ids", f)]
        n2 = pipe.text_encoder_2.config.num_hidden_layers
        i2, o2 = io(os.path.join(d, "text_encoder_2", "model.onnx"))
        assert i2 == [("input_ids", i64)]
        assert o2 == [("text_embeds", f), ("last_hidden_state", f)] + [(f"hidden_states.{i}", f) for i in range(n2 + 1)]
    assert ins == want and outs == [("out_sample", f)]
    assert os.path.exists(os.path.join(d, "unet", "model.onnx_data"))
    assert io(os.path.join(d, "vae_decoder", "model.onnx")) == ([("latent_sample", f)], [("sample", f)])
    assert io(os.path.join(d, "vae_encoder", "model.onnx")) == ([("sample", f)], [("latent_parameters", f)])
    for sub in ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"] + (
        ["tokenizer_2/vocab.json", "tokenizer_2/merges.txt"] if name == "tiny-sdxl" else []
    ):
        assert os.path.exists(os.path.join(d, sub)), sub


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_text_encoders(exported, name):
    pipe, d = exported[name]
    texts = ["a photo of a cat", "", "emoji 🤖 and a very long prompt " * 10]
    encs = [("text_encoder", pipe.tokenizer, pipe.text_encoder, False)]
    if name == "tiny-sdxl":
        encs.append(("text_encoder_2", pipe.tokenizer_2, pipe.text_encoder_2, True))
    for sub, tok, te, proj in encs:
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        got = session(os.path.join(d, sub, "model.onnx")).run(None, {"input_ids": ids.numpy()})
        with torch.no_grad():
            r = te(ids, output_hidden_states=True)
        ref = ([r.text_embeds, r.last_hidden_state] if proj else [r.last_hidden_state, r.pooler_output]) + list(r.hidden_states)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            _close(a, b.numpy())


def unet_inputs(pipe, b, h, w, seed=0, sdxl=True):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.tensor([999.0, 10.5, 1.0, 500.25][:b])
    e = torch.randn(b, 77, cfg.cross_attention_dim, generator=g)
    feed = {"sample": x, "timestep": t, "encoder_hidden_states": e}
    kw = {}
    if sdxl:
        te = torch.randn(b, pipe.text_encoder_2.config.projection_dim, generator=g)
        ti = torch.tensor([[h * 8.0, w * 8.0, 0, 0, h * 8.0, w * 8.0]] * b)
        feed.update(text_embeds=te, time_ids=ti)
        kw["added_cond_kwargs"] = {"text_embeds": te, "time_ids": ti}
    return feed, kw


def unet_torch(unet, feed, kw):
    with torch.no_grad():
        return unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"], **kw).sample.numpy()


@pytest.mark.parametrize("name,shapes", [("tiny-sdxl", [(1, 8, 8), (2, 8, 12), (2, 16, 8)]), ("tiny-sd15", [(1, 8, 8), (2, 16, 8)])])
def test_unet(exported, name, shapes):
    pipe, d = exported[name]
    s = session(os.path.join(d, "unet", "model.onnx"))
    for b, h, w in shapes:
        feed, kw = unet_inputs(pipe, b, h, w, sdxl=name == "tiny-sdxl")
        got = s.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        _close(got, unet_torch(pipe.unet, feed, kw))


# fp16 UNet (traced from the fp16 module, the path that lets the full-size SDXL
# export fit in memory) against torch fp32: fp16 rounding of weights and
# activations; observed max error 1.2e-3 on outputs of magnitude ~1.3.
FP16_TOL = 4e-3


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_unet_fp16(exported, tmp_path, name):
    pipe, _ = exported[name]
    sdxl = name == "tiny-sdxl"
    u16 = copy.deepcopy(pipe.unet)
    te_dim = pipe.text_encoder_2.config.projection_dim if sdxl else None
    export.export_unet(u16, str(tmp_path / "unet"), sdxl, torch.float16, export.DEFAULT_OPSET, False, 2, None, 0, te_dim)
    path = str(tmp_path / "unet" / "model.onnx")
    inputs, _ = io(path)
    # fp16 everywhere but the timestep, which diffusers projects in fp32
    assert dict(inputs)["timestep"] == "tensor(float)", inputs
    assert dict(inputs)["sample"] == "tensor(float16)", inputs
    with open(tmp_path / "unet" / "lora_targets.json") as f:
        t = json.load(f)
    assert t["dtype"] == "float16" and not t["missing"]
    s = session(path)
    feed, kw = unet_inputs(pipe, 2, 8, 16, sdxl=sdxl)
    ref = unet_torch(pipe.unet, feed, kw)
    got = s.run(None, {k: v.numpy().astype(np.float32 if k == "timestep" else np.float16) for k, v in feed.items()})[0]
    _close(got, ref, FP16_TOL * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_vae(exported, name):
    pipe, d = exported[name]
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 8, 12, generator=g)
    got = session(os.path.join(d, "vae_decoder", "model.onnx")).run(None, {"latent_sample": z.numpy()})[0]
    with torch.no_grad():
        _close(got, pipe.vae.decode(z).sample.numpy())
    img = torch.rand(2, 3, 64, 96, generator=g) * 2 - 1
    got = session(os.path.join(d, "vae_encoder", "model.onnx")).run(None, {"sample": img.numpy()})[0]
    with torch.no_grad():
        _close(got, pipe.vae.encode(img).latent_dist.parameters.numpy())


# ----------------------------------------------------------------------------- lora_targets.json


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_lora_targets(exported, name):
    pipe, d = exported[name]
    with open(os.path.join(d, "unet", "lora_targets.json")) as f:
        t = json.load(f)
    m = onnx.load(os.path.join(d, "unet", "model.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    mods = {e["module"]: e for e in t["modules"]}
    want = [n for n, mod in pipe.unet.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(mods) == sorted(want)
    assert t["missing"] == []
    params = dict(pipe.unet.named_parameters())
    for path, e in mods.items():
        init = inits[e["initializer"]]
        assert list(init.dims) == e["initializer_shape"]
        arr = onnx.numpy_helper.to_array(init, base_dir=os.path.join(d, "unet"))
        w = params[path + ".weight"].detach().numpy()
        if e["layout"] == "linear_in_out":
            np.testing.assert_array_equal(arr, w.T)
        else:
            assert e["layout"] in ("linear_out_in", "conv_oihw")
            np.testing.assert_array_equal(arr, w)
    # attention projections are all MatMul [in,out] (TorchScript)
    attn = [e for p, e in mods.items() if ".attn1." in p or ".attn2." in p]
    assert attn and all(e["layout"] == "linear_in_out" for e in attn)


# ----------------------------------------------------------------------------- lean graph


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_unet_graph_lean(exported, name):
    """Attention and GEGLU reshape with constant shapes (no Shape chains, no
    baddbmm zero tensor), and every intermediate value has a full (symbolic)
    shape in value_info: ORT session creation depends on both (see
    export.annotate_symbolic_shapes)."""
    _, d = exported[name]
    m = onnx.load(os.path.join(d, "unet", "model.onnx"), load_external_data=False)
    nodes = m.graph.node
    scoped = [n for n in nodes if "/attn1/" in n.name or "/attn2/" in n.name or "/ff/net.0/" in n.name]
    assert scoped and not [n.name for n in scoped if n.op_type in ("Shape", "Gather", "Concat", "ConstantOfShape", "Slice")]
    # per attention: q/k/v/out projections, 4 reshapes, 4 transposes, 2 matmuls, scale, softmax (+ consts, bias)
    n_attn = sum(1 for n in nodes if n.name.endswith("/Softmax"))
    assert len(scoped) <= 30 * n_attn
    # the node scopes the LoRA resolver reads are unchanged
    assert any(n.name.endswith("/attn1/to_q/MatMul") and n.op_type == "MatMul" for n in nodes)
    shaped = {v.name: v for v in m.graph.value_info}
    produced = [o for n in nodes if n.op_type != "Constant" for o in n.output if o and o != "out_sample"]
    missing = [o for o in produced if o not in shaped]
    assert not missing, missing[:5]
    for o in produced:
        dims = shaped[o].type.tensor_type.shape.dim
        assert all(dd.HasField("dim_value") or dd.dim_param for dd in dims), o


# ----------------------------------------------------------------------------- LoRA slots


@pytest.fixture(scope="session")
def slots_export(tmp_path_factory):
    """A --lora-slots 4 export. To keep the suite fast, this uses the tiny SDXL
    pipeline with one transformer layer per level instead of (1, 2, 10); the
    slot code path is the same."""
    from diffusers import UNet2DConditionModel

    d = str(tmp_path_factory.mktemp("slots"))
    pipe = fixtures.build_sdxl()
    torch.manual_seed(3)
    pipe.unet = UNet2DConditionModel(**dict(fixtures.UNET_SDXL, transformer_layers_per_block=(1, 1, 1))).eval()
    export.export_pipeline(None, d, lora_slots=4, components=("unet",), pipe=pipe)
    return pipe, d


def test_slot_modules_full_structure(exported):
    pipe, _ = exported["tiny-sdxl"]
    mods = [n for n, _ in export.unet_slot_modules(pipe.unet)]
    # as in real SDXL: 70 transformer blocks x (attn1, attn2) x (q, k, v, out.0)
    assert len(mods) == 560
    assert all(n.rsplit(".", 2)[-2] in ("attn1", "attn2") or n.endswith("to_out.0") for n in mods)


def test_slots_zero_equals_plain(slots_export):
    pipe, d = slots_export
    with open(os.path.join(d, "unet", "lora_targets.json")) as f:
        t = json.load(f)
    slots = t["slots"]
    n_attn = sum(1 for p, _ in pipe.unet.named_modules() if p.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")))
    assert len(slots) == n_attn == 11 * 8  # 11 transformer blocks here
    assert t["missing"] == []
    s = session(os.path.join(d, "unet", "model.onnx"))
    # inputs with a default (an initializer of the same name) are listed by ORT
    # as overridable initializers, not as inputs; they can still be fed
    names = {i.name for i in s.get_overridable_initializers()}
    assert all(x["down"] in names and x["up"] in names for x in slots)
    m = onnx.load(os.path.join(d, "unet", "model.onnx"), load_external_data=False)
    graph_inputs = {i.name for i in m.graph.input}
    assert all(x["down"] in graph_inputs and x["up"] in graph_inputs for x in slots)
    feed, kw = unet_inputs(pipe, 2, 8, 8, seed=5)
    plain = unet_torch(pipe.unet, feed, kw)
    feed = {k: v.numpy() for k, v in feed.items()}
    _close(s.run(None, feed)[0], plain)  # adapter inputs omitted: zero defaults
    # explicit zeros of another rank (the rank axis is dynamic)
    z = dict(feed)
    for x in slots:
        z[x["down"]] = np.zeros((2, x["in_features"]), np.float32)
        z[x["up"]] = np.zeros((x["out_features"], 2), np.float32)
    _close(s.run(None, z)[0], plain)


def test_slots_random_equals_torch_lora(slots_export):
    pipe, d = slots_export
    with open(os.path.join(d, "unet", "lora_targets.json")) as f:
        slots = json.load(f)["slots"]
    g = torch.Generator().manual_seed(9)
    unet = copy.deepcopy(pipe.unet)
    mods = dict(unet.named_modules())
    feed, kw = unet_inputs(pipe, 2, 8, 12, seed=6)
    onnx_feed = {k: v.numpy() for k, v in feed.items()}
    with torch.no_grad():
        for x in slots:
            a = torch.randn(4, x["in_features"], generator=g) * 0.2
            b = torch.randn(x["out_features"], 4, generator=g) * 0.2
            onnx_feed[x["down"]] = a.numpy()
            onnx_feed[x["up"]] = b.numpy()
            mods[x["module"]].weight += b @ a
    got = session(os.path.join(d, "unet", "model.onnx")).run(None, onnx_feed)[0]
    ref = unet_torch(unet, feed, kw)
    plain = unet_torch(pipe.unet, feed, kw)
    assert np.abs(ref - plain).max() > 1e-2  # the adapters do something
    _close(got, ref, 2e-4)


# ----------------------------------------------------------------------------- fused LoRA


def test_fused_lora_export(tmp_path):
    from spo_onnx.goldens import lora as lora_goldens

    src = os.path.join(FIX, "diffusers", "tiny-sd15")
    pipe = export.load_pipeline(src)
    layers, metas = lora_goldens.make_lora(pipe, 77, 4, 8, True)
    files = lora_goldens.write_lora_files(type(pipe), layers, metas, 8, False, str(tmp_path / "lora"))
    lora_file = str(tmp_path / "lora" / files["peft"])
    out = str(tmp_path / "onnx")
    export.export_pipeline(src, out, loras=[(lora_file, 0.7)], components=("unet", "text_encoder"))
    ref = export.load_pipeline(src)
    ref.load_lora_weights(lora_file, adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[0.7])
    ref.fuse_lora(components=["unet", "text_encoder"], adapter_names=["x"])
    ref.unload_lora_weights()
    base = export.load_pipeline(src)
    feed, kw = unet_inputs(ref, 2, 8, 8, seed=7, sdxl=False)
    got = session(os.path.join(out, "unet", "model.onnx")).run(None, {k: v.numpy() for k, v in feed.items()})[0]
    want = unet_torch(ref.unet, feed, kw)
    assert np.abs(want - unet_torch(base.unet, feed, kw)).max() > 1e-3
    _close(got, want)
    ids = ref.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    got = session(os.path.join(out, "text_encoder", "model.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        _close(got, ref.text_encoder(ids).last_hidden_state.numpy())


# ----------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_fixtures_reproducible(exported, name):
    """Rebuilding the diffusers fixture gives the committed weights, and the
    fresh export has the committed ONNX initializers."""
    from safetensors.torch import load_file

    built = fixtures.build(name)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mod = getattr(built, comp, None)
        if mod is None:
            continue
        dd = os.path.join(FIX, "diffusers", name, comp)
        f = [x for x in os.listdir(dd) if x.endswith(".safetensors")][0]
        saved = load_file(os.path.join(dd, f))
        sd = mod.state_dict()
        for k, v in saved.items():
            assert torch.equal(sd[k], v), (comp, k)
    _, d = exported[name]
    for comp in ("unet", "text_encoder", "vae_decoder"):
        a = onnx.load(os.path.join(d, comp, "model.onnx"))
        b = onnx.load(os.path.join(FIX, name, comp, "model.onnx"))
        ia = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
        ib = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
        assert ia.keys() == ib.keys()
        for k in ia:
            np.testing.assert_array_equal(ia[k], ib[k])


# ----------------------------------------------------------------------------- dynamo exporter


def test_dynamo_fixture():
    """The committed dynamo UNet (tests/fixtures/tiny-sd15-dynamo, from
    `spo_onnx.fixtures --only tiny-sd15-dynamo`; exporting it takes minutes, so
    the fixture is checked rather than re-exported): dynamic in batch and in
    both latent sides (nothing specialised to the trace shape), name-scope
    metadata kept for LoRA, and lora_targets.json matching the diffusers weights."""
    d = os.path.join(FIX, "tiny-sd15-dynamo", "unet")
    pipe = export.load_pipeline(os.path.join(FIX, "diffusers", "tiny-sd15"))
    s = session(os.path.join(d, "model.onnx"))
    for b, h, w in [(1, 8, 8), (2, 16, 8), (3, 8, 24)]:
        feed, kw = unet_inputs(pipe, b, h, w, sdxl=False)
        got = s.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        _close(got, unet_torch(pipe.unet, feed, kw))
    m = onnx.load(os.path.join(d, "model.onnx"), load_external_data=False)
    assert m.opset_import[0].version >= export.DYNAMO_MIN_OPSET
    keys = {p.key for n in m.graph.node for p in n.metadata_props}
    assert keys == {"pkg.torch.onnx.name_scopes"}
    with open(os.path.join(d, "lora_targets.json")) as f:
        t = json.load(f)
    assert t["missing"] == []
    params = dict(pipe.unet.named_parameters())
    inits = {i.name: i for i in m.graph.initializer}
    for e in t["modules"]:
        # found through the node's name scope, not by the fallback value hash
        assert e["node"], e["module"]
        arr = onnx.numpy_helper.to_array(inits[e["initializer"]], base_dir=d)
        w = params[e["module"] + ".weight"].detach().numpy()
        np.testing.assert_array_equal(arr, w.T if e["layout"] == "linear_in_out" else w)


def test_dynamic_shapes_for_varargs_forward():
    """dynamic_axes -> torch.export specs, one per input; a `forward(self, *a)`
    (the patched UNet) takes them as one tuple."""
    import types

    lin = torch.nn.Linear(2, 2)
    axes = {"x": {0: "batch"}, "y": {0: "batch", 1: "n"}}
    assert export._dynamic_shapes(lin, ["x"], axes) == ({0: torch.export.Dim.DYNAMIC},)
    lin.forward = types.MethodType(lambda self, *a: a[0], lin)
    got = export._dynamic_shapes(lin, ["x", "z", "y"], axes)
    D = torch.export.Dim.DYNAMIC
    assert got == (({0: D}, None, {0: D, 1: D}),)
    assert export._dynamic_shapes(lin, ["x"], None) is None
