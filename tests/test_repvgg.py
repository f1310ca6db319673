"""RepVGG: block geometry, every built-in spec end to end, reference key names."""

from __future__ import annotations

import pytest

from reparam_cli.blocks.repvgg import RepVGG, RepVGGBlock, RepVGGDeployBlock
from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint
from reparam_cli.pipeline.options import VerifyOptions
from reparam_cli.pipeline.specs import builtin_names, load_spec

from .helpers import assert_equivalent, randomized


@pytest.mark.parametrize("cin,cout,stride,groups", [
    (8, 8, 1, 1),    # identity branch present
    (8, 8, 2, 1),    # stride 2: no identity
    (8, 16, 1, 1),   # in != out: no identity
    (8, 8, 1, 2),    # grouped with identity
    (8, 16, 2, 4),   # grouped, strided, in != out
    (8, 8, 1, 8),    # depthwise with identity
])
def test_block_geometry(cin, cout, stride, groups):
    block = randomized(RepVGGBlock(cin, cout, 3, stride=stride, padding=1, groups=groups))
    assert (block.rbr_identity is not None) == (cin == cout and stride == 1)
    deploy, report = assert_equivalent(block, (2, cin, 11, 10))
    assert isinstance(deploy, RepVGGDeployBlock)
    assert report.blocks == {"RepVGGBlock": 1}
    assert deploy.rbr_reparam.groups == groups and deploy.rbr_reparam.stride == (stride, stride)


@pytest.mark.parametrize("k", [5, 7])
def test_block_larger_kernels(k):
    block = randomized(RepVGGBlock(6, 6, k, stride=1, padding=k // 2))
    deploy, _ = assert_equivalent(block, (1, 6, 12, 12))
    assert deploy.rbr_reparam.kernel_size == (k, k)


def test_block_with_se():
    block = randomized(RepVGGBlock(16, 16, use_se=True))
    assert_equivalent(block, (2, 16, 8, 8))


def test_reference_key_names():
    keys = set(RepVGG([1, 1, 1, 1], [0.25, 0.25, 0.25, 0.25], num_classes=10).state_dict())
    assert "stage0.rbr_dense.conv.weight" in keys
    assert "stage0.rbr_1x1.bn.running_var" in keys
    assert "stage1.0.rbr_dense.bn.weight" in keys
    assert "linear.weight" in keys
    deploy_keys = set(assert_equivalent(randomized(RepVGG([1, 2, 1, 1], [0.25] * 4, num_classes=10)),
                                        (1, 3, 32, 32))[0].state_dict())
    assert "stage0.rbr_reparam.weight" in deploy_keys and "stage2.1.rbr_reparam.bias" in deploy_keys
    assert not any("rbr_dense" in k or "rbr_1x1" in k or "rbr_identity" in k for k in deploy_keys)


def test_groupwise_layers_follow_reference():
    model = RepVGG([4, 6, 16, 1], [2, 2, 2, 4], groupwise=4)
    groups = [m.rbr_dense.conv.groups for m in model.modules() if isinstance(m, RepVGGBlock)]
    # 1-based block index: even layers 2..26 are groupwise, stage0 (index 0) never.
    assert groups[0] == 1 and groups[2] == 4 and groups[1] == 1 and groups[26] == 4 and groups[27] == 1


# Published parameter counts (training, deploy) of the RepVGG paper, in millions.
PUBLISHED = {"repvgg-a0": (9.11, 8.31), "repvgg-a1": (14.09, 12.79), "repvgg-b0": (15.82, 14.34),
             "repvgg-b3": (123.09, 110.96)}

REPVGG_SPECS = [n for n in builtin_names() if n.startswith("repvgg-")]


def test_all_repvgg_specs_are_shipped():
    assert set(REPVGG_SPECS) >= {f"repvgg-{v}" for v in
                                 ("a0", "a1", "a2", "b0", "b1", "b1g2", "b1g4", "b2", "b2g4", "b3", "b3g4")}


@pytest.mark.parametrize("name", REPVGG_SPECS)
def test_spec_end_to_end(name, tmp_path):
    """init -> convert (verified) -> deploy file; small input keeps it quick."""
    ckpt = tmp_path / f"{name}.safetensors"
    init_checkpoint(name, ckpt, seed=1)
    report = convert_checkpoint(ckpt, name, tmp_path / "out.safetensors",
                                verify_options=VerifyOptions(input_shape=(1, 3, 32, 32)))
    assert report["ok"] and report["max_rel_err"] < 1e-5
    # No worse than the training model's own float32 error against float64, to an order of magnitude.
    assert report["max_rel_err"] <= 10 * report["train_rel_err"]
    assert report["blocks"] == {"RepVGGBlock": sum(load_spec(name).args["num_blocks"]) + 1}
    # The deploy form has exactly the parameters of the deploy architecture: one kxk conv + bias per block.
    assert report["params_after"] < report["params_before"]
    if name in PUBLISHED:
        before, after = PUBLISHED[name]
        assert report["params_before"] / 1e6 == pytest.approx(before, abs=0.01)
        assert report["params_after"] / 1e6 == pytest.approx(after, abs=0.01)
