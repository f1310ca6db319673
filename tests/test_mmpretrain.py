"""`--spec mmpretrain:<model>`: mmpretrain classifiers built with get_model(pretrained=False),
checkpoints in mmengine's layout, converted through the backbones' own switch_to_deploy() and
compared with mmpretrain's own fuse (parameters, BatchNorm count, outputs) and with the training
model, reloaded from the deploy file."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

from reparam_cli.pipeline.deploy import deploy_skeleton, load_deploy
from reparam_cli.errors import SpecError
from reparam_cli.pipeline.options import FuseOptions, VerifyOptions
from reparam_cli.pipeline.conversion import convert_checkpoint
from reparam_cli.core.tensors import randomize_batchnorm
from reparam_cli.pipeline.specs import load_spec

from .helpers import batchnorms
from .test_checkpoint_formats import run

pytest.importorskip("mmpretrain")

SMALL_REPMLP = ("mmpretrain:repmlp-base_3rdparty_8xb64_in1k?backbone.img_size=64&head.in_channels=64"
                "&backbone.arch.channels=[8,16,32,64]&backbone.arch.depths=[1,1,2,1]&backbone.arch.sharesets_nums=[1,2,4,8]")
# (spec, the blocks reparam reports); every model at 64x64 to stay fast.
MODELS = [
    ("mmpretrain:repvgg-a0_8xb32_in1k?head.num_classes=10", {"RepVGG": 1}),
    ("mmpretrain:mobileone-s0_8xb32_in1k?head.num_classes=10", {"MobileOne": 1}),
    (SMALL_REPMLP, {"RepMLPNet": 1}),
    ("mmpretrain:riformer-s12_in1k?head.num_classes=10", {"RIFormer": 1}),
    ("mmpretrain:levit-128s_3rdparty_in1k?backbone.img_size=64&head.num_classes=10", {"LeViT": 1, "LeViTClsHead": 1}),
]


def mmpretrain_fuse(model: nn.Module) -> nn.Module:
    """mmpretrain's own deploy form: its tools/model_converters/reparameterize_model.py calls
    `model.backbone.switch_to_deploy()`; LeViT's head has one too."""
    model = copy.deepcopy(model)
    for part in (model.backbone, model.head):
        if hasattr(part, "switch_to_deploy"):
            part.switch_to_deploy()
    return model


def test_mmpretrain_spec_reference():
    spec = load_spec("mmpretrain:repvgg-a0_8xb32_in1k?head.num_classes=10&backbone.out_indices=[3]")
    assert spec.builder == "reparam_cli.ecosystems.mmpretrain:build_model"
    assert spec.args == {"model": "repvgg-a0_8xb32_in1k", "head.num_classes": 10, "backbone.out_indices": [3]}
    assert spec.input_shape == (1, 3, 224, 224)  # the test pipeline's crop size
    assert load_spec("mmpretrain:repmlp-base_3rdparty_8xb64_in1k-256px").input_shape == (1, 3, 256, 256)
    model = spec.build(device="meta")
    assert model.head.fc.out_features == 10
    # mmpretrain's checkpoint layout is the classifier's own state dict: backbone. / head. keys.
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "head"}


def test_mmpretrain_spec_errors(monkeypatch):
    with pytest.raises(SpecError, match="mmpretrain has no model 'repvgg-a00_8xb32_in1k'.*did you mean repvgg-a0"):
        load_spec("mmpretrain:repvgg-a00_8xb32_in1k")
    with pytest.raises(SpecError, match="backbone.init_cfg is not allowed"):
        load_spec("mmpretrain:repvgg-a0_8xb32_in1k?backbone.init_cfg={type: Pretrained}").build(device="meta")
    with pytest.raises(SpecError, match="could not build 'repvgg-a0_8xb32_in1k'.*no_such_arg"):
        load_spec("mmpretrain:repvgg-a0_8xb32_in1k?backbone.no_such_arg=1").build(device="meta")
    monkeypatch.setitem(sys.modules, "mmpretrain", None)  # import mmpretrain -> ImportError
    with pytest.raises(SpecError, match=r"pip install mmpretrain mmengine mmcv-lite"):
        load_spec("mmpretrain:repvgg-a0_8xb32_in1k")


@pytest.mark.parametrize("ref,blocks", MODELS, ids=[m[0].split(":")[1].split("_")[0] for m in MODELS])
def test_mmpretrain_models_convert_like_mmpretrain_and_reload(tmp_path, ref, blocks):
    spec = load_spec(ref)
    train = spec.build().eval()  # mmpretrain's own init (fully random weights overflow LeViT)
    with torch.no_grad():
        randomize_batchnorm(train, torch.Generator().manual_seed(0))
    ckpt = tmp_path / "epoch_3.pth"
    torch.save({"meta": {"epoch": 3, "iter": 30, "mmengine_version": "0.10.7"}, "state_dict": train.state_dict()}, ckpt)
    out = tmp_path / "deploy.safetensors"
    report = convert_checkpoint(ckpt, spec, out, verify_options=VerifyOptions(input_shape=(1, 3, 64, 64)))
    assert report["ok"] and report["blocks"] == blocks and report["max_rel_err"] < 1e-5
    assert report["worst_block"]["path"] in ("backbone", "head")  # per-block figures at the blocks' paths

    own = mmpretrain_fuse(train).eval()
    deploy = load_deploy(out)  # rebuilt from the file alone (the spec is stored in it)
    # The default layout folds what mmpretrain's own fuse leaves (its deploy forms keep a conv+BN
    # stem, LeViT's BatchNorm+Linear head, RIFormer's layer scales): never more than mmpretrain's.
    assert type(deploy) is type(train)
    assert report["params_after"] <= sum(p.numel() for p in own.parameters())
    assert batchnorms(deploy) <= batchnorms(own)
    # --layout reference is mmpretrain's own deploy form, key for key.
    skeleton, _ = deploy_skeleton(spec, FuseOptions(layout="reference"))
    assert skeleton.state_dict().keys() == own.state_dict().keys()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_out = train.double()(x.double())
        for model in (own, deploy):
            got = model(x).double()
            assert ((got - ref_out).abs().max() / ref_out.abs().max()).item() < 1e-5


def test_mmpretrain_cli_convert_json_stdout_stays_clean(tmp_path):
    """mmengine logs to stdout while building: --json output must still be one JSON object."""
    ref = "mmpretrain:mobileone-s0_8xb32_in1k?head.num_classes=4"
    ckpt = tmp_path / "epoch_1.pth"
    result = run("init", ref, "-o", ckpt)
    assert result.exit_code == 0, result.stderr
    result = run("convert", ckpt, "--spec", ref, "--input-shape", "1,3,64,64", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["native_blocks"] == ["MobileOne"] and report["params_after"] < report["params_before"]
