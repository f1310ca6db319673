"""int8 readiness of a fused model: analysis (weight SQNR, activation ranges, per-layer sensitivity,
keep-in-float list, `analysis.py`), exact cross-layer equalization (`equalize.py`, composing
`core.algebra.equalize_pair`), calibration inputs (`calibration.py`) and a verified int8 ONNX model
built with ONNX Runtime's static quantization (`onnx_int8.py`).

`reparam quantize` is `commands/quantize.py`; the file-to-report flow is `pipeline/quantization.py`.
"""
