"""Every model zoo's natural route (issue 17): `torchvision:<builder>`, `transformers:<model type>` and
save_pretrained folders, unknown routes answered in one line, checkpoints as each zoo's trainers
write them (torchvision's reference scripts with their `_metadata`), ultralytics models built in
the user's own spec converting as through `ultralytics:`. Small models, small inputs."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from reparam_cli.errors import SpecError
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.pipeline.specs import load_spec

from .helpers import run_cli

SMALL = ["--input-shape", "1,3,64,64"]


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_unknown_route_answers_with_the_routes(tmp_path):
    with pytest.raises(SpecError) as exc:
        load_spec("torchvison:resnet18")
    text = str(exc.value) + str(exc.value.hint)
    assert "did you mean torchvision:" in text and "timm:" in text and "build_model()" in text
    assert "model_specs" not in text  # never an internal path


def test_module_callable_spec(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text("from torch import nn\n"
                                        "def small(width=4):\n"
                                        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = load_spec("mynets:small?width=8")
    assert spec.builder == "mynets:small" and spec.args == {"width": 8}
    assert spec.build(device="meta")[0].out_channels == 8


tv = pytest.importorskip("torchvision")


def test_torchvision_spec_and_suggestions():
    spec = load_spec("torchvision:resnet18?num_classes=10")
    assert spec.builder == "reparam_cli.ecosystems.torchvision:build_model"
    assert spec.args == {"name": "resnet18", "num_classes": 10} and spec.input_shape == (1, 3, 224, 224)
    assert load_spec("torchvision:r3d_18").input_shape == (1, 3, 8, 112, 112)
    with pytest.raises(SpecError) as exc:
        load_spec("torchvision:resnet81")
    assert "torchvision:resnet18" in str(exc.value.hint)
    with pytest.raises(SpecError):
        load_spec("torchvision:resnet18?weights=IMAGENET1K_V1").build(device="meta")


def test_torchvision_reference_script_checkpoint_keeps_metadata(tmp_path):
    """references/classification/train.py's checkpoint (argparse.Namespace inside) of MNASNet, whose
    layers check the state dict's `_metadata` versions: read without --trust-pickle, converted,
    the written file rebuilt."""
    model = tv.models.mnasnet0_5(num_classes=10).eval()
    with torch.no_grad():
        _randomize_bn(model)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 3,
                "args": argparse.Namespace(lr=0.1, model="mnasnet0_5")}, ckpt)
    out = tmp_path / "mnas.safetensors"
    res = run_cli("convert", ckpt, "--spec", "torchvision:mnasnet0_5?num_classes=10", "-o", out, *SMALL, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and report["max_rel_err"] < 1e-4
    deploy = load_deploy(out)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(deploy(x), model(x), rtol=1e-4, atol=1e-4)
