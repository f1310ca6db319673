"""`--spec timm:<model>`: timm models built without downloading, converted through reparam's recipes
for timm's RepVGG/MobileOne blocks or their own reparameterize()/fuse() (the native fallback),
verified per block, rebuilt from the deploy file."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from reparam_cli.errors import SpecError
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.pipeline.specs import load_spec

from .test_checkpoint_formats import run

timm = pytest.importorskip("timm")

SMALL = ["--input-shape", "1,3,64,64"]

# (spec, block types converted by their own method in the report, by reparam's timm recipes)
MODELS = [
    ("timm:repvgg_a0?num_classes=10", set(), {"RepVggBlock"}),
    ("timm:mobileone_s0?num_classes=10", set(), {"MobileOneBlock"}),
    # fastvit's MobileOneBlock is its own class (timm.models.fastvit), fused by its own method
    ("timm:fastvit_t8?num_classes=10", {"MobileOneBlock", "RepMixer", "ReparamLargeKernelConv"}, set()),
    ("timm:repghostnet_050?num_classes=10", {"RepGhostModule"}, set()),
]


def test_timm_spec_reference_parsing():
    spec = load_spec("timm:repvgg_a0?num_classes=10&in_chans=1&drop_rate=0.0")
    assert spec.builder == "timm:create_model"
    assert spec.args == {"model_name": "repvgg_a0", "num_classes": 10, "in_chans": 1, "drop_rate": 0.0}
    assert spec.input_shape == (1, 1, 224, 224)
    assert load_spec("timm:fastvit_t8").input_shape == (1, 3, 256, 256)  # timm's default config
    model = spec.build(device="meta")
    assert model.head.fc.out_features == 10 and model.stem.conv_kxk.conv.in_channels == 1


def test_timm_spec_errors():
    with pytest.raises(SpecError, match="timm has no model 'repvgg_a00'.*did you mean repvgg_a0"):
        load_spec("timm:repvgg_a00")
    with pytest.raises(SpecError, match="pretrained is not allowed"):
        load_spec("timm:repvgg_a0?pretrained=true").build(device="meta")
    with pytest.raises(SpecError, match="rejected its arguments"):
        load_spec("timm:repvgg_a0?no_such_arg=1").build(device="meta")


def test_missing_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(SpecError, match=r"pip install timm"):  # reparam is not on a package index
        load_spec("timm:repvgg_a0")


@pytest.mark.parametrize("ref,native,recipes", MODELS, ids=[m[0].split(":")[1].split("?")[0] for m in MODELS])
def test_timm_models_convert_verify_and_reload(tmp_path, ref, native, recipes):
    ckpt = tmp_path / "train.pth"
    result = run("init", ref, "-o", ckpt, "--seed", "1")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "deploy.safetensors"
    result = run("convert", ckpt, "--spec", ref, "-o", out, "--json", *SMALL)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["blocks"]) == native | recipes and set(report["native_blocks"]) == native
    assert report["ok"] and report["max_rel_err"] < 1e-4 and report["params_after"] < report["params_before"]
    assert report["worst_block"] is not None  # per-block figures: each native block sits at its path
    # Rebuilt from the file's metadata alone (timm spec stored), and equal to the training model.
    deploy = load_deploy(out)
    train = load_spec(ref).build().eval()
    train.load_state_dict(torch.load(ckpt, weights_only=True))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_out, got = train.double()(x.double()), deploy(x).double()
    assert ((got - ref_out).abs().max() / ref_out.abs().max()).item() < 1e-4
    result = run("verify", ckpt, out, "--spec", ref, "--json", *SMALL)
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"], result.stderr


def test_yaml_spec_with_timm_builder_and_a_timm_style_checkpoint(tmp_path):
    spec = tmp_path / "mobileone.yaml"
    spec.write_text("name: my-mobileone\nbuilder: timm:create_model\n"
                    "args: {model_name: mobileone_s0, num_classes: 4}\ninput_shape: [1, 3, 64, 64]\n")
    model = load_spec(str(spec)).build()
    import argparse

    ckpt = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 9, "arch": "mobileone_s0", "state_dict": model.state_dict(),
                "args": argparse.Namespace(model="mobileone_s0")}, ckpt)
    result = run("convert", ckpt, "--spec", spec, "-f", "pt2", "-o", tmp_path / "m.pt2", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["blocks"] == {"MobileOneBlock": 43} and report["export_ok"]


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s1", "repvgg_b1g4"])
def test_timm_block_recipes_match_timms_own_reparameterize(name):
    """reparam's recipes for timm's RepVggBlock / MobileOneBlock give timm's deploy layout key for key
    (`reparam_conv`, branches gone), the same function in float64 within float32 rounding, and the
    same weights as timm's own reparameterize() run in float64 (which reparam used before)."""
    import copy

    from timm.utils.model import reparameterize_model

    from reparam_cli.convert.engine import reparameterize
    from reparam_cli.core.tensors import randomize_batchnorm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        randomize_batchnorm(model, torch.Generator().manual_seed(1))
    deploy, report = reparameterize(model)
    assert {b.family for b in report.converted} == {"timm"} and not report.remaining
    theirs = reparameterize_model(copy.deepcopy(model).double())  # timm's own method, in float64
    ours, want = deploy.state_dict(), theirs.state_dict()
    assert list(ours) == list(want) or set(ours) == set(want)
    for key, t in want.items():
        assert ours[key].dtype == torch.float32
        assert torch.allclose(ours[key].double(), t, rtol=1e-6, atol=1e-7), key
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.double()(x)
        got = deploy.double()(x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_timm_block_recipes_decline_what_they_do_not_know():
    """A subclass of timm's RepVggBlock, or a branch whose BatchNorm holds a drop layer (DropBlock, an
    identity in eval mode), is not what the recipe knows: the block's own reparameterize() converts
    it (family 'native')."""
    from timm.models.byobnet import RepVggBlock

    from reparam_cli.convert.engine import reparameterize

    class MyBlock(RepVggBlock):
        pass

    model = torch.nn.Sequential(RepVggBlock(8, 8), MyBlock(8, 8), RepVggBlock(8, 8)).eval()
    model[2].conv_1x1.bn.drop = torch.nn.Dropout(0.5)  # not a plain conv-BN branch for the recipe
    model.eval()
    deploy, report = reparameterize(model)
    assert [(b.path, b.family) for b in report.converted] == [("0", "timm"), ("1", "native"), ("2", "native")]
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        assert torch.allclose(deploy(x), model(x), rtol=1e-4, atol=1e-5)
