"""Diverse Branch Block (Ding et al., CVPR 2021): four branches -> one kxk conv.

    dbb_origin    kxk conv-BN
    dbb_1x1       1x1 conv-BN                                  (absent when depthwise)
    dbb_avg       [1x1 conv -> BN-and-pad] -> kxk avgpool -> BN (no conv when depthwise)
    dbb_1x1_kxk   1x1 conv (or identity-based 1x1) -> BN-and-pad -> kxk conv -> BN

Key names and structure follow the reference implementation (`dbb_origin.conv`, `dbb_avg.bn.bn`,
`dbb_1x1_kxk.idconv1`, `dbb_1x1_kxk.bn1.bn`, ...; deploy conv `dbb_reparam`), so its training
checkpoints load unchanged and its deploy checkpoints match ours key for key.

Borders are exact: the reference pads the 1x1 branches' intermediate maps with the BN's output
for a zero input (BNAndPadLayer), not with zeros. A 1x1 conv-BN that pads its own input with
zeros produces exactly that value on the ring, so the recipe moves the padding onto the 1x1
kernel before chaining it into the kxk layer (see `algebra.sequential`).

Also here: `ConvBNAct`, the reference's plain conv-BN-nonlinear unit (convnet_utils.ConvBN) that
the DBB / ACB ResNets and MobileNets use for their 1x1 and 7x7 convs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from reparam_cli.blocks.common import ConvBN, check_centred_kernel, conv_bn_kernel, conv_bn_lazy
from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A


class ConvBNAct(ConvBN):
    """conv (no bias) -> bn -> nonlinear; keys `conv`, `bn` like the reference's convnet_utils.ConvBN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, nonlinear: nn.Module | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.add_module("nonlinear", nonlinear if nonlinear is not None else nn.Identity())


class ConvAct(nn.Sequential):
    """Deploy form of ConvBNAct: conv (with bias) -> nonlinear; keys `conv.weight`, `conv.bias`."""

    def __init__(self, conv: nn.Module, nonlinear: nn.Module):
        super().__init__()
        self.add_module("conv", conv)
        self.add_module("nonlinear", nonlinear)


@recipe(ConvBNAct, family="conv-bn")
def fuse_conv_bn_act(block: ConvBNAct) -> nn.Module:
    """P1: conv + BN -> conv with bias; the nonlinearity is kept."""
    return ConvAct(A.to_module(conv_bn_kernel(block), dtype=block.conv.weight.dtype), block.nonlinear)


class IdentityBasedConv1x1(nn.Conv2d):
    """A grouped 1x1 conv whose effective kernel is `weight + identity` (weight starts at zero).

    The identity is built on the fly (not stored), so the module also works when it was built on
    the meta device and its weight was assigned from a checkpoint. Shape (N, C, H, W) -> same.
    """

    def __init__(self, channels: int, groups: int = 1):
        super().__init__(channels, channels, 1, stride=1, padding=0, groups=groups, bias=False)
        nn.init.zeros_(self.weight)

    def identity(self) -> torch.Tensor:
        """(C, C // groups, 1, 1): 1 at [i, i % (C // groups)] (paradigm P6a)."""
        return A.identity(self.out_channels, 1, self.groups, dtype=self.weight.dtype, device=self.weight.device).weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight + self.identity(), None, 1, 0, self.dilation, self.groups)


class BNAndPadLayer(nn.Module):
    """BatchNorm, then a ring of `pad_pixels` filled with the BN's output for a zero input.

    (N, C, H, W) -> (N, C, H + 2p, W + 2p). The ring value uses the running statistics, as the
    reference does (also in training mode).
    """

    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(x)
        p = self.pad_pixels
        if p <= 0:
            return out
        bn = self.bn
        value = -bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
        if bn.affine:
            value = bn.bias.detach() + value * bn.weight.detach()
        out = F.pad(out, [p] * 4)
        v = value.view(1, -1, 1, 1)
        out[:, :, :p, :] = v
        out[:, :, -p:, :] = v
        out[:, :, :, :p] = v
        out[:, :, :, -p:] = v
        return out


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
             dilation: int = 1, groups: int = 1) -> nn.Sequential:
    """conv (no bias) + BN as an nn.Sequential with children `conv`, `bn` (the reference's conv_bn)."""
    return ConvBN(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)


class DiverseBranchBlock(nn.Module):
    """Training form: nonlinear(dbb_origin(x) + dbb_1x1(x) + dbb_avg(x) + dbb_1x1_kxk(x)).

    (N, in_channels, H, W) -> (N, out_channels, H', W') as `nn.Conv2d(in, out, k, stride, k // 2,
    groups=groups)`. When groups == out_channels (depthwise) there is no `dbb_1x1`, the average
    branch pools the input directly, and the 1x1 -> kxk branch widens to `2 * in_channels`
    internally by default (as the reference does for MobileNet).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1,
                 internal_channels_1x1_3x3: int | None = None, nonlinear: nn.Module | None = None):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        check_centred_kernel("DiverseBranchBlock", kernel_size, padding, dilation)
        depthwise = groups >= out_channels
        if depthwise and in_channels != out_channels:
            raise ValueError("a depthwise DiverseBranchBlock (groups == out_channels) needs in_channels == out_channels")
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()
        self.kernel_size, self.out_channels, self.groups = kernel_size, out_channels, groups

        self.dbb_origin = _conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=groups)

        self.dbb_avg = nn.Sequential()
        if not depthwise:
            self.dbb_avg.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, out_channels))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, 0))
            self.dbb_1x1 = _conv_bn(in_channels, out_channels, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(out_channels))

        internal = internal_channels_1x1_3x3
        if internal is None:
            internal = in_channels if not depthwise else 2 * in_channels
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == in_channels:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(in_channels, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, out_channels, kernel_size, stride, 0,
                                                       groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
        if hasattr(self, "dbb_1x1"):
            out = out + self.dbb_1x1(x)
        return self.nonlinear(out)


class DBBDeployBlock(nn.Module):
    """Deploy form: nonlinear(dbb_reparam(x))."""

    def __init__(self, dbb_reparam: nn.Module, nonlinear: nn.Module):
        super().__init__()
        self.nonlinear = nonlinear
        self.dbb_reparam = dbb_reparam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.dbb_reparam(x))


def _padded_1x1(conv: nn.Conv2d, bn_and_pad: BNAndPadLayer) -> A.Kernel:
    """A 1x1 conv followed by BNAndPad, as one 1x1 kernel that zero-pads its input by the same ring.

    conv(0) + BN = BN(0) on the ring, which is exactly BNAndPad's fill value (P1, P5a).
    """
    first = A.from_module(conv, torch.float64)
    if isinstance(conv, IdentityBasedConv1x1):
        first = A.add(first, A.identity(conv.in_channels, 1, conv.groups, device=conv.weight.device))
    first = A.fuse_bn(first, bn_and_pad.bn)
    p = bn_and_pad.pad_pixels
    return replace(first, padding=(p, p))


@recipe(DiverseBranchBlock, family="dbb")
def fuse_dbb(block: DiverseBranchBlock) -> nn.Module:
    """add(origin, 1x1, sequential(1x1, avg), sequential(1x1, kxk)) — P1, P4, P5a, P7."""
    origin = conv_bn_lazy(block.dbb_origin)
    branches = [origin]
    if hasattr(block, "dbb_1x1"):
        branches.append(conv_bn_lazy(block.dbb_1x1))

    avg_mod: nn.AvgPool2d = block.dbb_avg.avg
    channels = block.dbb_avg.avgbn.num_features
    avg = A.avgpool(channels, avg_mod.kernel_size, avg_mod.stride, avg_mod.padding,
                    count_include_pad=avg_mod.count_include_pad, ceil_mode=avg_mod.ceil_mode,
                    divisor_override=avg_mod.divisor_override, device=block.dbb_origin.conv.weight.device)
    avg = A.fuse_bn(avg, block.dbb_avg.avgbn)
    if hasattr(block.dbb_avg, "conv"):
        # Depthwise pool regrouped to the 1x1's groups, so the chain stays grouped (not dense).
        avg = A.sequential(_padded_1x1(block.dbb_avg.conv, block.dbb_avg.bn), A.regroup(avg, block.groups))
    branches.append(avg)

    seq = block.dbb_1x1_kxk
    first_conv = seq.idconv1 if hasattr(seq, "idconv1") else seq.conv1
    second = A.fuse_bn(A.from_module(seq.conv2), seq.bn2, dtype=torch.float64)
    branches.append(A.sequential(_padded_1x1(first_conv, seq.bn1), second))

    dtype = block.dbb_origin.conv.weight.dtype
    return DBBDeployBlock(A.to_module(A.add(*branches, dtype=dtype), dtype=dtype), block.nonlinear)
