"""Reading checkpoints into a flat state dict, safely, and loading them into a model.

Formats: torch files (`.pth`, `.pt`, `.bin`, PyTorch Lightning `.ckpt`, any other name) and
`.safetensors`. Torch pickles are loaded with `weights_only=True`; where that refuses a global (a
config object, optimizer state of custom classes, a whole pickled `nn.Module`), the file is read
again with a restricted unpickler that turns every foreign object into an inert placeholder and
runs no code (`unpickle.py`): the tensors are used, the placeholders are named in a note. Full
unpickling (which can run arbitrary code) happens only when the caller trusts the file
(`--trust-pickle`). TorchScript, `torch.export` (.pt2) and ONNX files are recognised and refused as
deploy files. Only regular files are read: FIFOs, devices and huge sparse files are refused before
anything reads them whole (`safeio.check_input_file`).

Unwrapping (`extract_state_dict`):

* wrappers `state_dict`, `model`, `model_state_dict` (the training weights) and `state_dict_ema`,
  `model_ema`, `ema` (EMA weights) are unwrapped, nested ones too; a pickled `nn.Module` (only
  with `--trust-pickle`) gives its state dict. With `ema=True` the EMA weights are used; without,
  the training weights, and an EMA-only checkpoint is used with a note;
* prefixes: `module.` (DataParallel / DDP, timm's EMA) and `_orig_mod.` (torch.compile) are removed
  when every key has them; with the model's expected keys known, any leading component (Lightning's
  `model.`, or `net.`, ...) is removed when that makes more keys fit, keeping only the keys under it;
* mixed floating dtypes are unified to the checkpoint's dominant one (by element count).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from reparam_cli.errors import CheckpointError
from reparam_cli.io.safeio import check_input_file
from reparam_cli.io.safetensors import read_tensors
from reparam_cli.io.sniff import checkpoint_kind, looks_like_safetensors, sniff_deploy_format
from reparam_cli.io.unpickle import (Placeholder, SAFE_GLOBALS, is_module_placeholder, module_state_dict,
                                     placeholders, restricted_load)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
STRIP_PREFIXES = ("module.", "_orig_mod.")


class AlreadyDeployed(CheckpointError):
    """The input is already a deploy file / deploy-form checkpoint: there is nothing to convert."""


@dataclass
class Checkpoint:
    """A checkpoint read and unwrapped: tensors, their dtype, and what was done to get them."""

    state: dict[str, Tensor]
    dtype: torch.dtype
    wrappers: list[str] = field(default_factory=list)
    prefix: str = ""
    notes: list[str] = field(default_factory=list)
    rebuild_spec: Any = None  # --spec checkpoint: a ModelSpec that rebuilds the pickled model, if one is known


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_checkpoint_file(path: str | Path) -> None:
    """The quick checks before anything reads a checkpoint whole (hashing included): a regular,
    non-sparse file (`safeio.check_input_file`) whose first bytes are those of a safetensors file or
    a torch checkpoint. (.onnx files pass: `read_raw` says they are deploy files.)"""
    path = Path(path)
    check_input_file(path)
    if path.suffix == ".onnx" or path.name.endswith(".index.json"):  # a sharded model's index: read_raw checks it
        return
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if checkpoint_kind(head) is None:
        raise CheckpointError(f"cannot read {path}: " + ("the file is empty" if not head else
                              "it is neither a safetensors file nor a torch checkpoint (by its first bytes)"))


# What a Hugging Face `save_pretrained` / `Trainer` folder (checkpoint-N/) holds its weights in, preferred first.
FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")


def weights_in_folder(path: str | Path) -> Path:
    """`path` itself for a file; for a save_pretrained or Trainer `checkpoint-N/` folder, the file holding
    its weights (FOLDER_WEIGHTS: one safetensors file, a sharded model's index, or pytorch_model.bin)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in FOLDER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    runs = sorted((p for p in path.glob("checkpoint-*") if p.is_dir()),
                  key=lambda p: int(p.name.rpartition("-")[2]) if p.name.rpartition("-")[2].isdigit() else -1)
    hint = (f"a Trainer output folder: pass one of its checkpoints, e.g. {runs[-1]}" if runs else
            f"a model folder holds {' or '.join(FOLDER_WEIGHTS[::2])} (what save_pretrained writes)")
    raise CheckpointError(f"checkpoint {path} is a folder without model weights", hint=hint)


def _read_sharded(index: Path, trust_pickle: bool, mmap: bool) -> dict:
    """A sharded model (`model.safetensors.index.json` + `model-0000x-of-0000y.safetensors`, or the
    pytorch_model.bin equivalent): every shard the index's `weight_map` names, merged."""
    import json

    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({str(f) for f in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read the shard index {index}: {exc}") from None
    merged: dict = {}
    for name in shards:
        shard = index.parent / name
        if Path(name).name != name:  # the index names files beside it, nothing else
            raise CheckpointError(f"the shard index {index} names {name!r}, not a file beside it")
        part = read_raw(shard, trust_pickle, mmap=mmap)
        part = _as_mapping(part)
        if not isinstance(part, Mapping):
            raise CheckpointError(f"shard {shard} holds no state dict")
        merged.update(part)
    missing = set(weight_map) - set(merged)
    if missing:
        raise CheckpointError(f"the shards of {index} lack {len(missing)} tensors the index names (e.g. {min(missing)})")
    return merged


def read_raw(path: str | Path, trust_pickle: bool = False, *, mmap: bool = False) -> Any:
    """The object stored in a checkpoint file: a dict of tensors for safetensors, any pickle for torch files.
    A model folder (save_pretrained, a Trainer checkpoint-N/) is read from its weights file(s)
    (`weights_in_folder`; shards merged).

    `mmap` maps a torch zip file's tensors instead of reading them (for shape-only work like inspect)."""
    path = weights_in_folder(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path, trust_pickle, mmap)
    check_input_file(path)
    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        return read_tensors(path)
    deploy_format = sniff_deploy_format(path)
    if deploy_format:
        article = {"onnx": "an ONNX", "pt2": "a torch.export (.pt2)", "torchscript": "a TorchScript"}[deploy_format]
        raise AlreadyDeployed(f"{path} is {article} deploy file, not a training checkpoint",
                              hint="convert the training checkpoint, or check this file with `reparam verify`")
    if mmap and not trust_pickle:
        # Shape-only reads: the restricted unpickler runs nothing either, and is C pickle (torch's
        # weights-only one is Python: 0.05 s for RepVGG-B3's 453 tensors). A file it cannot read
        # takes the usual path below, for the usual error.
        try:
            return restricted_load(path, mmap=True)
        except Exception:
            pass
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        message = str(exc)
        if not trust_pickle and "Weights only load failed" in message:
            try:  # foreign classes: read again, turning them into inert placeholders
                return restricted_load(path)
            except Exception:
                pass  # report what weights_only said
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if unsafe:
            raise CheckpointError(
                f"{path} needs arbitrary code to unpickle ({unsafe.group(1)}), so it was not loaded",
                hint="only if you trust its origin, pass --trust-pickle",
            ) from None
        if "Weights only load failed" in message:
            detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", message)
            raise CheckpointError(
                f"cannot read {path} as a torch checkpoint: {detail.group(1).strip() if detail else 'unsafe pickle'}",
                hint="not a torch file, or a pickle that safe loading cannot read: only if you trust its origin, "
                     "pass --trust-pickle",
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        text = detail.group(1).strip() if detail else (message.strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {text}") from None


def _as_mapping(obj: Any) -> Any:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    return module_state_dict(obj) if is_module_placeholder(obj) else obj


def _is_wrapper(value: Any) -> bool:
    return isinstance(value, (Mapping, nn.Module)) or is_module_placeholder(value)


_TRUST_HINT = "only if you trust its origin, pass --trust-pickle to unpickle it fully"


def _is_placeholder(obj: Any) -> bool:
    return isinstance(obj, Placeholder)


def _type_name(obj: Any) -> str:
    return obj.qualified_name() if isinstance(obj, Placeholder) else type(obj).__name__


def _placeholder_notes(obj: Any, notes: list[str]) -> None:
    """Name the objects of foreign classes that were read as inert placeholders (see unpickle.py)."""

    found = placeholders(obj)
    modules = [(where, name) for where, name in found if is_module_placeholder(_at(obj, where))]
    others = [(where, name) for where, name in found if (where, name) not in modules]
    if modules:
        notes.append("read the tensors of pickled module(s) without running their code: "
                     + ", ".join(f"{where} ({name})" for where, name in modules[:4]))
    if others:
        more = f" and {len(others) - 6} more" if len(others) > 6 else ""
        notes.append("skipped entries of classes not loaded (read as inert placeholders, no code run): "
                     + ", ".join(f"{where} ({name})" for where, name in others[:6]) + more)


def _at(obj: Any, where: str) -> Any:
    """The entry at a location `placeholders` reported (dotted keys, [i] indices); None if not found."""
    if where == "<root>":
        return obj
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", where):
        try:
            obj = obj[int(part[1:-1])] if part.startswith("[") else (
                obj[part] if part in obj else next(v for k, v in obj.items() if str(k) == part))
        except (KeyError, IndexError, TypeError, StopIteration, ValueError):
            return None
    return obj


def _unwrap(obj: Any, ema: bool, notes: list[str], source: str) -> tuple[Any, list[str]]:
    """Follow wrapper entries down to the state dict; returns it and the wrapper keys taken.

    With `ema`, an EMA wrapper is taken where there is one; a flat state dict reached without one
    keeps only the keys whose first component names an EMA copy (a Lightning module's `ema_model.`).
    """
    taken: list[str] = []
    obj = _as_mapping(obj)
    while isinstance(obj, Mapping):
        regular = [k for k in WRAPPER_KEYS if k in obj and _is_wrapper(obj[k])]
        emas = [k for k in EMA_KEYS if k in obj and _is_wrapper(obj[k])]
        if not regular and not emas:
            break
        if ema and emas:
            chosen = emas[0]
            notes.append(f"using the EMA weights ({chosen!r})")
            ema = False  # inside the EMA entry, unwrap plainly
        elif regular:
            chosen = regular[0]
            if emas:
                notes.append(f"using the training weights ({chosen!r}); the checkpoint also holds EMA weights "
                             f"({emas[0]!r}): pass --ema to use those")
        else:
            chosen = emas[0]
            notes.append(f"the checkpoint holds only EMA weights ({chosen!r}): using them")
        taken.append(chosen)
        obj = _as_mapping(obj[chosen])
    if ema and isinstance(obj, Mapping):
        ema_keys = {k: v for k, v in obj.items() if isinstance(k, str) and "ema" in k.split(".", 1)[0].lower()}
        if not ema_keys:
            raise CheckpointError(f"{source} holds no EMA weights (no {', '.join(EMA_KEYS)} entry)",
                                  hint="drop --ema to use its weights")
        prefixes = sorted({k.split(".", 1)[0] for k in ema_keys})
        notes.append(f"using the EMA weights (keys under {', '.join(prefixes)})")
        obj = ema_keys
    return obj, taken


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _fit_prefix(state: dict[str, Tensor], expected: set[str] | None, notes: list[str]) -> tuple[dict[str, Tensor], str]:
    """Remove key prefixes (see the module doc); returns the new state and the prefix removed."""
    removed = ""

    def score(s: Mapping[str, Tensor]) -> int:
        return len(expected & s.keys()) if expected is not None else 0

    for _ in range(8):  # e.g. module._orig_mod.model.
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state) and score(_strip(state, prefix)) >= score(state):
                state, removed, changed = _strip(state, prefix), removed + prefix, True
        if expected is not None and not expected <= state.keys():
            firsts = sorted({k.split(".", 1)[0] + "." for k in state if "." in k})
            # Ties between two prefixes (model. and ema_model. in a Lightning module): not the EMA copy.
            ranked = sorted(firsts, key=lambda p: (-score(_strip(state, p)), "ema" in p.lower()))
            if ranked and score(_strip(state, ranked[0])) > score(state):
                prefix = ranked[0]
                dropped = sorted(k for k in state if not k.startswith(prefix))
                if dropped:
                    more = f" and {len(dropped) - 3} more" if len(dropped) > 3 else ""
                    notes.append(f"used the keys under {prefix!r}; ignored {len(dropped)} others "
                                 f"({', '.join(dropped[:3])}{more})")
                state, removed, changed = _strip(state, prefix), removed + prefix, True
        if not changed:
            break
    return state, removed


def _unify_dtype(state: dict[str, Tensor], notes: list[str]) -> torch.dtype:
    """Cast floating tensors to the dominant floating dtype (by elements); returns that dtype."""
    counts: Counter[torch.dtype] = Counter()
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    if not counts:
        return torch.float32
    dtype = counts.most_common(1)[0][0]
    odd = [k for k, t in state.items() if t.is_floating_point() and t.dtype != dtype]
    if odd:
        notes.append(f"{len(odd)} tensors cast to the checkpoint's dtype {str(dtype).removeprefix('torch.')} "
                     f"(e.g. {odd[0]})")
        for k in odd:
            state[k] = state[k].to(dtype)
    return dtype


def extract_checkpoint(obj: Any, key: str | None = None, strip_prefix: str | None = None, *,
                       ema: bool = False, expected: Iterable[str] | None = None,
                       source: str = "checkpoint") -> Checkpoint:
    """Unwrap a checkpoint object into a flat {name: tensor} dict (see the module doc).

    `key` picks a wrapper explicitly (a spec's checkpoint.key); `strip_prefix` keeps and strips the
    keys under that prefix (a spec's checkpoint.strip_prefix); `expected` (the model's state-dict
    keys) guides the prefix removal.
    """
    notes: list[str] = []
    _placeholder_notes(obj, notes)
    obj = _as_mapping(obj)
    wrappers: list[str] = []
    if key:
        if not isinstance(obj, Mapping) or key not in obj:
            found = ", ".join(sorted(str(k) for k in obj)[:8]) if isinstance(obj, Mapping) else _type_name(obj)
            raise CheckpointError(f"{source} has no {key!r} entry (found: {found})")
        obj, wrappers = _as_mapping(obj[key]), [key]
    else:
        obj, wrappers = _unwrap(obj, ema, notes, source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {_type_name(obj)} object, not a state dict",
                              hint=_TRUST_HINT if _is_placeholder(obj) else None)
    metadata = getattr(obj, "_metadata", None)
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        foreign = [f"{k} ({_type_name(v)})" for k, v in obj.items() if _is_placeholder(v)]
        if foreign:  # what holds the weights was not loaded: only full unpickling can read it
            raise CheckpointError(f"{source} contains no tensors, only objects of classes that were not loaded "
                                  f"(no code was run): {', '.join(foreign[:4])}", hint=_TRUST_HINT)
        raise CheckpointError(f"{source} contains no tensors")
    removed = ""
    if strip_prefix and any(k.startswith(strip_prefix) for k in tensors):
        tensors, removed = _strip(tensors, strip_prefix), strip_prefix
    expected_set = set(expected) if expected is not None else None
    tensors, more = _fit_prefix(tensors, expected_set, notes)
    dtype = _unify_dtype(tensors, notes)
    return Checkpoint(with_metadata(tensors, metadata, removed + more), dtype, wrappers, removed + more, notes)


def with_metadata(state: dict[str, Tensor], metadata: Any, removed: str = "") -> dict[str, Tensor]:
    """`state` as an OrderedDict carrying a state dict's `_metadata` (module path -> {"version": N}),
    which `load_state_dict` hands to each module's `_load_from_state_dict`: layers that check their
    version (torchvision's MNASNet, BatchNorm's num_batches_tracked) load as they would from the
    original state dict. `removed` (a key prefix taken off the tensors) is taken off its paths too."""
    if not isinstance(metadata, Mapping):
        return state
    prefix = removed.rstrip(".")
    kept = OrderedDict()
    for path, value in metadata.items():
        if not isinstance(path, str) or not isinstance(value, Mapping):
            continue
        if prefix:
            if path != prefix and not path.startswith(prefix + "."):
                continue
            path = path[len(prefix) + 1:]
        kept[path] = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, (int, str))}
    out = OrderedDict(state)
    out._metadata = kept  # type: ignore[attr-defined]
    return out


def extract_state_dict(obj: Any, key: str | None = None, strip_prefix: str | None = None,
                       source: str = "checkpoint", *, ema: bool = False,
                       expected: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Unwrap a checkpoint object into a flat {name: tensor} dict (see `extract_checkpoint`)."""
    return extract_checkpoint(obj, key, strip_prefix, ema=ema, expected=expected, source=source).state


def read_checkpoint(path: str | Path, key: str | None = None, strip_prefix: str | None = None, *,
                    ema: bool = False, expected: Iterable[str] | None = None,
                    trust_pickle: bool = False) -> Checkpoint:
    """Read and unwrap a checkpoint file (see `read_raw` and `extract_checkpoint`)."""
    return extract_checkpoint(read_raw(path, trust_pickle), key, strip_prefix, ema=ema, expected=expected,
                              source=str(path))


def read_state_dict(path: str | Path, key: str | None = None, strip_prefix: str | None = None,
                    trust_pickle: bool = False, *, ema: bool = False) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat state dict (see `read_raw` and `extract_checkpoint`)."""
    return read_checkpoint(path, key, strip_prefix, ema=ema, trust_pickle=trust_pickle).state


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def fit_problems(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Why `state_dict` does not fit `model`: missing keys, unexpected keys, shape mismatches, integer
    tensors for float ones or the reverse ([] if it fits)."""
    expected = model.state_dict(keep_vars=True)
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    # BatchNorm's num_batches_tracked is bookkeeping; old checkpoints lack it, deploy forms drop it.
    missing = {k for k in missing if not k.endswith("num_batches_tracked")}
    mismatched = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    # A float parameter cannot take integer or boolean values (BN's integer counter may differ in width).
    wrong_kind = [
        f"{k} (checkpoint {str(state_dict[k].dtype).removeprefix('torch.')}, model "
        f"{str(expected[k].dtype).removeprefix('torch.')})"
        for k in sorted(set(expected) & set(state_dict))
        if expected[k].is_floating_point() != state_dict[k].is_floating_point()
        or expected[k].is_complex() != state_dict[k].is_complex()
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_names(mismatched, 3)}")
    if wrong_kind:
        problems.append(f"dtype mismatch: {_names(wrong_kind, 3)}")
    return problems


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], what: str = "checkpoint",
              hint: Callable[[], str | None] | None = None) -> nn.Module:
    """Load `state_dict` into `model` strictly, assigning the tensors (the model may live on `meta`).

    Missing keys, unexpected keys and shape mismatches raise a CheckpointError naming them, with
    `hint()` (say, which --spec would fit) or else a question about the spec as its hint.
    """
    problems = fit_problems(model, state_dict)
    if problems:
        raise CheckpointError(f"the {what} does not fit the model: " + "; ".join(problems),
                              hint=(hint and hint()) or "is this the right --spec for it?")
    expected = model.state_dict(keep_vars=True)
    state = with_metadata(dict(state_dict), getattr(state_dict, "_metadata", None))
    for k in expected:
        if k not in state:  # a missing num_batches_tracked
            state[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def find_module(obj: Any, ema: bool = False, source: str = "checkpoint") -> tuple[nn.Module, list[str], list[str]]:
    """The whole model pickled in a checkpoint (`--spec checkpoint`): the object itself, or the
    nn.Module under a wrapper key (`model`, `ema`, ...; ultralytics keeps `model` and `ema`, one of
    them None). Returns (module, wrapper keys taken, notes); the EMA copy is taken with `ema`."""
    taken: list[str] = []
    notes: list[str] = []
    while isinstance(obj, Mapping):
        regular = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))]
        emas = [k for k in EMA_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))]
        if not regular and not emas:
            break
        if ema and not emas:
            raise CheckpointError(f"{source} holds no EMA model (no {', '.join(EMA_KEYS)} entry)",
                                  hint="drop --ema to use its weights")
        if regular and emas and not ema:
            notes.append(f"using the training weights ({regular[0]!r}); the checkpoint also holds EMA weights "
                         f"({emas[0]!r}): pass --ema to use those")
        chosen = emas[0] if ema or not regular else regular[0]
        ema = False  # inside the chosen entry, unwrap plainly
        taken.append(chosen)
        obj = obj[chosen]
    if not isinstance(obj, nn.Module):
        found = ", ".join(sorted(str(k) for k in obj)[:8]) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{source} holds no pickled model (found: {found}), so it cannot serve as its own spec",
                              hint="pass --spec with the model's architecture")
    return obj, taken, notes
