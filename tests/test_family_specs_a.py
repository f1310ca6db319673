"""Built-in specs of the ACNet, DBB and MobileOne families, end to end: init -> convert (verified)
-> deploy file, with the deploy parameter count of the plain architecture each one stands for.

Verification uses one small input (1, 3, 64, 64): these nets downsample by 32, so every layer
still sees a spatial map with borders, and the whole file stays within a few seconds per spec.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.models.mobilenet import MOBILE_CHANNELS, STRIDE2_BLOCKS
from reparam_cli.pipeline.options import VerifyOptions
from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint
from reparam_cli.pipeline.specs import builtin_names, load_spec

SMALL = (1, 3, 64, 64)


def plain_params(model: nn.Module) -> int:
    """Parameters of `model` with every BatchNorm folded away: conv weights + one bias per conv + the FC."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.weight.numel() + m.out_channels
        elif isinstance(m, nn.Linear):
            total += sum(p.numel() for p in m.parameters())
    return total


def plain_resnet18() -> int:
    torchvision = pytest.importorskip("torchvision")  # installed with the timm extra, as in CI
    with torch.device("meta"):
        return plain_params(torchvision.models.resnet18(num_classes=1000))


def plain_mobilenet_v1() -> int:
    """MobileNetV1 written out as plain convs with bias (Howard et al. 2017, Table 1)."""
    with torch.device("meta"):
        layers = [nn.Conv2d(3, MOBILE_CHANNELS[0], 3, 2, 1)]
        for i in range(13):
            c, out = MOBILE_CHANNELS[2 * i + 1], MOBILE_CHANNELS[2 * i + 2]
            layers += [nn.Conv2d(c, c, 3, 2 if i in STRIDE2_BLOCKS else 1, 1, groups=c), nn.Conv2d(c, out, 1)]
        layers.append(nn.Linear(MOBILE_CHANNELS[-1], 1000))
        return plain_params(nn.Sequential(*layers))


# spec -> (deploy parameter count of the plain architecture, blocks converted)
EXPECTED = {
    "resnet18-acb": (plain_resnet18, {"ACBlock": 16, "ConvBNAct": 4}),
    "resnet18-dbb": (plain_resnet18, {"DiverseBranchBlock": 16, "ConvBNAct": 4}),
    "mobilenetv1-dbb": (plain_mobilenet_v1, {"DiverseBranchBlock": 14, "ConvBNAct": 13}),
}
# MobileOne deploy parameters published in the paper (Vasu et al. 2023, Table 7), millions.
MOBILEONE_PUBLISHED = {"s0": 2.1, "s1": 4.8, "s2": 7.8, "s3": 10.1, "s4": 14.8}
for _v in MOBILEONE_PUBLISHED:
    EXPECTED[f"mobileone-{_v}"] = (None, {"MobileOneBlock": 1 + 2 * (2 + 8 + 10 + 1)})

SPECS = sorted(EXPECTED)


def test_specs_are_shipped():
    assert set(SPECS) <= set(builtin_names())
    for name in SPECS:
        spec = load_spec(name)
        assert spec.name == name and spec.description and "\n" not in spec.description
        assert spec.input_shape == (1, 3, 224, 224)


def test_plain_reference_counts():
    # ResNet-18 has 11.69M parameters with BatchNorm; folding BN (2 per channel) into a bias (1) removes 4800.
    assert plain_resnet18() == 11_689_512 - 4_800
    assert plain_mobilenet_v1() / 1e6 == pytest.approx(4.22, abs=0.01)


@pytest.mark.parametrize("name", SPECS)
def test_spec_end_to_end(name, tmp_path):
    ckpt = tmp_path / f"{name}.safetensors"
    init_checkpoint(name, ckpt, seed=1)
    out = tmp_path / "deploy.safetensors"
    report = convert_checkpoint(ckpt, name, out, verify_options=VerifyOptions(input_shape=SMALL))
    assert report["ok"] and report["verified"] and not report["failed_blocks"]
    # The fused model is as close to the float64 reference as float32 rounding of the training model itself.
    assert report["max_rel_err"] <= 10 * report["train_rel_err"], report
    expected_params, expected_blocks = EXPECTED[name]
    assert report["blocks"] == expected_blocks
    if expected_params is not None:
        assert report["params_after"] == expected_params()
    else:
        assert report["params_after"] / 1e6 == pytest.approx(MOBILEONE_PUBLISHED[name.split("-")[1]], abs=0.05)
    assert report["params_after"] < report["params_before"]
    # The deploy file rebuilds from its own metadata (a meta-device conversion of the spec) and runs.
    deploy = load_deploy(out)
    assert sum(p.numel() for p in deploy.parameters()) == report["params_after"]
    assert deploy(torch.randn(*SMALL)).shape == (1, 1000)
