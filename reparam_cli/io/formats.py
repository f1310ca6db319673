"""The deploy formats reparam writes, by name (torch-free, so options are checked before torch loads):
their file suffixes (a folder for `hf`), the output dtypes by name, and the dynamic-shape modes of pt2/ONNX exports."""

from __future__ import annotations




FORMATS = ("safetensors", "torchscript", "pt2", "onnx")  # files (what `reparam batch` writes)
# hf: a transformers `save_pretrained` folder (config.json + model.safetensors), for transformers models
FOLDER_FORMATS = ("hf",)
ALL_FORMATS = FORMATS + FOLDER_FORMATS  # what `reparam convert -f` accepts
SUFFIX = {"safetensors": ".safetensors", "torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx", "hf": ""}
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DYNAMIC_SHAPES = ("auto", "batch", "none")
