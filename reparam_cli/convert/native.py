"""Native fallback: blocks from third-party code that know how to fuse themselves.

timm, mmpretrain, the papers' reference repositories and YOLO code give their re-parameterizable
blocks a method that turns the block into its deploy form. Three conventions are recognised, in
this order (timm's `reparameterize_model` uses the same ones):

* `fuse()` returns the deploy module (timm's RepViT, LeViT, ...); it may also return `None`
  after changing the block in place, or return the block itself;
* `reparameterize()` changes the block in place and returns `None` (timm's RepVGG, MobileOne,
  FastViT, Apple's MobileOne, ...);
* `switch_to_deploy()` changes the block in place (DingXiaoH's RepVGG/DBB/ACNet, mmpretrain,
  YOLOv6, timm's RepGhost).

Which modules get their method called (the engine decides, see `engine.reparameterize`):

* a module whose type has a recipe is always converted by the recipe, never natively;
* otherwise the *outermost* module with a native method is converted, and its children are not
  visited: an outer method usually needs its children untouched (timm's `RepVggDw.fuse()` calls
  `fuse()` on its own `ConvNorm` children, `RepMixer.reparameterize()` on its MobileOne blocks);
* except when something below it has a recipe: then the engine descends instead, so reparam's
  own verified recipes handle what they know (a library's recipe that `replaces_native` its
  block's own method does not count: see `blocks.registry`);
* and except the model itself (the root of the walk): a model-level `fuse()` or
  `reparameterize()` is typically a tree walk over the blocks (timm's `RepVit.fuse`), and
  converting block by block keeps per-block verification. The root's own method is used only
  when no module below it can be converted at all.
* after a block's own method ran, its result is searched again (all the way down): children the
  method left alone (timm's `GhostBottleneck.switch_to_deploy()` fuses only its depthwise conv,
  not its `GhostModuleV3` children) are converted by their own methods too. A child whose method
  finds nothing left to do (mmpretrain's `if self.deploy: return`) is left as it is.

A class may define several of the methods: the first that gives a module (or None) is used. A
method that fails or returns anything else (mmpretrain's `RepVGGBlock.reparameterize()` returns
the fused `(weight, bias)` tensors; its `switch_to_deploy()` is the one that swaps the branches)
is skipped in favour of the next one; when none works, the first failure is reported. Inside a
natively fused block's result, a child none of whose methods works (it was fused by its parent
and its method cannot run twice) is kept as the parent left it, with a note in the report.

The method runs on a deep copy of the block in eval mode, upcast to float64 (default dtype
float64 while it runs, so modules it creates are float64 too); the result is cast back to the
block's dtype. The input model is never modified. Methods run under `torch.device(<block
device>)`, so on the `meta` device they build a shape-only deploy skeleton like recipes do.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from reparam_cli.blocks.registry import native_method, native_methods, recipe_for
from reparam_cli.errors import ReparamError

FAMILY = "native"


def fuses_natively(module: nn.Module, is_root: bool = False) -> bool:
    """Whether the engine should convert this module by its native method (see the module doc):
    it has one, no recipe of its own or below it, and it is not the root of the walk."""

    if is_root or native_method(module) is None:
        return False
    recipes = (recipe_for(m) for m in module.modules())
    return not any(r is not None and not r.replaces_native for r in recipes)


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device, None
    return torch.device("cpu"), None


def _float64_copy(block: nn.Module) -> nn.Module:
    """A deep copy of `block` whose floating-point parameters and buffers are float64 (what
    `copy.deepcopy(block).to(torch.float64)` gives), each tensor read once: the deep copy takes the
    float64 tensors made beforehand instead of copying the originals first."""
    memo: dict[int, object] = {}
    for t in (*block.parameters(), *block.buffers()):
        if t.is_floating_point() and t.dtype != torch.float64:
            wide = t.detach().to(torch.float64)
            memo[id(t)] = nn.Parameter(wide, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else wide
    return copy.deepcopy(block, memo)


def _call(block: nn.Module, method: str, device: torch.device, dtype: torch.dtype | None, path: str):
    """Run `method` on a float64 eval-mode deep copy of `block`; returns (copy, what it returned)."""
    work = _float64_copy(block)
    work.eval()  # not chained: mmpretrain backbones override train() and return None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad(), torch.device(device):
            return work, getattr(work, method)()
    except ReparamError:
        raise
    except Exception as exc:  # third-party code: name the block, do not crash with a traceback
        raise ReparamError(
            f"block {path or '<root>'} ({type(block).__name__}): its own {method}() failed: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ) from None
    finally:
        torch.set_default_dtype(previous)


def native_fuse(block: nn.Module, path: str = "") -> nn.Module:
    """The deploy form of `block` from its own native method, computed on a float64 deep copy.

    Returns a new module in the block's dtype and training mode; `block` is not modified.
    """
    methods = native_methods(block)
    if not methods:
        raise ReparamError(f"block {path or '<root>'} ({type(block).__name__}) has no native deploy method")
    device, dtype = _device_and_dtype(block)
    first_error = None
    for method in methods:
        try:
            work, result = _call(block, method, device, dtype, path)
        except ReparamError as exc:  # the next method may be the one that works
            first_error = first_error or exc
            continue
        if result is None:
            result = work
        if isinstance(result, nn.Module):
            break
        first_error = first_error or ReparamError(
            f"block {path or '<root>'} ({type(block).__name__}): {method}() returned "
            f"{type(result).__name__}, not a module")
    else:
        raise first_error
    if dtype is not None:
        result = result.to(dtype)
    result.train(block.training)
    return result


def unchanged(block: nn.Module, deployed: nn.Module) -> bool:
    """Whether `deployed` (a `native_fuse` result) is the same function as `block` by construction:
    the same module types at the same paths and equal tensors, i.e. the method had nothing to do."""
    if [(n, type(m)) for n, m in block.named_modules()] != [(n, type(m)) for n, m in deployed.named_modules()]:
        return False
    a, b = block.state_dict(), deployed.state_dict()
    if a.keys() != b.keys():
        return False
    return all(x.shape == y.shape and x.dtype == y.dtype and (x.is_meta or torch.equal(x, y))
               for x, y in ((a[k], b[k]) for k in a))
