"""The engine: walk a module tree and replace every block that has a recipe by its deploy form.

`reparameterize(model)` returns a *new* module tree and a report; the model it is given and its
tensors are never modified. Containers along the way are shallow clones, so parameters of
untouched layers share storage with the input model (no copy): treat the result as a new model
over the same weights, and clone it if you intend to train both independently.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import NotEquivalent, ReparamError
from .recipes import Recipe, recipe_for


@dataclass
class ConvertedBlock:
    path: str
    block_type: str
    family: str


@dataclass
class ConversionReport:
    """What `reparameterize` did: each converted block with its path, and counts per block type."""

    converted: list[ConvertedBlock] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> dict[str, int]:
        return dict(sorted(Counter(b.block_type for b in self.converted).items()))

    @property
    def paths(self) -> list[str]:
        return [b.path for b in self.converted]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BN statistics not included)."""
    return sum(p.numel() for p in model.parameters())


def _shallow_clone(module: nn.Module) -> nn.Module:
    """A new module object with its own child, parameter and buffer dicts (tensors shared), and
    its own copy of every other dict/list/set attribute: a cache a module fills on its first call
    (timm's LeViT / EfficientViT-M / TinyViT `attention_bias_cache`) must not be shared, or the
    training model's float64 reference pass fills it for the deploy model too."""
    new = copy.copy(module)
    new.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in module.__dict__.items()}
    new._modules = dict(module._modules)
    new._parameters = {
        name: None if p is None else nn.Parameter(p.data, requires_grad=p.requires_grad)
        for name, p in module._parameters.items()
    }
    new._buffers = dict(module._buffers)
    return new


def _fuse(recipe: Recipe, block: nn.Module, path: str) -> nn.Module:
    try:
        deployed = recipe.fuse(block)
    except NotEquivalent as exc:
        raise NotEquivalent(f"block {path or '<root>'} ({recipe.name}): {exc.message}", exc.hint) from None
    deployed.train(block.training)
    return deployed


def _release(block: nn.Module) -> None:
    """Drop a converted training block's tensors so their memory is freed before the next block."""
    for m in block.modules():
        for store in (m._parameters, m._buffers):
            for name in store:
                store[name] = None


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def reparameterize(
    model: nn.Module, *, native: bool = True, linear_as_conv: bool = False, consume: bool = False,
) -> tuple[nn.Module, ConversionReport]:
    """Return (deploy model, report): every module with a registered recipe replaced by its deploy form.

    Blocks are matched top-down: once a block is converted its children are not visited. Works on
    any device, including `meta` (shapes only), which builds a deploy skeleton without data.

    With `native` (default), blocks without a recipe that have their own `fuse()`,
    `reparameterize()` or `switch_to_deploy()` (timm, mmpretrain, ...) are converted by that
    method on a copy, reported with family "native" (rules in `reparam_cli.native`).

    linear_as_conv: also turn every plain nn.Linear outside converted blocks into an equivalent
    pointwise conv module (P9, `blocks.linear_conv.PointwiseLinear`), reported as block type "Linear".

    consume=True is the one exception to "the input is never modified": each training block's
    tensors are dropped as soon as it is fused, so peak memory stays near one copy of the weights.
    The training model is unusable afterwards (the pipeline uses this when it will not verify).
    """
    import reparam_cli.blocks  # noqa: F401  (registers the built-in recipes)

    from .native import FAMILY as NATIVE, fuses_natively, native_fuse, unchanged

    report = ConversionReport()

    def convert_block(module: nn.Module, path: str, inside: str | None) -> nn.Module | None:
        """The deploy form of `module` by its recipe or its own method; None if it is no block.

        `inside` is the path of the natively converted block whose result is being searched again
        (None outside one): there a method that changes nothing is no conversion, and a block the
        parent's method created (no such path in the input model) is reported as part of the parent.
        """
        found = recipe_for(module)
        if found is not None:
            report.converted.append(ConvertedBlock(path, found.name, found.family))
            return _fuse(found, module, path)
        if native and fuses_natively(module, is_root=not path):
            try:
                deployed = native_fuse(module, path)
            except ReparamError as exc:
                if inside is None:
                    raise
                report.notes.append(f"{exc.message}; kept as {inside}'s own method left it")
                return None
            if inside is not None and unchanged(module, deployed):
                return None
            if inside is None or _has_submodule(model, path):
                report.converted.append(ConvertedBlock(path, type(module).__name__, NATIVE))
            # Searched again, all the way down: children the block's own method left alone.
            for name, child in deployed._modules.items():
                if child is not None:
                    deployed._modules[name] = walk(child, f"{path}.{name}" if path else name, path)
            return deployed
        return None

    def walk(module: nn.Module, path: str, inside: str | None = None) -> nn.Module:
        deployed = convert_block(module, path, inside)
        if deployed is not None:
            if consume:
                _release(module)
            return deployed
        if linear_as_conv and type(module) is nn.Linear:
            from .blocks.linear_conv import linear_to_pointwise

            report.converted.append(ConvertedBlock(path, "Linear", "linear-as-conv"))
            return linear_to_pointwise(module)
        new = _shallow_clone(module)
        for name, child in module._modules.items():
            if child is not None:
                new._modules[name] = walk(child, f"{path}.{name}" if path else name, inside)
        return new

    if not isinstance(model, nn.Module):
        raise ReparamError(f"expected a torch.nn.Module, got {type(model).__name__}")
    with torch.no_grad():
        deployed = walk(model, "")
        # The model's own method only when nothing inside it could be converted (see native.py).
        if native and not report.converted and fuses_natively(model):
            report.converted.append(ConvertedBlock("", type(model).__name__, NATIVE))
            deployed = native_fuse(model, "")
    return deployed, report
