"""The model spec as data (`ModelSpec`): what builds a training model (a builder `module:callable`
and its keyword arguments), the verification input shape and hook, and checkpoint options; how it
is built (on `meta` where possible, see `ModelSpec.build`) and stored in deploy files as JSON.

Resolving a `--spec` reference (built-in names, YAML and Python files, library prefixes) lives in
`reparam_cli/pipeline/specs.py`.

Models are built on the `meta` device where possible (no memory, no random initialisation); a
builder whose construction runs real computation (ultralytics probes its strides with a forward
pass and `.item()`) fails there, and is then built on the CPU, with a note "built on cpu: <reason>"
in `ModelSpec.notes` that the reports carry. A builder that knows it cannot build on meta says so
with an attribute `not_on_meta = "<reason>"`, and is built on the CPU without trying.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from reparam_cli.core.messages import first_line
from reparam_cli.errors import ReparamError, SpecError

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


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
    # Verification input hook, 'module:function' or '/path/spec.py:function' (empty: one N(0,1) tensor
    # of input_shape); called as make_inputs(shape, generator, dtype), see reparam_cli.verification.
    inputs: str = ""
    notes: list[str] = field(default_factory=list, compare=False)  # what building it took (not stored)

    def resolve_builder(self) -> Callable[..., Any]:
        return _resolve_callable(self.builder, self.name)

    def input_hook(self) -> Callable[..., Any] | None:
        """The callable building verification inputs, or None for the default (one tensor of input_shape)."""
        return _resolve_callable(self.inputs, self.name) if self.inputs else None

    def build(self, device: str | None = None):
        """Build the training-form model (on `device`; 'meta' skips allocation and initialisation)."""
        import torch

        if self.builder == CHECKPOINT_BUILDER:
            raise SpecError("spec 'checkpoint' builds nothing: it means the model pickled in a checkpoint, which "
                            "`convert` and `verify` read with --trust-pickle",
                            hint="here, pass the spec of the model's architecture (--spec, or spec=... in Python)")
        fn = self.resolve_builder()
        target = self.builder.rpartition(":")[0]
        paths = user_paths(Path(target).resolve().parent) if target.endswith(".py") else contextlib.nullcontext()
        with paths:  # a spec.py's builder imports the user's package as at import
            try:
                on_meta = device is not None and torch.device(device).type == "meta"
                # A builder may say up front why it cannot build on meta (trying first costs time).
                known = getattr(fn, "not_on_meta", None) if on_meta else None
                if device is None or known:
                    model = fn(**self.args)
                else:
                    try:
                        with torch.device(device):
                            model = fn(**self.args)
                    except (SpecError, TypeError):
                        raise
                    except Exception as exc:  # construction computes (e.g. `.item()`), which meta cannot
                        if not on_meta:
                            raise
                        model = fn(**self.args)
                        known = "building on the meta device failed: " + \
                            (first_line(exc) or type(exc).__name__)
                if known and f"built on cpu: {known}" not in self.notes:
                    self.notes.append(f"built on cpu: {known}")
            except TypeError as exc:
                raise SpecError(f"spec {self.name!r}: builder {self.builder} rejected its arguments: {exc}") from None
            except SystemExit as exc:  # the builder is user code: exiting is an error, not the end of reparam
                raise SpecError(f"spec {self.name!r}: builder {self.builder} called sys.exit({exc.code!r})") from None
            except ReparamError:
                raise
            except Exception as exc:  # user code: one line, not a traceback
                detail = first_line(exc)
                raise SpecError(f"spec {self.name!r}: builder {self.builder} failed: {type(exc).__name__}: {detail}") from None
        if not isinstance(model, torch.nn.Module):
            raise SpecError(f"spec {self.name!r}: builder {self.builder} returned {type(model).__name__}, not an nn.Module")
        return model

    def build_meta(self):
        """Build the training model on `meta` (shapes only), with its non-persistent buffers real.

        Non-persistent buffers (timm's attention index tables, rotary tables) are computed in
        `__init__` and never stored in a checkpoint, so on `meta` they would stay without data and
        a model rebuilt from a file would compute garbage. Only when the model has such buffers is
        it built a second time on the CPU, and those buffers (nothing else) are taken from there.
        """
        model = self.build(device="meta")
        empty = [(path, name) for path, m in model.named_modules() for name in m._non_persistent_buffers_set
                 if m._buffers.get(name) is not None and m._buffers[name].is_meta]
        if empty:
            real = self.build(device="cpu")
            for path, name in empty:
                model.get_submodule(path)._buffers[name] = real.get_submodule(path)._buffers[name]
        return model

    def to_json(self) -> str:
        """The spec as JSON, stored in deploy files so the deploy model can be rebuilt from them."""
        data = {
            "name": self.name, "description": self.description, "builder": self.builder, "args": self.args,
            "input_shape": list(self.input_shape), "checkpoint": self.checkpoint, "source": self.source,
        }
        if self.inputs:  # only when set: specs without a hook store the same JSON as before
            data["inputs"] = self.inputs
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """The spec stored in a deploy file (`to_json`), parsed as data: nothing is imported or run."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise SpecError(f"the spec stored in the deploy file is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("builder"), str):
            raise SpecError("the spec stored in the deploy file is not a mapping with a 'builder' string",
                            hint="pass the spec explicitly with --spec")
        args, checkpoint = data.get("args") or {}, data.get("checkpoint") or {}
        if not isinstance(args, dict) or not isinstance(checkpoint, dict):
            raise SpecError("the spec stored in the deploy file has malformed 'args' or 'checkpoint'",
                            hint="pass the spec explicitly with --spec")
        return cls(str(data.get("name") or "stored"), data["builder"], args,
                   _shape(data.get("input_shape") or DEFAULT_INPUT_SHAPE, "stored in the deploy file"),
                   checkpoint, str(data.get("description", "")), str(data.get("source", "")),
                   str(data.get("inputs") or ""))


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


_IMPORTED: dict[Path, Any] = {}  # Python spec files by resolved path: each is imported once per process


@contextlib.contextmanager
def _no_bytecode() -> Iterator[None]:
    """Import without writing `__pycache__` folders: a spec and the modules it imports are the
    user's files, and reparam leaves their folders as it found them."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


@contextlib.contextmanager
def user_paths(folder: Path) -> Iterator[None]:
    """While importing a Python spec file and running its builder: the spec file's folder, then the
    working directory, first on sys.path (where not there yet), as `python train.py` has them for a
    training script, so the spec imports the user's package the way their script does (`from
    mypkg.models import Net`, mypkg beside spec.py or in the working directory), also inside
    build_model(). Removed afterwards: the user's folder does not shadow modules reparam imports later."""
    import os

    added = [entry for entry in dict.fromkeys([str(folder), os.getcwd()]) if entry not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for entry in added:
            if entry in sys.path:
                sys.path.remove(entry)


def _import_file(path: Path):
    """Import a Python spec file (once per process). Its code is the user's: an exception or a
    sys.exit() (argparse at import, for instance) becomes a one-line SpecError, and what it writes to
    stderr meanwhile is held back and replayed only if the import succeeds."""
    import io

    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    key = path.resolve()
    if key in _IMPORTED:
        return _IMPORTED[key]
    name = f"reparam_user_spec_{abs(hash(str(key)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), _no_bytecode(), user_paths(key.parent):
            spec.loader.exec_module(module)
    except SystemExit as exc:
        raise SpecError(f"importing {path} called sys.exit({exc.code!r})",
                        hint="a spec must not exit or parse the command line at import") from None
    except Exception as exc:  # user code: report, do not crash
        raise SpecError(f"importing {path} failed: {type(exc).__name__}: {first_line(exc)}") from None
    sys.stderr.write(said.getvalue())
    _IMPORTED[key] = module
    return module



TIMM_PREFIX = "timm:"
# What timm specs store as their builder (resolved by _resolve_callable; the second is the name
# deploy files written before the timm code moved to ecosystems/timm.py carry): both are reparam's
# own timm builder, which never loads pretrained weights.
TIMM_BUILDERS = ("timm:create_model", "timm.models:create_model")
_BUILDER_ALIASES = {name: "reparam_cli.ecosystems.timm:timm_create_model" for name in TIMM_BUILDERS}


# A spec is a few lines: these bounds stop a hostile YAML file (alias bombs, deep nesting) early.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_NODES = 100_000  # nodes after alias expansion
YAML_MAX_EXPANSION = 10  # expanded nodes / distinct nodes


def _expanded_size(root) -> tuple[int, int]:
    """(distinct nodes, nodes after expanding every alias) of a composed YAML node graph, each node
    visited once (memoised), without recursion."""
    import yaml

    size: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        if done:
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    return len(size), size[id(root)]


def load_yaml(text: str, what: str):
    """YAML text as data (safe types only) within a budget: at most YAML_MAX_BYTES, and aliases may
    expand the document to at most YAML_MAX_EXPANSION times its distinct nodes (and YAML_MAX_NODES).
    SpecError otherwise, or when it does not parse."""
    import yaml

    if len(text) > YAML_MAX_BYTES:
        raise SpecError(f"{what} is larger than {YAML_MAX_BYTES >> 20} MiB: not a spec")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        distinct, expanded = _expanded_size(node)
        if expanded > YAML_MAX_NODES or expanded > YAML_MAX_EXPANSION * distinct + 1000:
            raise SpecError(f"{what}: its aliases expand {distinct:,} YAML nodes to {expanded:,} "
                            "(an alias bomb?)", hint="write the values out, without anchors and aliases")
        return loader.construct_document(node)
    except RecursionError:
        raise SpecError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise SpecError(f"{what}: {first_line(str(exc))}") from None
    finally:
        loader.dispose()


QUERY_MAX_CHARS = 4096  # a spec reference's `?key=value&...`: keyword arguments, not data


def parse_query(query: str, ref: str) -> dict[str, Any]:
    """`key=value&key=value` (the part of a spec reference after `?`) -> keyword arguments, values
    parsed as YAML scalars or lists (`nc=3` -> 3, `depths=[1,2]` -> [1, 2])."""
    from urllib.parse import parse_qsl

    import yaml

    args: dict[str, Any] = {}
    if len(query) > QUERY_MAX_CHARS:
        raise SpecError(f"spec {ref[:60]!r}...: its ?key=value arguments are longer than {QUERY_MAX_CHARS} characters")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise SpecError(f"spec {ref!r}: arguments must look like ?key=value&key=value") from None
    for key, value in pairs:
        if not all(part.isidentifier() for part in key.split(".")):  # dotted: a config override (mmpretrain)
            raise SpecError(f"spec {ref!r}: argument name {key!r} is not a keyword argument name",
                            hint="arguments look like ?key=value&key=value, each key a Python identifier (or dotted ones)")
        try:
            args[key] = load_yaml(value, f"argument {key!r} of spec {ref!r}") if value else None
            if isinstance(args[key], int) and not isinstance(args[key], bool) and abs(args[key]) >= 1 << 63:
                raise SpecError(f"spec {ref!r}: argument {key} is out of range (more than 64 bits)")
        except yaml.YAMLError:
            args[key] = value
    return args


def library_ref(ref: str, prefix: str, library: str, example: str) -> tuple[str, dict[str, Any]]:
    """`<prefix><name>[?key=value&...]` (a library's spec reference) -> (name, keyword arguments)."""
    name, _, query = ref[len(prefix):].partition("?")
    if not name:
        raise SpecError(f"spec {ref!r} names no {library} model", hint=f"e.g. {example}")
    return name, parse_query(query, ref)


CHECKPOINT_SPEC = "checkpoint"
CHECKPOINT_BUILDER = "<the checkpoint's own pickled model>"


def checkpoint_spec() -> ModelSpec:
    """`--spec checkpoint`: the model is the nn.Module pickled in the checkpoint (needs --trust-pickle)."""
    return ModelSpec(name=CHECKPOINT_SPEC, builder=CHECKPOINT_BUILDER, description="the model pickled in the checkpoint",
                     source=CHECKPOINT_SPEC)


def is_checkpoint_spec(spec: ModelSpec) -> bool:
    return spec.builder == CHECKPOINT_BUILDER


def _resolve_callable(ref: str, spec_name: str) -> Callable[..., Any]:
    """'package.module:attr' or '/path/file.py:attr' -> the callable ('timm:create_model': never pretrained)."""
    ref = _BUILDER_ALIASES.get(ref, ref)
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise SpecError(f"spec {spec_name!r}: builder must look like 'module:function', got {ref!r}")
    if target.endswith(".py"):
        module = _import_file(Path(target))
    else:
        try:
            with _no_bytecode():  # (the user's own modules, on sys.path: no __pycache__ beside them)
                module = importlib.import_module(target)
        except ImportError as exc:
            raise SpecError(f"spec {spec_name!r}: cannot import {target}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"spec {spec_name!r}: {target} has no callable {attr}")
    return fn
