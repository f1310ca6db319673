"""MobileNetV1 whose 3x3 convs are re-parameterizable blocks (plain conv-BN, ACB or DBB).

The layout is that of the DBB repository's mobilenet.py: `conv1` (3x3 stride 2), `stem` of 13
blocks each with a 3x3 `depthwise` and a 1x1 `pointwise` conv-BN-ReLU, `gap`, `linear`. As in the
reference, the 3x3 convs (the stem conv and every depthwise conv) take the chosen block type and
the 1x1 convs stay plain, so its checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from reparam_cli.models.resnet import conv_unit

# conv1 width, then (depthwise, pointwise) widths of the 13 blocks.
MOBILE_CHANNELS = (32, 32, 64, 64, 128, 128, 128, 128, 256, 256, 256, 256, 512,
                   512, 512, 512, 512, 512, 512, 512, 512, 512, 512, 512, 1024, 1024, 1024)
STRIDE2_BLOCKS = (1, 3, 5, 11)


class MobileV1Block(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU, then pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, unit):
        super().__init__()
        self.depthwise = unit(in_planes, in_planes, 3, stride, 1, groups=in_planes, relu=True)
        self.pointwise = unit(in_planes, out_planes, 1, 1, 0, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """MobileNetV1 classifier (N, in_channels, H, W) -> (N, num_classes).

    Args:
        conv_type: "base", "acb" or "dbb" for the 3x3 convs.
        width_multiplier: scales every width (1.0 is the standard 4.2M-parameter network).
    """

    def __init__(self, conv_type: str = "base", num_classes: int = 1000, width_multiplier: float = 1.0,
                 in_channels: int = 3):
        super().__init__()
        unit = conv_unit(conv_type)
        ch = [int(c * width_multiplier) for c in MOBILE_CHANNELS]
        self.conv1 = unit(in_channels, ch[0], 3, 2, 1, relu=True)
        self.stem = nn.Sequential(*[
            MobileV1Block(ch[2 * i + 1], ch[2 * i + 2], 2 if i in STRIDE2_BLOCKS else 1, unit) for i in range(13)
        ])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(ch[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.gap(self.stem(self.conv1(x))), 1))
