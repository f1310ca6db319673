"""The structural re-parameterization paradigms as pure tensor functions.

Every function here works on a linear layer in *canonical form*, a `Kernel`: a weight, an
optional bias and the geometry that goes with them (stride, padding, dilation, groups). A conv
with `n` spatial dims has weight shape `(out, in // groups, *kernel_size)`; a fully connected
layer is the same thing with zero spatial dims, weight `(out, in)`. Padding may be negative,
meaning the input is cropped (ACNet's asymmetric branches do that).

Paradigm numbers follow `shared/seeds/paradigms.md`:

    P1  fuse_bn          conv (or FC) followed by BatchNorm
        scale_channels   conv (or FC) followed by a per-channel scale and shift (LayerScale, x * g + b)
    P2  add              parallel branches summed (P4: kernels of different sizes, centred)
    P3  concat           parallel branches concatenated along channels (concat_grouped: within groups)
    P5  sequential       1x1 -> kxk (P5a), kxk -> 1x1 (P5b), 1xk -> kx1 (P5c, axis-separable), with groups
        undilate         a dilated kernel as the undilated one with zeros between its taps
    P6a identity         x -> x as a kernel of any odd size and any groups (select_channels: a subset;
                         zero_pad: with padding, i.e. zero padding as a conv)
    P7  avgpool          average pooling as a depthwise conv
    P8  bn_as_conv       a lone BatchNorm as a conv
    P9  linear_as_conv / conv_as_linear   FC <-> pointwise conv
        conv_as_fc       a conv on a fixed-size input as one FC (RepMLP), repeat_bn for its BN
        refocus          RefConv: W_b + R(W_b), a conv over the weights themselves

Arithmetic is done in float64 and each result is cast back to the dtype of its inputs. Recipes
call `from_module(..., dtype=torch.float64)` so that a chain of paradigms stays in float64 and
only `to_module` casts to the checkpoint's dtype once, at the end. All functions also run on the
`meta` device (shapes only), which is how a deploy skeleton is built without any data.

Anything for which no exactly equivalent layer exists raises `NotEquivalent`; a wrong kernel is
never returned silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam_cli.errors import NotEquivalent

Ints = tuple[int, ...]


@dataclass(frozen=True)
class Kernel:
    """A conv (n spatial dims) or FC (0 spatial dims) layer in canonical form.

    weight: (out, in // groups, *kernel_size); bias: (out,) or None.
    stride, padding, dilation: one int per spatial dim; padding < 0 crops the input.
    """

    weight: Tensor
    bias: Tensor | None = None
    stride: Ints = ()
    padding: Ints = ()
    dilation: Ints = ()
    groups: int = 1

    def __post_init__(self) -> None:
        n = self.weight.dim() - 2
        if n < 0:
            raise NotEquivalent(f"a kernel weight needs at least 2 dims, got shape {tuple(self.weight.shape)}")
        for name in ("stride", "padding", "dilation"):
            value = getattr(self, name)
            if len(value) == 0 and n > 0:
                object.__setattr__(self, name, (0 if name == "padding" else 1,) * n)
            elif len(value) != n:
                raise NotEquivalent(f"{name} {value} does not match a weight with {n} spatial dims")
        if self.out_channels % self.groups:
            raise NotEquivalent(f"{self.out_channels} output channels do not split into {self.groups} groups")
        if self.bias is not None and tuple(self.bias.shape) != (self.out_channels,):
            raise NotEquivalent(f"bias of shape {tuple(self.bias.shape)} does not fit {self.out_channels} outputs")

    @property
    def ndim(self) -> int:
        """Number of spatial dims (0 for a fully connected layer)."""
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> Ints:
        return tuple(self.weight.shape[2:])

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def bias_or_zeros(self) -> Tensor:
        if self.bias is not None:
            return self.bias
        return self.weight.new_zeros(self.out_channels)

    def to(self, dtype: torch.dtype) -> "Kernel":
        """The same layer with weight and bias cast to `dtype`."""
        return replace(self, weight=self.weight.to(dtype), bias=None if self.bias is None else self.bias.to(dtype))


class BNParams(NamedTuple):
    """Eval-mode BatchNorm: y = (x - mean) / sqrt(var + eps) * weight + bias. weight/bias None if not affine."""

    mean: Tensor
    var: Tensor
    eps: float
    weight: Tensor | None = None
    bias: Tensor | None = None


# --------------------------------------------------------------------------- modules <-> kernels

def bn_params(bn: nn.modules.batchnorm._BatchNorm | BNParams) -> BNParams:
    """Read the eval-mode statistics of a BatchNorm module (1d/2d/3d)."""
    if isinstance(bn, BNParams):
        return bn
    if bn.running_mean is None or bn.running_var is None:
        raise NotEquivalent(
            f"{type(bn).__name__} has no running statistics (track_running_stats=False), "
            "so in eval mode it normalises by batch statistics and cannot be folded into a conv"
        )
    var = bn.running_var
    # sqrt(var + eps) of a non-positive number is NaN or 0: eval-mode BN itself is broken there.
    if not var.is_meta and bool((var.detach() + float(bn.eps) <= 0).any()):
        raise NotEquivalent(f"{type(bn).__name__} has running_var + eps <= 0 in "
                            f"{int((var.detach() + float(bn.eps) <= 0).sum())} channel(s): its eval-mode output is "
                            "not finite, so there is nothing to fold", hint="check the checkpoint's BatchNorm statistics")
    return BNParams(bn.running_mean, var, float(bn.eps), bn.weight, bn.bias)


def from_module(layer: nn.Module, dtype: torch.dtype | None = None) -> Kernel:
    """The canonical form of an nn.Conv1d/2d/3d or nn.Linear (optionally cast, e.g. to float64)."""
    if isinstance(layer, nn.Linear):
        k = Kernel(layer.weight, layer.bias)
    elif isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
        if layer.padding_mode != "zeros":
            raise NotEquivalent(f"padding_mode={layer.padding_mode!r} convs are not supported, only zero padding")
        if isinstance(layer.padding, str):
            padding = _string_padding(layer)
        else:
            padding = tuple(layer.padding)
        k = Kernel(layer.weight, layer.bias, tuple(layer.stride), padding, tuple(layer.dilation), layer.groups)
    else:
        raise NotEquivalent(f"{type(layer).__name__} is not a conv or linear layer")
    return k.to(dtype) if dtype is not None else k


def _string_padding(conv: nn.modules.conv._ConvNd) -> Ints:
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    return same_padding(conv.kernel_size, conv.dilation)


def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> Ints:
    """padding='same' (stride 1) as per-dim symmetric padding: d * (k - 1) / 2. torch pads
    (total // 2) before and the rest after, so an odd total (even effective kernel) has no Kernel."""
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            raise NotEquivalent("padding='same' with an even effective kernel pads asymmetrically; not supported")
        pads.append(total // 2)
    return tuple(pads)


def to_module(k: Kernel, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> nn.Module:
    """A fresh nn.Linear (0 spatial dims) or nn.ConvNd holding the kernel, with a bias, cast to `dtype`."""
    dtype = dtype or k.dtype
    device = device or k.weight.device
    bias = k.bias_or_zeros()
    weight = k.weight
    if k.ndim == 0:
        weight = _dense_weight(k)
        layer: nn.Module = nn.Linear(k.in_channels, k.out_channels, bias=True, device="meta")
    else:
        if any(p < 0 for p in k.padding):
            raise NotEquivalent(f"the fused kernel needs negative padding {k.padding} (a crop), which no conv layer has")
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(k.ndim)
        if conv_cls is None:
            raise NotEquivalent(f"{k.ndim}-d convs are not supported")
        layer = conv_cls(
            k.in_channels, k.out_channels, k.kernel_size, stride=k.stride, padding=k.padding,
            dilation=k.dilation, groups=k.groups, bias=True, device="meta",
        )
    # Built on meta and assigned, so no random initialisation is computed only to be overwritten.
    layer.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype))
    layer.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype))
    return layer


def apply(k: Kernel, x: Tensor) -> Tensor:
    """Run the layer a kernel describes on `x` of shape (N, in, *spatial) (or (N, in) for an FC).

    The reference forward used by tests and by kernel-building paradigms; negative padding crops.
    """
    w, b = k.weight.to(x.dtype), None if k.bias is None else k.bias.to(x.dtype)
    if k.ndim == 0:
        return F.linear(x, _dense_weight(k).to(x.dtype), b)
    pads = [q for p in reversed(k.padding) for q in (p, p)]
    if any(pads):
        x = F.pad(x, pads)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k.ndim]
    return conv(x, w, b, k.stride, 0, k.dilation, k.groups)


# --------------------------------------------------------------------------- helpers

def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float64)


def _out_dtype(*kernels: Kernel) -> torch.dtype:
    return kernels[0].dtype


def regroup(k: Kernel, groups: int) -> Kernel:
    """The same layer expressed with fewer groups (`groups` must divide k.groups); groups=1 is dense.

    A grouped conv is a dense conv whose weight is block-diagonal over channel groups; this writes
    out those zero blocks. Used to add or chain layers whose group counts differ.
    """
    if groups == k.groups:
        return k
    if groups <= 0 or k.groups % groups:
        raise NotEquivalent(f"a conv with {k.groups} groups cannot be written with {groups} groups")
    ratio = k.groups // groups  # old groups folded into each new group
    out_g, in_g = k.out_channels // k.groups, k.weight.shape[1]
    old = k.weight.reshape(groups, ratio, out_g, in_g, *k.kernel_size)
    new = old.new_zeros((groups, ratio, out_g, ratio, in_g, *k.kernel_size))
    # Old group r of new group j maps its inputs r*in_g.. to its outputs r*out_g..: the diagonal blocks.
    new.diagonal(dim1=1, dim2=3).copy_(old.movedim(1, -1))
    w = new.reshape(k.out_channels, ratio * in_g, *k.kernel_size)
    return replace(k, weight=w, groups=groups)


def _dense_weight(k: Kernel) -> Tensor:
    return regroup(k, 1).weight if k.groups > 1 else k.weight


def _common_groups(kernels: Sequence[Kernel]) -> int:
    return math.gcd(*[k.groups for k in kernels])


def _check_same(kernels: Sequence[Kernel], what: str) -> None:
    first = kernels[0]
    for k in kernels[1:]:
        if k.ndim != first.ndim:
            raise NotEquivalent(f"cannot {what} a {first.ndim}-d and a {k.ndim}-d layer")
        if k.in_channels != first.in_channels:
            raise NotEquivalent(f"cannot {what} layers with {first.in_channels} and {k.in_channels} input channels")
        if k.stride != first.stride:
            raise NotEquivalent(f"cannot {what} branches with strides {first.stride} and {k.stride}: their sliding windows differ")
    dilations = {k.dilation for k in kernels if not _is_pointwise(k)}
    if len(dilations) > 1:
        raise NotEquivalent(f"cannot {what} branches with dilations {sorted(dilations)}")


def _is_pointwise(k: Kernel) -> bool:
    return all(s == 1 for s in k.kernel_size)


@dataclass(frozen=True)
class _Window:
    kernel_size: Ints
    stride: Ints
    padding: Ints
    dilation: Ints


def _union_window(kernels: Sequence[Kernel], what: str) -> tuple[_Window, list[Ints]]:
    """The common window of parallel branches (P4) and each kernel's offset inside it.

    Branch i reads input positions [o*s - p_i, o*s - p_i + d*(k_i - 1)] for output o. The branches
    only produce outputs of equal size for every input size when 2*p_i - d*(k_i - 1) is the same
    for all i; then the union window is centred and each kernel sits (P - p_i) / d taps in from
    each side, where P is the largest padding.
    """
    _check_same(kernels, what)
    n = kernels[0].ndim
    # A pointwise kernel's dilation is irrelevant: adopt that of the others.
    dilation = next((k.dilation for k in kernels if not _is_pointwise(k)), kernels[0].dilation)
    target_pad, target_size = [], []
    for dim in range(n):
        d = dilation[dim]
        spans = {2 * k.padding[dim] - d * (k.kernel_size[dim] - 1) for k in kernels}
        if len(spans) > 1:
            sizes = ", ".join(f"{k.kernel_size[dim]}(pad {k.padding[dim]})" for k in kernels)
            raise NotEquivalent(
                f"cannot {what} branches whose outputs differ in size along dim {dim}: kernel sizes {sizes}",
                hint="each branch must satisfy 2*padding - dilation*(kernel-1) = the same value",
            )
        pad = max(k.padding[dim] for k in kernels)
        target_pad.append(pad)
        target_size.append(max(k.kernel_size[dim] + 2 * (pad - k.padding[dim]) // d for k in kernels))
    offsets = []
    for k in kernels:
        gaps = [target_pad[dim] - k.padding[dim] for dim in range(n)]
        if any(gap % dilation[dim] for dim, gap in enumerate(gaps)):
            raise NotEquivalent(f"cannot {what}: padding {k.padding} is off the dilation grid {dilation} of the other branches")
        offsets.append(tuple(gap // dilation[dim] for dim, gap in enumerate(gaps)))
    window = _Window(tuple(target_size), kernels[0].stride, tuple(target_pad), dilation)
    return window, offsets


def _align(kernels: Sequence[Kernel], what: str) -> list[Kernel]:
    """Zero-pad every kernel to the union of their windows so all share one padding (P4)."""
    window, offsets = _union_window(kernels, what)
    aligned = []
    for k, offset in zip(kernels, offsets):
        pads = [q for o in reversed(offset) for q in (o, o)]
        w = F.pad(k.weight, pads) if any(pads) else k.weight
        aligned.append(replace(k, weight=w, padding=window.padding, dilation=window.dilation))
    return aligned


# --------------------------------------------------------------------------- paradigms

def _bn_scale_shift(k: Kernel, bn: nn.modules.batchnorm._BatchNorm | BNParams) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as y = x * scale + shift per channel, in float64: scale = gamma / sqrt(var + eps)."""
    p = bn_params(bn)
    if p.mean.shape[0] != k.out_channels:
        raise NotEquivalent(f"a BatchNorm over {p.mean.shape[0]} channels cannot follow a layer with {k.out_channels} outputs")
    if p.var.is_meta:  # shape-only (a model built on meta): no values to compute
        return (torch.empty(p.mean.shape, dtype=torch.float64, device="meta"),) * 2
    scale = torch.rsqrt(p.var.to(torch.float64) + p.eps)
    if p.weight is not None:
        scale = scale * p.weight.to(torch.float64)
    shift = -p.mean.to(torch.float64) * scale
    if p.bias is not None:
        shift = shift + p.bias.to(torch.float64)
    return scale, shift


def fuse_bn(k: Kernel, bn: nn.modules.batchnorm._BatchNorm | BNParams, dtype: torch.dtype | None = None) -> Kernel:
    """P1: a conv or FC followed by an eval-mode BatchNorm, as one layer.

    W' = W * gamma / sqrt(var + eps) (per output channel); b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    BatchNorm without affine parameters uses gamma = 1, beta = 0. The result has `dtype` (default:
    the kernel's); recipes ask for float64 to keep a chain of paradigms in float64, which costs one
    float64 copy of the weight rather than two (converting first, then scaling a copy). When the
    result only feeds `add`, `fuse_bn_lazy` avoids even that copy.
    """
    scale, shift = _bn_scale_shift(k, bn)
    scale_w = scale.reshape(-1, *([1] * (k.weight.dim() - 1)))
    if torch.is_grad_enabled() and (k.weight.requires_grad or scale.requires_grad):
        w = k.weight.to(torch.float64) * scale_w  # keeps the derivation differentiable
    else:  # one float64 allocation for the (possibly huge) weight, scaled in place. (Not
        # torch.mul(..., out=w): with mixed dtypes that takes a Python path importing torch._dynamo.)
        w = k.weight.to(torch.float64, copy=True).mul_(scale_w)
    b = k.bias_or_zeros().to(torch.float64) * scale + shift
    dtype = dtype or k.dtype
    return replace(k, weight=w.to(dtype), bias=b.to(dtype))


def scale_channels(k: Kernel, scale: Tensor | float | None = None, shift: Tensor | float | None = None) -> Kernel:
    """P1 without statistics: the layer followed by y = x * scale + shift per output channel.

    scale, shift: a number or a tensor of `k.out_channels` values (any shape with that many
    elements, e.g. (C,) or LayerScale's (C, 1, 1)); None means 1 and 0. The result keeps the
    kernel's geometry and dtype: W' = W * scale (per output row), b' = b * scale + shift.
    """
    def per_channel(value: Tensor | float, what: str) -> Tensor:
        t = torch.as_tensor(value, dtype=torch.float64, device=k.weight.device).reshape(-1)
        if t.numel() == 1:
            return t.expand(k.out_channels)
        if t.numel() != k.out_channels:
            raise NotEquivalent(f"a {what} of {t.numel()} values cannot follow a layer with {k.out_channels} outputs")
        return t

    s = per_channel(1.0 if scale is None else scale, "scale")
    w = k.weight.to(torch.float64) * s.reshape(-1, *([1] * (k.weight.dim() - 1)))
    b = k.bias_or_zeros().to(torch.float64) * s
    if shift is not None:
        b = b + per_channel(shift, "shift")
    has_bias = k.bias is not None or shift is not None
    return replace(k, weight=w.to(k.dtype), bias=b.to(k.dtype) if has_bias else None)


class ScaledKernel(NamedTuple):
    """P1 not yet applied to the weight: the layer is `kernel` with each output row of its weight
    multiplied by `scale` (float64); the bias is already fused. Only `add` accepts it: it multiplies
    a few rows at a time inside its float64 accumulator, so a big weight is never copied whole."""

    kernel: Kernel
    scale: Tensor

    @property
    def out_channels(self) -> int:
        return self.kernel.out_channels

    def materialize(self) -> Kernel:
        """The fused Kernel in float64 (what `fuse_bn(..., dtype=float64)` returns)."""
        w = self.kernel.weight.to(torch.float64) * self.scale.reshape(-1, *([1] * (self.kernel.weight.dim() - 1)))
        return replace(self.kernel, weight=w)


def fuse_bn_lazy(k: Kernel, bn: nn.modules.batchnorm._BatchNorm | BNParams) -> ScaledKernel:
    """P1 for a branch that goes straight into `add`: the same layer as `fuse_bn(k, bn)`, with the
    weight left as it is (no copy) and its per-row float64 scale applied later by `add`."""
    scale, shift = _bn_scale_shift(k, bn)
    return ScaledKernel(replace(k, bias=k.bias_or_zeros().to(torch.float64) * scale + shift), scale)


def _accumulate(weight: Tensor, chunk: Tensor, rows: int, kernels: Sequence[Kernel],
                scales: Sequence[Tensor | None], windows) -> None:
    """weight[rows...] = sum of each kernel (times its row scale) at its window, summed in the float64 `chunk`."""
    full = tuple(weight.shape[2:])
    # A branch that covers the whole window initialises the accumulator (copy, scale in place):
    # one pass fewer over the biggest weight than zero-filling and adding it.
    base = next((i for i, k in enumerate(kernels) if tuple(k.kernel_size) == full), None)
    for start in range(0, weight.shape[0], rows):
        stop = min(start + rows, weight.shape[0])
        acc = chunk[: stop - start]
        if base is None:
            acc.zero_()
        else:
            acc.copy_(kernels[base].weight[start:stop])
            if scales[base] is not None:
                acc.mul_(scales[base][start:stop].reshape(-1, *([1] * (acc.dim() - 1))))
        # Each other branch lands in the centred slice of the accumulator: no padded copies.
        for i, (k, scale, window) in enumerate(zip(kernels, scales, windows)):
            if i == base:
                continue
            part = k.weight[start:stop]
            if scale is not None:
                part = part * scale[start:stop].reshape(-1, *([1] * (part.dim() - 1)))  # float64, one chunk
            acc[(slice(None), slice(None), *window)] += part
        weight[start:stop] = acc


def add(*kernels: Kernel | ScaledKernel, dtype: torch.dtype | None = None) -> Kernel:
    """P2/P4: parallel branches whose outputs are summed, as one layer.

    Kernels of different sizes are zero-padded to the largest window (centred, see `_align`);
    kernels of different dilations are first written out undilated (`undilate`: a k x k kernel with
    dilation d is a (d(k-1)+1)-kernel with zeros between its taps); different group counts are
    brought to their greatest common divisor. The sum is taken in float64 and the result has
    `dtype` (default: the first kernel's). Recipes pass the checkpoint's dtype: the float64 sum is
    then formed a few output channels at a time and written straight into
    the result, so no full-size float64 accumulator is allocated (it would be the largest buffer of
    a conversion). Branches may be `ScaledKernel`s (from `fuse_bn_lazy`): their BN scale is applied
    in the same chunks, so their weights are never copied whole either.
    """
    if not kernels:
        raise NotEquivalent("add() needs at least one kernel")
    scales = [k.scale if isinstance(k, ScaledKernel) else None for k in kernels]
    plain = [k.kernel if isinstance(k, ScaledKernel) else k for k in kernels]
    if len({k.dilation for k in plain if not _is_pointwise(k)}) > 1:
        # Branches with different dilations (UniRepLKNet's dilated re-parameterization): each dilated
        # kernel is the larger undilated one with zeros between its taps, then they add as usual (P4).
        plain = [k if _is_pointwise(k) else undilate(k) for k in plain]
    outs = {k.out_channels for k in plain}
    if len(outs) > 1:
        raise NotEquivalent(f"cannot add branches with {sorted(outs)} output channels")
    g = _common_groups(plain)
    regrouped = [regroup(k, g) for k in plain]  # regrouping keeps the output rows, so scales still apply
    target, offsets = _union_window(regrouped, "add")
    dtype = dtype or (torch.float64 if scales[0] is not None else _out_dtype(*plain))
    first = regrouped[0]
    shape = (first.out_channels, first.weight.shape[1], *target.kernel_size)
    weight = torch.empty(shape, dtype=dtype, device=first.weight.device)
    # ~16 MB of float64 per chunk (one chunk on meta, where there is no data to move).
    per_row = max(1, math.prod(shape[1:]))
    rows = shape[0] if weight.is_meta else max(1, (1 << 21) // per_row)
    windows = [tuple(slice(o, o + size) for o, size in zip(offset, k.kernel_size))
               for k, offset in zip(regrouped, offsets)]
    chunk = torch.empty((min(rows, shape[0]), *shape[1:]), dtype=torch.float64, device=weight.device)
    if not weight.is_meta:  # (on meta the shapes above are the whole answer)
        with torch.no_grad():  # buffers filled in place: a conversion, not a differentiable op
            _accumulate(weight, chunk, rows, regrouped, scales, windows)
    biases = [k.bias.to(torch.float64) for k in regrouped if k.bias is not None]
    bias = sum(biases) if biases else None
    return Kernel(weight, None if bias is None else bias.to(dtype), target.stride, target.padding,
                  target.dilation, g)


def concat(*kernels: Kernel) -> Kernel:
    """P3: parallel branches whose outputs are concatenated along channels, as one layer.

    Grouped branches are written out densely first: the concatenated output is ordered by branch,
    not by group, so no grouped conv reproduces it.
    """
    if not kernels:
        raise NotEquivalent("concat() needs at least one kernel")
    g = 1 if len(kernels) > 1 else kernels[0].groups
    aligned = _align([regroup(k.to(torch.float64), g) for k in kernels], "concatenate")
    weight = torch.cat([k.weight for k in aligned], 0)
    any_bias = any(k.bias is not None for k in aligned)
    bias = torch.cat([k.bias_or_zeros() for k in aligned]) if any_bias else None
    dtype = _out_dtype(*kernels)
    return replace(aligned[0], weight=weight.to(dtype), bias=None if bias is None else bias.to(dtype))


def _compose_weights(outer: Tensor, inner: Tensor, groups: int) -> Tensor:
    """Per group, contract the channel dims: result[e, c, ...] = sum_d outer[e, d, ...] * inner[d, c, ...].

    One of the two is pointwise (its spatial dims are all 1) and broadcasts over the other's.
    """
    e, d_g = outer.shape[:2]
    d, c_g = inner.shape[:2]
    o = outer.reshape(groups, e // groups, d_g, -1)
    i = inner.reshape(groups, d // groups, c_g, -1)
    spatial = outer.shape[2:] if o.shape[-1] >= i.shape[-1] else inner.shape[2:]
    if o.shape[-1] == 1:
        out = torch.einsum("gedx,gdcs->gecs", o, i)
    else:
        out = torch.einsum("geds,gdcx->gecs", o, i)
    return out.reshape(e, c_g, *spatial)


def sequential(first: Kernel, second: Kernel) -> Kernel:
    """P5: `second(first(x))` as one layer, where one of the two is pointwise (1x1).

    P5a (first is 1x1, stride 1): the result has second's kernel size, stride and dilation and
    padding first.padding + second.padding. If first has a bias and second pads with zeros, the
    border outputs of the original see zeros where the fused conv would see the bias, so this is
    refused. Pad *before* the 1x1 instead (padding on `first`): a 1x1 conv of a zero ring is its
    bias, which is exactly what DBB's BNAndPad layer does.

    P5b (second is 1x1 without padding): the result has first's geometry; strides multiply and
    the bias is second.W @ first.b + second.b, exact everywhere.

    Groups: equal group counts are kept; otherwise both are written out densely.
    """
    if first.ndim != second.ndim:
        raise NotEquivalent(f"cannot chain a {first.ndim}-d and a {second.ndim}-d layer")
    if second.in_channels != first.out_channels:
        raise NotEquivalent(
            f"cannot chain a layer with {first.out_channels} outputs into one with {second.in_channels} inputs"
        )
    g = first.groups if first.groups == second.groups else 1
    a, b = regroup(first.to(torch.float64), g), regroup(second.to(torch.float64), g)
    dtype = _out_dtype(first, second)

    if _is_pointwise(a) and all(s == 1 for s in a.stride):
        if a.bias is not None and any(p > 0 for p in b.padding):
            raise NotEquivalent(
                "a bias before a zero-padded conv makes the borders differ from any single conv",
                hint="pad before the 1x1 layer (as DBB's BNAndPad does), or drop the bias",
            )
        weight = _compose_weights(b.weight, a.weight, g)
        bias = b.bias_or_zeros()
        if a.bias is not None:
            w_sum = b.weight.reshape(b.out_channels, b.weight.shape[1], -1).sum(-1)  # (E, D/g)
            bias = bias + torch.einsum("ged,gd->ge", w_sum.reshape(g, -1, w_sum.shape[1]),
                                       a.bias.reshape(g, -1)).reshape(-1)
        has_bias = a.bias is not None or b.bias is not None
        padding = tuple(p + q for p, q in zip(a.padding, b.padding))
        out = Kernel(weight, bias if has_bias else None, b.stride, padding, b.dilation, g)
    elif _is_pointwise(b):
        if any(p != 0 for p in b.padding):
            raise NotEquivalent("a padded 1x1 conv after a kxk conv has no single-conv equivalent")
        weight = _compose_weights(b.weight, a.weight, g)
        bias = None
        if a.bias is not None or b.bias is not None:
            w2 = b.weight.reshape(g, b.out_channels // g, -1)
            bias = b.bias_or_zeros() + torch.einsum("ged,gd->ge", w2, a.bias_or_zeros().reshape(g, -1)).reshape(-1)
        stride = tuple(s * t for s, t in zip(a.stride, b.stride))
        out = Kernel(weight, bias, stride, a.padding, a.dilation, g)
    elif _axis_separable(a, b):
        out = _sequential_separable(a, b, g)
    else:
        raise NotEquivalent(
            "chaining two kxk convs grows the kernel; only 1x1 -> kxk, kxk -> 1x1 and 1xk -> kx1 are fused",
            hint="first must be 1x1 with stride 1, or second 1x1 without padding, or the two act on different axes",
        )
    return out.to(dtype)


def _trivial_dims(k: Kernel) -> list[bool]:
    """Per spatial dim: whether the layer leaves it alone (size 1, stride 1, no padding)."""
    return [size == 1 and s == 1 and p == 0 for size, s, p in zip(k.kernel_size, k.stride, k.padding)]


def _axis_separable(first: Kernel, second: Kernel) -> bool:
    """P5c applies: in every spatial dim at least one of the two layers is trivial, and a bias of
    `first` never meets `second`'s zero padding (that would make the borders differ)."""
    pairs = list(zip(_trivial_dims(first), _trivial_dims(second)))
    if not all(t1 or t2 for t1, t2 in pairs):
        return False
    return first.bias is None or all(p == 0 for p in second.padding)


def _sequential_separable(a: Kernel, b: Kernel, groups: int) -> Kernel:
    """P5c: `b(a(x))` where each spatial dim is worked on by one of the two (e.g. 1xk then kx1).

    Exact with zero padding: where `b` pads a dim, `a` is trivial in it, so `a`'s output outside
    the map along that dim would read only padding (zeros) anyway. The weight is, per group, the
    channel contraction of the two with each dim's taps taken from the layer that has them:
    w[e, c, ...] = sum_d b[e, d, ...] * a[d, c, ...] (size-1 dims broadcast).
    """
    e, d_g = b.weight.shape[:2]
    d, c_g = a.weight.shape[:2]
    n = a.ndim
    outer = b.weight.reshape(groups, e // groups, d_g, 1, *b.kernel_size)
    inner = a.weight.reshape(groups, 1, d // groups, c_g, *a.kernel_size)
    weight = (outer * inner).sum(2).reshape(e, c_g, *[max(x, y) for x, y in zip(a.kernel_size, b.kernel_size)])
    bias = None
    if a.bias is not None or b.bias is not None:
        taps = b.weight.reshape(groups, e // groups, d_g, -1).sum(-1)  # b applied to a constant map
        bias = b.bias_or_zeros() + torch.einsum("ged,gd->ge", taps, a.bias_or_zeros().reshape(groups, -1)).reshape(-1)
    ta = _trivial_dims(a)
    pick = [(a if not ta[i] else b) for i in range(n)]
    stride = tuple(x * y for x, y in zip(a.stride, b.stride))
    padding = tuple(pick[i].padding[i] for i in range(n))
    dilation = tuple(pick[i].dilation[i] for i in range(n))
    return Kernel(weight, bias, stride, padding, dilation, groups)


def undilate(k: Kernel) -> Kernel:
    """A dilated conv as the same conv with dilation 1: its taps spread out with zeros between them.

    Weight (O, I/g, *k) with dilation d -> (O, I/g, *(d * (k - 1) + 1)); stride, padding and groups
    are unchanged, so it can be added to undilated branches of the same window (P4).
    """
    if all(d == 1 for d in k.dilation):
        return k
    size = [d * (s - 1) + 1 for s, d in zip(k.kernel_size, k.dilation)]
    weight = k.weight.new_zeros((*k.weight.shape[:2], *size))
    weight[(slice(None), slice(None), *[slice(None, None, d) for d in k.dilation])] = k.weight
    return replace(k, weight=weight, dilation=(1,) * k.ndim)


def identity(
    channels: int, kernel_size: int | Sequence[int] = 1, groups: int = 1, ndim: int = 2,
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
) -> Kernel:
    """P6a: the identity map x -> x as a conv with odd `kernel_size` (int or per dim) and `groups`.

    Weight (channels, channels // groups, *k) is 1 at [i, i % (channels // groups), centre], padding k // 2.
    """
    ks = (kernel_size,) * ndim if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != ndim:
        raise NotEquivalent(f"kernel_size {ks} does not have {ndim} dims")
    if any(s % 2 == 0 or s < 1 for s in ks):
        raise NotEquivalent(
            f"an identity has no centred tap in a kernel of size {ks}",
            hint="use an odd size (an even kernel never keeps the spatial size with symmetric padding)",
        )
    if channels % groups:
        raise NotEquivalent(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    w = torch.zeros((channels, per_group, *ks), dtype=dtype, device=device)
    centre = tuple(s // 2 for s in ks)
    if not w.is_meta:
        idx = torch.arange(channels, device=device)
        w[(idx, idx % per_group, *[torch.full_like(idx, c) for c in centre])] = 1
    return Kernel(w, None, (1,) * ndim, centre, (1,) * ndim, groups)


def zero_pad(
    channels: int, padding: Sequence[int], ndim: int | None = None,
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
) -> Kernel:
    """Zero padding (nn.ZeroPad2d, F.pad with zeros) as P6a's 1x1 depthwise identity conv whose
    padding is `padding` (one symmetric amount per spatial dim). Composed before a conv (P5a) it
    adds to that conv's padding; after a layer with a bias, `sequential` refuses it (the ring is zero,
    not the bias)."""
    pd = tuple(padding)
    if ndim is not None and len(pd) != ndim:
        raise NotEquivalent(f"padding {pd} does not have {ndim} dims")
    if any(p < 0 for p in pd):
        raise NotEquivalent(f"negative padding {pd} crops, which no conv layer does")
    return replace(identity(channels, 1, channels, len(pd), dtype=dtype, device=device), padding=pd)


def bn_as_conv(
    bn: nn.modules.batchnorm._BatchNorm | BNParams, kernel_size: int | Sequence[int] = 1,
    groups: int | None = None, ndim: int = 2, dtype: torch.dtype | None = None,
) -> Kernel:
    """P8: a BatchNorm on its own as a conv (an identity conv, P6a, followed by the BN, P1).

    groups defaults to depthwise (one per channel), the cheapest form; `add` regroups as needed.
    The result has the BN's dtype unless `dtype` says otherwise (recipes keep float64).
    """
    p = bn_params(bn)
    channels = p.mean.shape[0]
    k = identity(channels, kernel_size, groups or channels, ndim, dtype=torch.float64, device=p.mean.device)
    return fuse_bn(k, p).to(dtype or p.mean.dtype)


def avgpool(
    channels: int, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0, ndim: int = 2, count_include_pad: bool = True,
    ceil_mode: bool = False, divisor_override: int | None = None,
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
) -> Kernel:
    """P7: AvgPool over `channels` as a depthwise conv with weight 1 / prod(kernel_size).

    Refused where pooling and conv differ: ceil_mode (partial windows), and padding without
    count_include_pad (the divisor then changes at the borders).
    """
    ks = (kernel_size,) * ndim if isinstance(kernel_size, int) else tuple(kernel_size)
    st = ks if stride is None else ((stride,) * ndim if isinstance(stride, int) else tuple(stride))
    pd = (padding,) * ndim if isinstance(padding, int) else tuple(padding)
    if ceil_mode:
        raise NotEquivalent("an average pool with ceil_mode=True has partial windows that no conv reproduces")
    if any(pd) and not count_include_pad and divisor_override is None:
        raise NotEquivalent("a padded average pool with count_include_pad=False divides by fewer taps at the borders")
    divisor = divisor_override or math.prod(ks)
    w = torch.full((channels, 1, *ks), 1.0 / divisor, dtype=dtype, device=device)
    return Kernel(w, None, st, pd, (1,) * ndim, channels)


def linear_as_conv(k: Kernel, ndim: int = 2) -> Kernel:
    """P9: a fully connected layer (0 spatial dims) as a pointwise conv with `ndim` spatial dims."""
    if k.ndim != 0:
        raise NotEquivalent(f"linear_as_conv expects a fully connected layer, got a {k.ndim}-d conv")
    w = k.weight.reshape(*k.weight.shape, *([1] * ndim))
    return Kernel(w, k.bias, (1,) * ndim, (0,) * ndim, (1,) * ndim, k.groups)


def conv_as_linear(k: Kernel) -> Kernel:
    """P9: a pointwise conv (1x1, stride 1, no padding) as a fully connected layer (groups written out)."""
    if not _is_pointwise(k) or any(s != 1 for s in k.stride) or any(k.padding):
        raise NotEquivalent(
            f"only a 1x1 conv with stride 1 and no padding is an FC; got kernel {k.kernel_size}, "
            f"stride {k.stride}, padding {k.padding}"
        )
    w = _dense_weight(k).reshape(k.out_channels, k.in_channels)
    return Kernel(w, k.bias)


def conv_as_fc(k: Kernel, in_shape: Sequence[int]) -> Kernel:
    """A conv applied to inputs of fixed shape (C, *spatial), as one FC on the flattened input (RepMLP).

    The FC matrix is the conv applied to the identity: column j of the FC is the flattened response
    to the one-hot input j. The result keeps the conv's groups, as a grouped FC (0 spatial dims):
    channel groups are contiguous blocks of the flattened (C, *spatial) input and (out, *out_spatial)
    output, so group i of the FC maps the flattened inputs of conv group i to its outputs.
    Weight (out * prod(out_spatial), C // groups * prod(spatial)), bias repeated per output position.

    Cost: the one-hot batch is (C/g * prod(spatial), C, *spatial), every group answering the same
    one-hot at once, so a depthwise conv costs prod(spatial)^2 * C rather than (C * prod(spatial))^2.
    """
    in_shape = tuple(in_shape)
    if len(in_shape) != k.ndim + 1 or in_shape[0] != k.in_channels:
        raise NotEquivalent(f"input shape {in_shape} does not fit a conv over {k.in_channels} channels, {k.ndim}-d")
    dtype, g = k.dtype, k.groups
    k64 = k.to(torch.float64)
    spatial = in_shape[1:]
    n = (in_shape[0] // g) * math.prod(spatial)  # flattened inputs per group
    # One-hot j of a group's flattened input, repeated in every group: (n, g, C/g * spatial) -> (n, C, *spatial).
    eye = torch.eye(n, dtype=torch.float64, device=k.weight.device)
    ones = eye.unsqueeze(1).expand(n, g, n).reshape(n, *in_shape)
    response = apply(replace(k64, bias=None), ones)  # (n, out, *out_spatial)
    out_spatial = response.shape[2:]
    # Row block i of the FC is group i's response: (g, out/g * out_spatial, n).
    w = response.reshape(n, g, -1).permute(1, 2, 0).reshape(-1, n).contiguous()
    bias = None
    if k.bias is not None:
        bias = k64.bias.repeat_interleave(math.prod(out_spatial))
    return Kernel(w.to(dtype), None if bias is None else bias.to(dtype), groups=g)


def repeat_bn(bn: nn.modules.batchnorm._BatchNorm | BNParams, repeats: int) -> BNParams:
    """A BatchNorm over C channels seen as one over C * repeats channels, each repeated `repeats` times.

    For a layer whose outputs are viewed as (N, C, *rest) before a BatchNorm over C (RepMLP's FC3
    and its BN over share-sets): the BN acts on channel c // repeats of the flat output, so P1
    (`fuse_bn`) applies with the statistics repeated channel-major.
    """
    p = bn_params(bn)

    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.repeat_interleave(repeats)

    return BNParams(rep(p.mean), rep(p.var), p.eps, rep(p.weight), rep(p.bias))


def refocus(base: Kernel, refocuser: Kernel) -> Kernel:
    """RefConv: the conv whose weight is W_b + R(W_b), R a conv applied to the base weights themselves.

    The base weight (out, in/g, *k) is read as one image of out * in/g channels (one per 2-d kernel)
    and spatial size k; `refocuser` (stride 1, 'same' padding, no bias) maps it to an image of the
    same shape, which is added back (the identity term of the refocusing transformation). The result
    has the base's geometry and bias.
    """
    n2d = base.weight.shape[0] * base.weight.shape[1]
    if refocuser.ndim != base.ndim or refocuser.in_channels != n2d or refocuser.out_channels != n2d:
        raise NotEquivalent(
            f"a refocusing conv over {refocuser.in_channels} -> {refocuser.out_channels} kernels does not fit "
            f"a base weight of shape {tuple(base.weight.shape)} ({n2d} kernels)"
        )
    if any(s != 1 for s in refocuser.stride) or refocuser.bias is not None:
        raise NotEquivalent("a refocusing conv must have stride 1 and no bias")
    w = base.weight.to(torch.float64)
    image = w.reshape(1, n2d, *base.kernel_size)
    mapped = apply(refocuser.to(torch.float64), image)
    if mapped.shape != image.shape:
        raise NotEquivalent(
            f"the refocusing conv changes the kernel size {base.kernel_size} to {tuple(mapped.shape[2:])}",
            hint="use padding = map_k // 2 with an odd map_k",
        )
    return replace(base, weight=(w + mapped.reshape(w.shape)).to(base.dtype))


def concat_grouped(*kernels: Kernel) -> Kernel:
    """P3 within groups: branches with equal `groups`, their outputs concatenated group by group.

    Unlike `concat` (branch-major order, groups written out densely) this keeps the groups: the
    result's output channels are ordered group-major, [group 0 of kernels[0], group 0 of
    kernels[1], ..., group 1 of kernels[0], ...]. A depthwise conv (C groups) concatenated with a
    depthwise identity gives 2C channels, (branch 0, branch 1) interleaved per input channel: what
    a grouped conv can produce, since groups always own adjacent output channels. Kernels of
    different sizes are centred as in `add`.
    """
    if not kernels:
        raise NotEquivalent("concat_grouped() needs at least one kernel")
    groups = {k.groups for k in kernels}
    if len(groups) > 1:
        raise NotEquivalent(f"concat_grouped needs branches with equal groups, got {sorted(groups)}",
                            hint="use concat() for a dense, branch-major concatenation")
    g = kernels[0].groups
    aligned = _align([k.to(torch.float64) for k in kernels], "concatenate")
    per_group = [k.weight.reshape(g, k.out_channels // g, *k.weight.shape[1:]) for k in aligned]
    weight = torch.cat(per_group, 1).reshape(-1, *aligned[0].weight.shape[1:])
    bias = None
    if any(k.bias is not None for k in aligned):
        bias = torch.cat([k.bias_or_zeros().reshape(g, -1) for k in aligned], 1).reshape(-1)
    dtype = _out_dtype(*kernels)
    return replace(aligned[0], weight=weight.to(dtype), bias=None if bias is None else bias.to(dtype))


def select_channels(
    in_channels: int, index: Sequence[int], scale: float = 1.0, ndim: int = 2,
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
) -> Kernel:
    """P6a generalised: the pointwise layer whose output j is `scale * input[index[j]]`.

    Weight (len(index), in_channels, 1, ...): a row of the identity per selected channel. Composed
    with `sequential` it embeds a layer into wider inputs (zero weights for the other channels);
    added to a layer it routes a shortcut through it (dirac weights, seed paradigm 6b).
    """
    index = list(index)
    if any(i < 0 or i >= in_channels for i in index):
        raise NotEquivalent(f"channel index out of range for {in_channels} channels")
    w = torch.zeros((len(index), in_channels, *([1] * ndim)), dtype=dtype, device=device)
    rows = torch.arange(len(index), device=device)
    w[(rows, torch.tensor(index, dtype=torch.long, device=device), *([torch.zeros_like(rows)] * ndim))] = scale
    return Kernel(w, None, (1,) * ndim, (0,) * ndim, (1,) * ndim, 1)


# --------------------------------------------------------------------------- cross-layer equalization

def equalize_pair(first: Kernel, second: Kernel, scale: Tensor | None = None) -> tuple[Kernel, Kernel, Tensor]:
    """Cross-layer equalization of two consecutive layers (Nagel et al., "Data-Free Quantization
    Through Weight Equalization and Bias Correction", ICCV 2019, eq. 5-7).

    `first`'s output channel c feeds `second`'s input channel c, through an activation f with
    f(x / s) = f(x) / s for s > 0 (ReLU, LeakyReLU, PReLU, identity, max/avg pooling). Row c of
    `first` (weight and bias) is divided by s_c and `second`'s weights reading channel c are
    multiplied by s_c, so second(f(first(x))) is unchanged. With `scale` None the choice of the
    paper is made: s_c = sqrt(r1_c * r2_c) / r2_c, where r1_c is the max |weight| of first's output
    channel c and r2_c that of second's input channel c, after which both ranges equal
    sqrt(r1_c * r2_c). A channel where either range is zero keeps s_c = 1.

    first: weight (C, in1 // g1, *k1); second: weight (out2, C // g2, *k2); any groups, conv or FC
    (0 spatial dims). Returns (first', second', s) with s of shape (C,), in float64; the kernels
    in the dtype of their inputs.
    """
    channels = first.out_channels
    if second.in_channels != channels:
        raise NotEquivalent(f"cannot equalize: the first layer has {channels} output channels, the second reads "
                            f"{second.in_channels}")
    w1, w2 = first.weight.to(torch.float64), second.weight.to(torch.float64)
    g2 = second.groups
    per_group = channels // g2
    # second's weight as (groups, out per group, in per group, *k): input channel c = (c // per_group, c % per_group)
    w2g = w2.reshape(g2, second.out_channels // g2, per_group, *w2.shape[2:])
    if scale is None:
        r1 = w1.abs().reshape(channels, -1).amax(1)
        r2 = w2g.abs().transpose(1, 2).reshape(g2, per_group, -1).amax(2).reshape(channels)
        ok = (r1 > 0) & (r2 > 0)
        scale = torch.where(ok, torch.sqrt(r1 * r2) / torch.where(ok, r2, torch.ones_like(r2)), torch.ones_like(r1))
    scale = torch.as_tensor(scale, dtype=torch.float64, device=w1.device).reshape(channels)
    if not bool((scale > 0).all()):
        raise NotEquivalent("equalization scales must be positive (a negative one flips the activation)")
    view1 = (channels,) + (1,) * (w1.dim() - 1)
    new1 = replace(first, weight=(w1 / scale.reshape(view1)).to(first.dtype),
                   bias=None if first.bias is None else (first.bias.to(torch.float64) / scale).to(first.bias.dtype))
    w2new = (w2g * scale.reshape(g2, 1, per_group, *([1] * (w2.dim() - 2)))).reshape(w2.shape)
    new2 = replace(second, weight=w2new.to(second.dtype))
    return new1, new2, scale
