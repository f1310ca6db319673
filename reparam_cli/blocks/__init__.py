"""Block families: one file per paper's training-time block, each registering its recipe
(`@recipe(BlockType, family=...)`, see `registry.py`). Importing this package registers them all."""

from reparam_cli.blocks import common, repvgg  # noqa: F401
from reparam_cli.blocks import acnet, dbb, mobileone  # noqa: F401
from reparam_cli.blocks import inception, refconv, repmlp, repnext, repnext_m  # noqa: F401
from reparam_cli.blocks.registry import all_recipes, recipe  # noqa: F401  (the registry's public face)
