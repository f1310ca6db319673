"""DBB: block geometry (stride, groups, depthwise, kernel sizes, internal widths), exact borders,
reference key names, the plain conv-BN-act unit, and the ResNet / MobileNet backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam_cli.blocks.dbb import (BNAndPadLayer, ConvAct, ConvBNAct, DBBDeployBlock, DiverseBranchBlock, IdentityBasedConv1x1)
from reparam_cli.convert.engine import reparameterize
from reparam_cli.models.mobilenet import MobileNetV1
from reparam_cli.models.resnet import ResNet

from .helpers import assert_equivalent, randomized


@pytest.mark.parametrize("cin,cout,k,stride,groups,internal", [
    (8, 8, 3, 1, 1, None),    # idconv1 (internal == in)
    (8, 16, 3, 2, 1, None),   # in != out, stride 2
    (8, 16, 3, 1, 2, None),   # grouped
    (8, 8, 3, 2, 4, None),    # grouped, stride 2
    (8, 8, 3, 1, 8, None),    # depthwise: no dbb_1x1, avg pools the input, internal 2 * in
    (8, 8, 5, 2, 8, None),    # depthwise 5x5, stride 2
    (4, 8, 7, 1, 1, None),    # 7x7
    (6, 4, 5, 2, 1, None),    # 5x5, in > out, stride 2
    (8, 8, 3, 1, 1, 12),      # plain 1x1 conv1 with a wider internal width
    (8, 12, 3, 2, 2, 4),      # conv1 narrower than the input, grouped
])
def test_block_geometry(cin, cout, k, stride, groups, internal):
    block = randomized(DiverseBranchBlock(cin, cout, k, stride, groups=groups, internal_channels_1x1_3x3=internal))
    depthwise = groups == cout
    assert hasattr(block, "dbb_1x1") != depthwise and hasattr(block.dbb_avg, "conv") != depthwise
    assert hasattr(block.dbb_1x1_kxk, "idconv1") == ((internal or (2 * cin if depthwise else cin)) == cin)
    deploy, report = assert_equivalent(block, (2, cin, 13, 12))
    assert isinstance(deploy, DBBDeployBlock) and report.blocks == {"DiverseBranchBlock": 1}
    conv = deploy.dbb_reparam
    assert conv.kernel_size == (k, k) and conv.stride == (stride, stride) and conv.padding == (k // 2, k // 2)
    assert conv.groups == groups  # grouped branches stay grouped: no dense blow-up
    x = torch.randn(1, cin, 13, 12)
    assert deploy(x).shape == nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)(x).shape


def test_bn_and_pad_fills_the_ring_with_the_bn_of_zero():
    layer = randomized(BNAndPadLayer(2, 3))
    out = layer(torch.randn(1, 3, 4, 5))
    ring = layer.bn(torch.zeros(1, 3, 1, 1)).flatten()
    assert out.shape == (1, 3, 8, 9)
    assert torch.allclose(out[0, :, 0, 0], ring) and torch.allclose(out[0, :, -1, 4], ring)
    assert torch.allclose(out[0, :, 3, 1], ring) and not torch.allclose(ring, torch.zeros(3))


def test_identity_based_conv_starts_as_identity():
    conv = IdentityBasedConv1x1(8, groups=2)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(conv(x), x)
    assert set(conv.state_dict()) == {"weight"}  # the identity is no checkpoint entry


def test_nonlinearity_is_kept():
    block = randomized(DiverseBranchBlock(4, 4, 3, nonlinear=nn.ReLU()))
    deploy, _ = assert_equivalent(block, (2, 4, 9, 9))
    assert isinstance(deploy.nonlinear, nn.ReLU)


def test_reference_key_names():
    keys = set(DiverseBranchBlock(8, 8, 3, 1).state_dict())
    for key in ("dbb_origin.conv.weight", "dbb_origin.bn.running_mean", "dbb_1x1.conv.weight",
                "dbb_avg.conv.weight", "dbb_avg.bn.bn.weight", "dbb_avg.avgbn.running_var",
                "dbb_1x1_kxk.idconv1.weight", "dbb_1x1_kxk.bn1.bn.bias", "dbb_1x1_kxk.conv2.weight",
                "dbb_1x1_kxk.bn2.running_mean"):
        assert key in keys, key
    dw_keys = set(DiverseBranchBlock(8, 8, 3, 1, groups=8).state_dict())
    assert "dbb_1x1_kxk.conv1.weight" in dw_keys and "dbb_avg.avgbn.weight" in dw_keys
    assert not any(k.startswith(("dbb_1x1.", "dbb_avg.conv", "dbb_avg.bn.")) for k in dw_keys)
    deploy, _ = reparameterize(randomized(DiverseBranchBlock(8, 8, 3, 1)))
    assert set(deploy.state_dict()) == {"dbb_reparam.weight", "dbb_reparam.bias"}


def test_conv_bn_act_unit():
    unit = randomized(ConvBNAct(4, 6, 1, 2, nonlinear=nn.ReLU()))
    assert set(unit.state_dict()) >= {"conv.weight", "bn.running_mean"}
    deploy, report = assert_equivalent(unit, (2, 4, 9, 9))
    assert isinstance(deploy, ConvAct) and report.blocks == {"ConvBNAct": 1}
    assert set(deploy.state_dict()) == {"conv.weight", "conv.bias"}  # the reference's deploy keys


def test_converts_on_meta_device():
    with torch.device("meta"):
        blocks = [DiverseBranchBlock(8, 16, 3, 2, groups=2), DiverseBranchBlock(8, 8, 3, 1, groups=8)]
    for block, groups in zip(blocks, (2, 8)):
        deploy, _ = reparameterize(block)
        assert deploy.dbb_reparam.weight.is_meta and deploy.dbb_reparam.groups == groups


def test_invalid_geometry_is_refused():
    with pytest.raises(ValueError, match="padding"):
        DiverseBranchBlock(4, 4, 3, padding=0)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        DiverseBranchBlock(16, 8, 3, groups=8)


@pytest.mark.parametrize("conv_type", ["acb", "dbb"])
def test_small_resnets(conv_type):
    """Bottleneck and basic ResNets with every conv type, tiny widths, converted end to end."""
    for block in ("basic", "bottleneck"):
        model = randomized(ResNet([1, 1, 1, 1], conv_type, block, num_classes=10, width_multiplier=0.125))
        deploy, report = assert_equivalent(model, (2, 3, 32, 32))
        three_by_three = 8 if block == "basic" else 4
        assert report.blocks[{"acb": "ACBlock", "dbb": "DiverseBranchBlock"}[conv_type]] == three_by_three


def test_backbone_key_names():
    keys = set(ResNet(conv_type="dbb", num_classes=10, width_multiplier=0.125).state_dict())
    for key in ("stage0.conv1.conv.weight", "stage0.conv1.bn.running_mean", "stage1.0.conv1.dbb_origin.conv.weight",
                "stage2.0.shortcut.conv.weight", "stage4.1.conv2.dbb_1x1_kxk.idconv1.weight", "linear.weight"):
        assert key in keys, key
    keys = set(MobileNetV1("dbb", num_classes=10, width_multiplier=0.25).state_dict())
    for key in ("conv1.dbb_avg.conv.weight", "stem.0.depthwise.dbb_1x1_kxk.conv1.weight",
                "stem.12.pointwise.conv.weight", "stem.3.depthwise.dbb_avg.avgbn.weight", "linear.bias"):
        assert key in keys, key
    model = randomized(MobileNetV1("dbb", num_classes=10, width_multiplier=0.25))
    deploy, _ = assert_equivalent(model, (1, 3, 32, 32))
    deploy_keys = set(deploy.state_dict())
    assert {"conv1.dbb_reparam.weight", "stem.0.depthwise.dbb_reparam.bias", "stem.0.pointwise.conv.bias"} <= deploy_keys
