"""The engine: tree walk, no mutation of its input, meta-device skeletons, recipe errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam_cli.blocks.common import ConvBN
from reparam_cli.blocks.repvgg import RepVGGBlock
from reparam_cli.core.tensors import count_parameters
from reparam_cli.convert.engine import reparameterize
from reparam_cli.errors import NotEquivalent
from reparam_cli.blocks.registry import all_recipes, recipe

from .helpers import randomized


def small_net():
    return nn.Sequential(RepVGGBlock(3, 8, stride=2), nn.Sequential(RepVGGBlock(8, 8), ConvBN(8, 4, 1)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_converts_nested_blocks_and_counts_them():
    deploy, report = reparameterize(randomized(small_net()))
    assert report.blocks == {"ConvBN": 1, "RepVGGBlock": 2}
    assert report.paths == ["0", "1.0", "1.1"]
    assert isinstance(deploy[1][1], nn.Conv2d)


def test_input_model_and_tensors_are_not_modified():
    model = randomized(small_net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    deploy, _ = reparameterize(model)
    assert [type(m) for m in model.modules()] == modules_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # Parameters of untouched layers share storage but are distinct Parameter objects.
    assert deploy[4].weight is not model[4].weight
    assert deploy[4].weight.data_ptr() == model[4].weight.data_ptr()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(deploy(x), model(x), rtol=1e-4, atol=1e-5)


def test_meta_model_gives_deploy_skeleton():
    with torch.device("meta"):
        model = small_net()
    deploy, report = reparameterize(model)
    assert all(p.is_meta for p in deploy.parameters())
    assert count_parameters(deploy) == count_parameters(reparameterize(small_net())[0])


def test_recipe_errors_name_the_block():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

    @recipe(Odd, family="test-odd")
    def fuse_odd(block):
        raise NotEquivalent("geometry does not line up")

    with pytest.raises(NotEquivalent, match=r"block 1 \(Odd\): geometry does not line up"):
        reparameterize(nn.Sequential(nn.ReLU(), Odd()))


def test_registry_lists_builtin_recipes():
    families = {r.family for r in all_recipes()}
    assert {"repvgg", "conv-bn"} <= families


def test_consume_frees_each_block_and_gives_the_same_deploy_model():
    model = randomized(small_net())
    expect, _ = reparameterize(model)
    deploy, report = reparameterize(model, consume=True)
    assert model[0].rbr_dense.conv.weight is None and model[1][1].bn.running_mean is None
    assert model[4].weight is not None  # untouched layers keep their tensors
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(deploy(x), expect(x))


def test_flop_counts_shape_only():
    from reparam_cli.core.stats import count_flops

    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    # conv: 2 * (3*3*3) * 8 * 16 outputs; linear: 2 * 128 * 10
    assert count_flops(model, (1, 3, 4, 4)) == 2 * 27 * 8 * 16 + 2 * 128 * 10


def test_flops_count_conv_like_blocks_and_verification_reports_them():
    """Hook-based counts: a RefConv convolves with a computed kernel and still counts as a conv."""
    from reparam_cli.blocks.refconv import RefConv
    from reparam_cli.core.stats import count_flops
    from reparam_cli.verification.equivalence import verify

    block = RefConv(4, 4, 3, groups=4).eval()
    deploy, _ = reparameterize(block)
    conv = 2 * 4 * 8 * 8 * 1 * 9          # depthwise 3x3 on 8x8: 2 * outputs * (in/groups) * k*k
    # The refocusing conv (dense 4 -> 4, 3x3) runs over the four 3x3 base kernels as one image.
    assert block.convmap.groups == 1
    convmap = 2 * (4 * 3 * 3) * 4 * 9
    assert count_flops(deploy, (1, 4, 8, 8)) == conv
    assert count_flops(block, (1, 4, 8, 8)) == conv + convmap
    result = verify(block, deploy, (1, 4, 8, 8))
    assert (result.flops_train, result.flops_deploy) == (conv + convmap, conv)


def test_consume_keeps_submodules_the_deploy_block_shares():
    """consume=True frees each fused training block, but not a submodule its deploy form reuses
    (RepVGG's SE module): the deploy model still computes the training model's function."""
    import torch

    from reparam_cli.blocks.repvgg import RepVGGBlock
    from reparam_cli.convert.engine import reparameterize

    torch.manual_seed(0)
    block = RepVGGBlock(32, 32, use_se=True).eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        ref = block(x)
        deploy, _ = reparameterize(block, consume=True)
        assert torch.allclose(deploy(x), ref, rtol=1e-4, atol=1e-5)
