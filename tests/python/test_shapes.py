"""The shapes world and the committed model models/shapes-sdxl (issue 12).

    cd <repo> && PYTHONPATH=onnx python -m pytest -q tests/python/test_shapes.py

- the pixel judge reads rendered images exactly;
- it still reads them after the model's VAE (encoder + decoder, ONNX);
- the adherence preference model ranks correct captions above wrong ones;
- prompt adherence of the model generated through the Rust CLI
  (`target/release/spo`, built by `make build`) on 72 prompts at fixed seeds,
  seen and held-out pairs reported separately.
"""

import os
import sys

import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "onnx"))

from spo_onnx.export.preference import CLIP_MEAN, CLIP_STD  # noqa: E402
from spo_onnx.shapes import evaluate, world  # noqa: E402

ort = pytest.importorskip("onnxruntime")
MODEL = os.path.join(REPO, "models", "shapes-sdxl")
PREF = os.path.join(MODEL, "preference")
# the bars
COLOUR_BAR, SHAPE_BAR = 0.9, 0.8


def session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def renders(n, seed, pairs=None):
    rng = np.random.default_rng(seed)
    items = [world.sample(rng, pairs or world.all_pairs()) for _ in range(n)]
    return items, [world.render(*it, rng) for it in items]


def test_world_pairs():
    assert len(world.all_pairs()) == 56 and len(world.seen_pairs()) == 48
    assert all(f != b for f, b in world.HELD_OUT) and len({f for f, _ in world.HELD_OUT}) == 8
    assert world.caption("red", "circle", "blue") == "a red circle on a blue background"


def test_judge_on_renders():
    items, imgs = renders(336, 0)
    wrong = [(it, world.judge(im)) for it, im in zip(items, imgs) if world.judge(im) != it]
    assert not wrong, wrong[:5]


def test_judge_on_vae_reconstructions():
    enc = session(os.path.join(MODEL, "vae_encoder", "model.onnx"))
    dec = session(os.path.join(MODEL, "vae_decoder", "model.onnx"))
    items, imgs = renders(96, 1)
    x = np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    rec = []
    for i in range(0, len(x), 16):
        mean = enc.run(None, {"sample": x[i:i + 16]})[0][:, :4]
        rec.append(dec.run(None, {"latent_sample": mean})[0])
    rec = np.clip((np.concatenate(rec).transpose(0, 2, 3, 1) + 1) * 127.5, 0, 255)
    judged = [world.judge(r) for r in rec]
    acc = {k: np.mean([j[i] == it[i] for j, it in zip(judged, items)]) for i, k in enumerate(("fg", "shape", "bg"))}
    psnr = 10 * np.log10(255.0**2 / np.mean((rec - np.stack(imgs)) ** 2))
    print(f"VAE reconstructions: {acc}, PSNR {psnr:.1f} dB")
    assert acc["shape"] >= 0.95 and acc["fg"] >= 0.95 and acc["bg"] >= 0.95, acc


def clip_input(imgs):
    import torch

    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    return ((x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)).numpy()


def pref_scores(sess, imgs, captions):
    from spo_onnx.fixtures import tokenizer

    ids = tokenizer()(captions, padding="max_length", max_length=77, return_tensors="np").input_ids.astype(np.int64)
    return sess.run(["score"], {"image": clip_input(imgs), "timestep": np.zeros(len(imgs), np.int64), "input_ids": ids})[0]


def test_preference_folder_and_contract():
    assert os.path.realpath(os.path.join(PREF, "adherence.onnx")) == os.path.realpath(os.path.join(PREF, "model.onnx"))
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(PREF, "tokenizer", f)), f
    s = session(os.path.join(PREF, "adherence.onnx"))
    ins = {i.name: (i.type, i.shape) for i in s.get_inputs()}
    assert ins["image"][0] == "tensor(float)" and ins["image"][1][1:] == [3, 224, 224]
    assert ins["timestep"][0] == "tensor(int64)" and len(ins["timestep"][1]) == 1
    assert ins["input_ids"][0] == "tensor(int64)" and ins["input_ids"][1][1:] == [77]
    out = s.get_outputs()[0]
    assert out.name == "score" and out.type == "tensor(float)" and len(out.shape) == 1


def test_preference_orders_correct_above_wrong():
    s = session(os.path.join(PREF, "adherence.onnx"))
    items, imgs = renders(40, 2)
    batch, caps = [], []
    for (f, shape, b), im in zip(items, imgs):
        others = [c for c in world.COLOUR_NAMES if c not in (f, b)]
        for cap in (world.caption(f, shape, b), world.caption(b, shape, f), world.caption(others[0], shape, b),
                    world.caption(f, shape, others[1])):
            batch.append(im)
            caps.append(cap)
    sc = pref_scores(s, batch, caps).reshape(-1, 4)
    margin = sc[:, :1] - sc[:, 1:]
    print(f"adherence: correct {sc[:, 0].mean():.3f}, swapped {sc[:, 1].mean():.3f}, wrong fg {sc[:, 2].mean():.3f}, "
          f"wrong bg {sc[:, 3].mean():.3f}; smallest margin {margin.min():.3f}")
    assert (margin > 0).all(), margin.min()


def test_preference_is_smooth():
    """Moving the foreground colour part-way to a wrong one lowers the score
    part-way: the score is graded, not 0/1."""
    s = session(os.path.join(PREF, "adherence.onnx"))
    cov = world.coverage("circle", 30, 30, 64)[..., None]
    fg, wrong, bg = (np.array(world.COLOURS[c], np.float32) for c in ("red", "yellow", "blue"))
    imgs = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        col = (1 - t) * fg + t * wrong
        imgs.append(np.round(cov * col + (1 - cov) * bg).astype(np.uint8))
    sc = pref_scores(s, imgs, ["a red circle on a blue background"] * len(imgs))
    assert (np.diff(sc) < 0).all(), sc
    assert len(set(np.round(sc, 4))) == len(sc)


def test_cli_prompt_adherence(capsys):
    if not os.path.exists(evaluate.SPO):
        pytest.fail(f"{evaluate.SPO} is missing: run `make build` first")
    if not os.path.exists(evaluate.ORT_LIB) and "SPO_ORT_LIBRARY" not in os.environ:
        pytest.fail("ONNX Runtime is missing: run `make build` (it fetches third_party/onnxruntime)")
    res = evaluate.evaluate(MODEL)
    summary = evaluate.summarise(res)
    misses = [f"  {world.caption(f, s, b)} (seed {seed}) -> {j}" for f, s, b, seed, j in res if j != (f, s, b)]
    with capsys.disabled():
        print(f"\nshapes-sdxl through `spo generate` ({len(res)} prompts, DDIM 25 steps, CFG 5):")
        print(evaluate.table(summary))
    print("\n".join(misses))
    assert len(res) >= 64
    bad = {g: v for g, v in summary.items() if g != "all" and (v["fg"] < COLOUR_BAR or v["bg"] < COLOUR_BAR or v["shape"] < SHAPE_BAR)}
    assert not bad, f"below the bars (fg, bg >= {COLOUR_BAR}, shape >= {SHAPE_BAR}):\n{evaluate.table(summary)}"
