"""DigitsNet: a small RepVGG-style classifier for 8x8 grey images (scikit-learn's digits).

It is the network of the shipped demo (`examples/digits-repvgg.*`, trained by
`scripts/train_demo.py`): a stem block at full resolution, then stages whose first block halves
the resolution, global average pooling and a linear classifier. Every block is a RepVGGBlock,
so the deploy form is a plain stack of 3x3 conv + ReLU.

Key names follow RepVGG (`stage0`, `stage1`, ..., `linear`), so the checkpoint reads like one.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from reparam_cli.blocks.repvgg import RepVGGBlock


class DigitsNet(nn.Module):
    """RepVGG-style classifier.

    Args:
        widths: output channels of the stem (`stage0`) and of each following stage.
        depths: number of blocks in each stage after the stem (len(widths) - 1 entries); the
            first block of every stage has stride 2.
        in_channels: image channels; num_classes: classifier outputs.

    Input (N, in_channels, H, W) -> logits (N, num_classes). With the defaults and 8x8 inputs the
    feature maps are 8x8 (stem), 4x4 (stage1), 2x2 (stage2).
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (2, 2),
                 in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        if len(depths) != len(widths) - 1 or any(d < 1 for d in depths):
            raise ValueError("DigitsNet needs one depth >= 1 per stage after the stem (len(widths) - 1)")
        self.stage0 = RepVGGBlock(in_channels, widths[0], 3, stride=1, padding=1)
        planes = widths[0]
        for s, (width, depth) in enumerate(zip(widths[1:], depths), start=1):
            blocks = [RepVGGBlock(planes if i == 0 else width, width, 3, stride=2 if i == 0 else 1, padding=1)
                      for i in range(depth)]
            self.add_module(f"stage{s}", nn.Sequential(*blocks))
            planes = width
        self.num_stages = len(widths)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(self.num_stages):
            x = getattr(self, f"stage{s}")(x)
        return self.linear(torch.flatten(self.gap(x), 1))
