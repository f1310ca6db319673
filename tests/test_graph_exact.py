"""The graph pass is exact or refuses, with or without verification (issue 16, item 1).

A property test over random programs in five layouts (token tensors (N, L, C) with L == C so that
a wrong axis runs and gives a wrong number instead of an error, (N, C), conv1d/2d/3d) with
in-place ops, self-concatenation, fan-out, Linear/BatchNorm1d/2d/3d mixes (a Linear over the last
dim of a conv's output too) and F.batch_norm: the
float64 deploy model equals the float64 training model to a relative 1e-9 (a wrong fold is O(1)),
every BatchNorm left or kept is named, and the meta skeleton has the same state-dict keys. Then the
cases that used to build wrong models, each with its refusal, and the float64 per-region check
that turns a wrong fold into an error also with --no-verify.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st
from torch import nn

from reparam_cli.core import algebra as A
from reparam_cli.convert.engine import reparameterize
from reparam_cli.convert.graph import WrongFold

from .helpers import randomized

C = 4
LAYOUTS = {  # input shape, conv dims (0: linear on the last dim), BatchNorm class
    "tokens": ((2, C, C), 0, nn.BatchNorm1d),
    "flat": ((3, C), 0, nn.BatchNorm1d),
    "conv1d": ((2, C, 7), 1, nn.BatchNorm1d),
    "conv2d": ((2, C, 6, 6), 2, nn.BatchNorm2d),
    "conv3d": ((1, C, 4, 4, 4), 3, nn.BatchNorm3d),
}
OPS = ("wide", "pw", "bn", "fbn", "relu", "relu_", "add", "add_", "cat", "selfcat", "scale", "neg", "last")


def _layer(n: int, cin: int, cout: int, k: int) -> nn.Module:
    if n == 0:
        return nn.Linear(cin, cout)
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n](cin, cout, k, padding=k // 2, bias=k == 1)


class RandomNet(nn.Module):
    """values[i] computed from two earlier values by each step; in-place steps change earlier values."""

    def __init__(self, program, layout):
        super().__init__()
        self.program, self.layout = program, layout
        shape, n, bn = LAYOUTS[layout]
        self.layers = nn.ModuleList()
        for op, *_ in program:
            if op == "wide":
                self.layers.append(_layer(n, C, C, 3))
            elif op in ("pw", "cat", "selfcat"):
                self.layers.append(_layer(n, 2 * C if op != "pw" else C, C, 1))
            elif op in ("bn", "fbn"):
                self.layers.append(bn(C))
            elif op == "last":  # a Linear over the last dim: the channels only for (N, C) and (N, L, C)
                self.layers.append(nn.Linear(shape[-1], shape[-1]))
            else:
                self.layers.append(nn.Identity())
        channel_shape = (C,) if n == 0 else (C,) + (1,) * n
        self.gamma = nn.Parameter(torch.rand(channel_shape) + 0.5)
        self.cat_dim = -1 if n == 0 else 1

    def forward(self, x):
        values = [x]
        for (op, a, b), layer in zip(self.program, self.layers):
            u, v = values[a % len(values)], values[b % len(values)]
            if op == "relu":
                values.append(torch.relu(u))
            elif op == "relu_":
                values.append(u.relu_())
            elif op == "add":
                values.append(u + v)
            elif op == "add_":
                values.append(u.add_(v))  # (no `u is v` test: fx cannot trace identity, x.add_(x) is 2x)
            elif op == "neg":
                values.append(-u)
            elif op == "cat":
                values.append(layer(torch.cat([u, v], self.cat_dim)))
            elif op == "selfcat":
                values.append(layer(torch.cat([u, u], self.cat_dim)))
            elif op == "scale":
                values.append(u * self.gamma)
            elif op == "fbn":
                values.append(F.batch_norm(u, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                                           False, 0.0, layer.eps))
            else:
                values.append(layer(u))
        return values[-1] + values[len(values) // 2]


def batchnorms(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def run_program(program, layout, seed):
    model = randomized(RandomNet(program, layout), seed=seed).double().eval()
    deploy, report = reparameterize(model)
    x = torch.randn(*LAYOUTS[layout][0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x.clone()), deploy(x.clone())
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    assert err < 1e-9, f"silently wrong: relative error {err:.3g} ({[r.text for r in report.regions]})"
    named = {r.path for r in report.remaining if r.kind == "batchnorm"} | {r.path for r in report.kept}
    assert set(batchnorms(deploy)) <= named | {r.path for r in report.remaining}
    assert all(r.reason for r in report.remaining + report.kept)
    with torch.device("meta"):
        skeleton, _ = reparameterize(RandomNet(program, layout).double().eval())
    assert list(skeleton.state_dict()) == list(deploy.state_dict())
    return report


@settings(max_examples=60, deadline=None)
# Found by a sweep of 2000 programs: `m.relu_()` then `m.relu_().add_(...)` change m through an alias
# between the two reads of m by one region.
@example("conv2d", [("cat", 22, 22), ("add_", 32, 0), ("scale", 41, 27), ("relu_", 47, 31), ("neg", 28, 48),
                    ("add", 14, 9), ("add_", 11, 48), ("relu", 25, 35), ("wide", 48, 19), ("fbn", 9, 34)], 852)
@given(st.sampled_from(sorted(LAYOUTS)),
       st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(0, 50)), min_size=2, max_size=8),
       st.integers(0, 1000))
def test_random_programs_fold_exactly_or_refuse(layout, program, seed):
    run_program(program, layout, seed)


# --------------------------------------------------------------------------- the cases that were wrong

class TokenMLP(nn.Module):
    """Linear over the last dim of (N, L, C), then BatchNorm1d(L) over dim 1 (L == C here)."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(C, C), nn.BatchNorm1d(C)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x)))


class InPlaceAfterRead(nn.Module):
    """conv(t) read before t.relu_() and the identity read after it: one fold would read t once."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C)

    def forward(self, t):
        t = t * 1.0  # not the caller's tensor
        y = self.bn(self.conv(t))
        t.relu_()
        return y + t


class SelfConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(torch.cat([y, y], 1))


def _err(model, deploy, shape):
    """Relative error of the deploy model (weights fused in float32: floor ~1e-7) in float64."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ref, out = model.double()(x.clone()), deploy.double()(x.clone())
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_token_linear_then_batchnorm1d_is_refused_with_the_axis_reason():
    model = randomized(TokenMLP()).eval()
    deploy, report = reparameterize(model)
    assert _err(model, deploy, (2, C, C)) < 1e-6  # left as it was: exact
    assert batchnorms(deploy) == ["bn"]
    assert any("the same axis only on a 2-d input" in r.reason for r in report.remaining if r.path == "bn")


def test_in_place_change_between_reads_splits_the_region():
    model = randomized(InPlaceAfterRead()).eval()
    deploy, report = reparameterize(model)
    assert _err(model, deploy, (2, C, 6, 6)) < 1e-6
    # conv+bn still folds on its own; the add with the changed t is not merged into it
    assert [r.before for r in report.regions] == ["conv3x3+bn"]
    assert batchnorms(deploy) == []


def test_self_concat_computes_the_output_once():
    model = randomized(SelfConcat()).eval()
    deploy, report = reparameterize(model)
    assert _err(model, deploy, (1, C, 6, 6)) < 1e-6
    assert [r.after for r in report.regions] == ["conv3x3"]
    convs = [m for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].out_channels == 8  # not a 16-channel conv computing y twice
    assert sum(p.numel() for p in deploy.parameters()) <= sum(p.numel() for p in model.parameters())


def test_a_wrong_fold_is_an_error_also_without_verification(monkeypatch, tmp_path):
    """A bug in the algebra (here: fuse_bn forgets the BN bias) is caught by the float64
    per-region check: reparameterize raises, and `convert --no-verify` writes nothing (exit 2)."""
    from .helpers import run_cli

    real = A.fuse_bn

    def broken(k, bn, dtype=None):
        out = real(k, bn, dtype=dtype)
        return A.Kernel(out.weight, None, out.stride, out.padding, out.dilation, out.groups)

    model = randomized(SelfConcat()).eval()
    monkeypatch.setattr(A, "fuse_bn", broken)
    with pytest.raises(WrongFold, match="does not compute what its layers compute"):
        reparameterize(model)
    spec = tmp_path / "net.py"
    spec.write_text("from torch import nn\n\ndef build_model():\n"
                    "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())\n")
    ckpt, out = tmp_path / "net.pth", tmp_path / "net.safetensors"
    monkeypatch.setattr(A, "fuse_bn", real)
    assert run_cli("init", spec, "-o", ckpt).exit_code == 0
    monkeypatch.setattr(A, "fuse_bn", broken)
    result = run_cli("convert", ckpt, "--spec", spec, "-o", out, "--no-verify", "--input-shape", "1,3,8,8")
    assert result.exit_code == 2 and not out.exists()
    assert "does not compute what its layers compute" in result.output


def test_item_scale_is_not_folded_so_skeleton_and_model_agree():
    class ItemScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C)
            self.s = nn.Parameter(torch.tensor(8.0))

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) * self.s.item())

    model = randomized(ItemScale()).eval()
    deploy, report = reparameterize(model)
    assert _err(model, deploy, (1, C, 5, 5)) < 1e-6
    with torch.device("meta"):
        skeleton, _ = reparameterize(ItemScale().eval())
    assert list(skeleton.state_dict()) == list(deploy.state_dict())
    assert [r.before for r in report.regions] == ["conv1x1+bn"]  # the .item() scale stays a multiplication
