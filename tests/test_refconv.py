"""RefConv: the refocus algebra, geometry (depthwise / dense / grouped, kernel and map sizes, stride),
and the mobilenetv2-refconv spec, whose deploy form is torchvision's MobileNetV2 key for key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam_cli.core import algebra as A
from reparam_cli.blocks.refconv import RefConv
from reparam_cli.core.tensors import count_parameters
from reparam_cli.errors import NotEquivalent
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.models.mobilenetv2 import MobileNetV2
from reparam_cli.pipeline.options import VerifyOptions
from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint

from .helpers import assert_equivalent, randomized


def test_refocus_is_base_plus_map_of_base():
    torch.manual_seed(0)
    base = A.Kernel(torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64),
                    (2, 2), (2, 2), (1, 1), 2)
    refocuser = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False).double()
    k = A.refocus(base, A.from_module(refocuser))
    expected = base.weight + refocuser(base.weight.reshape(1, 8, 5, 5)).reshape(4, 2, 5, 5)
    assert torch.allclose(k.weight, expected, atol=1e-12)
    assert k.bias is base.bias and (k.stride, k.padding, k.groups) == (base.stride, base.padding, base.groups)


def test_refocus_refuses_mismatches():
    base = A.Kernel(torch.randn(4, 2, 3, 3))
    with pytest.raises(NotEquivalent, match="does not fit"):
        A.refocus(base, A.from_module(nn.Conv2d(6, 6, 3, padding=1, bias=False)))
    with pytest.raises(NotEquivalent, match="kernel size"):
        A.refocus(base, A.from_module(nn.Conv2d(8, 8, 3, padding=0, bias=False)))
    with pytest.raises(NotEquivalent, match="no bias"):
        A.refocus(base, A.from_module(nn.Conv2d(8, 8, 3, padding=1)))


@pytest.mark.parametrize("cin,cout,k,stride,groups,map_k", [
    (6, 6, 3, 1, 6, 3),    # depthwise (MobileNet): one dense map across the 6 kernels
    (6, 6, 5, 2, 6, 3),    # depthwise, stride 2, 5x5
    (6, 6, 7, 1, 6, 5),    # depthwise 7x7, wider map
    (4, 6, 3, 1, 1, 3),    # dense, in != out: one map per 2-d kernel
    (4, 8, 5, 2, 2, 1),    # grouped, strided, 1x1 map
    (6, 3, 7, 1, 3, 7),    # grouped, map as large as the kernel
])
def test_geometry(cin, cout, k, stride, groups, map_k):
    block = randomized(RefConv(cin, cout, k, stride, groups=groups, map_k=map_k))
    block.weight.normal_()  # the frozen base is a buffer, which randomized() leaves alone
    deploy, report = assert_equivalent(block, (2, cin, 11, 10))
    assert report.blocks == {"RefConv": 1}
    assert type(deploy) is nn.Conv2d and deploy.bias is None
    assert (deploy.groups, deploy.stride, deploy.kernel_size) == (groups, (stride, stride), (k, k))
    plain = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    assert count_parameters(deploy) == count_parameters(plain)
    # The transformation matters: W_t differs from the base weights.
    assert not torch.allclose(deploy.weight, block.weight)


def test_reference_key_names_and_refusals():
    block = RefConv(4, 4, 3, groups=4)
    assert set(block.state_dict()) == {"weight", "convmap.weight"}
    assert "weight" in dict(block.named_buffers()) and block.convmap.groups == 1
    assert RefConv(2, 3, 3).convmap.groups == 6
    with pytest.raises(ValueError, match="map_k"):
        RefConv(4, 4, 3, map_k=5)


def test_mobilenetv2_refconv_spec_end_to_end(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    ckpt = tmp_path / "mnv2.safetensors"
    init_checkpoint("mobilenetv2-refconv", ckpt, seed=5)
    out = tmp_path / "mnv2.deploy.safetensors"
    # graph=False: the BatchNorms stay, so the deploy file has torchvision's layout exactly.
    report = convert_checkpoint(ckpt, "mobilenetv2-refconv", out, graph=False,
                                verify_options=VerifyOptions(input_shape=(2, 3, 32, 32)))
    assert report["ok"] and report["blocks"] == {"RefConv": 17}
    assert report["max_rel_err"] <= max(10 * report["train_rel_err"], 1e-6)
    # Deploy = plain MobileNetV2: same parameter count, built independently, and torchvision's.
    assert report["params_after"] == count_parameters(MobileNetV2(depthwise="conv")) == 3_504_872
    deploy = load_deploy(out)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(deploy.state_dict())  # strict: torchvision's keys and shapes exactly
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = reference(x), deploy(x)
    # Same function up to float32 rounding (the two implementations order some ops differently).
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max()
