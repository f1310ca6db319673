"""Inception-style depth concatenation (seed paradigm 3): parallel conv-BN branches of different
kernel sizes, and optionally an average-pool -> 1x1 conv-BN branch, concatenated along channels.

Every branch is one linear layer over the same input with the same stride and a centred window, so
the block is one conv whose kernel stacks the (zero-padded) branch kernels along the output axis:
`concat(fuse_bn(branch_i), sequential(avgpool, fuse_bn(pool 1x1)))` (P1, P3, P4, P5b, P7). The
activation after the concatenation stays. Grouped branches are written out densely: a concatenation
is ordered by branch, not by group, so no grouped conv reproduces it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from reparam_cli.blocks.common import ConvBN, conv_bn_kernel
from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A


class InceptionBlock(nn.Module):
    """Training form: act(cat([branches[i](x)], [pool_branch(x)])).

    Args:
        in_channels: input channels.
        branch_channels: output channels of each conv-BN branch.
        kernel_sizes: odd kernel size of each branch (same length as branch_channels).
        stride, groups: shared by all conv branches (the pool branch's 1x1 conv is dense).
        pool_channels: output channels of the 3x3 average-pool -> 1x1 conv-BN branch (0: none).
        act: apply a ReLU after the concatenation.
    """

    def __init__(self, in_channels: int, branch_channels: Sequence[int] = (8, 8, 8),
                 kernel_sizes: Sequence[int] = (1, 3, 5), stride: int = 1, groups: int = 1, pool_channels: int = 0,
                 act: bool = True):
        super().__init__()
        if len(branch_channels) != len(kernel_sizes) or not kernel_sizes:
            raise ValueError("branch_channels and kernel_sizes need one entry per branch")
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"branch kernels must be odd (centred windows), got {list(kernel_sizes)}")
        self.branches = nn.ModuleList(ConvBN(in_channels, c, k, stride, k // 2, groups=groups)
                                      for c, k in zip(branch_channels, kernel_sizes))
        self.pool_branch = None
        if pool_channels:
            self.pool_branch = nn.Sequential(nn.AvgPool2d(3, stride, 1), ConvBN(in_channels, pool_channels, 1))
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        if self.pool_branch is not None:
            outs.append(self.pool_branch(x))
        return self.act(torch.cat(outs, 1))


class InceptionDeployBlock(nn.Module):
    """Deploy form: act(conv(x)), one conv with the summed output channels of all branches."""

    def __init__(self, conv: nn.Module, act: nn.Module):
        super().__init__()
        self.conv = conv
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


@recipe(InceptionBlock, family="inception")
def fuse_inception(block: InceptionBlock) -> nn.Module:
    """concat(conv_bn(branch_i) ..., sequential(avgpool, conv_bn(pool 1x1)))."""
    kernels = [conv_bn_kernel(b) for b in block.branches]
    if block.pool_branch is not None:
        pool, conv_bn = block.pool_branch
        pool_k = A.avgpool(conv_bn.conv.in_channels, pool.kernel_size, pool.stride, pool.padding,
                           count_include_pad=pool.count_include_pad, ceil_mode=pool.ceil_mode,
                           divisor_override=pool.divisor_override, device=conv_bn.conv.weight.device)
        kernels.append(A.sequential(pool_k, conv_bn_kernel(conv_bn)))
    conv = A.to_module(A.concat(*kernels), dtype=block.branches[0].conv.weight.dtype)
    return InceptionDeployBlock(conv, block.act)
