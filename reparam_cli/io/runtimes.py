"""Deploy files run by their own runtimes: TorchScript (torch.jit), pt2 (torch.export) and ONNX
(onnxruntime), each loaded as a callable module in eval mode (`load_exported`)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from reparam_cli.core.messages import describe
from reparam_cli.errors import CheckpointError
from reparam_cli.extras import import_extra

RUNTIME = {"torchscript": "torch.jit", "pt2": "torch.export", "onnx": "onnxruntime"}


class OnnxModule(nn.Module):
    """An ONNX deploy file run by onnxruntime (CPU), callable like the deploy nn.Module.

    It holds no parameters; a zero-size buffer carries the model's input dtype (for tolerances),
    and `num_parameters` counts the floating initializers (the weights).
    """

    def __init__(self, path: str | Path):
        super().__init__()
        ort = import_extra("onnxruntime", "onnx", "reading ONNX files", CheckpointError)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckpointError(f"cannot load {path} with onnxruntime: {describe(exc)}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        onnx_type = self.session.get_inputs()[0].type
        dtype = {"tensor(float16)": torch.float16, "tensor(double)": torch.float64,
                 "tensor(bfloat16)": torch.bfloat16}.get(onnx_type, torch.float32)
        self.register_buffer("dtype_marker", torch.zeros(0, dtype=dtype), persistent=False)
        self.num_parameters = _onnx_weight_count(path)

    def forward(self, *xs: Tensor) -> Tensor:
        """The first output for positional tensor inputs (fed to the file's inputs in order)."""
        feed = {name: (x.detach().to(self.dtype_marker.dtype) if x.is_floating_point() else x).cpu().contiguous().numpy()
                for name, x in zip(self.input_names, xs)}
        return torch.from_numpy(self.session.run(None, feed)[0])


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

    def forward(self, *args: Tensor):
        return self.program(*args)


def load_exported(path: str | Path, fmt: str) -> nn.Module:
    """A TorchScript, pt2 or ONNX deploy file as a callable module (in eval mode)."""
    path = Path(path)
    if fmt == "onnx":
        return OnnxModule(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pt2":
            logged: list[str] = []
            try:
                with _torch_logs_kept(logged):  # torch logs a whole traceback before raising
                    return ExportedProgramModule(torch.export.load(str(path)).module())
            except Exception as exc:
                detail = _last_logged_error(logged) or describe(exc)
                raise CheckpointError(f"cannot read {path} as a torch.export (.pt2) file: {detail}") from None
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise CheckpointError(f"cannot read {path} as a TorchScript file: {describe(exc)}") from None


@contextlib.contextmanager
def _torch_logs_kept(into: list[str], name: str = "torch.export"):
    """Collect what torch's `name` logger says meanwhile into `into` instead of printing it."""
    import logging

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            into.append(record.getMessage() + ("\n" + self.formatException(record.exc_info) if record.exc_info else ""))

        def formatException(self, exc_info) -> str:
            return logging.Formatter().formatException(exc_info)

    logger = logging.getLogger(name)
    handlers, propagate = logger.handlers, logger.propagate  # torch attaches its own handlers here
    logger.handlers, logger.propagate = [Keep()], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _last_logged_error(logged: list[str]) -> str:
    """The exception line that ends a logged traceback, first sentence only ('' if none)."""
    lines = [line.strip() for text in logged for line in text.splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if "Error" in line.split(":")[0]), "")
    return last.split(". ")[0]


