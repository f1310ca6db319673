"""Reading torch checkpoints that hold objects of foreign classes, without running any code.

Trainers store more than tensors beside the weights: a config object (a yacs `CfgNode`), optimizer
state with custom classes, mmengine's `MessageHub`, numpy scalars, or a whole pickled `nn.Module`
(ultralytics `best.pt`). `torch.load(weights_only=True)` refuses such a file at the first global it
does not allow. `restricted_load` reads it with torch's own loader (tensor storages, zip or legacy
format) and a pickle module whose `find_class` returns only the globals torch's weights-only loader
allows (tensor and parameter rebuilds, dtypes, `OrderedDict`, ...) and, for every other global, an
inert `Placeholder` subclass named after it. Unpickling calls only these: a placeholder records the
arguments, state, items and list entries the pickle gives it and runs nothing, so a `__reduce__`
payload (say `os.system`) becomes a placeholder named `os.system` holding its argument.

    restricted_load(path)          the checkpoint, with placeholders for foreign objects
    placeholders(obj)              [(where, "module.Class")] of the placeholders in a loaded object
    is_module_placeholder(obj)     a pickled nn.Module (its state has _parameters/_buffers/_modules)
    module_state_dict(obj)         that module's flat state dict, as `nn.Module.state_dict()` gives it
"""

from __future__ import annotations

import _compat_pickle
import argparse
import pickle
import types
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reparam_cli.errors import CheckpointError


class Placeholder:
    """An object of a class that was not loaded. `_pickled` holds what the pickle gave it:
    constructor `args`/`kwargs`, `state` (`__setstate__` / BUILD), `items` (dict entries) and `list`."""

    _module = "?"
    _name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        obj = object.__new__(cls)
        object.__setattr__(obj, "_pickled", {"args": args, "kwargs": kwargs, "state": None, "items": {}, "list": []})
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the arguments are recorded by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self._pickled["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._pickled["items"][key] = value

    def append(self, item: Any) -> None:
        self._pickled["list"].append(item)

    def extend(self, items: Any) -> None:
        self._pickled["list"].extend(items)

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls._module}.{cls._name}"

    def __repr__(self) -> str:
        return f"<{self.qualified_name()} (not loaded)>"


@lru_cache(maxsize=None)
def placeholder_class(module: str, name: str) -> type[Placeholder]:
    """The placeholder class standing for the global `module.name` (one per name)."""
    return type(name.rsplit(".", 1)[-1] or "Placeholder", (Placeholder,),
                {"_module": module, "_name": name, "__module__": "reparam_cli.unpickle.not_loaded"})


def _allowed_globals() -> dict[str, Any]:
    """The globals torch's weights-only loader allows (by default and registered), plus reparam's."""
    from torch import _weights_only_unpickler as wo


    allowed = dict(wo._get_allowed_globals())
    allowed.update(wo._get_user_allowed_globals())
    allowed.update({f"{g.__module__}.{g.__qualname__}": g for g in SAFE_GLOBALS})
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """pickle's Unpickler whose globals are torch's allowed ones or inert placeholders."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2, torch's default, writes `__builtin__.set`), mapped as pickle's own
        # find_class maps them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        allowed = _allowed_globals().get(f"{module}.{name}")
        return allowed if allowed is not None else placeholder_class(module, name)


def _load(file, **kwargs) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load takes as `pickle_module`: it subclasses `Unpickler` (adding the storage loader) and
# calls `load` for the legacy format's header records.
restricted_pickle = types.ModuleType("reparam_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _load  # type: ignore[attr-defined]
restricted_pickle.__version__ = getattr(pickle, "format_version", "4.0")  # type: ignore[attr-defined]


def restricted_load(path: str | Path, *, mmap: bool = False) -> Any:
    """The object in a torch checkpoint, foreign objects replaced by placeholders (see the module doc).
    `mmap` maps a zip file's tensors instead of reading them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy files: "couldn't retrieve source code for container ..."
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle, mmap=mmap)


WALK_BUDGET = 1_000_000  # containers and values a walk of a loaded checkpoint looks at, at most


def placeholders(obj: Any, where: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(location, "module.Class") of each placeholder in `obj`, searching dicts, lists and tuples
    (not inside placeholders, not deeper than 6 levels). A location is a dotted key path (the first
    one found: every object is visited once, so shared references cost nothing; a walk of more than
    WALK_BUDGET objects raises CheckpointError)."""
    found: list[tuple[str, str]] = []
    seen: set[int] = set()
    stack = [(obj, where, depth)]
    visited = 0
    while stack:
        value, path, level = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        visited += 1
        if visited > WALK_BUDGET:
            raise CheckpointError(f"the checkpoint's pickle holds more than {WALK_BUDGET:,} objects outside its "
                                  "tensors: not a checkpoint reparam reads")
        if isinstance(value, Placeholder):
            found.append((path or "<root>", value.qualified_name()))
            continue
        if level >= 6:
            continue
        if isinstance(value, Mapping):
            children = [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            continue
        stack.extend((v, p, level + 1) for v, p in reversed(children))
    return found


def _module_state(obj: Any) -> Mapping | None:
    if not isinstance(obj, Placeholder):
        return None
    state = obj._pickled["state"]
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], Mapping):  # (dict, slots)
        state = state[0]
    if isinstance(state, Mapping) and "_parameters" in state and "_modules" in state:
        return state
    return None


def is_module_placeholder(obj: Any) -> bool:
    """Whether `obj` is a pickled `nn.Module` read as a placeholder (it has _parameters and _modules)."""
    return _module_state(obj) is not None


def module_state_dict(obj: Any, prefix: str = "", _ancestors: frozenset[int] = frozenset(),
                      _budget: list[int] | None = None) -> dict[str, Tensor]:
    """The flat state dict of a pickled module read as placeholders: parameters and persistent
    buffers of it and its submodules, keyed as `nn.Module.state_dict()` keys them. Entries that are
    not what a module pickles (crafted files) are passed over, and so is a module inside itself; a
    module shared by many parents is listed under each name, within WALK_BUDGET entries in all."""
    state = _module_state(obj)
    if state is None:
        raise TypeError(f"{obj!r} is not a pickled nn.Module")
    ancestors = _ancestors | {id(obj)}
    budget = _budget if _budget is not None else [WALK_BUDGET]
    budget[0] -= 1
    if budget[0] < 0 or len(ancestors) > 1000:
        raise CheckpointError(f"the pickled model's submodules unfold into more than {WALK_BUDGET:,} entries "
                              "(or nest deeper than 1000): not a model reparam reads")

    def entries(key: str) -> list[tuple[str, Any]]:
        value = state.get(key)
        return [(k, v) for k, v in value.items() if isinstance(k, str)] if isinstance(value, Mapping) else []

    out: dict[str, Tensor] = {}
    for name, value in entries("_parameters"):
        if isinstance(value, Tensor):
            out[prefix + name] = value.detach() if isinstance(value, torch.nn.Parameter) else value
    skip = state.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, (set, frozenset, list, tuple)) else ()
    for name, value in entries("_buffers"):
        if isinstance(value, Tensor) and name not in skip:
            out[prefix + name] = value
    for name, child in entries("_modules"):
        if is_module_placeholder(child) and id(child) not in ancestors:
            out.update(module_state_dict(child, f"{prefix}{name}.", ancestors, budget))
        elif isinstance(child, torch.nn.Module):
            out.update({f"{prefix}{name}.{k}": v for k, v in child.state_dict().items()})
    return out


# Globals that unpickle into plain data and that training scripts routinely store beside the
# weights (timm's train.py saves its argparse arguments): allowed under weights_only.
SAFE_GLOBALS = [argparse.Namespace]
