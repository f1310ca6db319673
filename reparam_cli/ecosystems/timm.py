"""timm: `--spec timm:<model>[?key=value&...]` and what reparam needs to know about timm models.

The model is built with `timm.create_model(name, pretrained=False, **kwargs)`: weights come from
the checkpoint, nothing is downloaded. Query values are YAML scalars or lists
(`timm:repvgg_a0?num_classes=10&in_chans=1`). The verification input shape is the model's default
pretrained config (`input_size`), with `in_chans` applied. In a YAML spec, `builder:
timm:create_model` with `args: {model_name: repvgg_a0, ...}` does the same.

timm's blocks fuse themselves with `fuse()` / `reparameterize()` / `switch_to_deploy()` (the
conventions `timm.models.reparameterize_model` walks): the engine's native fallback converts
them, see `reparam_cli.native`. train.py checkpoints (`model_best.pth.tar`: `state_dict`,
`state_dict_ema`, `args` as an argparse Namespace) are read by `reparam_cli.checkpoint`.
"""

from __future__ import annotations

from typing import Any

from reparam_cli.core.spec import DEFAULT_INPUT_SHAPE, ModelSpec, TIMM_BUILDERS, _shape, library_ref
from reparam_cli.errors import SpecError
from reparam_cli.extras import import_extra

PREFIX = "timm:"
_REFUSED = {"pretrained": "weights come from the checkpoint, nothing is downloaded",
            "checkpoint_path": "pass the checkpoint to reparam instead",
            "pretrained_cfg_overlay": "weights come from the checkpoint, nothing is downloaded"}


def import_timm():
    """`import timm`, or a SpecError saying how to install it."""
    return import_extra("timm", "timm", "timm specs", SpecError)


def timm_create_model(model_name: str, **kwargs: Any):
    """`timm.create_model(model_name, pretrained=False, **kwargs)`, with errors a user can act on."""
    timm = import_timm()
    for key, why in _REFUSED.items():
        if kwargs.get(key):
            raise SpecError(f"timm spec {model_name!r}: {key} is not allowed ({why})")
        kwargs.pop(key, None)
    if not timm.is_model(model_name):
        import difflib

        close = difflib.get_close_matches(model_name, timm.list_models(), n=4, cutoff=0.6)
        raise SpecError(f"timm has no model {model_name!r}",
                        hint=f"did you mean {', '.join(close)}?" if close else "see timm.list_models()")
    return timm.create_model(model_name, pretrained=False, **kwargs)


def default_input_shape(model_name: str, in_chans: Any = None) -> tuple[int, ...]:
    """(1, C, H, W) from timm's pretrained config of the model (DEFAULT_INPUT_SHAPE without one)."""
    cfg = import_timm().get_pretrained_cfg(model_name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    shape = (1, *size) if size else DEFAULT_INPUT_SHAPE
    if isinstance(in_chans, int):
        shape = (shape[0], in_chans, *shape[2:])
    return shape


def timm_spec(ref: str) -> ModelSpec:
    """`timm:<model_name>[?key=value&...]` -> a spec building that timm model (see the module doc)."""
    model_name, args = library_ref(ref, PREFIX, "timm", "timm:repvgg_a0?num_classes=10")
    if not import_timm().is_model(model_name):
        timm_create_model(model_name)  # raises with suggestions
    return ModelSpec(name=ref, builder=TIMM_BUILDERS[0], args={"model_name": model_name, **args},
                     input_shape=_shape(default_input_shape(model_name, args.get("in_chans")), ref),
                     description=f"timm model {model_name}", source=ref)


spec = timm_spec  # the ecosystem file's spec resolver (see reparam_cli.ecosystems)


# --------------------------------------------------------------------------- timm's own blocks
# RepVGG and MobileOne blocks (timm.models.byobnet) fused by recipes composing `algebra` instead of
# their own `reparameterize()`: the same deploy layout (`reparam_conv`, the branches gone), summed
# in float64 and rounded once (timm sums in the weights' dtype), without a float64 copy of the
# block. Anything the recipes do not know is `Declined`: the block's own method runs instead.

try:
    from timm.layers import BatchNormAct2d, ConvNormAct
    from timm.models.byobnet import MobileOneBlock, RepVggBlock
except ImportError:  # timm missing or changed: its blocks keep their own methods
    RepVggBlock = MobileOneBlock = None
else:
    import torch
    from torch import nn

    from reparam_cli.blocks.common import conv_bn_lazy
    from reparam_cli.blocks.registry import Declined, recipe
    from reparam_cli.core import algebra as A
    from reparam_cli.core.tensors import shallow_copy

    FAMILY = "timm"

    def _plain_bn(bn: nn.Module) -> bool:
        """A timm BatchNormAct2d that is only a BatchNorm in eval mode (no activation, no drop layer)."""
        return (type(bn) is BatchNormAct2d and type(bn.act) is nn.Identity and type(bn.drop) is nn.Identity
                and bn.track_running_stats and bn.running_mean is not None)

    def _conv_bn(branch: nn.Module, kernel: int) -> bool:
        conv = getattr(branch, "conv", None)
        return (type(branch) is ConvNormAct and getattr(branch, "aa", None) is None and type(conv) is nn.Conv2d
                and _plain_bn(branch.bn) and conv.kernel_size == (kernel, kernel) and conv.dilation == (1, 1)
                and conv.padding == (kernel // 2, kernel // 2) and conv.padding_mode == "zeros")

    def _deploy(block: nn.Module, branches: list, drop: tuple[str, ...], dtype: torch.dtype) -> nn.Module:
        """timm's deploy form of `block`: `reparam_conv` = the sum of `branches`, the training branches
        gone (as its `reparameterize()` leaves it). `block` is not modified."""
        conv = A.to_module(A.add(*branches, dtype=dtype), dtype=dtype)
        new = shallow_copy(block)
        for name in drop:
            new._modules.pop(name, None)
        new.__dict__.pop("reparam_conv", None)
        new.reparam_conv = conv
        return new

    def _identity(block: nn.Module) -> list:
        if block.identity is None:
            return []
        if not _plain_bn(block.identity):
            raise Declined
        return [A.bn_as_conv(block.identity, groups=block.groups, dtype=torch.float64)]

    def _common(block: nn.Module, base: type) -> None:
        if type(block) is not base or block.reparam_conv is not None:
            raise Declined  # a subclass, or already in deploy form

    @recipe(RepVggBlock, family=FAMILY, replaces_native=True)
    def fuse_repvgg_block(block: RepVggBlock) -> nn.Module:
        """timm RepVggBlock: act(attn(conv_kxk(x) + conv_1x1(x) + identity(x))) -> act(attn(reparam_conv(x)))."""
        _common(block, RepVggBlock)
        k = block.conv_kxk.conv.kernel_size[0]
        if not (_conv_bn(block.conv_kxk, k) and (block.conv_1x1 is None or _conv_bn(block.conv_1x1, 1))):
            raise Declined
        branches = [conv_bn_lazy(block.conv_kxk)]
        if block.conv_1x1 is not None:
            branches.append(conv_bn_lazy(block.conv_1x1))
        return _deploy(block, branches + _identity(block), ("conv_kxk", "conv_1x1", "identity", "drop_path"),
                       block.conv_kxk.conv.weight.dtype)

    @recipe(MobileOneBlock, family=FAMILY, replaces_native=True)
    def fuse_mobileone_block(block: MobileOneBlock) -> nn.Module:
        """timm MobileOneBlock: act(attn(sum conv_kxk[i](x) + conv_scale(x) + identity(x))) -> act(attn(reparam_conv(x)))."""
        _common(block, MobileOneBlock)
        if not block.conv_kxk:
            raise Declined
        k = block.conv_kxk[0].conv.kernel_size[0]
        if not (all(_conv_bn(b, k) for b in block.conv_kxk)
                and (block.conv_scale is None or _conv_bn(block.conv_scale, 1))):
            raise Declined
        branches = [conv_bn_lazy(b) for b in block.conv_kxk]
        if block.conv_scale is not None:
            branches.append(conv_bn_lazy(block.conv_scale))
        return _deploy(block, branches + _identity(block), ("conv_kxk", "conv_scale", "identity", "drop_path"),
                       block.conv_kxk[0].conv.weight.dtype)
