"""Writing deploy models, atomically (reading them back lives in `deploy.py`).

Formats: `safetensors` (state dict + reparam metadata; rebuilt with the spec), `torchscript`
(traced, runs without reparam), `pt2` (`torch.export`, loadable with `torch.export.load`) and
`onnx` (exported with torch's dynamo exporter, run with onnxruntime). TorchScript, pt2 and ONNX
files get a dynamic batch dimension where the model allows it.

Every writer goes through `atomic_output` (`safeio.py`): the file is written unnamed (O_TMPFILE,
or a hidden temporary) beside the target and given its name only when complete, so a crash, a
signal, SIGKILL or a failed verification never leaves a half-written output; without `overwrite`
an existing output is never replaced, not even by a concurrent run. Writers take a `check` callback
that runs on the finished temporary file before it is published (the pipeline loads the file back
with its runtime there and compares it with the deploy model; raising aborts the write). torch's
TorchScript and pt2 writers write through a `GuardedWriter`, so a full disk is one OutputError
rather than a C++ abort.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .errors import OutputError
from .metadata import META_PREFIX
from .safeio import atomic_output, guarded_writer  # noqa: F401  (atomic_output: part of this module's API)

FORMATS = ("safetensors", "torchscript", "pt2", "onnx")
SUFFIX = {"safetensors": ".safetensors", "torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RUNTIME = {"torchscript": "torch.jit", "pt2": "torch.export", "onnx": "onnxruntime"}
Check = Callable[[Path], None]


def _contiguous_unshared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses views and tensors sharing memory: give each key its own contiguous tensor."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or not t.is_contiguous() or t.numel() != t.untyped_storage().nbytes() // max(t.element_size(), 1):
            t = t.contiguous().clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out


def safetensors_bytes_metadata(metadata: dict[str, object]) -> dict[str, str]:
    """safetensors metadata values must be strings: JSON-encode anything that is not."""
    return {
        (k if k == "format" else META_PREFIX + k): v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for k, v in metadata.items()
    }


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _serialize_safetensors(f, state: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (an 8-byte little-endian header length, a JSON header, then the raw
    bytes), written with sorted tensor names and metadata keys so equal inputs give equal bytes.
    (safetensors' own writer orders the metadata differently in every process.)"""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    names = sorted(state)
    offset = 0
    for name in names:
        t = state[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise OutputError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name in names:
        t = state[name].detach().cpu().contiguous()
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(path: str | Path, model: nn.Module, metadata: dict[str, object],
                      check: Check | None = None, *, overwrite: bool = False) -> None:
    """Write the model's state dict and reparam's metadata (spec, version, checksums, figures)."""
    write_state_safetensors(path, model.state_dict(), metadata, check, overwrite=overwrite)


def write_state_safetensors(path: str | Path, state: dict[str, Tensor], metadata: dict[str, object] | None = None,
                            check: Check | None = None, *, overwrite: bool = False) -> None:
    """Write a state dict (and reparam metadata, if any) as safetensors, atomically and reproducibly."""
    state = _contiguous_unshared(state)
    meta = safetensors_bytes_metadata({"format": "pt", **(metadata or {})})
    with atomic_output(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            _serialize_safetensors(f, state, meta)
        if check is not None:
            check(tmp)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def write_torchscript(path: str | Path, model: nn.Module, example: Tensor, check: Check | None = None, *,
                      overwrite: bool = False) -> None:
    """Trace the deploy model on `example` and save a self-contained TorchScript file."""
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices
        try:
            scripted = torch.jit.trace(model, example, check_trace=False)
        except Exception as exc:
            raise OutputError(f"TorchScript tracing failed: {_first_line(exc)}") from None
        with atomic_output(path, overwrite) as tmp:
            with guarded_writer(tmp) as f:
                torch.jit.save(scripted, f)
            if check is not None:
                check(tmp)


def _batched(example: Tensor) -> Tensor:
    """Export with a batch of at least 2: torch.export specialises a size-1 dimension to a constant."""
    return example if example.shape[0] > 1 else example.expand(2, *example.shape[1:]).contiguous()


def _export_program(model: nn.Module, example: Tensor):
    """torch.export the model with a dynamic batch dimension, or a static one if the model needs it."""
    batched = _batched(example)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        return torch.export.export(model, (batched,), dynamic_shapes=({0: batch},)), batched, True
    except Exception:  # e.g. a reshape with a hard-coded batch size: fall back to the example's shape
        pass
    try:
        return torch.export.export(model, (example,)), example, False
    except Exception as exc:
        raise OutputError(f"torch.export failed: {_first_line(exc)}") from None


def write_pt2(path: str | Path, model: nn.Module, example: Tensor, check: Check | None = None, *,
              overwrite: bool = False) -> None:
    """Export the deploy model with torch.export and save it (load with `torch.export.load(path).module()`)."""
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program, _, _ = _export_program(model, example)
        with atomic_output(path, overwrite) as tmp:
            with guarded_writer(tmp) as f:
                torch.export.save(program, f)
            if check is not None:
                with _quiet_pt2_logger():  # the temporary's name does not end in .pt2: torch logs a warning
                    check(tmp)


@contextlib.contextmanager
def _quiet_pt2_logger() -> Iterator[None]:
    logger = logging.getLogger("torch.export.pt2_archive._package")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise OutputError(f"ONNX export needs the onnx extra ({exc.name} is not installed)",
                          hint="pip install 'reparam-cli[onnx]'") from None


def write_onnx(path: str | Path, model: nn.Module, example: Tensor, check: Check | None = None, *,
               overwrite: bool = False) -> None:
    """Export the deploy model to a single self-contained ONNX file (input `input`, output `output`)."""
    _require_onnx()
    model = model.eval()
    batched = _batched(example)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), torch.no_grad(), atomic_output(path, overwrite) as tmp:
        warnings.simplefilter("ignore")
        for shapes, x in ((({0: batch},), batched), (None, example)):  # dynamic batch, else static
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # keep stdout clean for --json
                    torch.onnx.export(model, (x,), str(tmp), dynamo=True, external_data=False,
                                      input_names=["input"], output_names=["output"], dynamic_shapes=shapes,
                                      verbose=False)
                break
            except Exception as exc:
                error = exc
        else:
            raise OutputError(f"ONNX export failed: {_first_line(error)}") from None
        if check is not None:
            check(tmp)
