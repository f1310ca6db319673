"""ResNet whose 3x3 convs are re-parameterizable blocks (plain conv-BN, ACB or DBB).

The layout is that of the DBB repository's resnet.py (shared by its ACB and DBB experiments):
`stage0.conv1` (7x7 conv-BN-ReLU) + `stage0.maxpool`, `stage1` ... `stage4` of blocks with
`conv1`, `conv2` (`conv3` in bottlenecks) and `shortcut`, then `gap` and `linear`. 1x1 and 7x7
convs are always plain `ConvBNAct` units; only the 3x3 convs take the chosen block type. So
checkpoints trained with that code load unchanged, and deploy keys match its deploy models.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from reparam_cli.blocks.acnet import ACBlock
from reparam_cli.blocks.common import StagedClassifier
from reparam_cli.blocks.dbb import ConvBNAct, DiverseBranchBlock

CONV_TYPES = ("base", "acb", "dbb")


def conv_unit(conv_type: str) -> Callable[..., nn.Module]:
    """A factory `f(in, out, kernel_size, stride, padding, groups, relu)` for the given conv type.

    As in the reference, a 1x1 or >= 7x7 conv is always a plain ConvBNAct.
    """
    if conv_type not in CONV_TYPES:
        raise ValueError(f"unknown conv_type {conv_type!r}; choose one of {', '.join(CONV_TYPES)}")

    def make(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
             groups: int = 1, relu: bool = False) -> nn.Module:
        act = nn.ReLU() if relu else None
        if conv_type == "base" or kernel_size == 1 or kernel_size >= 7:
            return ConvBNAct(in_channels, out_channels, kernel_size, stride, padding, groups=groups, nonlinear=act)
        if conv_type == "acb":
            return ACBlock(in_channels, out_channels, kernel_size, stride, padding, groups=groups, nonlinear=act)
        return DiverseBranchBlock(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                                  nonlinear=act)

    return make


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, unit: Callable[..., nn.Module]):
        super().__init__()
        if stride != 1 or in_planes != planes:
            self.shortcut = unit(in_planes, planes, 1, stride)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = unit(in_planes, planes, 3, stride, 1, relu=True)
        self.conv2 = unit(planes, planes, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, unit: Callable[..., nn.Module]):
        super().__init__()
        out = planes * self.expansion
        self.shortcut = unit(in_planes, out, 1, stride) if stride != 1 or in_planes != out else nn.Identity()
        self.conv1 = unit(in_planes, planes, 1, relu=True)
        self.conv2 = unit(planes, planes, 3, stride, 1, relu=True)
        self.conv3 = unit(planes, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResNet(StagedClassifier):
    """ResNet classifier (N, in_channels, H, W) -> (N, num_classes).

    Args:
        num_blocks: blocks per stage, [2, 2, 2, 2] for ResNet-18, [3, 4, 6, 3] for ResNet-50.
        conv_type: "base" (conv-BN), "acb" (ACNet) or "dbb" (Diverse Branch Block) for the 3x3 convs.
        block: "basic" or "bottleneck".
        width_multiplier: scales the base widths 64, 128, 256, 512.
    """

    def __init__(self, num_blocks=(2, 2, 2, 2), conv_type: str = "base", block: str = "basic",
                 num_classes: int = 1000, width_multiplier: float = 1.0, in_channels: int = 3):
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError("ResNet needs four stage depths")
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}.get(block)
        if block_cls is None:
            raise ValueError(f"unknown block {block!r}; choose basic or bottleneck")
        unit = conv_unit(conv_type)
        self.in_planes = int(64 * width_multiplier)
        self.stage0 = nn.Sequential()
        self.stage0.add_module("conv1", unit(in_channels, self.in_planes, 7, 2, 3, relu=True))
        self.stage0.add_module("maxpool", nn.MaxPool2d(3, 2, 1))
        stages = []
        for i, (base, depth) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            planes = int(base * width_multiplier)
            blocks = []
            for j in range(depth):
                blocks.append(block_cls(self.in_planes, planes, 2 if i > 0 and j == 0 else 1, unit))
                self.in_planes = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.in_planes, num_classes)
