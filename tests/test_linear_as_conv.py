"""P9 as a conversion option: reparameterize(model, linear_as_conv=True) and `convert --linear-as-conv`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from reparam_cli.blocks.linear_conv import PointwiseLinear, linear_to_pointwise
from reparam_cli.blocks.repvgg import RepVGG
from reparam_cli.commands.app import app
from reparam_cli.convert.engine import reparameterize
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.pipeline.options import VerifyOptions
from reparam_cli.pipeline.conversion import convert_checkpoint, init_checkpoint, verify_checkpoint

from .helpers import randomized


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6), (6,), (2, 3, 4, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_linear_same_function_same_inputs(shape, bias):
    linear = nn.Linear(6, 4, bias=bias).double()
    conv = linear_to_pointwise(linear)
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (4, 6, 1, 1) and (conv.bias is None) == (not bias)
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(conv(x), linear(x), atol=1e-13)
    assert conv.weight.data_ptr() != linear.weight.data_ptr()  # the input model's tensors are not shared


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):  # (N, L, 8)
        return self.attn(self.mlp(x), x, x, need_weights=False)[0]


def test_reparameterize_option_converts_plain_linears_only():
    model = randomized(Head())
    deploy, report = reparameterize(model, linear_as_conv=True)
    assert report.blocks == {"Linear": 2} and set(report.paths) == {"mlp.0", "mlp.2"}
    assert isinstance(deploy.mlp[0], PointwiseLinear) and isinstance(deploy.mlp[2], PointwiseLinear)
    # MultiheadAttention reads out_proj.weight itself: left as it is.
    assert type(deploy.attn.out_proj) is type(model.attn.out_proj)
    assert type(model.mlp[0]) is nn.Linear  # the input model is untouched
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.allclose(deploy(x), model(x), atol=1e-6)
    assert reparameterize(model)[1].blocks == {}  # off by default


def test_with_blocks_keys_kept():
    model = randomized(RepVGG([1, 1, 1, 1], [0.25] * 4, num_classes=10))
    deploy, report = reparameterize(model, linear_as_conv=True)
    assert report.blocks == {"Linear": 1, "RepVGGBlock": 5}
    assert deploy.state_dict()["linear.weight"].shape == (10, 128, 1, 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert (deploy(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_pipeline_and_cli_round_trip(tmp_path):
    ckpt = tmp_path / "tiny.pth"
    init_checkpoint("repnext-tiny", ckpt, seed=0)
    out = tmp_path / "tiny.deploy.safetensors"
    opts = VerifyOptions(input_shape=(1, 3, 32, 32))
    report = convert_checkpoint(ckpt, "repnext-tiny", out, verify_options=opts, linear_as_conv=True)
    assert report["ok"] and report["blocks"]["Linear"] == 1
    assert report["max_rel_err"] <= max(10 * report["train_rel_err"], 1e-6)
    # The deploy file records the option, so the skeleton it is loaded into matches.
    assert isinstance(load_deploy(out).head[2], PointwiseLinear)
    assert verify_checkpoint(ckpt, out, "repnext-tiny", verify_options=opts)["ok"]

    out2 = tmp_path / "cli.deploy.safetensors"
    result = CliRunner().invoke(app, ["convert", str(ckpt), "--spec", "repnext-tiny", "-o", str(out2),
                                      "--linear-as-conv", "--json", "--input-shape", "1,3,32,32"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["blocks"]["Linear"] == 1
    result = CliRunner().invoke(app, ["verify", str(ckpt), str(out2), "--spec", "repnext-tiny", "--json",
                                      "--input-shape", "1,3,32,32"])
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"]
