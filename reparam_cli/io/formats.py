"""The deploy formats reparam writes, by name (torch-free, so options are checked before torch loads):
their file suffixes, the output dtypes by name, and the dynamic-shape modes of pt2/ONNX exports."""

from __future__ import annotations




FORMATS = ("safetensors", "torchscript", "pt2", "onnx")
SUFFIX = {"safetensors": ".safetensors", "torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx"}
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DYNAMIC_SHAPES = ("auto", "batch", "none")
