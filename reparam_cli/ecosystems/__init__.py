"""Library conventions: one file per library whose models reparam converts (ultralytics, timm, mmpretrain,
torchvision, transformers).

Each file holds everything specific to its library: recipes for the library's own block types,
a spec prefix (`ultralytics:yolov8n.yaml`), model-level steps the library's own fuse does beyond
its blocks, and how to rebuild a whole model pickled in a checkpoint. The rest of reparam stays
generic and reaches these files only through the functions below:

* `activate()`: imports (and so registers the recipes of) the file of every library that is
  already imported. A model of a library cannot exist before its library is imported, and
  importing a library reparam does not need would slow every command down;
* `spec_for(ref)`: the ModelSpec of a `<library>:...` reference (the prefix is the file's name,
  so a reference is recognised without importing the library), or None;
* `finish(model, deployed, report)`: the library's model-level steps on the deploy model (e.g. dropping
  the detection branch ultralytics' `fuse()` drops), never touching `model`;
* `adopt(module)`: a whole model read from a checkpoint (`--spec checkpoint`) prepared as its
  library loads it, with a spec that rebuilds it from the library's code.

* `ran_natively(module)`: why a module's own deploy method already ran (in `finish`), or None;
* `prepare(model)`: a built training model set as its library deploys it, also when the user's own
  spec built it (the conventions follow the model, not the spec string);
* `checkpoint_keys(model, state)`: a checkpoint's keys renamed as the library's own loader renames
  them for that model (transformers' legacy key names).
* `export_metadata(model, fmt, shape, dynamic_dims)`: what the library's own runtime reads from an
  exported file's metadata (ultralytics: ONNX `metadata_props` with task, class names, stride ...).

A library file may define any of `spec(ref)`, `prepare(model)`, `finish(model, deployed)`, `adopt(module)`
and `export_metadata(...)`;
importing it registers its recipes (`@recipe(BlockType, family=...)`), so it may import its library.
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType

from torch import nn

from reparam_cli.core.tensors import has_submodule
from reparam_cli.errors import SpecError
from reparam_cli.extras import import_extra

# library package name -> reparam's file of its conventions
ECOSYSTEMS = {"ultralytics": "reparam_cli.ecosystems.ultralytics", "timm": "reparam_cli.ecosystems.timm",
              "mmpretrain": "reparam_cli.ecosystems.mmpretrain", "torchvision": "reparam_cli.ecosystems.torchvision",
              "transformers": "reparam_cli.ecosystems.transformers"}
# library -> the builder its specs store in deploy files. It builds from data alone (a YAML
# configuration of the library's own modules, no user code), so a stored spec naming it may be
# rebuilt like a built-in one.
# (mmpretrain: a model-zoo name, from mmpretrain's own configs; a config .py path is not plain data.)
STORED_BUILDERS = {"ultralytics": "reparam_cli.ecosystems.ultralytics:build_model",
                   "mmpretrain": "reparam_cli.ecosystems.mmpretrain:build_model",
                   "torchvision": "reparam_cli.ecosystems.torchvision:build_model",
                   "transformers": "reparam_cli.ecosystems.transformers:build_model"}


def library_of_builder(builder: str) -> str | None:
    """The library whose data-only builder `builder` is (see STORED_BUILDERS), or None."""
    return next((lib for lib, known in STORED_BUILDERS.items() if known == builder), None)


def _active() -> list[ModuleType]:
    return [import_module(ours) for package, ours in ECOSYSTEMS.items() if package in sys.modules]


def activate() -> None:
    """Register the recipes of every library already imported (see the module doc)."""
    _active()


def spec_for(ref: str):
    """The ModelSpec for a library spec reference such as `ultralytics:yolov8n.yaml?nc=3`, or None."""
    for package, ours in ECOSYSTEMS.items():
        prefix = ours.rsplit(".", 1)[1] + ":"
        if ref.startswith(prefix):
            return import_extra(ours, package, f"spec {ref!r}", SpecError).spec(ref)
    return None


def prepare(model: nn.Module) -> nn.Module:
    """A built training model set up as its library deploys it, whoever built it (a `<library>:` spec
    or the user's own spec.py): each active library's `prepare(model)` (ultralytics: heads in export
    mode). Changes `model` in place and returns it."""
    for eco in _active():
        step = getattr(eco, "prepare", None)
        if step is not None:
            model = step(model)
    return model


def checkpoint_keys(model: nn.Module, state: dict) -> dict:
    """A checkpoint's state dict with the keys its library's own loader would rename for `model` (transformers
    5 saves ViT and others under legacy names and renames them when loading); `state` is not modified."""
    for eco in _active():
        step = getattr(eco, "checkpoint_keys", None)
        if step is not None:
            state = step(model, state)
    return state


def finish(model: nn.Module, deployed: nn.Module, report) -> nn.Module:
    """Apply each active library's model-level deploy steps to `deployed` (`model` is not modified).

    Converted blocks that such a step removed (the unused branch of a detection head) leave the
    engine's `report`: they are not part of the deploy model, so there is nothing to verify."""

    for eco in _active():
        step = getattr(eco, "finish", None)
        if step is not None:
            deployed = step(model, deployed)
            report.converted = [b for b in report.converted if has_submodule(deployed, b.path)]
    return deployed


def ran_natively(module: nn.Module | None) -> str | None:
    """Why `module`'s own deploy method needs no call, when a library's finish step already ran it
    (ultralytics' Detect.fuse()): the sentence for the report, else None."""
    if module is None:
        return None
    for eco in _active():
        check = getattr(eco, "ran_natively", None)
        why = check(module) if check is not None else None
        if why:
            return why
    return None


def adopt(module: nn.Module) -> tuple[nn.Module, object, list[str]]:
    """A whole model read from a checkpoint (`--spec checkpoint`), as its library would load it:
    (the model, a ModelSpec that rebuilds it or None, notes). The first active library whose
    `adopt` recognises the model decides; an unknown model is returned as it is."""
    for eco in _active():
        found = getattr(eco, "adopt", lambda m: None)(module)
        if found is not None:
            return found
    return module, None, []


def export_metadata(model: nn.Module, fmt: str, shape: tuple[int, ...], dynamic_dims: list[str]) -> dict[str, str]:
    """Metadata entries (key -> string) a `fmt` file of the deploy `model` carries so that its library's
    own runtime loads it (ultralytics' AutoBackend: task, names, stride, imgsz ...), from the first
    active library that recognises the model; {} for any other model. `shape`: the export's example
    input shape; `dynamic_dims`: the input dims the file leaves dynamic ('batch', 'height', 'width')."""
    for eco in _active():
        step = getattr(eco, "export_metadata", None)
        found = step(model, fmt, shape, dynamic_dims) if step is not None else None
        if found:
            return found
    return {}
