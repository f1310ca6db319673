"""RefConv (Cai et al., 2023): re-parameterized refocusing convolution.

A RefConv holds frozen base weights W_b (a buffer, typically a pretrained conv's weight) and learns
a refocusing transformation W_r: a conv applied to the base weights themselves, seen as one image
with one channel per 2-d kernel. The conv it computes uses

    W_t = W_b * W_r + W_b        (* : W_r convolved over the kernels of W_b)

so after training the deploy form is a plain conv holding W_t (algebra.refocus): same geometry,
same parameter count as the conv that was refocused, no bias.

Key names follow the reference (Aiolus-X/RefConv): the base weight is the buffer `weight` (so a
plain conv's pretrained `weight` loads straight into it) and the transformation is `convmap`.
`convmap` has groups = in * out / groups^2: a depthwise base (groups = C) is refocused by one dense
map across all C kernels; a dense base by one map per 2-d kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A


class RefConv(nn.Module):
    """Training form: conv2d(x, weight + convmap(weight)) with `weight` a frozen buffer.

    Args:
        in_channels, out_channels, kernel_size (odd int), stride, padding (default kernel_size // 2), groups:
            the geometry of the refocused conv (depthwise: groups = in_channels = out_channels).
        map_k: odd kernel size of the refocusing transformation, at most kernel_size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, map_k: int = 3):
        super().__init__()
        if map_k > kernel_size or map_k % 2 == 0:
            raise ValueError(f"map_k must be odd and at most kernel_size ({kernel_size}), got {map_k}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{groups} groups do not divide {in_channels} -> {out_channels} channels")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.padding = kernel_size // 2 if padding is None else padding
        self.origin_kernel_shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.num_2d_kernels = out_channels * in_channels // groups
        # Frozen base weights, initialised like a conv's so a fresh model computes something non-trivial.
        base = torch.empty(self.origin_kernel_shape)
        if base.device.type != "meta":
            nn.init.kaiming_uniform_(base, a=math.sqrt(5))
        self.register_buffer("weight", base)
        self.convmap = nn.Conv2d(self.num_2d_kernels, self.num_2d_kernels, map_k, 1, map_k // 2,
                                 groups=in_channels * out_channels // groups ** 2, bias=False)

    def refocused_weight(self) -> torch.Tensor:
        image = self.weight.view(1, self.num_2d_kernels, self.kernel_size, self.kernel_size)
        return self.weight + self.convmap(image).view(self.origin_kernel_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.refocused_weight(), None, self.stride, self.padding, 1, self.groups)


@recipe(RefConv, family="refconv")
def fuse_refconv(block: RefConv) -> nn.Module:
    """refocus(base, convmap) -> a plain conv without bias."""
    n = 2
    base = A.Kernel(block.weight.to(torch.float64), None, (block.stride,) * n, (block.padding,) * n, (1,) * n,
                    block.groups)
    conv = A.to_module(A.refocus(base, A.from_module(block.convmap, torch.float64)), dtype=block.weight.dtype)
    conv.register_parameter("bias", None)  # W_t has no bias: keep the refocused conv's exact parameter count
    return conv
