"""Model specs: how to build the training-form model a checkpoint belongs to.

A spec reference (`--spec`) is one of:

* a built-in name, e.g. `repvgg-a0` (a YAML file in `model_specs/`),
* a path to a YAML file,
* a Python file `spec.py` exposing `build_model()`, or `spec.py:function`,
* a library's model: `timm:<model_name>` or `mmpretrain:<model name or config.py>`, optionally
  with keyword arguments as a query: `timm:repvgg_a0?num_classes=10&in_chans=1` (values parsed
  as YAML scalars or lists). Built without pretrained weights: weights come from the checkpoint,
  nothing is downloaded (details in `reparam_cli/ecosystems/`).

A YAML spec names a builder (`module:callable`), its keyword arguments, the verification input
shape and optional checkpoint options:

    name: repvgg-a0
    description: RepVGG-A0, ImageNet classifier
    builder: reparam_cli.blocks.repvgg:RepVGG
    args: {num_blocks: [2, 4, 14, 1], width_multiplier: [0.75, 0.75, 0.75, 2.5]}
    input_shape: [1, 3, 224, 224]
    checkpoint: {key: state_dict, strip_prefix: module.}

A Python spec may also define `INPUT_SHAPE` and `CHECKPOINT` (a dict like the YAML key).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import SpecError

SPECS_DIR = Path(os.environ.get("REPARAM_SPECS_DIR", Path(__file__).resolve().parent.parent / "model_specs"))
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
_KNOWN_KEYS = {"name", "description", "builder", "args", "input_shape", "checkpoint", "family", "deploy_params"}


@dataclass
class ModelSpec:
    """A resolved spec: everything needed to build the training model and verify it."""

    name: str
    builder: str
    args: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE
    checkpoint: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""  # where it came from: built-in name, file path

    def resolve_builder(self) -> Callable[..., Any]:
        return _resolve_callable(self.builder, self.name)

    def build(self, device: str | None = None):
        """Build the training-form model (on `device`; 'meta' skips allocation and initialisation)."""
        import torch

        fn = self.resolve_builder()
        try:
            if device is None:
                model = fn(**self.args)
            else:
                with torch.device(device):
                    model = fn(**self.args)
        except TypeError as exc:
            raise SpecError(f"spec {self.name!r}: builder {self.builder} rejected its arguments: {exc}") from None
        if not isinstance(model, torch.nn.Module):
            raise SpecError(f"spec {self.name!r}: builder {self.builder} returned {type(model).__name__}, not an nn.Module")
        return model

    def to_json(self) -> str:
        """The spec as JSON, stored in deploy files so the deploy model can be rebuilt from them."""
        return json.dumps({
            "name": self.name, "description": self.description, "builder": self.builder, "args": self.args,
            "input_shape": list(self.input_shape), "checkpoint": self.checkpoint, "source": self.source,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"the spec stored in the deploy file is not valid JSON: {exc}") from None
        return cls(data["name"], data["builder"], data.get("args") or {}, tuple(data.get("input_shape") or DEFAULT_INPUT_SHAPE),
                   data.get("checkpoint") or {}, data.get("description", ""), data.get("source", ""))


def builtin_names() -> list[str]:
    """Names of the built-in specs (YAML files in model_specs/), sorted."""
    return sorted(p.stem for p in SPECS_DIR.glob("*.yaml"))


def load_spec(ref: str) -> ModelSpec:
    """Resolve a `--spec` reference (built-in name, YAML path, or Python file[:function])."""
    if not ref:
        raise SpecError("no spec given", hint="pass --spec NAME, a YAML file or a Python file")
    for prefix, resolver in ECOSYSTEM_SPECS.items():
        if ref.startswith(prefix):
            return _resolve_callable(resolver, ref)(ref)
    py_path, _, func = ref.partition(".py:")
    if ref.endswith(".py") or func:
        return _python_spec(Path(f"{py_path}.py" if func else ref), func or "build_model")
    path = Path(ref)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SpecError(f"spec file not found: {ref}")
        return _yaml_spec(path, source=str(path.resolve()))
    builtin = SPECS_DIR / f"{ref}.yaml"
    if builtin.is_file():
        return _yaml_spec(builtin, source=ref)
    close = [n for n in builtin_names() if ref.lower() in n or n in ref.lower()][:5]
    raise SpecError(
        f"unknown spec {ref!r}",
        hint=f"did you mean {', '.join(close)}?" if close else "run `reparam specs` to list the built-in specs",
    )


def _yaml_spec(path: Path, source: str) -> ModelSpec:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read spec {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or "builder" not in data:
        raise SpecError(f"spec {path} must be a mapping with at least a 'builder' key")
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise SpecError(f"spec {path} has unknown keys: {', '.join(sorted(unknown))}",
                        hint=f"known keys: {', '.join(sorted(_KNOWN_KEYS))}")
    args = data.get("args") or {}
    if not isinstance(args, dict):
        raise SpecError(f"spec {path}: 'args' must be a mapping of keyword arguments")
    return ModelSpec(
        name=str(data.get("name") or path.stem), builder=str(data["builder"]), args=args,
        input_shape=_shape(data.get("input_shape", DEFAULT_INPUT_SHAPE), path),
        checkpoint=dict(data.get("checkpoint") or {}), description=str(data.get("description", "")), source=source,
    )


def _shape(value: Any, where: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise SpecError(f"spec {where}: input_shape must be a list of integers, got {value!r}") from None
    if not shape or any(v <= 0 for v in shape):
        raise SpecError(f"spec {where}: input_shape must be positive integers, got {value!r}")
    return shape


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse '1,3,64,64' (or '1x3x64x64') into a shape tuple."""
    return _shape(text.replace("x", ",").split(","), "--input-shape")


def _python_spec(path: Path, func: str) -> ModelSpec:
    module = _import_file(path)
    if not callable(getattr(module, func, None)):
        raise SpecError(f"{path} has no function {func}()", hint="define build_model() or pass file.py:function")
    shape = getattr(module, "INPUT_SHAPE", DEFAULT_INPUT_SHAPE)
    ref = f"{path.resolve()}:{func}"
    return ModelSpec(
        name=path.stem, builder=ref, args={}, input_shape=_shape(shape, path),
        checkpoint=dict(getattr(module, "CHECKPOINT", {}) or {}),
        description=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else "", source=ref,
    )


def _import_file(path: Path):
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    name = f"reparam_user_spec_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # user code: report, do not crash
        raise SpecError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


# Library specs (`timm:<model>`, `mmpretrain:<model>`): prefix -> the module:function that
# resolves such a reference into a ModelSpec. The library details live in reparam_cli/ecosystems/.
ECOSYSTEM_SPECS = {
    "timm:": "reparam_cli.ecosystems.timm:timm_spec",
    "mmpretrain:": "reparam_cli.ecosystems.mmpretrain:mmpretrain_spec",
}
# Builder references kept for deploy files written before the timm code moved (not importable).
TIMM_BUILDERS = ("timm:create_model", "timm.models:create_model")


def parse_query(ref: str, body: str) -> tuple[str, dict[str, Any]]:
    """'name?key=value&...' -> (name, {key: value}), values parsed as YAML scalars or lists."""
    from urllib.parse import parse_qsl

    import yaml

    name, _, query = body.partition("?")
    args: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise SpecError(f"spec {ref!r}: arguments must look like ?key=value&key=value") from None
    for key, value in pairs:
        try:
            args[key] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            args[key] = value
    return name, args


def _resolve_callable(ref: str, spec_name: str) -> Callable[..., Any]:
    """'package.module:attr' or '/path/file.py:attr' -> the callable ('timm:create_model': never pretrained)."""
    if ref in TIMM_BUILDERS:
        from .ecosystems.timm import timm_create_model

        return timm_create_model
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise SpecError(f"spec {spec_name!r}: builder must look like 'module:function', got {ref!r}")
    if target.endswith(".py"):
        module = _import_file(Path(target))
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise SpecError(f"spec {spec_name!r}: cannot import {target}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"spec {spec_name!r}: {target} has no callable {attr}")
    return fn
