"""RepNeXt-style blocks: multi-scale depthwise conv -> pointwise expand -> act -> pointwise project,
plus a shortcut that deployment absorbs into the convs (seed paradigm 6b, shortcut re-parameterization).

Training block (`RepNeXtBlock`):

    y = pwconv2(act(pwconv1(feature(x))))        feature: sum of depthwise conv-BN branches (RepUnit)
    out = y + act(x)    (shortcut="act", the reference's activated shortcut)
    out = y + x         (shortcut="identity", a plain residual)

Deploy block: `block` = Sequential(dw', pw1', act, pw2') with no residual add. The shortcut rides
through extra, dirac-initialised channels (all built from `algebra`):

* dw' (groups C, 2C outputs): per channel c, [feature_c(x), x_c] (`concat_grouped` with an identity).
* pw1': [pwconv1 on the feature channels; the x channels passed on] (`sequential`, `select_channels`,
  `concat`).
* pw2': [pwconv2 on the activated expansion] + the activated x channels (`add`).

What is exact for which activation:

* shortcut="act": pw2' adds act(x) -- exactly the training block, for ANY elementwise activation.
  This is the seed's derivation (it puts the activation on the shortcut branch); C extra channels.
* shortcut="identity": the seed's construction would give act(x), not x, so it is wrong for every
  activation but the identity (ReLU, for instance, would drop the negative part of the residual).
  Instead pw1' passes +x and -x, and pw2' adds (act(x) - act(-x)) / c, which equals x exactly when
  act(x) - act(-x) = c * x for all x: ReLU (c = 1), LeakyReLU (1 + slope), GELU (erf and tanh
  forms, since Phi(x) + Phi(-x) = 1), SiLU, Hardswish, Softplus with `threshold=inf` (torch's
  default finite threshold makes it linear above the cut-off, off by up to log1p(exp(-threshold)) /
  beta, so it is refused) and Identity (c = 2). 2C extra channels. Every other activation (ReLU6, ELU, Mish,
  Sigmoid, Tanh, PReLU, ...) has no such exact form and the recipe refuses it (NotEquivalent).

Key names follow the reference RepNeXt of the re-parameterization paradigms notes (`feature.dwconv{i}`,
`feature.norm{i}`, `pwconv1`, `act`, `pwconv2`; deploy `block.0/1/3`; the network's
`downsample_layers`, `stages`, `head`). The reference's training RepUnit also carries an unused
`conv_repara` parameter; it is left out here (a standalone RepUnit deploys to `conv_repara`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from reparam_cli.blocks.registry import recipe
from reparam_cli.core import algebra as A
from reparam_cli.errors import NotEquivalent

# Activations by name (YAML specs), built without inplace so the shortcut never sees a modified x.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU,
    "hardswish": nn.Hardswish, "softplus": nn.Softplus, "elu": nn.ELU, "mish": nn.Mish, "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh, "identity": nn.Identity,
}
# Activations known to act on each element independently (safe to widen to more channels).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softsign, nn.Tanhshrink,
                nn.Identity)


def odd_part_slope(act: nn.Module) -> float | None:
    """c such that act(x) - act(-x) = c * x for every x, or None if there is no such constant."""
    if type(act) in (nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish):
        return 1.0
    if type(act) is nn.LeakyReLU:
        return 1.0 + act.negative_slope if act.negative_slope != -1.0 else None
    if type(act) is nn.Softplus:
        # (1/b) log(1 + e^{bx}) - (1/b) log(1 + e^{-bx}) = x, but torch's Softplus turns linear above a
        # finite `threshold`, which breaks the identity there: exact only with threshold = inf.
        return 1.0 if math.isinf(act.threshold) else None
    if type(act) is nn.Identity:
        return 2.0
    return None


def make_activation(act: str | nn.Module) -> nn.Module:
    if isinstance(act, nn.Module):
        return act
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]()


def _pair(k) -> tuple[int, int]:
    k = (k, k) if isinstance(k, int) else tuple(k)
    if len(k) != 2 or any(s % 2 == 0 for s in k):
        raise ValueError(f"depthwise kernel sizes must be odd (int or pair), got {k}")
    return k


class RepUnit(nn.Module):
    """Multi-scale depthwise conv: sum_i norm{i}(dwconv{i}(x)), each a depthwise conv + BN.

    The default branches are the reference's 7x7, 1x5 and 3x1. Deploys to one depthwise conv of the
    largest extent (`conv_repara`).
    """

    def __init__(self, dim: int, kernel_sizes: Sequence = ((7, 7), (1, 5), (3, 1)), stride: int = 1):
        super().__init__()
        self.dim = dim
        self.kernel_sizes = [_pair(k) for k in kernel_sizes]
        if not self.kernel_sizes:
            raise ValueError("RepUnit needs at least one branch")
        for i, (kh, kw) in enumerate(self.kernel_sizes, 1):
            self.add_module(f"dwconv{i}", nn.Conv2d(dim, dim, (kh, kw), stride, (kh // 2, kw // 2), groups=dim,
                                                    bias=False))
            self.add_module(f"norm{i}", nn.BatchNorm2d(dim, eps=1e-6))

    def branches(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        return [(getattr(self, f"dwconv{i}"), getattr(self, f"norm{i}")) for i in range(1, len(self.kernel_sizes) + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(norm(conv(x)) for conv, norm in self.branches())


class RepUnitDeploy(nn.Module):
    """Deploy form of a standalone RepUnit: one depthwise conv with bias (`conv_repara`)."""

    def __init__(self, conv_repara: nn.Module):
        super().__init__()
        self.conv_repara = conv_repara

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_repara(x)


def rep_unit_kernel(unit: RepUnit) -> A.Kernel:
    """P1 per branch, then P2/P4: the depthwise kernel (C, 1, kh, kw) the unit equals, in float64."""
    return A.add(*[A.fuse_bn(A.from_module(conv), bn, dtype=torch.float64) for conv, bn in unit.branches()])


@recipe(RepUnit, family="repnext")
def fuse_rep_unit(unit: RepUnit) -> nn.Module:
    """add(fuse_bn(dwconv_i, norm_i)) -> one depthwise conv."""
    return RepUnitDeploy(A.to_module(rep_unit_kernel(unit), dtype=unit.dwconv1.weight.dtype))


class RepNeXtBlock(nn.Module):
    """Training form: pwconv2(act(pwconv1(feature(x)))) + shortcut(x), shortcut act(x) or x.

    Args:
        dim: channels C (in == out; the block keeps the resolution).
        kernel_sizes: the RepUnit's depthwise branches (odd ints or (h, w) pairs).
        expansion: pwconv1 expands to expansion * C channels.
        act: activation name (see ACTIVATIONS) or module; elementwise.
        shortcut: "act" (the reference: act(x) is added) or "identity" (x is added).
    """

    def __init__(self, dim: int, kernel_sizes: Sequence = ((7, 7), (1, 5), (3, 1)), expansion: int = 4,
                 act: str | nn.Module = "gelu", shortcut: str = "act"):
        super().__init__()
        if shortcut not in ("act", "identity"):
            raise ValueError(f"shortcut must be 'act' or 'identity', got {shortcut!r}")
        self.dim = dim
        self.shortcut = shortcut
        self.feature = RepUnit(dim, kernel_sizes)
        self.pwconv1 = nn.Conv2d(dim, expansion * dim, 1)
        self.act = make_activation(act)
        self.pwconv2 = nn.Conv2d(expansion * dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.feature(x))))
        return y + (self.act(x) if self.shortcut == "act" else x)


class RepNeXtDeployBlock(nn.Module):
    """Deploy form: block = Sequential(dw', pw1', act, pw2'); no residual add."""

    def __init__(self, dw: nn.Module, pw1: nn.Module, act: nn.Module, pw2: nn.Module):
        super().__init__()
        self.block = nn.Sequential(dw, pw1, act, pw2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@recipe(RepNeXtBlock, family="repnext")
def fuse_repnext(block: RepNeXtBlock) -> nn.Module:
    """Shortcut re-parameterization (6b) over the fused RepUnit; see the module docstring."""
    c, act = block.dim, block.act
    if not isinstance(act, _ELEMENTWISE) and not (isinstance(act, nn.PReLU) and act.num_parameters == 1):
        raise NotEquivalent(f"{type(act).__name__} is not a known elementwise activation, so it cannot be "
                            "widened to the shortcut's channels")
    slope = None
    if block.shortcut == "identity":
        slope = odd_part_slope(act)
        if slope is None:
            raise NotEquivalent(
                f"a plain residual cannot pass through {type(act).__name__} exactly: act(x) - act(-x) is not "
                "a constant times x",
                hint="exact for ReLU, LeakyReLU, GELU, SiLU, Hardswish, Softplus(threshold=inf), Identity; or train with "
                     "shortcut='act'",
            )
    dtype = block.pwconv1.weight.dtype
    f64 = dict(dtype=torch.float64, device=block.pwconv1.weight.device)
    hidden = block.pwconv1.out_channels

    # dw': per channel (feature, x): channel 2i is the feature, 2i + 1 the shortcut.
    dw = A.concat_grouped(rep_unit_kernel(block.feature), A.identity(c, 1, groups=c, **f64))
    feat_idx, x_idx = range(0, 2 * c, 2), range(1, 2 * c, 2)
    # pw1': [pwconv1(feature channels); x] (+ [-x] for a plain residual).
    pw1_main = A.sequential(A.select_channels(2 * c, feat_idx, **f64), A.from_module(block.pwconv1, torch.float64))
    passes = [A.select_channels(2 * c, x_idx, **f64)]
    if slope is not None:
        passes.append(A.select_channels(2 * c, x_idx, scale=-1.0, **f64))
    pw1 = A.concat(pw1_main, *passes)
    # pw2': pwconv2 on the expansion + the shortcut: act(x), or (act(x) - act(-x)) / slope = x.
    width = hidden + c * len(passes)
    pw2_terms = [A.sequential(A.select_channels(width, range(hidden), **f64),
                              A.from_module(block.pwconv2, torch.float64))]
    if slope is None:
        pw2_terms.append(A.select_channels(width, range(hidden, hidden + c), **f64))
    else:
        pw2_terms.append(A.select_channels(width, range(hidden, hidden + c), scale=1.0 / slope, **f64))
        pw2_terms.append(A.select_channels(width, range(hidden + c, hidden + 2 * c), scale=-1.0 / slope, **f64))
    pw2 = A.add(*pw2_terms)
    return RepNeXtDeployBlock(A.to_module(dw, dtype=dtype), A.to_module(pw1, dtype=dtype), act,
                              A.to_module(pw2, dtype=dtype))


class RepNeXt(nn.Module):
    """A ConvNeXt-style classifier of RepNeXt blocks (the reference's layout).

    downsample_layers[0]: 4x4 stride-4 conv + BN (stem); downsample_layers[i > 0]: BN + 2x2 stride-2
    conv; stages[i]: depths[i] blocks of dims[i] channels; head: global average pool, flatten, linear.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), kernel_sizes: Sequence = ((7, 7), (1, 5), (3, 1)),
                 expansion: int = 4, act: str = "gelu", shortcut: str = "act"):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError("depths and dims need one entry per stage")
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4, bias=False), nn.BatchNorm2d(dims[0]))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(nn.Sequential(
                nn.BatchNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList(
            nn.Sequential(*[RepNeXtBlock(dims[i], kernel_sizes, expansion, act, shortcut) for _ in range(depths[i])])
            for i in range(len(dims))
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(x)
