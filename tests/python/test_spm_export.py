"""The SPM exporter (spo_onnx/export/spm.py) on a tiny random SPM: ONNX Runtime
matches PyTorch, the timestep path is live, the identity initialisation is
plain CLIP (through transformers' own feature functions), loading is strict,
and the folder meets the preference-model contract."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from spo_onnx.export import spm

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "fixtures", "tiny-sdxl", "tokenizer")
PROMPTS = ["a red circle on a blue background", "a photo of a cat", "", "an orange or a purple thing"]
TIMESTEPS = [0, 999, 1, 500]
# ONNX Runtime vs PyTorch, relative to the largest |score| (at least 1).
RTOL = 1e-4


def ids(n):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    p = (PROMPTS * 2)[:n]
    return torch.tensor(tok(p, padding="max_length", max_length=77, truncation=True).input_ids)


def images(n, seed=0):
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    spm.main(["--tiny-random", "--seed", "0", "--tokenizer", TOKENIZER, "--out", str(out)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    return out, sess, spm.tiny_random(0)  # the same seed rebuilds the exported weights


def run(sess, x, t, i):
    return sess.run(["score"], {"image": x.numpy(), "timestep": np.asarray(t, dtype=np.int64), "input_ids": i.numpy()})[0]


def torch_score(model, x, t, i):
    with torch.no_grad():
        return model(x, torch.tensor(t), i).numpy()


def test_onnx_matches_torch_and_timestep_is_live(exported):
    _, sess, model = exported
    x, i = images(4), ids(4)
    ref = torch_score(model, x, TIMESTEPS, i)
    got = run(sess, x, TIMESTEPS, i)
    assert got.shape == (4,) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= RTOL * max(1.0, np.abs(ref).max()), (got, ref)
    # Same image and prompt at every timestep: the adaLN path moves the score.
    x1, i1 = x[:1].repeat(4, 1, 1, 1), i[:1].repeat(4, 1)
    per_t = run(sess, x1, TIMESTEPS, i1)
    assert np.abs(per_t - torch_score(model, x1, TIMESTEPS, i1)).max() <= RTOL * max(1.0, np.abs(per_t).max())
    assert np.ptp(per_t) > 0.1 * max(1.0, np.abs(per_t).max()), per_t


def test_contract_and_dynamic_batch(exported):
    out, sess, model = exported
    m = onnx.load(str(out / "model.onnx"))
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64

    def sig(vi):
        t = vi.type.tensor_type
        return t.elem_type, [d.dim_value or d.dim_param for d in t.shape.dim]

    assert {v.name: sig(v) for v in m.graph.input} == {
        "image": (f32, ["batch", 3, 224, 224]), "timestep": (i64, ["batch"]), "input_ids": (i64, ["batch", 77])}
    assert [(v.name, sig(v)) for v in m.graph.output] == [("score", (f32, ["batch"]))]
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert os.path.isfile(out / "tokenizer" / f)
    with open(out / "preference.json") as f:
        info = json.load(f)
    assert info["kind"] == "spm" and info["format"] == 1 and info["source"] == "tiny-random"
    for b in (1, 3):
        x, i, t = images(b, seed=b), ids(b), TIMESTEPS[:b]
        ref = torch_score(model, x, t, i)
        got = run(sess, x, t, i)
        assert got.shape == (b,)
        assert np.abs(got - ref).max() <= RTOL * max(1.0, np.abs(ref).max())


def test_identity_init_is_plain_clip():
    """With adaLN weights 0, shift/scale biases 0 and gate biases 1, the SPM is
    the CLIP model it wraps, at every timestep."""
    from transformers import CLIPModel

    model = spm.tiny_random(1, official_init=True)
    clip = CLIPModel(model.model.config).eval()
    extra = ("t_embedder", "adaLN_modulation")
    clip.load_state_dict({k: v for k, v in model.model.state_dict().items() if not any(e in k for e in extra)})
    x, i = images(4, seed=5), ids(4)
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=x).pooler_output
        txt = clip.get_text_features(input_ids=i).pooler_output
        ref = clip.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    got = torch_score(model, x, TIMESTEPS, i)
    assert np.abs(got - ref.numpy()).max() <= 1e-5 * max(1.0, ref.abs().max().item()), (got, ref)


def test_checkpoint_loading_is_strict(tmp_path):
    model = spm.tiny_random(0)
    sd = {f"model.{k}": v for k, v in model.model.state_dict().items()}
    # The published layout (prefixed) loads, so do bare keys; either gives the same model.
    x, i = images(2, seed=7), ids(2)
    for state in (sd, model.model.state_dict()):
        fresh = spm.StepAwarePreferenceModel(model.model.config).load_checkpoint(state)
        np.testing.assert_array_equal(torch_score(fresh, x, [3, 700], i), torch_score(model, x, [3, 700], i))
    bad = dict(sd)
    bad["model.vision_model.final_adaLN.1.weight"] = bad.pop("model.vision_model.adaLN_modulation.1.weight")
    with pytest.raises(ValueError) as e:
        spm.StepAwarePreferenceModel(model.model.config).load_checkpoint(bad)
    assert "vision_model.adaLN_modulation.1.weight" in str(e.value) and "vision_model.final_adaLN.1.weight" in str(e.value)


def test_checkpoint_export_cli(tmp_path, exported):
    """The real-checkpoint path (local config + state dict file) gives the same graph numbers."""
    _, sess, model = exported
    model.model.config.to_json_file(str(tmp_path / "config.json"))
    torch.save({f"model.{k}": v for k, v in model.model.state_dict().items()}, tmp_path / "spm.bin")
    out = tmp_path / "out"
    spm.main(["--clip-config", str(tmp_path), "--checkpoint", str(tmp_path / "spm.bin"),
              "--tokenizer", TOKENIZER, "--out", str(out)])
    sess2 = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x, i = images(2, seed=9), ids(2)
    np.testing.assert_array_equal(run(sess2, x, [0, 999], i), run(sess, x, [0, 999], i))
