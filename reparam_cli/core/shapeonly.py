"""Shape-only torch: converting a model whose tensors live on the `meta` device, without torch's cost.

`reparam inspect`, deploy skeletons (`load_deploy`, `verify`) and `specs --params` convert models
built on `meta`: only shapes and dtypes matter. torch computes elementwise ops, `cat`, reductions
and convolutions on meta tensors with its Python reference implementations (`torch._refs`), whose
first use imports sympy and torch._dynamo (1-3 s, more than the conversion itself). Here a dispatch
mode answers those ops (`_RULES`, and every op tagged pointwise) from the operands' shapes
(broadcasting, concatenation, the convolution size formula, ...) with fresh meta tensors. An op
without a rule is left to torch (correct, only slower the first time). Nothing here computes a
value, and ops on other devices run as usual: the algebra runs unchanged, only on shapes.
(tests/test_shapeonly.py checks each rule against torch, and every built-in spec's skeleton
against its real conversion.)
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Pointwise ops whose result is boolean, or floating point even for integer operands.
_BOOLEAN = {"eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "logical_not",
            "isnan", "isinf", "isfinite", "isneginf", "isposinf", "signbit"}
_FLOATING = {"div", "true_divide", "reciprocal", "rsqrt", "sqrt", "exp", "log", "sigmoid", "tanh", "sin", "cos",
             "erf", "log1p", "expm1", "exp2", "log2", "log10"}


def broadcast_shape(*shapes: Sequence[int]) -> tuple[int, ...]:
    """The shape operands of these shapes broadcast to (torch's rules); ValueError if they do not."""
    out = []
    for dims in itertools.zip_longest(*(reversed(tuple(s)) for s in shapes), fillvalue=1):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {', '.join(str(list(s)) for s in shapes)} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(reversed(out))


def _meta(*values: Any) -> bool:
    """Whether every tensor among the values (and in lists of them) is on meta, and there is one."""
    tensors = [t for v in values for t in (v if isinstance(v, (list, tuple)) else (v,)) if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(t.is_meta for t in tensors)


def _on_meta_device(kwargs: dict) -> bool:
    return kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta"


def _pointwise(func, args, kwargs) -> torch.Tensor | None:
    if kwargs or not _meta(*args):
        return None
    operands = [a for a in args if isinstance(a, (torch.Tensor, int, float, bool, complex))]
    tensors = [a for a in operands if isinstance(a, torch.Tensor)]
    shape = broadcast_shape(*(t.shape for t in tensors))
    name = func.overloadpacket.__name__
    if name.endswith("_"):  # in place: the first operand keeps its shape and dtype
        if tuple(args[0].shape) != shape:
            raise RuntimeError(f"{name}: output with shape {list(args[0].shape)} does not broadcast to {list(shape)}")
        return args[0]
    if name in _BOOLEAN:
        return torch.empty(shape, dtype=torch.bool, device="meta")
    dtype = tensors[0].dtype if len(operands) < 2 else torch.result_type(operands[0], operands[1])
    for other in operands[2:]:  # (where, addcmul, lerp: promoted pairwise)
        dtype = torch.result_type(torch.empty((), dtype=dtype, device="meta"), other)
    if name in _FLOATING and not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()
    return torch.empty(shape, dtype=dtype, device="meta")


def _cat(func, args, kwargs) -> torch.Tensor | None:
    if kwargs or not _meta(args[0]):
        return None
    tensors = [t for t in args[0] if t.shape != (0,)]  # torch's legacy rule: 1-D empty tensors are skipped
    dim = args[1] if len(args) > 1 else 0
    shape = list(tensors[0].shape)
    dim %= len(shape)
    for t in tensors[1:]:
        if t.dim() != len(shape) or any(a != b for i, (a, b) in enumerate(zip(t.shape, shape)) if i != dim):
            raise RuntimeError(f"cat: shapes {[list(t.shape) for t in tensors]} differ outside dimension {dim}")
    shape[dim] = sum(t.shape[dim] for t in tensors)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.empty(shape, dtype=dtype, device="meta")


def _convolution(func, args, kwargs) -> torch.Tensor | None:
    if kwargs or not _meta(*args):
        return None
    x, weight, _, stride, padding, dilation, transposed, output_padding, groups = args
    expected = weight.shape[0] if transposed else weight.shape[1] * groups
    if x.shape[1] != expected:
        raise RuntimeError(f"convolution: input with {x.shape[1]} channels, weight {list(weight.shape)} "
                           f"with {groups} groups expects {expected}")
    sizes = []
    for i, n in enumerate(x.shape[2:]):
        k = dilation[i] * (weight.shape[2 + i] - 1) + 1
        sizes.append((n - 1) * stride[i] - 2 * padding[i] + k + output_padding[i] if transposed
                     else (n + 2 * padding[i] - k) // stride[i] + 1)
    if any(size < 1 for size in sizes):
        raise RuntimeError(f"convolution: input {list(x.shape)} is smaller than the kernel {list(weight.shape)}")
    channels = weight.shape[1] * groups if transposed else weight.shape[0]
    return torch.empty((x.shape[0], channels, *sizes), dtype=torch.result_type(x, weight), device="meta")


def _matmul(func, args, kwargs) -> torch.Tensor | None:
    if kwargs or not _meta(*args):
        return None
    a, b = args
    if a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:  # (bmm: equal batches, no broadcasting)
        raise RuntimeError(f"{func.overloadpacket.__name__}: shapes {list(a.shape)} and {list(b.shape)} "
                           "cannot be multiplied")
    batch = a.shape[:-2]
    return torch.empty((*batch, a.shape[-2], b.shape[-1]), dtype=torch.promote_types(a.dtype, b.dtype), device="meta")


def _reduce(func, args, kwargs) -> torch.Tensor | None:
    if not _meta(*args):
        return None
    x, dim, keepdim = (*args, None, False)[:3]
    rank = max(x.dim(), 1)
    if dim and (any(not -rank <= d < rank for d in dim) or len({d % rank for d in dim}) < len(dim)):
        raise RuntimeError(f"{func.overloadpacket.__name__}: bad dims {list(dim)} for a {x.dim()}-d tensor")
    dims = {d % rank for d in dim} if dim else set(range(x.dim()))
    shape = [1 if i in dims else n for i, n in enumerate(x.shape) if keepdim or i not in dims]
    return torch.empty(shape, dtype=kwargs.get("dtype") or x.dtype, device="meta")


def _fill(func, args, kwargs) -> torch.Tensor | None:
    """Random or constant initialisation in place (layers built on meta): nothing to fill."""
    return args[0] if _meta(args[0]) else None


def _like(func, args, kwargs) -> torch.Tensor | None:
    if not (_meta(args[0]) and (kwargs.get("device") is None or _on_meta_device(kwargs))):
        return None
    return torch.empty(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device="meta")


def _arange(func, args, kwargs) -> torch.Tensor | None:
    if not _on_meta_device(kwargs):
        return None
    start, end, step = (0, args[0], 1) if len(args) == 1 else (*args, 1)[:3]
    dtype = kwargs.get("dtype")
    if dtype is None:
        dtype = torch.int64 if all(isinstance(b, int) for b in (start, end, step)) else torch.get_default_dtype()
    return torch.empty(max(0, math.ceil((end - start) / step)), dtype=dtype, device="meta")


def _eye(func, args, kwargs) -> torch.Tensor | None:
    if not _on_meta_device(kwargs):
        return None
    return torch.empty((args[0], args[-1]), dtype=kwargs.get("dtype") or torch.get_default_dtype(), device="meta")


_RULES = {
    _aten.cat.default: _cat, _aten.convolution.default: _convolution,
    _aten.mm.default: _matmul, _aten.bmm.default: _matmul,
    **dict.fromkeys((_aten.sum.dim_IntList, _aten.mean.dim, _aten.amax.default, _aten.amin.default), _reduce),
    **dict.fromkeys((_aten.uniform_.default, _aten.normal_.default, _aten.fill_.Scalar, _aten.zero_.default), _fill),
    **dict.fromkeys((_aten.full_like.default, _aten.zeros_like.default, _aten.ones_like.default,
                     _aten.empty_like.default), _like),
    **dict.fromkeys((_aten.arange.default, _aten.arange.start, _aten.arange.start_step), _arange),
    _aten.eye.default: _eye, _aten.eye.m: _eye,
}


@functools.cache
def _rule(func):
    """The shape rule answering this op, or None: torch runs it."""
    return _RULES.get(func) or (_pointwise if torch.Tag.pointwise in func.tags else None)


class _ShapeOnly(TorchDispatchMode):
    """Answers the ops named in `_RULES`, and every pointwise op, on meta tensors from shapes."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # (True would wrap __torch_dispatch__ in torch._disable_dynamo)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = _rule(func)
        out = None if rule is None else rule(func, args, kwargs)
        return func(*args, **kwargs) if out is None else out


def shape_only() -> TorchDispatchMode:
    """A context manager: inside it, torch runs on meta tensors from shapes alone (see the module
    doc); values on other devices are computed as usual."""
    return _ShapeOnly()


def on_meta(model: torch.nn.Module) -> bool:
    """Whether the model's tensors all live on the meta device (and it has some)."""
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.is_meta for t in tensors)
