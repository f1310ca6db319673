"""Issue 18: int8 readiness (`reparam quantize`), exact cross-layer equalization, int8 ONNX.

Tolerances: algebra-level equalization is checked in float64 at 1e-9 relative to the output's
magnitude (the float64 floor is ~1e-15; a wrong scale is off by O(1)); a float32 model equalized
in place is checked at 1e-5 relative (its float32 forward's rounding floor is ~1e-7 per layer).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from reparam_cli import algebra as A

settings.register_profile("reparam", max_examples=40, deadline=None)
settings.load_profile("reparam")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


ACTS = {"relu": F.relu, "leaky": lambda x: F.leaky_relu(x, 0.1), "identity": lambda x: x,
        "maxpool": lambda x: F.max_pool2d(x, 2, 1, 1) if x.dim() == 4 else x}


@given(seed=st.integers(0, 2**31 - 1), g1=st.sampled_from([1, 2, 4]), g2=st.sampled_from([1, 2, 4, 8]),
       k1=st.sampled_from([1, 3]), k2=st.sampled_from([1, 3, 5]), act=st.sampled_from(sorted(ACTS)),
       bias=st.booleans(), fc=st.booleans())
def test_equalize_pair_is_exact_and_evens_ranges(seed, g1, g2, k1, k2, act, bias, fc):
    """Random conv -> activation -> conv (or -> FC): same output after equalization, in float64,
    and both layers' per-channel ranges equal sqrt(r1 * r2) where neither is zero."""
    g = torch.Generator().manual_seed(seed)
    c_in, mid, out = 8, 8, 16
    w1 = torch.randn(mid, c_in // g1, k1, k1, generator=g, dtype=torch.float64)
    w1 = w1 * torch.logspace(-2, 2, mid, dtype=torch.float64).reshape(-1, 1, 1, 1)  # fused-like uneven channels
    first = A.Kernel(w1, torch.randn(mid, generator=g, dtype=torch.float64) if bias else None,
                     padding=(k1 // 2,) * 2, groups=g1)
    if fc:
        second = A.Kernel(torch.randn(out, mid, generator=g, dtype=torch.float64))
    else:
        second = A.Kernel(torch.randn(out, mid // g2, k2, k2, generator=g, dtype=torch.float64), None,
                          padding=(k2 // 2,) * 2, groups=g2)
    x = torch.randn(2, c_in, 6, 6, generator=g, dtype=torch.float64)
    f = ACTS[act]

    def net(a, b):
        h = f(A.apply(a, x))
        if fc:
            h = h.mean((2, 3))
        return A.apply(b, h)

    n1, n2, s = A.equalize_pair(first, second)
    assert (s > 0).all()
    assert _rel(net(n1, n2), net(first, second)) < 1e-9
    r1 = n1.weight.abs().reshape(mid, -1).amax(1)
    per_group = mid // second.groups
    w2 = n2.weight.reshape(second.groups, out // second.groups, per_group, -1)
    r2 = w2.abs().transpose(1, 2).reshape(second.groups, per_group, -1).amax(2).reshape(mid)
    assert torch.allclose(r1, r2, rtol=1e-9)


def test_equalize_pair_refuses_mismatch_and_negative_scales():
    from reparam_cli.errors import NotEquivalent

    a = A.Kernel(torch.randn(4, 3, 3, 3))
    with pytest.raises(NotEquivalent):
        A.equalize_pair(a, A.Kernel(torch.randn(5, 5, 1, 1)))
    with pytest.raises(NotEquivalent):
        A.equalize_pair(a, A.Kernel(torch.randn(5, 4, 1, 1)), scale=-torch.ones(4))
