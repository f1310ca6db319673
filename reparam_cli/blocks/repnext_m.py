"""RepNeXt-M0 ... M5 (Zhao et al., 2024, "RepNeXt: A Fast Multi-Scale CNN using Structural
Reparameterization"), in the layout of the reference code (suous/RepNeXt, `model/repnext.py`), so
its training checkpoints load unchanged.

The network: a stem of two stride-2 conv-BN (`stem.stem.0/2`), four stages of MetaNeXt blocks
(`stages.i.blocks.j`), each stage but the first opened by a `Downsample`, global average pool, and
a classifier of two BN-linear heads (`head.head`, `head.head_dist`) averaged at inference.

* MetaNeXt block, `x + channel_mixer(norm(token_mixer(x)))` (a plain residual): `token_mixer` is a
  `ChunkConv` that splits the channels in four and keeps the first quarter (identity), gives the
  second to `RepDWConvS`, the third to `RepDWConvM` and the fourth to a 1x11 -> 11x1 depthwise pair
  (`conv_l`); `norm` a BN; `channel_mixer` 1x1 conv-BN, GELU, 1x1 conv-BN (`ConvNorm`: `conv`, `norm`).
* Downsample: `CopyConv` (stride-2 RepDWConvS and RepDWConvM on all channels, concatenated), BN,
  then `x + channel_mixer(x)`.
* RepDWConvS: depthwise 3x3 + 1x3 + 3x1 + 2x2 dilated 2 (stride 2: 3x3 + 3x1(1x3(x)) + 2x2 d2).
  RepDWConvM: depthwise 7x7 + 5x3 + 3x5 + 7x1(1x7(x)) + 5x1(1x5(x)).

Recipes (composed from `algebra`), producing the reference's own fused form key for key:
RepDWConvS/M -> one depthwise conv (P4 `add`, `undilate`, P5c `sequential` of 1xk -> kx1);
ConvNorm -> conv with bias (P1); NormLinear -> linear (P8 + P5); the classifier -> one linear, the
mean of its two heads. `conv_l` (two biased convs in a row: no single conv at the borders) and the
blocks' BNs stay, as in the reference's fused model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A


def _dw(channels: int, kernel_size, stride, padding, bias: bool, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size, stride, padding, dilation, groups=channels, bias=bias)


class ConvNorm(nn.Sequential):
    """conv -> BN, keys `conv`, `norm`: (N, in, H, W) -> (N, out, H', W')."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, groups: int = 1,
                 bias: bool = False):
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                                          bias=bias))
        self.add_module("norm", nn.BatchNorm2d(out_channels))


@recipe(ConvNorm, family="repnext")
def fuse_conv_norm(block: ConvNorm) -> nn.Module:
    """P1: conv + BN -> conv with bias."""
    return A.to_module(A.fuse_bn(A.from_module(block.conv), block.norm, dtype=torch.float64),
                       dtype=block.conv.weight.dtype)


class NormLinear(nn.Sequential):
    """BN1d -> linear, keys `norm`, `linear`: (N, in) -> (N, out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.add_module("norm", nn.BatchNorm1d(in_features))
        self.add_module("linear", nn.Linear(in_features, out_features, bias=bias))


def norm_linear_kernel(block: NormLinear) -> A.Kernel:
    """P8 then P5: the BN as a (diagonal) FC followed by the linear layer, in float64."""
    return A.sequential(A.bn_as_conv(block.norm, ndim=0, dtype=torch.float64),
                        A.from_module(block.linear, torch.float64))


@recipe(NormLinear, family="repnext")
def fuse_norm_linear(block: NormLinear) -> nn.Module:
    return A.to_module(norm_linear_kernel(block), dtype=block.linear.weight.dtype)


class RepDWConvS(nn.Module):
    """Small multi-scale depthwise conv (C -> C, stride 1 or 2): 3x3 + 1x3 + 3x1 + 2x2 dilated 2
    (stride 2: the 1x3 and 3x1 in a row, without biases)."""

    def __init__(self, in_channels: int, stride: int = 1, bias: bool = True):
        super().__init__()
        c, self.stride = in_channels, stride
        self.conv_3_3 = _dw(c, 3, stride, 1, bias)
        self.conv_3_w = _dw(c, (1, 3), (1, stride), (0, 1), bias and stride == 1)
        self.conv_3_h = _dw(c, (3, 1), (stride, 1), (1, 0), bias and stride == 1)
        self.conv_2_2 = _dw(c, 2, stride, 1, bias, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return self.conv_3_3(x) + self.conv_3_h(x) + self.conv_3_w(x) + self.conv_2_2(x)
        return self.conv_3_3(x) + self.conv_3_h(self.conv_3_w(x)) + self.conv_2_2(x)


@recipe(RepDWConvS, family="repnext")
def fuse_rep_dw_conv_s(block: RepDWConvS) -> nn.Module:
    """add(3x3, 1x3 + 3x1 (stride 2: sequential(1x3, 3x1)), undilate(2x2 d2)) -> one depthwise 3x3."""
    k = {name: A.from_module(getattr(block, name), torch.float64)
         for name in ("conv_3_3", "conv_3_w", "conv_3_h", "conv_2_2")}
    cross = [k["conv_3_w"], k["conv_3_h"]] if block.stride == 1 else [A.sequential(k["conv_3_w"], k["conv_3_h"])]
    fused = A.add(k["conv_3_3"], *cross, A.undilate(k["conv_2_2"]))
    return A.to_module(fused, dtype=block.conv_3_3.weight.dtype)


class RepDWConvM(nn.Module):
    """Medium multi-scale depthwise conv (C -> C, stride 1 or 2): 7x7 + 5x3 + 3x5 + 7x1(1x7) + 5x1(1x5)."""

    def __init__(self, in_channels: int, stride: int = 1, bias: bool = True):
        super().__init__()
        c = in_channels
        self.conv_7_7 = _dw(c, 7, stride, 3, bias)
        self.conv_5_3 = _dw(c, (5, 3), stride, (2, 1), bias)
        self.conv_3_5 = _dw(c, (3, 5), stride, (1, 2), bias)
        self.conv_7_w = _dw(c, (1, 7), (1, stride), (0, 3), False)
        self.conv_7_h = _dw(c, (7, 1), (stride, 1), (3, 0), False)
        self.conv_5_w = _dw(c, (1, 5), (1, stride), (0, 2), False)
        self.conv_5_h = _dw(c, (5, 1), (stride, 1), (2, 0), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv_7_7(x) + self.conv_5_3(x) + self.conv_3_5(x) + self.conv_7_h(self.conv_7_w(x))
                + self.conv_5_h(self.conv_5_w(x)))


@recipe(RepDWConvM, family="repnext")
def fuse_rep_dw_conv_m(block: RepDWConvM) -> nn.Module:
    """add(7x7, 5x3, 3x5, sequential(1x7, 7x1), sequential(1x5, 5x1)) -> one depthwise 7x7."""
    k = {name: A.from_module(conv, torch.float64) for name, conv in block.named_children()}
    fused = A.add(k["conv_7_7"], k["conv_5_3"], k["conv_3_5"], A.sequential(k["conv_7_w"], k["conv_7_h"]),
                  A.sequential(k["conv_5_w"], k["conv_5_h"]))
    return A.to_module(fused, dtype=block.conv_7_7.weight.dtype)


class ChunkConv(nn.Module):
    """Token mixer (C -> C, C divisible by 4): channels split in four quarters, [identity, RepDWConvS,
    RepDWConvM, 11x1(1x11)] applied to them in turn and concatenated."""

    def __init__(self, in_channels: int):
        super().__init__()
        if in_channels % 4:
            raise ValueError(f"ChunkConv needs channels divisible by 4, got {in_channels}")
        c = in_channels // 4
        self.conv_s = RepDWConvS(c)
        self.conv_m = RepDWConvM(c)
        self.conv_l = nn.Sequential(_dw(c, (1, 11), 1, (0, 5), True), _dw(c, (11, 1), 1, (5, 0), True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i, s, m, l = torch.chunk(x, 4, dim=1)
        return torch.cat((i, self.conv_s(s), self.conv_m(m), self.conv_l(l)), dim=1)


class CopyConv(nn.Module):
    """Downsampling token mixer (C -> 2C, stride 2): [RepDWConvS(x), RepDWConvM(x)] concatenated."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv_s = RepDWConvS(in_channels, stride=2)
        self.conv_m = RepDWConvM(in_channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.conv_s(x), self.conv_m(x)), dim=1)


def channel_mixer(channels: int, hidden: int) -> nn.Sequential:
    """1x1 conv-BN -> GELU -> 1x1 conv-BN (keys `0`, `1`, `2`)."""
    return nn.Sequential(ConvNorm(channels, hidden), nn.GELU(), ConvNorm(hidden, channels))


class MetaNeXtBlock(nn.Module):
    """x + channel_mixer(norm(token_mixer(x))): (N, C, H, W) -> same."""

    def __init__(self, in_channels: int, mlp_ratio: int):
        super().__init__()
        self.token_mixer = ChunkConv(in_channels)
        self.norm = nn.BatchNorm2d(in_channels)
        self.channel_mixer = channel_mixer(in_channels, in_channels * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channel_mixer(self.norm(self.token_mixer(x)))


class Downsample(nn.Module):
    """y = norm(CopyConv(x)); y + channel_mixer(y): (N, C, H, W) -> (N, 2C, H/2, W/2)."""

    def __init__(self, in_channels: int, mlp_ratio: int):
        super().__init__()
        out = 2 * in_channels
        self.token_mixer = CopyConv(in_channels)
        self.norm = nn.BatchNorm2d(out)
        self.channel_mixer = channel_mixer(out, out * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.token_mixer(x))
        return x + self.channel_mixer(x)


class RepNextClassifier(nn.Module):
    """(N, C) -> (N, classes): the mean of two BN-linear heads (`head`, `head_dist`, distillation);
    in training mode with `distillation` both outputs, as the reference."""

    def __init__(self, dim: int, num_classes: int, distillation: bool = True):
        super().__init__()
        self.distillation = distillation
        self.head = NormLinear(dim, num_classes)
        self.head_dist = NormLinear(dim, num_classes)

    def forward(self, x: torch.Tensor):
        x1, x2 = self.head(x), self.head_dist(x)
        if self.training and self.distillation:
            return x1, x2
        return (x1 + x2) / 2


@recipe(RepNextClassifier, family="repnext")
def fuse_classifier(block: RepNextClassifier) -> nn.Module:
    """(head + head_dist) / 2: add the two fused heads (P2), then halve (a scaled identity, P5b)."""
    both = A.add(norm_linear_kernel(block.head), norm_linear_kernel(block.head_dist))
    n = both.out_channels
    half = A.select_channels(n, range(n), scale=0.5, ndim=0, device=both.weight.device)
    return A.to_module(A.sequential(both, half), dtype=block.head.linear.weight.dtype)


class RepNextStem(nn.Module):
    """Two stride-2 3x3 conv-BN with a GELU between: (N, in, H, W) -> (N, out, H/4, W/4)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(in_channels, out_channels // 2, 3, 2, 1), nn.GELU(),
                                  ConvNorm(out_channels // 2, out_channels, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


class RepNextStage(nn.Module):
    """[Downsample] then `depth` MetaNeXt blocks (`downsample`, `blocks`)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, mlp_ratio: int, downsample: bool):
        super().__init__()
        self.downsample = Downsample(in_channels, mlp_ratio) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[MetaNeXtBlock(out_channels, mlp_ratio) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class RepNext(nn.Module):
    """The RepNeXt-M classifier: (N, 3, H, W) -> (N, num_classes), H and W multiples of 32.

    Args:
        embed_dim: channels per stage (each twice the previous, as Downsample doubles them).
        depth: MetaNeXt blocks per stage.
        mlp_ratio: channel mixer expansion (2 in every published model).
        num_classes, distillation: the classifier's (two heads; their mean at inference).
    """

    def __init__(self, in_chans: int = 3, embed_dim: Sequence[int] = (48,), depth: Sequence[int] = (2,),
                 mlp_ratio: int = 2, num_classes: int = 1000, distillation: bool = True):
        super().__init__()
        if len(embed_dim) != len(depth):
            raise ValueError("embed_dim and depth need one entry per stage")
        if any(b != 2 * a for a, b in zip(embed_dim, embed_dim[1:])):
            raise ValueError(f"each stage must double the channels (Downsample), got {tuple(embed_dim)}")
        self.stem = RepNextStem(in_chans, embed_dim[0])
        self.stages = nn.Sequential(*[
            RepNextStage(embed_dim[max(i - 1, 0)], embed_dim[i], depth[i], mlp_ratio, downsample=i > 0)
            for i in range(len(embed_dim))
        ])
        self.head = RepNextClassifier(embed_dim[-1], num_classes, distillation)

    def forward(self, x: torch.Tensor):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


# The published models (embed_dim, depth); mlp_ratio 2 throughout.
VARIANTS = {
    "m0": ((40, 80, 160, 320), (2, 2, 9, 1)),
    "m1": ((48, 96, 192, 384), (3, 3, 15, 2)),
    "m2": ((56, 112, 224, 448), (3, 3, 15, 2)),
    "m3": ((64, 128, 256, 512), (3, 3, 13, 2)),
    "m4": ((64, 128, 256, 512), (5, 5, 25, 4)),
    "m5": ((80, 160, 320, 640), (7, 7, 35, 2)),
}
