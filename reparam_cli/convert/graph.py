"""Graph fusion: fold every exactly-foldable linear region of any network, and say what is left.

The engine converts blocks it has a recipe or a native method for; this pass folds what remains.
Each module subtree is traced with torch.fx (the engine's recipe and native products stay opaque
leaves). In the traced graph every tensor is followed as a *linear function of a region input*
(a `Kernel` from `algebra`, or a channel-agnostic map such as the identity whose channel count is
not known yet). Linear operations compose that function with the paradigms of `algebra`:

    conv / linear           P5 `sequential` (1x1 -> kxk, kxk -> 1x1; borders exact or refused)
    BatchNorm               P1 `fuse_bn` (P8 `bn_as_conv` on a region input)
    x * s + b (constants)   `scale_channels` (LayerScale, per-channel affine)
    a + b, cat([a, b], 1)   P2/P4 `add`, P3 `concat` (both sides functions of the same input)
    identity, dropout       P6a `identity`
    avg-pool                P7 `avgpool` (modules and F.avg_pool1d/2d/3d)
    zero padding            P6a `zero_pad` (ZeroPad, ConstantPad with 0, F.pad with zeros;
                            symmetric: it adds to the padding of the conv that follows)
    F.conv2d(x, W(params))  a weight computed from parameters only (RefConv, weight norm) is
                            evaluated once into a constant kernel

    BatchNorm kinds         `bn_kind`: the one rule for what is a BatchNorm (torch's, SyncBatchNorm,
                            FrozenBatchNorm, subclasses with their own forward such as timm's
                            BatchNormAct2d: their F.batch_norm folds, the activation stays)

A tensor becomes a region *output* (materialized) where a non-linear or unknown operation reads
it, where it fans out to several consumers (never duplicated work: cat([y, y]) reads y once),
where the model returns it, or where the next linear operation cannot be composed exactly (then
that refusal is reported). Reads of a tensor's shape or rank (shape checks) are no reads.

Exact by construction: every value's rank is followed where the code says it (`_rank`: convs,
flatten, view, reductions; the rank of a module's input comes from its parent's graph), so an
operation on dim 1 (BatchNorm1d, F.batch_norm) composes with a linear layer (last dim) only on a
2-d tensor; a tensor changed in place (`_mutations`, views included) may not be read by one
region before and after the change; `.item()` values are never constants (a meta skeleton has no
values). Each fold is checked on its own in float64 (`_check_region`, on a small random input of its
rank, of its captured shape where a recorded forward pass saw the region's input): a wrong one is
WrongFold.

Cost: a region is folded only when it gains (`_worth`: a lone BatchNorm stays, `kept`) and never
when its layer would have more parameters or multiply-adds than what it replaces (`_cost_problem`;
merges that would are split, each branch folding on its own, and a chain that would (an avg-pool
then a 1x1 conv) ends before the op that makes it so, which starts its own region; those
refusals are `kept`, not left).
Each region output worth folding becomes one conv / linear module applied to the region input.

Channel counts: a conv geometry argument the code reads from a tensor's channel dim (`groups=
x.shape[1]`, `x.size(-3) // 2`) is a constant where that count is known: from the layer that made
the tensor, or, for the module's input, from a recorded forward pass (`RecordedInputs`; a deploy
file stores the counts a fold used). Spatial sizes are never folded in: they change with the input.

Tracing: conditions on shapes only (`if x.shape[1] != C: raise`) are traced both ways and the one
path that runs is kept (with the condition as an assertion); tensor constants fx creates
(`_tensor_constant0`) are kept with the graph; parametrized modules are evaluated once
(`unparametrized`, called by the engine).

Recorded dataflow (`fold_recorded`, after the traced pass, when the caller gives an input): where
BatchNorms are left (modules fx cannot trace: `int()` of shape arithmetic, a `print`, a data-
dependent `if`; reshapes the analysis cannot follow), the model runs once on that input with a
dispatch mode and module hooks recording which tensor each conv / linear / BatchNorm call read and
produced and every other read of those outputs (any aten op; tolist / data_ptr / storage, which
reach memory without one, through a function mode). A pair folds when the BatchNorm reads exactly the
layer's output (or reshapes of it that keep the channel axis: LeViT's bn(linear(x).flatten(0, 1)))
and nothing else reads it, each runs once and neither is shared, the layer's forward is torch's
own, and no tensor value is read (`.item()`, `if t.any()`, `tolist()`) while the module running
both calls runs (nor after, if the layer's output leaves that module): another input could take
another path there. The layer gets the fused weight and bias (`fuse_bn`), the BatchNorm's place
an nn.Identity.
A deploy file stores the pairs (FuseOptions.recorded): its meta skeleton replays exactly those
folds without running anything, so values (or the recording rules) never make the two differ.

Modules: a module is replaced by an `fx.GraphModule` (same path, same class name, surviving
layers keep their names, e.g. `conv1` holds the fused conv and `bn1` is gone) only when a region
needs its level; children that hold only their own regions are processed on their own first, so
every region is reported, and verified, at the smallest module that contains it (a module whose
children are all leaves of its trace, a conv-BN-ReLU layer, is traced and analysed once). A
module that cannot be traced is recorded with the reason and its children are tried. Everything here is
structural, so the pass gives the same module tree and state-dict keys on `meta` (shape-only
skeletons rebuilt by `load_deploy`) and on real tensors; what a recorded forward pass decided
(pairs, channel counts) is stored and given back, never recomputed on meta.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from reparam_cli.blocks.registry import native_method
from reparam_cli.core import algebra as A
from reparam_cli.core.messages import describe
from reparam_cli.core.shapeonly import shape_only
from reparam_cli.core.tensors import AttributeSnapshot, shallow_copy
from reparam_cli.errors import NotEquivalent, ReparamError

FAMILY = "graph"


@dataclass
class FusedRegion:
    """One folded region: `path` is the module whose forward contains it (verified there),
    `layer` the fused module's name inside it, `before`/`after` the operations."""

    path: str
    layer: str
    before: str
    after: str

    @property
    def text(self) -> str:
        return f"{self.path or '<root>'}: {self.before} -> {self.after}"


@dataclass
class Remaining:
    """Something the conversion left in the deploy model: kind is 'batchnorm', 'untraceable',
    'unfoldable' or 'native-method'."""

    path: str
    kind: str
    reason: str


class _CostRule(NotEquivalent):
    """A fold refused because it would cost more (parameters or multiply-adds) than what it replaces:
    nothing foldable is left there, so it is reported as information (kind 'kept'), not as left."""


# --------------------------------------------------------------------------- linear values

@dataclass(frozen=True)
class _Lazy:
    """A channel-agnostic linear map (identity, avg-pool, zero padding) whose channel count is not
    known yet: make(channels, ndim) gives its Kernel. ndim is None when the rank is unknown too."""

    make: Callable[[int, int], A.Kernel]
    ndim: int | None = None
    identity: bool = False


@dataclass
class _Val:
    """A tensor as a linear function `lin` of the region input `root` (an fx Node)."""

    root: fx.Node
    lin: A.Kernel | _Lazy
    branches: list[str]            # what each summed / concatenated branch did, for the report
    nodes: list[fx.Node] = field(default_factory=list)   # absorbed operation nodes
    cost: float = 0.0              # multiply-adds per input position of the absorbed operations
    weighted: int = 0              # absorbed convs / linears
    count: int = 0                 # absorbed operations that do something (not identity / dropout)
    has_bn: bool = False
    dtype: torch.dtype | None = None
    params: float = 0.0            # parameters (and BatchNorm statistics) of the absorbed operations
    merged: bool = False           # branches summed / concatenated

    @property
    def trivial(self) -> bool:
        return not self.nodes


@dataclass
class _Op:
    """One linear operation: `fn` composes it after a Kernel; `alone` is its Kernel applied to the
    identity (None: build it from the identity); `channels`/`ndim` what it tells about its input."""

    desc: str
    fn: Callable[[A.Kernel], A.Kernel]
    channels: int | None = None
    ndim: int | None = None
    alone: Callable[[], A.Kernel] | None = None
    numel: int = 0                 # weight elements (cost), 0 for free ops
    weighted: bool = False
    bn: bool = False
    sequential: bool = False       # a P5 chain: checked against the FLOP rule
    dtype: torch.dtype | None = None
    lazy_ok: bool = True           # may stay lazy when the channel count is unknown
    params: int = 0                # parameters (and BatchNorm statistics) of the operation
    axis1: bool = False            # acts on dim 1 whatever the rank (BatchNorm1d, F.batch_norm)
    per_channel: bool = False      # numel is per channel (avg-pool: k*k multiply-adds per channel)
    keeps_shape: bool = False      # its output has its input's shape (BatchNorm, scale, identity)


def _kernel_desc(k: A.Kernel) -> str:
    if k.ndim == 0:
        text = "linear"
    else:
        text = "conv" + "x".join(str(s) for s in k.kernel_size)
    if k.groups > 1:
        text += f"/g{k.groups}"
    if any(s != 1 for s in k.stride):
        text += "/s" + "x".join(str(s) for s in k.stride) if len(set(k.stride)) > 1 else f"/s{k.stride[0]}"
    return text


def _cost(k: A.Kernel) -> float:
    return k.weight.numel() / math.prod(k.stride or (1,))


def _params(k: A.Kernel) -> int:
    """Parameters of the layer `A.to_module` makes of `k` (a linear layer is written out densely)."""
    return (k.out_channels * k.in_channels if k.ndim == 0 else k.weight.numel()) + k.out_channels


def _branch_text(branches: list[str]) -> list[str]:
    return [{"": "identity", "bn": "bn(identity)"}.get(b, b) for b in branches]


# --------------------------------------------------------------------------- tracing

class _Tracer(fx.Tracer):
    """torch.fx tracing with extra opaque leaves (recipe / native products, processed children).

    A condition on shapes only (`if x.shape[1] != self.num_channels: raise ...`, `assert x.dim() == 4`)
    takes the next value of `decisions` (False once they run out); `made` records what each took.
    `_trace` tries the combinations and keeps the one trace that completes (see there)."""

    def __init__(self, opaque: set[int], decisions: list[bool] | None = None):
        super().__init__()
        self.opaque = opaque
        self.decisions = list(decisions or [])
        self.made: list[bool] = []

    def to_bool(self, obj: fx.Proxy) -> bool:
        if not _shape_derived(obj.node):
            return super().to_bool(obj)
        value = self.decisions[len(self.made)] if len(self.made) < len(self.decisions) else False
        self.made.append(value)
        # The condition stays in the graph as a check: an input the original code refuses is refused.
        cond = obj if value else self.create_proxy("call_function", operator.not_, (obj,), {})
        self.create_proxy("call_function", torch._assert, (cond, "the input's shape takes a path the traced code "
                                                                   "does not (the original module raises or branches "
                                                                   "here)"), {})
        return value

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.opaque or bn_kind(m) == "frozen" or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module, opaque: set[int]) -> fx.Graph:
    """Trace `module`, leaving it as found: a forward that fills a cache or sets an attribute
    (`self.cache[k] = ...`, `self.anchors = ...`) would otherwise keep proxies from the trace, in
    containers the deploy model shares with the training model. Tensor constants that fx stores on
    the module (`_tensor_constant0`, ...) are kept in `graph.constants` instead."""
    optional = _optional_arguments(module)
    if optional:
        raise fx.proxy.TraceError(
            f"its forward takes {', '.join(optional)} (default None), which a caller may or may not pass: a trace "
            "cannot follow an `is None` test on it")
    snapshot = AttributeSnapshot(module)
    before = set(vars(module))
    todo: list[list[bool]] = [[]]
    done: list[fx.Graph] = []
    first: BaseException | None = None
    tries = 0
    # Shape conditions: every combination of their values is traced (at most 8 traces); a shape
    # check that raises on a wrong input leaves one trace that completes, the function the module
    # computes on every input it accepts. Two that complete: the code branches on shapes (refused).
    while todo and tries < 8:
        tries += 1
        tracer = _Tracer(opaque, todo.pop())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = tracer.trace(module)
            graph.constants = {k: v for k, v in vars(module).items() if k not in before and isinstance(v, torch.Tensor)}
            done.append(graph)
        except Exception as exc:
            first = first or exc
        finally:
            snapshot.restore()
        todo += [tracer.made[:i] + [not tracer.made[i]] for i in range(len(tracer.decisions), len(tracer.made))]
        if len(done) > 1:
            break
    if len(done) == 1 and not todo:
        return done[0]
    if len(done) > 1 or done:
        raise fx.proxy.TraceError("control flow on input shapes with more than one path that runs")
    assert first is not None
    raise first


def _optional_arguments(module: nn.Module) -> list[str]:
    """The forward's arguments that default to None (`forward(x, shortcut=None)`). fx makes each a
    placeholder, and `if shortcut is None:` is then silently false: the traced code would assume
    the argument is always passed. Such a module is not traced at its own level (its children
    are, and its conv+BN pairs fold on a recorded forward pass)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is None
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def _shape_derived(node: fx.Node, depth: int = 0) -> bool:
    """Whether `node` is computed from tensor shapes and constants only (x.shape[1] != 3, x.dim() == 4)."""
    if depth > 20:
        return False
    if _meta_read(node):
        return True
    if node.op not in ("call_function", "call_method") or not node.all_input_nodes:
        return False
    return all(_shape_derived(n, depth + 1) for n in node.all_input_nodes)


_PLAIN_TRACER = fx.Tracer()


def _is_builtin_leaf(m: nn.Module) -> bool:
    return _PLAIN_TRACER.is_leaf_module(m, "")


def _scope(node: fx.Node) -> list[str]:
    """The module paths (relative to the traced module) whose forward contains `node`."""
    stack = [k.split("@")[0] for k in (node.meta.get("nn_module_stack") or {})]
    if node.op == "call_module" and stack and stack[-1] == node.target:
        stack = stack[:-1]
    return stack


def _top(node: fx.Node) -> str | None:
    """The traced module's child that `node` belongs to (None: the module's own forward)."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target).split(".")[0]
    scope = _scope(node)
    return scope[0].split(".")[0] if scope else None


def unparametrized(module: nn.Module) -> nn.Module:
    """`module` itself, or, when it is parametrized (torch.nn.utils.parametrizations: weight_norm,
    orthogonal, spectral_norm, ...), a plain module of its own class holding each parametrized tensor
    evaluated once (its parametrizations gone, the rest shared). A deploy model needs the weight, not
    the recipe for it; and a parametrized module can be neither copied nor traced as a leaf."""
    from torch.nn.utils import parametrize

    hooked = _hooked_weights(module)
    if hooked:
        return hooked
    if not parametrize.is_parametrized(module):
        return module
    cls = next(c for c in type(module).__mro__[1:] if not getattr(c, "__module__", "").endswith("parametrize"))
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    new._modules = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    for name, plist in module.parametrizations.items():
        try:
            with torch.no_grad():
                value = getattr(module, name)
        except Exception:  # shape only (meta) where a parametrization cannot run: its original's shape
            ref = getattr(plist, "original", None)
            ref = ref if ref is not None else plist.original1
            value = torch.empty_like(ref)
        new._parameters[name] = nn.Parameter(value.detach().clone(), requires_grad=False)
    return new


def _hooked_weights(module: nn.Module) -> nn.Module | None:
    """The hook-based `torch.nn.utils.weight_norm` / `spectral_norm` (deprecated, still common):
    `module.weight` is recomputed by a forward pre-hook, so before a forward it may be stale. A
    shallow copy with each such weight computed now (spectral norm without a power iteration, as
    in eval), its `_g`/`_v` (`_orig`/`_u`/`_v`) tensors and hook gone; None if there is none."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    hooks = {k: h for k, h in module._forward_pre_hooks.items() if isinstance(h, (WeightNorm, SpectralNorm))}
    if not hooks:
        return None
    new = copy.copy(module)
    new.__dict__ = dict(module.__dict__)
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    new._forward_pre_hooks = type(module._forward_pre_hooks)(
        (k, h) for k, h in module._forward_pre_hooks.items() if k not in hooks)
    new._state_dict_pre_hooks = type(module._state_dict_pre_hooks)()
    new._load_state_dict_pre_hooks = type(module._load_state_dict_pre_hooks)()
    for hook in hooks.values():
        with torch.no_grad():
            if isinstance(hook, SpectralNorm):
                weight = hook.compute_weight(module, do_power_iteration=False)
                extra = ("_orig", "_u", "_v")
            else:
                weight = hook.compute_weight(module)
                extra = ("_g", "_v")
        for suffix in extra:
            new._parameters.pop(hook.name + suffix, None)
            new._buffers.pop(hook.name + suffix, None)
        new.__dict__.pop(hook.name, None)
        new._parameters[hook.name] = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return new


# --------------------------------------------------------------------------- what counts as a BatchNorm

_PLAIN_BN_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}


def bn_kind(m: nn.Module) -> str | None:
    """What kind of BatchNorm `m` is, the one rule the pass and its report use:

    'plain'   torch's BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm, and subclasses that keep their
              forward: in eval, y = (x - mean) / sqrt(var + eps) * weight + bias on dim 1;
    'frozen'  a FrozenBatchNorm (torchvision, detectron2): the same with fixed buffers;
    'fused'   a BatchNorm subclass with its own forward (timm's BatchNormAct2d: BN, drop, activation):
              traced into, its F.batch_norm folds and the rest stays;
    None      not a BatchNorm.
    """
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "plain" if type(m).forward in _PLAIN_BN_FORWARDS else "fused"
    if type(m).__name__.startswith("FrozenBatchNorm") and all(
            isinstance(getattr(m, k, None), torch.Tensor) for k in ("weight", "bias", "running_mean", "running_var")):
        return "frozen"
    return None


def bn_state(m: nn.Module) -> A.BNParams | str:
    """The eval-mode statistics of a 'plain' or 'frozen' BatchNorm, or why it cannot be folded."""
    if bn_kind(m) == "frozen":
        return A.BNParams(m.running_mean, m.running_var, float(getattr(m, "eps", 1e-5)), m.weight, m.bias)
    if m.running_mean is None or m.running_var is None:
        return (f"{type(m).__name__} without running statistics (track_running_stats=False) normalises by batch "
                "statistics in eval mode: it is no fixed linear map")
    try:
        return A.bn_params(m)
    except NotEquivalent as exc:
        return exc.message


# --------------------------------------------------------------------------- analysis

_FUNCTION_ARITH = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "sub",
                   operator.isub: "sub", torch.sub: "sub", operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
                   operator.truediv: "div", operator.itruediv: "div", torch.div: "div"}
_IN_PLACE_ARITH = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_METHOD_ARITH = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
                 "div": "div", "div_": "div"}
_CONV_FN = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_AVGPOOL = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_AVGPOOL_FN = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ZEROPAD = {nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3,
            nn.ConstantPad1d: 1, nn.ConstantPad2d: 2, nn.ConstantPad3d: 3}
_BN_NDIM = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


class _Analysis:
    """Follow every tensor of `graph` (traced from `module`) as a linear function of a region input.

    Results: `vals` (node -> _Val), `outputs` (materialized nodes, in graph order) and `refusals`
    ([(node, reason)]: linear operations that could not be composed exactly). With `shapes_only`
    the kernels are composed on the meta device: the same regions and refusals, no arithmetic
    (used to find where regions lie before the one analysis whose kernels are kept).
    """

    def __init__(self, module: nn.Module, graph: fx.Graph, shapes_only: bool = False,
                 opaque: set[int] = frozenset(), input_rank: int | None = None,
                 split: dict[fx.Node, str] | None = None,
                 channels_in: Callable[[], tuple[int, int] | None] | None = None):
        self.module = module
        # (rank, channel count) of the module's input as a recorded forward pass saw it (None: unknown)
        self.channels_in = channels_in
        self.shape_ranks: list[int | None] = []  # ranks of the tensors whose channel counts `_shape_int` read
        self.split = split or {}  # merges not made (a region through them would cost more): node -> why
        self.constants: dict[str, Any] = getattr(graph, "constants", {})
        self.input_rank = input_rank
        self.rank: dict[fx.Node, int | None] = {}
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.mutations = _mutations(module, graph)
        self.unsafe: set[fx.Node] = set()   # region outputs refused (an in-place change inside them)
        self.merges: set[fx.Node] = set()   # add / cat nodes made one layer
        self.cost_refused: set[fx.Node] = set()  # refusals by the cost rules (information, not left)
        self.opaque = opaque  # converted blocks: verified as they are, so never composed with
        self.graph = graph
        self.vals: dict[fx.Node, _Val] = {}
        self.consts: dict[fx.Node, Any] = {}
        self.outputs: dict[fx.Node, None] = {}
        self.refusals: list[tuple[fx.Node, str]] = []
        self.involved: dict[fx.Node, list[fx.Node]] = {}  # a refusal's node -> every node it concerns
        first = next((t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = first.dtype if first is not None else torch.float32  # of a region with no layer of its own
        if shapes_only:
            self.device = torch.device("meta")
        for node in graph.nodes:
            self._visit(node)
            self.rank[node] = _rank(self, node)
        for v in self.outputs:
            val = self.vals[v]
            if val.trivial:
                continue
            # The fused layer reads the input once, where the region's first operation read it:
            # every read must see the same tensor, so no in-place change may lie between them.
            reads = [self.order[n] for n in val.nodes if val.root in n.all_input_nodes]
            lo, hi = min(reads, default=0), max(reads, default=0)
            if any(lo <= p < hi for p in self.mutations.get(val.root, ())):
                self.unsafe.add(v)
                self.refusals.append((v, f"{', '.join(_branch_text(val.branches))}: reads {val.root.name} before and "
                                         "after an in-place change of it"))
                self.involved[v] = val.nodes

    def worth(self, v: fx.Node) -> bool:
        """Whether the region ending at `v` is folded: it removes something (see `_worth`) and no
        in-place operation changes its input while it is read."""
        return v not in self.unsafe and _worth(self.vals[v])

    # ----- bookkeeping

    def _root(self, node: fx.Node) -> _Val:
        return _Val(node, _Lazy(self._identity, identity=True), [""])

    def _t(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A tensor as the analysis computes with it: detached, float64, on its device."""
        return None if t is None else t.detach().to(device=self.device, dtype=torch.float64)

    def _k(self, k: A.Kernel) -> A.Kernel:
        return replace(k, weight=self._t(k.weight), bias=self._t(k.bias))

    def _identity(self, channels: int, ndim: int) -> A.Kernel:
        return A.identity(channels, 1, groups=channels, ndim=ndim, dtype=torch.float64, device=self.device)

    def _materialize(self, node: fx.Node) -> None:
        if node in self.vals:
            self.outputs[node] = None

    def _operand(self, node: fx.Node, keeps_shape: bool = True) -> _Val | None:
        """The value an operation composes with: a tensor read by several operations (or already a
        region output) is a region input of its own, so no work is ever duplicated. Reads of its
        rank (`x.ndim`, `x.dim()`) are no reads: they read the fused layer's output, which has the
        same rank; reads of its shape (`x.shape`, `x.size()`) too when `keeps_shape`."""
        if node not in self.vals:
            return None
        shape_read = any(_meta_read(u) == "shape" for u in node.users)
        if node in self.outputs or _uses(node) > 1 or (shape_read and not keeps_shape):
            self._materialize(node)
            return self._root(node)
        return self.vals[node]

    def _opaque(self, node: fx.Node) -> None:
        for inp in node.all_input_nodes:
            self._materialize(inp)
        self.vals[node] = self._root(node)

    def _visit(self, node: fx.Node) -> None:
        if _meta_read(node) and node.args[0] in self.vals:
            return  # x.shape, x.ndim of a tensor: no read of its values (the shape check of a layer)
        if node.op == "placeholder":
            self.vals[node] = self._root(node)
        elif node.op == "get_attr":
            self.consts[node] = _fetch(self.module, str(node.target), self.constants)
        elif node.op == "output":
            for inp in node.all_input_nodes:
                self._materialize(inp)
        elif not self._linear(node):
            if node.all_input_nodes and all(i in self.consts for i in node.all_input_nodes) \
                    and not _in_place(self.module, node):
                try:  # a weight transform: depends on parameters only, so evaluate it once
                    # Never a number read from a tensor's values (`.item()`, `.tolist()`): a shape-only
                    # skeleton has no values, so folding it would make skeleton and file differ.
                    if not _reads_values(node):
                        self.consts[node] = self._evaluate(node)
                        return
                except Exception:
                    pass
            self._opaque(node)

    def _evaluate(self, node: fx.Node) -> Any:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.consts[n])
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return self.module.get_submodule(node.target)(*args, **kwargs)

    # ----- composing

    def _apply(self, node: fx.Node, src: fx.Node, op: _Op) -> bool:
        """Compose `op` (reading `src`) into src's value; on refusal start a region at `src`."""
        val = self._operand(src, op.keeps_shape)
        if val is None:
            return False
        try:
            self.vals[node] = self._compose(val, op, node)
            return True
        except NotEquivalent as exc:
            if isinstance(exc, _CostRule):
                self.cost_refused.add(node)
            if val.trivial:
                self.refusals.append((node, f"{op.desc}: {exc.message}"))
                return False
            before = ", ".join(_branch_text(val.branches))
            self.refusals.append((node, f"{before} -> {op.desc}: {exc.message}"))
            self.involved[node] = val.nodes + [node]
        self._materialize(src)
        try:
            self.vals[node] = self._compose(self._root(src), op, node)
            return True
        except NotEquivalent:
            return False

    def _compose(self, val: _Val, op: _Op, node: fx.Node) -> _Val:
        lin = val.lin
        if op.axis1 and op.ndim is None and isinstance(lin, A.Kernel) and lin.ndim == 0:
            raise NotEquivalent("it acts on dim 1 and the linear layer before it on the last dim: the same axis only "
                                "on a 2-d input, and the rank here is not known")
        if isinstance(lin, _Lazy) and lin.identity and op.alone is not None:
            new: A.Kernel | _Lazy = op.alone()
        elif isinstance(lin, _Lazy):
            ndim = op.ndim if lin.ndim is None else lin.ndim
            if op.ndim is not None and lin.ndim is not None and op.ndim != lin.ndim:
                raise NotEquivalent(f"a {op.ndim}-d operation on a {lin.ndim}-d tensor")
            if op.channels is not None and ndim is not None:
                new = op.fn(lin.make(op.channels, ndim))
            elif op.lazy_ok:
                prev = lin
                new = _Lazy(lambda c, n: op.fn(prev.make(c, n)), ndim)
            else:
                raise NotEquivalent("the channel count or rank of its input is unknown")
        else:
            if op.ndim is not None and lin.ndim != op.ndim:
                raise NotEquivalent(f"a {op.ndim}-d operation on a {lin.ndim}-d result")
            new = op.fn(lin)
        numel = op.numel * (new.out_channels if op.per_channel and isinstance(new, A.Kernel) else 1)
        cost = val.cost + (numel / math.prod(new.stride or (1,)) if isinstance(new, A.Kernel) else numel)
        params = val.params + op.params
        # A chain that would cost more ends before this op, which starts its own region: an
        # avg-pool then a 1x1 conv + BN (Inception's pool branch) keeps the pool and folds conv + BN.
        weighed = op.sequential and isinstance(new, A.Kernel) and not val.trivial and (val.weighted or op.weighted)
        if weighed and _cost(new) > cost * (1 + 1e-9):
            raise _CostRule(f"the fused {_kernel_desc(new)} costs more multiply-adds than the layers it replaces "
                            "(FLOP rule)")
        if weighed and val.weighted and _params(new) > params:  # (a first conv may gain a bias: the region decides)
            raise _CostRule(f"the fused {_kernel_desc(new)} has more parameters ({_params(new)}) than the layers "
                                f"it replaces ({int(params)})")
        if not op.desc:
            branch = val.branches
        elif len(val.branches) == 1:
            branch = [val.branches[0] + "+" + op.desc if val.branches[0] else op.desc]
        else:
            branch = ["(" + ", ".join(_branch_text(val.branches)) + ")+" + op.desc]
        return _Val(val.root, new, branch, val.nodes + [node], cost, val.weighted + op.weighted,
                    val.count + bool(op.desc), val.has_bn or op.bn, val.dtype or op.dtype, params, val.merged)

    def _merge(self, node: fx.Node, srcs: list[fx.Node], how: str, coefs: list[float] | None = None) -> bool:
        """a + b (how='add') or torch.cat(srcs, channels) (how='cat') of functions of one input."""
        if len(set(srcs)) < len(srcs):  # cat([y, y]), y + y: y is computed once, as a region input
            for s in srcs:
                self._materialize(s)
        vals = [self._operand(s, how == "add") for s in srcs]
        if any(v is None for v in vals):
            return False
        roots = {v.root for v in vals}
        if len(roots) > 1:
            return False  # different inputs (a residual join of two regions): each side is its own region
        kernels = [v.lin for v in vals if isinstance(v.lin, A.Kernel)]
        if not kernels and all(v.trivial for v in vals):
            return False  # x + x, cat([x, x]): nothing to fold
        try:
            if not kernels:
                raise NotEquivalent("no branch tells the channel count")
            ref = kernels[0]
            ks = [v.lin if isinstance(v.lin, A.Kernel) else v.lin.make(ref.in_channels, ref.ndim) for v in vals]
            if coefs is not None:
                ks = [k if c == 1 else A.scale_channels(k, c) for k, c in zip(ks, coefs)]
            if how == "add":
                fused = A.add(*ks)
            else:
                if ref.ndim == 0:
                    raise NotEquivalent("concatenating linear outputs is only exact along the last dim")
                fused = A.concat(*ks)
            if how == "cat" and self.rank.get(srcs[0]) not in (None, ref.ndim + 2):
                raise NotEquivalent(f"dim 1 of a rank-{self.rank.get(srcs[0])} tensor is not the channels of a "
                                    f"{ref.ndim}-d conv")
            if node in self.split:
                raise _CostRule(self.split[node])
            cost, params = sum(v.cost for v in vals), sum(v.params for v in vals)
        except NotEquivalent as exc:
            if isinstance(exc, _CostRule):
                self.cost_refused.add(node)
            self.refusals.append((node, f"{how} of {', '.join(_branch_text(sum((v.branches for v in vals), [])))}: "
                                        f"{exc.message}"))
            self.involved[node] = sum((v.nodes for v in vals), []) + [node]
            for s in srcs:
                self._materialize(s)
            return False
        self.merges.add(node)
        branches = sum((v.branches for v in vals), [])
        if coefs is not None:
            branches = sum(([b if c == 1 else f"{c:g}*{b or 'identity'}" for b in v.branches]
                            for v, c in zip(vals, coefs)), [])
        if how == "cat":
            branches = ["cat(" + ", ".join(_branch_text(branches)) + ")"]
        self.vals[node] = _Val(vals[0].root, fused, branches, sum((v.nodes for v in vals), []) + [node],
                               cost, sum(v.weighted for v in vals),
                               sum(v.count for v in vals) + 1, any(v.has_bn for v in vals),
                               next((v.dtype for v in vals if v.dtype), None), params, True)
        return True

    def _linear(self, node: fx.Node) -> bool:
        """Compose `node` if it is a linear operation; False leaves it to the caller (opaque)."""
        if node.op == "call_module":
            return self._module(node)
        args = list(node.args)
        target = node.target
        if node.op == "call_method":
            how = _METHOD_ARITH.get(str(target))
            if how and len(args) == 2 and set(node.kwargs) <= {"alpha"}:
                if target.endswith("_") and not self._may_replace_in_place(args[0]):
                    return False
                return self._binary(node, args, how, node.kwargs.get("alpha", 1))
            if target in ("neg", "neg_") and len(args) == 1 and not node.kwargs:
                if target.endswith("_") and not self._may_replace_in_place(args[0]):
                    return False
                return isinstance(args[0], fx.Node) and self._apply(node, args[0], self._affine_op(-1.0, "mul"))
            return False
        if node.op != "call_function":
            return False
        how = _FUNCTION_ARITH.get(target)
        if how and len(args) == 2 and set(node.kwargs) <= {"alpha"}:
            if target in _IN_PLACE_ARITH and not self._may_replace_in_place(args[0]):
                return False
            return self._binary(node, args, how, node.kwargs.get("alpha", 1))
        if target in (operator.neg, torch.neg) and len(args) == 1 and not node.kwargs and isinstance(args[0], fx.Node):
            return self._apply(node, args[0], self._affine_op(-1.0, "mul"))
        if target is torch.cat:
            tensors = args[0] if args else node.kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            if dim != 1 or not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
                return False
            return self._merge(node, list(tensors), "cat")
        if target in _CONV_FN or target is F.linear:
            return self._functional(node)
        if target is F.batch_norm:
            return self._functional_bn(node)
        if target in _AVGPOOL_FN and isinstance(args[0] if args else None, fx.Node):
            names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
            bound = {**dict(zip(names, args[1:])), **node.kwargs}
            if set(bound) - set(names) or "kernel_size" not in bound:
                return False
            return self._avgpool(node, args[0], _AVGPOOL_FN[target], **bound)
        if target is F.pad and args and isinstance(args[0], fx.Node):
            bound = {**dict(zip(["pad", "mode", "value"], args[1:])), **node.kwargs}
            if bound.get("mode", "constant") != "constant" or (bound.get("value") or 0.0) != 0.0:
                return False
            return self._pad(node, args[0], bound.get("pad"))
        return False

    _INT_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod, int}

    def _shape_int(self, node: Any, depth: int = 0) -> int | None:
        """The value of a number the code computes from a tensor's channel count (`x.shape[1]`,
        `x.size(1) // 2`): structural like a weight's shape, so a fold may use it. Only channel
        counts: the spatial sizes change with the input, and a fold must not bake them in."""
        if not isinstance(node, fx.Node) or depth > 8:
            return node if isinstance(node, int) and not isinstance(node, bool) else None
        if node in self.consts:
            value = self.consts[node]
            return value if isinstance(value, int) and not isinstance(value, bool) else None
        if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and not node.kwargs:
            return self._channels(node.args[0], node.args[1])
        if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 \
                and isinstance(node.args[0], fx.Node) and _meta_read(node.args[0]) == "shape" \
                and (node.args[0].target == "size" and len(node.args[0].args) == 1
                     or node.args[0].args[1:] == ("shape",)):
            return self._channels(node.args[0].args[0], node.args[1])
        if node.op == "call_function" and node.target in self._INT_OPS and not node.kwargs:
            args = [self._shape_int(a, depth + 1) for a in node.args]
            if any(a is None for a in args):
                return None
            value = node.target(*args)
            return value if isinstance(value, int) else (int(value) if float(value).is_integer() else None)
        return None

    def _resolved(self, node: fx.Node) -> Any:
        """`node`'s value if it is a channel count (`_shape_int`; kept as a constant, so the fold and its
        check read the number, not the tensor it came from), else `node`."""
        value = self._shape_int(node)
        if value is None:
            return node
        self.consts[node] = value
        return value

    def _channels(self, t: Any, dim: Any) -> int | None:
        """The size of `t`'s dim `dim` when that is its channel dim (dim 1 of a conv-rank tensor) and known."""
        if not isinstance(t, fx.Node) or not isinstance(dim, int):
            return None
        val = self.vals.get(t)
        if val is not None and isinstance(val.lin, A.Kernel) and val.lin.ndim > 0 and not val.trivial:
            rank, channels = self.rank.get(t) or val.lin.ndim + 2, val.lin.out_channels
        elif t.op == "placeholder" and next(iter(self.order)) is t and self.channels_in is not None \
                and (seen := self.channels_in()) is not None:
            rank, channels = seen
        else:
            return None
        if dim < 0:
            dim += rank
        if dim != 1:
            return None
        self.shape_ranks.append(rank)
        return channels

    def _may_replace_in_place(self, node: Any) -> bool:
        """An in-place op may be fused only where nobody else sees the tensor it mutates."""
        return isinstance(node, fx.Node) and node.op != "placeholder" and len(node.users) == 1

    def _const(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.consts.get(arg)
        return arg if isinstance(arg, (int, float)) and not isinstance(arg, bool) else None

    def _binary(self, node: fx.Node, args: list, how: str, alpha: Any = 1) -> bool:
        """a + alpha * b, a - alpha * b (a merge when both are functions of the region input),
        x * c, x / c, x + c, x - c, c - x with constants c (a per-channel scale and shift)."""
        a, b = args
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            return False
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in self.vals and b in self.vals:
            if how not in ("add", "sub"):
                return False
            return self._merge(node, [a, b], "add", [1.0, float(alpha) * (1 if how == "add" else -1)])
        first = isinstance(a, fx.Node) and a in self.vals
        src, other = (a, b) if first else (b, a)
        if not isinstance(src, fx.Node) or src not in self.vals:
            return False
        value = self._const(other)
        if value is None or (isinstance(value, torch.Tensor) and not value.is_floating_point()):
            return False
        if how == "div":
            if not first:
                return False  # c / x is no linear map
            if isinstance(value, torch.Tensor):
                value = 1.0 / value
            elif value == 0:
                return False
            else:
                value = 1.0 / value
            how = "mul"
        elif how in ("add", "sub"):
            if not first and (alpha != 1 or how == "sub"):
                if how == "add" or alpha != 1:
                    return False  # c + alpha * x: rare, left opaque
                how = "rsub"  # c - x
            elif how == "sub" or alpha != 1:
                value = value * (alpha * (-1 if how == "sub" else 1))
                how = "add"
        op = self._affine_op(value, how)
        return op is not None and self._apply(node, src, op)

    def _affine_op(self, value: Any, how: str) -> _Op | None:
        """x * value or x + value as a per-channel scale/shift; the value's shape says which dim is
        the channel dim: (C,) is the last dim (a linear layer's output), (C, 1, ..., 1) dim 1."""
        if isinstance(value, torch.Tensor):
            shape = tuple(value.shape)
            while len(shape) > 1 and shape[0] == 1:  # (1, C, 1, 1) broadcasts like (C, 1, 1)
                shape = shape[1:]
            if value.numel() == 1:
                ndim, channels = None, None
            elif len(shape) >= 1 and all(s == 1 for s in shape[1:]):
                ndim, channels = len(shape) - 1, shape[0]
            else:
                return None
            value = self._t(value)
        else:
            ndim, channels = None, None
        if how == "mul":
            return _Op("scale", lambda k: A.scale_channels(k, value), channels, ndim, numel=channels or 1,
                       params=channels or 1, keeps_shape=True)
        if how == "rsub":
            return _Op("neg+shift", lambda k: A.scale_channels(k, -1.0, value), channels, ndim, numel=channels or 1,
                       params=channels or 1, keeps_shape=True)
        return _Op("shift", lambda k: A.scale_channels(k, None, value), channels, ndim, params=channels or 1,
                   keeps_shape=True)

    def _module(self, node: fx.Node) -> bool:
        m = self.module.get_submodule(str(node.target))
        if id(m) in self.opaque or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return False
        src = node.args[0]
        if isinstance(m, _IDENTITY_MODULES):
            return self._apply(node, src, _Op("", lambda k: k, keeps_shape=True))
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            try:
                k = self._k(A.from_module(m))
            except NotEquivalent as exc:
                self.refusals.append((node, f"{type(m).__name__}: {exc.message}"))
                return False
            return self._apply(node, src, _Op(_kernel_desc(k), lambda prev: A.sequential(prev, k), k.in_channels,
                                              k.ndim, alone=lambda: k, numel=k.weight.numel(), weighted=True,
                                              sequential=True, dtype=m.weight.dtype,
                                              params=sum(p.numel() for p in m.parameters(recurse=False))))
        kind = bn_kind(m)
        if kind in ("plain", "frozen"):
            state = bn_state(m)
            if isinstance(state, str):
                self.refusals.append((node, state))
                return False
            ndim = 2 if kind == "frozen" else _BN_NDIM.get(type(m))
            return self._bn(node, src, state, ndim)
        if kind == "fused":
            return False  # its own forward (a BatchNorm with an activation) is traced into, not a leaf
        if type(m) in _AVGPOOL:
            return self._avgpool(node, src, _AVGPOOL[type(m)], m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                 m.count_include_pad, getattr(m, "divisor_override", None))
        if type(m) in _ZEROPAD and float(getattr(m, "value", 0.0)) == 0.0:
            return self._pad(node, src, m.padding, _ZEROPAD[type(m)])
        return False

    def _bn(self, node: fx.Node, src: fx.Node, p: A.BNParams, ndim: int | None) -> bool:
        """An eval-mode BatchNorm on dim 1 (P1 after a layer, P8 on a region input). Without a fixed
        rank (BatchNorm1d: (N, C) or (N, C, L), SyncBatchNorm, F.batch_norm) the rank of its input
        decides: dim 1 of an (N, C) tensor is the last dim, that of a linear layer before it."""
        if ndim is None and self.rank.get(src) is not None:
            ndim = self.rank[src] - 2
        channels = p.mean.shape[0]
        dtype = p.mean.dtype
        p = A.BNParams(self._t(p.mean), self._t(p.var), p.eps, self._t(p.weight), self._t(p.bias))
        alone = None if ndim is None else (lambda: A.bn_as_conv(p, 1, ndim=ndim, dtype=torch.float64))
        # Its parameters (weight and bias; the running statistics are buffers): a fold may not leave the
        # model with more parameters than it had (a bias on a wide conv after it can outgrow them).
        learnable = 2 * channels if p.weight is not None else 0
        return self._apply(node, src, _Op("bn", lambda k: A.fuse_bn(k, p, dtype=torch.float64), channels,
                                          ndim, alone=alone, numel=channels, bn=True, dtype=dtype, lazy_ok=False,
                                          params=learnable, axis1=True, keeps_shape=True))

    def _functional_bn(self, node: fx.Node) -> bool:
        """F.batch_norm in eval form (constant running statistics, training=False): what BatchNorm
        subclasses with their own forward call (timm's BatchNormAct2d)."""
        names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        src = bound.get("input")
        if not isinstance(src, fx.Node) or src not in self.vals:
            return False
        mean, var = self._const(bound.get("running_mean")), self._const(bound.get("running_var"))
        if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
            self.refusals.append((node, "batch_norm without running statistics normalises by batch statistics in "
                                        "eval mode: it is no fixed linear map"))
            return False
        if bound.get("training", False) is not False:
            return False
        weight, bias = bound.get("weight"), bound.get("bias")
        weight = None if weight is None else self._const(weight)
        bias = None if bias is None else self._const(bias)
        if (bound.get("weight") is not None and not isinstance(weight, torch.Tensor)) or \
                (bound.get("bias") is not None and not isinstance(bias, torch.Tensor)):
            return False
        eps = bound.get("eps", 1e-5)
        if not isinstance(eps, (int, float)):
            return False
        try:
            p = A.bn_params(A.BNParams(mean, var, float(eps), weight, bias))
        except NotEquivalent as exc:
            self.refusals.append((node, exc.message))
            return False
        return self._bn(node, src, p, None)

    def _avgpool(self, node: fx.Node, src: fx.Node, n: int, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None) -> bool:
        spec = dict(kernel_size=kernel_size, stride=stride or None, padding=padding, ndim=n,
                    count_include_pad=count_include_pad, ceil_mode=ceil_mode, divisor_override=divisor_override)
        ks = (kernel_size,) * n if isinstance(kernel_size, int) else tuple(kernel_size)

        def pool(prev: A.Kernel) -> A.Kernel:
            return A.sequential(prev, A.avgpool(prev.out_channels, device=self.device, **spec))

        return self._apply(node, src, _Op("avgpool" + "x".join(map(str, ks)), pool, None, n,
                                          numel=math.prod(ks), sequential=True, per_channel=True))

    def _pad(self, node: fx.Node, src: fx.Node, pads: Any, n: int | None = None) -> bool:
        """Zero padding in F.pad's order (last dim first, (before, after) per dim): symmetric
        amounts compose as `zero_pad` (P6a with padding); anything else is an opaque operation."""
        pads = tuple(pads) if isinstance(pads, (list, tuple)) else ()  # (torch's pad modules hold tuples too)
        if not pads or len(pads) % 2 or not all(isinstance(p, int) for p in pads):
            return False
        per_dim = [pads[i] for i in range(0, len(pads), 2)][::-1]  # first spatial dim first
        if any(pads[i] != pads[i + 1] for i in range(0, len(pads), 2)):
            return False  # (no conv pads asymmetrically: an opaque op, and the layers around it fold alone)
        val = self.vals.get(src)
        if val is not None and isinstance(val.lin, A.Kernel) and len(per_dim) > val.lin.ndim:
            return False  # it pads channels (a linear layer's output): not a spatial padding at all

        def pad(prev: A.Kernel) -> A.Kernel:
            if len(per_dim) > prev.ndim:
                raise NotEquivalent(f"padding {list(pads)} reaches past the {prev.ndim} spatial dims")
            amounts = [0] * (prev.ndim - len(per_dim)) + per_dim
            return A.sequential(prev, A.zero_pad(prev.out_channels, amounts, device=self.device))

        return self._apply(node, src, _Op("pad" + "x".join(map(str, per_dim)), pad, None, n))

    def _functional(self, node: fx.Node) -> bool:
        """F.conv2d / F.linear whose weight (and bias) depend on parameters only."""
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        self.shape_ranks = []
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        for key in ("stride", "padding", "dilation", "groups"):  # computed from parameter shapes: constants
            # (or from a channel count: `groups=x.shape[1]`, structural like a weight's shape)
            value = fx.node.map_arg(bound.get(key), lambda n: self.consts.get(n, self._resolved(n)))
            bound[key] = value
            found: list = []
            fx.node.map_arg(value, found.append)
            if found or isinstance(value, torch.Tensor):
                return False
        n = _CONV_FN.get(node.target)
        if n is not None and any(r != n + 2 for r in self.shape_ranks):
            return False  # a channel count read from an unbatched input (dim 1 is no channel dim there)
        src, weight = bound.get("input"), self._const(bound.get("weight"))
        bias = bound.get("bias")
        bias = None if bias is None else self._const(bias)
        if not isinstance(src, fx.Node) or not isinstance(weight, torch.Tensor):
            return False
        if bound.get("bias") is not None and not isinstance(bias, torch.Tensor):
            return False
        if node.target is F.linear:
            k = A.Kernel(self._t(weight), self._t(bias))
        else:
            n = _CONV_FN[node.target]

            def tup(v: Any, default: int) -> tuple[int, ...]:
                v = default if v is None else v
                return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n

            padding = bound.get("padding", 0)
            if isinstance(padding, str):
                try:
                    padding = 0 if padding == "valid" else A.same_padding(
                        weight.shape[2:], tup(bound.get("dilation"), 1))
                except NotEquivalent as exc:
                    self.refusals.append((node, f"conv: {exc.message}"))
                    return False
            k = A.Kernel(self._t(weight), self._t(bias), tup(bound.get("stride"), 1), tup(padding, 0),
                         tup(bound.get("dilation"), 1),
                         int(bound.get("groups") or 1))
        return self._apply(node, src, _Op(_kernel_desc(k), lambda prev: A.sequential(prev, k), k.in_channels,
                                          k.ndim, alone=lambda: k, numel=k.weight.numel(), weighted=True,
                                          sequential=True, dtype=weight.dtype,
                                          params=weight.numel() + (0 if bias is None else bias.numel())))


def _fetch(module: nn.Module, target: str, constants: dict[str, Any] | None = None) -> Any:
    if constants and target in constants:  # a tensor constant fx put on the module while tracing
        return constants[target]
    obj: Any = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


_VALUE_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu", "any", "all"}


def _reads_values(node: fx.Node) -> bool:
    """Whether `node` turns a tensor's values into Python values (shapes are fine: they are structural)."""
    if node.op == "call_method":
        return str(node.target) in _VALUE_READS
    return node.op == "call_function" and node.target in (float, int, bool, complex)


def _lone(val: _Val) -> bool:
    """A region that is one BatchNorm (with an identity or dropout around it): as a 1x1 depthwise
    conv it would have the same parameters and multiply-adds, so folding it gains nothing."""
    return val.has_bn and not val.weighted and not val.merged and val.count == 1


def _worth(val: _Val) -> bool:
    """A region is folded when it removes something: a conv/linear merged with anything else, or
    several operations that are not convs (BN + scale, branches summed) made one layer. A lone
    BatchNorm stays as it is (`_lone`)."""
    if not isinstance(val.lin, A.Kernel) or val.trivial or _lone(val):
        return False
    return val.weighted and val.count > 1 or (not val.weighted and (val.has_bn or val.merged) and val.count > 1)


def _cost_problem(val: _Val) -> str | None:
    """Why the region's fused layer would cost more than what it replaces (None: it does not)."""
    k: A.Kernel = val.lin  # type: ignore[assignment]
    if _cost(k) > val.cost * (1 + 1e-9):
        return (f"-> {_kernel_desc(k)}: the fused layer costs more multiply-adds than the branches it replaces "
                "(FLOP rule)")
    if _params(k) > val.params:
        return (f"-> {_kernel_desc(k)}: the fused layer has more parameters ({_params(k)}) than the layers it "
                f"replaces ({int(val.params)})")
    return None


_VIEWS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t", "expand",
          "expand_as", "squeeze", "unsqueeze", "narrow", "unfold", "as_strided", "chunk", "split", "unbind",
          "movedim", "swapaxes", "diagonal", "select", "detach", "contiguous", "type_as", "to", "float", "double",
          "half", "bfloat16", "real", "view_as_real", "__getitem__", "getitem"}


def _is_view(node: fx.Node) -> bool:
    """Whether `node`'s result may share memory with its first input (then a change of one changes both)."""
    if node.op == "call_method":
        return str(node.target) in _VIEWS
    if node.op == "call_function":
        return getattr(node.target, "__name__", "") in _VIEWS
    return False


def _in_place(module: nn.Module, node: fx.Node) -> fx.Node | None:
    """The tensor an operation changes in place (`x.relu_()`, `x += y`, `F.relu(x, inplace=True)`,
    `nn.ReLU(inplace=True)`, `x[...] = v`), or None."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.startswith("__") else None
    if node.op == "call_module":
        try:
            m = module.get_submodule(str(node.target))
        except AttributeError:
            return None
        return first if getattr(m, "inplace", False) is True else None
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", "")
    if node.target in (operator.setitem,) or (name.startswith("i") and getattr(operator, name, None) is node.target
                                               and name not in ("index", "is_", "is_not", "inv", "invert")):
        return first
    if name.endswith("_") and not name.startswith("_"):
        return first
    if node.kwargs.get("inplace") is True:
        return first
    try:
        import inspect

        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return None
    if "inplace" in params and params.index("inplace") < len(node.args) and node.args[params.index("inplace")] is True:
        return first
    return None


def _mutations(module: nn.Module, graph: fx.Graph) -> dict[fx.Node, list[int]]:
    """For every tensor changed in place: the positions (graph order) of the changes. A change of a
    view changes what it views and every other view of it, so each alias is listed too."""
    out: dict[fx.Node, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        target = _in_place(module, node)
        if target is None:
            continue
        base = target  # back to the tensor whose memory it is: through views and earlier in-place results
        while base.args and isinstance(base.args[0], fx.Node) and (_is_view(base) or _in_place(module, base) is not None):
            base = base.args[0]
        seen, todo = set(), [base, target, node]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            out.setdefault(n, []).append(i)
            todo.extend(u for u in n.users if _is_view(u) or _in_place(module, u) is n)
    return out


def _uses(node: fx.Node) -> int:
    """How many times `node`'s values are read (cat([y, y]) reads y twice; x.shape reads no value)."""
    return sum(_count_in(user, node) for user in node.users if not _meta_read(user))


_META_ATTRS = {"shape": "shape", "ndim": "rank", "dtype": "rank", "device": "rank", "is_cuda": "rank"}
_META_METHODS = {"size": "shape", "dim": "rank", "get_device": "rank"}


def _meta_read(node: fx.Node) -> str | None:
    """'rank' or 'shape' if `node` reads only its tensor's metadata (x.ndim, x.dim(), x.dtype: 'rank';
    x.shape, x.size(...): 'shape'), else None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return _META_ATTRS.get(node.args[1])
    if node.op == "call_method":
        return _META_METHODS.get(str(node.target))
    return None


def _count_in(user: fx.Node, node: fx.Node) -> int:
    found = []
    fx.node.map_arg((user.args, user.kwargs), lambda n: found.append(n) if n is node else None)
    return len(found)


_SAME_RANK_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                      nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.Linear,
                      nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd,
                      nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                      nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
                      nn.modules.padding._ReplicationPadNd, nn.Upsample)
_SAME_RANK_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
                        F.elu, F.mish, F.dropout, torch.relu, torch.sigmoid, torch.tanh, F.batch_norm, F.layer_norm,
                        F.linear, F.pad, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d,
                        F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                        operator.neg, torch.neg, torch.cat}
_BROADCAST = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
              operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_SAME_RANK_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "float", "double", "half", "to", "type_as",
                      "clone", "detach", "neg", "add", "add_", "mul", "mul_", "sub", "div", "clamp", "abs"}


def _rank(plan: "_Analysis", node: fx.Node) -> int | None:
    """The rank (number of dims) of `node`'s tensor where the code says it for every input, else None.
    Structural only (the same on meta skeletons): the rank given for the module's input, convs
    (n + 2 dims: a batch), flatten(1), view/reshape with every size, and ops that keep the rank."""
    def r(arg: Any) -> int | None:
        if isinstance(arg, fx.Node):
            if arg in plan.consts and isinstance(plan.consts[arg], torch.Tensor):
                return plan.consts[arg].dim()
            return plan.rank.get(arg)
        return None

    first = node.args[0] if node.args else None
    if node.op == "placeholder":
        return plan.input_rank if next(iter(plan.order)) is node else None
    if node.op == "get_attr":
        value = plan.consts.get(node)
        return value.dim() if isinstance(value, torch.Tensor) else None
    if node.op == "call_module":
        try:
            m = plan.module.get_submodule(str(node.target))
        except AttributeError:
            return None
        if isinstance(m, nn.modules.conv._ConvNd):
            return r(first) or len(m.kernel_size) + 2
        if isinstance(m, nn.Flatten):
            if m.start_dim == 1 and m.end_dim == -1:
                return 2
            return None
        if isinstance(m, _SAME_RANK_MODULES) or type(m).__module__ == "torch.nn.modules.activation" \
                or bn_kind(m) == "frozen":
            return r(first)
        return None
    if node.op == "call_function":
        if node.target in _CONV_FN:
            return r(first) or _CONV_FN[node.target] + 2
        if node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return 2 if start == 1 and end == -1 else (1 if start == 0 and end == -1 else None)
        if node.target is torch.cat:
            tensors = first if isinstance(first, (list, tuple)) else node.kwargs.get("tensors", ())
            return r(tensors[0]) if tensors else None
        if node.target in _BROADCAST:
            ranks = [r(a) if isinstance(a, fx.Node) else 0 for a in node.args[:2]]
            return None if any(x is None for x in ranks) else max(ranks)
        if node.target in _SAME_RANK_FUNCTIONS:
            return r(first)
        return None
    if node.op == "call_method":
        name = str(node.target)
        if name in ("view", "reshape"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
                sizes = sizes[0]
            return len(sizes) if sizes else None
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return 2 if start == 1 and end == -1 else (1 if start == 0 and end == -1 else None)
        if name in ("mean", "sum", "amax", "amin") and r(first) is not None:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            if isinstance(dims, int):
                dims = (dims,)
            if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims) and isinstance(keep, bool):
                return r(first) if keep else r(first) - len(set(d % r(first) for d in dims))
            return None
        if name in _SAME_RANK_METHODS:
            if name in ("add", "add_", "mul", "mul_", "sub", "div") and len(node.args) > 1:
                ranks = [r(a) if isinstance(a, fx.Node) else 0 for a in node.args[:2]]
                return None if any(x is None for x in ranks) else max(ranks)
            return r(first)
    return None


# --------------------------------------------------------------------------- the pass

class WrongFold(ReparamError):
    """A fold the pass made does not compute what the layers it replaces compute (a bug: never written)."""


class _Pass:
    def __init__(self, opaque: set[int], check: bool = True,
                 inputs: Callable[[str], tuple[int, int] | None] | None = None):
        self.opaque = opaque
        self.inputs = inputs            # path -> (rank, channels) of the module's recorded input
        self.used_inputs: dict[str, tuple[int, int]] = {}  # those a fold used (a deploy file stores them)
        self.check = check              # the float64 check of every fused region
        self.regions: list[FusedRegion] = []
        self.remaining: list[Remaining] = []
        self.untraceable: list[str] = []
        self.bn_reasons: dict[str, str] = {}
        self.kept: dict[str, str] = {}  # BatchNorm path -> why it stays (nothing to gain)
        self.ranks: dict[int, int] = {}  # module -> the rank of its input, as its parent's code says
        self.failed: set[int] = set()   # modules that cannot be traced (opaque to their parents)
        self.done: set[int] = set()     # modules already processed
        self.path_of: dict[int, str] = {}

    def process(self, m: nn.Module, path: str, verify_path: str) -> nn.Module:
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)) and id(m) not in self.opaque:
            self._descend(m, path, verify_path)  # containers without a forward: their modules are called
            return m
        if id(m) in self.opaque or id(m) in self.done or id(m) in self.failed or _is_builtin_leaf(m) \
                or bn_kind(m) == "frozen":
            return m
        try:
            return self._process(m, path, verify_path)
        except WrongFold:
            raise
        except Exception as exc:  # no module makes the pass fail: it is left as it is, with the reason
            self.remaining.append(Remaining(path, "unfoldable", f"the graph pass stopped here: {describe(exc)}"))
            self.failed.add(id(m))
            self._descend(m, path, verify_path)
            return m

    def _input(self, path: str) -> tuple[int, int] | None:
        found = self.inputs(path) if self.inputs is not None else None
        if found is not None:
            self.used_inputs[path] = found
        return found

    def _analyse(self, m: nn.Module, graph: fx.Graph, shapes_only: bool) -> _Analysis:
        """The analysis of `graph`; where a region through a merge (add / cat) would cost more than
        what it replaces, that merge is not made and the analysis repeated, so each branch folds on
        its own (the latest merges first, so the largest folds that do not cost more are kept)."""
        split: dict[fx.Node, str] = {}
        rank = self.ranks.get(id(m))
        for _ in range(16):
            # (on meta, torch's own shape functions are Python references: shape_only answers them)
            with shape_only() if shapes_only else contextlib.nullcontext():
                plan = _Analysis(m, graph, shapes_only=shapes_only, opaque=self.opaque, input_rank=rank,
                                 split=split, channels_in=lambda: self._input(self.path_of[id(m)]))
            new: dict[fx.Node, str] = {}
            for v in plan.outputs:
                val = plan.vals[v]
                problem = _cost_problem(val) if plan.worth(v) else None
                if v in plan.unsafe:
                    problem = f"the branches read {val.root.name} before and after an in-place change of it"
                if problem:
                    merges = [n for n in val.nodes if n in plan.merges and n not in split]
                    if merges:
                        new[max(merges, key=plan.order.__getitem__)] = problem.removeprefix("-> ")
            if not new:
                break
            split.update(new)
        for node in graph.nodes:  # what this module's code says about its children's input
            if node.op == "call_module" and "." not in str(node.target) and node.args \
                    and isinstance(node.args[0], fx.Node) and plan.rank.get(node.args[0]) is not None:
                child = getattr(m, str(node.target), None)
                if isinstance(child, nn.Module):
                    self.ranks[id(child)] = plan.rank[node.args[0]]
        for v in plan.outputs:
            if v not in plan.unsafe and _lone(plan.vals[v]):
                for n in plan.vals[v].nodes:
                    if (bn := _bn_path(m, n)) is not None:
                        self.kept[_join(self.path_of[id(m)], bn)] = (
                            "a lone BatchNorm: as a 1x1 depthwise conv it would have the same parameters and "
                            "multiply-adds, so it stays (nothing to gain)")
        return plan

    def _process(self, m: nn.Module, path: str, verify_path: str) -> nn.Module:
        self.path_of[id(m)] = path
        leaves = self.opaque
        try:
            graph = _trace(m, leaves)
        except Exception as exc:  # data-dependent control flow, unsupported Python: the children first
            self._descend(m, path, verify_path)
            # If only some children are untraceable, the module's own code may still be: trace it
            # with those children opaque, so regions around them are folded too.
            failing = {id(c) for c in m._modules.values() if c is not None and id(c) in self.failed}
            try:
                if not failing:
                    raise exc
                leaves = self.opaque | failing
                graph = _trace(m, leaves)
            except Exception:
                self.remaining.append(Remaining(path, "untraceable", describe(exc)))
                self.untraceable.append(path)
                self.failed.add(id(m))
                return m
        single = sum(n.op == "placeholder" for n in graph.nodes) == 1
        # Verification runs a block on the one input it captured: a module with several inputs
        # reports its regions at the nearest ancestor that has a single one.
        here = path if single or not path else verify_path
        if all(c is None or id(c) in leaves or _is_builtin_leaf(c) or bn_kind(c) == "frozen"
               for c in m._modules.values()):
            # Every child is a leaf of this trace (a conv-BN-ReLU layer): every region is this module's
            # own, so the one analysis with kernels decides (no shapes-only analysis, no second trace).
            plan = self._analyse(m, graph, shapes_only=False)
            if not any(plan.worth(v) for v in plan.outputs):
                for node, reason in plan.refusals:
                    self._refuse(path, node, reason, node in plan.cost_refused)
                self.done.add(id(m))
                return m
            result = self._rewrite(m, graph, plan, path, here)
            self.done.add(id(result))
            return result
        plan = self._analyse(m, graph, shapes_only=True)
        own = [v for v in plan.outputs if plan.worth(v) and not _owner(plan.vals[v].nodes)]
        if not own:
            for node, reason in plan.refusals:  # those across this module's children (the rest: below)
                if not _owner(plan.involved.get(node, [node])):
                    self._refuse(path, node, reason, node in plan.cost_refused)
            self._descend(m, path, here)
            self.done.add(id(m))
            return m
        entangled = {t for v in own for n in plan.vals[v].nodes if (t := _top(n)) is not None}
        for name, child in list(m._modules.items()):
            if child is not None and name not in entangled:
                m._modules[name] = self.process(child, _join(path, name), here)
        leaves = leaves | {id(c) for name, c in m._modules.items() if c is not None and name not in entangled}
        graph = _trace(m, leaves)
        result = self._rewrite(m, graph, self._analyse(m, graph, shapes_only=False), path, here)
        self.done.add(id(result))
        return result

    def _descend(self, m: nn.Module, path: str, verify_path: str) -> None:
        for name, child in list(m._modules.items()):
            if child is not None:
                m._modules[name] = self.process(child, _join(path, name), verify_path)

    def _refuse(self, path: str, node: fx.Node, reason: str, cost: bool = False) -> None:
        where = _join(path, ".".join(_scope(node)[-1:]) or "")
        if node.op == "call_module":
            where = _join(path, str(node.target))
        self.remaining.append(Remaining(where, "kept" if cost else "unfoldable", reason))

    def _rewrite(self, m: nn.Module, graph: fx.Graph, plan: _Analysis, path: str, verify_path: str) -> nn.Module:
        for node, reason in plan.refusals:
            self._refuse(path, node, reason, node in plan.cost_refused)
        calls = {}
        for n in graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        fused: dict[str, nn.Module] = {}
        absorbed: set[fx.Node] = set()
        read = {n for n in graph.nodes if n.users}  # parameters read before: those read no more leave the model
        replaced: dict[fx.Node, fx.Node] = {}
        regions: list[FusedRegion] = []
        for v in plan.outputs:
            val = plan.vals[v]
            if not plan.worth(v):
                continue
            k: A.Kernel = val.lin  # type: ignore[assignment]
            before = ", ".join(_branch_text(val.branches))
            try:
                problem = _cost_problem(val)
                if problem:
                    raise _CostRule(problem)
                layer = A.to_module(k, dtype=val.dtype or plan.dtype)
            except NotEquivalent as exc:
                reason = f"{before} {exc.message}" if exc.message.startswith("->") else f"{before}: {exc.message}"
                self._refuse(path, v, reason, isinstance(exc, _CostRule))
                for n in val.nodes:  # the BatchNorms this region would have folded stay, for this reason
                    if (bn := _bn_path(m, n)) is not None:
                        self.bn_reasons[_join(path, bn)] = reason
                continue
            if self.check and not k.weight.is_meta:
                captured = self.inputs.shapes.get(path) if self.inputs is not None and val.root.op == "placeholder" \
                    and next(iter(plan.order)) is val.root else None
                _check_region(m, plan, v, val, k, _join(path, before), replaced.get(val.root), captured)
            name = self._name(m, val, calls, fused)
            fused[name] = layer
            with graph.inserting_before(min(val.nodes, key=plan.order.__getitem__)):
                # Where the region first read its input (an in-place change may follow), and the
                # input may itself be a region output replaced above: read the fused one.
                new = graph.call_module(name, (replaced.get(val.root, val.root),))
            v.replace_all_uses_with(new)
            for n in val.nodes:  # shape checks of absorbed layers read the fused output (same rank/shape)
                for u in list(n.users):
                    if _meta_read(u):
                        u.replace_input_with(n, new)
            replaced[v] = new
            absorbed.update(val.nodes)
            regions.append(FusedRegion(verify_path, _join(path, name), before, _kernel_desc(k)))
        for node in reversed(list(graph.nodes)):  # drop the absorbed nodes (and weight transforms) nobody reads
            if not node.users and (node in absorbed or (node in plan.consts and node in read)):
                graph.erase_node(node)
        stale = [n for n in graph.nodes if n.op == "call_module" and n.target in fused and n not in replaced.values()]
        if stale:  # a reused layer name still called by an unfused node would run the fused layer there
            raise AssertionError(f"graph pass: {stale[0].target} is still called by {stale[0].name}")
        graph.lint()
        self.regions.extend(regions)
        return _graph_module(m, graph, fused)

    def _name(self, m: nn.Module, val: _Val, calls: dict, taken: dict) -> str:
        """The fused layer keeps the name of the region's first conv / linear (else its BatchNorm)."""
        mods = [n for n in val.nodes if n.op == "call_module"]
        weighted = (nn.Linear, nn.modules.conv._ConvNd)
        for n in sorted(mods, key=lambda n: not isinstance(m.get_submodule(str(n.target)), weighted)):
            if calls.get(n.target) == 1 and n.target not in taken:
                return str(n.target)
        base = f"{val.nodes[-1].name}_fused"
        name, i = base, 1
        while name in taken or name in calls:
            name, i = f"{base}_{i}", i + 1
        return name


def _bn_path(m: nn.Module, node: fx.Node) -> str | None:
    """The BatchNorm module (path relative to `m`) that `node` runs, if it runs one: a call of a
    BatchNorm module, or the F.batch_norm inside a BatchNorm subclass's own forward."""
    if node.op == "call_module":
        try:
            return str(node.target) if bn_kind(m.get_submodule(str(node.target))) else None
        except AttributeError:
            return None
    if node.op == "call_function" and node.target is F.batch_norm:
        scope = _scope(node)
        return scope[-1] if scope else None
    return None


def _check_region(m: nn.Module, plan: _Analysis, v: fx.Node, val: _Val, k: A.Kernel, where: str,
                  fused_root: fx.Node | None = None, captured: tuple[int, ...] | None = None) -> None:
    """The independent check of one fold, run with or without verification: the region's own
    operations (copied out of the traced graph) and the fused layer, both in float64, on one small
    random input of the region's rank; a relative difference above 1e-7 is a WrongFold (the
    float64 rounding floor is ~1e-15, a wrong axis, alias or kernel gives O(1)). `captured`: the
    shape a recorded forward pass saw at the region's input (its module's input), when known: the
    input then has that shape (batch 1, a conv's spatial dims cut to a few windows: a few ms)."""

    sub = fx.Graph()
    env: dict[fx.Node, Any] = {val.root: sub.placeholder("x")}
    if fused_root is not None:  # the input is a region output fused just before: its readers read that
        env[fused_root] = env[val.root]
    root: dict[str, Any] = {}

    def copy_node(n: fx.Node) -> Any:
        if n not in env:
            if n in plan.consts:  # a parameter or weight transform: the value the analysis used
                value = plan.consts[n]
                if isinstance(value, torch.Tensor):
                    root[f"_c{len(root)}"] = value.detach().to(torch.float64, copy=True)
                    env[n] = sub.get_attr(f"_c{len(root) - 1}")
                else:
                    env[n] = value
            else:
                for inp in n.all_input_nodes:
                    copy_node(inp)
                env[n] = sub.node_copy(n, lambda a: env[a])
                if n.op == "call_module":
                    root[str(n.target)] = m.get_submodule(str(n.target))
        return env[n]

    try:
        sub.output(copy_node(v))
        original = fx.GraphModule(root, sub)  # the region's own layers (run with float64 copies of their tensors)
        state = {k: v.detach().double() if v.is_floating_point() else v
                 for k, v in (*original.named_parameters(), *original.named_buffers())}
    except Exception as exc:
        raise WrongFold(f"graph pass: the fold of {where} could not be checked ({describe(exc)})",
                        hint="this is a bug in reparam's graph pass; pass --no-graph to convert without it") from exc
    g = torch.Generator().manual_seed(0)
    extent = [d * (s - 1) + 1 for s, d in zip(k.kernel_size, k.dilation)]
    windows = [e + max(k.stride) + 1 for e in extent]  # every border case, few positions
    if k.ndim == 0:
        rank = plan.rank.get(val.root) or 2
        shape = (2, *([3] * (rank - 2)), k.in_channels)
        if captured and len(captured) >= 2 and captured[-1] == k.in_channels:
            shape = (min(captured[0], 2), *captured[1:])
    else:
        shape = (1, k.in_channels, *windows)
        if captured and len(captured) == k.ndim + 2 and captured[1] == k.in_channels:
            shape = (1, k.in_channels, *[min(c, w) for c, w in zip(captured[2:], windows)])
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(k.weight.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: one thread is fastest (and several can wait on a busy machine)
    try:
        with torch.no_grad():
            ref = torch.func.functional_call(original, state, (x,))
            out = A.to_module(k, dtype=torch.float64)(x)
    finally:
        torch.set_num_threads(threads)
    if out.shape != ref.shape:
        found = f"output shape {tuple(out.shape)} instead of {tuple(ref.shape)}"
    else:
        err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        found = None if err <= 1e-7 else f"relative error {err:.2g}"
    if found:
        raise WrongFold(f"graph pass: the fold of {where} -> {_kernel_desc(k)} does not compute what its layers "
                        f"compute (float64 check on input {tuple(shape)}: {found})",
                        hint="this is a bug in reparam's graph pass; pass --no-graph to convert without it")


def _owner(nodes: list[fx.Node]) -> list[str]:
    """The deepest module (as its path chain) whose forward contains every one of `nodes`."""
    common: list[str] = []
    for level in zip(*[_scope(n) for n in nodes]):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return common


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else (path or name)


def _graph_module(m: nn.Module, graph: fx.Graph, fused: dict[str, nn.Module]) -> fx.GraphModule:
    """A GraphModule running `graph`, named like `m`'s class, holding `m`'s layers and the fused ones
    (state-dict keys are the layers' qualified names); `m`'s plain attributes are kept."""
    root: dict[str, Any] = {}
    buffers: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            if target in fused:
                root[target] = fused[target]
            else:
                root[target] = _fetch(m, target, getattr(graph, "constants", None))
                if node.op == "get_attr" and isinstance(root[target], torch.Tensor) \
                        and not isinstance(root[target], nn.Parameter):
                    buffers[target] = root[target]
    gm = fx.GraphModule(root, graph, class_name=type(m).__name__)
    _restore_containers(gm, m)
    for target, tensor in buffers.items():  # fx stores plain tensors as attributes: keep them in the state dict
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        delattr(owner, name)
        owner.register_buffer(name, tensor)
    for key, value in vars(m).items():  # e.g. a detection model's `stride`, `names`
        if not key.startswith("_") and key != "training" and not hasattr(gm, key):
            setattr(gm, key, value)
    gm.train(m.training)
    return gm


def _unchanged_holder(original: nn.Module, plain: nn.Module) -> bool:
    """Whether `plain` holds every child of `original` unchanged and `original` reads no tensors of its
    own that were folded (it has none, or it is a module this pass already rewrote, whose constants
    are its own): then `original`'s forward, run on those children, computes what it computed."""
    own = isinstance(original, fx.GraphModule) or (not original._parameters and not original._buffers)
    return own and all(plain._modules.get(k) is c for k, c in original._modules.items() if c is not None)


def _restore_containers(gm: fx.GraphModule, m: nn.Module) -> None:
    """fx holds a layer called inside a container (`self.transition1[0][1]`) under plain `nn.Module`s
    for the container levels: each that was a ModuleList, ModuleDict or Sequential in `m` (a
    Sequential left with its fused conv and activation runs them in order), or any module whose
    children all survive unchanged and that has no tensors of its own, becomes a copy of it holding
    those layers, so the deploy model indexes and runs them as the training model does. Other
    modules stay plain holders (no forward): their own code was traced and folded into the graph."""
    for path, plain in list(gm.named_modules()):
        if not path or type(plain) is not nn.Module:
            continue
        try:
            original = m.get_submodule(path)
        except AttributeError:
            continue
        if type(original) not in (nn.ModuleList, nn.ModuleDict, nn.Sequential) and not _unchanged_holder(original, plain):
            continue  # its own forward was traced and folded (timm's BatchNormAct2d holding act and drop)
        twin = shallow_copy(original)
        # (A child set to None, `self.norm = None` after a library's own fuse, stays None: its
        # forward tests it.)
        twin._modules = {k: plain._modules.get(k) for k, c in original._modules.items()
                         if k in plain._modules or c is None}
        owner_path, _, name = path.rpartition(".")
        setattr(gm.get_submodule(owner_path) if owner_path else gm, name, twin)


class RecordedInputs:
    """(rank, channel count) of each module's input, for the channel counts code reads from its input
    (`groups=x.shape[1]`): from a deploy file's record (`stored`: {path: (rank, channels)}; a meta
    skeleton runs nothing), else recorded on one forward pass of the model on `example`, run the
    first time the pass asks (most models never ask). `used` is what the pass used: a deploy file
    stores it, so its skeleton makes the same folds."""

    def __init__(self, example: Any = None, stored: Iterable[Iterable[Any]] | None = None):
        self.example = example
        self.seen = None if stored is None else {str(p): (int(r), int(c)) for p, r, c in stored}
        self.shapes: dict[str, tuple[int, ...]] = {}  # full input shapes, where a forward pass was recorded
        self.model: nn.Module | None = None
        self.used: dict[str, tuple[int, int]] = {}

    def __call__(self, path: str) -> tuple[int, int] | None:
        if self.seen is None:
            self.seen = self._record() if self.model is not None and self.example is not None else {}
        found = self.seen.get(path)
        if found is not None:
            self.used[path] = found
        return found

    def _record(self) -> dict[str, tuple[int, int]]:
        model = self.model
        seen: dict[str, tuple[int, int] | None] = {}
        names = {id(m): p for p, m in model.named_modules()}

        def pre(m, args):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            value = (x.dim(), x.shape[1]) if x is not None and x.dim() >= 2 else None
            path = names.get(id(m))
            if path is not None:  # called twice with different inputs: unknown
                seen[path] = value if seen.get(path, value) == value else None
                if x is not None and self.shapes.setdefault(path, tuple(x.shape)) != tuple(x.shape):
                    self.shapes[path] = ()

        hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
        snapshot = AttributeSnapshot(model)
        try:
            args, kwargs = _call_for(model, self.example)
            with torch.no_grad():
                model(*args, **kwargs)
        except Exception:
            return {}
        finally:
            for h in hooks:
                h.remove()
            snapshot.restore()
        return {p: v for p, v in seen.items() if v is not None}


def fuse_graph(model: nn.Module, opaque: Iterable[nn.Module] = (), check: bool = True,
               inputs: RecordedInputs | None = None, sealed: Iterable[str] = ()) \
        -> tuple[nn.Module, list[FusedRegion], list[Remaining], dict[str, str]]:
    """Fold every exactly-foldable linear region of `model` (see the module doc).

    `model` is modified (its children replaced): pass a copy (the engine passes its fresh deploy
    tree). `opaque` modules (recipe products) are never traced into or changed. The modules at the
    `sealed` paths (what a block's own method returned: timm's RepGhost keeps a conv+BN inside)
    are folded inside, each on its own, and are then leaves of their parents' traces: a fold across
    such a block's boundary would change the function verification compares block by block.
    Returns (model or the GraphModule replacing it, the fused regions, what was left: refusals
    and untraceable modules, {BatchNorm path: why its region was not folded}; `leftovers` adds
    the BatchNorms and native methods still present). The BatchNorm reasons include, with kind
    'kept', the lone BatchNorms that stay because folding them gains nothing (`leftovers` reports
    those as kind 'kept', not as something left).

    `check` (default): every fold is checked on its own in float64 (`_check_region`, a few ms per
    region, also when the caller does not verify); a wrong fold raises WrongFold.
    `inputs`: where code reads a channel count from a module's input (see RecordedInputs).
    """
    if inputs is not None and inputs.model is None:
        inputs.model = model
    work = _Pass({id(m) for m in opaque}, check=check, inputs=inputs)
    was_training = model.training
    # Traced in eval mode, what a deploy model runs (and the same on a meta skeleton in any mode).
    model.eval()
    with torch.no_grad():
        for path in sorted((p for p in set(sealed) if p), key=lambda p: -p.count(".")):  # inner first
            owner_path, _, name = path.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            block = work.process(owner._modules[name], path, path)
            owner._modules[name] = block
            work.opaque.add(id(block))
        result = work.process(model, "", "")
    result.train(was_training)
    reasons = dict(work.bn_reasons)
    for bn, why in work.kept.items():
        reasons.setdefault(bn, KEPT + why)
    return result, work.regions, work.remaining, reasons


KEPT = "kept: "  # a BatchNorm reason that marks it as kept on purpose (no gain), not left


def leftovers(model: nn.Module, opaque: Iterable[nn.Module] = (), remaining: Iterable[Remaining] = (),
              graph: bool = True, bn_reasons: dict[str, str] | None = None,
              sealed: Iterable[str] = ()) -> list[Remaining]:
    """What a deploy model still has that a conversion could fold: BatchNorm layers (with the reason
    found in `remaining`, else why not) and modules with a native deploy method that was not called.
    Modules inside `opaque` products (already converted) are not looked into; inside the products
    of native methods (at the `sealed` paths: the method ran, and every block inside was searched
    again) only BatchNorms are. A BatchNorm kept on purpose (a lone one: folding it gains nothing) has kind
    'kept': information, not something left."""
    skip = {id(m) for m in opaque}
    done = set(sealed)
    remaining = list(remaining)
    untraceable = [r.path for r in remaining if r.kind == "untraceable"]
    reasons = {r.path: r.reason for r in remaining if r.kind == "unfoldable"}
    reasons.update(bn_reasons or {})
    found: list[Remaining] = []

    def walk(m: nn.Module, path: str, in_sealed: bool) -> None:
        if id(m) in skip:
            return
        if bn_kind(m) is not None:
            why = _bn_reason(path, reasons, untraceable, graph)
            if why.startswith(KEPT):
                found.append(Remaining(path, "kept", why.removeprefix(KEPT)))
            else:
                found.append(Remaining(path, "batchnorm", why))
            return
        in_sealed = in_sealed or path in done
        method = native_method(m)
        if method is not None and path and not in_sealed:
            found.append(Remaining(path, "native-method", f"has its own {method}() that was not called"))
        for name, child in m.named_children():
            walk(child, _join(path, name), in_sealed)

    walk(model, "", False)
    return found


def _bn_reason(path: str, reasons: dict[str, str], untraceable: list[str], graph: bool) -> str:
    if not graph:
        return "the graph pass is off (--no-graph)"
    if path in reasons:
        return reasons[path]
    inside = [u for u in untraceable if not u or path.startswith(u + ".")]
    if inside:
        where = max(inside, key=len)
        return f"inside {where or '<root>'}, which cannot be traced"
    return "its input or output is not a linear region the pass can fold"


# --------------------------------------------------------------------------- recorded dataflow

@dataclass
class RecordedFolds:
    """What `fold_recorded` folded: `pairs` [(conv/linear path, BatchNorm path)] in model order (a
    deploy file stores them, so a skeleton replays exactly these folds), the regions for the report
    and verification, and {BatchNorm path: why the recorded forward pass did not prove its pair}."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    regions: list[FusedRegion] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


_PLAIN_LAYER_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}
_aten = torch.ops.aten
# Reshapes (a logical row-major reinterpretation, whatever the strides) that may lie between a layer
# and its BatchNorm when they keep the channel axis (LeViT's bn(linear(x).flatten(0, 1))).
_RESHAPES = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.alias.default}


def _plain_layer(m: nn.Module) -> bool:
    """A conv / linear whose forward is torch's own (so its output is linear in weight rows and bias)."""
    return type(m).forward in _PLAIN_LAYER_FORWARDS and isinstance(getattr(m, "weight", None), torch.Tensor)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nest of tuples, lists and mappings (a Hugging Face ModelOutput too)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _as_call(example: Any) -> tuple[tuple, dict]:
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[0], (tuple, list)) \
            and isinstance(example[1], dict):
        return tuple(example[0]), dict(example[1])
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def _call_for(model: nn.Module, example: Any) -> tuple[tuple, dict]:
    """`example` as (args, kwargs) in the model's floating dtype, on its device."""
    first = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)

    def cast(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and first is not None:
            return t.to(device=first.device, dtype=first.dtype if t.is_floating_point() else t.dtype)
        return t

    return torch.utils._pytree.tree_map(cast, _as_call(example))


_VALUE_OPS = {_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default}
_DIRECT_READS = {"tolist", "data_ptr", "untyped_storage", "storage", "_typed_storage", "__dlpack__", "numpy",
                 "__array__"}


class _Recorder:
    """One forward pass recording, for every call of a conv / linear / BatchNorm leaf, which tensor
    it read and produced, and how often anything else read each layer output (and the reshapes made
    of it): every aten op outside those leaves is seen by a dispatch mode, every leaf call by hooks."""

    def __init__(self, model: nn.Module, layers: dict[int, str], bns: dict[int, str]):
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        self.model, self.layers, self.bns = model, layers, bns
        self.depth = 0
        self.calls: dict[int, int] = {}
        self.stack: list[str] = []                     # paths of the modules running now
        self.produced: dict[int, tuple[str, torch.Tensor, tuple, list[str]]] = {}  # output id -> (layer, out, in shape, stack)
        self.alias: dict[int, int] = {}                # reshape output id -> the tensor it reshapes
        self.reads: dict[int, int] = {}                # tracked tensor id -> reads outside the BatchNorm calls
        self.bn_input: dict[str, tuple[torch.Tensor, list[str]]] = {}
        self.keep: list[torch.Tensor] = []             # tracked tensors stay alive: their ids stay theirs
        self.clock = 0                                 # events in order: module calls and returns, value reads
        self.starts: list[int] = []
        self.spans: dict[str, list[tuple[int, int]]] = {}  # module path -> (call, return) of each call
        self.escapes: dict[int, set[str]] = {}         # tracked tensor id -> modules that returned it
        self.decisions: list[int] = []                 # when the code read a tensor's values (control flow)
        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if func in _VALUE_OPS:
                    recorder.decisions.append(recorder._tick())
                if recorder.depth == 0:
                    recorder._op(func, args, kwargs, out)
                return out

        class Direct(TorchFunctionMode):  # reads that reach a tensor's memory without an aten op
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if name in _DIRECT_READS:
                    if name in ("tolist", "numpy", "__array__"):
                        recorder.decisions.append(recorder._tick())
                    if recorder.depth == 0:
                        for t in recorder._tracked((args, kwargs)):
                            recorder.reads[id(t)] += 1
                return func(*args, **kwargs)

        self.mode = Mode()
        self.direct = Direct()

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _tracked(self, values: Any) -> list[torch.Tensor]:
        return [t for t in _tensors(values) if id(t) in self.reads]

    def _track(self, t: torch.Tensor) -> None:
        self.keep.append(t)
        self.reads[id(t)] = 0

    def _op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        hits = self._tracked((args, kwargs))
        for t in hits:
            self.reads[id(t)] += 1
        if func in _RESHAPES and len(hits) == 1 and args and args[0] is hits[0] and isinstance(out, torch.Tensor) \
                and id(out) not in self.reads:
            self._track(out)
            self.alias[id(out)] = id(args[0])

    def run(self, call: tuple[tuple, dict]) -> None:
        hooks = []
        names = {id(m): p for p, m in self.model.named_modules()}

        def pre(m, args, kwargs):
            path = names.get(id(m), "")
            self.stack.append(path)
            self.starts.append(self._tick())
            if id(m) not in self.layers and id(m) not in self.bns:
                return
            self.calls[id(m)] = self.calls.get(id(m), 0) + 1
            if self.depth == 0:
                for t in self._tracked((args, kwargs)):  # a layer reading a layer output: one more reader
                    self.reads[id(t)] += 1
                if id(m) in self.bns and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
                    if id(args[0]) in self.reads:
                        self.reads[id(args[0])] -= 1  # the BatchNorm's own read: counted apart
                    self.bn_input[self.bns[id(m)]] = (args[0], list(self.stack[:-1]), self.clock)
                self._in_shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            self.depth += 1

        def post(m, args, kwargs, out):
            path = self.stack.pop()
            self.spans.setdefault(path, []).append((self.starts.pop(), self._tick()))
            for t in self._tracked(out):
                self.escapes.setdefault(id(t), set()).add(path)
            if id(m) not in self.layers and id(m) not in self.bns:
                return
            self.depth -= 1
            plain_call = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            if self.depth == 0 and id(m) in self.layers and plain_call and isinstance(out, torch.Tensor) \
                    and id(out) not in self.reads:
                self._track(out)
                self.produced[id(out)] = (self.layers[id(m)], out, self._in_shape, list(self.stack), self.clock)

        for m in self.model.modules():
            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(m.register_forward_hook(post, with_kwargs=True))
        snapshot = AttributeSnapshot(self.model)
        try:
            with torch.no_grad(), self.direct, self.mode:
                out = self.model(*call[0], **call[1])
            for t in self._tracked(out):  # what the model returns is read
                self.reads[id(t)] += 1
        finally:
            for h in hooks:
                h.remove()
            snapshot.restore()


def _record(model: nn.Module, call: tuple[tuple, dict], layers: dict[int, str], bns: dict[int, str]) \
        -> tuple[list[tuple[str, str, str, tuple, tuple]], dict[str, str]]:
    """[(layer path, BatchNorm path, owner path, layer input shape, BatchNorm input shape)] of the
    pairs the recorded forward pass proves, and {BatchNorm path: why not} for the others."""
    rec = _Recorder(model, layers, bns)
    rec.run(call)
    by_path = {p: i for i, p in {**layers, **bns}.items()}
    pairs, why = [], {}
    for bn_path, (y, stack, bn_time) in rec.bn_input.items():
        bn = model.get_submodule(bn_path)
        chain = [id(y)]
        while chain[-1] in rec.alias:
            chain.append(rec.alias[chain[-1]])
        source = rec.produced.get(chain[-1])
        if source is None:
            why[bn_path] = "the recorded forward pass shows that its input is no conv's or linear layer's output"
            continue
        layer_path, x, in_shape, layer_stack, layer_time = source
        owner = _owner_path(stack, layer_stack)
        span = next(((a, b) for a, b in rec.spans.get(owner, []) if a <= layer_time and bn_time <= b), (0, rec.clock))
        layer = model.get_submodule(layer_path)
        problem = None
        if rec.calls.get(by_path[bn_path]) != 1 or rec.calls.get(by_path[layer_path]) != 1:
            problem = "it or the layer before it runs more than once in the recorded forward pass"
        elif rec.reads[chain[0]] or any(rec.reads[t] != 1 for t in chain[1:]):  # (each reshape reads one)
            problem = f"the recorded forward pass shows that {layer_path}'s output is also read elsewhere"
        else:
            axis = x.dim() - 1 if isinstance(layer, nn.Linear) else 1
            channels = layer.weight.shape[0]
            if isinstance(layer, nn.modules.conv._ConvNd) and x.dim() != len(layer.kernel_size) + 2:
                problem = "the conv runs on an unbatched input"
            elif y.dim() < 2 or x.shape[axis] != channels or y.shape[1] != channels \
                    or math.prod(x.shape[:axis]) != y.shape[0] or y.dtype != x.dtype:
                problem = (f"it normalises dim 1 of a {tuple(y.shape)} tensor, not the channels of "
                           f"{layer_path}'s {tuple(x.shape)} output")
            elif getattr(bn, "num_features", channels) != channels:
                problem = "its channel count is not the layer's"
            elif any(span[0] <= d <= span[1] for d in rec.decisions) or (
                    any(owner in rec.escapes.get(t, ()) for t in chain) and any(d > layer_time for d in rec.decisions)):
                # Another input could take another path there (reading the layer's output elsewhere).
                problem = (f"{owner or '<root>'} reads tensor values while it runs (data-dependent control flow): "
                           "one recorded pass does not prove the dataflow of every input")
        if problem:
            why[bn_path] = problem
            continue
        pairs.append((layer_path, bn_path, owner, in_shape, None if y is x else tuple(y.shape)))
    return pairs, why


def _owner_path(a: list[str], b: list[str]) -> str:
    """The deepest module running both calls (the paths of the modules running at each)."""
    common = ""
    for p, q in zip(a, b):
        if p != q:
            break
        common = p
    return common


def _candidates(model: nn.Module, opaque: set[int]) -> tuple[dict[int, str], dict[int, str]]:
    """({id: path} of plain conv / linear layers, {id: path} of foldable BatchNorms): outside
    converted blocks, each module at one path only."""
    count: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        count[id(m)] = count.get(id(m), 0) + 1
    layers, bns = {}, {}

    def walk(m: nn.Module, path: str) -> None:
        if id(m) in opaque:
            return
        if count.get(id(m)) == 1:
            if _plain_layer(m):
                layers[id(m)] = path
            elif bn_kind(m) in ("plain", "frozen") and not isinstance(bn_state(m), str):
                bns[id(m)] = path
        for name, child in m._modules.items():
            if child is not None:
                walk(child, _join(path, name))

    walk(model, "")
    return layers, bns


def _fold_pair(model: nn.Module, layer_path: str, bn_path: str) -> tuple[nn.Module, A.Kernel]:
    """Fold the BatchNorm at `bn_path` into the layer at `layer_path` (new weight and bias tensors,
    nothing shared is changed); the BatchNorm's place holds an nn.Identity. Returns (the layer's
    original in float64 for the check, the fused kernel)."""
    layer, bn = model.get_submodule(layer_path), model.get_submodule(bn_path)
    if not _plain_layer(layer) or bn_kind(bn) not in ("plain", "frozen"):
        raise ReparamError(f"recorded fold {layer_path} + {bn_path}: no conv/linear and BatchNorm there",
                           hint="the deploy file was written by another version of the model code")
    state = bn_state(bn)
    if isinstance(state, str):
        raise ReparamError(f"recorded fold {layer_path} + {bn_path}: {state}")
    groups = getattr(layer, "groups", 1)
    k = A.Kernel(layer.weight, layer.bias, groups=groups)
    fused = A.fuse_bn(k, state, dtype=layer.weight.dtype)
    layer.weight = nn.Parameter(fused.weight.detach(), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(fused.bias.detach(), requires_grad=layer.weight.requires_grad)
    parent, _, name = bn_path.rpartition(".")
    model.get_submodule(parent)._modules[name] = nn.Identity()
    return k, fused


def _check_pair(layer: nn.Module, bn: nn.Module, k: A.Kernel, fused: A.Kernel, in_shape: tuple,
                bn_shape: tuple | None, where: str) -> None:
    """The float64 check of one recorded fold: the layer (its original kernel `k`) then the BatchNorm,
    through the reshape between them, against the fused layer, on a random input of the layer's
    captured input shape (batch 1; a conv's spatial extent cut to a few windows: a few ms).
    `bn_shape`: the shape the BatchNorm read (a reshape of the layer's output), None: the output."""
    def layer_with(kernel: A.Kernel) -> nn.Module:
        new = copy.copy(layer)
        new._parameters = dict(layer._parameters)
        new.weight = nn.Parameter(kernel.weight.detach().double())
        new.bias = None if kernel.bias is None else nn.Parameter(kernel.bias.detach().double())
        return new

    ref_bn = copy.deepcopy(bn).double().eval()
    shape = list(in_shape)
    if shape:
        shape[0] = 1
    if bn_shape is None and isinstance(layer, nn.modules.conv._ConvNd):
        # conv -> BatchNorm: a few windows of each spatial dim hold every border case
        for i, (ks, d, s) in enumerate(zip(layer.kernel_size, layer.dilation, layer.stride)):
            shape[2 + i] = min(shape[2 + i], d * (ks - 1) + 1 + 2 * s + 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = layer_with(k)(x)
            ref = ref_bn(out if bn_shape is None else out.reshape(-1, *bn_shape[1:])).reshape(out.shape)
            got = layer_with(fused)(x)
    except Exception as exc:
        raise WrongFold(f"graph pass: the recorded fold {where} could not be checked ({describe(exc)})",
                        hint="this is a bug in reparam's graph pass; pass --no-graph to convert without it") from exc
    finally:
        torch.set_num_threads(threads)
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if not err <= 1e-7:
        raise WrongFold(f"graph pass: the recorded fold {where} does not compute what its layers compute "
                        f"(float64 check on input {tuple(shape)}: relative error {err:.2g})",
                        hint="this is a bug in reparam's graph pass; pass --no-graph to convert without it")


def fold_recorded(model: nn.Module, opaque: Iterable[nn.Module] = (), example: Any = None,
                  pairs: Iterable[Iterable[str]] | None = None, check: bool = True,
                  kept: Iterable[str] = (), sealed: Iterable[str] = ()) -> RecordedFolds:
    """Fold the conv+BN-like pairs (also linear + BatchNorm1d) that the graph pass left, wherever a
    recorded forward pass proves their dataflow: the BatchNorm reads exactly the layer's output (or
    a reshape of it that keeps the channel axis) and nothing else reads that output, each runs once
    and neither is shared. This reaches into modules fx cannot trace (shape arithmetic through
    `int()`, a `print`, a data-dependent `if` elsewhere): their code runs as it is, on `example`
    (a tensor, a tuple of arguments or (args, kwargs)), with the model's dtype and device.

    `pairs` (as a deploy file stores them): fold exactly those, without recording (a shape-only
    skeleton rebuilt on meta has no values to run on). Modified in place: pass the deploy tree.
    Each fold is checked in float64 (`_check_pair`) when `check` and there are values. `kept`: the
    BatchNorms the graph pass keeps on purpose (lone ones): with no other BatchNorm left, the model
    is not run at all."""
    done = RecordedFolds()
    skip = set()
    for m in opaque:
        skip.update(id(c) for c in m.modules())
    if pairs is not None:
        for layer_path, bn_path in pairs:
            _fold_pair(model, layer_path, bn_path)
            done.pairs.append((layer_path, bn_path))
            done.regions.append(_recorded_region(model, layer_path, bn_path, _common_prefix(layer_path, bn_path)))
        return done
    layers, bns = _candidates(model, skip)
    kept = set(kept)
    bns = {i: p for i, p in bns.items() if p not in kept}
    if not bns or not layers or example is None:
        return done
    call = _call_for(model, example)
    was_training = model.training
    model.eval()
    try:
        found, done.reasons = _record(model, call, layers, bns)
    except Exception as exc:  # a model that does not run on the example: nothing proven
        reason = f"the recorded forward pass failed ({describe(exc)})"
        done.reasons = {p: reason for p in bns.values()}
        return done
    finally:
        model.train(was_training)
    sealed = [p for p in sealed if p]
    for layer_path, bn_path, owner, in_shape, bn_shape in found:
        if _scope_of(layer_path, sealed) != _scope_of(bn_path, sealed):
            block = _scope_of(layer_path, sealed) or _scope_of(bn_path, sealed)
            done.reasons[bn_path] = (f"its layer {layer_path} is on the other side of {block}'s boundary (a block "
                                     f"converted by its own method, verified as it is)")
            continue
        bn = model.get_submodule(bn_path)
        k, fused = _fold_pair(model, layer_path, bn_path)
        region = _recorded_region(model, layer_path, bn_path, owner)
        if check and not fused.weight.is_meta:
            _check_pair(model.get_submodule(layer_path), bn, k, fused, in_shape, bn_shape, region.text)
        done.pairs.append((layer_path, bn_path))
        done.regions.append(region)
    return done


def _scope_of(path: str, sealed: Iterable[str]) -> str:
    """The innermost of the `sealed` paths that holds `path` ('' for none)."""
    return max((p for p in sealed if path.startswith(p + ".")), key=len, default="")


def _common_prefix(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    common = []
    for x, y in zip(pa[:-1], pb[:-1]):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _recorded_region(model: nn.Module, layer_path: str, bn_path: str, owner: str) -> FusedRegion:
    layer = model.get_submodule(layer_path)
    desc = "linear" if isinstance(layer, nn.Linear) else "conv" + "x".join(map(str, layer.kernel_size))
    return FusedRegion(owner, layer_path, f"{desc}+bn", desc)
