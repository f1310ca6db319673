"""The graph pass on ordinary code (issue 16, items 3 and 6), with modules written here: shape
checks that raise (Hugging Face style), code that branches on shapes (refused), geometry computed
from parameter shapes, F.adaptive_avg_pool2d(x, x.shape[-1]), parametrizations evaluated once,
tensor constants, subtraction / negation / division / alpha, padding='same', a dilated branch
folded into a larger kernel, and `.item()` (never folded, so skeleton and model agree).

Equivalence: float32 deploy model against the float64 training model, relative error below 1e-5
(float32 floor ~1e-7; a wrong fold is O(1)); every case also builds the same skeleton on meta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from reparam_cli.core.tensors import count_parameters
from reparam_cli.convert.engine import reparameterize

from .helpers import randomized


def check(build, shape, rtol=1e-5, skeleton=True):
    model = randomized(build()).float().eval()
    deploy, report = reparameterize(model)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.double()(x.double())
        model.float()
        out = deploy(x).double()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < rtol, f"relative error {err:.3g}"
    if skeleton:
        with torch.device("meta"):
            meta, _ = reparameterize(build().eval())
        assert [(k, tuple(v.shape)) for k, v in meta.state_dict().items()] == \
            [(k, tuple(v.shape)) for k, v in deploy.state_dict().items()]
    assert count_parameters(deploy) <= count_parameters(model)
    return model, deploy, report


def batchnorms(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Embeddings(nn.Module):
    """Hugging Face's pattern: a shape check that raises, then conv -> BN -> activation."""

    def __init__(self):
        super().__init__()
        self.num_channels = 3
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, pixel_values):
        num_channels = pixel_values.shape[1]
        if num_channels != self.num_channels:
            raise ValueError("Make sure that the channel dimension of the pixel values match with the one set in "
                             "the configuration.")
        assert pixel_values.dim() == 4, "expected images"
        return self.act(self.bn(self.conv(pixel_values)))


class ShapeBranch(nn.Module):
    """Two paths that both run, chosen by the input's width: no single graph, refused."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        if x.shape[-1] > 4:
            return self.bn(self.conv(x))
        return self.conv(x)


class ShapesFromParameters(nn.Module):
    """Padding read from the weight's shape, a pooling size read from the input's shape."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(F.conv2d(x, self.weight, padding=self.weight.shape[-1] // 2))
        return F.adaptive_avg_pool2d(torch.relu(y), x.shape[-1] // 2)


def test_a_shape_check_that_raises_does_not_stop_the_pass():
    _, deploy, report = check(Embeddings, (2, 3, 8, 8))
    assert [r.text for r in report.regions] == ["<root>: conv3x3+bn -> conv3x3"] and report.complete
    assert batchnorms(deploy) == []
    try:  # the check is still there, as an assertion
        deploy(torch.randn(1, 4, 8, 8))
    except AssertionError as exc:
        assert "the input's shape takes a path the traced code does not" in str(exc)
    else:
        raise AssertionError("the shape check was lost")


def test_code_that_branches_on_shapes_is_refused_with_a_reason():
    _, deploy, report = check(ShapeBranch, (1, 3, 8, 8))
    assert batchnorms(deploy) == ["bn"]
    assert any("more than one path" in r.reason for r in report.remaining if r.kind == "untraceable")


def test_geometry_from_parameter_shapes_and_pool_size_from_the_input():
    _, deploy, report = check(ShapesFromParameters, (1, 8, 8, 8))
    assert [r.before for r in report.regions] == ["conv3x3+bn"] and batchnorms(deploy) == []
    assert "weight" not in dict(deploy.named_parameters())  # the functional weight is in the fused conv


class Parametrized(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1, bias=False))
        self.bn = nn.BatchNorm2d(4)
        self.fc = parametrizations.weight_norm(nn.Linear(4, 4))
        self.fc_bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))  # (N, C): BatchNorm1d acts on the Linear's dim
        return self.fc_bn(self.fc(y))


def test_parametrized_weights_are_evaluated_once():
    model, deploy, report = check(Parametrized, (2, 4, 6, 6))
    assert [r.before for r in report.regions] == ["conv3x3+bn", "linear+bn"] and report.complete
    assert not any("parametrizations" in k for k in deploy.state_dict())
    assert count_parameters(deploy) < count_parameters(model)
    orthogonal = nn.Sequential(nn.Flatten(), parametrizations.orthogonal(nn.Linear(4, 4)), nn.BatchNorm1d(4))
    model = randomized(orthogonal).eval()  # (orthogonal cannot be built on meta: torch's own limit)
    deploy, report = reparameterize(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert ((deploy(x) - model(x)).abs().max() / model(x).abs().max()).item() < 1e-5
    assert report.complete


class Arithmetic(nn.Module):
    """Constants as tensors (fx's _tensor_constant0), subtraction, negation, division, alpha, and a
    functional conv with padding='same'."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3) * 0.3)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = (self.bn(self.conv(x)) - torch.tensor([0.5, 1.0, 1.5, 2.0]).reshape(1, 4, 1, 1)) / 2.0
        y = torch.add(-y, self.bn2(F.conv2d(x, self.w, padding="same")), alpha=0.5)
        return torch.relu(y)


def test_constants_subtraction_negation_division_alpha_and_same_padding():
    _, deploy, report = check(Arithmetic, (1, 4, 7, 7))
    assert [r.text for r in report.regions] == ["<root>: conv3x3+bn+shift+scale+scale, 0.5*conv3x3+bn -> conv3x3"]
    assert report.complete and batchnorms(deploy) == []
    assert list(deploy.state_dict()) == ["conv.weight", "conv.bias"]  # constants and `w` are in the one conv


class DilatedBranch(nn.Module):
    """UniRepLKNet's dilated re-parameterization: a 7x7 conv + a 3x3 conv with dilation 3, both with
    BN, summed: the dilated kernel is a 7x7 with zeros between its taps."""

    def __init__(self):
        super().__init__()
        self.large, self.large_bn = nn.Conv2d(4, 4, 7, padding=3, groups=4, bias=False), nn.BatchNorm2d(4)
        self.dil, self.dil_bn = nn.Conv2d(4, 4, 3, padding=3, dilation=3, groups=4, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.large_bn(self.large(x)) + self.dil_bn(self.dil(x)))


def test_a_dilated_branch_folds_into_the_larger_kernel():
    _, deploy, report = check(DilatedBranch, (1, 4, 12, 12))
    assert [r.after for r in report.regions] == ["conv7x7/g4"] and batchnorms(deploy) == []
    convs = [m for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].dilation == (1, 1)


def test_hook_based_weight_norm_and_spectral_norm_fold_the_current_weight():
    """torch.nn.utils.weight_norm / spectral_norm recompute `.weight` in a forward pre-hook: after
    a change of weight_g the stored `.weight` is stale until the next forward. The fold uses the
    weight the next forward would use."""
    import warnings

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nn.Sequential(nn.utils.weight_norm(nn.Conv2d(4, 4, 3, padding=1)), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.utils.spectral_norm(nn.Conv2d(4, 4, 1)), nn.BatchNorm2d(4))

    model = randomized(build()).eval()
    with torch.no_grad():
        model[0].weight_g.mul_(3.0)  # `.weight` is now stale
    deploy, report = reparameterize(model)
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)  # (its pre-hook recomputes the weight)
        assert ((deploy(x) - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert len(report.regions) == 2 and list(deploy.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    with torch.device("meta"):
        skeleton, _ = reparameterize(build().eval())
    assert list(skeleton.state_dict()) == list(deploy.state_dict())


class GroupsFromChannels(nn.Module):
    """groups read from the channel count of a conv's output (`x.shape[1]`, `x.size(-3)`): known from
    the layer before, so it folds without any recorded input."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 4, 1)
        self.w1, self.w2 = nn.Parameter(torch.randn(4, 1, 3, 3)), nn.Parameter(torch.randn(4, 1, 3, 3))
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.pw(x)
        a = self.bn1(F.conv2d(z, self.w1, padding=1, groups=z.shape[1]))
        return self.bn2(F.conv2d(torch.relu(a), self.w2, padding=1, groups=a.size(-3)))


class SizeFromSpatial(nn.Module):
    """Padding read from the input's width: a size that changes with the input, never folded in."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 4, 1, bias=False)
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.pw(x)
        return self.bn(F.conv2d(y, self.w, padding=y.shape[-1] // 8))


def test_channel_counts_read_from_tensors_fold_and_spatial_sizes_never():
    _, deploy, report = check(GroupsFromChannels, (2, 3, 6, 6))
    assert "conv3x3/g4+bn -> conv3x3/g4" in [f"{r.before} -> {r.after}" for r in report.regions]
    assert batchnorms(deploy) == [] and report.inputs == []  # (no recorded input needed)
    model, deploy, report = check(SizeFromSpatial, (1, 3, 16, 16))
    assert batchnorms(deploy) == ["bn"]
    x = torch.randn(1, 3, 24, 24)  # another width: another padding, as in the training model
    with torch.no_grad():
        assert ((deploy(x) - model(x)).abs().max() / model(x).abs().max()).item() < 1e-5


def test_a_forward_with_optional_arguments_is_never_traced_as_if_they_were_passed():
    """`forward(x, shortcut=None)` with `if shortcut is None: shortcut = x` (timm's DLA): fx would make
    `shortcut` a placeholder and drop the None branch, so a call without it crashed (or computed
    something else). Such a module is not traced at its own level; its pair folds on a recorded pass."""
    from reparam_cli.convert.engine import reparameterize

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x, shortcut=None):
            if shortcut is None:
                shortcut = x
            return torch.relu(self.bn(self.conv(x)) + shortcut)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Block(), Block()

        def forward(self, x):
            return self.b(self.a(x), x)

    model = randomized(Net()).eval()
    x = torch.randn(1, 4, 8, 8)
    deploy, report = reparameterize(model)
    assert {r.path for r in report.remaining if r.kind == "untraceable"} == {"a", "b"}
    assert "shortcut (default None)" in next(r.reason for r in report.remaining if r.path == "a")
    deploy, report = reparameterize(model, example_inputs=x)  # the pairs fold on the recorded pass
    assert not [r for r in report.remaining if r.kind == "batchnorm"] and len(report.recorded) == 2
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-5, atol=1e-6)
        assert torch.isfinite(deploy.a(x)).all()  # called without the optional argument too
        torch.testing.assert_close(deploy.a(x), model.a(x), rtol=1e-5, atol=1e-6)


def test_containers_indexed_in_forward_stay_containers_in_the_deploy_model():
    """`self.transition[0](x)` (timm's HRNet): the fused model keeps `transition` a ModuleList whose
    Sequential runs its surviving layers, so per-block checks and user code that index it still work."""
    from reparam_cli.convert.engine import reparameterize

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.transition = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                                           nn.BatchNorm2d(8), nn.ReLU())])
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.transition[0](x) * 2)

    model = randomized(Net()).eval()
    deploy, report = reparameterize(model)
    assert isinstance(deploy.transition, nn.ModuleList) and not report.remaining
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(deploy.transition[0](x), model.transition[0](x), rtol=1e-5, atol=1e-6)


def test_a_forward_chosen_in_init_runs_the_deploy_models_own_layers():
    """`self.forward = self.forward_split_cat` in __init__ (timm's FasterNet): the deploy model's copy
    of the module calls its own layers, not the training model's (which were then "never called"
    and dropped, and the rebuilt file did not match)."""
    from reparam_cli.convert.engine import reparameterize

    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
            self.forward = self.forward_split_cat

        def forward_split_cat(self, x):
            a, b = torch.split(x, [2, 2], dim=1)
            return torch.cat((self.conv(a), b), 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = Partial()
            self.conv, self.bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(self.mix(x)))) + x

    model = randomized(Net()).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        want = model(x)
        deploy, _ = reparameterize(model)
        for m in deploy.modules():
            assert not any(getattr(v, "__self__", None) in set(model.modules()) for v in vars(m).values())
        model.mix.conv = nn.Identity()  # the training model's layers are not what the deploy model runs
        torch.testing.assert_close(deploy(x), want, rtol=1e-5, atol=1e-6)
