"""MobileNetV3 (Howard et al., ICCV 2019) in the layout of RefConv's reference training script
(Aiolus-X/RefConv, `ImageNet-MobileNetv3-RefConv.py`): every depthwise conv and the stem conv are
RefConvs (the script's `RepConv`: frozen base `weight` buffer + learned `convmap`), so the
checkpoints that script saves (`torch.save(net.module.state_dict())`) load unchanged.

Keys (the script's module tree):

* `features.0` stem: `0` RefConv 3x3 stride 2 (dense, one map per 2-d kernel), `1` BN, `2` h-swish;
* `features.1..15` (large) / `1..11` (small) bottlenecks, `conv.N`: `0` 1x1 expand conv, `1` BN,
  `2` act, `3` depthwise RefConv kxk, `4` BN, `5` SE (`fc.0`, `fc.2`: linear, no bias) or identity,
  `6` act, `7` 1x1 project conv, `8` BN; a residual where stride 1 and in == out;
* then a 1x1 conv-BN-h-swish, global pool, a 1x1 conv with bias to 1280, h-swish; `classifier.1`.

After conversion every RefConv is a plain conv holding W_b + convmap(W_b) (no bias), at the base
weight's key: the deploy model is a plain MobileNetV3 of the script's baseline layout.
h-swish and h-sigmoid are torch's Hardswish / Hardsigmoid (the same functions as the script's).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reparam_cli.blocks.refconv import RefConv

# k, expansion, out channels, SE, activation, stride: the paper's Tables 1 and 2 (as the script).
SETTINGS = {
    "large": ((3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
              (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
              (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
              (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
              (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1)),
    "small": ((3, 16, 16, True, "RE", 2), (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
              (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
              (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1), (5, 288, 96, True, "HS", 2),
              (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1)),
}
LAST_CONV = {"large": 960, "small": 576}
_ACT = {"RE": nn.ReLU, "HS": nn.Hardswish}


def round_up8(x: float) -> int:
    """The script's make_divisible: x rounded up to a multiple of 8."""
    return int(math.ceil(x / 8) * 8)


class SEModule(nn.Module):
    """Squeeze-excitation: x * h-sigmoid(fc(avgpool(x))), `fc` = Linear -> ReLU -> Linear -> h-sigmoid (no biases)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(),
                                nn.Linear(channels // reduction, channels, bias=False), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3))).view(x.shape[0], -1, 1, 1)


class MobileBottleneck(nn.Module):
    """(N, inp, H, W) -> (N, oup, H/stride, W/stride): expand 1x1, depthwise RefConv kxk, [SE], project 1x1."""

    def __init__(self, inp: int, oup: int, kernel: int, stride: int, exp: int, se: bool, nl: str, map_k: int = 3):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        act = _ACT[nl]
        self.conv = nn.Sequential(
            nn.Conv2d(inp, exp, 1, bias=False), nn.BatchNorm2d(exp), act(),
            RefConv(exp, exp, kernel, stride, groups=exp, map_k=map_k), nn.BatchNorm2d(exp),
            SEModule(exp) if se else nn.Identity(), act(),
            nn.Conv2d(exp, oup, 1, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV3(nn.Module):
    """MobileNetV3-Large / -Small with RefConv depthwise and stem convs: (N, 3, H, W) -> (N, n_class).

    Args:
        mode: "large" or "small".
        n_class, width_mult, dropout: as the script (dropout is inactive in eval mode).
        map_k: RefConv's refocusing kernel size (the script: 3).
    """

    def __init__(self, n_class: int = 1000, mode: str = "large", width_mult: float = 1.0, dropout: float = 0.8,
                 map_k: int = 3):
        super().__init__()
        if mode not in SETTINGS:
            raise ValueError(f"mode must be 'large' or 'small', got {mode!r}")
        last_channel = round_up8(1280 * width_mult) if width_mult > 1.0 else 1280
        inp = 16
        features: list[nn.Module] = [nn.Sequential(RefConv(3, inp, 3, 2, map_k=map_k), nn.BatchNorm2d(inp),
                                                   nn.Hardswish())]
        for k, exp, c, se, nl, s in SETTINGS[mode]:
            oup = round_up8(c * width_mult)
            features.append(MobileBottleneck(inp, oup, k, s, round_up8(exp * width_mult), se, nl, map_k))
            inp = oup
        last_conv = round_up8(LAST_CONV[mode] * width_mult)
        features += [
            nn.Sequential(nn.Conv2d(inp, last_conv, 1, bias=False), nn.BatchNorm2d(last_conv), nn.Hardswish()),
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(last_conv, last_channel, 1), nn.Hardswish(),
        ]
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, n_class))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))
