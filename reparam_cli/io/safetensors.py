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


HEADER_MAX_BYTES = 100 << 20  # the format's own limit
JSON_MAX_DEPTH = 64  # nesting in a header (tensor entries are 3 deep; reparam's metadata values a few more)


def _json_depth(text: bytes | str, limit: int = JSON_MAX_DEPTH) -> bool:
    """Whether JSON text nests no deeper than `limit` (brackets outside strings), without recursion."""
    import re

    depth = 0
    for token in re.finditer(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]' if isinstance(text, bytes) else r'"(?:[^"\\]|\\.)*"|[\[\]{}]',
                             text):
        c = token.group()[:1]
        if c in (b"[", b"{", "[", "{"):
            depth += 1
            if depth > limit:
                return False
        elif c in (b"]", b"}", "]", "}"):
            depth -= 1
    return True


def load_json(text: bytes | str, what: str) -> object:
    """JSON from a file's header or metadata, nested at most JSON_MAX_DEPTH deep (CheckpointError otherwise)."""
    if not _json_depth(text):
        raise CheckpointError(f"{what}: its JSON nests deeper than {JSON_MAX_DEPTH} levels: not a file reparam reads")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{what}: bad JSON ({type(exc).__name__})") from None


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (one line for a file that is not valid safetensors).

    The file is read into memory (never memory-mapped: a file truncated while mapped would kill
    the process with SIGBUS) and each tensor is a view of that one buffer after the header is
    checked as the format requires (known dtypes, offsets inside the file, sizes matching shapes)."""
    import math

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path} as safetensors: {why}")

    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > HEADER_MAX_BYTES:
                raise bad("header size out of range")
            raw_header = f.read(size)
            if len(raw_header) != size:
                raise bad("file ends inside its header")
            header = load_json(raw_header, f"cannot read {path} as safetensors")
            if not isinstance(header, dict):
                raise bad("header is not a JSON object")
            header.pop("__metadata__", None)
            entries = []
            end_max = 0
            for name, info in header.items():
                if not isinstance(info, dict) or info.get("dtype") not in DTYPE_NAMES:
                    raise bad(f"tensor {name!r} has no known dtype")
                shape, offsets = info.get("shape"), info.get("data_offsets")
                if (not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape)
                        or not isinstance(offsets, list) or len(offsets) != 2
                        or not all(isinstance(n, int) for n in offsets) or not 0 <= offsets[0] <= offsets[1]):
                    raise bad(f"tensor {name!r} has a bad shape or offsets")
                dtype = _torch_dtype(info["dtype"])
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                if offsets[1] - offsets[0] != nbytes:
                    raise bad(f"tensor {name!r}: its offsets do not match its shape")
                entries.append((name, dtype, shape, offsets))
                end_max = max(end_max, offsets[1])
            data = bytearray(end_max)
            got = f.readinto(memoryview(data)) if end_max else 0
            if got != end_max:
                raise bad(f"file ends {end_max - got:,} bytes early (truncated?)")
    except CheckpointError:
        raise
    except (OSError, ValueError, OverflowError, MemoryError) as exc:
        raise bad(f"{type(exc).__name__}: {exc}") from None
    out: dict[str, Tensor] = {}
    for name, dtype, shape, (begin, end) in entries:
        if begin == end:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin)
        itemsize = raw.new_empty((), dtype=dtype).element_size()
        if begin % itemsize:
            raw = raw.clone()  # unaligned: a copy of its own
        out[name] = raw.view(dtype).view(shape)
    return out


def read_metadata(path: str | Path) -> dict[str, object]:
    """reparam's metadata from a safetensors deploy file (JSON values decoded), from its header alone
    (any file name: the library's own reader refuses names that are not UTF-8)."""
    _, raw = read_header(Path(path))
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise CheckpointError(f"cannot read {path} as safetensors: its metadata is not a mapping of strings")
    return decode_metadata(raw)


def read_header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: meta tensor of the stored shape and dtype}, raw metadata) from the header alone."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = load_json(f.read(size), f"cannot read {path} as safetensors")
        metadata = header.pop("__metadata__", None) or {}
        tensors = {
            name: torch.empty(info["shape"], device="meta",
                              dtype=_torch_dtype(info["dtype"]))
            for name, info in header.items()
        }
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, MemoryError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: bad header ({type(exc).__name__})") from None
    return tensors, metadata
