"""Model size figures for reports: FLOPs of conv and linear layers, counted with forward hooks.

Hooks rather than torch's FlopCounterMode: a dispatch mode costs a second to import (it pulls in
torch._dynamo) and slows every op, while hooks only read shapes. Counted: `nn.Linear`, `nn.ConvNd`,
and conv-like modules that convolve with a computed kernel (a `weight` of conv shape plus
`in_channels`/`out_channels`/`groups` attributes, e.g. RefConv). A multiply-add counts 2 FLOPs;
bias adds, normalisation and activations are not counted.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn


def _conv_like(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.conv._ConvNd):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(weight, Tensor) and weight.dim() >= 3
            and all(isinstance(getattr(module, a, None), int) for a in ("in_channels", "out_channels", "groups")))


def _layer_flops(module: nn.Module, output) -> int:
    if not isinstance(output, Tensor):
        return 0
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    kernel = math.prod(module.weight.shape[2:])
    return 2 * output.numel() * (module.in_channels // module.groups) * kernel


class FlopCounter:
    """Sum of conv/linear FLOPs over the forward passes run inside `with counter.attach(model):`."""

    def __init__(self) -> None:
        self.total = 0

    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator["FlopCounter"]:
        def hook(module, _inputs, output):
            self.total += _layer_flops(module, output)

        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, nn.Linear) or _conv_like(m)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int | None:
    """FLOPs of one forward pass on `input_shape`, on the model's device (`meta`: shapes only).

    Returns None for a model that cannot run on such an input (the count is a nicety).
    """
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    x = torch.zeros(*input_shape, device=device, dtype=dtype)
    counter = FlopCounter()
    try:
        with counter.attach(model), torch.no_grad():
            model(x)
    except Exception:
        return None
    return counter.total
