"""The safetensors format, in one place: its dtype codes, writing a state dict with reparam's
metadata (reproducibly: sorted names and keys), reading tensors, reparam's metadata, and the
header alone (shapes and dtypes as meta tensors, for `inspect`).

Telling a safetensors file from others by its first bytes lives in `sniff.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from reparam_cli.errors import CheckpointError, OutputError
from reparam_cli.io.metadata import META_PREFIX, decode_metadata
from reparam_cli.io.safeio import atomic_output

Check = Callable[[Path], None]  # run on a finished temporary file before it is published; raising aborts

# The format's dtype codes and the torch dtype names they stand for.
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}
# What reparam writes (torch dtype -> code).
_CODES = {getattr(torch, name): code for code, name in DTYPE_NAMES.items()
          if code in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")}


def _torch_dtype(code: str) -> torch.dtype:
    return getattr(torch, DTYPE_NAMES.get(code, code.lower()))


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


def _serialize_safetensors(f, state: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (an 8-byte little-endian header length, a JSON header, then the raw
    bytes), written with sorted tensor names and metadata keys so equal inputs give equal bytes.
    (safetensors' own writer orders the metadata differently in every process.)"""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    names = sorted(state)
    offset = 0
    for name in names:
        t = state[name]
        if t.dtype not in _CODES:
            raise OutputError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
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
    """Write the model's state dict and reparam's metadata (spec, version, checksums, figures).

    No reference to the model's tensors is held here while `check` runs: a caller that drops the
    model's tensors in its check (once written) lets their memory go before the file is read back."""
    _write(path, model.state_dict, metadata, check, overwrite)


def write_state_safetensors(path: str | Path, state: dict[str, Tensor], metadata: dict[str, object] | None = None,
                            check: Check | None = None, *, overwrite: bool = False) -> None:
    """Write a state dict (and reparam metadata, if any) as safetensors, atomically and reproducibly."""
    _write(path, lambda: state, metadata, check, overwrite)


def _write(path: str | Path, tensors: Callable[[], dict[str, Tensor]], metadata: dict[str, object] | None,
           check: Check | None, overwrite: bool) -> None:
    meta = safetensors_bytes_metadata({"format": "pt", **(metadata or {})})
    with atomic_output(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            _serialize_safetensors(f, _contiguous_unshared(tensors()), meta)
        if check is not None:
            check(tmp)


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (one line for a file that is not valid safetensors)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None


def read_metadata(path: str | Path) -> dict[str, object]:
    """reparam's metadata from a safetensors deploy file (JSON values decoded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    return decode_metadata(raw)


def read_header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: meta tensor of the stored shape and dtype}, raw metadata) from the header alone."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None) or {}
        tensors = {
            name: torch.empty(info["shape"], device="meta",
                              dtype=_torch_dtype(info["dtype"]))
            for name, info in header.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: bad header ({type(exc).__name__})") from None
    return tensors, metadata
