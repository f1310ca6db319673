"""The common layers of every library (issue 16, items 2, 4, 5; issue 21, item 1), with modules
written here: a BatchNorm with its activation inside (timm's BatchNormAct2d), FrozenBatchNorm2d,
SyncBatchNorm, BatchNorm without running statistics; lone BatchNorms kept (no gain); merges that
would cost more split into their conv+BN folds; a model with nothing to fold converts (exit 0);
DenseNet-121 never grows.

Equivalence: float32 deploy model against the float64 training model, relative error below 1e-5
(float32 floor ~1e-7; a wrong fold is O(1)).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reparam_cli.core.tensors import count_parameters
from reparam_cli.convert.engine import reparameterize
from reparam_cli.convert.graph import bn_kind

from .helpers import assert_equivalent as check, randomized, run_cli


def norms(model):
    return [n for n, m in model.named_modules() if bn_kind(m) is not None]


def same_skeleton(build, deploy):
    with torch.device("meta"):
        skeleton, _ = reparameterize(build().eval())
    assert [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in deploy.state_dict().items()]


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, written again: a BatchNorm subclass whose forward checks the rank,
    calls F.batch_norm, then dropout and an activation."""

    def __init__(self, c, drop=0.0):
        super().__init__(c)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class FrozenBatchNorm2d(nn.Module):
    """A detection backbone's frozen BN (torchvision / detectron2 style): fixed buffers."""

    def __init__(self, c):
        super().__init__()
        for name, value in (("weight", torch.rand(c) + 0.5), ("bias", torch.randn(c)),
                            ("running_mean", torch.randn(c)), ("running_var", torch.rand(c) + 0.5)):
            self.register_buffer(name, value)
        self.eps = 1e-5

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class Layers(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, c, 3, padding=1, bias=False), BatchNormAct(c, drop=0.1)
        self.c2, self.n2 = nn.Conv2d(c, c, 1, bias=False), FrozenBatchNorm2d(c)
        self.c3, self.n3 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.SyncBatchNorm(c)
        self.c4, self.n4 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c, track_running_stats=False)

    def forward(self, x):
        x = self.n1(self.c1(x))
        x = F.relu(self.n2(self.c2(x)))
        x = F.relu(self.n3(self.c3(x)))
        return self.n4(self.c4(x))


def test_batchnorm_with_activation_frozen_and_sync_fold_and_batch_statistics_never():
    deploy, report = check(randomized(Layers()), (2, 3, 8, 8))
    same_skeleton(Layers, deploy)
    assert [r.before for r in report.regions] == ["conv3x3+bn", "conv1x1+bn", "conv3x3/g6+bn"]
    # The activation and the module holding it stay; its BatchNorm and dropout are gone.
    assert isinstance(deploy.get_submodule("n1.act"), nn.SiLU) and norms(deploy) == ["n4"]
    # BatchNorm with batch statistics in eval mode is no fixed map: left, with that reason.
    left = [r for r in report.remaining if r.kind == "batchnorm"]
    assert [r.path for r in left] == ["n4"] and "track_running_stats=False" in left[0].reason
    assert not report.complete
    # ... listed once (as the BatchNorm it is), not also as a refusal
    assert [r.path for r in report.remaining].count("n4") == 1


def test_real_timm_batchnormact_and_torchvision_frozen_batchnorm():
    timm = pytest.importorskip("timm")
    torchvision = pytest.importorskip("torchvision")
    from timm.layers import BatchNormAct2d

    def build():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                             BatchNormAct2d(8, act_layer=nn.ReLU, drop_layer=nn.Dropout),
                             nn.Conv2d(8, 8, 1, bias=False), torchvision.ops.misc.FrozenBatchNorm2d(8), nn.ReLU())

    model = randomized(build())
    with torch.no_grad():
        frozen = model[3]
        frozen.running_var.uniform_(0.5, 2.0), frozen.running_mean.normal_(), frozen.weight.normal_()
        frozen.bias.normal_()
    deploy, report = check(model, (2, 3, 8, 8))
    assert norms(deploy) == [] and report.complete and len(report.regions) == 2
    same_skeleton(build, deploy)
    assert timm is not None


def test_a_lone_batchnorm_stays_and_is_information_not_left():
    """A BatchNorm between two non-linear ops (DenseNet, RepNeXt's shortcut BN) would become a 1x1
    depthwise conv with the same parameters and multiply-adds: nothing gained, so it stays."""

    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU())

    deploy, report = check(randomized(build()), (1, 3, 6, 6))
    assert norms(deploy) == ["2"] and report.regions == []
    assert report.complete and [r.path for r in report.kept] == ["2"]
    assert "nothing to gain" in report.kept[0].reason


class Inception(nn.Module):
    """Four conv+BN branches concatenated: the merged 5x5 would cost more than the branches, so
    the concatenation is not merged, and each conv+BN folds on its own."""

    def __init__(self, c=4):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c))
                                      for k in (1, 3, 5, 1))

    def forward(self, x):
        return F.relu(torch.cat([b(x) for b in self.branches], 1))


def test_a_merge_that_would_cost_more_is_split_into_its_conv_bn_folds():
    model = randomized(Inception())
    deploy, report = check(model, (1, 4, 9, 9))
    assert sorted(r.before for r in report.regions) == ["conv1x1+bn", "conv1x1+bn", "conv3x3+bn", "conv5x5+bn"]
    assert norms(deploy) == [] and count_parameters(deploy) <= count_parameters(model)


class PoolBranch(nn.Module):
    """torchvision Inception's pool branch: avg-pool 3x3 -> conv1x1 -> BN -> ReLU (and AuxLogits'
    avg-pool 5x5/s3 -> conv1x1 -> BN). The pool and conv as one 3x3 conv would cost more: the chain
    ends before the conv, which folds with its BatchNorm (what torch.fx's fuser does)."""

    def __init__(self, c=4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.aux_conv, self.aux_bn = nn.Conv2d(c, 6, 1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        pooled = F.relu(self.bn(self.conv(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))))
        aux = self.aux_bn(self.aux_conv(F.avg_pool2d(x, kernel_size=5, stride=3)))
        return pooled.mean((2, 3)) + aux.mean((2, 3))


def test_a_pool_before_a_conv_bn_keeps_the_pool_and_folds_the_conv_bn():
    model = randomized(PoolBranch())
    deploy, report = check(model, (1, 4, 11, 11))
    same_skeleton(PoolBranch, deploy)
    assert sorted(r.before for r in report.regions) == ["conv1x1+bn", "conv1x1+bn"] and norms(deploy) == []
    assert report.complete and count_parameters(deploy) <= count_parameters(model)
    assert [r.path for r in report.kept] == ["conv", "aux_conv"] and "FLOP rule" in report.kept[0].reason
    # each left or kept module is listed once
    paths = [r.path for r in report.remaining + report.kept]
    assert len(paths) == len(set(paths))


def test_densenet121_never_grows_and_folds_every_conv_bn_pair():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=10).eval()
    with torch.no_grad():  # mild random statistics (121 layers of large ones overflow)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
    deploy, report = reparameterize(model)
    assert count_parameters(deploy) <= count_parameters(model)
    # torch.fx's fuser folds the 59 conv->BN pairs (58 bottlenecks and the stem); the 62 BNs that
    # follow a concatenation or precede a ReLU are lone: kept, not left. Each transition's conv1x1 -> avg-pool 2x2
    # would be a 2x2/s2 conv with 4x the parameters: kept apart (information, not left).
    assert len(report.regions) == 59 and len(norms(deploy)) == 62
    kept = [r.path for r in report.kept]
    assert len(kept) == 65 and sum(p.endswith(".pool") for p in kept) == 3  # + transitions: conv1x1+pool2x2 grows
    assert not [r for r in report.remaining if r.kind == "batchnorm"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


NOTHING_SPEC = """
from torch import nn


def build_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
"""


def test_nothing_to_fold_converts_with_exit_0(tmp_path):
    spec = tmp_path / "plain.py"
    spec.write_text(NOTHING_SPEC)
    ckpt, out = tmp_path / "plain.pth", tmp_path / "plain.safetensors"
    assert run_cli("init", spec, "-o", ckpt).exit_code == 0
    result = run_cli("convert", ckpt, "--spec", spec, "-o", out, "--input-shape", "1,3,8,8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert out.exists() and report["ok"] and report["completeness"] == "complete"
    assert any(n.startswith("nothing to fold: 6 modules looked at") for n in report["notes"])
    assert report["params_after"] == report["params_before"] and report["max_rel_err"] < 1e-6
    # --strict passes too: nothing foldable is left.
    strict = tmp_path / "strict.safetensors"
    assert run_cli("convert", ckpt, "--spec", spec, "-o", strict, "--input-shape", "1,3,8,8", "--strict").exit_code == 0
