"""MobileOne: block geometry (depthwise / pointwise, stride, kernel sizes, branch counts, SE),
reference key names, the SE placement of the classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam_cli.blocks.mobileone import MobileOne, MobileOneBlock, MobileOneDeployBlock
from reparam_cli.convert.engine import reparameterize

from .helpers import assert_equivalent, randomized


@pytest.mark.parametrize("cin,cout,k,stride,groups,branches", [
    (8, 8, 3, 1, 8, 1),     # depthwise with skip
    (8, 8, 3, 2, 8, 4),     # depthwise, stride 2: no skip
    (8, 8, 3, 1, 1, 2),     # dense 3x3 with skip
    (8, 16, 3, 1, 2, 3),    # grouped, in != out
    (8, 8, 5, 1, 8, 2),     # 5x5 depthwise
    (4, 8, 7, 2, 1, 1),     # 7x7, in != out, stride 2
    (8, 16, 1, 1, 1, 4),    # pointwise, in != out: conv branches only
    (8, 8, 1, 1, 1, 2),     # pointwise with skip
])
def test_block_geometry(cin, cout, k, stride, groups, branches):
    block = randomized(MobileOneBlock(cin, cout, k, stride, groups=groups, num_conv_branches=branches))
    assert len(block.rbr_conv) == branches
    assert (block.rbr_scale is not None) == (k > 1)
    assert (block.rbr_skip is not None) == (cin == cout and stride == 1)
    deploy, report = assert_equivalent(block, (2, cin, 13, 12))
    assert isinstance(deploy, MobileOneDeployBlock) and report.blocks == {"MobileOneBlock": 1}
    conv = deploy.reparam_conv
    assert conv.kernel_size == (k, k) and conv.stride == (stride, stride) and conv.groups == groups
    x = torch.randn(1, cin, 13, 12)
    assert deploy(x).shape == nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)(x).shape


def test_block_with_se():
    block = randomized(MobileOneBlock(16, 16, 3, 1, groups=16, use_se=True, num_conv_branches=2))
    deploy, _ = assert_equivalent(block, (2, 16, 9, 9))
    assert deploy.se is block.se


def test_reference_key_names():
    block = MobileOneBlock(16, 16, 3, 1, groups=16, use_se=True, num_conv_branches=2)
    keys = set(block.state_dict())
    for key in ("rbr_conv.0.conv.weight", "rbr_conv.1.bn.running_var", "rbr_scale.conv.weight",
                "rbr_scale.bn.bias", "rbr_skip.running_mean", "se.reduce.weight", "se.expand.bias"):
        assert key in keys, key
    deploy, _ = reparameterize(randomized(block))
    assert set(deploy.state_dict()) == {"reparam_conv.weight", "reparam_conv.bias", "se.reduce.weight",
                                        "se.reduce.bias", "se.expand.weight", "se.expand.bias"}


def test_small_classifier_end_to_end():
    model = randomized(MobileOne([1, 2, 2, 1], num_classes=10, width_multipliers=[0.25, 0.25, 0.25, 0.25],
                                 use_se=True, num_conv_branches=2))
    deploy, report = assert_equivalent(model, (2, 3, 32, 32))
    assert report.blocks == {"MobileOneBlock": 1 + 2 * 6}
    assert "stage0.reparam_conv.weight" in deploy.state_dict() and "linear.weight" in deploy.state_dict()


def test_se_placement_follows_reference():
    with torch.device("meta"):
        model = MobileOne(width_multipliers=[3.0, 3.5, 3.5, 4.0], use_se=True)
    with_se = [name for name, m in model.named_modules()
               if isinstance(m, MobileOneBlock) and not isinstance(m.se, nn.Identity)]
    # The last half of stage 3's pairs (5 of 10) and all of stage 4's, each pair two blocks.
    assert with_se == [f"stage3.{i}" for i in range(10, 20)] + ["stage4.0", "stage4.1"]
    assert model.stage0.num_conv_branches == 1 and len(model.stage0.rbr_conv) == 1


def test_invalid_geometry_is_refused():
    with pytest.raises(ValueError, match="padding"):
        MobileOneBlock(4, 4, 3, padding=0)
    with pytest.raises(ValueError, match="branch"):
        MobileOneBlock(4, 4, 3, num_conv_branches=0)
