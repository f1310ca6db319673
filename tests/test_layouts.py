"""Official layouts: deploy-form state dicts of reference implementations (read by verify, inspect and
load_deploy), RepMLPNet deploy files that load strictly into the reference deploy model, RepNeXt-M
and RefConv's MobileNetV3 with their reference key names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reparam_cli.io.sniff import deploy_format_of
from reparam_cli.pipeline.deploy import load_deploy
from reparam_cli.convert.engine import reparameterize
from reparam_cli.errors import CheckpointError
from reparam_cli.pipeline.inspection import inspect_checkpoint
from reparam_cli.pipeline.conversion import init_checkpoint, verify_checkpoint
from reparam_cli.pipeline.training import read_training_model
from reparam_cli.pipeline.specs import load_spec

from .helpers import run_cli

TINY_REPVGG = ("builder: reparam_cli.blocks.repvgg:RepVGG\n"
               "args: {num_blocks: [1, 1, 1, 1], width_multiplier: [0.25, 0.25, 0.25, 0.25], num_classes: 5}\n"
               "input_shape: [2, 3, 32, 32]\n")


# --------------------------------------------------------------------------- deploy state dicts

@pytest.fixture
def tiny(tmp_path):
    """(spec path, training checkpoint, its deploy model in eval mode)."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_REPVGG)
    ckpt = tmp_path / "train.pth"
    init_checkpoint(str(spec), ckpt, seed=3)
    train, _ = read_training_model(ckpt, load_spec(str(spec)))
    deploy, _ = reparameterize(train.eval())
    return spec, ckpt, deploy.eval()


def test_reference_deploy_state_dict_verifies_inspects_and_loads(tiny, tmp_path):
    """What a reference convert script writes (torch.save of the fused model's state dict, here
    under a `state_dict` wrapper with DataParallel's `module.` prefix, as `.pth.tar`) is a deploy file."""
    spec, ckpt, deploy = tiny
    path = tmp_path / "fused.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in deploy.state_dict().items()}}, path)
    assert deploy_format_of(path) == "state_dict"

    report = verify_checkpoint(ckpt, path, str(spec))
    assert report["ok"] and report["format"] == "state_dict" and report["blocks"] == {"RepVGGBlock": 5}
    assert report["max_rel_err"] < 1e-5

    loaded = load_deploy(path, spec=str(spec))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), deploy(x))

    info = inspect_checkpoint(path, str(spec))
    assert info["kind"] == "deploy" and info["params_after"] == info["parameters"] < info["params_before"]
    result = run_cli("verify", ckpt, path, "--spec", spec)
    assert result.exit_code == 0, result.output


def test_wrong_deploy_state_dict_fails_verification(tiny, tmp_path):
    spec, ckpt, deploy = tiny
    state = {k: v.clone() for k, v in deploy.state_dict().items()}
    state["stage2.0.rbr_reparam.bias"] += 0.5
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    assert not verify_checkpoint(ckpt, path, str(spec))["ok"]
    assert run_cli("verify", ckpt, path, "--spec", spec).exit_code == 1


def test_training_checkpoint_or_no_spec_is_a_clear_error(tiny):
    spec, ckpt, _ = tiny
    with pytest.raises(CheckpointError, match="training checkpoint of tiny, not a deploy file"):
        load_deploy(ckpt, spec=str(spec))
    with pytest.raises(CheckpointError, match="needs|pass --spec"):
        load_deploy(ckpt)
    result = run_cli("verify", ckpt, ckpt, "--spec", spec)
    assert result.exit_code == 2 and "not a deploy file" in result.output and "Traceback" not in result.output
    info = inspect_checkpoint(ckpt, str(spec))
    assert info["kind"] == "training"


# --------------------------------------------------------------------------- RepMLPNet, reference deploy keys

def _ref_conv_bn(cin, cout, k, s, relu=False):
    """The reference's conv_bn / conv_bn_relu: Sequential(conv (no bias), bn[, relu])."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, s, 0, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    if relu:
        seq.add_module("relu", nn.ReLU())
    return seq


class _RefDeployRepMLPBlock(nn.Module):
    """DingXiaoH/RepMLP's RepMLPBlock with deploy=True (after locality injection), written from its structure:
    gp.fc1/fc2, fc3 (grouped 1x1 conv with bias), fc3_bn = Identity, no local perceptron."""

    def __init__(self, c, h, w, s, reduce):
        super().__init__()
        self.C, self.S, self.h, self.w = c, s, h, w
        self.gp = nn.Module()
        self.gp.fc1 = nn.Conv2d(c, c // reduce, 1)
        self.gp.fc2 = nn.Conv2d(c // reduce, c, 1)
        self.fc3 = nn.Conv2d(s * h * w, s * h * w, 1, groups=s)
        self.fc3_bn = nn.Identity()

    def forward(self, x):
        gate = torch.sigmoid(self.gp.fc2(torch.relu(self.gp.fc1(x.mean((2, 3), keepdim=True)))))
        n, c, hh, ww = x.shape
        hp, wp = hh // self.h, ww // self.w
        p = x.reshape(n, c, hp, self.h, wp, self.w).permute(0, 2, 4, 1, 3, 5)
        out = self.fc3_bn(self.fc3(p.reshape(-1, self.S * self.h * self.w, 1, 1)))
        out = out.reshape(-1, hp, wp, self.S, self.h, self.w).permute(0, 3, 1, 4, 2, 5).reshape(x.shape)
        return out * gate


class _RefDeployRepMLPNet(nn.Module):
    """The reference RepMLPNet(deploy=True) module tree and forward (no weights of its own)."""

    def __init__(self, channels, hs, num_blocks, sharesets, num_class, reduce=4):
        super().__init__()
        self.conv_embedding = _ref_conv_bn(3, channels[0], 4, 4, relu=True)
        self.stages = nn.ModuleList()
        for c, h, n, s in zip(channels, hs, num_blocks, sharesets):
            units = nn.ModuleList()
            for _ in range(n):
                unit = nn.Module()
                unit.repmlp_block = _RefDeployRepMLPBlock(c, h, h, s, reduce)
                unit.ffn_block = nn.Module()
                unit.ffn_block.ffn_fc1 = _ref_conv_bn(c, 4 * c, 1, 1)
                unit.ffn_block.ffn_fc2 = _ref_conv_bn(4 * c, c, 1, 1)
                unit.prebn1, unit.prebn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
                units.append(unit)
            self.stages.append(units)
        self.embeds = nn.ModuleList(_ref_conv_bn(a, b, 2, 2, relu=True) for a, b in zip(channels, channels[1:]))
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.head = nn.Linear(channels[-1], num_class)

    def forward(self, x):
        x = self.conv_embedding(x)
        for i, stage in enumerate(self.stages):
            for u in stage:
                x = x + u.repmlp_block(u.prebn1(x))
                x = x + u.ffn_block.ffn_fc2(nn.functional.gelu(u.ffn_block.ffn_fc1(u.prebn2(x))))
            if i < len(self.embeds):
                x = self.embeds[i](x)
        return self.head(self.head_norm(x).mean((2, 3)))


def test_repmlpnet_deploy_file_loads_strictly_into_the_reference_deploy_model(tmp_path):
    from reparam_cli.pipeline.conversion import convert_checkpoint

    spec = tmp_path / "mini-repmlpnet.yaml"
    spec.write_text("builder: reparam_cli.blocks.repmlp:RepMLPNet\n"
                    "args: {channels: [8, 16], hs: [4, 2], ws: [4, 2], num_blocks: [1, 2], sharesets_nums: [2, 4],"
                    " reparam_conv_k: [1, 3], num_class: 10}\ninput_shape: [2, 3, 16, 16]\n")
    ckpt = tmp_path / "train.pth"
    init_checkpoint(str(spec), ckpt, seed=5)
    out = tmp_path / "deploy.safetensors"
    # --layout reference: the recipes' deploy form is the reference's; the graph pass (the default)
    # also folds the conv+BN pairs the reference deploy model keeps, and the report says so.
    report = convert_checkpoint(ckpt, str(spec), out, layout="reference")
    assert report["ok"] and report["layout"] == "reference" and report["reference_layout"]
    deploy = load_deploy(out)

    from safetensors.torch import load_file

    reference = _RefDeployRepMLPNet((8, 16), (4, 2), (1, 2), (2, 4), 10).eval()
    reference.load_state_dict(load_file(str(out)), strict=True)  # every key and shape, nothing left over
    assert report["params_after"] == sum(p.numel() for p in reference.parameters())
    default = convert_checkpoint(ckpt, str(spec), tmp_path / "default.safetensors")
    assert default["ok"] and not default["reference_layout"] and default["params_after"] < report["params_after"]
    assert default["params_reference"] == report["params_after"]
    assert any("--layout reference" in n for n in default["notes"])
    with pytest.raises(RuntimeError):  # the default layout is not the reference one here
        _RefDeployRepMLPNet((8, 16), (4, 2), (1, 2), (2, 4), 10).load_state_dict(
            load_file(str(tmp_path / "default.safetensors")), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(reference(x), deploy(x), rtol=1e-5, atol=1e-6)
    # and the reference deploy model's own state dict is a deploy file for reparam
    torch.save(reference.state_dict(), tmp_path / "reference.pth")
    assert verify_checkpoint(ckpt, tmp_path / "reference.pth", str(spec))["ok"]


# --------------------------------------------------------------------------- RefConv's MobileNetV3

class _ScriptRepConv(nn.Module):
    """The tensors of RefConv's reference `RepConv` (ImageNet-MobileNetv3-RefConv.py), written from its
    structure: a frozen base `weight` buffer and `convmap` with in*out/groups^2 groups; no conversion method."""

    def __init__(self, cin, cout, k, groups=1, map_k=3):
        super().__init__()
        self.register_buffer("weight", torch.zeros(cout, cin // groups, k, k))
        n = cout * cin // groups
        self.convmap = nn.Conv2d(n, n, map_k, 1, map_k // 2, groups=cin * cout // groups ** 2, bias=False)


@pytest.mark.parametrize("mode,params_after,refconvs", [("large", 5_476_416, 16), ("small", 2_938_368, 12)])
def test_mobilenetv3_refconv_specs_have_the_scripts_keys(mode, params_after, refconvs):
    from reparam_cli.core.tensors import count_parameters

    net = load_spec(f"mobilenetv3-refconv-{mode[0]}").build(device="meta")
    state = net.state_dict()
    exp = 72 if mode == "large" else 96  # the first 5x5 bottleneck (features.4 in both)
    stem, dw = _ScriptRepConv(3, 16, 3), _ScriptRepConv(exp, exp, 5, groups=exp)
    for prefix, module in (("features.0.0.", stem), ("features.4.conv.3.", dw)):
        for k, t in module.state_dict().items():
            assert state[prefix + k].shape == t.shape, prefix + k
    assert {"features.1.conv.0.weight", "features.1.conv.8.running_var", "classifier.1.weight"} <= state.keys()
    assert any(k.endswith("conv.5.fc.2.weight") for k in state)
    deploy, report = reparameterize(net.eval(), graph=False)
    # MobileNetV3-Large 5.4M / -Small 2.9M parameters (Howard et al.): the recipes' deploy form is the
    # plain network; the graph pass folds a little more (BatchNorms the plain network keeps).
    assert report.blocks == {"RefConv": refconvs} and count_parameters(deploy) == params_after
    assert count_parameters(reparameterize(net.eval())[0]) < params_after
    assert "features.0.0.weight" in deploy.state_dict() and not any("convmap" in k for k in deploy.state_dict())


class _RefMobileNetV3(nn.Module):
    """The reference deploy model of RefConv's MobileNetV3: the plain MobileNetV3 of the repository's
    baseline script (ImageNet-MobileNetv3-Baseline.py), written from its structure: conv_bn stem,
    MobileBottleneck `conv` Sequentials (pw, BN, act, dw, BN, SE/identity, act, pw-linear, BN),
    conv_1x1_bn, pool, 1x1 conv with bias, h-swish; classifier (dropout, linear)."""

    def __init__(self, mode: str, n_class: int = 1000):
        from reparam_cli.models.mobilenetv3 import LAST_CONV, SETTINGS  # the paper's tables (data only)

        super().__init__()
        act = {"RE": nn.ReLU, "HS": nn.Hardswish}
        features = [nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())]
        self.residual = []
        inp = 16
        for k, exp, c, se, nl, s in SETTINGS[mode]:
            block = nn.Module()
            block.conv = nn.Sequential(
                nn.Conv2d(inp, exp, 1, 1, 0, bias=False), nn.BatchNorm2d(exp), act[nl](),
                nn.Conv2d(exp, exp, k, s, k // 2, groups=exp, bias=False), nn.BatchNorm2d(exp),
                _RefSE(exp) if se else nn.Identity(), act[nl](),
                nn.Conv2d(exp, c, 1, 1, 0, bias=False), nn.BatchNorm2d(c))
            self.residual.append(s == 1 and inp == c)
            features.append(block)
            inp = c
        last = LAST_CONV[mode]
        features += [nn.Sequential(nn.Conv2d(inp, last, 1, 1, 0, bias=False), nn.BatchNorm2d(last), nn.Hardswish()),
                     nn.AdaptiveAvgPool2d(1), nn.Conv2d(last, 1280, 1, 1, 0), nn.Hardswish()]
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.8), nn.Linear(1280, n_class))

    def forward(self, x):
        for i, layer in enumerate(self.features):
            if 1 <= i <= len(self.residual):
                x = x + layer.conv(x) if self.residual[i - 1] else layer.conv(x)
            else:
                x = layer(x)
        return self.classifier(x.mean(3).mean(2))


class _RefSE(nn.Module):
    def __init__(self, c, reduction=4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c // reduction, bias=False), nn.ReLU(),
                                nn.Linear(c // reduction, c, bias=False), nn.Hardsigmoid())

    def forward(self, x):
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


@pytest.mark.parametrize("mode", ["large", "small"])
def test_mobilenetv3_refconv_reference_layout_is_the_baseline_network(mode):
    """Shape-only: --layout reference gives the baseline MobileNetV3's keys and shapes exactly; the
    default (the graph pass folds its conv+BN pairs) does not, and has fewer parameters."""
    from reparam_cli.core.tensors import count_parameters
    from reparam_cli.pipeline.deploy import deploy_skeleton
    from reparam_cli.pipeline.options import FuseOptions

    spec = load_spec(f"mobilenetv3-refconv-{mode[0]}")
    with torch.device("meta"):
        reference = _RefMobileNetV3(mode)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ref, ref_report = deploy_skeleton(spec, FuseOptions(layout="reference"))
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == shapes and not ref_report.regions
    default, report = deploy_skeleton(spec)
    assert set(default.state_dict()) != set(shapes) and report.regions
    assert count_parameters(default) < count_parameters(ref) == count_parameters(reference)


def test_mobilenetv3_refconv_small_converts_verified(tmp_path):
    """A checkpoint as the script saves it (a plain state dict, RepConv keys) converts and verifies;
    `convert --layout reference` writes a file that loads strictly into the baseline network, and
    that network's own state dict is a deploy file for verify, inspect and load_deploy."""
    import json

    from safetensors.torch import load_file

    from reparam_cli.pipeline.conversion import convert_checkpoint
    from reparam_cli.pipeline.options import VerifyOptions

    ckpt = tmp_path / "tsl.pth"
    init_checkpoint("mobilenetv3-refconv-s", ckpt, seed=4)
    small = VerifyOptions(input_shape=(1, 3, 64, 64))
    report = convert_checkpoint(ckpt, "mobilenetv3-refconv-s", tmp_path / "tsl.deploy.safetensors",
                                verify_options=small)
    assert report["ok"] and report["blocks"] == {"RefConv": 12} and report["params_after"] == 2_934_496
    assert report["max_rel_err"] < 1e-5
    assert report["layout"] == "default" and not report["reference_layout"]
    assert report["params_reference"] == 2_938_368 and any("--layout reference" in n for n in report["notes"])

    out = tmp_path / "tsl.ref.safetensors"
    result = run_cli("convert", ckpt, "--spec", "mobilenetv3-refconv-s", "-o", out, "--layout", "reference",
                     "--input-shape", "1,3,64,64", "--json")
    assert result.exit_code == 0, result.output
    ref_report = json.loads(result.stdout)
    assert ref_report["params_after"] == 2_938_368 and ref_report["reference_layout"]
    assert "params_reference" not in ref_report and not any("layout" in n for n in ref_report.get("notes", []))
    reference = _RefMobileNetV3("small").eval()
    reference.load_state_dict(load_file(str(out)), strict=True)
    deploy = load_deploy(out)  # rebuilt in the reference layout, as the file's metadata records
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reference(x), deploy(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):
        _RefMobileNetV3("small").load_state_dict(load_file(str(tmp_path / "tsl.deploy.safetensors")), strict=True)

    saved = tmp_path / "baseline_fused.pth"
    torch.save(reference.state_dict(), saved)
    assert verify_checkpoint(ckpt, saved, "mobilenetv3-refconv-s",
                             verify_options=small)["ok"]
    info = inspect_checkpoint(saved, "mobilenetv3-refconv-s")
    assert info["kind"] == "deploy" and info["layout"] == "reference" and info["params_after"] == 2_938_368
    info = inspect_checkpoint(tmp_path / "tsl.deploy.safetensors", "mobilenetv3-refconv-s")
    assert info["layout"] == "default" and not info["reference_layout"]
    info = inspect_checkpoint(out)
    assert info["layout"] == "reference" and info["reference_layout"] and info["params_after"] == 2_938_368
    assert inspect_checkpoint(saved)["kind"] == "deploy?" and inspect_checkpoint(ckpt)["kind"] == "training"
    result = run_cli("inspect", saved)
    assert result.exit_code == 0 and "deploy form (reference layout?)" in " ".join(result.stderr.split())


# --------------------------------------------------------------------------- RepNeXt-M

from reparam_cli.core import algebra as A  # noqa: E402
from reparam_cli.blocks.repnext_m import RepDWConvM, RepDWConvS, RepNextClassifier, VARIANTS

from .helpers import assert_equivalent, randomized  # noqa: E402


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups,cin,mid,cout", [(4, 4, 4, 4), (1, 3, 6, 5), (2, 4, 8, 6)])
def test_sequential_of_1xk_then_kx1_is_one_conv(stride, groups, cin, mid, cout):
    """P5c: a 1xk conv (no bias) then a kx1 conv (with bias) is one kxk conv, exactly, borders included."""
    torch.manual_seed(0)
    c1 = nn.Conv2d(cin, mid, (1, 5), (1, stride), (0, 2), groups=groups, bias=False).double()
    c2 = nn.Conv2d(mid, cout, (5, 1), (stride, 1), (2, 0), groups=groups).double()
    k = A.sequential(A.from_module(c1), A.from_module(c2))
    assert k.kernel_size == (5, 5) and k.padding == (2, 2) and k.stride == (stride, stride)
    x = torch.randn(2, cin, 9, 11, dtype=torch.float64)
    assert torch.allclose(A.apply(k, x), c2(c1(x)), atol=1e-12)


def test_sequential_refuses_a_bias_into_padding_and_kxk_chains():
    c1 = nn.Conv2d(4, 4, (1, 3), 1, (0, 1), groups=4, bias=True)  # its bias would meet the 3x1's zero padding
    c2 = nn.Conv2d(4, 4, (3, 1), 1, (1, 0), groups=4)
    with pytest.raises(A.NotEquivalent):
        A.sequential(A.from_module(c1), A.from_module(c2))
    with pytest.raises(A.NotEquivalent):
        A.sequential(A.from_module(nn.Conv2d(4, 4, 3, 1, 1)), A.from_module(nn.Conv2d(4, 4, 3, 1, 1)))


def test_undilate_spreads_the_taps():
    conv = nn.Conv2d(4, 4, 2, 2, 1, dilation=2, groups=4).double()
    k = A.undilate(A.from_module(conv))
    assert k.kernel_size == (3, 3) and k.dilation == (1, 1) and k.padding == (1, 1)
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    assert torch.allclose(A.apply(k, x), conv(x), atol=1e-12)


@pytest.mark.parametrize("block", [RepDWConvS(8), RepDWConvS(8, stride=2), RepDWConvM(8), RepDWConvM(8, stride=2),
                                   RepNextClassifier(8, 5)], ids=["S", "S-stride2", "M", "M-stride2", "head"])
def test_repnext_m_blocks_fuse_to_one_layer(block):
    shape = (2, 8) if isinstance(block, RepNextClassifier) else (2, 8, 13, 12)  # odd sizes: every border case
    deploy, _ = assert_equivalent(randomized(block), shape)
    assert isinstance(deploy, (nn.Conv2d, nn.Linear))
    if isinstance(deploy, nn.Conv2d):
        assert deploy.groups == 8 and deploy.kernel_size == ((3, 3) if isinstance(block, RepDWConvS) else (7, 7))


def _dwc(c, k, s, p):
    return nn.Conv2d(c, c, k, s, p, groups=c)


class _RefFusedChunkConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c // 4
        self.conv_s, self.conv_m = _dwc(h, 3, 1, 1), _dwc(h, 7, 1, 3)
        self.conv_l = nn.Sequential(_dwc(h, (1, 11), 1, (0, 5)), _dwc(h, (11, 1), 1, (5, 0)))

    def forward(self, x):
        i, s, m, l = torch.chunk(x, 4, dim=1)
        return torch.cat((i, self.conv_s(s), self.conv_m(m), self.conv_l(l)), dim=1)


class _RefFusedCopyConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv_s, self.conv_m = _dwc(c, 3, 2, 1), _dwc(c, 7, 2, 3)

    def forward(self, x):
        return torch.cat((self.conv_s(x), self.conv_m(x)), dim=1)


class _RefFusedMixer(nn.Module):
    """MetaNeXt block (`down`: the Downsample) after the reference's fuse: BatchNorm kept."""

    def __init__(self, c, down=False):
        super().__init__()
        self.down = down
        out = 2 * c if down else c
        self.token_mixer = _RefFusedCopyConv(c) if down else _RefFusedChunkConv(c)
        self.norm = nn.BatchNorm2d(out)
        self.channel_mixer = nn.Sequential(nn.Conv2d(out, 2 * out, 1), nn.GELU(), nn.Conv2d(2 * out, out, 1))

    def forward(self, x):
        if self.down:
            x = self.norm(self.token_mixer(x))
            return x + self.channel_mixer(x)
        return x + self.channel_mixer(self.norm(self.token_mixer(x)))


class _RefFusedRepNext(nn.Module):
    """suous/RepNeXt's RepNext after its own `fuse()` (model/repnext.py), written from its structure:
    every ConvNorm, RepDWConvS/M a conv with bias at the block's key, `conv_l` two convs, the blocks'
    BatchNorms kept, the two heads one linear layer at `head`."""

    def __init__(self, dims, depth, num_classes=1000):
        super().__init__()
        self.stem = nn.Module()
        self.stem.stem = nn.Sequential(nn.Conv2d(3, dims[0] // 2, 3, 2, 1), nn.GELU(), nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1))
        stages = []
        for i, (c, d) in enumerate(zip(dims, depth)):
            stage = nn.Module()
            stage.downsample = _RefFusedMixer(dims[i - 1], down=True) if i else nn.Identity()
            stage.blocks = nn.Sequential(*[_RefFusedMixer(c) for _ in range(d)])
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stem.stem(x)
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
        return self.head(x.mean((2, 3)))


def test_repnext_m_deploy_params_match_the_paper():
    """Deploy parameters of M0..M5 as in the paper's table (2.3, 4.8, 6.5, 7.8, 13.3, 21.7 M), and the
    default deploy form is the reference's fused model key for key (the graph pass has nothing that
    gains: each lone BatchNorm stays, reported as kept)."""
    from reparam_cli.core.tensors import count_parameters

    paper = {"m0": 2.3, "m1": 4.8, "m2": 6.5, "m3": 7.8, "m4": 13.3, "m5": 21.7}
    for name, (dims, depth) in VARIANTS.items():
        net = load_spec(f"repnext-{name}").build(device="meta")
        assert net.stem.stem[0].conv.out_channels * 2 == dims[0] and len(net.stages[2].blocks) == depth[2]
        deploy, report = reparameterize(net.eval())
        assert round(count_parameters(deploy) / 1e6, 1) == paper[name], name
        assert report.blocks["RepDWConvS"] == report.blocks["RepDWConvM"] == sum(depth) + len(depth) - 1
        with torch.device("meta"):
            reference = _RefFusedRepNext(dims, depth)
        assert {k: tuple(v.shape) for k, v in deploy.state_dict().items()} == \
            {k: tuple(v.shape) for k, v in reference.state_dict().items()}, name
        assert not report.regions and len(report.kept) == sum(depth) + len(depth) - 1


def test_repnext_m0_reference_keys_and_end_to_end(tmp_path):
    """suous/RepNeXt's key names (training and fused), and init -> convert -> load_deploy of RepNeXt-M0."""
    from reparam_cli.pipeline.options import VerifyOptions
    from reparam_cli.pipeline.conversion import convert_checkpoint

    net = load_spec("repnext-m0").build(device="meta")
    keys = set(net.state_dict())
    for key in ("stem.stem.0.conv.weight", "stem.stem.2.norm.running_var",
                "stages.0.blocks.0.token_mixer.conv_s.conv_2_2.weight", "stages.0.blocks.0.token_mixer.conv_s.conv_3_w.bias",
                "stages.0.blocks.1.token_mixer.conv_m.conv_5_h.weight", "stages.0.blocks.0.token_mixer.conv_l.1.bias",
                "stages.0.blocks.0.norm.running_mean", "stages.0.blocks.0.channel_mixer.2.conv.weight",
                "stages.1.downsample.token_mixer.conv_s.conv_3_3.bias", "stages.1.downsample.norm.weight",
                "stages.3.downsample.channel_mixer.0.norm.bias", "head.head.norm.running_var", "head.head_dist.linear.weight"):
        assert key in keys, key
    assert "stages.1.downsample.token_mixer.conv_s.conv_3_w.bias" not in keys  # no bias on stride-2 1xk / kx1
    fused = set(reparameterize(net.eval())[0].state_dict())
    for key in ("stem.stem.0.weight", "stem.stem.0.bias", "stages.0.blocks.0.token_mixer.conv_s.weight",
                "stages.1.downsample.token_mixer.conv_m.bias", "stages.0.blocks.0.token_mixer.conv_l.0.weight",
                "stages.0.blocks.0.channel_mixer.0.bias", "head.weight", "head.bias"):
        assert key in fused, key

    ckpt = tmp_path / "repnext_m0.pth"
    init_checkpoint("repnext-m0", ckpt, seed=1)
    out = tmp_path / "m0.deploy.safetensors"
    report = convert_checkpoint(ckpt, "repnext-m0", out, verify_options=VerifyOptions(input_shape=(1, 3, 64, 64)))
    assert report["ok"] and report["params_after"] == 2_333_200 and report["max_rel_err"] < 1e-5
    assert report["layout"] == "default" and report["reference_layout"] and "params_reference" not in report
    train, _ = read_training_model(ckpt, load_spec("repnext-m0"))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = train.eval().double()(x.double())
        got = load_deploy(out)(x).double()
    assert (got - ref).abs().max().item() / ref.abs().max().item() < 1e-5

    # the default file loads strictly into the reference's fused model and computes the same
    from safetensors.torch import load_file

    reference = _RefFusedRepNext(*VARIANTS["m0"]).eval()
    reference.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        assert (reference(x).double() - ref).abs().max().item() / ref.abs().max().item() < 1e-5
    # its state dict, as a reference convert script saves it, is recognised by inspect --spec
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "m0_fused.pth.tar")
    info = inspect_checkpoint(tmp_path / "m0_fused.pth.tar", "repnext-m0")
    assert info["kind"] == "deploy" and info["layout"] == "reference" and info["params_after"] == 2_333_200
    result = run_cli("inspect", tmp_path / "m0_fused.pth.tar", "--spec", "repnext-m0")
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- --layout, stored

def test_layout_option_is_stored_and_checked(tiny, tmp_path):
    """FuseOptions(layout="reference") implies graph=False, round-trips through the deploy file's
    metadata, and refuses --linear-as-conv (which changes the layout) and unknown names (exit 2)."""
    from reparam_cli.errors import ReparamError
    from reparam_cli.pipeline.deploy import fuse_options_of
    from reparam_cli.pipeline.options import ConvertOptions, FuseOptions

    ref = FuseOptions(layout="reference")
    assert not ref.graph and ref.stored() == {"graph": False, "layout": "reference"}
    assert FuseOptions.from_stored(ref.stored()) == ref
    assert FuseOptions.from_stored({"graph": True, "layout": "from-the-future"}) == FuseOptions()
    assert not ConvertOptions.of(layout="reference").graph
    with pytest.raises(ReparamError, match="linear-as-conv"):
        ConvertOptions.of(layout="reference", linear_as_conv=True)
    with pytest.raises(ReparamError, match="unknown layout"):
        FuseOptions(layout="paper")

    spec, ckpt, _ = tiny
    out = tmp_path / "ref.safetensors"
    result = run_cli("convert", ckpt, "--spec", spec, "-o", out, "--layout", "reference")
    assert result.exit_code == 0, result.output
    assert fuse_options_of(out) == ref and isinstance(load_deploy(out), nn.Module)
    result = run_cli("convert", ckpt, "--spec", spec, "-o", tmp_path / "x.safetensors", "--layout", "paper")
    assert result.exit_code == 2 and "unknown layout" in result.output

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "a.pth").write_bytes(ckpt.read_bytes())
    result = run_cli("batch", runs, "--spec", spec, "-o", tmp_path / "deploy", "--layout", "reference")
    assert result.exit_code == 0, result.output
    assert fuse_options_of(tmp_path / "deploy" / "a.deploy.safetensors") == ref


def test_training_branch_keys_tell_training_from_deploy_checkpoints():
    """inspect without --spec: every built-in family's training keys name a training branch, and
    neither deploy layout keeps one (all 30 built-ins checked when this was written; one per family here)."""
    from reparam_cli.pipeline.deploy import deploy_skeleton
    from reparam_cli.pipeline.options import FuseOptions
    from reparam_cli.pipeline.specs import training_branch_key

    for name in ("repvgg-a0", "mobileone-s0", "resnet18-acb", "mobilenetv1-dbb", "repmlpnet-t224", "repnext-m0",
                 "repnext-tiny", "mobilenetv3-refconv-s"):
        spec = load_spec(name)
        assert training_branch_key(spec.build(device="meta").state_dict()) is not None, name
        for fuse in (None, FuseOptions(layout="reference")):
            assert training_branch_key(deploy_skeleton(spec, fuse)[0].state_dict()) is None, (name, fuse)
