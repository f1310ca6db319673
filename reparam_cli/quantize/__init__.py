"""int8 readiness of a fused model: analysis (weight SQNR, activation ranges, per-layer sensitivity,
keep-in-float list), exact cross-layer equalization, calibration inputs, and a verified int8 ONNX
model built with ONNX Runtime's static quantization. `reparam quantize` is `command.py`.

Nothing here imports torch at package import: the CLI imports `command` at start-up.
"""
