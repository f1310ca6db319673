"""Equivalence on random inputs: does the deploy model compute the training model's function?

The reference is the training model evaluated in float64 (its own tensors upcast, not a copy of
the module). Reported, each against that reference:

* the deploy model's max abs error, max relative error (max |deploy - ref| / max |ref|) and
  cosine similarity, end to end;
* the training model's own error in its checkpoint dtype: the floor that rounding alone gives;
* per converted block, the deploy block's relative error on the very input its training block
  saw, so a failing model points at the block that broke.

It passes when max_abs_err <= atol + rtol * max|ref| end to end and for every block, and no
output holds NaN or Inf (a non-finite value anywhere fails verification and is named).

The float floor: a model whose function jumps with rounding (a k-nearest-neighbour graph, top-k
queries) can miss the tolerance in its own dtype: the training model run in float32 is then as far
from the float64 reference as any deploy model could be. Where the training model (or block) itself
misses the tolerance, the deploy model (or block) passes within FLOOR_FACTOR times its error;
`at_floor` says so, and each such block carries its own floor. A floor above MAX_FLOOR (the model's
float32 output no longer tells anything) decides nothing, and neither does any floor when the caller
gave a tolerance (rtol or atol): that is taken as given.

Inputs: one N(0,1) tensor of `input_shape`, or whatever a spec's input hook builds
(`make_inputs(shape, generator, dtype)` returning a tensor, a tuple of positional arguments, or
`(args, kwargs)`), built once in float64 per sample; floating tensors are cast for each pass.

Every pass starts from the models as they were found: modules' plain attributes (caches a
module builds on its first call, such as timm LeViT's attention-bias cache or a detection head's
anchors) are snapshot before and restored after each pass, so no float64 tensor leaks from the
reference pass into the others, and the deploy model is left as it was given.

Low precision (float16 / bfloat16 weights): the models run in float32 on their exact
low-precision weights (CPU half kernels and float16's range on N(0,1) inputs do not decide the
verdict); the fused weights' own rounding is reported (`weight_rounding_rel_err`), and a module
whose activations would overflow the low-precision range is named (`overflow`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from reparam_cli.convert.engine import reparameterize
from reparam_cli.core.stats import FlopCounter
from reparam_cli.core.tensors import AttributeSnapshot, TensorGuard, all_finite
from reparam_cli.errors import ReparamError
from reparam_cli.io.runtimes import ExportedProgramModule, OnnxModule

# Defaults per checkpoint dtype: well above the rounding floor, well below what a wrong kernel gives.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (2e-2, 1e-3),
    torch.bfloat16: (8e-2, 1e-2),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)
# The float floor (module doc): the deploy model may be this many times the training model's own
# error, when that error itself misses the tolerance and is below MAX_FLOOR.
FLOOR_FACTOR = 4.0
MAX_FLOOR = 1e-2

# (args, kwargs) of one forward call.
Call = tuple[tuple, dict]
InputHook = Callable[[Sequence[int], torch.Generator, torch.dtype], Any]


@dataclass
class BlockError:
    path: str
    block_type: str
    max_rel_err: float
    ok: bool
    floor: float | None = None  # the training block's own error in its dtype, where the block passed by it


@dataclass
class VerifyResult:
    ok: bool
    max_abs_err: float
    max_rel_err: float
    cosine: float
    train_rel_err: float  # the training model's own error in its dtype vs float64
    rtol: float
    atol: float
    samples: int
    input_shape: list[int]
    seed: int
    blocks: list[BlockError] = field(default_factory=list)
    flops_train: int | None = None  # conv/linear FLOPs of one forward pass on input_shape
    flops_deploy: int | None = None
    worst_output: str = "output"  # the output leaf (path in a tuple/list/dict output) with the largest rel error
    compute_dtype: str = "float32"  # what the deploy model was run in (float32 for float16/bfloat16 weights)
    nonfinite: str | None = None  # where NaN/Inf appeared (verification then fails), e.g. "NaN in the deploy model's output"
    weight_rounding_rel_err: float | None = None  # low precision: fused weights vs their float64 values, max over tensors
    overflow: str | None = None  # low precision: the first module whose activations exceed the dtype's range
    at_floor: bool = False  # passed only by the float floor (the training model itself misses the tolerance)

    # The deploy model's output on the first sample (not a field: not reported). Writing compares
    # the file loaded back with it, instead of running the deploy model once more.
    first_output = None

    def worst_block(self) -> BlockError | None:
        return max(self.blocks, key=lambda b: _key(b.max_rel_err), default=None)

    def to_dict(self) -> dict:
        return asdict(self)


class PassFailed(Exception):
    """A model raised during one of verification's forward passes; `stage` says which, `shape_error`
    whether the message points at the input's shape (the user can fix that with another shape)."""

    def __init__(self, stage: str, exc: BaseException):
        text = str(exc).strip()
        self.detail = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
        super().__init__(f"{stage}: {self.detail}")
        self.stage, self.exc = stage, exc
        self.shape_error = is_shape_error(exc)


_SHAPE_WORDS = re.compile(
    r"shape|size|dimension|channels|mat1 and mat2|must match|height|width|out of (range|bounds)|\b\dD\b|"
    r"kernel|padding|stride|too small|divisible", re.IGNORECASE)


def is_shape_error(exc: BaseException) -> bool:
    """Does an exception raised by a model's forward point at its input's shape? (A dtype or device
    mismatch, a missing attribute or a NaN check is not something --input-shape can fix.)"""
    if isinstance(exc, IndexError):
        return True
    if not isinstance(exc, (RuntimeError, ValueError, AssertionError)):
        return False
    text = str(exc)
    if re.search(r"scalar type|dtype|device|should be the same", text, re.IGNORECASE):
        return False
    return bool(_SHAPE_WORDS.search(text))


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of a model's first floating parameter (float32 if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype verification runs a model of `dtype` in: float32 for float16/bfloat16 weights."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def tolerances(dtype: torch.dtype, rtol: float | None = None, atol: float | None = None) -> tuple[float, float]:
    d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
    return (d_rtol if rtol is None else rtol), (d_atol if atol is None else atol)


def _state_in(model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's parameters and buffers with floating ones cast to `dtype` (exact for upcasts)."""
    return {
        name: t.to(dtype) if t.is_floating_point() else t
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    }


def _owns_floating(m: nn.Module) -> bool:
    return any(t is not None and t.is_floating_point() for t in (*m._parameters.values(), *m._buffers.values()))


class OutsideRead(Exception):
    """A module's tensor was read outside its own module's forward, in its original dtype."""

    def __init__(self, name: str):
        super().__init__(f"{name} is read outside its module's forward")


_CASTING_PAUSED = contextvars.ContextVar("reparam_casting_paused", default=False)


@contextlib.contextmanager
def casting_paused() -> Iterator[None]:
    """Inside `cast_per_module`, run other code (a deploy block sharing modules with the training
    model) with every module's tensors as they are."""
    token = _CASTING_PAUSED.set(True)
    try:
        yield
    finally:
        _CASTING_PAUSED.reset(token)


@contextlib.contextmanager
def cast_per_module(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """While inside, each module's own floating parameters and buffers are cast to `dtype` just before
    its forward runs and put back right after: the model computes in `dtype` (upcasts are exact)
    while at most the running modules' cast copies exist, not a copy of the whole model.

    A tensor read outside its own module's forward (timm's `attn.rel_pos.get_bias()`, called by the
    parent) would keep its dtype, and not every op promotes mixed dtypes exactly (CPU
    `scaled_dot_product_attention` with a float32 mask and float64 queries computes something else):
    any op that receives such a tensor raises OutsideRead, and the caller casts the whole model
    instead. Everything is put back on exit, also after an exception."""
    open_: dict[int, list[list[tuple[dict, str, Tensor]]]] = {}
    originals = {id(t): name for name, t in (*model.named_parameters(remove_duplicate=False),
                                             *model.named_buffers(remove_duplicate=False))
                 if t is not None and t.is_floating_point() and t.dtype != dtype}

    def cast(m: nn.Module, args) -> None:
        saved = []
        if not _CASTING_PAUSED.get():
            token = _CASTING_PAUSED.set(True)  # the cast itself is not a read the watch below should see
            try:
                for store in (m._parameters, m._buffers):
                    for name, t in list(store.items()):
                        if t is not None and t.is_floating_point() and t.dtype != dtype:
                            saved.append((store, name, t))
                            store[name] = t.detach().to(dtype)
            finally:
                _CASTING_PAUSED.reset(token)
        open_.setdefault(id(m), []).append(saved)

    def put_back(m: nn.Module, args, out) -> None:
        for store, name, t in open_[id(m)].pop():
            store[name] = t

    def check(value) -> None:
        if isinstance(value, Tensor):
            if id(value) in originals:
                raise OutsideRead(originals[id(value)])
        elif isinstance(value, (tuple, list)):
            for v in value:
                check(v)
        elif isinstance(value, dict):
            for v in value.values():
                check(v)

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not _CASTING_PAUSED.get():
                check(args)
                check(kwargs)
            return func(*args, **kwargs)

    handles = []
    for m in model.modules():
        if _owns_floating(m):
            handles += [m.register_forward_pre_hook(cast), m.register_forward_hook(put_back)]
    try:
        with Watch():
            yield
    finally:
        for h in handles:
            h.remove()
        for stack in open_.values():  # modules whose forward raised
            for saved in reversed(stack):
                for store, name, t in saved:
                    store[name] = t


def _run_in(model: nn.Module, dtype: torch.dtype, call: Call, stage: str, snapshot: AttributeSnapshot,
            guard: TensorGuard | None = None):
    """`model` run in `dtype` (its floating tensors upcast, exactly): module by module where the
    model allows it (bounded memory), else on a cast copy of its whole state."""
    try:
        with _stage(stage, snapshot, guard), cast_per_module(model, dtype):
            return _call(model, None, call)
    except PassFailed:
        pass  # a tensor used outside its module's forward (or a real failure, raised again below)
    with _stage(stage, snapshot, guard):
        return _call(model, _state_in(model, dtype), call)


def _is_module_of_tensors(model: nn.Module) -> bool:
    """Can verification run this model on upcast copies of its tensors? (Not a TorchScript module
    nor a loaded runtime file such as ONNX or pt2: those run as they are.)"""

    return not isinstance(model, (torch.jit.ScriptModule, OnnxModule, ExportedProgramModule))


# --- inputs -------------------------------------------------------------------------------------

def as_call(value) -> Call:
    """An input hook's value as (args, kwargs): a tensor -> one argument; a dict -> one argument (a
    model taking a dict); a pair (tuple/list, dict) -> (args, kwargs); any other tuple/list -> args."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], dict):
        return tuple(value[0]), dict(value[1])
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    return (value,), {}


def default_inputs(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """One N(0,1) tensor of `shape` (what verification feeds a model whose spec has no input hook)."""
    return torch.randn(*shape, generator=generator, dtype=dtype)


def make_call(make_inputs: InputHook | None, shape: Sequence[int], generator: torch.Generator) -> Call:
    """One sample of verification inputs, built in float64, as (args, kwargs)."""
    hook = make_inputs or default_inputs
    try:
        value = hook(tuple(shape), generator, torch.float64)
    except Exception as exc:
        if make_inputs is None:  # no hook: the input shape itself cannot be made (too large, ...)
            raise PassFailed("making the verification input", exc) from exc
        raise PassFailed("the spec's input hook", exc) from exc
    args, kwargs = as_call(value)
    if not tensor_leaves((args, kwargs)):
        raise PassFailed("the spec's input hook", TypeError(f"it returned {type(value).__name__} holding no tensor"))
    return args, kwargs


def cast_floating(obj, dtype: torch.dtype):
    """A copy of a nested structure with every floating tensor cast to `dtype` (others kept)."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        items = [cast_floating(o, dtype) for o in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {k: cast_floating(v, dtype) for k, v in obj.items()}
    return obj


# --- outputs ------------------------------------------------------------------------------------

def tensor_leaves(out, path: str = "output") -> list[tuple[str, Tensor]]:
    """Every tensor in a model's output, with its path in the structure (`output`, `output[0]`,
    `output['boxes'][1]`, ...). Tuples, lists, dicts and nested mixes are walked in order; other
    values (None, ints, strings) are not compared."""
    if isinstance(out, Tensor):
        return [(path, out)]
    if isinstance(out, (list, tuple)):
        return [leaf for i, item in enumerate(out) for leaf in tensor_leaves(item, f"{path}[{i}]")]
    if isinstance(out, dict):
        return [leaf for k, item in out.items() for leaf in tensor_leaves(item, f"{path}[{k!r}]")]
    return []


def _first_tensor(out) -> Tensor:
    """The first tensor of a model's output (exported files compare this one)."""
    leaves = tensor_leaves(out)
    if not leaves:
        raise TypeError(f"model output of type {type(out).__name__} holds no tensor")
    return leaves[0][1]


class OutputNotComparable(ReparamError, ValueError):
    """A model's forward returned something without tensors (None, a string, a generator)."""


def _leaves(out, what: str) -> list[tuple[str, Tensor]]:
    leaves = tensor_leaves(out)
    if not leaves:
        raise OutputNotComparable(f"the {what} output (a {type(out).__name__}) holds no tensor to compare",
                                  hint="the model's forward must return tensors (or tuples, lists, dicts of them)")
    return leaves


def _key(value: float) -> float:
    """Sort key that ranks NaN above everything (a NaN error is the worst error)."""
    return math.inf if math.isnan(value) else value


def _worse(a: float, b: float) -> float:
    """The larger of two errors, NaN-aware (max() would drop a NaN)."""
    return a if _key(a) >= _key(b) else b


def _nonfinite_kind(t: Tensor) -> str | None:
    """'NaN', 'Inf' or None for a tensor's non-finite values."""
    if all_finite(t):
        return None
    return "NaN" if bool(torch.isnan(t).any()) else "Inf"


@dataclass
class Comparison:
    """One output compared with its reference, leaf by leaf (errors NaN when a leaf is non-finite)."""

    max_abs_err: float
    max_rel_err: float
    cosine: float
    ok: bool
    worst_path: str
    nonfinite: str | None = None


def compare_outputs(out, ref, rtol: float, atol: float, what: str) -> Comparison:
    """`out` against `ref`, leaf by leaf.

    Each leaf's relative error is scaled by that leaf's own magnitude, and each leaf must be within
    atol + rtol * max|leaf| (a small box-coordinate tensor is not hidden by large class scores).
    A NaN or Inf in either leaf makes the errors NaN and the comparison fail; `nonfinite` says where."""
    outs, refs = _leaves(out, what), _leaves(ref, "reference")
    if [p for p, _ in outs] != [p for p, _ in refs]:
        raise ValueError(f"the {what} output's structure {[p for p, _ in outs]} differs from the training "
                         f"model's {[p for p, _ in refs]}")
    worst_abs = worst_rel = 0.0
    worst_cos, ok, worst_path, nonfinite = 1.0, True, refs[0][0], None
    for (path, o), (_, r) in zip(outs, refs):
        if o.shape != r.shape:
            raise ValueError(f"{what} {path} has shape {tuple(o.shape)}, the training model's {tuple(r.shape)}")
        bad = [(kind, who) for kind, who in ((_nonfinite_kind(r), "the reference"), (_nonfinite_kind(o), f"the {what}"))
               if kind]
        if bad:
            nonfinite = nonfinite or "; ".join(f"{kind} in {who}'s {path}" for kind, who in bad)
            abs_err = rel_err = cos = math.nan
            ok = False
        else:
            abs_err, rel_err, cos = _errors(o, r)
            ok &= _within(abs_err, r, rtol, atol)
        if _key(rel_err) > _key(worst_rel) or (_key(rel_err) == _key(worst_rel) and _key(abs_err) > _key(worst_abs)):
            worst_path = path
        worst_abs, worst_rel = _worse(abs_err, worst_abs), _worse(rel_err, worst_rel)
        worst_cos = cos if math.isnan(cos) or math.isnan(worst_cos) else min(worst_cos, cos)
    return Comparison(worst_abs, worst_rel, worst_cos, bool(ok), worst_path, nonfinite)


def _compare(out, ref, rtol: float, atol: float, what: str) -> tuple[float, float, float, bool, str]:
    """(max abs err, max rel err, min cosine, ok, worst leaf path): `compare_outputs` as a tuple."""
    c = compare_outputs(out, ref, rtol, atol, what)
    return c.max_abs_err, c.max_rel_err, c.cosine, c.ok, c.worst_path


def _clone_leaves(out):
    """A copy of an output structure's tensors (later in-place ops must not change what was captured)."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        items = [_clone_leaves(o) for o in out]
        return items if isinstance(out, list) else tuple(items)
    if isinstance(out, dict):
        return {k: _clone_leaves(v) for k, v in out.items()}
    return out


def _errors(out: Tensor, ref: Tensor) -> tuple[float, float, float]:
    out64, ref64 = out.detach().to(torch.float64).flatten(), ref.detach().to(torch.float64).flatten()
    diff = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    rel = diff / scale if scale > 0 else diff
    denom = out64.norm() * ref64.norm()
    cos = (out64 @ ref64 / denom).item() if denom > 0 else 1.0
    return diff, rel, cos


def _within(abs_err: float, ref: Tensor, rtol: float, atol: float) -> bool:
    return abs_err <= atol + rtol * ref.detach().abs().max().item()


# --- leaving models as they were found --------------------------------------------------------------


class WeightsChanged(ReparamError):
    """A forward pass changed the model's own parameters or buffers: what would be written is not the checkpoint."""


def _check_weights(guard: TensorGuard | None, name: str, contents: bool = False) -> None:
    what = guard.changed(contents) if guard is not None else None
    if what:
        raise WeightsChanged(f"{name} changed the {what}; nothing was written",
                             hint="a model's forward must not modify its parameters or buffers (a training-only "
                                  "update belongs under `if self.training:`)")


@contextlib.contextmanager
def _stage(name: str, snapshot: AttributeSnapshot, guard: TensorGuard | None = None):
    """One forward pass: its failure is a PassFailed naming it; afterwards the models are as found,
    and their parameters and buffers untouched (WeightsChanged otherwise)."""
    try:
        yield
    except PassFailed:
        raise
    except Exception as exc:
        raise PassFailed(name, exc) from exc
    finally:
        snapshot.restore()
    _check_weights(guard, name)


def _call(model: nn.Module, state: dict[str, Tensor] | None, call: Call):
    args, kwargs = call
    if state is None:
        return model(*args, **kwargs)
    return functional_call(model, state, args, kwargs)


def _substate(state: dict[str, Tensor] | None, path: str) -> dict[str, Tensor] | None:
    if state is None:
        return None
    prefix = f"{path}." if path else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --- low precision ----------------------------------------------------------------------------------

def weight_rounding_error(train_model: nn.Module, deploy_model: nn.Module, blocks: Sequence[tuple[str, str]]) -> float | None:
    """Max over converted blocks and tensors of |deploy tensor - its float64 fusion| / max|float64 fusion|.

    Each training block is copied, upcast to float64 and fused again (one block at a time, so memory
    stays bounded): this is the rounding the deploy dtype alone adds to the fused weights (at most
    the dtype's unit roundoff, 2^-11 for float16, 2^-8 for bfloat16). None when no block compares."""

    worst: float | None = None
    for path, _ in blocks:
        try:
            exact = reparameterize(copy.deepcopy(train_model.get_submodule(path)).to(torch.float64))[0].state_dict()
            stored = deploy_model.get_submodule(path).state_dict()
        except Exception:  # figures only: a block that cannot be refused here is skipped
            continue
        if exact.keys() != stored.keys():
            continue
        for name, t64 in exact.items():
            if not t64.is_floating_point() or not t64.numel():
                continue
            scale = t64.abs().max().item()
            err = (stored[name].to(torch.float64) - t64).abs().max().item()
            worst = _worse(err / scale if scale > 0 else err, worst or 0.0)
    return worst


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next float of `dtype` (float16: 2^-11, bfloat16: 2^-8)."""
    return torch.finfo(dtype).eps / 2


def _overflow_hooks(model: nn.Module, dtype: torch.dtype, found: list[str], blocks: Sequence[str] = ()) -> list:
    """Forward hooks recording (in `found`) the first module whose output exceeds `dtype`'s range,
    named by the converted block it lies in (`block stage3.11 (stage3.11.conv, max |activation| ...)`)."""
    limit = torch.finfo(dtype).max

    def hook(_m, _args, out, path):
        if found:
            return
        for _, leaf in tensor_leaves(out):
            if leaf.is_floating_point() and leaf.numel():
                peak = leaf.detach().abs().max().item()
                if peak > limit:
                    block = max((b for b in blocks if path == b or path.startswith(f"{b}.")), key=len, default=None)
                    where = f"{path or '<root>'}, " if path != block else ""
                    figure = f"{where}max |activation| {peak:.3g} > {limit:.3g}"
                    found.append(f"block {block} ({figure})" if block is not None else f"{path or '<root>'} ({figure})")
                    return

    return [m.register_forward_hook(lambda m_, a, o, p=name: hook(m_, a, o, p)) for name, m in model.named_modules()]


def overflow_message(result: VerifyResult, dtype: torch.dtype) -> str | None:
    """The sentence a report gives when a low-precision deploy model's activations overflow."""
    if result.overflow is None:
        return None
    name = str(dtype).removeprefix("torch.")
    weights = ""
    if result.weight_rounding_rel_err is not None:
        exact = result.weight_rounding_rel_err <= unit_roundoff(dtype) * 1.01
        weights = ("; the fused weights are exact to " + name + " rounding" if exact else
                   f"; the fused weights' rounding error is {result.weight_rounding_rel_err:.3g}")
    return f"{name} activations overflow at {result.overflow} on N(0,1) inputs{weights}"


# --- verification -----------------------------------------------------------------------------------

def _holder(model: nn.Module, path: str) -> bool:
    try:
        return type(model.get_submodule(path)) is nn.Module
    except AttributeError:
        return False


def verify(
    train_model: nn.Module,
    deploy_model: nn.Module,
    input_shape: Sequence[int],
    *,
    blocks: Sequence[tuple[str, str]] = (),
    samples: int = 1,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    make_inputs: InputHook | None = None,
) -> VerifyResult:
    """Compare deploy_model to train_model (both in eval mode) on `samples` random batches of `input_shape`.

    Outputs may be tensors or tuples, lists and dicts of them (nested too): every tensor leaf is
    compared, each within atol + rtol * its own magnitude; `worst_output` names the worst leaf.
    `make_inputs(shape, generator, dtype)` builds each sample's inputs (default: one N(0,1) tensor
    of `input_shape`); see the module doc.

    `blocks` lists (path, block type) of converted blocks; each must exist at the same path in both
    models (a TorchScript deploy model gets end-to-end figures only: pass no blocks).

    Raises PassFailed when a model raises in one of the passes (which one is named).
    """
    dtype, deploy_dtype = model_dtype(train_model), model_dtype(deploy_model)
    # The coarser of the two dtypes sets the default tolerances.
    coarse = max((dtype, deploy_dtype), key=lambda d: tolerances(d)[0])
    floor_applies = rtol is None and atol is None  # a tolerance asked for is taken as given
    rtol, atol = tolerances(coarse, rtol, atol)
    # Low-precision models run in float32 on upcast copies of their exact tensors.
    train_run = compute_dtype(dtype)
    train_state = _state_in(train_model, train_run) if train_run != dtype else None
    upcast_deploy = _is_module_of_tensors(deploy_model) and compute_dtype(deploy_dtype) != deploy_dtype
    deploy_run = compute_dtype(deploy_dtype) if upcast_deploy else deploy_dtype
    deploy_state = _state_in(deploy_model, deploy_run) if upcast_deploy else None
    low = deploy_dtype if deploy_dtype in LOW_PRECISION else (dtype if dtype in LOW_PRECISION else None)

    # A block whose layers the graph pass merged into an ancestor's graph is only a holder of those
    # layers in the deploy model (no forward of its own): the end-to-end comparison covers it.
    blocks = [(p, t) for p, t in blocks if not _holder(deploy_model, p)]
    was_training = train_model.training
    train_model.eval()
    deploy_model.eval()
    snapshot = AttributeSnapshot(train_model, deploy_model)
    guard = TensorGuard(("training model's", train_model), ("deploy model's", deploy_model))
    gen = torch.Generator().manual_seed(seed)
    worst_abs = worst_rel = 0.0
    worst_cos = 1.0
    train_rel = 0.0
    ok = True
    block_errors: dict[str, BlockError] = {}
    block_results: dict[str, tuple[Comparison, BlockError]] = {}  # filled by the capture hooks
    flops: tuple[int | None, int | None] = (None, None)
    worst_output = "output"
    nonfinite: str | None = None
    overflow: list[str] = []
    first_output = None
    at_floor = False
    try:
        with torch.no_grad():
            for i in range(samples):
                call64 = make_call(make_inputs, input_shape, gen)
                block_failures: dict[str, BaseException] = {}
                near_floor: dict[str, tuple[Call, Any]] = {}  # failing blocks: (float64 input, reference)
                running: set[str] = set()
                hooks = []
                if i == 0:  # per-block figures from the first sample
                    for path, block_type in blocks:
                        def hook(_m, args, kwargs, out, path=path, block_type=block_type):
                            # Compared as the block's float64 output appears, then dropped: memory stays
                            # one block's activations, not every block's. (Its inputs are copied for the
                            # deploy block, which may change them in place.)
                            if path in running:  # the deploy block shares this module: its own call
                                return
                            deploy_block = deploy_model.get_submodule(path)
                            block_snapshot = AttributeSnapshot(deploy_block)
                            running.add(path)
                            try:
                                block_call = (_clone_leaves(args), _clone_leaves(kwargs))
                                with casting_paused():  # its modules shared with the training model too
                                    block_out = _call(deploy_block, _substate(deploy_state, path),
                                                      cast_floating(block_call, deploy_run))
                            except Exception as exc:  # raised below as this block's failure, not the pass's
                                block_failures[path] = exc
                                return
                            finally:
                                running.discard(path)
                                block_snapshot.restore()
                            bc = compare_outputs(block_out, out, rtol, atol, f"deploy block {path}")
                            block_results[path] = (bc, BlockError(path, block_type, bc.max_rel_err, bc.ok))
                            if not bc.ok and not bc.nonfinite:  # its training block's own floor, after the pass
                                near_floor[path] = (block_call, out)
                        hooks.append(train_model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
                try:
                    ref = _run_in(train_model, torch.float64, call64, "the training model's float64 reference pass",
                                  snapshot, guard)
                finally:
                    for h in hooks:
                        h.remove()
                # FLOPs are read off the first sample's passes (hooks, no extra forward).
                count_train, count_deploy = FlopCounter(), FlopCounter()
                countable = i == 0 and not isinstance(deploy_model, torch.jit.ScriptModule)
                watch = _overflow_hooks(deploy_model, low, overflow, [p for p, _ in blocks]) if i == 0 and low and upcast_deploy else []
                try:
                    with _stage("the deploy model's pass", snapshot, guard), \
                            count_deploy.attach(deploy_model) if countable else contextlib.nullcontext():
                        out = _call(deploy_model, deploy_state, cast_floating(call64, deploy_run))
                finally:
                    for h in watch:
                        h.remove()
                with _stage(f"the training model's {str(train_run).removeprefix('torch.')} pass", snapshot, guard), \
                        count_train.attach(train_model) if countable else contextlib.nullcontext():
                    own = _call(train_model, train_state, cast_floating(call64, train_run))
                if countable:
                    flops = (count_train.total, count_deploy.total)
                if i == 0:
                    first_output = out
                c = compare_outputs(out, ref, rtol, atol, "deploy model")
                own_rel = compare_outputs(own, ref, rtol, atol, "training model")
                train_rel = _worse(own_rel.max_rel_err, train_rel)
                nonfinite = nonfinite or c.nonfinite or own_rel.nonfinite
                if not c.ok and floor_applies and _within_floor(c, own_rel):
                    at_floor = True
                else:
                    ok &= c.ok
                if _key(c.max_rel_err) >= _key(worst_rel):
                    worst_output = c.worst_path
                worst_abs, worst_rel = _worse(c.max_abs_err, worst_abs), _worse(c.max_rel_err, worst_rel)
                worst_cos = c.cosine if math.isnan(c.cosine) or math.isnan(worst_cos) else min(worst_cos, c.cosine)
                for path, exc in block_failures.items():
                    raise PassFailed(f"deploy block {path}", exc) from exc
                for path, (call, expected) in near_floor.items() if floor_applies else ():
                    with _stage(f"the training block {path}'s {str(train_run).removeprefix('torch.')} pass",
                                snapshot, guard):
                        own_block = _call(train_model.get_submodule(path), _substate(train_state, path),
                                          cast_floating(call, train_run))
                    bc, error = block_results[path]
                    floor = compare_outputs(own_block, expected, rtol, atol, f"training block {path}")
                    if _within_floor(bc, floor):
                        block_results[path] = (bc, BlockError(path, error.block_type, bc.max_rel_err, True,
                                                              floor.max_rel_err))
                        at_floor = True
                for path, (bc, error) in block_results.items():
                    ok &= error.ok
                    nonfinite = nonfinite or bc.nonfinite
                    block_errors[path] = error
    finally:
        snapshot.restore()
        train_model.train(was_training)
    _check_weights(guard, "verification", contents=True)
    rounding = weight_rounding_error(train_model, deploy_model, blocks) if low and upcast_deploy else None
    result = VerifyResult(
        ok=bool(ok) and nonfinite is None, max_abs_err=worst_abs, max_rel_err=worst_rel, cosine=worst_cos,
        train_rel_err=train_rel, rtol=rtol, atol=atol, samples=samples, input_shape=list(input_shape), seed=seed,
        blocks=list(block_errors.values()), flops_train=flops[0], flops_deploy=flops[1], worst_output=worst_output,
        compute_dtype=str(deploy_run).removeprefix("torch."), nonfinite=nonfinite,
        weight_rounding_rel_err=rounding, overflow=overflow[0] if overflow else None,
        at_floor=bool(ok) and at_floor,
    )
    result.first_output = first_output
    return result


def _within_floor(deploy: Comparison, own: Comparison) -> bool:
    """Does a deploy model (or block) that misses the tolerance pass by the float floor: its training
    counterpart, run in its own dtype, misses the tolerance too, by an error below MAX_FLOOR, and
    the deploy error is at most FLOOR_FACTOR times that?"""
    if deploy.nonfinite or own.nonfinite or own.ok:
        return False
    return own.max_rel_err <= MAX_FLOOR and deploy.max_rel_err <= FLOOR_FACTOR * own.max_rel_err


def run_model(model: nn.Module, call: Call, what: str):
    """One forward pass of `model` on `call` = (args, kwargs), as verification runs it: low-precision
    weights upcast to float32 (floating inputs cast to the dtype it runs in), the model left as found.
    Raises PassFailed naming `what`."""
    dtype = model_dtype(model)
    run = compute_dtype(dtype) if _is_module_of_tensors(model) else dtype
    state = _state_in(model, run) if run != dtype else None
    guard = TensorGuard(("model's", model))
    with torch.no_grad(), _stage(what, AttributeSnapshot(model), guard):
        out = _call(model, state, cast_floating(call, run))
    _check_weights(guard, what, contents=True)
    return out


def compare_models(model: nn.Module, reference: nn.Module, call: Call, rtol: float, atol: float,
                   what: str) -> Comparison:
    """`model` against `reference` on one input (both run by `run_model`), leaf by leaf."""
    expected = run_model(reference, call, "the verified deploy model")
    return compare_outputs(run_model(model, call, what), expected, rtol, atol, what)
