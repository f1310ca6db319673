"""RepVGG (Ding et al., CVPR 2021): 3x3 conv-BN + 1x1 conv-BN + BN identity -> one 3x3 conv.

Key names follow the paper's reference implementation (`rbr_dense`, `rbr_1x1`, `rbr_identity`,
each branch with `conv` and `bn`; deploy conv `rbr_reparam`; stages `stage0` ... `stage4`,
classifier `linear`), so its training checkpoints load unchanged and its deploy checkpoints
match ours key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reparam_cli.blocks.common import ConvBN, StagedClassifier, check_centred_kernel, conv_bn_lazy
from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A


class SEBlock(nn.Module):
    """Squeeze-and-excitation as in RepVGG-plus / RepVGG-D2se (`down`, `up` 1x1 convs)."""

    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.up(F.relu(self.down(s))))


class RepVGGBlock(nn.Module):
    """Training form: act(se(dense(x) + one_by_one(x) + identity(x))).

    The identity branch (a BatchNorm) exists only when in == out channels and stride == 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, groups: int = 1, use_se: bool = False):
        super().__init__()
        check_centred_kernel("RepVGGBlock", kernel_size, padding)
        self.nonlinearity = nn.ReLU()
        self.se = SEBlock(out_channels, out_channels // 16) if use_se else nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.rbr_dense = ConvBN(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        self.rbr_1x1 = ConvBN(in_channels, out_channels, 1, stride, padding - kernel_size // 2, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(self.se(out))


class RepVGGDeployBlock(nn.Module):
    """Deploy form: act(se(rbr_reparam(x)))."""

    def __init__(self, rbr_reparam: nn.Module, se: nn.Module, nonlinearity: nn.Module):
        super().__init__()
        self.nonlinearity = nonlinearity
        self.se = se
        self.rbr_reparam = rbr_reparam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinearity(self.se(self.rbr_reparam(x)))


@recipe(RepVGGBlock, family="repvgg")
def fuse_repvgg(block: RepVGGBlock) -> nn.Module:
    """add(conv_bn(dense), conv_bn(1x1) padded to kxk, bn_as_conv(identity))."""
    branches = [conv_bn_lazy(block.rbr_dense), conv_bn_lazy(block.rbr_1x1)]
    if block.rbr_identity is not None:
        branches.append(A.bn_as_conv(block.rbr_identity, dtype=torch.float64))
    dtype = block.rbr_dense.conv.weight.dtype
    fused = A.add(*branches, dtype=dtype)  # summed in float64, written in the checkpoint's dtype
    conv = A.to_module(fused, dtype=dtype)
    return RepVGGDeployBlock(conv, block.se, block.nonlinearity)


# The layers the reference makes groupwise in the g2 / g4 variants (1-based block index).
OPTIONAL_GROUPWISE_LAYERS = tuple(range(2, 27, 2))


class RepVGG(StagedClassifier):
    """The RepVGG classifier: stage0 (one block, stride 2) and four stages of blocks, GAP, linear.

    Args:
        num_blocks: blocks in stages 1-4, e.g. [2, 4, 14, 1] for the A series.
        width_multiplier: channel multipliers a, a, a, b for the base widths 64, 128, 256, 512.
        groupwise: 1, or the group count used on the reference's optional groupwise layers (g2, g4).
        in_channels: image channels; num_classes: classifier outputs; use_se: SE after each block.
    """

    def __init__(self, num_blocks, width_multiplier, num_classes: int = 1000, groupwise: int = 1,
                 in_channels: int = 3, use_se: bool = False):
        super().__init__()
        if len(num_blocks) != 4 or len(width_multiplier) != 4:
            raise ValueError("RepVGG needs four stage depths and four width multipliers")
        groups_map = {i: groupwise for i in OPTIONAL_GROUPWISE_LAYERS} if groupwise > 1 else {}
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(in_channels, self.in_planes, 3, stride=2, padding=1, use_se=use_se)
        layer = 1
        stages = []
        for base, depth, mult in zip((64, 128, 256, 512), num_blocks, width_multiplier):
            planes = int(base * mult)
            blocks = []
            for i in range(depth):
                blocks.append(RepVGGBlock(self.in_planes, planes, 3, stride=2 if i == 0 else 1, padding=1,
                                          groups=groups_map.get(layer, 1), use_se=use_se))
                self.in_planes = planes
                layer += 1
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.in_planes, num_classes)
