"""The graph fusion pass (`reparam_cli.graph`): networks built only from home-made blocks, a
torchvision ResNet-18 end to end through the CLI, a recipe block beside home-made ones,
`--no-graph`, `--strict`, exports, and a property test on random DAGs of linear operations.

Equivalence: the deploy model in float32 against the training model in float64, relative error
below 1e-5 (the float32 floor is ~1e-7; a wrong kernel or bias gives O(1)). The float64 property
test uses 1e-9.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from reparam_cli.convert.engine import reparameterize

from .helpers import assert_equivalent as check, randomized, run_cli


def conv_bn(cin, cout, k, padding=None, stride=1, groups=1, bias=False):
    k2 = (k, k) if isinstance(k, int) else k
    pad = tuple(s // 2 for s in k2) if padding is None else padding
    return nn.Sequential(nn.Conv2d(cin, cout, k2, stride, pad, groups=groups, bias=bias), nn.BatchNorm2d(cout))


class ACBLike(nn.Module):
    """3x3 + 3x1 + 1x3 + identity BN, summed (ACNet / RepVGG written by hand)."""

    def __init__(self, c):
        super().__init__()
        self.square, self.ver, self.hor = conv_bn(c, c, 3), conv_bn(c, c, (3, 1)), conv_bn(c, c, (1, 3))
        self.idbn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.square(x) + self.ver(x) + self.hor(x) + self.idbn(x))


class DBBLike(nn.Module):
    """1x1-BN -> 3x3-BN with the padding on the 1x1 (exact borders), beside a 3x3-BN branch."""

    def __init__(self, c):
        super().__init__()
        self.origin = conv_bn(c, c, 3)
        self.one = nn.Conv2d(c, c, 1, padding=1, bias=False)
        self.one_bn = nn.BatchNorm2d(c)
        self.kxk = conv_bn(c, c, 3, padding=0)

    def forward(self, x):
        return torch.relu(self.origin(x) + self.kxk(self.one_bn(self.one(x))))


class InexactSequence(nn.Module):
    """1x1-BN -> zero-padded 3x3-BN: the BN bias would leak into the border, so the two stay apart."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = conv_bn(c, c, 1), conv_bn(c, c, 3)

    def forward(self, x):
        return torch.relu(self.b(self.a(x)))


class AvgBranch(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = conv_bn(c, c, 3)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.pool_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.conv(x) + self.pool_bn(self.pool(x)))


class ConcatThen1x1(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = conv_bn(c, c, 3), conv_bn(c, c, 1)
        self.mix = conv_bn(2 * c, c, 1)

    def forward(self, x):
        return F.relu(self.mix(torch.cat([self.a(x), self.b(x)], 1)))


class RefConvLike(nn.Module):
    """A conv whose weight is W + R(W), R a conv over the weights (RefConv), then BN."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3) * 0.3)
        self.convmap = nn.Conv2d(c * c, c * c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        w = self.weight + self.convmap(self.weight.view(1, -1, 3, 3)).view(self.weight.shape)
        return F.relu(self.bn(F.conv2d(x, w, None, 1, 1)))


class LayerScaleBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = conv_bn(c, c, 3)
        self.gamma = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)

    def forward(self, x):
        return F.relu(x + self.gamma * self.body(x))


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: untraceable, but its child still folds."""

    def __init__(self, c):
        super().__init__()
        self.body = conv_bn(c, c, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return -self.body(x)


def home_made(c=4):
    return nn.Sequential(conv_bn(3, c, 3), nn.ReLU(), ACBLike(c), DBBLike(c), InexactSequence(c), AvgBranch(c),
                         ConcatThen1x1(c), RefConvLike(c), LayerScaleBlock(c), DataDependent(c))


def batchnorms(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def same_skeleton(build, deploy):
    """The pass on a meta-device build gives the same state-dict keys and shapes."""
    with torch.device("meta"):
        skeleton, _ = reparameterize(build())
    got = [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()]
    assert got == [(k, tuple(v.shape)) for k, v in deploy.state_dict().items()]


def test_home_made_blocks_fold_with_regions_and_a_report():
    model = randomized(home_made())
    deploy, report = check(model, (2, 3, 12, 12))
    same_skeleton(home_made, deploy)
    texts = [r.text for r in report.regions]
    assert "2: conv3x3+bn, conv3x1+bn, conv1x3+bn, bn(identity) -> conv3x3" in texts
    assert any(t.startswith("3: ") and "conv1x1+bn+conv3x3+bn" in t for t in texts)     # DBB-like, one conv
    assert any(t.startswith("5: ") and "avgpool3x3+bn" in t for t in texts)
    assert any(t.startswith("6: ") and "cat(" in t and t.endswith("-> conv3x3") for t in texts)
    assert any(t.startswith("7: ") and t.endswith("-> conv3x3") for t in texts)           # weight transform
    assert "8: identity, conv3x3+bn+scale -> conv3x3" in texts                           # LayerScale + shortcut
    assert "9.body: conv3x3+bn -> conv3x3" in texts                                      # inside the untraceable
    # Only the inexact border is left; every BatchNorm is folded. The untraceable module holds nothing
    # left to fold (its body was folded inside it): information, not left.
    assert batchnorms(deploy) == []
    # The root is traced with its untraceable child opaque, so only that child is listed.
    assert {(r.path, r.kind) for r in report.remaining} == {("4.b.0", "unfoldable")}
    assert [(r.path, r.kind) for r in report.skipped] == [("9", "untraceable")]
    inexact = [r for r in report.remaining if r.kind == "unfoldable"][0]
    assert inexact.reason.startswith("conv1x1+bn -> conv3x3: a bias before a zero-padded conv")
    assert not report.complete and report.summary().startswith("1 left")
    # Each region's module computes the same function on its own in both models (what verification does).
    assert {p for p, _ in report.verify_blocks} >= {"2", "3", "5", "6", "7", "8", "9.body"}
    # Fewer layers: one conv per block where exact.
    assert len(deploy[2].graph.find_nodes(op="call_module")) == 1


def test_untraceable_block_keeps_its_batchnorm_with_a_reason():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.mean() > -1e9 else x

    deploy, report = check(randomized(Opaque()), (1, 3, 8, 8))
    assert batchnorms(deploy) == ["bn"]
    left = {r.kind: r for r in report.remaining}
    assert left["untraceable"].path == "" and "control flow" in left["untraceable"].reason
    assert left["batchnorm"].reason.startswith("inside <root>, which cannot be traced")
    # with an input, one recorded forward pass is no proof either: the code branches on values
    deploy, report = reparameterize(randomized(Opaque()), example_inputs=torch.randn(1, 3, 8, 8))
    left = {r.kind: r for r in report.remaining}
    assert batchnorms(deploy) == ["bn"] and "reads tensor values" in left["batchnorm"].reason


def test_recipe_block_beside_home_made_blocks_and_no_graph():
    from reparam_cli.blocks.repvgg import RepVGGBlock

    def build():
        return nn.Sequential(conv_bn(3, 4, 3), nn.ReLU(), RepVGGBlock(4, 4), ACBLike(4), conv_bn(4, 4, 1))

    model = randomized(build())
    deploy, report = check(model, (2, 3, 10, 10))
    assert report.blocks == {"RepVGGBlock": 1} and batchnorms(deploy) == [] and report.complete
    assert "2" not in {r.path for r in report.regions}  # the recipe's product is never traced into
    assert type(deploy.get_submodule("2")).__name__ == "RepVGGDeployBlock"
    same_skeleton(build, deploy)
    plain, off = reparameterize(model, graph=False)
    assert off.regions == [] and len(batchnorms(plain)) == 6
    assert {r.kind for r in off.remaining} == {"batchnorm"} and "--no-graph" in off.remaining[0].reason


def test_linear_layers_and_a_residual_mlp_fold():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)
            self.ls = nn.Parameter(torch.rand(6) + 0.5)
            self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            x = x.flatten(1)  # (N, C): BatchNorm1d's dim 1 is the linear layers' last dim
            x = x + self.ls * self.bn(self.fc1(x))
            return self.fc3(torch.relu(self.fc2(x)))

    deploy, report = check(randomized(MLP()), (5, 6))
    assert [r.text for r in report.regions] == ["<root>: (identity, linear+bn+scale)+linear -> linear"]
    assert report.complete and batchnorms(deploy) == []
    # Without the flatten the code does not say the input is (N, C): on (N, L, C) BatchNorm1d would
    # act on L, so the Linear+BatchNorm1d fold is refused with that reason (the scale still folds).
    MLP.forward = lambda self, x: self.fc3(torch.relu(self.fc2(x + self.ls * self.bn(self.fc1(x)))))
    deploy, report = check(randomized(MLP()), (5, 6))
    assert batchnorms(deploy) == ["bn"]
    assert any("the same axis only on a 2-d input" in r.reason for r in report.remaining if r.path == "bn")


def test_flop_rule_keeps_a_bottleneck_apart():
    """1x1 (16 -> 2) then 3x3 (2 -> 16) folded would be a 16 -> 16 3x3: more work, so it is refused."""
    build = lambda: nn.Sequential(conv_bn(16, 2, 1), conv_bn(2, 16, 3, padding=0), nn.ReLU())  # noqa: E731
    deploy, report = check(randomized(build()), (1, 16, 7, 7))
    assert len(report.regions) == 2 and batchnorms(deploy) == []
    # Nothing foldable is left: the refusal by the cost rule is information (kept), not something left.
    assert report.complete and [r.kind for r in report.kept] == ["kept"] and "FLOP rule" in report.kept[0].reason


# --------------------------------------------------------------------------- property test

OPS = ("conv3", "conv1", "bn", "relu", "add", "pool", "cat1x1", "scale")


class RandomDAG(nn.Module):
    """A random program of shape-preserving ops over C channels; each step reads earlier values."""

    def __init__(self, program, c=3):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleList()
        for op, *_ in program:
            if op == "conv3":
                self.layers.append(nn.Conv2d(c, c, 3, padding=1, bias=True))
            elif op == "conv1":
                self.layers.append(nn.Conv2d(c, c, 1, bias=False))
            elif op == "bn":
                self.layers.append(nn.BatchNorm2d(c))
            elif op == "pool":
                self.layers.append(nn.AvgPool2d(3, 1, 1))
            elif op == "cat1x1":
                self.layers.append(nn.Conv2d(2 * c, c, 1))
            elif op == "scale":
                self.layers.append(nn.Identity())
            else:
                self.layers.append(nn.Identity())
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        values = [x]
        for (op, a, b), layer in zip(self.program, self.layers):
            u, v = values[a % len(values)], values[b % len(values)]
            if op == "relu":
                values.append(torch.relu(u))
            elif op == "add":
                values.append(u + v)
            elif op == "cat1x1":
                values.append(layer(torch.cat([u, v], 1)))
            elif op == "scale":
                values.append(u * self.gamma)
            else:
                values.append(layer(u))
        return values[-1] + values[len(values) // 2]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(0, 50)), min_size=2, max_size=9),
       st.integers(0, 1000))
def test_random_dags_fold_to_an_equal_network_or_say_why_not(program, seed):
    model = randomized(RandomDAG(program), seed=seed).double()
    deploy, report = reparameterize(model)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    assert ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item() < 1e-9
    left = {r.path for r in report.remaining if r.kind == "batchnorm"}
    assert left <= set(batchnorms(deploy)) <= left | {r.path for r in report.kept}  # every BatchNorm is named ...
    assert all(r.reason for r in report.remaining)               # ... with a reason
    with torch.device("meta"):
        skeleton, _ = reparameterize(RandomDAG(program).double())
    assert list(skeleton.state_dict()) == list(deploy.state_dict())


# --------------------------------------------------------------------------- CLI end to end

RESNET_SPEC = """
import torchvision


def build_model():
    return torchvision.models.resnet18(weights=None, num_classes=10)
"""

HOME_SPEC = """
import torch
from torch import nn


def build_model():
    def conv_bn(cin, cout, k):
        return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b, self.idbn = conv_bn(c, c, 3), conv_bn(c, c, 1), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x) + self.idbn(x))

    class Gate(nn.Module):
        def forward(self, x):
            return x if x.mean() > -1e9 else -x

    return nn.Sequential(conv_bn(3, 4, 3), nn.ReLU(), Block(4), Gate(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))
"""


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    spec = root / "r18.py"
    spec.write_text(RESNET_SPEC)
    ckpt = root / "r18.pth"
    assert run_cli("init", spec, "-o", ckpt).exit_code == 0
    return spec, ckpt


def test_resnet18_converts_complete_and_rebuilds(resnet, tmp_path):
    from reparam_cli.pipeline.deploy import load_deploy
    from reparam_cli.pipeline.training import load_training_model
    from reparam_cli.pipeline.specs import load_spec

    spec, ckpt = resnet
    out = tmp_path / "r18.safetensors"
    result = run_cli("convert", ckpt, "--spec", spec, "-o", out, "--input-shape", "1,3,64,64", "--json", "--strict")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["completeness"] == "complete" and report["remaining"] == []
    assert report["graph_regions"] == 20 and report["blocks"] == {}
    assert report["params_after"] == report["params_before"] - 2 * 4800 + 4800  # 20 BNs' gamma/beta go, biases come
    assert {"path": "layer2.0.downsample", "layer": "layer2.0.downsample.0", "before": "conv1x1/s2+bn",
            "after": "conv1x1/s2"} in report["regions"]
    deploy = load_deploy(out, spec=str(spec))  # a Python spec is code: the stored one is not run
    assert batchnorms(deploy) == []
    train = load_training_model(ckpt, load_spec(str(spec)))
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = train.double()(x.double())
        got = deploy(x).double()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_no_graph_strict_and_nothing_to_convert(tmp_path):
    spec = tmp_path / "home.py"
    spec.write_text(HOME_SPEC)
    ckpt = tmp_path / "home.pth"
    assert run_cli("init", spec, "-o", ckpt).exit_code == 0
    out = tmp_path / "home.safetensors"
    result = run_cli("convert", ckpt, "--spec", spec, "-o", out, "--input-shape", "2,3,8,8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # The untraceable gate holds nothing to fold: information (`skipped`), not left, so the
    # conversion is complete and --strict passes.
    assert report["graph_regions"] == 2 and report["completeness"] == "complete" and report["remaining"] == []
    assert [(r["path"], r["kind"]) for r in report["skipped"]] == [("3", "untraceable")]
    strict = tmp_path / "strict.safetensors"
    result = run_cli("convert", ckpt, "--spec", spec, "-o", strict, "--input-shape", "2,3,8,8", "--strict")
    assert result.exit_code == 0 and strict.exists(), result.output
    # --no-graph: no recipe block, no native method: an error that says what is left, nothing written.
    result = run_cli("convert", ckpt, "--spec", spec, "-o", tmp_path / "off.safetensors", "--no-graph")
    assert result.exit_code == 2 and "nothing to convert" in result.stderr and "batchnorm" in result.stderr
    assert not (tmp_path / "off.safetensors").exists()
    # inspect --spec lists the regions (shape only) and what would remain.
    result = run_cli("inspect", ckpt, "--spec", spec, "--json")
    info = json.loads(result.stdout)
    assert [r["before"] for r in info["regions"]] == ["conv3x3+bn", "conv3x3+bn, conv1x1+bn, bn(identity)"]
    assert info["remaining"] == [] and info["skipped"][0]["kind"] == "untraceable"


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_graph_fused_model_exports(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    spec = tmp_path / "home.py"
    spec.write_text(HOME_SPEC.replace("Block(4), Gate(),", "Block(4),"))
    ckpt = tmp_path / "home.pth"
    assert run_cli("init", spec, "-o", ckpt).exit_code == 0
    out = tmp_path / f"home.{fmt}"
    result = run_cli("convert", ckpt, "--spec", spec, "-o", out, "-f", fmt, "--input-shape", "2,3,8,8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["export_max_rel_err"] < 1e-5 and report["completeness"] == "complete"


def test_deploy_files_from_before_the_graph_pass_still_load(resnet, tmp_path):
    """Deploy files record whether the graph pass ran; files written before it existed carry no such
    record and rebuild without it (their BatchNorms outside blocks are still there)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from reparam_cli.pipeline.deploy import load_deploy
    from reparam_cli.io.safetensors import read_metadata

    spec, ckpt = resnet
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    assert run_cli("convert", ckpt, "--spec", spec, "-o", new, "--no-verify").exit_code == 0
    assert read_metadata(new)["options"] == {"graph": True}
    plain = tmp_path / "plain.safetensors"
    assert run_cli("convert", ckpt, "--spec", spec, "-o", plain, "--no-verify", "--no-graph").exit_code == 2
    # An old file: the recipes-only skeleton's tensors (no BN folded), metadata without options.
    from reparam_cli.convert.engine import reparameterize
    from reparam_cli.pipeline.specs import load_spec

    skeleton = reparameterize(load_spec(str(spec)).build().eval(), graph=False)[0]
    with safe_open(str(new), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "reparam.options"}
    save_file({k: v.contiguous() for k, v in skeleton.state_dict().items()}, str(old), metadata=meta)
    rebuilt = load_deploy(old, spec=str(spec))
    assert batchnorms(rebuilt) and set(rebuilt.state_dict()) == set(skeleton.state_dict())
    assert not batchnorms(load_deploy(new, spec=str(spec)))


def test_batch_strict_fails_files_with_something_left(tmp_path):
    spec = tmp_path / "home.py"
    # A gate whose untraceable code holds a BatchNorm: something left (an empty gate is information).
    spec.write_text(HOME_SPEC.replace(
        "    class Gate(nn.Module):\n        def forward(self, x):\n            return x if x.mean() > -1e9 else -x",
        "    class Gate(nn.Module):\n        def __init__(self):\n            super().__init__()\n"
        "            self.bn = nn.BatchNorm2d(4)\n\n        def forward(self, x):\n"
        "            return self.bn(x) if x.mean() > -1e9 else -x"))
    assert "self.bn(x)" in spec.read_text()
    runs = tmp_path / "runs"
    runs.mkdir()
    assert run_cli("init", spec, "-o", runs / "home.pth").exit_code == 0
    result = run_cli("batch", runs, "--spec", spec, "-o", tmp_path / "strict", "--input-shape", "2,3,8,8",
                     "--strict", "--json")
    entry = json.loads(result.stdout)["files"][0]
    assert result.exit_code == 1 and entry["status"] == "failed" and "--strict: 2 left" in entry["error"]
    assert not list((tmp_path / "strict").glob("*.safetensors"))
    result = run_cli("batch", runs, "--spec", spec, "-o", tmp_path / "plain", "--input-shape", "2,3,8,8", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["converted"] == 1


class PaddedBlocks(nn.Module):
    """Zero padding written out (nn.ZeroPad2d, F.pad, ConstantPad2d(0)) and F.avg_pool2d, the ways
    home-made code spells what a conv's own padding and a pooling layer do."""

    def __init__(self, c):
        super().__init__()
        self.pad, self.a = nn.ZeroPad2d(1), conv_bn(c, c, 3, padding=0)
        self.b = conv_bn(c, c, 3, padding=0)
        self.cpad, self.c = nn.ConstantPad2d(2, 0.0), conv_bn(c, c, 1, padding=0, bias=True)
        self.d = conv_bn(c, c, 3, padding=0)
        self.e = conv_bn(c, c, 3, padding=0)   # after an asymmetric pad: folds alone
        self.f = conv_bn(c, c, 1, padding=0, bias=True)  # then zero padding: not one conv

    def forward(self, x):
        x = torch.relu(self.a(self.pad(x)))
        x = torch.relu(self.b(F.pad(x, (1, 1, 1, 1))) + F.avg_pool2d(x, 3, 1, 1))
        x = torch.relu(self.c(self.cpad(x))[..., 2:-2, 2:-2])
        x = torch.relu(self.d(F.pad(x, [1] * 4, mode="constant", value=0)))
        x = torch.relu(self.e(F.pad(x, (0, 2, 0, 2))))
        return F.pad(self.f(x), (1, 1, 1, 1))


def test_zero_padding_and_functional_avg_pool_fold_into_the_next_conv():
    model = randomized(PaddedBlocks(4))
    deploy, report = check(model, (2, 4, 10, 10))
    same_skeleton(lambda: PaddedBlocks(4), deploy)
    texts = [r.text for r in report.regions]
    assert "<root>: pad1x1+conv3x3+bn -> conv3x3" in texts
    assert "<root>: pad1x1+conv3x3+bn, avgpool3x3 -> conv3x3" in texts
    assert "<root>: pad2x2+conv1x1+bn -> conv1x1" in texts
    assert batchnorms(deploy) == [] and report.complete  # nothing foldable is left
    # The symmetric pads are gone into the convs' own padding; the asymmetric one and the pad after
    # the biased 1x1 (its ring is zero, not the bias) stay as they were.
    assert not [m for m in deploy.modules() if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d))]
    pads = [n.args[1] for n in deploy.graph.nodes if n.op == "call_function" and n.target is F.pad]
    assert pads == [(0, 2, 0, 2), (1, 1, 1, 1)]
    assert [deploy.get_submodule(f"{n}.0").padding for n in "abcd"] == [(1, 1), (1, 1), (2, 2), (1, 1)]
