"""ACNet (Ding et al., ICCV 2019): kxk conv-BN + kx1 conv-BN + 1xk conv-BN -> one kxk conv.

Key names follow the reference Asymmetric Convolution Block (`square_conv`, `square_bn`,
`ver_conv`, `ver_bn`, `hor_conv`, `hor_bn`; deploy conv `fused_conv`; `nonlinear` as in the
version shipped with the DBB repository), so training checkpoints load unchanged and deploy
checkpoints match the reference's key for key.

The asymmetric branches slide their windows along the square kernel's centre row / column: for
a square conv with padding p, the kx1 branch pads its rows by p and its columns by p - k // 2
(dilation 1). When that is negative the reference crops the input instead; in the algebra a crop
is negative padding on the Kernel, which `add` aligns with the square kernel.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A


class ACBlock(nn.Module):
    """Training form: nonlinear(square_bn(square_conv(x)) + ver_bn(ver_conv(x)) + hor_bn(hor_conv(x))).

    Input (N, in_channels, H, W) -> output (N, out_channels, H', W') with H', W' those of a
    `nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)`.
    kernel_size must be odd; any padding >= 0 works (below k // 2 the asymmetric branches crop).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, use_affine: bool = True,
                 nonlinear: nn.Module | None = None):
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ValueError(f"ACBlock needs an odd kernel_size >= 3, got {kernel_size}")
        self.nonlinear = nonlinear if nonlinear is not None else nn.Identity()
        self.square_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, kernel_size), stride, padding,
                                     dilation, groups, bias=False)
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        # Offset of the asymmetric branches' padding along their length-1 dim: < 0 means crop.
        offset = padding - dilation * (kernel_size // 2)
        self.crop = max(0, -offset)
        pad = max(0, offset)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), stride, (padding, pad),
                                  dilation, groups, bias=False)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, kernel_size), stride, (pad, padding),
                                  dilation, groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.crop
        # F.pad with negative amounts crops: columns for the kx1 branch, rows for the 1xk branch.
        ver_in = F.pad(x, [-c, -c, 0, 0]) if c else x
        hor_in = F.pad(x, [0, 0, -c, -c]) if c else x
        out = self.square_bn(self.square_conv(x)) + self.ver_bn(self.ver_conv(ver_in)) + self.hor_bn(self.hor_conv(hor_in))
        return self.nonlinear(out)


class ACBDeployBlock(nn.Module):
    """Deploy form: nonlinear(fused_conv(x))."""

    def __init__(self, fused_conv: nn.Module, nonlinear: nn.Module):
        super().__init__()
        self.nonlinear = nonlinear
        self.fused_conv = fused_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.fused_conv(x))


def _branch(conv: nn.Conv2d, bn: nn.BatchNorm2d, crop: tuple[int, int]) -> A.ScaledKernel:
    """P1 on one branch (applied lazily by `add`), with the block's input crop written as negative padding."""
    k, scale = A.fuse_bn_lazy(A.from_module(conv), bn)
    return A.ScaledKernel(replace(k, padding=tuple(p - c for p, c in zip(k.padding, crop))), scale)


@recipe(ACBlock, family="acnet")
def fuse_acb(block: ACBlock) -> nn.Module:
    """add(square, ver, hor): the asymmetric kernels are zero-padded onto the square's centre cross (P1, P4)."""
    c = block.crop
    dtype = block.square_conv.weight.dtype
    fused = A.add(
        _branch(block.square_conv, block.square_bn, (0, 0)),
        _branch(block.ver_conv, block.ver_bn, (0, c)),
        _branch(block.hor_conv, block.hor_bn, (c, 0)),
        dtype=dtype,
    )
    return ACBDeployBlock(A.to_module(fused, dtype=dtype), block.nonlinear)
