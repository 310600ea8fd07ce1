"""The toy world of SPO: `spo train --preset toy` on the shapes model with its
size preference model, then `spo generate --lora` with the saved webui LoRA
on captions and seeds that training never saw. The preference score must
rise by more than 3 standard errors of the paired difference (see
onnx/spo_onnx/shapes/toy_world.py; about 7 minutes on 2 cores)."""

from spo_onnx.shapes import toy_world


def test_spo_raises_the_preference_on_held_out_prompts_and_seeds(tmp_path):
    mean, se, base, trained = toy_world.measure(tmp_path)
    assert len(base) == len(trained) == 24 * toy_world.IMAGES
    assert mean > 3 * se, f"gain {mean:.4f} +- {se:.4f} (n = {len(base)}): not above 3 standard errors"
