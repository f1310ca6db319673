"""Model size figures for reports: parameter counts and FLOPs, computed shape-only where possible."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int | None:
    """FLOPs of one forward pass on `input_shape` (convs and matmuls; a multiply-add counts 2).

    Runs the model on a `meta` copy of its input when the model lives on `meta`, so counting a
    skeleton costs no arithmetic. Returns None for a model the counter cannot trace.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    x = torch.empty(*input_shape, device=device, dtype=dtype) if device.type == "meta" else \
        torch.zeros(*input_shape, device=device, dtype=dtype)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    except Exception:  # an exotic model the counter cannot follow: the count is a nicety
        return None
    return int(counter.get_total_flops())
