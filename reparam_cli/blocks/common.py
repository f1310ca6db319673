"""Building blocks shared by several families: conv + BatchNorm, and its recipe."""

from __future__ import annotations

import torch
from torch import nn

from .. import algebra as A
from ..recipes import recipe

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ConvBN(nn.Sequential):
    """A bias-free conv followed by BatchNorm: submodules `conv` and `bn`.

    The key layout (`<name>.conv.weight`, `<name>.bn.running_mean`, ...) is the one used by the
    RepVGG, DBB and MobileOne reference implementations.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, ndim: int = 2):
        super().__init__()
        self.add_module("conv", _CONV[ndim](in_channels, out_channels, kernel_size, stride=stride,
                                            padding=padding, dilation=dilation, groups=groups, bias=False))
        self.add_module("bn", _BN[ndim](out_channels))


def conv_bn_kernel(branch: nn.Module) -> A.Kernel:
    """P1 on a `conv`+`bn` pair (a ConvBN, or any module with those two children), in float64."""
    return A.fuse_bn(A.from_module(branch.conv), branch.bn, dtype=torch.float64)


@recipe(ConvBN, family="conv-bn")
def fuse_conv_bn(block: ConvBN) -> nn.Module:
    """A lone conv + BN becomes one conv with bias."""
    return A.to_module(conv_bn_kernel(block), dtype=block.conv.weight.dtype)
