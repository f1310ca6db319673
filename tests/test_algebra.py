"""Property tests: every paradigm's fused layer equals the original layers on random inputs.

All comparisons run in float64 with tolerance 1e-9 relative to the output's magnitude (the
float64 rounding floor is ~1e-15; a wrong kernel or bias is off by O(1)).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from reparam_cli.core import algebra as A
from reparam_cli.errors import NotEquivalent

TOL = 1e-9
settings.register_profile("reparam", max_examples=40, deadline=None)
settings.load_profile("reparam")


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(b.abs().max().item(), 1.0)
    return (a - b).abs().max().item() <= tol * scale


def rand_kernel(draw, out_ch, in_ch, ks, groups, stride, padding, dilation, bias=True):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_ch, in_ch // groups, *ks, generator=g, dtype=torch.float64)
    b = torch.randn(out_ch, generator=g, dtype=torch.float64) if bias else None
    return A.Kernel(w, b, tuple(stride), tuple(padding), tuple(dilation), groups)


def rand_bn(channels: int, affine: bool = True, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, affine=affine).double().eval()
    bn.running_mean.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(channels, generator=g, dtype=torch.float64) * 2 + 0.1)
    if affine:
        bn.weight.data.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        bn.bias.data.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
    return bn


def rand_input(k_or_ch, spatial, seed=0):
    ch = k_or_ch.in_channels if isinstance(k_or_ch, A.Kernel) else k_or_ch
    return torch.randn(2, ch, *spatial, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@st.composite
def channels_groups(draw, max_groups=4):
    groups = draw(st.integers(1, max_groups))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    return cin, cout, groups


@st.composite
def conv_geometry(draw, ndim=None):
    """Kernel sizes odd, even and non-square, with stride, dilation and any padding >= 0."""
    ndim = ndim or draw(st.sampled_from([1, 2]))
    ks = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(ndim))
    return ndim, ks, stride, padding, dilation


# --------------------------------------------------------------------------- P1

@given(data=st.data(), geo=conv_geometry(ndim=2), cg=channels_groups(), bias=st.booleans(), affine=st.booleans())
def test_p1_conv_bn_2d(data, geo, cg, bias, affine):
    ndim, ks, stride, padding, dilation = geo
    cin, cout, groups = cg
    k = rand_kernel(data.draw, cout, cin, ks, groups, stride, padding, dilation, bias)
    bn = rand_bn(cout, affine, seed=data.draw(st.integers(0, 1000)))
    x = rand_input(k, (12, 11))
    assert close(A.apply(A.fuse_bn(k, bn), x), bn(A.apply(k, x)))


@given(data=st.data(), geo=conv_geometry(ndim=1), cg=channels_groups(), bias=st.booleans())
def test_p1_conv_bn_1d(data, geo, cg, bias):
    _, ks, stride, padding, dilation = geo
    cin, cout, groups = cg
    conv = nn.Conv1d(cin, cout, ks, stride, padding, dilation, groups, bias=bias).double()
    bn = nn.BatchNorm1d(cout).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 2)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    x = rand_input(cin, (13,))
    fused = A.to_module(A.fuse_bn(A.from_module(conv), bn))
    assert isinstance(fused, nn.Conv1d)
    assert close(fused(x), bn(conv(x)))


def test_p1_linear_bn():
    fc = nn.Linear(6, 5).double()
    bn = nn.BatchNorm1d(5).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 6, dtype=torch.float64)
    fused = A.to_module(A.fuse_bn(A.from_module(fc), bn))
    assert isinstance(fused, nn.Linear)
    assert close(fused(x), bn(fc(x)))


def test_p1_bn_without_running_stats_is_refused():
    k = A.from_module(nn.Conv2d(3, 4, 3))
    with pytest.raises(NotEquivalent, match="running statistics"):
        A.fuse_bn(k, nn.BatchNorm2d(4, track_running_stats=False))


# --------------------------------------------------------------------------- P2 / P4

@st.composite
def aligned_branches(draw):
    """Branches whose outputs have equal size: sizes K - 2m (so odd/even/non-square), padding P - d*m."""
    ndim = draw(st.sampled_from([1, 2]))
    cin = draw(st.integers(1, 3)) * 4
    cout = draw(st.integers(1, 3)) * 4
    big = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    pad = tuple(draw(st.integers(0, 3)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    kernels = []
    for _ in range(draw(st.integers(2, 4))):
        shrink = [draw(st.integers(0, (b - 1) // 2)) for b in big]
        ks = tuple(b - 2 * m for b, m in zip(big, shrink))
        padding = tuple(p - d * m for p, d, m in zip(pad, dilation, shrink))  # may be negative: a crop
        groups = draw(st.sampled_from([1, 2, 4]))
        kernels.append(rand_kernel(draw, cout, cin, ks, groups, stride, padding, dilation, draw(st.booleans())))
    return ndim, kernels


@given(branches=aligned_branches())
def test_p2_p4_add_branches(branches):
    ndim, kernels = branches
    x = rand_input(kernels[0], (20, 19)[:ndim])
    fused = A.add(*kernels)
    assert close(A.apply(fused, x), sum(A.apply(k, x) for k in kernels))


def test_p4_pads_1x1_and_asymmetric_to_3x3_centred():
    g = torch.Generator().manual_seed(0)
    k3 = A.Kernel(torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64), None, (1, 1), (1, 1))
    k1 = A.Kernel(torch.randn(4, 4, 1, 1, generator=g, dtype=torch.float64), None, (1, 1), (0, 0))
    k13 = A.Kernel(torch.randn(4, 4, 1, 3, generator=g, dtype=torch.float64), None, (1, 1), (0, 1))
    fused = A.add(k3, k1, k13)
    assert fused.kernel_size == (3, 3) and fused.padding == (1, 1)
    assert torch.equal(fused.weight[:, :, 1, 1], k3.weight[:, :, 1, 1] + k1.weight[:, :, 0, 0] + k13.weight[:, :, 0, 1])


def test_add_refuses_branches_with_different_output_sizes():
    a = A.Kernel(torch.randn(2, 2, 3, 3), None, (1, 1), (1, 1))
    b = A.Kernel(torch.randn(2, 2, 3, 3), None, (1, 1), (0, 0))
    with pytest.raises(NotEquivalent, match="differ in size"):
        A.add(a, b)


def test_add_refuses_different_strides():
    a = A.Kernel(torch.randn(2, 2, 3, 3), None, (1, 1), (1, 1))
    b = A.Kernel(torch.randn(2, 2, 3, 3), None, (2, 2), (1, 1))
    with pytest.raises(NotEquivalent, match="strides"):
        A.add(a, b)


# --------------------------------------------------------------------------- P3

@given(branches=aligned_branches())
def test_p3_concat_branches(branches):
    ndim, kernels = branches
    x = rand_input(kernels[0], (20, 19)[:ndim])
    fused = A.concat(*kernels)
    assert close(A.apply(fused, x), torch.cat([A.apply(k, x) for k in kernels], 1))


# --------------------------------------------------------------------------- P5

@given(data=st.data(), geo=conv_geometry(), bias1=st.booleans(), bias2=st.booleans(),
       pad_first=st.booleans(), same_groups=st.booleans())
def test_p5a_1x1_then_kxk(data, geo, bias1, bias2, pad_first, same_groups):
    ndim, ks, stride, padding, dilation = geo
    groups = data.draw(st.sampled_from([1, 2, 3]))
    c, d, e = (groups * data.draw(st.integers(1, 3)) for _ in range(3))
    g2 = groups if same_groups else 1
    # Either the padding sits before the 1x1 (exact with a bias: DBB's BNAndPad) or on the kxk conv.
    p1 = padding if pad_first else (0,) * ndim
    p2 = (0,) * ndim if pad_first else padding
    first = rand_kernel(data.draw, d, c, (1,) * ndim, groups, (1,) * ndim, p1, (1,) * ndim, bias1)
    second = rand_kernel(data.draw, e, d, ks, g2, stride, p2, dilation, bias2)
    x = rand_input(c, (13, 12)[:ndim])
    if bias1 and any(p2):
        with pytest.raises(NotEquivalent, match="bias before a zero-padded conv"):
            A.sequential(first, second)
        return
    fused = A.sequential(first, second)
    assert fused.kernel_size == ks
    assert close(A.apply(fused, x), A.apply(second, A.apply(first, x)))


@given(data=st.data(), geo=conv_geometry(), bias1=st.booleans(), bias2=st.booleans(), stride2=st.integers(1, 2))
def test_p5b_kxk_then_1x1(data, geo, bias1, bias2, stride2):
    ndim, ks, stride, padding, dilation = geo
    groups = data.draw(st.sampled_from([1, 2]))
    c, d, e = (groups * data.draw(st.integers(1, 3)) for _ in range(3))
    first = rand_kernel(data.draw, d, c, ks, groups, stride, padding, dilation, bias1)
    second = rand_kernel(data.draw, e, d, (1,) * ndim, data.draw(st.sampled_from([1, groups])),
                         (stride2,) * ndim, (0,) * ndim, (1,) * ndim, bias2)
    x = rand_input(c, (13, 12)[:ndim])
    fused = A.sequential(first, second)
    assert close(A.apply(fused, x), A.apply(second, A.apply(first, x)))


def test_p5_refuses_two_kxk_convs():
    a = A.Kernel(torch.randn(2, 2, 3, 3), None, (1, 1), (1, 1))
    with pytest.raises(NotEquivalent, match="grows the kernel"):
        A.sequential(a, a)


def test_p5a_refuses_first_layer_with_stride():
    a = A.Kernel(torch.randn(2, 2, 1, 1), None, (2, 2), (0, 0))
    b = A.Kernel(torch.randn(2, 2, 3, 3), None, (1, 1), (1, 1))
    with pytest.raises(NotEquivalent):
        A.sequential(a, b)


# --------------------------------------------------------------------------- P6a, P7, P8

@given(channels_per_group=st.integers(1, 3), groups=st.integers(1, 4),
       ks=st.tuples(st.sampled_from([1, 3, 5, 7]), st.sampled_from([1, 3, 5])))
def test_p6a_identity_any_odd_size_and_groups(channels_per_group, groups, ks):
    c = channels_per_group * groups
    k = A.identity(c, ks, groups)
    x = rand_input(c, (7, 6))
    assert torch.equal(A.apply(k, x), x)


def test_p6a_identity_refuses_even_kernel():
    with pytest.raises(NotEquivalent, match="centred tap"):
        A.identity(4, 2)


@given(c=st.integers(1, 6), k=st.integers(1, 4), s=st.integers(1, 3), data=st.data())
def test_p7_avgpool_as_conv(c, k, s, data):
    p = data.draw(st.integers(0, k // 2))
    x = rand_input(c, (9, 10))
    kernel = A.avgpool(c, k, s, p)
    assert close(A.apply(kernel, x), F.avg_pool2d(x, k, s, p))
    dense = A.regroup(kernel, 1)  # the same pooling as an ordinary (dense) conv
    assert close(A.apply(dense, x), F.avg_pool2d(x, k, s, p))


def test_p7_refuses_ceil_mode_and_excluded_padding():
    with pytest.raises(NotEquivalent, match="ceil_mode"):
        A.avgpool(3, 3, 2, 1, ceil_mode=True)
    with pytest.raises(NotEquivalent, match="count_include_pad"):
        A.avgpool(3, 3, 1, 1, count_include_pad=False)


@given(groups=st.sampled_from([1, 2, 4, 8]), ks=st.sampled_from([1, 3, (1, 3), 5]), affine=st.booleans())
def test_p8_bn_as_conv(groups, ks, affine):
    bn = rand_bn(8, affine, seed=3)
    k = A.bn_as_conv(bn, ks, groups)
    x = rand_input(8, (6, 7))
    assert close(A.apply(k, x), bn(x))


# --------------------------------------------------------------------------- P9 and conv -> FC

def test_p9_linear_and_pointwise_conv_round_trip():
    fc = nn.Linear(6, 4).double()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    conv_k = A.linear_as_conv(A.from_module(fc))
    conv = A.to_module(conv_k)
    assert isinstance(conv, nn.Conv2d)
    expect = fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert close(conv(x), expect)
    back = A.to_module(A.conv_as_linear(conv_k))
    assert isinstance(back, nn.Linear) and torch.equal(back.weight, fc.weight)


def test_p9_grouped_pointwise_conv_as_linear():
    conv = nn.Conv2d(6, 4, 1, groups=2).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    fc = A.to_module(A.conv_as_linear(A.from_module(conv)))
    assert close(fc(x), conv(x[:, :, None, None])[:, :, 0, 0])


def test_p9_refuses_non_pointwise():
    with pytest.raises(NotEquivalent, match="1x1"):
        A.conv_as_linear(A.from_module(nn.Conv2d(3, 3, 3)))


@given(data=st.data(), geo=conv_geometry(ndim=2), cg=channels_groups(max_groups=2))
def test_conv_as_fc(data, geo, cg):
    _, ks, stride, padding, dilation = geo
    cin, cout, groups = cg
    k = rand_kernel(data.draw, cout, cin, ks, groups, stride, padding, dilation)
    h, w = 9, 10  # large enough for the largest dilated kernel (9)
    x = rand_input(k, (h, w))
    conv_out = A.apply(k, x)
    fc = A.conv_as_fc(k, (cin, h, w))
    assert close(A.apply(fc, x.flatten(1)), conv_out.flatten(1))


# --------------------------------------------------------------------------- dtypes, modules, meta

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_results_come_back_in_the_input_dtype(dtype):
    conv = nn.Conv2d(4, 4, 3, padding=1).to(dtype)
    bn = nn.BatchNorm2d(4).to(dtype).eval()
    k = A.fuse_bn(A.from_module(conv), bn)
    assert k.dtype == dtype
    assert A.add(k, A.bn_as_conv(bn, 3, 1)).dtype == dtype


def test_to_module_refuses_negative_padding():
    k = A.Kernel(torch.randn(2, 2, 3, 3), None, (1, 1), (-1, 0))
    with pytest.raises(NotEquivalent, match="negative padding"):
        A.to_module(k)


def test_paradigms_run_on_meta_tensors():
    with torch.device("meta"):
        conv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        bn = nn.BatchNorm2d(8)
    k = A.add(A.fuse_bn(A.from_module(conv, torch.float64), bn), A.bn_as_conv(bn, dtype=torch.float64))
    assert k.weight.is_meta and k.weight.shape == (8, 4, 3, 3) and k.groups == 2


def test_from_module_refuses_non_zero_padding_mode():
    with pytest.raises(NotEquivalent, match="padding_mode"):
        A.from_module(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


@given(branches=aligned_branches())
@settings(max_examples=15)
def test_add_written_in_a_lower_dtype_is_the_rounded_float64_sum(branches):
    """add(..., dtype=float32) forms the sum in float64 chunk by chunk and rounds once."""
    _, kernels = branches
    exact = A.add(*kernels)
    low = A.add(*kernels, dtype=torch.float32)
    assert low.dtype == torch.float32 and torch.equal(low.weight, exact.weight.float())
    assert (low.bias is None) == (exact.bias is None)


def test_add_chunks_large_kernels_exactly():
    """More output channels than one ~16 MB chunk holds: every chunk lands in its place."""
    g = torch.Generator().manual_seed(0)
    big = A.Kernel(torch.randn(600, 512, 3, 3, generator=g, dtype=torch.float64), None, (1, 1), (1, 1))
    small = A.Kernel(torch.randn(600, 512, 1, 1, generator=g, dtype=torch.float64), None, (1, 1), (0, 0))
    out = A.add(big, small, dtype=torch.float32)
    expect = big.weight.clone()
    expect[:, :, 1:2, 1:2] += small.weight
    assert torch.equal(out.weight, expect.float())


@given(branches=aligned_branches(), seed=st.integers(0, 1000))
@settings(max_examples=20)
def test_lazy_bn_in_add_equals_eager_fusion(branches, seed):
    """fuse_bn_lazy + add == fuse_bn (float64) + add, bit for bit after the final rounding."""
    _, kernels = branches
    bn = rand_bn(kernels[0].out_channels, seed=seed)
    f32 = [k.to(torch.float32) for k in kernels]
    eager = A.add(A.fuse_bn(f32[0], bn, dtype=torch.float64), *f32[1:], dtype=torch.float32)
    lazy = A.add(A.fuse_bn_lazy(f32[0], bn), *f32[1:], dtype=torch.float32)
    assert torch.equal(lazy.weight, eager.weight) and torch.allclose(lazy.bias, eager.bias, rtol=0, atol=1e-6)
    assert torch.equal(A.fuse_bn_lazy(f32[0], bn).materialize().weight, A.fuse_bn(f32[0], bn, torch.float64).weight)
    x = rand_input(kernels[0], (20, 19)[: kernels[0].ndim])
    bn_out = F.batch_norm(A.apply(kernels[0], x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                          False, 0.0, bn.eps)  # any number of spatial dims
    expect = bn_out + sum(A.apply(k, x) for k in kernels[1:])
    assert close(A.apply(lazy, x), expect, tol=1e-5)  # float32 result


def test_scaled_kernel_is_only_accepted_by_add():
    lazy = A.fuse_bn_lazy(A.from_module(nn.Conv2d(2, 2, 3, padding=1)), rand_bn(2).float())
    with pytest.raises(AttributeError):
        A.sequential(lazy, lazy)  # not a Kernel: fails loudly instead of ignoring the scale


@given(st.data(), st.sampled_from([0, 2]), st.booleans(), st.booleans())
def test_scale_channels_equals_scale_and_shift_after_the_layer(data, ndim, bias, shift):
    ks = (3,) * ndim
    k = rand_kernel(data.draw, 4, 6, ks, 2 if ndim else 1, (1,) * ndim, (1,) * ndim, (1,) * ndim, bias=bias)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    scale = torch.randn(4, generator=g, dtype=torch.float64).reshape(4, *([1] * ndim))
    offset = torch.randn(4, generator=g, dtype=torch.float64).reshape(4, *([1] * ndim)) if shift else None
    x = torch.randn(2, 6, *([5] * ndim), generator=g, dtype=torch.float64)
    ref = A.apply(k, x) * scale + (0 if offset is None else offset)
    assert close(A.apply(A.scale_channels(k, scale, offset), x), ref)
    assert close(A.apply(A.scale_channels(k, 0.5), x), A.apply(k, x) * 0.5)


def test_scale_channels_refuses_a_scale_of_the_wrong_length():
    k = A.Kernel(torch.randn(4, 3, 1, 1, dtype=torch.float64))
    with pytest.raises(NotEquivalent, match="3 values"):
        A.scale_channels(k, torch.ones(3))


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 4), pads=st.lists(st.integers(0, 3), min_size=1, max_size=3), k=st.sampled_from([1, 3]),
       bias=st.booleans())
def test_zero_pad_is_f_pad_and_adds_to_a_following_convs_padding(c, pads, k, bias):
    n = len(pads)
    x = torch.randn(2, c, *[5] * n, dtype=torch.float64)
    pad = A.zero_pad(c, pads)
    f_pad = [p for q in reversed(pads) for p in (q, q)]  # F.pad lists the last dim first
    assert torch.equal(A.apply(pad, x), F.pad(x, f_pad))
    conv = A.Kernel(torch.randn(3, c, *[k] * n, dtype=torch.float64), torch.randn(3, dtype=torch.float64) if bias else None,
                    (1,) * n, (k // 2,) * n, (1,) * n, 1)
    fused = A.sequential(pad, conv)
    assert fused.padding == tuple(p + k // 2 for p in pads)
    assert close(A.apply(fused, x), A.apply(conv, F.pad(x, f_pad)))
    if bias and any(pads):  # a zero ring after a biased 1x1: no single conv gives it
        biased = A.Kernel(torch.randn(c, c, *[1] * n, dtype=torch.float64), torch.randn(c, dtype=torch.float64),
                          (1,) * n, (0,) * n, (1,) * n, 1)
        with pytest.raises(NotEquivalent, match="bias before a zero-padded"):
            A.sequential(biased, pad)
    with pytest.raises(NotEquivalent, match="crops"):
        A.zero_pad(c, [-1] * n)
