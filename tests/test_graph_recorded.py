"""Conv+BN pairs inside modules fx cannot trace, folded on a recorded forward pass (issue 16, item 3),
and `groups=x.shape[1]` from the recorded channel count, with modules written here in Hugging Face's
patterns: padding from `int()` of shape arithmetic
(MobileNetV2's apply_tf_padding), a `print`, a data-dependent `if` on values, a linear layer with
a BatchNorm1d on `flatten(0, 1)` of its (N, L, C) output then `reshape_as` (LeViT). Refused with
a reason: an output read elsewhere too (also without an aten op: `tolist()`), an in-place change
before the BatchNorm, a layer called twice, a BatchNorm on the wrong axis, a data-dependent `if` in
the module that runs both layers (the data-dependent `if` of HF_STYLE's InvertedResidual is in a
parent of the modules that hold the pairs: those fold).

Equivalence: float32 deploy model against the float64 training model, relative error below 1e-5
(float32 floor ~1e-7; a wrong fold is O(1)). Through the CLI, verified and with --no-verify, and
loaded back with load_deploy (the skeleton replays the stored folds on meta).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from reparam_cli.convert.engine import reparameterize
from reparam_cli.convert.graph import fold_recorded
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.pipeline.options import FuseOptions

from .helpers import randomized, run_cli

HF_STYLE = '''
import torch
import torch.nn.functional as F
from torch import nn


def apply_tf_padding(features, conv):
    """TensorFlow 'SAME' padding, as Hugging Face's MobileNetV2 computes it: int() of shape arithmetic."""
    in_height, in_width = int(features.shape[-2]), int(features.shape[-1])
    stride_height, stride_width = conv.stride
    kernel_height, kernel_width = conv.kernel_size
    pad_along_height = max(kernel_height - (stride_height if in_height % stride_height == 0
                                            else in_height % stride_height), 0)
    pad_along_width = max(kernel_width - (stride_width if in_width % stride_width == 0
                                          else in_width % stride_width), 0)
    pad_left = pad_along_width // 2
    pad_top = pad_along_height // 2
    padding = (pad_left, pad_along_width - pad_left, pad_top, pad_along_height - pad_top)
    return F.pad(features, padding, "constant", 0.0)


class ConvLayer(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, act=True):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, k, stride, groups=groups, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU6() if act else None

    def forward(self, features):
        features = apply_tf_padding(features, self.convolution)
        features = self.normalization(self.convolution(features))
        if self.activation is not None:
            features = self.activation(features)
        return features


class InvertedResidual(nn.Module):
    def __init__(self, c, expand):
        super().__init__()
        self.expand_1x1 = ConvLayer(c, c * expand, 1)
        self.conv_3x3 = ConvLayer(c * expand, c * expand, 3, groups=c * expand)
        self.reduce_1x1 = ConvLayer(c * expand, c, 1, act=False)

    def forward(self, features):
        if torch.isnan(features).any():  # a data-dependent `if` on values
            raise ValueError("NaN in the features")
        residual = features
        features = self.reduce_1x1(self.conv_3x3(self.expand_1x1(features)))
        return residual + features


class TokenMlp(nn.Module):
    """LeViT's MLPLayerWithBN on tokens (N, L, C), and a print."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.batch_norm = nn.BatchNorm1d(cout)

    def forward(self, hidden_state):
        hidden_state = self.linear(hidden_state)
        hidden_state = self.batch_norm(hidden_state.flatten(0, 1)).reshape_as(hidden_state)
        print("tokens:", int(hidden_state.shape[1] ** 0.5), "per side")
        return hidden_state


class FunctionalDepthwise(nn.Module):
    """groups read from the input's channel count (traceable: fx keeps it a proxy until the pass
    reads the recorded channel count)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, 1, 3, 3))
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight, padding=1, groups=x.shape[1]))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvLayer(3, 8, 3, stride=2)
        self.mix = FunctionalDepthwise(8)
        self.block = InvertedResidual(8, 2)
        self.tokens = TokenMlp(8, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, pixel_values):
        features = self.block(self.mix(self.stem(pixel_values)))
        tokens = features.flatten(2).transpose(1, 2)
        return self.head(self.tokens(tokens).mean(1))


def build_model():
    return Net()
'''


def hf_style(tmp_path):
    spec = tmp_path / "hf_style.py"
    spec.write_text(HF_STYLE)
    namespace: dict = {}
    exec(compile(HF_STYLE, str(spec), "exec"), namespace)
    return spec, namespace["build_model"]


def batchnorms(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def rel_err(deploy, model, x):
    with torch.no_grad():
        ref = model.double()(x.double())
        model.float()
        out = deploy(x).double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_untraceable_hugging_face_style_modules_fold_their_batchnorms(tmp_path, capsys):
    _, build = hf_style(tmp_path)
    model = randomized(build()).float()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plain, plain_report = reparameterize(model)
    # fx cannot trace int() of a proxy; groups=x.shape[1] of an input whose channels are unknown
    assert len(batchnorms(plain)) == 6
    assert any("example_inputs=" in r.reason for r in plain_report.remaining if r.path == "stem.normalization")
    deploy, report = reparameterize(model, example_inputs=x)
    assert batchnorms(deploy) == [] and report.complete, report.summary()
    assert report.inputs == [("mix", 4, 8)]  # the recorded channel count the depthwise fold used
    assert sorted(report.recorded) == sorted([
        ("stem.convolution", "stem.normalization"),
        ("block.expand_1x1.convolution", "block.expand_1x1.normalization"),
        ("block.conv_3x3.convolution", "block.conv_3x3.normalization"),
        ("block.reduce_1x1.convolution", "block.reduce_1x1.normalization"),
        ("tokens.linear", "tokens.batch_norm")])
    # each region is verified at the module that runs both layers
    assert {r.path for r in report.regions} == {"stem", "mix", "block.expand_1x1", "block.conv_3x3",
                                                "block.reduce_1x1", "tokens"}
    assert rel_err(deploy, model, torch.randn(2, 3, 12, 20)) < 1e-5  # another input shape too
    assert set(deploy.state_dict()) == {"stem.convolution.weight", "stem.convolution.bias", "mix.bn.weight",
                                        "mix.bn.bias",
                                        *(f"block.{n}.convolution.{t}" for n in ("expand_1x1", "conv_3x3",
                                                                                 "reduce_1x1")
                                          for t in ("weight", "bias")),
                                        "tokens.linear.weight", "tokens.linear.bias", "head.weight", "head.bias"}
    # the training model is untouched
    assert len(batchnorms(model)) == 6 and model.stem.convolution.bias is None
    # the shape-only skeleton replays the stored pairs and channel counts: the same keys and shapes
    stored = FuseOptions.from_stored(FuseOptions(recorded=tuple(report.recorded), inputs=tuple(report.inputs)).stored())
    with torch.device("meta"):
        meta, _ = reparameterize(build().eval(), **stored.kwargs())
    assert [(k, tuple(v.shape)) for k, v in meta.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in deploy.state_dict().items()]
    assert "tokens:" in capsys.readouterr().out  # the module's own print ran (it is not traced)


class ReadTwice(nn.Module):
    """conv output read by the BatchNorm and by the residual: nothing to fold."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        print(int(y.shape[-1] / 2))  # untraceable
        return self.bn(y) + y


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        y.relu_()
        return self.bn(y[:, :, : int(y.shape[-1] / 1)])


class ReadAsList(nn.Module):
    """conv output read without an aten op (`tolist()`, to decide something): nothing to fold."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        scale = 2.0 if y.tolist()[0][0][0][0] > 1e9 else 1.0
        return self.bn(y) * scale


class ValueBranch(nn.Module):
    """A data-dependent `if` in the module that runs both layers: the other branch reads the conv's
    output without the BatchNorm, so one recorded pass proves nothing for every input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) if x.mean() > -1e9 else y


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        if int(x.shape[-1]) > 0:
            x = self.conv(x)
        return self.bn(self.conv(x))


class WrongAxis(nn.Module):
    """Linear over the last dim of (N, L, C), BatchNorm1d over dim 1 (L == C): never the same axis."""

    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)[:, : int(x.shape[1])]  # (N, 4, 4)
        return self.bn(self.linear(tokens))


def test_unproven_pairs_are_refused_with_their_reason():
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    for cls, reason in [(ReadTwice, "output is also read elsewhere"), (InPlace, "output is also read elsewhere"),
                        (ReadAsList, "output is also read elsewhere"), (ValueBranch, "reads tensor values"),
                        (CalledTwice, "runs more than once"), (WrongAxis, "normalises dim 1 of a (2, 4, 4) tensor")]:
        model = randomized(cls()).float()
        deploy, report = reparameterize(model, example_inputs=x)
        assert report.recorded == [] and batchnorms(deploy) == ["bn"], cls.__name__
        left = [r for r in report.remaining if r.path == "bn"]
        assert len(left) == 1 and reason in left[0].reason, (cls.__name__, left)
        assert rel_err(deploy, model, x) < 1e-5, cls.__name__


def test_a_model_that_fails_on_the_example_keeps_its_batchnorms_with_the_reason():
    model = randomized(ReadTwice()).float()
    folds = fold_recorded(model, example=torch.randn(1, 3, 6, 6))  # 3 channels: the conv raises
    assert folds.pairs == [] and "the recorded forward pass failed" in folds.reasons["bn"]


def test_cli_converts_verified_and_unverified_and_load_deploy_rebuilds(tmp_path):
    spec, build = hf_style(tmp_path)
    model = randomized(build()).float()
    ckpt = tmp_path / "hf.pth"
    torch.save(model.state_dict(), ckpt)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for flags, name in [((), "verified"), (("--no-verify",), "unverified")]:
        out = tmp_path / f"{name}.safetensors"
        result = run_cli("convert", ckpt, "--spec", spec, "-o", out, "--input-shape", "2,3,16,16", "--json", *flags)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["completeness"] == "complete", report
        if not flags:
            assert report["max_rel_err"] < 1e-5
        deploy = load_deploy(out, spec=str(spec))
        assert batchnorms(deploy) == []
        assert rel_err(deploy, model, x) < 1e-5, name


def test_the_float64_check_of_a_fold_uses_the_captured_input_shape(tmp_path, monkeypatch):
    """Where a forward pass was recorded (here for the channel count of `mix`'s input), the check of
    the fold at that module's input runs on that input's shape (cut to a few windows)."""
    import reparam_cli.convert.graph as graph

    _, build = hf_style(tmp_path)
    seen = []
    original = graph._check_region

    def spy(*args, **kwargs):
        seen.append(args[6:] + tuple(kwargs.values()))
        return original(*args, **kwargs)

    monkeypatch.setattr(graph, "_check_region", spy)
    model = randomized(build()).float()
    reparameterize(model, example_inputs=torch.randn(2, 3, 16, 16))
    assert (None, (2, 8, 8, 8)) in seen  # mix's input, captured (no other region starts at a module input)
