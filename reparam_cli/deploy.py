"""Reading deploy files back: reparam's safetensors metadata, rebuilding a deploy model from a
safetensors file (`load_deploy`), and TorchScript / pt2 / ONNX files as callable modules, plus the
comparison of an exported file with the deploy model it was written from (`compare_exported`).

Writing lives in `export.py`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CheckpointError, OutputError
from .export import RUNTIME, _first_line
from .metadata import decode_metadata


def read_metadata(path: str | Path) -> dict[str, object]:
    """reparam's metadata from a safetensors deploy file (JSON values decoded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    return decode_metadata(raw)


def stored_spec(meta: dict[str, object]):
    """The ModelSpec a deploy file was converted with, from its decoded metadata (None if absent)."""
    from .spec import ModelSpec

    stored = meta.get("spec")
    if stored is None:
        return None
    return ModelSpec.from_json(stored if isinstance(stored, str) else json.dumps(stored))


def conversion_options(linear_as_conv: bool = False) -> dict:
    """Keyword options for `reparameterize` beyond the recipes, as stored in a deploy file when set."""
    return {"linear_as_conv": True} if linear_as_conv else {}


def deploy_file_options(path: str | Path) -> dict:
    """The conversion options a reparam safetensors deploy file was written with ({} if none)."""
    if Path(path).suffix != ".safetensors":
        return {}
    options = read_metadata(path).get("options")
    return conversion_options(isinstance(options, dict) and bool(options.get("linear_as_conv")))


def load_deploy(path: str | Path, spec=None) -> nn.Module:
    """Rebuild a runnable deploy model from a reparam safetensors file.

    The spec stored in the file is used unless `spec` (a ModelSpec or a --spec reference) is given.
    The training model is built on the meta device and converted shape-only, then the file's
    tensors are assigned to the resulting skeleton.
    """
    from safetensors.torch import load_file

    from .checkpoint import load_into
    from .engine import reparameterize
    from .spec import load_spec

    if isinstance(spec, str):
        spec = load_spec(spec)
    if spec is None:
        spec = stored_spec(read_metadata(path))
        if spec is None:
            raise CheckpointError(f"{path} carries no reparam spec metadata", hint="pass --spec to rebuild it")
    skeleton, _ = reparameterize(spec.build(device="meta"), **deploy_file_options(path))
    return load_into(skeleton, load_file(str(path)), what="deploy file").eval()


class OnnxModule(nn.Module):
    """An ONNX deploy file run by onnxruntime (CPU), callable like the deploy nn.Module.

    It holds no parameters; a zero-size buffer carries the model's input dtype (for tolerances),
    and `num_parameters` counts the floating initializers (the weights).
    """

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            from .extras import install_hint

            raise CheckpointError("reading ONNX files needs onnxruntime, which is not installed",
                                  hint=install_hint("onnx")) from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckpointError(f"cannot load {path} with onnxruntime: {_first_line(exc)}") from None
        self.input_name = self.session.get_inputs()[0].name
        onnx_type = self.session.get_inputs()[0].type
        dtype = {"tensor(float16)": torch.float16, "tensor(double)": torch.float64,
                 "tensor(bfloat16)": torch.bfloat16}.get(onnx_type, torch.float32)
        self.register_buffer("dtype_marker", torch.zeros(0, dtype=dtype), persistent=False)
        self.num_parameters = _onnx_weight_count(path)

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().to(self.dtype_marker.dtype).cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])


def _onnx_weight_count(path: str | Path) -> int:
    try:
        import onnx
        from onnx import TensorProto

        floating = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
        graph = onnx.load(str(path), load_external_data=False).graph
        total = 0
        for init in graph.initializer:
            if init.data_type in floating:
                n = 1
                for d in init.dims:
                    n *= d
                total += n
        return total
    except Exception:  # figures only: never fail verification over them
        return 0


class ExportedProgramModule(nn.Module):
    """A loaded torch.export program as a module; `eval()`/`train()` do nothing (the program was
    exported in eval mode, and its GraphModule refuses mode switches)."""

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.program = graph_module
        self.training = False

    def train(self, mode: bool = True) -> "ExportedProgramModule":
        return self

    def forward(self, x: Tensor):
        return self.program(x)


def deploy_format_of(path: str | Path) -> str:
    """The deploy format of a file, from its suffix (and its contents for .pt / .pt2)."""
    from .checkpoint import sniff_deploy_format

    path = Path(path)
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix == ".onnx":
        return "onnx"
    return sniff_deploy_format(path) or ("pt2" if path.suffix == ".pt2" else "torchscript")


def load_exported(path: str | Path, fmt: str) -> nn.Module:
    """A TorchScript, pt2 or ONNX deploy file as a callable module (in eval mode)."""
    path = Path(path)
    if fmt == "onnx":
        return OnnxModule(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            try:
                return ExportedProgramModule(torch.export.load(str(path)).module())
            except Exception as exc:
                raise CheckpointError(f"cannot read {path} as a torch.export (.pt2) file: {_first_line(exc)}") from None
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise CheckpointError(f"cannot read {path} as a TorchScript file: {_first_line(exc)}") from None


def load_deployed_any(path: str | Path, spec=None) -> nn.Module:
    """A deploy model from a safetensors file written by reparam, or a TorchScript, pt2 or ONNX file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"deploy file not found: {path}")
    fmt = deploy_format_of(path)
    if fmt == "safetensors":
        return load_deploy(path, spec)
    return load_exported(path, fmt)


def compare_exported(path: str | Path, fmt: str, deploy: nn.Module, x: Tensor,
                     rtol: float, atol: float) -> dict[str, object]:
    """Run an exported file with its own runtime on `x` and compare with the deploy module's output.

    Returns {"runtime", "max_abs_err", "max_rel_err", "ok"}: ok when max |exported - deploy| <=
    atol + rtol * max |deploy|.
    """
    from .verification import _first_tensor

    if fmt == "onnx" and x.dtype == torch.bfloat16:
        raise OutputError("onnxruntime cannot run bfloat16 convolutions on CPU, so the ONNX file cannot be verified",
                          hint="use --dtype float16 or float32, or --no-verify")
    exported = load_exported(path, fmt)
    with torch.no_grad():
        expected = _first_tensor(deploy.eval()(x)).detach().to(torch.float64)
        try:
            got = _first_tensor(exported(x)).detach().to(torch.float64)
        except Exception as exc:
            raise OutputError(f"the exported {fmt} file fails to run in {RUNTIME[fmt]}: {_first_line(exc)}") from None
    if got.shape != expected.shape:
        raise OutputError(f"the exported {fmt} file gives output shape {tuple(got.shape)}, "
                          f"the deploy model {tuple(expected.shape)}")
    abs_err = (got - expected).abs().max().item() if got.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return {"runtime": RUNTIME[fmt], "max_abs_err": abs_err, "max_rel_err": abs_err / scale if scale > 0 else abs_err,
            "ok": abs_err <= atol + rtol * scale}
