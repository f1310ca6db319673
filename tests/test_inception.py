"""Depth concatenation (P3): inception-style blocks of parallel conv-BN branches -> one conv."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam_cli.core import algebra as A
from reparam_cli.blocks.inception import InceptionBlock, InceptionDeployBlock
from reparam_cli.convert.engine import reparameterize

from .helpers import assert_equivalent, randomized


@pytest.mark.parametrize("cin,channels,kernels,stride,groups,pool", [
    (6, (4, 8, 2), (1, 3, 5), 1, 1, 0),     # classic 1/3/5, in != out
    (6, (4, 8, 2), (1, 3, 5), 2, 1, 4),     # stride 2 with the average-pool branch
    (6, (6, 12), (3, 7), 1, 2, 3),          # grouped branches + pool
    (6, (6, 6, 12), (3, 5, 7), 2, 6, 0),    # depthwise branches (multiplier 1 and 2), stride 2
    (4, (5,), (7,), 1, 1, 2),               # a single conv branch and a pool branch
])
def test_geometry(cin, channels, kernels, stride, groups, pool):
    block = randomized(InceptionBlock(cin, channels, kernels, stride, groups, pool))
    deploy, report = assert_equivalent(block, (2, cin, 11, 10))
    assert isinstance(deploy, InceptionDeployBlock) and report.blocks == {"InceptionBlock": 1}
    conv = deploy.conv
    assert conv.out_channels == sum(channels) + pool and conv.in_channels == cin
    k = max(kernels + ((3,) if pool else ()))
    assert conv.kernel_size == (k, k) and conv.stride == (stride, stride)
    # One conv with the branches' parameters padded to the largest window, plus one bias per channel.
    assert sum(p.numel() for p in deploy.parameters()) == conv.out_channels * (cin * k * k + 1)


def test_concat_order_is_branch_order():
    """The fused conv's output channels are the branches' outputs in order (not group-interleaved)."""
    block = randomized(InceptionBlock(4, (2, 4), (1, 3), groups=2, pool_channels=2, act=False))
    deploy, _ = reparameterize(block)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        out = deploy(x)
        assert torch.allclose(out[:, :2], block.branches[0](x), atol=1e-5)
        assert torch.allclose(out[:, 2:6], block.branches[1](x), atol=1e-5)
        assert torch.allclose(out[:, 6:], block.pool_branch(x), atol=1e-5)


def test_refuses_inexact_pooling_and_bad_geometry():
    block = InceptionBlock(4, (2,), (3,), pool_channels=2).eval()
    block.pool_branch[0] = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    with pytest.raises(A.NotEquivalent, match="count_include_pad"):
        reparameterize(block)
    with pytest.raises(ValueError, match="odd"):
        InceptionBlock(4, (2,), (2,))


def test_converts_on_meta():
    with torch.device("meta"):
        block = InceptionBlock(8, (4, 4), (1, 5), stride=2, pool_channels=4)
    deploy, _ = reparameterize(block)
    assert deploy.conv.weight.is_meta and tuple(deploy.conv.weight.shape) == (12, 8, 5, 5)
