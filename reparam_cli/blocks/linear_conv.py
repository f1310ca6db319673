"""Paradigm 9 as a conversion option: nn.Linear -> an equivalent pointwise (1x1) conv module.

`reparameterize(model, linear_as_conv=True)` replaces every plain `nn.Linear` (exact type: subclasses
such as MultiheadAttention's `out_proj`, whose weight its owner reads directly, are left alone) by a
`PointwiseLinear`: an nn.Conv2d with weight (out, in, 1, 1) that takes the Linear's inputs
(*, in) and returns (*, out), the same function on the same inputs. Useful for runtimes that are
better optimised for convolutions; the state dict keeps the Linear's keys (`weight`, `bias`).
"""

from __future__ import annotations

import torch
from torch import nn

from reparam_cli.core import algebra as A


class PointwiseLinear(nn.Conv2d):
    """A fully connected layer computed as a 1x1 conv: (*, in_features) -> (*, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every leading position becomes one 1x1 "image" of in_features channels.
        y = super().forward(x.reshape(-1, x.shape[-1], 1, 1))
        return y.reshape(*x.shape[:-1], self.out_channels)


def linear_to_pointwise(linear: nn.Linear) -> PointwiseLinear:
    """P9: the PointwiseLinear computing `linear` (weights reshaped, never recomputed: exact)."""
    k = A.linear_as_conv(A.from_module(linear))
    layer = PointwiseLinear(k.in_channels, k.out_channels, bias=linear.bias is not None, device="meta")
    layer.weight = nn.Parameter(k.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        layer.bias = nn.Parameter(k.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return layer.train(linear.training)
