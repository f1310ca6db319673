"""RepMLP: grouped conv -> FC algebra, block geometry, the RepMLPNet-T224 spec end to end, key names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam_cli.core import algebra as A
from reparam_cli.blocks.repmlp import RepMLPBlock, RepMLPDeployBlock, RepMLPNet
from reparam_cli.core.tensors import count_parameters
from reparam_cli.convert.engine import reparameterize
from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint

from .helpers import assert_equivalent, randomized


# --------------------------------------------------------------------------- algebra

@pytest.mark.parametrize("cin,cout,groups,k,stride", [
    (4, 4, 4, 3, 1),   # depthwise: FC with 4 groups
    (4, 6, 2, 3, 2),   # grouped, strided, in != out
    (3, 5, 1, 5, 1),   # dense (one group)
    (6, 6, 3, 7, 1),   # kernel larger than the map
])
def test_conv_as_fc_keeps_groups(cin, cout, groups, k, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups).double()
    h, w = 5, 6
    fc = A.conv_as_fc(A.from_module(conv), (cin, h, w))
    assert fc.groups == groups and fc.ndim == 0
    assert fc.weight.shape[1] == cin // groups * h * w  # per-group matrix, not the dense C*H*W square
    x = torch.randn(3, cin, h, w, dtype=torch.float64)
    ref = conv(x).flatten(1)
    assert torch.allclose(A.apply(fc, x.flatten(1)), ref, atol=1e-12)
    assert torch.allclose(A.to_module(fc)(x.flatten(1)), ref, atol=1e-12)


def test_repeat_bn_matches_bn_over_a_reshaped_output():
    bn = randomized(nn.BatchNorm2d(3))
    fc = nn.Linear(8, 3 * 4).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    ref = bn.double()(fc(x).reshape(5, 3, 2, 2)).flatten(1)
    fused = A.fuse_bn(A.from_module(fc), A.repeat_bn(bn, 4))
    assert torch.allclose(A.apply(fused, x), ref, atol=1e-12)


# --------------------------------------------------------------------------- block geometry

@pytest.mark.parametrize("channels,sharesets,h,w,ks,image", [
    (8, 1, 4, 4, (1, 3), (4, 4)),        # one share-set, one partition (the reference's layout)
    (8, 2, 4, 3, (3, 5), (8, 9)),        # 2 x 3 partitions, h != w
    (8, 8, 3, 3, (1, 3, 5, 7), (6, 6)),  # one channel per share-set; kernel 7 wider than the partition
    (6, 3, 5, 5, (), (5, 10)),           # no local perceptron: only FC3 + BN fold
])
def test_block_geometry(channels, sharesets, h, w, ks, image):
    block = randomized(RepMLPBlock(channels, channels, h, w, reparam_conv_k=ks or None, globalperceptron_reduce=2,
                                   num_sharesets=sharesets))
    deploy, report = assert_equivalent(block, (2, channels, *image))
    assert isinstance(deploy, RepMLPDeployBlock) and report.blocks == {"RepMLPBlock": 1}
    # The deploy form holds FC3 (an FC per share-set) and the global perceptron, nothing else.
    assert {n for n, _ in deploy.named_children()} == {"gp", "fc3"}
    assert deploy.fc3.groups == sharesets and deploy.fc3.bias is not None
    assert count_parameters(deploy) == count_parameters(block.gp) + sharesets * (h * w) ** 2 + sharesets * h * w


def test_block_refuses_bad_geometry():
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        RepMLPBlock(4, 8, 2, 2)
    with pytest.raises(ValueError, match="share-sets"):
        RepMLPBlock(6, 6, 2, 2, num_sharesets=4)
    with pytest.raises(ValueError, match="odd"):
        RepMLPBlock(4, 4, 2, 2, reparam_conv_k=(2,))
    with pytest.raises(ValueError, match="tile"):
        RepMLPBlock(4, 4, 3, 3)(torch.randn(1, 4, 4, 4))


def test_reference_key_names():
    net = RepMLPNet(channels=(8, 16), hs=(4, 2), ws=(4, 2), num_blocks=(1, 1), sharesets_nums=(1, 4),
                    num_class=10)
    keys = set(net.state_dict())
    for key in ("conv_embedding.conv.weight", "conv_embedding.bn.running_mean", "stages.0.0.prebn1.weight",
                "stages.0.0.repmlp_block.gp.fc1.weight", "stages.0.0.repmlp_block.fc3.weight",
                "stages.0.0.repmlp_block.fc3_bn.running_var", "stages.0.0.repmlp_block.repconv3.conv.weight",
                "stages.0.0.repmlp_block.repconv1.bn.weight", "stages.1.0.ffn_block.ffn_fc1.conv.weight",
                "embeds.0.conv.weight", "head_norm.weight", "head.weight"):
        assert key in keys, key
    deploy, _ = assert_equivalent(randomized(net), (2, 3, 16, 16))
    deploy_keys = set(deploy.state_dict())
    assert {"stages.0.0.repmlp_block.fc3.weight", "stages.0.0.repmlp_block.fc3.bias",
            "stages.0.0.repmlp_block.gp.fc2.bias"} <= deploy_keys
    assert not any("repconv" in k or "fc3_bn" in k for k in deploy_keys)


# --------------------------------------------------------------------------- the spec

def _deploy_param_formula(model: nn.Module) -> int:
    """Deploy parameters from the training architecture: FC3 gains a bias and loses BN and the local
    perceptron; everything else stays (the reference deploy model keeps its conv-BN pairs)."""
    total = count_parameters(model)
    for m in model.modules():
        if isinstance(m, RepMLPBlock):
            s, hw = m.S, m.h * m.w
            total += s * hw - 2 * s - sum(s * k * k + 2 * s for k in m.reparam_conv_k or ())
    return total


def test_repmlpnet_t224_spec_end_to_end(tmp_path):
    """RepMLPNet-T224 (38.3M parameters in the paper): init -> convert -> verified deploy file.

    Its partitions (56, 28, 14, 7) fix the input at 224 x 224, so verification runs at full size."""
    ckpt = tmp_path / "t224.safetensors"
    init_checkpoint("repmlpnet-t224", ckpt, seed=2)
    report = convert_checkpoint(ckpt, "repmlpnet-t224", tmp_path / "t224.deploy.safetensors")
    assert report["ok"] and report["blocks"]["RepMLPBlock"] == 12
    assert report["max_rel_err"] <= max(10 * report["train_rel_err"], 1e-6)
    assert report["params_before"] / 1e6 == pytest.approx(38.3, abs=0.05)
    with torch.device("meta"):
        model = RepMLPNet()
    # The reference deploy model (recipes only) has the formula's count; the graph pass also folds
    # the conv+BN pairs and BatchNorms outside the RepMLP blocks, which the reference keeps.
    assert count_parameters(reparameterize(model, graph=False)[0]) == _deploy_param_formula(model)
    assert report["params_after"] == count_parameters(reparameterize(model)[0]) < _deploy_param_formula(model)
