"""MobileOne (Vasu et al., CVPR 2023): k kxk conv-BN branches + 1x1 conv-BN + BN skip -> one kxk conv.

Key names follow Apple's reference implementation (`rbr_conv.<i>.conv` / `.bn`, `rbr_scale`,
`rbr_skip`, `se.reduce` / `se.expand`, `activation`; deploy conv `reparam_conv`; stages `stage0`
... `stage4`, `gap`, classifier `linear`), so its training checkpoints load unchanged and its
inference-mode checkpoints match ours key for key.

A MobileOne stage alternates a depthwise kxk block and a pointwise 1x1 block (a 1x1 block has
no scale branch: it would duplicate the conv branches).
"""

from __future__ import annotations

import torch
from torch import nn

from reparam_cli.blocks.common import ConvBN, StagedClassifier, check_centred_kernel, conv_bn_lazy
from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A


class SEBlock(nn.Module):
    """Squeeze-and-excitation as in MobileOne: global average -> `reduce` 1x1 -> ReLU -> `expand` 1x1 -> sigmoid."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625):
        super().__init__()
        hidden = int(in_channels * rd_ratio)
        if hidden < 1:
            raise ValueError(f"SEBlock over {in_channels} channels with rd_ratio {rd_ratio} has no hidden units")
        self.reduce = nn.Conv2d(in_channels, hidden, 1, bias=True)
        self.expand = nn.Conv2d(hidden, in_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class MobileOneBlock(nn.Module):
    """Training form: activation(se(sum_i rbr_conv[i](x) + rbr_scale(x) + rbr_skip(x))).

    (N, in_channels, H, W) -> (N, out_channels, H', W') as `nn.Conv2d(in, out, k, stride, k // 2,
    groups=groups)`. `rbr_scale` (1x1 conv-BN) exists when kernel_size > 1, `rbr_skip` (BN) when
    in == out and stride == 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1, use_se: bool = False,
                 num_conv_branches: int = 1):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        check_centred_kernel("MobileOneBlock", kernel_size, padding, dilation)
        if num_conv_branches < 1:
            raise ValueError(f"MobileOneBlock needs at least one conv branch, got {num_conv_branches}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.num_conv_branches = num_conv_branches
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            ConvBN(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
            for _ in range(num_conv_branches)
        )
        self.rbr_scale = ConvBN(in_channels, out_channels, 1, stride, 0, groups=groups) if kernel_size > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        if self.rbr_skip is not None:
            out = self.rbr_skip(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.activation(self.se(out))


class MobileOneDeployBlock(nn.Module):
    """Deploy form: activation(se(reparam_conv(x)))."""

    def __init__(self, reparam_conv: nn.Module, se: nn.Module, activation: nn.Module):
        super().__init__()
        self.se = se
        self.activation = activation
        self.reparam_conv = reparam_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.se(self.reparam_conv(x)))


@recipe(MobileOneBlock, family="mobileone")
def fuse_mobileone(block: MobileOneBlock) -> nn.Module:
    """add(conv branches, 1x1 padded to kxk, bn_as_conv(skip)) — P1, P2, P4, P8."""
    branches = [conv_bn_lazy(b) for b in block.rbr_conv]
    if block.rbr_scale is not None:
        branches.append(conv_bn_lazy(block.rbr_scale))
    if block.rbr_skip is not None:
        branches.append(A.bn_as_conv(block.rbr_skip, groups=block.groups, dtype=torch.float64))
    dtype = block.rbr_conv[0].conv.weight.dtype
    conv = A.to_module(A.add(*branches, dtype=dtype), dtype=dtype)
    return MobileOneDeployBlock(conv, block.se, block.activation)


class MobileOne(StagedClassifier):
    """The MobileOne classifier: stage0 (a dense 3x3 block, stride 2), four stages, GAP, linear.

    Each stage block is a depthwise 3x3 MobileOneBlock then a pointwise 1x1 one; the first of a
    stage has stride 2. With `use_se`, the last half of stage 3 and all of stage 4 have SE.

    Args:
        num_blocks_per_stage: depthwise+pointwise pairs per stage, [2, 8, 10, 1] in the paper.
        width_multipliers: multipliers of the base widths 64, 128, 256, 512.
        num_conv_branches: over-parameterization factor k of the stage blocks (stage0 has one).
    """

    def __init__(self, num_blocks_per_stage=(2, 8, 10, 1), num_classes: int = 1000,
                 width_multipliers=(0.75, 1.0, 1.0, 2.0), use_se: bool = False, num_conv_branches: int = 1,
                 in_channels: int = 3):
        super().__init__()
        if len(num_blocks_per_stage) != 4 or len(width_multipliers) != 4:
            raise ValueError("MobileOne needs four stage depths and four width multipliers")
        self.num_conv_branches = num_conv_branches
        self.in_planes = min(64, int(64 * width_multipliers[0]))
        self.stage0 = MobileOneBlock(in_channels, self.in_planes, 3, stride=2, padding=1)
        depths = list(num_blocks_per_stage)
        se_blocks = [0, 0, depths[2] // 2 if use_se else 0, depths[3] if use_se else 0]
        stages = [self._make_stage(int(base * m), n, se)
                  for base, m, n, se in zip((64, 128, 256, 512), width_multipliers, depths, se_blocks)]
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(int(512 * width_multipliers[3]), num_classes)

    def _make_stage(self, planes: int, num_blocks: int, num_se_blocks: int) -> nn.Sequential:
        blocks = []
        for i in range(num_blocks):
            use_se = i >= num_blocks - num_se_blocks
            blocks.append(MobileOneBlock(self.in_planes, self.in_planes, 3, stride=2 if i == 0 else 1, padding=1,
                                         groups=self.in_planes, use_se=use_se,
                                         num_conv_branches=self.num_conv_branches))
            blocks.append(MobileOneBlock(self.in_planes, planes, 1, stride=1, padding=0, use_se=use_se,
                                         num_conv_branches=self.num_conv_branches))
            self.in_planes = planes
        return nn.Sequential(*blocks)
