"""RepMLP / RepMLPNet (Ding et al., CVPR 2022): locality injected into a partition FC.

A RepMLP block sees its input as non-overlapping h x w partitions. Per partition it applies

* the partition perceptron: FC3, one FC over each share-set's flattened (h, w) map (a 1x1 conv with
  `num_sharesets` groups over S*h*w channels), then a BatchNorm over the S share-sets;
* the local perceptron: depthwise kxk conv + BN branches over the same (S, h, w) view;
* the global perceptron: a squeeze-excitation-like gate over the whole map (unchanged by fusion).

The channels C of the block are folded into C / S samples of S channels each, so all channel sets
share the same FC3 and conv weights. Deployment folds the local perceptron into FC3 with the
conv -> FC transformation (algebra.conv_as_fc, per share-set) and BN folding: the deploy block holds
FC3 (with bias) where the local perceptron was, and nothing else changes.

Key names follow the reference implementation (DingXiaoH/RepMLP, repmlpnet.py): `gp.fc1`, `gp.fc2`,
`fc3`, `fc3_bn`, `repconv{k}.conv` / `.bn`; units `repmlp_block`, `ffn_block.ffn_fc1/2`, `prebn1/2`;
the network `conv_embedding`, `stages.i.j`, `embeds.i`, `head_norm`, `head`. The deploy form is the
reference's own (`RepMLPNet(deploy=True)` after `locality_injection()`): each RepMLP block holds
`gp.*` and `fc3.weight/bias`, and everything else keeps its training keys (the reference leaves its
conv-BN pairs, pre-BNs and head norm unfused), so a reparam deploy file loads strictly into the
reference deploy model.

One deliberate difference: the reference reassembles the partitions with a reshape that is only a
correct inverse of the partitioning when an image holds a single partition per axis (H == h, which
is how every RepMLPNet is configured); here the inverse is exact for any number of partitions, and
identical to the reference when H == h and W == w.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from reparam_cli.blocks.common import ConvBN, conv_bn_kernel
from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A


class GlobalPerceptron(nn.Module):
    """Gate (N, C, 1, 1) in (0, 1): avg pool -> fc1 (1x1 conv) -> ReLU -> fc2 -> sigmoid."""

    def __init__(self, input_channels: int, internal_neurons: int):
        super().__init__()
        self.fc1 = nn.Conv2d(input_channels, internal_neurons, 1, bias=True)
        self.fc2 = nn.Conv2d(internal_neurons, input_channels, 1, bias=True)
        self.input_channels = input_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x))))


def _partition(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/h, W/w, C, h, w): the non-overlapping h x w partitions of every channel."""
    n, c, height, width = x.shape
    if height % h or width % w:
        raise ValueError(f"RepMLP partitions of {h}x{w} do not tile a {height}x{width} input")
    return x.reshape(n, c, height // h, h, width // w, w).permute(0, 2, 4, 1, 3, 5)


def _unpartition(p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of `_partition`: (N, H/h, W/w, C, h, w) -> (N, C, H, W)."""
    return p.permute(0, 3, 1, 4, 2, 5).reshape(shape)


class _RepMLPBase(nn.Module):
    """What training and deploy blocks share: the partition geometry and the global gate."""

    C: int
    S: int
    h: int
    w: int
    gp: GlobalPerceptron

    def _partition_fc(self, x: torch.Tensor) -> torch.Tensor:
        """The partitioned perceptrons on x (N, C, H, W), gated by the global perceptron."""
        gate = self.gp(x)
        parts = _partition(x, self.h, self.w)                # (N, hp, wp, C, h, w)
        maps = parts.reshape(-1, self.S, self.h, self.w)     # C/S samples of S share-set maps per partition
        out = self._perceptrons(maps)                        # (M, S, h, w)
        return _unpartition(out.reshape(parts.shape), x.shape) * gate

    def _perceptrons(self, maps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fc3(self, maps: torch.Tensor) -> torch.Tensor:
        """FC3 on maps (M, S, h, w): per share-set an FC over the flattened h*w map."""
        out = self.fc3(maps.reshape(-1, self.S * self.h * self.w, 1, 1))
        return out.reshape(-1, self.S, self.h, self.w)


class RepMLPBlock(_RepMLPBase):
    """Training form: gate * unpartition(fc3_bn(fc3(p)) + sum_k repconv{k}(p)) over partitions p.

    Args:
        in_channels, out_channels: equal (the block is applied with a residual).
        h, w: partition size; the input's H, W must be multiples of it.
        reparam_conv_k: kernel sizes of the local perceptron's depthwise conv-BN branches (odd), or None.
        globalperceptron_reduce: channel reduction inside the global perceptron.
        num_sharesets: S, channels per FC3 sample; must divide in_channels.
    """

    def __init__(self, in_channels: int, out_channels: int, h: int, w: int,
                 reparam_conv_k: Sequence[int] | None = None, globalperceptron_reduce: int = 4,
                 num_sharesets: int = 1):
        super().__init__()
        if in_channels != out_channels:
            raise ValueError("RepMLPBlock needs in_channels == out_channels")
        if in_channels % num_sharesets:
            raise ValueError(f"{num_sharesets} share-sets do not divide {in_channels} channels")
        self.C, self.O, self.S, self.h, self.w = in_channels, out_channels, num_sharesets, h, w
        self.gp = GlobalPerceptron(in_channels, in_channels // globalperceptron_reduce)
        hw_s = h * w * num_sharesets
        self.fc3 = nn.Conv2d(hw_s, hw_s, 1, 1, 0, bias=False, groups=num_sharesets)
        self.fc3_bn = nn.BatchNorm2d(num_sharesets)
        self.reparam_conv_k = tuple(reparam_conv_k) if reparam_conv_k else None
        for k in self.reparam_conv_k or ():
            if k % 2 == 0:
                raise ValueError(f"local perceptron kernels must be odd, got {k}")
            self.add_module(f"repconv{k}", ConvBN(num_sharesets, num_sharesets, k, 1, k // 2, groups=num_sharesets))

    def local_branches(self) -> list[ConvBN]:
        return [getattr(self, f"repconv{k}") for k in self.reparam_conv_k or ()]

    def _perceptrons(self, maps: torch.Tensor) -> torch.Tensor:
        out = self.fc3_bn(self._fc3(maps))
        for branch in self.local_branches():
            out = out + branch(maps)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._partition_fc(x)


class RepMLPDeployBlock(_RepMLPBase):
    """Deploy form: gate * unpartition(fc3(p)), fc3 a grouped 1x1 conv with bias (an FC per share-set)."""

    def __init__(self, gp: GlobalPerceptron, fc3: nn.Module, channels: int, h: int, w: int, num_sharesets: int):
        super().__init__()
        self.C, self.O, self.S, self.h, self.w = channels, channels, num_sharesets, h, w
        self.gp = gp
        self.fc3 = fc3

    def _perceptrons(self, maps: torch.Tensor) -> torch.Tensor:
        return self._fc3(maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._partition_fc(x)


@recipe(RepMLPBlock, family="repmlp")
def fuse_repmlp(block: RepMLPBlock) -> nn.Module:
    """add(fuse_bn(fc3, repeat_bn(fc3_bn, h*w)), linear_as_conv(conv_as_fc(add(conv_bn(repconv_k)), (S, h, w))))."""
    fc3 = A.fuse_bn(A.from_module(block.fc3), A.repeat_bn(block.fc3_bn, block.h * block.w), dtype=torch.float64)
    branches = [conv_bn_kernel(b) for b in block.local_branches()]
    if branches:
        local = A.conv_as_fc(A.add(*branches), (block.S, block.h, block.w))  # FC with S groups
        fc3 = A.add(fc3, A.linear_as_conv(local))
    fc = A.to_module(fc3, dtype=block.fc3.weight.dtype)
    return RepMLPDeployBlock(block.gp, fc, block.C, block.h, block.w, block.S)


class ConvBNPair(nn.Sequential):
    """conv (no bias) -> BN with the reference's keys (`conv`, `bn`), the reference's `conv_bn`.

    Deliberately not a `common.ConvBN` (which has a recipe): the reference deploy model keeps these
    conv-BN pairs unfused, and so does reparam, so that deploy files load strictly into it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, groups: int = 1):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_channels),
        ))


class ConvBNReLU(ConvBNPair):
    """conv -> BN -> ReLU with the reference's keys (`conv`, `bn`, `relu`); kept as is at deploy."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups)
        self.add_module("relu", nn.ReLU())


class FFNBlock(nn.Module):
    """conv-BN 1x1 -> GELU -> conv-BN 1x1 (`ffn_fc1`, `act`, `ffn_fc2`)."""

    def __init__(self, in_channels: int, hidden_channels: int | None = None, out_channels: int | None = None):
        super().__init__()
        hidden = hidden_channels or in_channels
        self.ffn_fc1 = ConvBNPair(in_channels, hidden, 1)
        self.ffn_fc2 = ConvBNPair(hidden, out_channels or in_channels, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_fc2(self.act(self.ffn_fc1(x)))


class RepMLPNetUnit(nn.Module):
    """x + repmlp(prebn1(x)), then + ffn(prebn2(.))."""

    def __init__(self, channels: int, h: int, w: int, reparam_conv_k, globalperceptron_reduce: int,
                 ffn_expand: int = 4, num_sharesets: int = 1):
        super().__init__()
        self.repmlp_block = RepMLPBlock(channels, channels, h, w, reparam_conv_k, globalperceptron_reduce,
                                        num_sharesets)
        self.ffn_block = FFNBlock(channels, channels * ffn_expand)
        self.prebn1 = nn.BatchNorm2d(channels)
        self.prebn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.repmlp_block(self.prebn1(x))
        return y + self.ffn_block(self.prebn2(y))


class RepMLPNet(nn.Module):
    """The RepMLPNet classifier: patch embedding, stages of RepMLPNet units with 2x2 embeddings
    between them, BN, global average pool, linear head.

    Stage i works on (H / patch / 2^i) x (W / patch / 2^i) maps partitioned into hs[i] x ws[i];
    the input size must make those maps multiples of the partitions (224 for hs = 56, 28, 14, 7).
    """

    def __init__(self, in_channels: int = 3, num_class: int = 1000, patch_size=(4, 4),
                 num_blocks=(2, 2, 6, 2), channels=(64, 128, 256, 512), hs=(56, 28, 14, 7), ws=(56, 28, 14, 7),
                 sharesets_nums=(1, 4, 16, 128), reparam_conv_k=(1, 3), globalperceptron_reduce: int = 4):
        super().__init__()
        n = len(num_blocks)
        if not (len(channels) == len(hs) == len(ws) == len(sharesets_nums) == n):
            raise ValueError("num_blocks, channels, hs, ws and sharesets_nums need one entry per stage")
        patch_size = tuple(patch_size)
        self.conv_embedding = ConvBNReLU(in_channels, channels[0], patch_size, patch_size, 0)
        self.stages = nn.ModuleList(
            nn.ModuleList(RepMLPNetUnit(channels[i], hs[i], ws[i], reparam_conv_k, globalperceptron_reduce,
                                        ffn_expand=4, num_sharesets=sharesets_nums[i]) for _ in range(num_blocks[i]))
            for i in range(n)
        )
        self.embeds = nn.ModuleList(ConvBNReLU(channels[i], channels[i + 1], 2, 2, 0) for i in range(n - 1))
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.head = nn.Linear(channels[-1], num_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_embedding(x)
        for i, stage in enumerate(self.stages):
            for unit in stage:
                x = unit(x)
            if i < len(self.embeds):
                x = self.embeds[i](x)
        x = F.adaptive_avg_pool2d(self.head_norm(x), 1)
        return self.head(torch.flatten(x, 1))
