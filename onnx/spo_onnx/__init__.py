"""spo-runtime export tooling: exporters, fixture and golden generators.

The package is not named `onnx` so that it never shadows the onnx library.
Run modules from the onnx/ folder: `PYTHONPATH=onnx python -m spo_onnx.<module>`."""
