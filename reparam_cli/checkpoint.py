"""Reading checkpoints into a flat state dict, safely, and loading them into a model.

Torch pickles are loaded with `weights_only=True`: a file that would need arbitrary code to
unpickle is refused unless the caller explicitly trusts it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .errors import CheckpointError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model")
STRIP_PREFIXES = ("module.",)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_raw(path: str | Path, trust_pickle: bool = False) -> Any:
    """The object stored in a checkpoint file: a dict of tensors for safetensors, any pickle for torch files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint is a directory, not a file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=False)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        message = str(exc)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if unsafe:
            raise CheckpointError(
                f"{path} needs arbitrary code to unpickle ({unsafe.group(1)}), so it was not loaded",
                hint="only if you trust its origin, pass --trust-pickle",
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        text = detail.group(1).strip() if detail else (message.strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {text}") from None


def extract_state_dict(obj: Any, key: str | None = None, strip_prefix: str | None = None,
                       source: str = "checkpoint") -> dict[str, Tensor]:
    """Unwrap a checkpoint object into a flat {name: tensor} dict.

    `key` picks a wrapper explicitly; otherwise a `state_dict` or `model` wrapper is unwrapped when
    present. `strip_prefix` (and the usual `module.` from DataParallel) is removed from every key.
    """
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if key:
        if not isinstance(obj, Mapping) or key not in obj:
            found = ", ".join(sorted(str(k) for k in obj)[:8]) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{source} has no {key!r} entry (found: {found})")
        obj = obj[key]
    else:
        for wrapper in WRAPPER_KEYS:
            while isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], (Mapping, nn.Module)):
                obj = obj[wrapper]
                if isinstance(obj, nn.Module):
                    obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} contains no tensors")
    for prefix in ([strip_prefix] if strip_prefix else []) + list(STRIP_PREFIXES):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: str | Path, key: str | None = None, strip_prefix: str | None = None,
                    trust_pickle: bool = False) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat state dict (see `read_raw` and `extract_state_dict`)."""
    return extract_state_dict(read_raw(path, trust_pickle), key, strip_prefix, source=str(path))


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], what: str = "checkpoint") -> nn.Module:
    """Load `state_dict` into `model` strictly, assigning the tensors (the model may live on `meta`).

    Missing keys, unexpected keys and shape mismatches raise a CheckpointError naming them.
    """
    expected = model.state_dict(keep_vars=True)
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    # BatchNorm's num_batches_tracked is bookkeeping; old checkpoints lack it.
    missing = {k for k in missing if not k.endswith("num_batches_tracked")}
    mismatched = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_names(mismatched, 3)}")
    if problems:
        raise CheckpointError(f"the {what} does not fit the model: " + "; ".join(problems),
                              hint="is this the right --spec for it?")
    state = dict(state_dict)
    for k in expected:
        if k not in state:  # a missing num_batches_tracked
            state[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state, strict=True, assign=True)
    return model
