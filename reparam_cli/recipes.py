"""Registry: block type -> recipe.

A recipe is a function `fuse(block) -> nn.Module` that returns the deploy form of one training
block. It reads the block's tensors (never writes them) and composes paradigms from `algebra`.
Block families register their recipes with the `@recipe(BlockType, family=...)` decorator in
their own file under `reparam_cli/blocks/`; importing `reparam_cli.blocks` registers them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

Fuse = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Recipe:
    block_type: type
    family: str
    fuse: Fuse

    @property
    def name(self) -> str:
        return self.block_type.__name__


_REGISTRY: dict[type, Recipe] = {}


def recipe(block_type: type, family: str) -> Callable[[Fuse], Fuse]:
    """Decorator: register `fuse` as the recipe that turns a `block_type` into its deploy form."""

    def register(fuse: Fuse) -> Fuse:
        if block_type in _REGISTRY:
            raise ValueError(f"a recipe for {block_type.__name__} is already registered")
        _REGISTRY[block_type] = Recipe(block_type, family, fuse)
        return fuse

    return register


def recipe_for(module: nn.Module) -> Recipe | None:
    """The recipe for this module's type (or its nearest registered base class), if any."""
    for cls in type(module).__mro__:
        found = _REGISTRY.get(cls)
        if found is not None:
            return found
    return None


def all_recipes() -> list[Recipe]:
    """Every registered recipe, sorted by family then block name."""
    import reparam_cli.blocks  # noqa: F401  (registers the built-in families)

    return sorted(_REGISTRY.values(), key=lambda r: (r.family, r.name))
