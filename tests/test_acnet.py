"""ACNet: ACB geometry (stride, groups, depthwise, kernel sizes, padding below/above k // 2), key names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam_cli.blocks.acnet import ACBDeployBlock, ACBlock
from reparam_cli.convert.engine import reparameterize

from .helpers import assert_equivalent, randomized


@pytest.mark.parametrize("cin,cout,k,stride,padding,groups", [
    (8, 8, 3, 1, 1, 1),    # the common case
    (8, 8, 3, 2, 1, 1),    # stride 2
    (8, 16, 3, 1, 1, 2),   # grouped, in != out
    (8, 8, 3, 2, 1, 8),    # depthwise, stride 2
    (6, 4, 5, 1, 2, 1),    # 5x5, in != out
    (4, 8, 7, 2, 3, 4),    # 7x7, grouped, stride 2
    (4, 6, 3, 1, 0, 1),    # padding < k // 2: the asymmetric branches crop
    (4, 6, 5, 2, 1, 2),    # crop with stride 2 and groups
    (4, 4, 7, 1, 0, 1),    # crop by 3
    (4, 6, 5, 1, 3, 1),    # padding > k // 2
    (4, 6, 3, 2, 4, 2),    # padding well above k // 2, strided
])
def test_block_geometry(cin, cout, k, stride, padding, groups):
    block = randomized(ACBlock(cin, cout, k, stride, padding, groups=groups))
    assert block.crop == max(0, k // 2 - padding)
    deploy, report = assert_equivalent(block, (2, cin, 13, 12))
    assert isinstance(deploy, ACBDeployBlock) and report.blocks == {"ACBlock": 1}
    conv = deploy.fused_conv
    assert conv.kernel_size == (k, k) and conv.stride == (stride, stride)
    assert conv.padding == (padding, padding) and conv.groups == groups
    # The deploy conv is exactly the conv the block stands for: same output size as nn.Conv2d.
    plain = nn.Conv2d(cin, cout, k, stride, padding, groups=groups)
    x = torch.randn(1, cin, 13, 12)
    assert deploy(x).shape == plain(x).shape == block(x).shape


def test_dilation_and_no_affine_bn():
    block = randomized(ACBlock(4, 4, 3, 1, 2, dilation=2, use_affine=False))
    deploy, _ = assert_equivalent(block, (2, 4, 11, 11))
    assert deploy.fused_conv.dilation == (2, 2)


def test_nonlinearity_is_kept():
    block = randomized(ACBlock(4, 4, 3, 1, 1, nonlinear=nn.ReLU()))
    deploy, _ = assert_equivalent(block, (2, 4, 9, 9))
    assert isinstance(deploy.nonlinear, nn.ReLU)
    assert (deploy(torch.randn(2, 4, 9, 9)) >= 0).all()


def test_reference_key_names():
    block = ACBlock(4, 8, 3, 1, 1)
    keys = set(block.state_dict())
    for branch in ("square", "ver", "hor"):
        assert f"{branch}_conv.weight" in keys and f"{branch}_bn.running_var" in keys
        assert f"{branch}_conv.bias" not in keys
    assert block.ver_conv.kernel_size == (3, 1) and block.hor_conv.kernel_size == (1, 3)
    deploy, _ = reparameterize(randomized(block))
    assert set(deploy.state_dict()) == {"fused_conv.weight", "fused_conv.bias"}


def test_converts_on_meta_device():
    with torch.device("meta"):
        block = ACBlock(4, 8, 5, 2, 1, groups=2)
    deploy, _ = reparameterize(block)
    assert deploy.fused_conv.weight.shape == (8, 2, 5, 5) and deploy.fused_conv.weight.is_meta
    assert deploy.fused_conv.padding == (1, 1)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        ACBlock(4, 4, 4, 1, 2)
