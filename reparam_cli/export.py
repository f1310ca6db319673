"""Writing deploy models (atomically) and reading reparam's safetensors deploy files back.

Every writer goes through `atomic_output`: the file is written to a temporary name beside the
target and renamed into place only when complete, so a crash or a failed verification never
leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from .errors import CheckpointError, OutputError

FORMATS = ("safetensors", "torchscript")
SUFFIX = {"safetensors": ".safetensors", "torchscript": ".pt"}
META_PREFIX = "reparam."


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on any error delete it."""
    path = Path(path)
    if not path.parent.exists():
        raise OutputError(f"output folder does not exist: {path.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


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


def write_safetensors(path: str | Path, model: nn.Module, metadata: dict[str, object]) -> None:
    """Write the model's state dict and reparam's metadata (spec, version, checksums, figures)."""
    from safetensors.torch import save_file

    state = _contiguous_unshared(model.state_dict())
    meta = safetensors_bytes_metadata({"format": "pt", **metadata})
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def write_torchscript(path: str | Path, model: nn.Module, example: Tensor) -> None:
    """Trace the deploy model on `example` and save a self-contained TorchScript file."""
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript deprecation notices
        try:
            scripted = torch.jit.trace(model, example, check_trace=False)
        except Exception as exc:
            raise OutputError(f"TorchScript tracing failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        with atomic_output(path) as tmp:
            torch.jit.save(scripted, str(tmp))


def read_metadata(path: str | Path) -> dict[str, object]:
    """reparam's metadata from a safetensors deploy file (JSON values decoded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None
    meta: dict[str, object] = {}
    for k, v in raw.items():
        if not k.startswith(META_PREFIX):
            continue
        try:
            meta[k[len(META_PREFIX):]] = json.loads(v)
        except json.JSONDecodeError:
            meta[k[len(META_PREFIX):]] = v
    return meta


def load_deploy(path: str | Path, spec=None) -> nn.Module:
    """Rebuild a runnable deploy model from a reparam safetensors file.

    The spec stored in the file is used unless `spec` (a ModelSpec or a --spec reference) is given.
    The training model is built on the meta device and converted shape-only, then the file's
    tensors are assigned to the resulting skeleton.
    """
    from safetensors.torch import load_file

    from .checkpoint import load_into
    from .engine import reparameterize
    from .spec import ModelSpec, load_spec

    if isinstance(spec, str):
        spec = load_spec(spec)
    if spec is None:
        meta = read_metadata(path)
        if "spec" not in meta:
            raise CheckpointError(f"{path} carries no reparam spec metadata", hint="pass --spec to rebuild it")
        stored = meta["spec"]
        spec = ModelSpec.from_json(stored if isinstance(stored, str) else json.dumps(stored))
    from .pipeline import deploy_file_options

    skeleton, _ = reparameterize(spec.build(device="meta"), **deploy_file_options(path))
    return load_into(skeleton, load_file(str(path)), what="deploy file").eval()


def load_deployed_any(path: str | Path, spec=None) -> nn.Module:
    """A deploy model from a safetensors file written by reparam, or from a TorchScript file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"deploy file not found: {path}")
    if path.suffix == ".safetensors":
        return load_deploy(path, spec)
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a TorchScript file: {str(exc).splitlines()[0]}") from None
