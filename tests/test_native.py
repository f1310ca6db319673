"""Third-party blocks that fuse themselves: fuse() / reparameterize() / switch_to_deploy(), which
modules get it called, no mutation of the input, float64 fusion, meta skeletons, per-block errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reparam_cli.blocks.repvgg import RepVGGBlock
from reparam_cli.convert.engine import reparameterize
from reparam_cli.errors import ReparamError
from reparam_cli.blocks.registry import native_method
from reparam_cli.verification.equivalence import verify

from .helpers import randomized


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    return conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std


class PaperRepBlock(nn.Module):
    """Like the papers' repositories: 3x3 conv-BN + 1x1 conv-BN; `reparameterize()` fuses in place
    (creates `reparam`, deletes the branches, returns None)."""

    def __init__(self, c: int):
        super().__init__()
        self.c3, self.b3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c1, self.b1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.reparam = None

    def forward(self, x):
        if self.reparam is not None:
            return F.relu(self.reparam(x))
        return F.relu(self.b3(self.c3(x)) + self.b1(self.c1(x)))

    def reparameterize(self):
        w3, b3 = _conv_bn(self.c3, self.b3)
        w1, b1 = _conv_bn(self.c1, self.b1)
        conv = nn.Conv2d(self.c3.in_channels, self.c3.out_channels, 3, padding=1)
        conv.weight.data = w3 + F.pad(w1, [1, 1, 1, 1])
        conv.bias.data = b3 + b1
        self.reparam = conv
        for name in ("c3", "b3", "c1", "b1"):
            delattr(self, name)


class ConvNorm(nn.Sequential):
    """timm-style conv + BN whose `fuse()` returns a new Conv2d."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, padding=k // 2, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    def fuse(self):
        w, b = _conv_bn(self.c, self.bn)
        m = nn.Conv2d(self.c.in_channels, self.c.out_channels, self.c.kernel_size, padding=self.c.padding,
                      device=w.device)
        m.weight.data.copy_(w)
        m.bias.data.copy_(b)
        return m


class DwPair(nn.Module):
    """Like timm's RepVggDw: its fuse() calls fuse() on its own ConvNorm children, so it must be
    called on the outer module with the children untouched."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.conv1 = ConvNorm(c, c, 3), ConvNorm(c, c, 1)

    def forward(self, x):
        return self.conv(x) + self.conv1(x) + x

    def fuse(self):
        a, b = self.conv.fuse(), self.conv1.fuse()
        m = nn.Conv2d(a.in_channels, a.out_channels, 3, padding=1)
        ident = torch.zeros_like(a.weight)
        ident[torch.arange(a.out_channels), torch.arange(a.out_channels), 1, 1] = 1
        m.weight.data = a.weight + F.pad(b.weight, [1, 1, 1, 1]) + ident
        m.bias.data = a.bias + b.bias
        return m


class SwitchBlock(nn.Module):
    """DingXiaoH / mmpretrain style: `switch_to_deploy()` in place, and a child attribute called
    `fuse` that is a module, not a method."""

    def __init__(self, c: int):
        super().__init__()
        self.branch = ConvNorm(c, c, 3)
        self.fuse = nn.Identity()  # not a method: must not be called
        self.deploy = False

    def forward(self, x):
        return self.fuse(self.branch(x))

    def switch_to_deploy(self):
        self.branch = self.branch.fuse()
        self.deploy = True


class Net(nn.Module):
    """A model with its own whole-model fuse() (like timm's RepVit): the root is walked instead."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a = PaperRepBlock(c)
        self.b = DwPair(c)
        self.c = SwitchBlock(c)
        self.d = RepVGGBlock(c, c)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))

    def forward(self, x):
        return self.head(self.d(self.c(self.b(self.a(self.stem(x))))))

    def fuse(self):  # pragma: no cover - must not be called while blocks inside convert
        raise AssertionError("the model-level fuse() was called")


def test_native_methods_convert_each_block_and_match():
    model = randomized(Net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy, report = reparameterize(model)
    assert {(b.path, b.block_type, b.family) for b in report.converted} == {
        ("a", "PaperRepBlock", "native"), ("b", "DwPair", "native"), ("c", "SwitchBlock", "native"),
        ("d", "RepVGGBlock", "repvgg")}
    assert report.blocks == {"DwPair": 1, "PaperRepBlock": 1, "RepVGGBlock": 1, "SwitchBlock": 1}
    assert isinstance(deploy.b, nn.Conv2d) and deploy.a.reparam is not None and deploy.c.deploy
    # The input model is untouched: same modules, same tensors.
    assert model.a.reparam is None and hasattr(model.a, "c3") and not model.c.deploy
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        out = deploy(x).double()
        ref = model.double()(x.double())
        assert (out - ref).abs().max() / ref.abs().max() < 1e-5  # float32 rounding only
        out64 = reparameterize(model)[0](x.double())  # the float64 model fuses exactly
        assert (out64 - ref).abs().max() / ref.abs().max() < 1e-12


def test_native_fusion_runs_in_float64_and_casts_back_once():
    block = randomized(PaperRepBlock(6)).half()
    deploy, _ = reparameterize(nn.Sequential(block))
    assert deploy[0].reparam.weight.dtype == torch.float16
    exact = randomized(PaperRepBlock(6)).half().double()  # the same half weights, in float64
    exact.reparameterize()
    assert torch.equal(deploy[0].reparam.weight, exact.reparam.weight.half())
    assert torch.equal(deploy[0].reparam.bias, exact.reparam.bias.half())


def test_recipes_take_precedence_and_outer_native_blocks_keep_their_children():
    class Wrapper(nn.Module):  # has a native method but contains a block with a recipe: descend
        def __init__(self):
            super().__init__()
            self.inner = RepVGGBlock(4, 4)
            self.pair = DwPair(4)

        def forward(self, x):
            return self.pair(self.inner(x))

        def reparameterize(self):  # pragma: no cover
            raise AssertionError("called despite a recipe inside")

    deploy, report = reparameterize(nn.Sequential(randomized(Wrapper())))
    assert [(b.path, b.family) for b in report.converted] == [("0.inner", "repvgg"), ("0.pair", "native")]
    # DwPair's children (ConvNorm, with fuse()) were not fused on their own.
    assert "0.pair.conv" not in report.paths


def test_root_native_method_used_only_when_nothing_inside_converts():
    deploy, report = reparameterize(randomized(ConvNorm(3, 5, 3)))
    assert report.paths == [""] and report.converted[0].family == "native"
    assert isinstance(deploy, nn.Conv2d)
    _, report = reparameterize(randomized(ConvNorm(3, 5, 3)), native=False)
    assert report.converted == []


def test_meta_device_builds_a_skeleton_with_the_same_keys():
    with torch.device("meta"):
        meta_model = Net()
    skeleton, report = reparameterize(meta_model)
    assert len(report.converted) == 4
    assert all(t.is_meta for t in skeleton.state_dict().values())
    real, _ = reparameterize(randomized(Net()))
    assert {k: tuple(v.shape) for k, v in skeleton.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in real.state_dict().items()}


def test_per_block_errors_point_at_a_broken_native_block():
    class Broken(PaperRepBlock):
        def reparameterize(self):
            super().reparameterize()
            self.reparam.bias.data += 0.5  # a wrong bias

    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), PaperRepBlock(4), Broken(4)))
    deploy, report = reparameterize(model)
    result = verify(model, deploy, (1, 3, 8, 8), blocks=[(b.path, b.block_type) for b in report.converted])
    assert not result.ok
    assert {b.path: b.ok for b in result.blocks} == {"1": True, "2": False}


def test_native_method_detection_and_failures():
    assert native_method(ConvNorm(1, 1, 1)) == "fuse"
    assert native_method(PaperRepBlock(1)) == "reparameterize"
    assert native_method(SwitchBlock(1)) == "switch_to_deploy"  # `self.fuse` is a module, not a method
    assert native_method(nn.Conv2d(1, 1, 1)) is None

    class Raises(PaperRepBlock):
        def reparameterize(self):
            raise RuntimeError("kaboom")

    class ReturnsTensor(nn.Sequential):
        def fuse(self):
            return torch.zeros(1)

    with pytest.raises(ReparamError, match=r"block 1 \(Raises\): its own reparameterize\(\) failed: RuntimeError: kaboom"):
        reparameterize(nn.Sequential(nn.ReLU(), Raises(2)))
    with pytest.raises(ReparamError, match=r"fuse\(\) returned Tensor, not a module"):
        reparameterize(nn.Sequential(ReturnsTensor(nn.Conv2d(1, 1, 1))))


class Guarded(SwitchBlock):
    """mmpretrain style: `switch_to_deploy()` returns at once when already deployed."""

    def switch_to_deploy(self):
        if self.deploy:
            return
        super().switch_to_deploy()


class HalfDone(nn.Module):
    """Like timm's GhostBottleneck: its own method fuses one branch (`dw`) and leaves its child
    block (`ghost`, with a method of its own) alone; and like an mmpretrain backbone, `done` is a
    child its method already deployed (calling it again does nothing)."""

    def __init__(self, c: int):
        super().__init__()
        self.ghost, self.dw, self.done = PaperRepBlock(c), ConvNorm(c, c, 3), Guarded(c)

    def forward(self, x):
        return self.done(self.dw(self.ghost(x)))

    def switch_to_deploy(self):
        self.dw = self.dw.fuse()
        self.done.switch_to_deploy()


def test_native_results_are_searched_again_all_the_way_down():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 1), HalfDone(4)))
    deploy, report = reparameterize(model)
    # The child left alone is converted (and verified at its own path); the one the parent
    # already deployed is not reported a second time.
    assert [(b.path, b.block_type) for b in report.converted] == [("1", "HalfDone"), ("1.ghost", "PaperRepBlock")]
    assert deploy[1].ghost.reparam is not None and not hasattr(deploy[1].ghost, "c3")
    assert isinstance(deploy[1].dw, nn.Conv2d) and deploy[1].done.deploy
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    result = verify(model, deploy, (2, 3, 8, 8), blocks=[(b.path, b.block_type) for b in report.converted])
    assert result.ok and result.max_rel_err < 1e-5 and {b.path for b in result.blocks} == {"1", "1.ghost"}


class MMStyle(Guarded):
    """mmpretrain's RepVGGBlock: `reparameterize()` returns the fused (weight, bias) tensors and
    `switch_to_deploy()` swaps the branches; `train()` returns None like mmpretrain backbones."""

    def reparameterize(self):
        return self.branch.fuse().weight, None

    def train(self, mode: bool = True):
        super().train(mode)


def test_methods_returning_tensors_fall_through_and_train_may_return_none():
    model = randomized(nn.Sequential(MMStyle(3)))
    assert model[0].eval() is None  # nn.Module.eval() returns what train() returns
    deploy, report = reparameterize(model)
    assert report.blocks == {"MMStyle": 1} and deploy[0].deploy and isinstance(deploy[0].branch, nn.Conv2d)
    assert verify(model, deploy, (1, 3, 8, 8)).ok


class CachedBias(nn.Module):
    """Like timm's LeViT attention: a bias computed on the first eval call, cached by device."""

    def __init__(self, c: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(c, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if str(x.device) not in self.cache:
            self.cache[str(x.device)] = self.bias * 1.0  # in the dtype of this first call
        return x + self.cache[str(x.device)]


def test_deploy_model_shares_no_cache_with_the_training_model():
    model = randomized(nn.Sequential(PaperRepBlock(3), CachedBias(3)))
    deploy, _ = reparameterize(model)
    with torch.no_grad():
        model.double()(torch.randn(1, 3, 4, 4, dtype=torch.float64))  # fills the training model's cache in float64
        model.float()
        out = deploy(torch.randn(1, 3, 4, 4))  # its own cache: float32, not the float64 one
    assert out.dtype == torch.float32 and model[1].cache["cpu"].dtype == torch.float64
    assert deploy[1].cache["cpu"].dtype == torch.float32
