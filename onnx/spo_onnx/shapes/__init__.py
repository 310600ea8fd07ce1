"""The shapes world (issue 12): a synthetic text-to-image world in which a
tiny SDXL-architecture model is trained and prompt adherence is judged by a
pixel classifier.

- `world`: the renderer, captions, held-out pairs and the pixel judge;
- `train`: seeded VAE then UNet (and text encoder) training, diffusers output
  (`python -m spo_onnx.shapes.train --out DIR`);
- `adherence`: the prompt-adherence preference model (ONNX) for the SPO trainer;
- `grid`: the README's grid image, generated through the `spo` CLI.
"""
