"""Registry: block type -> recipe.

A recipe is a function `fuse(block) -> nn.Module` that returns the deploy form of one training
block. It reads the block's tensors (never writes them) and composes paradigms from `algebra`.
Block families register their recipes with the `@recipe(BlockType, family=...)` decorator in
their own file under `reparam_cli/blocks/`; importing `reparam_cli.blocks` registers them all.
A library's file in `reparam_cli/ecosystems/` may register recipes for the library's own blocks
with `replaces_native=True`: the recipe computes what the block's own deploy method computes, in
the same layout (exactly, in float64), so an outer block whose own method fuses its children is
still converted by that method; the recipe raises `Declined` for a block it does not know (a
subclass, an unusual configuration, a block already in deploy form) and the block's own method
is used instead.
This module imports no block (a leaf, so every family can import it). A caller may also pass its
own recipes for one call, as a mapping {BlockType: fuse} (`reparameterize(model, recipes=...)`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Mapping

from torch import nn

Fuse = Callable[[nn.Module], nn.Module]


class Declined(Exception):
    """Raised by a `replaces_native` recipe for a block it does not know: use the block's own method."""


@dataclass(frozen=True)
class Recipe:
    block_type: type
    family: str
    fuse: Fuse
    replaces_native: bool = False

    @property
    def name(self) -> str:
        return self.block_type.__name__


_REGISTRY: dict[type, Recipe] = {}


def recipe(block_type: type, family: str, replaces_native: bool = False) -> Callable[[Fuse], Fuse]:
    """Decorator: register `fuse` as the recipe that turns a `block_type` into its deploy form
    (`replaces_native`: see the module doc)."""

    def register(fuse: Fuse) -> Fuse:
        if block_type in _REGISTRY:
            raise ValueError(f"a recipe for {block_type.__name__} is already registered")
        _REGISTRY[block_type] = Recipe(block_type, family, fuse, replaces_native)
        return fuse

    return register


USER_FAMILY = "user"  # the family of recipes passed in a mapping


def recipe_for(module: nn.Module, extra: Mapping[type, Fuse] | None = None) -> Recipe | None:
    """The recipe for this module's type (or its nearest base class that has one), if any: from
    `extra` ({BlockType: fuse}, the caller's own) before the registry at each class."""
    for cls in type(module).__mro__:
        if extra and cls in extra:
            return Recipe(cls, USER_FAMILY, extra[cls])
        found = _REGISTRY.get(cls)
        if found is not None:
            return found
    return None


def all_recipes() -> list[Recipe]:
    """Every registered recipe, sorted by family then block name (import `reparam_cli.blocks`, or
    call it as `reparam_cli.all_recipes()`, to have the built-in families registered)."""
    return sorted(_REGISTRY.values(), key=lambda r: (r.family, r.name))


# --- the deploy methods third-party blocks define (see reparam_cli.convert.native) ---------------

NATIVE_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


def native_methods(module: nn.Module) -> list[str]:
    """The names of the native deploy methods the module's class defines, in NATIVE_METHODS order.

    Only functions defined on the class count: a child module or attribute that happens to be
    called `fuse` (e.g. `self.fuse = nn.Conv2d(...)`) is not a method.
    """
    found = []
    for name in NATIVE_METHODS:
        attr = inspect.getattr_static(type(module), name, None)
        if not isinstance(attr, staticmethod) and inspect.isfunction(attr):
            found.append(name)
    return found


def native_method(module: nn.Module) -> str | None:
    """The name of the module's first native deploy method, if its class defines one."""
    found = native_methods(module)
    return found[0] if found else None
