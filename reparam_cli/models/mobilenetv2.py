"""MobileNetV2 (Sandler et al., CVPR 2018) with torchvision's module layout and key names.

`depthwise="refconv"` makes every depthwise 3x3 conv a RefConv (its base weight keeps the key
`...conv.N.0.weight`, so a plain MobileNetV2 checkpoint supplies the frozen base weights); after
conversion the model is a plain MobileNetV2 again, key for key, with torchvision's parameter count
(3,504,872 at width 1.0 and 1000 classes). `depthwise="conv"` builds the plain network.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from reparam_cli.blocks.refconv import RefConv

# t (expansion), c (output channels), n (repeats), s (first stride): the paper's Table 2.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of `divisor`, never below 90% of v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    """conv -> BN -> ReLU6 as children 0, 1, 2 (torchvision's Conv2dNormActivation keys)."""

    def __init__(self, conv: nn.Module, channels: int):
        super().__init__(conv, nn.BatchNorm2d(channels), nn.ReLU6())


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)


class InvertedResidual(nn.Module):
    """[1x1 expand conv-BN-ReLU6] -> 3x3 depthwise conv-BN-ReLU6 -> 1x1 project conv -> BN, + x if shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, depthwise: str = "conv", map_k: int = 3):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(_conv(inp, hidden, 1), hidden))
        if depthwise == "refconv":
            dw: nn.Module = RefConv(hidden, hidden, 3, stride, 1, groups=hidden, map_k=map_k)
        elif depthwise == "conv":
            dw = _conv(hidden, hidden, 3, stride, groups=hidden)
        else:
            raise ValueError(f"depthwise must be 'conv' or 'refconv', got {depthwise!r}")
        layers += [ConvBNAct(dw, hidden), _conv(hidden, oup, 1), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier: `features` (stem, 17 inverted residuals, 1x1 conv to 1280), `classifier`.

    Args:
        num_classes, width_mult, round_nearest: as torchvision.
        depthwise: "conv" (plain) or "refconv" (every depthwise conv a RefConv).
        map_k: RefConv's refocusing kernel size.
        dropout: classifier dropout (inactive in eval mode).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8,
                 depthwise: str = "conv", map_k: int = 3, dropout: float = 0.2):
        super().__init__()
        inp = make_divisible(32 * width_mult, round_nearest)
        last = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNAct(_conv(3, inp, 3, 2), inp)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, t, depthwise, map_k))
                inp = out
        features.append(ConvBNAct(_conv(inp, last, 1), last))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(OrderedDict([("0", nn.Dropout(dropout)), ("1", nn.Linear(last, num_classes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))
