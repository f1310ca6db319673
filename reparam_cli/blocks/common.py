"""Building blocks shared by several families: conv + BatchNorm, and its recipe."""

from __future__ import annotations

import torch
from torch import nn

from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A

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


class StagedClassifier(nn.Module):
    """stage0 -> stage1 ... stage4 -> global average pool `gap` -> `linear`: (N, C, H, W) -> (N, classes).

    The layout (and key names) that RepVGG, MobileOne and the DBB repository's ResNet share;
    subclasses build the stages, `gap` and `linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stage0(x)))))
        return self.linear(torch.flatten(self.gap(x), 1))


def check_centred_kernel(block: str, kernel_size: int, padding: int, dilation: int = 1) -> None:
    """Raise ValueError unless the kernel is odd with padding kernel_size // 2 and dilation 1: the
    geometry under which every branch of a RepVGG / DBB / MobileOne block lines up."""
    if kernel_size % 2 == 0 or padding != kernel_size // 2:
        raise ValueError(f"{block} needs an odd kernel with padding kernel_size // 2, "
                         f"got kernel {kernel_size}, padding {padding}")
    if dilation != 1:
        raise ValueError(f"{block} supports dilation 1 only (as the reference)")


def conv_bn_kernel(branch: nn.Module) -> A.Kernel:
    """P1 on a `conv`+`bn` pair (a ConvBN, or any module with those two children), in float64."""
    return A.fuse_bn(A.from_module(branch.conv), branch.bn, dtype=torch.float64)


def conv_bn_lazy(branch: nn.Module) -> A.ScaledKernel:
    """P1 on a `conv`+`bn` pair for a branch that goes straight into `algebra.add` (no weight copy)."""
    return A.fuse_bn_lazy(A.from_module(branch.conv), branch.bn)


@recipe(ConvBN, family="conv-bn")
def fuse_conv_bn(block: ConvBN) -> nn.Module:
    """A lone conv + BN becomes one conv with bias."""
    return A.to_module(conv_bn_kernel(block), dtype=block.conv.weight.dtype)
