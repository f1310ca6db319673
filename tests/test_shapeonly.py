"""Shape-only torch (reparam_cli/shapeonly.py): the shapes and dtypes it answers are the ones torch
computes, op by op (hypothesis, against real CPU tensors) and model by model (every built-in spec's
meta conversion against its real conversion)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reparam_cli.convert.engine import reparameterize
from reparam_cli.core.shapeonly import broadcast_shape, shape_only
from reparam_cli.pipeline.specs import builtin_names, load_spec

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPES = FLOATS + [torch.int64, torch.int32, torch.bool]


def _same(op, *tensors, **kwargs):
    """op on real CPU tensors and, shape-only, on their meta twins: same shape and dtype (or both raise)."""
    try:
        want = op(*tensors, **kwargs)
    except (RuntimeError, ValueError):
        with pytest.raises((RuntimeError, ValueError)), shape_only():
            op(*[t.to("meta") if isinstance(t, torch.Tensor) else t for t in tensors], **kwargs)
        return
    with shape_only():
        got = op(*[t.to("meta") if isinstance(t, torch.Tensor) else t for t in tensors], **kwargs)
    assert got.is_meta
    assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype)


def _tensor(shape, dtype):
    return (torch.rand(shape) * 4 + 1).to(dtype)


shapes = st.lists(st.integers(1, 4), min_size=0, max_size=4)


@settings(max_examples=60, deadline=None)
@given(a=shapes, b=shapes, squeeze=st.lists(st.booleans(), min_size=4, max_size=4),
       da=st.sampled_from(DTYPES), db=st.sampled_from(DTYPES),
       op=st.sampled_from([torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.eq, torch.lt]))
def test_binary_pointwise_broadcasts_and_promotes_like_torch(a, b, squeeze, da, db, op):
    b = [1 if s else n for n, s in zip(b, squeeze)] + b[len(squeeze):]  # size-1 dims broadcast
    if op is torch.sub and torch.bool in (da, db):
        da = db = torch.float32  # (torch refuses bool subtraction)
    _same(op, _tensor(a, da), _tensor(b, db))


@settings(max_examples=40, deadline=None)
@given(a=shapes, dtype=st.sampled_from(DTYPES), scalar=st.sampled_from([2, 0.5, True]),
       op=st.sampled_from([torch.add, torch.mul, torch.div, torch.rsqrt, torch.neg, torch.exp, torch.sigmoid]))
def test_unary_and_scalar_pointwise_like_torch(a, dtype, scalar, op):
    if op in (torch.neg,) and dtype is torch.bool:
        dtype = torch.int64  # (torch refuses negating bools)
    args = (scalar,) if op in (torch.add, torch.mul, torch.div) else ()
    if op in (torch.add, torch.mul) and dtype is torch.bool and scalar is True:
        args = (2,)
    _same(op, _tensor(a, dtype), *args)


def test_in_place_keeps_the_operand_and_refuses_growing_it():
    x = torch.empty(3, 1, device="meta")
    with shape_only():
        assert x.mul_(torch.empty(3, 1, device="meta")) is x
        assert x.add_(2.0) is x
        with pytest.raises(RuntimeError, match="does not broadcast"):
            x.add_(torch.empty(3, 4, device="meta"))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 4), groups=st.sampled_from([1, 2]), size=st.integers(1, 9),
       k=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       transposed=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_convolution_sizes_like_torch(n, c, groups, size, k, stride, padding, dilation, transposed, dtype):
    x = _tensor((n, c * groups, size, size + 1), dtype)
    if transposed:
        # (torch itself is inconsistent about empty transposed outputs: some paths raise, some return them)
        assume((size - 1) * stride - 2 * padding + dilation * (k - 1) + 1 + stride - 1 >= 1)
        w = _tensor((c * groups, 3, k, k), dtype)
        _same(lambda x, w: F.conv_transpose2d(x, w, stride=stride, padding=padding, dilation=dilation,
                                              groups=groups, output_padding=stride - 1), x, w)
    else:
        w = _tensor((3 * groups, c, k, k), dtype)
        _same(lambda x, w: F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups), x, w)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), dim=st.integers(-4, 3), extra=st.integers(1, 3),
       keepdim=st.booleans(), dtype=st.sampled_from(FLOATS))
def test_cat_sum_and_matmul_like_torch(shape, dim, extra, keepdim, dtype):
    dim = dim % len(shape)
    other = list(shape)
    other[dim] = extra
    _same(lambda a, b: torch.cat([a, b], dim), _tensor(shape, dtype), _tensor(other, torch.float64))
    _same(lambda a, b: torch.cat([a, b], dim), _tensor(shape, dtype), _tensor(other[::-1], dtype))  # may raise
    _same(lambda a: a.sum(dim, keepdim=keepdim), _tensor(shape, dtype))
    _same(lambda a: a.sum((0, -1), keepdim=keepdim), _tensor(shape, dtype))
    _same(lambda a, b: a @ b, _tensor((*shape[:-1], 3), dtype), _tensor((3, extra), dtype))
    _same(lambda a, b: torch.bmm(a, b), _tensor((2, extra, 3), dtype), _tensor((2, 3, shape[0]), dtype))


def test_factories_and_likes_on_meta_like_torch():
    for make in (lambda d: torch.arange(5, device=d), lambda d: torch.arange(1, 7, 2, device=d),
                 lambda d: torch.arange(0, 1, 0.3, device=d), lambda d: torch.eye(3, dtype=torch.float64, device=d),
                 lambda d: torch.eye(2, 5, device=d),
                 lambda d: torch.full_like(torch.empty(2, 3, device=d, dtype=torch.float16), 1.5),
                 lambda d: torch.zeros_like(torch.empty(4, device=d), dtype=torch.int64)):
        want = make("cpu")
        with shape_only():
            got = make("meta")
        assert got.is_meta and (got.shape, got.dtype) == (want.shape, want.dtype)


def test_values_off_meta_are_computed_as_usual():
    x = torch.arange(6.0).reshape(2, 3)
    with shape_only():
        y = torch.rsqrt(x + 1) * 2
        z = torch.cat([x, y]).sum(0)
    assert torch.equal(y, torch.rsqrt(x + 1) * 2) and torch.equal(z, torch.cat([x, y]).sum(0))


def test_broadcast_shape_refuses_mismatch():
    assert broadcast_shape((3, 1), (4,), ()) == (3, 4)
    with pytest.raises(ValueError, match="do not broadcast"):
        broadcast_shape((3,), (4,))


@pytest.mark.parametrize("name", builtin_names())
def test_meta_conversion_gives_the_real_deploy_layout(name):
    """What inspect, deploy skeletons and `specs --params` compute shape-only is what converting computes."""
    spec = load_spec(name)
    torch.manual_seed(0)
    real, real_report = reparameterize(spec.build().eval())
    skeleton, meta_report = reparameterize(spec.build(device="meta").eval())
    layout = {k: (tuple(t.shape), t.dtype) for k, t in real.state_dict().items()}
    assert {k: (tuple(t.shape), t.dtype) for k, t in skeleton.state_dict().items()} == layout
    assert [(b.path, b.block_type) for b in meta_report.converted] == [(b.path, b.block_type) for b in real_report.converted]
    assert len(meta_report.regions) == len(real_report.regions)
    assert [r.path for r in meta_report.remaining] == [r.path for r in real_report.remaining]
