"""RepNeXt-style shortcut re-parameterization: algebra, multi-scale depthwise unit, the block with
each shortcut form and activation (exact ones converted, inexact ones refused), the spec."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reparam_cli.core import algebra as A
from reparam_cli.blocks.repnext import RepNeXt, RepNeXtBlock, RepNeXtDeployBlock, RepUnit, RepUnitDeploy
from reparam_cli.io.checkpoint import read_raw
from reparam_cli.core.tensors import count_parameters
from reparam_cli.convert.engine import reparameterize
from reparam_cli.errors import NotEquivalent
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.pipeline.options import VerifyOptions
from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint

from .helpers import assert_equivalent, randomized


# --------------------------------------------------------------------------- algebra

def test_concat_grouped_interleaves_per_group():
    torch.manual_seed(0)
    a = nn.Conv2d(6, 6, 3, padding=1, groups=3).double()
    b = nn.Conv2d(6, 3, 1, groups=3).double()
    k = A.concat_grouped(A.from_module(a), A.from_module(b))
    assert k.groups == 3 and k.out_channels == 9
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    ya, yb = a(x), b(x)
    ref = torch.cat([torch.cat([ya[:, 2 * g:2 * g + 2], yb[:, g:g + 1]], 1) for g in range(3)], 1)
    assert torch.allclose(A.apply(k, x), ref, atol=1e-12)
    with pytest.raises(NotEquivalent, match="equal groups"):
        A.concat_grouped(A.from_module(a), A.from_module(nn.Conv2d(6, 3, 1)))


def test_select_channels():
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    k = A.select_channels(5, [4, 0, 4], scale=-2.0)
    assert torch.equal(A.apply(k, x), -2.0 * x[:, [4, 0, 4]])
    with pytest.raises(NotEquivalent, match="out of range"):
        A.select_channels(3, [3])


# --------------------------------------------------------------------------- multi-scale depthwise unit

@pytest.mark.parametrize("kernel_sizes,stride", [
    ([3], 1), ([3, 5], 2), ([7, 5, 3], 1), ([(7, 7), (1, 5), (3, 1)], 2), ([(1, 5), (3, 1)], 1),
])
def test_rep_unit_geometry(kernel_sizes, stride):
    unit = randomized(RepUnit(6, kernel_sizes, stride=stride))
    deploy, report = assert_equivalent(unit, (2, 6, 11, 10))
    assert isinstance(deploy, RepUnitDeploy) and report.blocks == {"RepUnit": 1}
    conv = deploy.conv_repara
    assert conv.groups == 6 and conv.stride == (stride, stride)
    largest = tuple(max(A_k[d] if not isinstance(A_k, int) else A_k for A_k in kernel_sizes) for d in (0, 1))
    assert conv.kernel_size == largest


# --------------------------------------------------------------------------- the block

ALL_ACTS = ["relu", "gelu", "silu", "softplus", "hardswish", "leaky_relu", "identity", "relu6", "elu", "mish",
            "sigmoid", "tanh"]
EXACT_FOR_PLAIN_RESIDUAL = ["relu", "gelu", "silu", "hardswish", "leaky_relu", "identity"]


def _deploy_params(c: int, hidden: int, k: tuple[int, int], passes: int) -> int:
    """dw' (2C outputs, groups C) + pw1' (hidden + passes*C outputs over 2C) + pw2' (C over that)."""
    width = hidden + passes * c
    return 2 * c * k[0] * k[1] + 2 * c + width * 2 * c + width + c * width + c


@pytest.mark.parametrize("act", ALL_ACTS)
def test_activated_shortcut_is_exact_for_any_elementwise_activation(act):
    """shortcut='act' (the reference): the seed's derivation, C extra channels, any activation."""
    block = randomized(RepNeXtBlock(4, act=act, shortcut="act"))
    deploy, _ = assert_equivalent(block, (2, 4, 9, 10))
    assert isinstance(deploy, RepNeXtDeployBlock)
    assert count_parameters(deploy) == _deploy_params(4, 16, (7, 7), passes=1)


@pytest.mark.parametrize("act", EXACT_FOR_PLAIN_RESIDUAL)
def test_plain_residual_is_exact_where_the_odd_part_is_linear(act):
    """shortcut='identity': +x and -x ride through the activation, (a(x) - a(-x)) / c = x."""
    block = randomized(RepNeXtBlock(4, kernel_sizes=[3, 5], act=act, shortcut="identity"))
    deploy, _ = assert_equivalent(block, (2, 4, 9, 10))
    assert count_parameters(deploy) == _deploy_params(4, 16, (5, 5), passes=2)


def test_plain_residual_gelu_tanh_and_leaky_slopes():
    for act in (nn.GELU(approximate="tanh"), nn.LeakyReLU(0.3), nn.LeakyReLU(-0.5), nn.Softplus(threshold=math.inf)):
        assert_equivalent(randomized(RepNeXtBlock(3, kernel_sizes=[3], act=act, shortcut="identity")), (2, 3, 6, 6))


@pytest.mark.parametrize("act", ["relu6", "elu", "mish", "sigmoid", "tanh", "softplus"])
def test_plain_residual_refuses_inexact_activations(act):
    block = RepNeXtBlock(4, act=act, shortcut="identity").eval()
    with pytest.raises(NotEquivalent, match="plain residual"):
        reparameterize(block)


def test_refuses_unknown_or_channelwise_activations():
    for act in (nn.PReLU(16), nn.Softmax(dim=1)):
        with pytest.raises(NotEquivalent, match="elementwise"):
            reparameterize(RepNeXtBlock(4, act=act).eval())


@pytest.mark.parametrize("k", [3, 5, 7])
def test_block_kernel_sizes_and_expansion(k):
    block = randomized(RepNeXtBlock(6, kernel_sizes=[k, 1], expansion=2, act="silu", shortcut="identity"))
    deploy, _ = assert_equivalent(block, (1, 6, 8, 8))
    assert deploy.block[0].kernel_size == (k, k) and deploy.block[0].groups == 6
    # No residual add left: the deploy block is exactly the four layers.
    assert [type(m) for m in deploy.block] == [nn.Conv2d, nn.Conv2d, nn.SiLU, nn.Conv2d]


def test_reference_key_names():
    net = RepNeXt(depths=(1, 1), dims=(8, 16), num_classes=10)
    keys = set(net.state_dict())
    for key in ("downsample_layers.0.0.weight", "downsample_layers.1.0.running_mean", "downsample_layers.1.1.bias",
                "stages.0.0.feature.dwconv1.weight", "stages.0.0.feature.norm3.running_var",
                "stages.1.0.pwconv1.weight", "stages.1.0.pwconv2.bias", "head.2.weight"):
        assert key in keys, key
    deploy, _ = assert_equivalent(randomized(net), (2, 3, 32, 32))
    deploy_keys = set(deploy.state_dict())
    assert {"stages.0.0.block.0.weight", "stages.0.0.block.1.bias", "stages.0.0.block.3.weight"} <= deploy_keys
    assert not any("feature" in k or "pwconv" in k for k in deploy_keys)


def test_repnext_tiny_spec_end_to_end(tmp_path):
    ckpt = tmp_path / "tiny.pth"
    init_checkpoint("repnext-tiny", ckpt, seed=4)
    report = convert_checkpoint(ckpt, "repnext-tiny", tmp_path / "tiny.deploy.safetensors",
                                verify_options=VerifyOptions(input_shape=(2, 3, 64, 64)))
    assert report["ok"] and report["blocks"] == {"RepNeXtBlock": 10}
    assert report["max_rel_err"] <= max(10 * report["train_rel_err"], 1e-6)
    with torch.device("meta"):
        model = RepNeXt(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256))
    # The graph pass folds each downsample layer's BatchNorm into its conv (conv4x4+BN; BN before an
    # unpadded 2x2/s2 conv is exact): fewer parameters than the training downsample layers.
    folded = count_parameters(reparameterize(model.downsample_layers)[0])
    assert folded < count_parameters(model.downsample_layers)
    untouched = folded + count_parameters(model.head)
    expected = untouched + sum(_deploy_params(m.dim, 4 * m.dim, (7, 7), passes=1)
                               for m in model.modules() if isinstance(m, RepNeXtBlock))
    assert report["params_after"] == expected
    # The deploy file loads into a skeleton converted shape-only on the meta device.
    deploy = load_deploy(tmp_path / "tiny.deploy.safetensors")
    train = RepNeXt(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256))
    train.load_state_dict(read_raw(ckpt, False))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = train.eval()(x)
        assert (deploy(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
