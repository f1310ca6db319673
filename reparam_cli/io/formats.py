"""The deploy formats reparam writes, by name (torch-free, so options are checked before torch loads):
their file suffixes (a folder for `hf`), the output dtypes by name, and the dynamic-shape modes of pt2/ONNX exports."""

from __future__ import annotations




# hf: a transformers `save_pretrained` folder (config.json + model.safetensors), for transformers models
FORMATS = ("safetensors", "torchscript", "pt2", "onnx", "hf")
SUFFIX = {"safetensors": ".safetensors", "torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx", "hf": ""}
FOLDER_FORMATS = ("hf",)  # written as a folder, not a file
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DYNAMIC_SHAPES = ("auto", "batch", "none")
